"""sample.py on the embedded default: it finds the latest run, writes a grid with its settings, says what to do
when there is no run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
import train
from minflux.files.images import read_settings
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

    # vis2ir on one's own images: a visible image and a semantic map, as files of another size
    from minflux.tasks.scenes import SyntheticTriptychs, split_triptych
    from minflux.pipeline import Vis2IRPipeline
    from minflux.files.images import to_pil

    panels = [split_triptych(SyntheticTriptychs(2, 64, "heldout")[i]["triptych"][None]) for i in range(2)]
    for i, (visible, _, semantic) in enumerate(panels):
        to_pil(visible[0]).resize((96, 96)).save(tmp_path / f"visible{i}.png")
        to_pil(semantic[0]).resize((96, 96), Image.Resampling.NEAREST).save(tmp_path / f"semantic{i}.png")
    argv = ["--run", str(tmp_path / "tiny"), "--visible", str(tmp_path / "visible0.png"), "--semantic-map",
            str(tmp_path / "semantic0.png"), "--steps", "2", "--output-dir", str(tmp_path / "ir")]  # fmt: skip
    assert sample.main(argv) == 0
    written = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert written == tmp_path / "ir" / "img_0000.png"
    infrared = Image.open(written)
    settings = read_settings(written)
    assert infrared.size == (64, 64) and settings["task"] == "vis2ir" and settings["steps"] == 2
    assert settings["visible"]["path"] == str(tmp_path / "visible0.png")
    # the semantic map reaches the model: another map, the same visible image and seed, another result
    pipe = Vis2IRPipeline.from_run(tmp_path / "tiny", device="cpu")
    a = pipe(tmp_path / "visible0.png", tmp_path / "semantic0.png", num_steps=2, seed=0, output="tensor")
    b = pipe(tmp_path / "visible0.png", tmp_path / "semantic1.png", num_steps=2, seed=0, output="tensor")
    assert a.shape == (1, 3, 64, 64) and not torch.equal(a, b)
    assert sample.main([*argv[:4], "--steps", "2"]) == 2  # a visible image without its semantic map
    assert "give --semantic-map with one map for each" in capsys.readouterr().err

    # --trace and --params: one line per stage, in the notes' notation; a parameter table
    assert sample.main(["--runs", str(tmp_path), "--num", "1", "--steps", "1", "--trace", "--params"]) == 0
    out = capsys.readouterr().out
    assert "prepare_vis2ir" in out and re.search(r"^\s+fill_condition\s+.*image \[1, 3, 64, 128\], mask \[1, 1, 64, 128\] "
                                                   r"→ \[1, 32, 320\]$", out, re.M)  # the diptych's Fill condition
    assert re.search(r"^\s+unpack\s+tokens \[1, 32, 64\] → \[1, 16, 8, 16\]$", out, re.M)  # inside generate
    assert "flux (Flux)" in out and "double_blocks (2 × DoubleStreamBlock)" in out and "\ntotal " in out


def test_sample_without_a_run_says_which_command_to_run_first(tmp_path):
    out = subprocess.run([sys.executable, "sample.py", "--runs", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "train one first with:  python train.py" in out.stderr
    assert not list(tmp_path.glob("**/*.png"))
