"""sample.py against a hostile user: every bad flag, file or tampered PNG refused with a message naming it and exit 2,
before any weights are loaded; the held-out grid never replaces an earlier one unless named with --output."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

import sample
import train
from tests.test_sample import no_loading  # noqa: F401  (the fixture: the loaders fail the test if called)
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def png_with(path: Path, **chunks: str) -> Path:
    """A real PNG holding the given text chunks."""
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def refused(argv, capsys) -> str:
    """sample.main's stderr, after checking it exited 2 with a message (an exception would fail the test)."""
    code = sample.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sample.py: "), (argv, code, err)
    return err


# --- the held-out grid: a new name beside earlier ones, --output-dir honoured, --output only there ----------------


def test_save_new_takes_the_next_free_name_and_never_replaces_a_file(tmp_path):
    first = sample.save_new(Image.new("RGB", (8, 8), "red"), tmp_path / "sample-0.png", {"seed": "0"})
    before = first.read_bytes()
    names = [sample.save_new(Image.new("RGB", (8, 8), "blue"), tmp_path / "sample-0.png", {}).name for _ in range(2)]
    assert first == tmp_path / "sample-0.png" and names == ["sample-0-2.png", "sample-0-3.png"]
    assert first.read_bytes() == before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    assert train.main([*TINY, "--out", str(runs), "--steps", "2", "--name", "tiny"]) == 0
    return runs / "tiny"


