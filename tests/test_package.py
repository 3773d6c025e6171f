"""The package's shape: runtime imports, top-level layout, the scripts' --help."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_REFERENCES = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"diffusers", "transformers", "peft", "accelerate"}:
            raise ImportError(f"reference library {name} imported at run time")
sys.meta_path.insert(0, Block())
import pkgutil, importlib, minflux
names = [m.name for m in pkgutil.walk_packages(minflux.__path__, "minflux.")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules")
"""


def test_minflux_and_every_module_import_without_reference_libraries():
    out = subprocess.run([sys.executable, "-c", BLOCK_REFERENCES], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[0]) >= 6  # the blocker saw a real package, not an empty one


def test_blocker_really_blocks_reference_libraries():
    code = BLOCK_REFERENCES.replace("import pkgutil", "import diffusers\nimport pkgutil")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "reference library diffusers" in out.stderr


def test_top_level_holds_only_the_designed_entries():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist, say): nothing to check
        return
    top = {p.split("/")[0] for p in tracked}
    assert top <= {"pyproject.toml", "README.md", "minflux", "train.py", "sample.py", "tests", ".ci", ".gitignore"}


def test_scripts_print_help_and_exit_0():
    for script in ("train.py", "sample.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout


# --- the layout: the model at the top of the package, reading nothing; one recipe -------------------------------

CORE = [
    "model",
    "flux2",
    "attention",
    "hooks",
    "sampling",
    "autoencoder",
    "clip",
    "t5",
    "qwen3",
    "semantic",
    "lora",
    "presets",
]
CORE_IMPORTS = {
    "torch",
    "einops",
    "math",
    "dataclasses",
    "functools",
    "contextlib",
    "time",
    "typing",
    "fnmatch",
    "warnings",
}  # no I/O


def _imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_model_files_import_only_torch_einops_math_and_each_other():
    for name in CORE:
        for module in _imports(ROOT / "minflux" / f"{name}.py"):
            top = module.split(".")[0]
            if top == "minflux":
                assert module.removeprefix("minflux.") in CORE or module == "minflux", f"{name}.py imports {module}"
            else:
                assert top in CORE_IMPORTS, f"minflux/{name}.py imports {module}: the model reads no file"


def _code_files() -> list[Path]:
    return [*sorted((ROOT / "minflux").rglob("*.py")), ROOT / "train.py", ROOT / "sample.py"]


def test_one_recipe_denoise_is_called_from_sampling_alone_and_the_interpolation_written_once():
    import re

    callers = [p for p in _code_files() if re.search(r"(?<!def )\bdenoise\(", p.read_text())]
    assert callers == [ROOT / "minflux" / "sampling.py"], callers
    interpolations = [p for p in _code_files() if "(1 - t) * " in p.read_text()]
    assert interpolations == [ROOT / "minflux" / "sampling.py"], interpolations


def test_files_stay_short_and_speak_of_the_concepts_not_the_notes_numbers():
    import re

    for path in _code_files():
        text = path.read_text()
        limit = 450 if path.name == "train.py" else 520
        assert len(text.splitlines()) <= limit, f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"
        assert not re.search(r"[Ss]eeds? 00\d", text), f"{path.relative_to(ROOT)} names a note by its number"


# Standard-library modules newer than some Python 3 the package might declare: (module, the first version with it).
NEWER_STDLIB = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}


def test_the_declared_python_floor_has_every_standard_module_the_code_imports():
    import re
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    floor = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", declared).groups())
    for path in _code_files():
        for module in _imports(path):
            needs = NEWER_STDLIB.get(module, (3, 0))
            assert floor >= needs, f"{path.relative_to(ROOT)} imports {module}, new in Python {needs}; {declared}"
    assert sys.version_info[:2] >= floor  # and the tests run on a Python the package accepts


def test_a_model_file_imports_the_model_alone_and_the_package_names_resolve():
    code = (
        "import sys, minflux.model; print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('minflux.')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    loaded = set(eval(out.stdout))  # noqa: S307 (our own print)
    assert out.returncode == 0 and not loaded & {"files", "tasks", "study", "pipeline"}, out.stdout + out.stderr
    import minflux

    for name in minflux._MODULE_OF:  # the names that live in files/, tasks/ and pipeline.py, imported when used
        assert getattr(minflux, name) is not None and name in dir(minflux)


def test_no_private_name_is_imported_across_modules():
    import ast

    found = []
    for path in [*ROOT.joinpath("minflux").rglob("*.py"), ROOT / "train.py", ROOT / "sample.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minflux"):
                found += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not found


def test_the_training_step_is_in_plain_sight_and_the_readme_is_short():
    import ast

    tree = ast.parse((ROOT / "train.py").read_text(encoding="utf-8"))
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert lengths["main"] <= 60 and lengths["train"] <= 70, lengths  # setup → loop → finish, each on a screen
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 360 and "## Read FLUX in this order" in readme
    assert "the notes" not in readme.lower()
