"""sample.py on the embedded default: it finds the latest run, writes a grid with its settings, says what to do
when there is no run."""

import os
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
def test_sample_edits_held_out_scenes_of_an_embedded_kontext_run_as_its_training_evaluated_them(tmp_path, capsys):
    """A Kontext run's held-out scenes through sample.py: the infrared panel generated from the visible panel (and
    the map) in the sequence, with the noise of the panel's size; the same pixels as the run's own evaluation."""
    import json

    from minflux.pipeline import Vis2IRPipeline
    from minflux.tasks.data import triptychs
    from minflux.tasks.vis2ir import datasets

    args = [*TINY, "--out", str(tmp_path), "--steps", "2", "--task", "kontext", "--semantic", "reference"]
    assert train.main([*args, "--name", "edit"]) == 0
    run = tmp_path / "edit"
    capsys.readouterr()
    assert sample.main(["--run", str(run), "--num-images", "2", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "2 held-out scenes" in lines[0] and Path(lines[-1]).is_file()
    pipe = Vis2IRPipeline.from_run(run)
    _, held = datasets(pipe.config)
    generated = pipe.infrared(triptychs(held), [held[i]["caption"] for i in range(len(held))])  # [2, 3, 64, 64]
    truth = triptychs(held)[..., 64:128]
    mse = ((generated.clamp(-1, 1) - truth) / 2).pow(2).mean().item()
    assert generated.shape == truth.shape
    assert abs(mse - json.loads((run / "metrics.json").read_text())["heldout_mse"]) < 1e-6


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
    argv = [
        "--run",
        str(tmp_path / "tiny"),
        "--visible",
        str(tmp_path / "visible0.png"),
        "--semantic-map",
        str(tmp_path / "semantic0.png"),
        "--steps",
        "2",
        "--output-dir",
        str(tmp_path / "ir"),
    ]
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

    # --trace and --params: one line per stage, in the walk-through's notation; a parameter table
    assert sample.main(["--runs", str(tmp_path), "--num", "1", "--steps", "1", "--trace", "--params"]) == 0
    out = capsys.readouterr().out
    assert "prepare_vis2ir" in out and re.search(
        r"^\s+fill_condition\s+.*image \[1, 3, 64, 128\], mask \[1, 1, 64, 128\] "
        r"→ \[1, 32, 320\]$",
        out,
        re.M,
    )  # the diptych's Fill condition
    assert re.search(r"^\s+unpack\s+tokens \[1, 32, 64\] → \[1, 16, 8, 16\]$", out, re.M)  # inside generate
    assert "flux (Flux)" in out and "double_blocks (2 × DoubleStreamBlock)" in out and "\ntotal " in out


def test_sample_without_a_run_says_which_command_to_run_first(tmp_path):
    out = subprocess.run(
        [sys.executable, "sample.py", "--runs", str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "train one first with:  python train.py" in out.stderr
    assert not list(tmp_path.glob("**/*.png"))


# --- bad input: a clear message and exit 2 before any weights are loaded ----------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """The pipelines' loaders fail the test if called: every check below must come before them."""
    from minflux import pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was found")

    monkeypatch.setattr(pipeline.FluxPipeline, "from_files", loaded)
    monkeypatch.setattr(pipeline.Vis2IRPipeline, "from_run", loaded)


def bad_inputs(tmp):
    (tmp / "a_file").write_text("not a folder")
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (tmp / "folder.png").mkdir()
    return [
        (["--num-images", "0"], "--num-images 0: expected an integer ≥ 1"),
        (["--steps", "-3"], "--steps -3: expected an integer ≥ 1"),
        (["--steps", "0"], "--steps 0: expected an integer ≥ 1 (leave it out for the model's own number)"),
        (["--width", "100000"], "--width 100000: expected 16 to 4096 pixels (FLUX.1 was trained up to about 2 "
                                "megapixels; attention over the (W/16)·(H/16) image tokens costs their square)"),
        (["--height", "8"], "--height 8: expected 16 to 4096 pixels"),
        (["--true-cfg", "nan"], "--true-cfg nan: expected a finite number ≥ 1 (1 is off)"),
        (["--guidance", "inf"], "--guidance inf: expected a finite number ≥ 0"),
        (["--lora", "x:nan"], "--lora x:nan: the scale nan is not a finite number"),
        (["--lora", f"{tmp / 'style.safetensors'}:1e-3"], f"--lora {tmp / 'style.safetensors'}:1e-3: no such file "
                                                          f"{tmp / 'style.safetensors'}"),
        (["--image", str(tmp / "absent.png")], f"--image {tmp / 'absent.png'}: no such file"),
        (
            ["--output-dir", str(tmp / "a_file")],
            f"--output-dir {tmp / 'a_file'}: a file is in the way; expected a folder",
        ),
        (["--output-dir", str(tmp / "a_file" / "sub")], f"--output-dir {tmp / 'a_file' / 'sub'}: cannot write there"),
        (["--from", str(tmp / "empty.png")], f"{tmp / 'empty.png'}: cannot be read as a PNG"),
        (["--from", str(tmp / "corrupt.png")], f"{tmp / 'corrupt.png'}: cannot be read as a PNG"),
        (["--from", str(tmp / "folder.png")], f"{tmp / 'folder.png'}: cannot be read as a PNG"),
        (["--from", str(tmp / "absent.png")], f"{tmp / 'absent.png'}: no such file"),
    ]  # fmt: skip


def test_bad_sampling_input_is_refused_with_exit_2_before_loading(tmp_path, capsys, no_loading):
    for argv, message in bad_inputs(tmp_path):
        code = sample.main(
            ["--repo", str(tmp_path / "repo"), "--prompt", "a fox", "--output-dir", str(tmp_path / "out"), *argv]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_bad_output_of_a_run_is_refused_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "grid.png").mkdir()
    assert sample.main(["--run", str(tmp_path), "--output", str(tmp_path / "grid.png")]) == 2
    assert f"--output {tmp_path / 'grid.png'}: a folder is in the way" in capsys.readouterr().err
    assert sample.main(["--run", str(tmp_path), "--visible", "v.png", "--semantic-map", "s.png"]) == 2
    assert "--visible v.png: no such file" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_output_folder_is_refused_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert sample.main(["--repo", "r", "--prompt", "p", "--output-dir", str(tmp_path / "ro")]) == 2
    assert f"--output-dir {tmp_path / 'ro'}: cannot write there" in capsys.readouterr().err


def test_a_bad_input_exits_2_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "sample.py", "--repo", "r", "--prompt", "p", "--steps", "-3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--steps -3: expected an integer ≥ 1" in out.stderr and "Traceback" not in out.stderr


def test_lora_scales_are_read_in_any_float_notation():
    assert sample.lora_and_scale("x:1e-3") == (Path("x"), 1e-3)
    assert sample.lora_and_scale("style.safetensors:-0.5") == (Path("style.safetensors"), -0.5)
    assert sample.lora_and_scale("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert sample.lora_and_scale("loras/v1:final.safetensors") == (Path("loras/v1:final.safetensors"), 1.0)


def test_image_names_are_taken_exclusively(tmp_path, monkeypatch):
    import threading

    (tmp_path / "img_0000.png").write_bytes(b"an earlier image")
    monkeypatch.setattr(sample, "next_index", lambda folder: 0)  # as if another process took 0 after the look
    written = sample.write_images([Image.new("RGB", (8, 8))] * 2, tmp_path)
    assert [p.name for p in written] == ["img_0001.png", "img_0002.png"]
    assert (tmp_path / "img_0000.png").read_bytes() == b"an earlier image"  # never replaced

    taken = []
    threads = [
        threading.Thread(target=lambda: taken.extend(sample.write_images([Image.new("RGB", (8, 8))] * 3, tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(taken)) == 12 and len(list(tmp_path.glob("img_*.png"))) == 15
