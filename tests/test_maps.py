"""Attention maps (minflux/maps.py): what is recorded is the right block of the right attention, the fused path
is left alone, and the pictures are drawn from a finished run."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import minflux
from minflux import attention, hooks, sampling
from minflux.study.maps import MapRecorder, main, run_maps, text_map_grid

REPO = Path(__file__).resolve().parent.parent


def small_flux(seed=0):
    torch.manual_seed(seed)
    params = minflux.configs["flux-small"].params
    model = minflux.Flux(params).eval()
    B, h, w, T = 2, 2, 3, 5
    inputs = dict(
        img=torch.randn(B, h * w, 64),
        img_ids=sampling.prepare_img_ids(B, h, w),
        txt=torch.randn(B, T, params.context_in_dim),
        txt_ids=sampling.prepare_txt_ids(B, T),
        timesteps=torch.rand(B),
        y=torch.randn(B, params.vec_in_dim),
    )
    return model, inputs, (B, h, w, T)


def test_text_maps_are_the_image_to_text_block_of_joint_attention():
    """The recorder's maps equal probs[:, :, T:, :T] averaged over heads, over the chosen blocks and steps,
    computed here from every map AttentionMaps returns."""
    model, inputs, (B, h, w, T) = small_flux()
    n_blocks = len(model.double_blocks) + len(model.single_blocks)
    with torch.no_grad(), attention.AttentionMaps() as raw:
        model(**inputs)
        model(**inputs)
    assert len(raw.probs) == 2 * n_blocks
    for blocks, steps in [(None, None), ([0, n_blocks - 1], [1])]:
        with torch.no_grad(), MapRecorder(model, blocks=blocks, steps=steps) as rec:
            model(**inputs)
            model(**inputs)
        chosen = [raw.probs[s * n_blocks + b] for s in (steps or [0, 1]) for b in (blocks or range(n_blocks))]
        expected = torch.stack([p[:, :, T:, :T].mean(1) for p in chosen]).mean(0)  # [B, h·w, T]
        got = rec.text_maps()
        assert got.shape == (B, T, h, w)
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected)
    assert (got.sum(1) < 1).all() and (got > 0).all()  # a share of each image token's attention goes to text


def test_recording_leaves_the_fused_path_and_the_model_untouched():
    model, inputs, _ = small_flux()
    with torch.no_grad():
        before = model(**inputs)
        with MapRecorder(model) as rec:
            assert hooks.current() is rec and rec.wants_attention  # the explicit path runs, and reports to it
            model(**inputs)
        after = model(**inputs)
    assert hooks.current() is None and attention._BACKEND == "auto"
    assert not model._forward_pre_hooks
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in [*model.double_blocks, *model.single_blocks])
    assert torch.equal(before, after)
    assert rec.probs == [] and rec._text_calls == len(model.double_blocks) + len(model.single_blocks)  # sums only


def test_text_map_grid_has_one_captioned_cell_per_token():
    image = torch.zeros(3, 32, 64)
    maps = torch.rand(4, 2, 4)
    grid = text_map_grid(image, maps, ["_a", "_tree", "</s>"], cols=2, scale=2)
    cell_w, cell_h = 64 * 2, 32 * 2
    assert grid.size == (2 * (cell_w + 4) + 4, math.ceil(4 / 2) * (cell_h + 14 + 4) + 4)  # image + 3 tokens


@pytest.fixture(scope="module")
def xattn_run(tmp_path_factory):
    """A tiny `python train.py --semantic xattn_rope` run (seconds): its model is barely trained, which is all
    the map code needs."""
    out = tmp_path_factory.mktemp("runs")
    flags = "--semantic xattn_rope --steps 2 --vae-steps 2 --train-samples 16 --heldout-samples 2 --sample-steps 1 "
    flags += "--batch-size 2"
    cmd = [sys.executable, str(REPO / "train.py"), *flags.split(), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_semantic_maps_are_distributions_over_the_semantic_tokens(xattn_run):
    out = run_maps(xattn_run, [0, 1], steps=2)
    maps = out["recorder"].semantic_maps()
    assert list(maps) == ["adapter.layers.0"]
    probs = maps["adapter.layers.0"]
    assert probs.shape == (2, 32, 16)  # 64-px panels: a 4 × 8 diptych of queries, a 4 × 4 semantic map of keys
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 32))
    assert out["tokens"][0][-1] == "</s>" and len(out["tokens"][0]) > 5


def test_maps_commands_write_the_pictures(xattn_run, tmp_path, capsys):
    assert main(["text", "--run", str(xattn_run), "--steps", "2", "--output", str(tmp_path / "text.png")]) == 0
    assert main(["semantic", "--run", str(xattn_run), "--steps", "2", "--output", str(tmp_path / "sem.png")]) == 0
    printed = capsys.readouterr().out
    assert "queries 16 of the target panel" in printed
    text, sem = Image.open(tmp_path / "text.png"), Image.open(tmp_path / "sem.png")
    assert text.width > text.height  # rows of six diptych cells
    assert sem.size == (4 * (64 * 3 + 4) + 4, 4 * (64 * 3 + 14 + 4) + 4)  # 16 queries in a 4 × 4 grid
