"""The vis2ir data: the procedural triptychs, the information their semantic panel carries, the folder loaders
(triptychs, and the t2i and Kontext folders where they share a check)."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from minflux.files.images import DataError
from minflux.tasks.data import CaptionFolder, TriptychFolder
from minflux.tasks.pairs import KontextFolder
from minflux.tasks.scenes import (
    CLASSES,
    OBJECT_CLASSES,
    PALETTE,
    SEMANTIC_COLOURS,
    SyntheticTriptychs,
    make_scene,
    split_triptych,
)

N_STATS = 1500  # scenes per split for the statistical tests: about 1000 objects per class


def erode(mask: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)² neighbourhood lies inside the mask: beyond the reach of the infrared blur."""
    h, w = mask.shape
    p = np.pad(mask, r)
    out = mask.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= p[dy : dy + h, dx : dx + w]
    return out


def object_stats(split: str) -> list[dict]:
    """One row per object with at least 16 interior pixels: its class, recorded temperature and colour, the
    colour its visible pixels show, its infrared pixels in [-1, 1] (sum, sum of squares, count) and the
    classes of every object in its scene (what the caption tells)."""
    ds = SyntheticTriptychs(N_STATS, split=split)
    chroma = PALETTE / PALETTE.sum(1, keepdims=True)  # [12, 3], brightness removed: shading cannot move it
    rows = []
    for i in range(len(ds)):
        s = ds.scene(i)
        scene_classes = [o.cls for o in s.objects]
        for k, obj in enumerate(s.objects, start=1):
            inside = erode(s.instances == k)
            if inside.sum() < 16:
                continue
            ir = s.infrared[inside, 0] * 2 - 1  # [n] in the model's units
            rgb = s.visible[inside].mean(0)  # [3]
            seen = int(np.abs(chroma - rgb / rgb.sum()).sum(1).argmin())
            rows.append(
                dict(
                    cls=obj.cls,
                    temperature=obj.temperature,
                    colour=obj.colour,
                    seen_colour=seen,
                    rgb=rgb,
                    ir_mean=(ir.mean() + 1) / 2,
                    n=ir.size,
                    sx=ir.sum(),
                    sxx=(ir**2).sum(),
                    scene_classes=scene_classes,
                )
            )
    return rows


@pytest.fixture(scope="module")
def train_objects():
    return object_stats("train")


@pytest.fixture(scope="module")
def heldout_objects():
    return object_stats("heldout")


# --- the synthetic set -----------------------------------------------------------------------------------------


def test_same_index_gives_identical_sample_and_train_heldout_differ():
    a, b = SyntheticTriptychs(10), SyntheticTriptychs(10)
    for i in (0, 7, 3):  # any order
        x, y = a[i], b[i]
        assert torch.equal(x["triptych"], y["triptych"]) and torch.equal(x["classes"], y["classes"])
        assert x["caption"] == y["caption"]
    assert not torch.equal(a[0]["triptych"], a[1]["triptych"])
    heldout = SyntheticTriptychs(10, split="heldout")
    assert all(not torch.equal(a[i]["triptych"], heldout[i]["triptych"]) for i in range(10))
    assert not torch.equal(a[0]["triptych"], SyntheticTriptychs(10, seed=1)[0]["triptych"])


