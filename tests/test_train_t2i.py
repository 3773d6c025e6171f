"""train.py --task t2i: a LoRA on a dev-like and a schnell-like transformer from an image + caption folder.

No downloads: tiny random "official" weights are written here in the official layouts (save_flux, the VAE's
ae.safetensors, CLIP/T5 folders with tokenizers), and train.py reads them as it reads FLUX.1-dev.
"""

import contextlib
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from minflux.tasks.runs import CASES
from minflux.files.images import DataError
from minflux.tasks.data import CaptionFolder, bucket_sizes
from minflux.sampling import prepare_img_ids, prepare_txt_ids
from minflux.files.load import load_flux, save_flux
from minflux.files.lora_files import load_lora
from minflux.model import Flux
from minflux.presets import AE_SMALL, FLUX_SMALL
from minflux.files.weights import read_state_dict
from tests.flux_helpers import random_image, resume_matches_straight, save_frozen_parts
from tests.other_tools import comfyui_apply, comfyui_key_map, comfyui_load_lora

# dev-like: a guidance embedding; widths match the small CLIP/T5 (64). Tiny, so a step takes milliseconds.
TINY_DEV = replace(
    FLUX_SMALL, hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], depth=1, depth_single_blocks=1, guidance_embed=True
)
TINY_SCHNELL = replace(TINY_DEV, guidance_embed=False)
CAPTIONS = ["a red square on white", "a blue circle on black", "a green stripe", "a yellow dot"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{dev, schnell, ae, clip, t5}: paths of tiny weights in the official layouts."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {}
    for name, params in (("dev", TINY_DEV), ("schnell", TINY_SCHNELL)):
        paths[name] = save_flux(Flux(params), root / f"flux1-{name}-tiny.safetensors")
    return {**paths, **save_frozen_parts(root, CAPTIONS, AE_SMALL)}


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, caption in enumerate(CAPTIONS):
        random_image(i).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption + "\n")
    return data


def run_t2i(tmp_path, weights, data, *args, model="dev") -> int:
    return train.main([
        "--task", "t2i", "--data", str(data), "--flux", str(weights[model]), "--ae", str(weights["ae"]),
        "--clip", str(weights["clip"]), "--t5", str(weights["t5"]), "--out", str(tmp_path / "runs"),
        "--resolution", "32", "--batch-size", "2", "--lora-rank", "4", "--lr", "1e-2", "--t5-max-length", "8",
        "--sample-steps", "2", "--gradient-checkpointing", "false", *args,
    ])  # fmt: skip


def _output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(1, 4, 64, generator=g), torch.randn(1, 8, 64, generator=g)  # a 32-px image, 8 T5 tokens
    y = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return model(
            img, prepare_img_ids(1, 2, 2), txt, prepare_txt_ids(1, 8), torch.tensor([0.5]), y, torch.tensor([1.0])
        )


