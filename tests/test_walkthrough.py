"""minflux/study/WALKTHROUGH.md against what `python -m minflux.study.trace flux-dev-kontext` prints.

The walk-through's stage tables read `| step | shape | code | trace line |`. Every backticked shape in the file
must be printed by the trace; a table row's shapes must be on a trace line whose label contains the row's
trace-line text; every `file.py: name` it cites must be a function or class (or `Class.method`) of that file.
A backticked quote of a trace line (a shape with words around it, or an arrow after a number) must be printed as
written: the concatenation and the cut on the `velocity` line, one Euler step's values on the `euler step` line.
"""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

from minflux.study.trace import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "minflux" / "study" / "WALKTHROUGH.md"

SHAPE = re.compile(r"^(\d+ × )?\[\d+(, \d+)*\]$")  # the trace's notation: [1, 4096, 64], 6 × [1, 1, 3072]
QUOTE = re.compile(r"\[\d|\d →")  # `[1, 1, 8704, 64] complex   (...)`, `step 1/1: t 1.000 → t_prev 0.000, ...`
CODE = re.compile(r"^([\w/]+\.py): ([\w.]+)$")  # minflux/sampling.py: prepare_kontext, minflux/model.py: Flux.forward


def backticked(text: str) -> list[str]:
    """The `inline code` spans of Markdown text, fenced blocks left out."""
    return re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE))


def table_rows(doc: str) -> list[tuple[str, list[str], list[str], str | None]]:
    """(step, shapes, code references, trace label or None) of every stage-table row."""
    rows = []
    for line in doc.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 4 or cells[1] == "shape" or set(cells[1]) <= {"-"}:
            continue
        labels = backticked(cells[3])
        rows.append((cells[0], backticked(cells[1]), backticked(cells[2]), labels[0] if labels else None))
    return rows


def defines(file: Path, name: str) -> bool:
    """Whether `file` defines the function or class `name`, or the method `Class.method`."""
    scope = ast.parse(file.read_text(encoding="utf-8")).body
    for part in name.split("."):
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        if not found:
            return False
        scope = found[0].body
    return True


@pytest.fixture(scope="module")
def printed() -> list[tuple[str, str]]:
    """(label, rest) of every line `python -m minflux.study.trace flux-dev-kontext` prints, run in-process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["flux-dev-kontext"]) == 0
    lines = []
    for line in out.getvalue().splitlines():
        label, _, rest = line.strip().partition("  ")  # the label, then two or more spaces
        lines.append((label, rest))
    return lines


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_walkthrough_tables_are_parsed(doc):
    rows = table_rows(doc)
    assert len(rows) >= 40, f"only {len(rows)} table rows found in {DOC}"
    for step, shapes, code, _ in rows:
        assert code, f"row {step!r}: no `file.py: function` in its code column"
        assert all(SHAPE.match(s) for s in shapes), f"row {step!r}: {shapes} are not all shapes in the trace's notation"


def test_walkthrough_shapes_are_printed_by_the_trace(doc, printed):
    text = "\n".join(f"{label}  {rest}" for label, rest in printed)
    shapes = [s for s in backticked(doc) if SHAPE.match(s)]
    assert len(shapes) >= 50
    missing = sorted({s for s in shapes if s not in text})
    assert not missing, f"shapes in WALKTHROUGH.md that the trace does not print: {missing}\n{text}"


def test_walkthrough_rows_name_the_trace_line_of_their_shapes(doc, printed):
    wrong = []
    for step, shapes, _, label in table_rows(doc):
        if label is None:
            continue
        lines = [rest for name, rest in printed if label in name]  # the lines the row points to
        if not lines:
            wrong.append(f"{step!r}: no trace line labelled {label!r}")
        for shape in shapes:
            if not any(shape in rest for rest in lines):
                wrong.append(f"{step!r}: {shape} on no trace line labelled {label!r}")
    assert not wrong, "\n".join(wrong)


def test_walkthrough_names_functions_that_exist(doc):
    refs = [m.groups() for m in map(CODE.match, backticked(doc)) if m]
    assert len(refs) >= 40
    missing = [f"{file}: {name}" for file, name in refs if not ((ROOT / file).is_file() and defines(ROOT / file, name))]
    assert not missing, f"WALKTHROUGH.md names code that does not exist: {missing}"


def test_walkthrough_quotes_are_printed_on_the_velocity_and_euler_step_lines(doc, printed):
    quotes = [q for q in backticked(doc) if QUOTE.search(q) and not SHAPE.match(q)]
    text = "\n".join(f"{label}  {rest}" for label, rest in printed)
    missing = [q for q in quotes if q not in text]
    assert not missing, f"quotes in WALKTHROUGH.md that the trace does not print as written: {missing}\n{text}"
    on = lambda label: [q for q in quotes if any(q in rest for name, rest in printed if name == label)]  # noqa: E731
    joined = [q for q in on("velocity") if re.search(r"\[1, 4096, 64\] .*\[1, 4096, 64\] .*→ \[1, 8192, 64\] →", q)]
    assert joined and joined[0].endswith("→ model → [1, 8192, 64] → cut to [1, 4096, 64]"), on("velocity")
    assert any("t 1.000 → t_prev 0.000, guidance 2.5" in q for q in on("euler step")), on("euler step")
    assert any("64 pairs of 128 channels" in q for q in on("embed_ids")), on("embed_ids")
