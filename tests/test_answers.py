"""Every figure of minflux/study/ANSWERS.md and EXERCISES.md is printed by the command, or recorded in the file, that
its paragraph names; every sum written in backticks adds up; every exercise has an answer.

A paragraph (the text between two blank lines) names its sources: the fast commands written in it in backticks
(FAST: the shape traces and parameter tables on the meta device, two exercises; seconds each), run here in a fresh
folder, and the Markdown files it links to. In EXERCISES.md the commands of the exercise's own bash blocks count
too. A figure is a span in backticks that starts with a digit, a sign or a bracket and holds a digit (`16,897`,
`[1, 8704, 3072]`, `6.0× lower`, `[DEBUG] x_0: [4, 2048, 64]`): it must appear in one of its sources, and not as a
part of a longer number. A span with `=` between numbers is a sum, checked by computing it. A figure without a
source, or a number of three digits or more outside backticks, fails: nothing would notice it drift. The figures of
a run of minutes are written once, in a paragraph that begins *Measured by* (and the table after it), which names
the command that gives them.
"""

import ast
import contextlib
import importlib
import io
import operator
import re
import shlex
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parent.parent / "minflux" / "study"
ANSWERS, EXERCISES = STUDY / "ANSWERS.md", STUDY / "EXERCISES.md"
FILES = {"answers": ANSWERS, "exercises": EXERCISES}

FAST = (
    "python -m minflux.study.trace ",
    "python -m minflux.study.exercises cross-attention",
    "python -m minflux.study.exercises clip-similarity",
)
MEASURED = "*Measured by*"

SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)\s]*)?\)")
FENCE = re.compile(r"```\w*\n(.*?)```", re.S)
SUM = re.compile(r"[\d\s,.+\-−×·/()]+(?:=[\d\s,.+\-−×·/()]+)+")
HEADING = re.compile(r"^## (\d+)\. (.+)$", re.M)


def one_line(text: str) -> str:
    return " ".join(text.split())


def is_sum(span: str) -> bool:
    return SUM.fullmatch(span) is not None


def is_figure(span: str) -> bool:
    """`16,897`, `[1, 8704, 3072]`, `−0.070`, `6.0× lower`: not a flag (`--steps 2`), a name or a sum."""
    return not is_sum(span) and not span.startswith("--") and re.match(r"[\[\d+−-]", span) and re.search(r"\d", span)


def appears(figure: str, text: str) -> bool:
    """The figure in the text, not inside a longer number (`64` is not found in `[1, 4096, 64]`'s `4096`)."""
    return re.search(rf"(?<![\d.])(?<!\d,){re.escape(figure)}(?!\d)(?!,\d)(?!\.\d)", text) is not None


def paragraphs(path: Path) -> list[dict]:
    """The file's paragraphs with the exercise they belong to (0 before the first), their spans, the fast commands
    of their exercise's bash blocks (EXERCISES.md) and whether they record a measurement (*Measured by*)."""
    out, measured = [], False
    parts = HEADING.split(path.read_text())  # [before, number, title, body, number, title, body, ...]
    for number, body in [(0, parts[0])] + [(int(n), b) for n, b in zip(parts[1::3], parts[3::3])]:
        commands = [line.strip() for block in FENCE.findall(body) for line in block.splitlines()]
        section_fast = [c for c in commands if c.startswith(FAST)] if path == EXERCISES else []
        for block in re.split(r"\n\s*\n", FENCE.sub("", body)):
            if not block.strip():
                continue
            measured = block.startswith(MEASURED) or (measured and block.startswith("|"))
            spans = [one_line(s) for s in SPAN.findall(block)]
            out.append(
                dict(
                    exercise=number,
                    text=block,
                    spans=spans,
                    commands=[s for s in spans if s.startswith(FAST)] + section_fast,
                    files=[(path.parent / link).resolve() for link in LINK.findall(block)],
                    measured=measured,
                )
            )
    return out


def run(command: str, folder: Path) -> str:
    """A `python -m module args` command, run in this process in `folder`; what it printed."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    main = importlib.import_module(argv[2]).main
    buffer = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(buffer):
        code = main(argv[3:])
    assert code in (0, None), f"{command} exited with {code}:\n{buffer.getvalue()[-2000:]}"
    return buffer.getvalue()


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """output(command): the command's output, run once (clip-similarity builds its small CLIP in the folder)."""
    folder, seen = tmp_path_factory.mktemp("answers"), {}

    def get(command: str) -> str:
        if command not in seen:
            seen[command] = one_line(run(command, folder))
        return seen[command]

    return get


