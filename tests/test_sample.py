"""sample.py on the embedded default: it finds the latest run, writes a grid with its settings, says what to do
when there is no run."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sample
import train
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sample_uses_the_latest_run_and_writes_a_reproducible_grid(tmp_path, capsys):
    assert train.main([*TINY, "--out", str(tmp_path), "--steps", "2", "--name", "tiny"]) == 0
    capsys.readouterr()
    assert sample.main(["--runs", str(tmp_path), "--num", "3", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    output = Path(lines[-1])
    assert output == tmp_path / "tiny" / "sample-0.png"
    assert "psnr" in lines[0] and "3 held-out scenes" in lines[0]
    image = Image.open(output)
    assert image.text["run"] == str(tmp_path / "tiny") and image.text["seed"] == "0" and image.text["steps"] == "2"
    assert image.size[0] > 4 * 64  # four panels per row: visible, semantic, generated, ground truth


def test_sample_without_a_run_says_which_command_to_run_first(tmp_path):
    out = subprocess.run([sys.executable, "sample.py", "--runs", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "train one first with:  python train.py" in out.stderr
    assert not list(tmp_path.glob("**/*.png"))
