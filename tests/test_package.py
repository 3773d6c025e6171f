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
