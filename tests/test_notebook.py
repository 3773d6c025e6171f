"""minflux/study/flux_step.ipynb runs from top to bottom on a CPU, is committed without outputs, points at files that
exist and ships with the package.

The notebook runs in a copy, in a temporary folder, through nbclient and an ipykernel kernel (the test extras:
`pip install -e ".[test]"`). The kernel is the default python3 kernel, its spec written for this test into a
temporary folder (`ipykernel.kernelspec.install(prefix=...)`, found through JUPYTER_PATH): the spec that ipykernel's
wheel installs starts whatever `python` is first on the PATH, which need not be the interpreter running the tests.
"""

import json
import os
import re
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "minflux" / "study" / "flux_step.ipynb"


def cells(kind: str) -> list[dict]:
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == kind]


def test_the_notebook_is_committed_without_outputs():
    code = cells("code")
    assert len(code) >= 8
    for cell in code:
        assert cell["outputs"] == [], "clear the outputs before committing (Jupyter: Edit, Clear Outputs of All Cells)"
        assert cell["execution_count"] is None


def test_the_notebook_points_at_files_that_exist():
    text = "".join("".join(c["source"]) for c in cells("markdown"))
    paths = set(re.findall(r"`(minflux/[\w/]+\.py)`", text)) | set(re.findall(r"`(tests/\w+\.py)`", text))
    links = set(re.findall(r"\]\(([\w/.]+\.md)\)", text))
    assert {"minflux/model.py", "minflux/attention.py", "minflux/sampling.py", "minflux/semantic.py"} <= paths
    assert links, "the notebook links the walk-through"
    assert [p for p in paths if not (ROOT / p).is_file()] == []
    assert [p for p in links if not (NOTEBOOK.parent / p).is_file()] == []


def test_the_notebook_ships_with_the_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.ipynb" in package_data["minflux.study"]


@pytest.mark.slow
def test_the_notebook_runs_on_a_cpu_in_well_under_a_minute(tmp_path, monkeypatch):
    """Every cell runs without an error (the notebook asserts its own checks: the stages by hand equal model(...),
    the Euler loop equals denoise, the hand-written attention equals SemanticCrossAttention's)."""
    nbformat = pytest.importorskip("nbformat", reason="the test extras: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="the test extras: pip install -e '.[test]'")
    kernelspec = pytest.importorskip("ipykernel.kernelspec", reason="the test extras: pip install -e '.[test]'")

    kernelspec.install(kernel_name="python3", prefix=str(tmp_path / "kernel"))  # this interpreter's python3 kernel
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernel" / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # no debugger warning from the kernel
    copy = tmp_path / NOTEBOOK.name
    copy.write_text(NOTEBOOK.read_text())
    notebook = nbformat.read(copy, as_version=4)

    start = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    seconds = time.perf_counter() - start

    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "the same as model(...): True" in printed and "the same as denoise(...): True" in printed
    assert "[1, 3, 64, 64]" in printed  # the decoded image
    assert seconds < 60, f"the notebook took {seconds:.0f} s"