def test_dev_lora_trains_saves_and_changes_the_model(tmp_path, weights, folder, capsys):
    assert run_t2i(tmp_path, weights, folder, "--steps", "4", "--name", "dev", "--caption-dropout", "0.5") == 0
    run = tmp_path / "runs" / "dev"
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(run)  # the last line is the run folder
    assert "data: 4 images, 4 distinct captions; sizes 32×32 (4)" in out and "memory estimate" in out
    for name in ("lora.safetensors", "config.toml", "metrics.json", "log.jsonl", "loss.png", "samples.png"):
        assert (run / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["task"] == "t2i" and metrics["images"] == 4
    assert 'task = "t2i"' in (run / "config.toml").read_text()

    base = load_flux(weights["dev"])
    before = _output(base)
    layers = load_lora(base, run / "lora.safetensors")
    assert len(layers) == 13  # kohya's default: every linear layer of the double (10) and single (3) block
    after = _output(base)
    assert after.shape == before.shape and (after - before).abs().max() > 1e-4  # the LoRA was trained

    # the default format is kohya's, which ComfyUI reads key for key, to the same weights
    lora = read_state_dict(run / "lora.safetensors")
    assert metrics["lora_format"] == "kohya" and all(k.startswith("lora_unet_") for k in lora)
    plain = load_flux(weights["dev"])
    patches, not_loaded = comfyui_load_lora(lora, comfyui_key_map(plain.state_dict()))
    assert not_loaded == [] and len(patches) == 13
    plain.load_state_dict(comfyui_apply(plain.state_dict(), patches))
    assert (_output(plain) - after).abs().max() <= 1e-5 * after.abs().max()


def test_resume_continues_exactly(tmp_path, weights, folder):
    common = ["--steps", "4", "--caption-dropout", "0.5"]
    assert run_t2i(tmp_path, weights, folder, *common, "--name", "straight") == 0
    assert run_t2i(tmp_path, weights, folder, *common, "--stop-at", "2", "--name", "halves") == 0
    resume_matches_straight(tmp_path / "runs")


def test_schnell_with_buckets_in_kohya_format(tmp_path, weights, folder, capsys):
    random_image(9, size=(80, 40)).save(folder / "wide.png")  # 2:1: at resolution 32 the nearest bucket is 48 × 32
    (folder / "wide.txt").write_text("a wide picture")
    code = run_t2i(
        tmp_path,
        weights,
        folder,
        "--steps",
        "3",
        "--name",
        "schnell",
        "--buckets",
        "true",
        "--lora-format",
        "kohya",
        "--t5-max-length",
        "16",
        model="schnell",
    )
    assert code == 0
    run = tmp_path / "runs" / "schnell"
    out = capsys.readouterr().out
    assert "sizes 32×32 (4), 48×32 (1)" in out  # two sizes: batches are drawn from one at a time
    assert "t5_max_length = 16" in (run / "config.toml").read_text()  # the flag, not schnell's 256
    lora = read_state_dict(run / "lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in lora)
    base = load_flux(weights["schnell"])
    assert base.params.guidance_embed is False
    before = _output(base)
    load_lora(base, run / "lora.safetensors")
    assert (_output(base) - before).abs().max() > 1e-4


def test_bf16_autocast_path_trains_fp32_lora_weights(tmp_path, weights, folder):
    """The CUDA recipe (bf16 base, fp32 LoRA, autocast), run on the CPU."""
    assert (
        run_t2i(tmp_path, weights, folder, "--steps", "2", "--name", "bf16", "--dtype", "bf16", "--sample-steps", "0")
        == 0
    )
    lora = read_state_dict(tmp_path / "runs" / "bf16" / "lora.safetensors")
    assert all(v.dtype == torch.float32 for k, v in lora.items()), {v.dtype for v in lora.values()}


def test_missing_caption_is_an_error_naming_the_file_or_gets_the_default(tmp_path, weights, folder):
    random_image(7).save(folder / "nocaption.png")
    with pytest.raises(DataError, match=r"nocaption\.png: no caption file nocaption\.txt .*--default-caption"):
        run_t2i(tmp_path, weights, folder, "--steps", "1")
    data = CaptionFolder(folder, resolution=32, default_caption="a photo")
    assert data.captions() == [*CAPTIONS, "a photo"] and data.n_default_captions == 1


def test_unreadable_image_is_skipped_and_counted_or_stops(tmp_path, weights, folder, capsys):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken.txt").write_text("whatever")
    assert run_t2i(tmp_path, weights, folder, "--steps", "1", "--name", "skip", "--sample-steps", "0") == 0
    out = capsys.readouterr().out
    assert "skipped 1 unusable file(s)" in out and "broken.png: cannot be read as an image" in out
    with pytest.raises(DataError, match=r"broken\.png: cannot be read as an image"):
        run_t2i(tmp_path, weights, folder, "--steps", "1", "--on-error", "stop")


def test_images_are_cropped_to_the_resolution_or_their_bucket(tmp_path):
    random_image(0, size=(100, 60)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a caption \n")
    square = CaptionFolder(tmp_path, resolution=48)[0]
    assert square["image"].shape == (3, 48, 48) and square["caption"] == "a caption"
    assert -1 <= square["image"].min() and square["image"].max() <= 1
    bucketed = CaptionFolder(tmp_path, resolution=48, buckets=True)
    assert bucketed.sizes[0] == (64, 32) and bucketed[0]["image"].shape == (3, 32, 64)  # 5:3 → 2:1 (64 × 32)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in bucket_sizes(1024))


def test_t2i_needs_weights_and_a_folder_and_a_resolution_of_16s(tmp_path, capsys):
    x = tmp_path / "x"
    x.touch()
    for argv, message in (
        (["--task", "t2i", "--data", str(tmp_path)], "trains a LoRA on official weights"),
        (["--task", "t2i", "--flux", str(x), "--ae", str(x), "--clip", str(x), "--t5", str(x)], "needs --data FOLDER"),
        (["--task", "t2i", "--data", str(tmp_path), "--flux", str(x), "--resolution", "500"], "multiple of 16"),
        (["--task", "paint"], "expected one of vis2ir, t2i"),
    ):
        with pytest.raises(SystemExit) as e:
            train.parse(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_t2i_defaults_apply_unless_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the paths below name files that exist
    for name in ("d", "f", "a", "c", "t"):
        Path(name).touch()
    cfg = train.parse(
        [
            "--task",
            "t2i",
            "--data",
            "d",
            "--flux",
            "f",
            "--ae",
            "a",
            "--clip",
            "c",
            "--t5",
            "t",
            "--t5-max-length",
            "77",
            "--lr",
            "3e-4",
        ]
    )
    assert (cfg.lr, cfg.batch_size, cfg.gradient_checkpointing, cfg.t5_max_length) == (3e-4, 4, True, 77)
    # `python train.py` (the embedded vis2ir default) runs with exactly TrainConfig's declared defaults
    assert train.parse([]) == train.TrainConfig() and (train.TrainConfig().lr, train.TrainConfig().steps) == (
        3e-3,
        1200,
    )
    assert train.parse(["--lr", "1e-4"]).lr == 1e-4 and train.parse(["--steps", "1300"]).steps == 1300
    on_weights = train.parse(["--flux", "f", "--ae", "a", "--clip", "c", "--t5", "t"])  # the table's other rows
    assert (on_weights.lr, on_weights.steps) == (1e-3, 1300) == tuple(CASES["vis2ir on given weights"].values())
    assert (train.parse(["--task", "kontext"]).lr, train.parse(["--task", "kontext"]).steps) == (1e-3, 1300)
    help_text = " ".join(train_help().split())  # --help shows each kind of run's default
    assert (
        "(default: 1200; vis2ir on given weights: 1300; kontext from scratch: 1300; FLUX.2 from scratch: 1300; t2i "
        "or kontext on given weights: 1000)" in help_text
    )


def test_t5_length_follows_the_variant_as_the_official_pipelines(weights):
    x = str(weights["dev"])  # any path that exists: only --flux is read here
    common = ["--task", "t2i", "--data", x, "--ae", x, "--clip", x, "--t5", x]
    assert train.parse([*common, "--flux", str(weights["dev"])]).t5_max_length == 512
    assert train.parse([*common, "--flux", str(weights["schnell"])]).t5_max_length == 256


def train_help() -> str:
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        train.parse(["--help"])
    return out.getvalue()
