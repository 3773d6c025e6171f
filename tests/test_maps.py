"""Attention maps (minflux/maps.py): what is recorded is the right block of the right attention, the fused path
is left alone, and the pictures are drawn from a finished run."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import minflux
from minflux import attention, hooks, sampling
from minflux.study.maps import (
    MapRecorder,
    main,
    run_maps,
    save_map,
    semantic_map_grid,
    text_legend,
    text_map_grid,
    text_shares,
)

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


def test_text_share_is_the_image_tokens_attention_on_the_text_keys_of_all_keys():
    """The legend's split: of each image token's attention, the part on the T text keys (the rest is on image
    keys), from every map AttentionMaps returns; the numbers drawn average 1.00 over the T text tokens."""
    model, inputs, (B, h, w, T) = small_flux()
    with torch.no_grad(), attention.AttentionMaps() as raw:
        model(**inputs)
    with torch.no_grad(), MapRecorder(model) as rec:
        model(**inputs)
    rows = [p[:, :, T:] for p in raw.probs]  # [B, H, L, T + L] per block
    expected = torch.stack([(r[..., :T].sum(-1) / r.sum(-1)).mean(1) for r in rows]).mean(0).mean(1)  # [B]
    torch.testing.assert_close(rec.text_share(), expected)
    assert ((0.05 < expected) & (expected < 0.95)).all()  # a real part goes each way
    maps = rec.text_maps()[0]  # [T, h, w]
    torch.testing.assert_close(text_shares(maps).mean(), torch.tensor(1.0))  # 1.00 = an even share of the text part
    legend = "\n".join(text_legend(maps, 3, rec.text_share()[0].item()))
    assert f"{expected[0]:.0%} to the {T} text tokens, {1 - expected[0]:.0%} to image tokens" in legend
    assert f"{T - 3} padding token(s) not shown" in legend and "1.00 = an even share" in legend


def test_semantic_panel_is_drawn_in_its_class_colours():
    """The panel under the semantic heatmaps keeps its colours: a blue class stays blue under an even heatmap."""
    semantic = torch.full((3, 8, 8), -1.0)
    semantic[0, :, :4] = 1  # left half red
    semantic[2, :, 4:] = 1  # right half blue
    grid = semantic_map_grid(semantic, torch.ones(1, 4), [(0, 0)], (2, 2), cols=1, scale=4)
    r, g, b = grid.getpixel((4 + 24, 4 + 14 + 16))  # inside the blue half of the one cell
    assert b > r and b > g, (r, g, b)
    r, g, b = grid.getpixel((4 + 8, 4 + 14 + 16))  # inside the red half
    assert r > b, (r, g, b)


def test_text_map_grid_has_one_captioned_cell_per_token():
    image = torch.zeros(3, 32, 64)
    maps = torch.rand(4, 2, 4)
    grid = text_map_grid(image, maps, ["_a", "_tree", "</s>"], cols=2, scale=2)
    cell_w, cell_h = 64 * 2, 32 * 2
    assert grid.size == (2 * (cell_w + 4) + 4, math.ceil(4 / 2) * (cell_h + 14 + 4) + 4)  # image + 3 tokens


def test_text_map_grid_draws_the_semantic_panel_beside_every_cell():
    image, semantic = torch.zeros(3, 32, 64), -torch.ones(3, 32, 32)
    semantic[0] = 1  # red: a class colour, drawn as it is (no heatmap over it)
    grid = text_map_grid(image, torch.rand(2, 2, 4), ["_a", "_tree"], cols=3, scale=2, beside=semantic)
    cell_w, cell_h = 64 * 2 + 2 + 32 * 2, 32 * 2
    assert grid.size == (3 * (cell_w + 4) + 4, cell_h + 14 + 4 + 4)
    for i in range(3):  # the image and each token's heatmap, the semantic panel right of each
        x = 4 + i * (cell_w + 4) + 64 * 2 + 2 + 10
        assert grid.getpixel((x, 4 + 14 + 10)) == (255, 0, 0)


@pytest.fixture(scope="module")
def kontext_run(tmp_path_factory):
    """A tiny `python train.py --task kontext` run on the generated scenes (seconds): the visible panel is a
    reference, so the text maps cover the generated panel alone."""
    out = tmp_path_factory.mktemp("kontext")
    flags = "--task kontext --steps 2 --vae-steps 2 --train-samples 16 --heldout-samples 2 --sample-steps 1 "
    flags += "--batch-size 2"
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *flags.split(), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_text_maps_of_a_kontext_run_cover_the_generated_panel(kontext_run, tmp_path, capsys):
    assert main(["text", "--run", str(kontext_run), "--steps", "2", "--output", str(tmp_path / "text.png")]) == 0
    printed = capsys.readouterr().out
    assert "maps [24, 4, 4]" in printed  # the generated panel's 4 × 4 tokens, not the diptych's 4 × 8
    assert "Kontext: the maps of the generated panel's tokens" in printed
    cell = 128 + 2 + 128 * 2  # the generated panel at scale 2, a white line, [visible | semantic map]
    assert Image.open(tmp_path / "text.png").width == 4 * (cell + 4) + 4


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
    assert "1.00 = an even share (1/24 of it)" in printed  # the legend, printed and drawn above the text maps
    assert re.search(r"\d+% to the 24 text tokens, \d+% to image tokens; \d+ padding token\(s\) not shown", printed)
    text, sem = Image.open(tmp_path / "text.png"), Image.open(tmp_path / "sem.png")
    cell = 128 * 2 + 2 + 128  # the diptych [visible | generated] at scale 2, a white line, the semantic panel
    assert text.width == 4 * (cell + 4) + 4  # rows of four cells
    assert sem.size == (4 * (64 * 3 + 4) + 4, 4 * (64 * 3 + 14 + 4) + 4)  # 16 queries in a 4 × 4 grid


def test_map_step_k_is_the_kth_euler_step_for_the_adapter_and_the_blocks(xattn_run):
    """--map-steps 0 is the first Euler step, --map-steps n-1 the last: the adapter's SemanticCrossAttention, which
    Vis2IR runs before its transformer, is counted in the step it runs in (not the one before)."""
    from minflux.pipeline import load_run
    from minflux.tasks.data import triptychs
    from minflux.tasks.vis2ir import datasets, generate_infrared, prepare_for_run

    parts = load_run(xattn_run)
    cfg, n = parts.run.config, 3
    _, held = datasets(cfg, heldout=1)
    trip = triptychs(held, [0])
    inp = prepare_for_run(cfg, parts.t5, parts.clip, parts.ae, trip, [held[0]["caption"]], 0, trip.dtype)
    with torch.no_grad(), attention.AttentionMaps() as raw:
        generate_infrared(parts.model, parts.ae, inp, n, cfg.guidance)
    semantic = [p.mean(1) for p in raw.probs if p.shape[-1] != p.shape[-2]]  # [B, Lq, Ls], one per step
    joint = [p for p in raw.probs if p.shape[-1] == p.shape[-2]]  # [B, H, T + L, T + L], n_blocks per step
    assert len(semantic) == n and len(joint) % n == 0
    n_blocks, T = len(joint) // n, len(inp.txt[0])
    for k in range(n):
        with torch.no_grad(), MapRecorder(parts.model, steps=[k]) as rec:
            generate_infrared(parts.model, parts.ae, inp, n, cfg.guidance)
        torch.testing.assert_close(rec.semantic_maps()["adapter.layers.0"], semantic[k])
        expected = torch.stack([p[:, :, T:, :T].mean(1) for p in joint[k * n_blocks : (k + 1) * n_blocks]]).mean(0)
        torch.testing.assert_close(rec.text_maps().flatten(2).transpose(1, 2), expected)
        assert rec.recorded_steps == {k}


def test_a_selection_that_records_nothing_says_which_steps_and_blocks_exist(xattn_run, tmp_path, capsys):
    run, out = str(xattn_run), str(tmp_path / "sem.png")
    assert main(["semantic", "--run", run, "--steps", "3", "--map-steps", "2", "--output", out]) == 0  # the last step
    capsys.readouterr()
    assert main(["semantic", "--run", run, "--steps", "3", "--map-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert (
        "--map-steps 3: the run made 3 model call(s), steps 0-2" in err and "has no SemanticCrossAttention" not in err
    )
    assert main(["text", "--run", run, "--steps", "1", "--blocks", "90-99"]) == 2
    assert "--blocks 90-99: the model has blocks 0-5 (0-1 double, 2-5 single)" in capsys.readouterr().err
    plain, _, _ = small_flux()
    with MapRecorder(plain) as rec:
        pass
    assert rec.layers == [] and rec.semantic_maps() == {}  # the model has none: main's "has no" message


def test_maps_never_replace_an_earlier_picture_unless_named_by_output(xattn_run, tmp_path, capsys):
    first = Path(xattn_run) / "maps-text-1.png"  # the default name, taken by an earlier picture
    Image.new("RGB", (4, 4), "red").save(first)
    assert main(["text", "--run", str(xattn_run), "--scene", "1", "--steps", "1"]) == 0
    written = Path(capsys.readouterr().out.splitlines()[-1])
    assert written == first.with_name("maps-text-1-2.png") and Image.open(written).width > 100
    assert Image.open(first).size == (4, 4)  # the earlier one is still there
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    assert save_map(red, tmp_path / "m.png", new=True) == tmp_path / "m.png"
    assert save_map(blue, tmp_path / "m.png", new=True) == tmp_path / "m-2.png"
    assert save_map(blue, tmp_path / "m-3.png", new=False) == tmp_path / "m-3.png"
    assert save_map(red, tmp_path / "m-3.png", new=False) == tmp_path / "m-3.png"  # --output: replaced
    assert Image.open(tmp_path / "m.png").getpixel((0, 0)) == (255, 0, 0)  # the first never replaced
    assert Image.open(tmp_path / "m-3.png").getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-2.png", "m-3.png", "m.png"]