def test_sample_shapes_ranges_grey_infrared_and_exact_class_colours():
    for size in (64, 32):
        sample = SyntheticTriptychs(4, size=size)[2]
        x, classes = sample["triptych"], sample["classes"]
        assert x.shape == (3, size, 3 * size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert classes.shape == (size, size) and classes.dtype == torch.long
        assert 0 <= classes.min() and classes.max() < len(CLASSES)
        visible, infrared, semantic = split_triptych(x)  # [3, S, S] each
        assert torch.equal(infrared[0], infrared[1]) and torch.equal(infrared[0], infrared[2])  # grey
        colours = torch.from_numpy(SEMANTIC_COLOURS * 2 - 1)  # [6, 3]
        assert torch.allclose(semantic.permute(1, 2, 0), colours[classes])  # the panel is the class map
        assert visible.std() > 0.1  # not blank
    with pytest.raises(ValueError, match="multiple of 16"):
        SyntheticTriptychs(4, size=40)
    with pytest.raises(IndexError):
        SyntheticTriptychs(4)[4]


def test_split_triptych_cuts_batched_and_single_triptychs_into_three_views():
    x = torch.randn(2, 3, 16, 48)
    v, ir, sem = split_triptych(x)
    assert v.shape == ir.shape == sem.shape == (2, 3, 16, 16)
    assert torch.equal(torch.cat([v, ir, sem], dim=-1), x) and v.data_ptr() == x.data_ptr()
    assert [p.shape for p in split_triptych(x[0])] == [(3, 16, 16)] * 3
    with pytest.raises(ValueError, match="three times as wide"):
        split_triptych(torch.zeros(3, 16, 40))


def test_infrared_inside_each_object_is_its_class_temperature_up_to_the_noise(heldout_objects):
    jitter = 0.03  # the generator's per-object temperature spread
    for row in heldout_objects:
        assert abs(row["ir_mean"] - row["temperature"]) < 0.025  # its own temperature, noise averaged out
        assert abs(row["temperature"] - CLASSES[row["cls"]].temperature) < 5 * jitter  # near its class's
    for c in OBJECT_CLASSES:
        means = [r["ir_mean"] for r in heldout_objects if r["cls"] == c]
        assert len(means) > 500
        assert abs(np.mean(means) - CLASSES[c].temperature) < 0.005  # unbiased
        assert 0.5 * jitter < np.std(means) < 1.5 * jitter  # and mildly varied


def test_visible_colour_is_distributed_the_same_for_every_object_class(heldout_objects):
    seen = np.array([r["seen_colour"] for r in heldout_objects])
    assert (seen == np.array([r["colour"] for r in heldout_objects])).mean() > 0.99  # the pixels show the colour
    overall = np.bincount(seen, minlength=len(PALETTE)) / len(seen)  # [12]
    for c in OBJECT_CLASSES:
        of_class = seen[[r["cls"] == c for r in heldout_objects]]
        per_class = np.bincount(of_class, minlength=len(PALETTE)) / len(of_class)
        assert np.abs(per_class - overall).max() < 0.04  # ~1/12 each, within sampling noise (σ ≈ 0.009)
        mean_rgb = np.mean([r["rgb"] for r in heldout_objects if r["cls"] == c], axis=0)
        assert np.abs(mean_rgb - np.mean([r["rgb"] for r in heldout_objects], axis=0)).max() < 0.03


def pixel_mse(rows, predict) -> float:
    """MSE over all interior pixels when every pixel of an object is predicted as predict(row)."""
    err = sum(r["sxx"] - 2 * predict(r) * r["sx"] + r["n"] * predict(r) ** 2 for r in rows)
    return err / sum(r["n"] for r in rows)


def test_semantic_map_cuts_heldout_infrared_mse_over_30x_below_the_best_visible_only_predictor(
    train_objects, heldout_objects
):
    """Per-object predictors of the infrared, fitted on train, scored on held-out pixels ([-1, 1] units).

    Measured: visible-only 0.227 (constant) and 0.228 (by visible colour), caption-aware 0.149, semantic-aware
    0.0051: the semantic map cuts the error 44×.
    """

    def fit(key):  # mean infrared of the train pixels in each group
        groups = {}
        for r in train_objects:
            g = groups.setdefault(key(r), [0.0, 0])
            g[0], g[1] = g[0] + r["sx"], g[1] + r["n"]
        return {k: sx / n for k, (sx, n) in groups.items()}

    constant = fit(lambda r: 0)[0]
    by_colour = fit(lambda r: r["seen_colour"])
    by_class = fit(lambda r: r["cls"])

    blind = pixel_mse(heldout_objects, lambda r: constant)  # the best a visible-only model can do
    blind_colour = pixel_mse(heldout_objects, lambda r: by_colour[r["seen_colour"]])
    caption = pixel_mse(heldout_objects, lambda r: np.mean([by_class[c] for c in r["scene_classes"]]))
    semantic = pixel_mse(heldout_objects, lambda r: by_class[r["cls"]])

    assert abs(blind_colour - blind) < 0.05 * blind  # the visible colour says nothing about the temperature
    assert caption < 0.8 * blind  # the caption's class counts help a little...
    assert semantic < caption / 10  # ...the semantic map almost everything
    assert blind > 30 * semantic  # the gap: measured 44×
    assert semantic < 0.01  # what is left: ±0.03 per-object jitter and sensor noise, ×2 for [-1, 1]


def test_captions_name_each_object_class_in_the_class_map_with_its_count():
    ds = SyntheticTriptychs(200)
    for i in range(len(ds)):
        s = ds.scene(i)
        assert s.caption.endswith("on the ground under the sky, infrared view")
        for c in OBJECT_CLASSES:  # count the objects of class c in the pixel maps, not in the object list
            n = len(np.unique(s.instances[(s.classes == c) & (s.instances > 0)]))
            name = CLASSES[c]
            mentioned = re.search(rf"\b({name.name}|{name.plural})\b", s.caption)
            if n == 0:
                assert not mentioned, s.caption
            else:
                word = ["a", "two", "three", "four"][n - 1]
                assert f"{word} {name.name if n == 1 else name.plural}" in s.caption, s.caption
    assert len(set(ds.captions())) > 20  # varied enough to be a prompt


def test_make_scene_is_numpy_in_0_1_for_any_size():
    s = make_scene(np.random.default_rng(0), 100)
    assert s.visible.shape == s.infrared.shape == s.semantic.shape == (100, 100, 3)
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in (s.visible, s.infrared, s.semantic))
    assert s.instances.max() == len(s.objects) >= 1