@pytest.mark.slow
def test_a_second_held_out_grid_keeps_the_first_and_output_replaces_what_it_names(tiny_run, tmp_path, capsys):
    argv = ["--run", str(tiny_run), "--num", "1", "--steps", "1", "--seed", "3"]
    assert sample.main(argv) == 0
    first = Path(capsys.readouterr().out.strip().splitlines()[-1])
    before = first.read_bytes()
    assert sample.main(argv) == 0
    second = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first, second) == (tiny_run / "sample-3.png", tiny_run / "sample-3-2.png")
    assert first.read_bytes() == before and second.is_file()

    named = tmp_path / "grid.png"
    named.write_bytes(b"an earlier file the user names again")
    assert sample.main([*argv, "--output", str(named)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(named)
    assert Image.open(named).text["seed"] == "3"  # replaced, as asked


@pytest.mark.slow
def test_held_out_grid_goes_to_output_dir_when_given(tiny_run, tmp_path, capsys):
    argv = ["--run", str(tiny_run), "--num", "1", "--steps", "1", "--seed", "4", "--output-dir", str(tmp_path / "x")]
    for name in ("sample-4.png", "sample-4-2.png"):
        assert sample.main(argv) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "x" / name)
    assert not list(tiny_run.glob("sample-4*.png"))


@pytest.mark.usefixtures("no_loading")
def test_output_dir_of_the_held_out_grid_is_checked_before_loading(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    err = refused(["--run", str(tmp_path), "--output-dir", str(tmp_path / "a_file")], capsys)
    assert f"--output-dir {tmp_path / 'a_file'}: a file is in the way; expected a folder" in err


@pytest.mark.usefixtures("no_loading")
def test_output_is_refused_with_output_dir_and_outside_the_held_out_grid(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    err = refused(["--run", str(tmp_path), "--output", str(grid), "--output-dir", str(tmp_path / "x")], capsys)
    assert f"--output {grid} and --output-dir {tmp_path / 'x'}: both say where the held-out grid goes" in err
    err = refused(["--repo", str(tmp_path), "--prompt", "p", "--output", str(grid)], capsys)
    assert f"--output {grid}: names the held-out grid only" in err and "--output-dir" in err
    for name in ("v.png", "s.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    err = refused(
        [
            "--run",
            str(tmp_path),
            "--visible",
            str(tmp_path / "v.png"),
            "--semantic-map",
            str(tmp_path / "s.png"),
            "--output",
            str(grid),
        ],
        capsys,
    )
    assert f"--output {grid}: names the held-out grid only" in err
    assert not grid.exists() and not (tmp_path / "x").exists() and not (tmp_path / "outputs").exists()


# --- numbers and devices ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_loading")
def test_steps_beyond_10000_are_refused_from_the_flag_and_from_a_png(tmp_path, capsys):
    err = refused(["--repo", str(tmp_path), "--prompt", "p", "--steps", "1000000000000"], capsys)
    assert "--steps 1000000000000: expected at most 10,000 (the official models use 4 to 50" in err
    png = png_with(tmp_path / "a.png", minflux='{"prompt": "p", "steps": 1000000000000}')
    err = refused(["--repo", str(tmp_path), "--from", str(png), "--output-dir", str(tmp_path / "out")], capsys)
    assert "--steps 1000000000000: expected at most 10,000" in err and not (tmp_path / "out").exists()
    assert sample.check_args(sample.parse_args(["--steps", "10000"])) is None


@pytest.mark.usefixtures("no_loading")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build of torch, or a machine without a GPU")
def test_devices_this_torch_cannot_use_are_refused(tmp_path, capsys):
    for device in ("cuda:99", "cuda"):
        err = refused(["--repo", str(tmp_path), "--prompt", "p", "--device", device], capsys)
        assert f"--device {device}: no CUDA device is available" in err
    err = refused(["--repo", str(tmp_path), "--prompt", "p", "--device", "banana"], capsys)
    assert "--device banana: expected auto, cpu, cuda, cuda:N or mps" in err
    # a PNG made on a GPU: a note, and the default device
    args = sample.parse_args(["--from", str(png_with(tmp_path / "a.png", minflux='{"device": "cuda:7"}'))])
    sample.apply_settings(args)
    assert args.device is None and "was made on cuda:7 (no CUDA device is available" in capsys.readouterr().out


def test_a_cuda_device_beyond_the_count_is_refused_naming_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sample.device_problem("cuda:2") == "this machine has 2 CUDA devices: cuda:0 to cuda:1"
    assert sample.device_problem("cuda:1") is None and sample.device_problem("cuda") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sample.device_problem("cuda:1") == "this machine has 1 CUDA device: cuda:0"


# --- tampered settings in a --from PNG -------------------------------------------------------------------------------


TAMPERED = [  # (the "minflux" chunk, what the message must name)
    ("[1, 2]", '"minflux" text chunk holds [1, 2]; expected a JSON object'),
    ("null", '"minflux" text chunk holds null; expected a JSON object'),
    ('"text"', '"minflux" text chunk holds "text"; expected a JSON object'),
    ('{"prompt": "p", ', '"minflux" text chunk is not valid JSON'),
    ('{"weights": ["flux1.safetensors"]}', '"weights": ["flux1.safetensors"]; expected an object of part → path'),
    ('{"weights": {"flux": 5}}', '"weights": {"flux": 5}; expected an object of part → path'),
    ('{"weights": {"prompt": "x"}}', '"weights": {"prompt": "x"}; expected an object of part → path'),
    ('{"mask": {"path": 5}}', '"mask": {"path": 5}; expected an object with the file\'s "path" (a string)'),
    ('{"image": "photo.png"}', '"image": "photo.png"; expected an object'),
    ('{"image": {"path": "photo.png", "sha256": 7}}', '"image": {"path": "photo.png", "sha256": 7}; expected'),
    ('{"seed": "abc"}', '"seed": "abc"; expected an integer'),
    ('{"seed": true}', '"seed": true; expected an integer'),
    ('{"steps": 2.5}', '"steps": 2.5; expected an integer'),
    ('{"width": "64"}', '"width": "64"; expected an integer'),
    ('{"guidance": "high"}', '"guidance": "high"; expected a number'),
    ('{"true_cfg_scale": [2]}', '"true_cfg_scale": [2]; expected a number'),
    ('{"prompt": 5}', '"prompt": 5; expected a string'),
    ('{"variant": {"a": 1}}', '"variant": {"a": 1}; expected a string'),
    ('{"dtype": "fp64"}', '"dtype": "fp64"; expected one of bf16, fp16, fp32'),
    ('{"device": 0}', '"device": 0; expected a string'),
    ('{"loras": [{"path": "a.safetensors", "scale": "big"}]}', '"loras"[0]: {"path": "a.safetensors", "scale": "big"}'),
    ('{"loras": {"path": "a.safetensors"}}', '"loras": {"path": "a.safetensors"}; expected a list of LoRAs'),
    ('{"loras": [{"scale": 1}]}', '"loras"[0]: {"scale": 1}; expected an object with the file\'s "path"'),
]  # fmt: skip


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("chunk, expected", TAMPERED, ids=[c for c, _ in TAMPERED])
def test_a_tampered_settings_chunk_is_refused_naming_the_png_and_the_field(tmp_path, capsys, chunk, expected):
    png = png_with(tmp_path / "made.png", minflux=chunk)
    err = refused(["--from", str(png), "--runs", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out")], capsys)
    assert f"sample.py: {png}: " in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_tampered_settings_chunk_exits_2_from_the_command_line_without_a_traceback(tmp_path):
    png = png_with(tmp_path / "made.png", minflux='{"seed": "abc"}')
    out = subprocess.run(
        [sys.executable, "sample.py", "--from", str(png), "--runs", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and f'{png}: its "minflux" text chunk holds "seed": "abc"' in out.stderr
    assert "Traceback" not in out.stderr


def test_settings_of_an_earlier_minflux_one_chunk_each_still_apply(tmp_path, capsys):
    png = png_with(
        tmp_path / "old.png",
        software="minflux",
        prompt="p",
        seed="4",
        steps="3",
        guidance="none",
        width="48",
        loras="a.safetensors:0.5, b:1",
    )
    args = sample.parse_args(["--from", str(png)])
    sample.apply_settings(args)
    assert (args.prompt, args.seed, args.steps, args.guidance, args.width) == ("p", 4, 3, None, 48)
    assert args.lora == ["a.safetensors:0.5", "b:1"]
    bad = png_with(tmp_path / "bad.png", software="minflux", seed="abc")
    with pytest.raises(sample.DataError, match=r'its text chunks hold "seed": "abc"; expected an integer'):
        sample.apply_settings(sample.parse_args(["--from", str(bad)]))
    bad = png_with(tmp_path / "bad.png", software="minflux", loras="a.safetensors:big")
    with pytest.raises(sample.DataError, match=r'its "loras" text chunk is "a.safetensors:big"; expected PATH:SCALE'):
        sample.apply_settings(sample.parse_args(["--from", str(bad)]))


# --- files that are not what their flag needs: found before loading ------------------------------------------------


@pytest.mark.usefixtures("no_loading")
def test_a_lora_that_is_not_safetensors_or_is_truncated_is_refused_before_loading(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    save_file({"a.lora_down.weight": torch.zeros(4, 64)}, tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-16])
    (tmp_path / "tiny.safetensors").write_bytes(b"\x10\x00")
    for name in ("photo.jpg", "cut.safetensors", "tiny.safetensors"):
        lora = tmp_path / name
        err = refused(["--repo", str(tmp_path / "absent"), "--prompt", "p", "--lora", f"{lora}:0.5"], capsys)
        assert f"--lora {lora}:0.5: not a readable .safetensors file (truncated or another format?)" in err, err


@pytest.mark.usefixtures("no_loading")
def test_an_image_flag_given_a_non_image_is_refused_before_loading(tmp_path, capsys):
    good, text = tmp_path / "good.png", tmp_path / "notes.png"
    Image.new("RGB", (16, 16)).save(good)
    text.write_text("not an image")
    official = ["--repo", str(tmp_path / "absent"), "--prompt", "p"]
    for argv, flag in [
        ([*official, "--image", str(text)], "--image"),
        ([*official, "--image", str(good), "--mask", str(text)], "--mask"),
        (["--run", str(tmp_path), "--visible", str(text), "--semantic-map", str(good)], "--visible"),
        (["--run", str(tmp_path), "--visible", str(good), "--semantic-map", str(text)], "--semantic-map"),
    ]:
        err = refused(argv, capsys)
        assert f"{flag} {text}: cannot be read as an image" in err, err