# --- sums -------------------------------------------------------------------------------------------------------

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> float:
    """`4 × 4,160 + 2 × 128 + 1` → 16897: numbers with thousands commas, + − × · / and parentheses."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", expression).replace("×", "*").replace("·", "*").replace("−", "-")

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not a sum: {expression!r}")

    return value(ast.parse(text.strip(), mode="eval").body)


def adds_up(span: str) -> bool:
    """Every side equals the last one, as far as the last one is written: `0.04279 / 0.00708 = 6.0` (6.04)."""
    *sides, result = span.split("=")
    written = re.sub(r"(?<=\d),(?=\d{3})", "", result.strip())
    decimals = len(written.split(".")[1]) if re.fullmatch(r"\d+\.\d+", written) else None
    target = evaluate(result)
    for side in sides:
        got = evaluate(side)
        if not (round(got, decimals) == target if decimals is not None else abs(got - target) <= 1e-9 * abs(target)):
            return False
    return True


# --- the tests --------------------------------------------------------------------------------------------------


def test_every_exercise_has_an_answer_under_its_own_number_and_title():
    exercises = HEADING.findall(EXERCISES.read_text())
    assert len(exercises) >= 7
    assert HEADING.findall(ANSWERS.read_text()) == exercises


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_every_figure_appears_in_the_output_of_its_command_or_in_its_file(name, output):
    checked, missing = 0, []
    for p in paragraphs(FILES[name]):
        figures = [s for s in p["spans"] if is_figure(s)]
        if p["measured"] or not figures:
            continue
        sources = [output(c) for c in p["commands"]] + [one_line(f.read_text()) for f in p["files"]]
        for figure in figures:
            checked += 1
            if sources and not any(appears(figure, text) for text in sources):
                where = ", ".join(p["commands"] + [f.name for f in p["files"]])
                missing.append(f"exercise {p['exercise']}: `{figure}` is in none of its sources: {where}")
    assert not missing, "\n".join(missing)
    assert checked >= (60 if name == "answers" else 20)


@pytest.mark.parametrize("name", FILES)
def test_every_sum_adds_up(name):
    sums = [(p["exercise"], s) for p in paragraphs(FILES[name]) for s in p["spans"] if is_sum(s)]
    wrong = [f"exercise {n}: `{s}`" for n, s in sums if not adds_up(s)]
    assert not wrong, "these do not add up:\n" + "\n".join(wrong)
    if name == "answers":
        assert len(sums) >= 20


def test_the_sums_are_checked_as_written():
    assert adds_up("4 × 4,160 + 2 × 128 + 1 = 16,897") and adds_up("0.04279 / 0.00708 = 6.0")
    assert not adds_up("2 × 16,385 = 33,088") and not adds_up("16,897 − 16,385 = 256")
    assert appears("64", "[1, 4096, 64]") and not appears("409", "[1, 4096, 64]") and not appears("16,8", "16,897")


@pytest.mark.parametrize("name", FILES)
def test_no_figure_without_a_source(name):
    """A figure in backticks needs a command or a file in its paragraph; a number of three digits or more (or with a
    decimal point) outside backticks is a figure nobody checks."""
    unsourced = []
    for p in paragraphs(FILES[name]):
        if p["measured"]:
            continue
        if not (p["commands"] or p["files"]):
            unsourced += [f"exercise {p['exercise']}: `{s}`" for s in p["spans"] if is_figure(s)]
        prose = LINK.sub("]", SPAN.sub("", p["text"]))
        for number in re.findall(r"\d[\d,.]*\d|\d", prose):
            if len(re.sub(r"\D", "", number)) >= 3 or re.search(r"\d\.\d", number):
                unsourced.append(f"exercise {p['exercise']}: {number} outside backticks")
    assert not unsourced, "\n".join(unsourced)


def test_answers_cite_the_commands_of_the_exercises():
    """A command an answer runs is one the exercise asks the student to run; a measurement names its command."""
    asked = {line.strip() for block in FENCE.findall(EXERCISES.read_text()) for line in block.splitlines()}
    cited = {c for p in paragraphs(ANSWERS) for c in p["commands"]}
    assert cited and cited <= asked, cited - asked
    measured = [p for p in paragraphs(ANSWERS) if p["measured"] and p["text"].startswith(MEASURED)]
    assert measured
    for p in measured:
        assert p["spans"] and p["spans"][0] in asked, p["text"][:200]
        assert "minutes" in p["text"], "a measurement says how long its command takes"