# --- folders of real data -------------------------------------------------------------------------------------


def to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → an RGB image."""
    return Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))


def write_triptychs(root, n=3, size=32):
    ds = SyntheticTriptychs(n, size=size)
    for i in range(n):
        to_image(ds[i]["triptych"]).save(root / f"scene{i}.png")
    return ds


def test_triptych_folder_round_trips_synthetic_samples_with_captions(tmp_path):
    ds = write_triptychs(tmp_path)
    (tmp_path / "scene0.txt").write_text("two people near a car\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image, ignored")
    folder = TriptychFolder(tmp_path)
    assert len(folder) == 3 and folder.layout == "triptychs" and folder.n_skipped == 0
    for i in range(3):
        x = folder[i]["triptych"]
        assert x.shape == (3, 32, 96) and x.dtype == torch.float32
        assert (x - ds[i]["triptych"]).abs().max() <= 1.01 / 255  # 8-bit rounding only
    assert folder[0]["caption"] == "two people near a car" and folder[1]["caption"] == ""
    assert "classes" not in folder[0]


def test_three_folder_layout_matches_by_stem_reads_grey_infrared_and_captions(tmp_path):
    ds = SyntheticTriptychs(2, size=32)
    for panel in ("visible", "infrared", "semantic"):
        (tmp_path / panel).mkdir()
    for i in range(2):
        v, ir, sem = split_triptych(ds[i]["triptych"])
        to_image(v).save(tmp_path / "visible" / f"img{i}.png")
        to_image(ir).convert("L").save(tmp_path / "infrared" / f"img{i}.png")  # one grey channel
        to_image(sem).save(tmp_path / "semantic" / f"img{i}.bmp")  # another extension, same stem
    (tmp_path / "visible" / "img1.txt").write_text("a tree, infrared view")
    folder = TriptychFolder(tmp_path)
    assert len(folder) == 2 and folder.layout == "folders"
    for i in range(2):
        assert (folder[i]["triptych"] - ds[i]["triptych"]).abs().max() <= 1.01 / 255
    assert folder[1]["caption"] == "a tree, infrared view" and folder[0]["caption"] == ""


def test_sizes_snap_down_to_multiples_of_16_by_centre_crop_or_resize_to_size(tmp_path):
    s = make_scene(np.random.default_rng(0), 100)  # 100-px panels
    triptych = np.concatenate([s.visible, s.infrared, s.semantic], axis=1)  # [100, 300, 3]
    Image.fromarray((triptych * 255).round().astype(np.uint8)).save(tmp_path / "t.png")
    pixels = np.asarray(Image.open(tmp_path / "t.png"), np.float32) / 127.5 - 1  # [100, 300, 3]

    x = TriptychFolder(tmp_path)[0]["triptych"]
    assert x.shape == (3, 96, 288)  # 100 → 96: two pixels cropped from each side, the rest exact
    assert torch.equal(x[:, :, :96], torch.from_numpy(pixels[2:98, 2:98]).permute(2, 0, 1))

    folder = TriptychFolder(tmp_path, size=40)  # a size is snapped down too
    x = folder[0]["triptych"]
    assert folder.size == 32 and x.shape == (3, 32, 96)
    semantic = split_triptych(x)[2].permute(1, 2, 0).reshape(-1, 3)  # nearest: only class colours
    assert torch.cdist(semantic, torch.from_numpy(SEMANTIC_COLOURS * 2 - 1)).min(1).values.max() < 0.01

    rect = tmp_path / "rect"  # three-folder panels 120 × 80: centre-cropped to 80 × 80, a multiple of 16
    for panel in ("visible", "infrared", "semantic"):
        (rect / panel).mkdir(parents=True)
        Image.fromarray((np.random.rand(80, 120, 3) * 255).astype(np.uint8)).save(rect / panel / "a.png")
    x = TriptychFolder(rect)[0]["triptych"]
    visible = np.asarray(Image.open(rect / "visible" / "a.png"), np.float32)[:, 20:100] / 127.5 - 1
    assert x.shape == (3, 80, 240) and torch.equal(x[:, :, :80], torch.from_numpy(visible).permute(2, 0, 1))


def test_wrong_width_triptych_is_skipped_and_counted_or_stops_naming_its_path(tmp_path):
    write_triptychs(tmp_path, n=2)
    Image.new("RGB", (90, 32)).save(tmp_path / "wide.png")  # 90 ≠ 3 × 32
    folder = TriptychFolder(tmp_path, on_error="skip")
    assert len(folder) == 2 and folder.n_skipped == 1
    assert folder.skipped[0][0] == tmp_path / "wide.png" and "96×32" in folder.skipped[0][1]
    with pytest.raises(DataError, match=r"wide\.png: is 90×32 pixels; a triptych must be 3 × its height wide"):
        TriptychFolder(tmp_path, on_error="stop")
    assert issubclass(DataError, ValueError)


def test_unreadable_image_is_skipped_and_counted_or_stops_naming_its_path(tmp_path):
    write_triptychs(tmp_path, n=2)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    folder = TriptychFolder(tmp_path)
    assert len(folder) == 2 and [p.name for p, _ in folder.skipped] == ["broken.png"]
    assert "cannot be read as an image" in folder.skipped[0][1]
    with pytest.raises(DataError, match=r"broken\.png: cannot be read as an image"):
        TriptychFolder(tmp_path, on_error="stop")


def test_image_that_fails_to_decode_when_read_is_skipped_or_stops(tmp_path):
    write_triptychs(tmp_path, n=1)
    good = TriptychFolder(tmp_path)[0]["triptych"]
    noise = np.random.default_rng(0).integers(0, 256, (32, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "truncated.jpg")
    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # a JPEG header passes the check
    folder = TriptychFolder(tmp_path)
    assert len(folder) == 2 and folder.n_skipped == 0
    assert torch.equal(folder[1]["triptych"], good)  # replaced by the next good sample
    assert folder.n_skipped == 1 and folder.skipped[0][0].name == "truncated.jpg"
    folder[1]  # counted once
    assert folder.n_skipped == 1
    with pytest.raises(DataError, match=r"truncated\.jpg: cannot be decoded"):
        TriptychFolder(tmp_path, on_error="stop")[1]


def test_missing_partner_is_named_and_skipped_or_stops(tmp_path):
    for panel in ("visible", "infrared", "semantic"):
        (tmp_path / panel).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / panel / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "visible" / "b.png")  # no infrared/b, no semantic/b
    Image.new("RGB", (32, 32)).save(tmp_path / "semantic" / "c.png")  # only a semantic panel
    folder = TriptychFolder(tmp_path)
    assert len(folder) == 1 and folder.n_skipped == 2
    (b, why_b), (c, why_c) = folder.skipped
    assert b == tmp_path / "visible" / "b.png" and why_b == "missing partner: no infrared/b.* or semantic/b.*"
    assert c == tmp_path / "semantic" / "c.png" and why_c == "missing partner: no visible/c.* or infrared/c.*"
    with pytest.raises(DataError, match=r"b\.png: missing partner: no infrared/b\.\*"):
        TriptychFolder(tmp_path, on_error="stop")


def test_panels_of_different_sizes_are_reported_by_path(tmp_path):
    for panel in ("visible", "infrared", "semantic"):
        (tmp_path / panel).mkdir()
        Image.new("RGB", (48 if panel == "infrared" else 32, 32)).save(tmp_path / panel / "a.png")
    with pytest.raises(DataError, match=r"infrared/a\.png: is 48×32 pixels but a\.png is 32×32"):
        TriptychFolder(tmp_path, on_error="stop")
    with pytest.raises(DataError, match="all 1 images were skipped"):  # skipping everything is an error too
        TriptychFolder(tmp_path, on_error="skip")


def test_empty_or_missing_folder_or_half_a_layout_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        TriptychFolder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        TriptychFolder(tmp_path / "nowhere")
    (tmp_path / "visible").mkdir()
    (tmp_path / "infrared").mkdir()
    with pytest.raises(DataError, match="has visible/, infrared/ but no semantic/"):
        TriptychFolder(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        TriptychFolder(tmp_path, on_error="ignore")


def test_a_non_utf8_triptych_caption_is_named_and_skipped_or_stops(tmp_path):
    write_triptychs(tmp_path)
    bad = tmp_path / "scene1.txt"
    bad.write_bytes("un arbre d'\xe9t\xe9".encode("latin-1"))  # byte 0xe9
    folder = TriptychFolder(tmp_path, on_error="skip")  # found when the folder is checked, not mid-run
    assert len(folder) == 2 and folder.skipped[0][0] == bad and "is not UTF-8 text" in folder.skipped[0][1]
    assert [folder[i]["caption"] for i in range(2)] == ["", ""]
    with pytest.raises(DataError, match=r"scene1\.txt: is not UTF-8 text"):
        TriptychFolder(tmp_path, on_error="stop")


# --- folders of images with captions, and Kontext's edit pairs ---------------------------------------------------


def random_pixels(seed: int, size=(32, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_pairs(root, n=2):
    """root/00.png + 00.txt (the target and its instruction), root/control/00.png (what the edit starts from), ..."""
    (root / "control").mkdir(parents=True)
    for i in range(n):
        random_pixels(i).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"edit {i}\n")
        random_pixels(100 + i).save(root / "control" / f"{i:02d}.png")


def test_a_16_bit_kontext_control_keeps_its_levels_as_its_target_does(tmp_path):
    write_pairs(tmp_path, n=1)
    ramp = np.round(np.linspace(0, 65535, 64 * 64)).reshape(64, 64).astype(np.uint16)  # dark at the top, white below
    for path in (tmp_path / "00.png", tmp_path / "control" / "00.png"):
        Image.fromarray(ramp).save(path)
        assert Image.open(path).mode == "I;16"
    sample = KontextFolder(tmp_path, resolution=32, on_error="stop")[0]
    for x in (sample["image"], sample["control"]):  # [3, 32, 32] in [-1, 1]
        assert x.shape == (3, 32, 32) and abs(x.mean()) < 0.02  # the ramp's mid-grey, not white
        assert x.min() < -0.95 and x.max() > 0.95 and (x >= 1).float().mean() < 0.05  # its levels, not clipped
    assert torch.equal(sample["control"], sample["image"])  # read the one way


@pytest.mark.parametrize("control_size", ["target", "own"])
def test_a_kontext_control_under_16_pixels_is_named_and_skipped_or_stops(tmp_path, control_size):
    write_pairs(tmp_path)
    bad = tmp_path / "control" / "01.png"
    Image.new("RGB", (1, 1)).save(bad)
    folder = KontextFolder(tmp_path, resolution=32, control_size=control_size)
    why = "is 1×1 pixels; images must be at least 16 pixels on each side"
    assert len(folder) == 1 and folder.skipped == [(bad, why)]
    with pytest.raises(DataError, match=r"control/01\.png: is 1×1 pixels; images must be at least 16 pixels"):
        KontextFolder(tmp_path, resolution=32, control_size=control_size, on_error="stop")


def one_stem_twice(root, case: str):
    """A data folder where two images differ only in their extension: (data set, both paths, what they'd share)."""
    if case == "t2i":
        for stem in ("a", "b"):
            random_pixels(0).save(root / f"{stem}.png")
            (root / f"{stem}.txt").write_text("a photo")
        random_pixels(1).save(root / "a.jpg")
        return lambda **kw: CaptionFolder(root, resolution=32, **kw), [root / "a.jpg", root / "a.png"], "caption a.txt"
    if case in ("kontext target", "kontext control"):
        write_pairs(root)
        twin = root / ("control" if case == "kontext control" else "") / "00.jpg"
        random_pixels(7).save(twin)
        shares = "the target 00.*" if case == "kontext control" else "the caption 00.txt and the control 00.*"
        return lambda **kw: KontextFolder(root, resolution=32, **kw), [twin, twin.with_suffix(".png")], shares
    if case == "triptychs":
        write_triptychs(root)
        to_image(SyntheticTriptychs(1, size=32, seed=1)[0]["triptych"]).save(root / "scene1.jpg")
        return lambda **kw: TriptychFolder(root, **kw), [root / "scene1.jpg", root / "scene1.png"], "caption scene1.txt"
    for panel in ("visible", "infrared", "semantic"):  # three folders: a second infrared/a.*
        (root / panel).mkdir()
        for stem in ("a", "b"):
            random_pixels(0).save(root / panel / f"{stem}.png")
    random_pixels(1).convert("L").save(root / "infrared" / "a.tif")
    twins = [root / "infrared" / "a.png", root / "infrared" / "a.tif"]
    return lambda **kw: TriptychFolder(root, **kw), twins, "visible/a.*"


@pytest.mark.parametrize("case", ["t2i", "kontext target", "kontext control", "triptychs", "three folders"])
def test_two_images_of_one_stem_are_both_named_and_skipped_or_stop(tmp_path, case):
    make, twins, shares = one_stem_twice(tmp_path, case)
    folder = make(on_error="skip")
    assert len(folder) == (2 if case == "triptychs" else 1)  # the other stems
    assert [p for p, _ in folder.skipped] == twins  # both, and nothing else (their caption, control, partners)
    for _, why in folder.skipped:
        assert f"{twins[0].name} and {twins[1].name} differ only in their extension" in why
        assert shares in why and "rename or remove one" in why
    with pytest.raises(DataError) as e:
        make(on_error="stop")
    assert e.value.path == twins[0] and twins[1].name in str(e.value) and shares in str(e.value)
