"""Training data: vis2ir triptychs [visible | infrared | semantic], generated or read; image + caption folders.

The task (seeds 000-002): from a visible image and its semantic map, generate the infrared view. Each example
is one image of three square panels side by side, which the trainer splits along the width:

    triptych [3, S, 3S] = [ visible | infrared (the target) | semantic ]
                            [..., :S]  [..., S:2S]             [..., 2S:]

The seeds train on 512-px panels, [B, 3, 512, 1536]. Nothing can be downloaded on a fresh machine, so
`python train.py` trains on a procedural stand-in, `SyntheticTriptychs`: small (64-px panels by default), fast
(numpy only, about 1700 scenes a second on one core) and deterministic (sample i of a split is always the same).

A synthetic scene is sky above a horizon, ground below it, and two to four objects standing on the ground,
each of one class: building, tree, vehicle or person. Every class has a fixed colour in the semantic panel and
a fixed temperature in the infrared panel (people are the warmest objects, trees the coldest, the sky colder
still). The infrared panel is grey (three equal channels, so it goes through the same RGB VAE), with a little
per-object variation of the temperature, a blur and sensor noise.

Why the infrared cannot be guessed from the visible panel: every region's visible colour is drawn from one
palette shared by all classes, and an object's shape (rectangle, ellipse or triangle, slightly tilted), size and
place do not depend on its class either. A red ellipse is as likely a person as a tree: the visible panel shows
*where* the objects are, never *what* they are, so a model that sees only the visible panel can at best predict
the average object temperature. The semantic panel says which class, hence which temperature, each object has.
The caption names the classes present ("a tree and two people on the ground under the sky, infrared view") but
not which object is which, so with two or more objects it leaves most of the ambiguity in place.
tests/test_data.py measures the gap on the held-out split, as the MSE of per-object infrared predictions in
[-1, 1] units: 0.227 for the best visible-only predictor (the mean object temperature; predicting by visible
colour does no better), 0.149 knowing the caption's class counts, 0.0051 knowing the semantic map (44× lower).

Real data: `TriptychFolder` reads a folder of triptych images, or three aligned folders visible/, infrared/,
semantic/, with optional captions, and reports every file it cannot use by its path.

Text-to-image data: `CaptionFolder` reads a folder of images with same-named .txt captions (the layout of
kohya's sd-scripts, ai-toolkit and diffusers' DreamBooth scripts), resized and centre-cropped to one square
size or to aspect-ratio buckets.
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset


def split_triptych(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[..., 3, H, 3H] → (visible, infrared, semantic), each [..., 3, H, H]: views, not copies (seed 000, 2.2)."""
    h = x.shape[-2]
    if x.shape[-1] != 3 * h:
        raise ValueError(f"a triptych is three times as wide as high; got shape {list(x.shape)}")
    return x[..., :h], x[..., h : 2 * h], x[..., 2 * h :]  # 3 × [B, 3, 512, 512] from [B, 3, 512, 1536]


# --- the class table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneClass:
    name: str  # as a caption writes one of them
    plural: str
    colour: tuple[int, int, int]  # in the semantic panel (the Cityscapes colours)
    temperature: float  # grey level in the infrared panel: 0 cold (black) ... 1 hot (white)


CLASSES = (
    SceneClass("sky", "skies", (70, 130, 180), 0.08),
    SceneClass("ground", "grounds", (128, 64, 128), 0.40),
    SceneClass("building", "buildings", (70, 70, 70), 0.55),
    SceneClass("tree", "trees", (107, 142, 35), 0.25),
    SceneClass("vehicle", "vehicles", (0, 0, 142), 0.72),
    SceneClass("person", "people", (220, 20, 60), 0.90),
)
SKY, GROUND = 0, 1
OBJECT_CLASSES = (2, 3, 4, 5)  # the classes an object can have, equally likely
SEMANTIC_COLOURS = np.array([c.colour for c in CLASSES], np.float32) / 255  # [6, 3]
TEMPERATURES = np.array([c.temperature for c in CLASSES], np.float32)  # [6]

# The visible colours: one palette for every region of every class, twelve well-separated hues. A scene draws
# its regions' colours from it without replacement, so neighbouring regions never share a colour.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
], np.float32) / 255  # [12, 3]

SHAPES = ("rectangle", "ellipse", "triangle")
MAX_OBJECTS = 4
TEMPERATURE_JITTER = 0.03  # std of one object's temperature around its class's
SENSOR_NOISE = 0.02  # std of the per-pixel noise, infrared and visible
NUMBER_WORDS = ("no", "a", "two", "three", "four")


# --- one scene ----------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    cls: int  # index into CLASSES
    shape: str  # one of SHAPES
    colour: int  # index into PALETTE
    temperature: float  # this object's own temperature: its class's, ± TEMPERATURE_JITTER


@dataclass
class Scene:
    visible: np.ndarray  # [S, S, 3] float32 in [0, 1]
    infrared: np.ndarray  # [S, S, 3] float32 in [0, 1], three equal channels
    semantic: np.ndarray  # [S, S, 3] float32 in [0, 1], the class colours
    classes: np.ndarray  # [S, S] int64, index into CLASSES
    instances: np.ndarray  # [S, S] int64: 0 for sky and ground, k for objects[k - 1]
    objects: list[SceneObject]  # the objects still visible, back to front
    caption: str


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size, dtype=np.float32) + 0.5
    return centres[:, None], centres[None, :]  # y [S, 1], x [1, S]: they broadcast to [S, S]


def _shape_mask(shape: str, y, x, cy, cx, h, w, tilt) -> np.ndarray:
    """Pixels inside a shape of height h and width w centred at (cy, cx), tilted by `tilt` radians."""
    u = (x - cx) * math.cos(tilt) + (y - cy) * math.sin(tilt)  # across the shape
    v = -(x - cx) * math.sin(tilt) + (y - cy) * math.cos(tilt)  # down the shape
    if shape == "rectangle":
        return (abs(u) <= w / 2) & (abs(v) <= h / 2)
    if shape == "ellipse":
        return (2 * u / w) ** 2 + (2 * v / h) ** 2 <= 1
    return (abs(v) <= h / 2) & (abs(u) <= w / 2 * (v + h / 2) / h)  # triangle, apex up


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an [H, W] image, edges repeated: a weighted sum of shifted copies."""
    r = max(1, math.ceil(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape
    p = img[np.clip(np.arange(-r, h + r), 0, h - 1)][:, np.clip(np.arange(-r, w + r), 0, w - 1)]  # [H + 2r, W + 2r]
    rows = sum(k[i] * p[i : i + h, :] for i in range(2 * r + 1))  # [H, W + 2r]
    return sum(k[j] * rows[:, j : j + w] for j in range(2 * r + 1)).astype(np.float32)  # [H, W]


def describe(objects: list[SceneObject]) -> str:
    """The caption: how many objects of each class, not which is which. "a tree and two people on the ground..."."""
    counts = [(c, sum(o.cls == c for o in objects)) for c in OBJECT_CLASSES]
    parts = [f"{NUMBER_WORDS[n]} {CLASSES[c].name if n == 1 else CLASSES[c].plural}" for c, n in counts if n]
    if len(parts) > 1:
        parts = [", ".join(parts[:-1]) + " and " + parts[-1]]
    things = parts[0] if parts else "nothing"
    return f"{things} on the ground under the sky, infrared view"


def make_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """Draw one scene from `rng` and paint its three panels, size × size pixels each."""
    y, x = _pixel_centres(size)  # [S, 1], [1, S]

    # 1. Lay it out. Regions: 0 sky, 1 ground, 2... objects, painted back to front.
    horizon = rng.uniform(0.3, 0.55) * size
    n = int(rng.integers(2, MAX_OBJECTS + 1))
    colours = rng.choice(len(PALETTE), n + 2, replace=False)  # one palette colour per region, any class
    region_cls = [SKY, GROUND]
    region_temp = [TEMPERATURES[c] + rng.normal(0, TEMPERATURE_JITTER) for c in region_cls]
    region = np.broadcast_to(y >= horizon, (size, size)).astype(np.int64)  # [S, S]: 0 above the horizon, 1 below
    objects = []
    for k in range(n):  # nothing below depends on the class except the temperature
        cls = OBJECT_CLASSES[rng.integers(len(OBJECT_CLASSES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        h, w = rng.uniform(0.2, 0.5, 2) * size
        bottom, cx = rng.uniform(horizon + 0.05 * size, size), rng.uniform(0, size)
        tilt = rng.uniform(-0.3, 0.3)
        temperature = TEMPERATURES[cls] + rng.normal(0, TEMPERATURE_JITTER)
        region[_shape_mask(shape, y, x, bottom - h / 2, cx, h, w, tilt)] = k + 2
        objects.append(SceneObject(cls, shape, int(colours[k + 2]), float(temperature)))
        region_cls.append(cls)
        region_temp.append(temperature)

    # An object hidden behind later ones is dropped; the rest are renumbered 1..m, back to front.
    shown = [k for k in range(n) if (region == k + 2).any()]
    renumber = np.zeros(n + 2, np.int64)
    renumber[[k + 2 for k in shown]] = np.arange(1, len(shown) + 1)
    objects = [objects[k] for k in shown]

    # 2. Paint. Every panel is a lookup of the region map, [S, S] -> [S, S, 3].
    classes = np.array(region_cls)[region]  # [S, S]
    semantic = SEMANTIC_COLOURS[classes]  # [S, S, 3]

    light = rng.uniform(0, 2 * math.pi)  # one sun for the whole scene: brighter towards it, ±14%
    shading = 1 + 0.1 * (math.cos(light) * (x - size / 2) + math.sin(light) * (y - size / 2)) / (size / 2)
    visible = PALETTE[colours[region]] * shading[..., None]  # [S, S, 3]; shading [S, S]
    visible += SENSOR_NOISE * rng.standard_normal((size, size, 1), np.float32)  # brightness noise

    infrared = gaussian_blur(np.array(region_temp, np.float32)[region], sigma=size / 80)  # [S, S]
    infrared += SENSOR_NOISE * rng.standard_normal((size, size), np.float32)
    infrared = np.repeat(infrared[..., None], 3, axis=-1)  # [S, S, 3], grey

    return Scene(
        visible=np.clip(visible, 0, 1).astype(np.float32),
        infrared=np.clip(infrared, 0, 1).astype(np.float32),
        semantic=semantic,
        classes=classes,
        instances=renumber[region],
        objects=objects,
        caption=describe(objects),
    )


# --- the synthetic data set -------------------------------------------------------------------------------


SPLITS = {"train": 0, "heldout": 1}


def to_tensor(panels: list[np.ndarray]) -> Tensor:
    """Three [S, S, 3] panels in [0, 1] → one triptych [3, S, 3S] in [-1, 1], the range the VAE expects."""
    triptych = np.concatenate(panels, axis=1)  # [S, 3S, 3]
    return torch.from_numpy(np.ascontiguousarray(rearrange(triptych * 2 - 1, "h w c -> c h w")))  # [3, S, 3S]


class SyntheticTriptychs(Dataset):
    """n procedural vis2ir scenes. Sample i is drawn from a generator seeded with (seed, split, i), so it is the
    same every time and in any order, and the held-out split never shares a scene's seed with the train split.

    Each sample: dict(triptych=[3, S, 3S] float in [-1, 1], caption=str, classes=[S, S] long).
    """

    def __init__(self, n: int, size: int = 64, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if size % 16 or size < 16:
            raise ValueError(f"size must be a multiple of 16 (VAE ×8, then 2×2 packing), got {size}")
        self.n, self.size, self.split, self.seed = n, size, split, seed

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        """Sample i as a Scene, with the object list and instance map the tests use."""
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} of a data set of {self.n}")
        return make_scene(np.random.default_rng([self.seed, SPLITS[self.split], i]), self.size)

    def __getitem__(self, i: int) -> dict:
        s = self.scene(i)
        triptych = to_tensor([s.visible, s.infrared, s.semantic])  # [3, 64, 192]
        return dict(triptych=triptych, caption=s.caption, classes=torch.from_numpy(s.classes))  # classes [64, 64]

    def captions(self) -> list[str]:
        """Every sample's caption, in order: the text the tokenizer vocabularies are built from."""
        return [self.scene(i).caption for i in range(self.n)]


# --- real data: a folder of triptychs, or three aligned folders -----------------------------------------------


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
PANELS = ("visible", "infrared", "semantic")


class DataError(ValueError):
    """A data folder or file that cannot be used. `path` is the file; the message says what was expected."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _probe(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, after a check of its structure (PNG checksums, for one)."""
    try:
        with Image.open(path) as im:
            im.verify()
            return im.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(path, f"cannot be read as an image ({type(e).__name__}: {e})") from e


def _read(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # a grey infrared image becomes three equal channels
    except Exception as e:
        raise DataError(path, f"cannot be decoded ({type(e).__name__}: {e})") from e


def _fit(panel: Image.Image, size: int | None, semantic: bool) -> Image.Image:
    """Centre-crop to a square; then resize to size × size, or with size=None crop down to a multiple of 16.

    Snapping crops rather than resizes: it loses at most 15 border pixels and keeps every other pixel exact.
    The semantic panel is resized with nearest-neighbour, so no colour between two classes is invented.
    """
    w, h = panel.size
    side = min(w, h) if size else min(w, h) // 16 * 16
    left, top = (w - side) // 2, (h - side) // 2
    panel = panel.crop((left, top, left + side, top + side))
    if size and side != size:
        panel = panel.resize((size, size), Image.Resampling.NEAREST if semantic else Image.Resampling.BICUBIC)
    return panel


class _Folder(Dataset):
    """What the folder data sets share: a file that cannot be used raises DataError under on_error="stop";
    under "skip" it is left out and listed in `skipped` as (path, why)."""

    def __init__(self, root, on_error: str):
        if on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
        self.root, self.on_error = Path(root), on_error
        self.skipped: list[tuple[Path, str]] = []
        self._bad: set[int] = set()  # items that passed the check but failed to decode when read

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def _reject(self, e: DataError):
        if self.on_error == "stop":
            raise e
        self.skipped.append((e.path, e.why))

    def _first_good(self, candidates: list[int], what: str) -> dict:
        """self.load of the first candidate that decodes; one that fails is skipped (and counted) from then on."""
        for j in candidates:
            if j in self._bad:
                continue
            try:
                return self.load(j)
            except DataError as e:
                self._reject(e)
                self._bad.add(j)
        raise DataError(self.root, f"every one of the {len(candidates)} {what} failed to decode")

    def _all_skipped(self) -> DataError:
        return DataError(self.root, f"all {len(self.skipped)} images were skipped; the first: "
                                    f"{self.skipped[0][0]}: {self.skipped[0][1]}")  # fmt: skip


class TriptychFolder(_Folder):
    """Real vis2ir data in one of two layouts, chosen by what `root` holds:

        root/a.png, root/b.jpg, ...            triptychs [visible | infrared | semantic], width = 3 × height
        root/visible/a.png, root/infrared/a.png, root/semantic/a.png, ...   three aligned panels, matched by
                                               file name without the extension (a.jpg pairs with a.png)

    A caption is read from a .txt file with the image's stem beside the triptych (root/a.txt) or beside the
    visible panel (root/visible/a.txt); without one the caption is "". Panels are centre-cropped to squares
    (three-folder layout), then resized to size × size, or with size=None snapped down to a multiple of 16
    (a 500-px panel becomes 496); a given size is snapped down too. Each sample: dict(triptych=[3, S, 3S]
    float in [-1, 1], caption=str), the synthetic set's format without the class map.

    Every file is checked when the data set is built. A file that cannot be used (unreadable, a triptych of the
    wrong width, a panel without its partners or of another size, smaller than 16 px) raises DataError with its
    path under on_error="stop"; under on_error="skip" it is left out and listed in `skipped` as (path, why).
    A file that passes the check but fails to decode later is skipped the same way when read: that sample is
    replaced by the next good one (in DataLoader workers the list lives in the worker's copy).
    """

    def __init__(self, root, size: int | None = None, on_error: str = "skip"):
        super().__init__(root, on_error)
        if not self.root.is_dir():
            raise DataError(self.root, "no such folder")
        if size is not None and size < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        self.size = None if size is None else size // 16 * 16

        folders = [p for p in PANELS if (self.root / p).is_dir()]
        if folders and len(folders) < 3:
            missing = ", ".join(f"{p}/" for p in PANELS if p not in folders)
            raise DataError(self.root, f"has {', '.join(f'{p}/' for p in folders)} but no {missing}; "
                                       "the three-folder layout needs visible/, infrared/ and semantic/")
        self.layout = "folders" if folders else "triptychs"
        candidates = self._match_folders() if folders else [(p,) for p in _images(self.root)]

        self.items: list[tuple[Path, ...]] = []  # (triptych,) or (visible, infrared, semantic)
        for files in candidates:
            try:
                self._check(files)
                self.items.append(files)
            except DataError as e:
                self._reject(e)
        if not self.items:
            if not self.skipped:
                raise DataError(self.root, "no images found; expected triptych images (width = 3 × height) "
                                           "or folders visible/, infrared/ and semantic/")
            raise self._all_skipped()

    def _match_folders(self) -> list[tuple[Path, Path, Path]]:
        """Pair visible/, infrared/ and semantic/ by stem; a file without both partners is rejected by name."""
        found = {p: {} for p in PANELS}  # panel -> {stem: path}
        for panel in PANELS:
            for path in _images(self.root / panel):
                if path.stem in found[panel]:
                    self._reject(DataError(path, f"another {panel} image has the stem {path.stem!r}: "
                                                 f"{found[panel][path.stem].name}"))
                    continue
                found[panel][path.stem] = path
        matched = []
        for stem in sorted(set().union(*found.values())):
            files = tuple(found[p].get(stem) for p in PANELS)
            if None in files:
                missing = " or ".join(f"{p}/{stem}.*" for p, f in zip(PANELS, files) if f is None)
                self._reject(DataError(next(f for f in files if f), f"missing partner: no {missing}"))
            else:
                matched.append(files)
        return matched

    def _check(self, files: tuple[Path, ...]):
        sizes = [_probe(f) for f in files]  # [(w, h), ...]
        if len(files) == 1:
            (w, h), path = sizes[0], files[0]
            if w != 3 * h:
                raise DataError(path, f"is {w}×{h} pixels; a triptych must be 3 × its height wide ({3 * h}×{h})")
            if h < 16:
                raise DataError(path, f"is {w}×{h} pixels; panels must be at least 16 pixels high")
            return
        for f, s in zip(files[1:], sizes[1:]):
            if s != sizes[0]:
                raise DataError(f, f"is {s[0]}×{s[1]} pixels but {files[0].name} is {sizes[0][0]}×{sizes[0][1]}; "
                                   "the three panels must be aligned, of one size")
        if min(sizes[0]) < 16:
            raise DataError(files[0], f"is {sizes[0][0]}×{sizes[0][1]} pixels; panels must be at least 16 pixels")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> dict:
        """Sample i, or DataError naming the file that failed to decode."""
        files = self.items[i]
        images = [_read(f) for f in files]
        if len(images) == 1:  # cut the triptych into its panels
            h = images[0].height
            images = [images[0].crop((k * h, 0, (k + 1) * h, h)) for k in range(3)]
        panels = [np.asarray(_fit(im, self.size, semantic=k == 2), np.float32) / 255 for k, im in enumerate(images)]
        caption = files[0].with_suffix(".txt")
        caption = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        return dict(triptych=to_tensor(panels), caption=caption)  # triptych [3, S, 3S]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a data set of {len(self)}")
        return self._first_good([(i + k) % len(self) for k in range(len(self))], "images")  # i, then the next good one

    def __repr__(self) -> str:
        return (f"TriptychFolder({str(self.root)!r}, {len(self)} triptychs, layout={self.layout}, "
                f"size={self.size}, {self.n_skipped} skipped)")


# --- text-to-image data: images with same-named captions ----------------------------------------------------

# Aspect-ratio buckets (width : height). Each becomes a size of about resolution² pixels, sides multiples of 16.
BUCKET_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 16 / 9, 2)


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) per ratio of BUCKET_RATIOS: the area of a resolution² square, sides snapped to 16."""
    snap = lambda x: max(16, round(x / 16) * 16)  # noqa: E731
    sizes = [(snap(resolution * math.sqrt(r)), snap(resolution / math.sqrt(r))) for r in BUCKET_RATIOS]
    return list(dict.fromkeys(sizes))  # small resolutions snap some ratios to one size: keep it once


class CaptionFolder(_Folder):
    """Text-to-image training data: root/a.png with its caption in root/a.txt, root/b.jpg with root/b.txt, ...

    Every image becomes `resolution` × `resolution` pixels (a multiple of 16: VAE ×8, then 2×2 packing): scaled
    to cover the square, then centre-cropped. With buckets=True each image gets instead the size of
    `bucket_sizes(resolution)` nearest its aspect ratio, so a portrait keeps its portrait framing; the trainer
    draws each batch from one size. EXIF orientation is applied, so phone photos stand the right way up.

    A caption is the .txt file's text, stripped (an empty file is the empty caption). An image without a .txt
    gets `default_caption`; with default_caption=None that is an error naming every such image (not a file to
    skip: the folder is missing text, not holding a broken file). An image that cannot be read, or is smaller
    than 16 px, raises DataError with its path under on_error="stop"; under on_error="skip" it is left out and
    listed in `skipped` as (path, why). A file that passes the check but fails to decode later is replaced by
    the next good image of the same size, and listed the same way.

    Each sample: dict(image=[3, H, W] float in [-1, 1], caption=str).
    """

    def __init__(self, root, resolution: int = 512, default_caption: str | None = None, on_error: str = "skip",
                 buckets: bool = False):  # fmt: skip
        super().__init__(root, on_error)
        if resolution % 16 or resolution < 16:
            raise ValueError(f"resolution must be a multiple of 16 (VAE ×8, then 2×2 packing), got {resolution}")
        self.resolution = resolution
        if not self.root.is_dir():
            raise DataError(self.root, "no such folder")
        files = _images(self.root)
        if not files:
            raise DataError(self.root, f"no images found; expected image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                                       " each with a same-named .txt caption")
        uncaptioned = [f for f in files if not f.with_suffix(".txt").is_file()]
        if uncaptioned and default_caption is None:
            names = ", ".join(f.name for f in uncaptioned[:3]) + (" ..." if len(uncaptioned) > 3 else "")
            raise DataError(uncaptioned[0], f"no caption file {uncaptioned[0].with_suffix('.txt').name} "
                                            f"({len(uncaptioned)} of {len(files)} images have none: {names}); "
                                            "write one per image, or pass a default caption (--default-caption)")
        self.default_caption = default_caption
        self.n_default_captions = len(uncaptioned)
        choices = bucket_sizes(resolution) if buckets else [(resolution, resolution)]

        self.items: list[Path] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) each image is made, in pixels
        for f in files:
            try:
                w, h = _probe(f)
                if min(w, h) < 16:
                    raise DataError(f, f"is {w}×{h} pixels; images must be at least 16 pixels on each side")
            except DataError as e:
                self._reject(e)
                continue
            self.items.append(f)
            self.sizes.append(min(choices, key=lambda s: abs(math.log((s[0] / s[1]) / (w / h)))))  # nearest ratio
        if not self.items:
            raise self._all_skipped()

    def caption(self, i: int) -> str:
        path = self.items[i].with_suffix(".txt")
        return path.read_text(encoding="utf-8").strip() if path.is_file() else self.default_caption

    def captions(self) -> list[str]:
        """Every image's caption, in order (read without decoding the images)."""
        return [self.caption(i) for i in range(len(self))]

    def load(self, i: int) -> dict:
        """Sample i, or DataError naming the file that failed to decode."""
        path, size = self.items[i], self.sizes[i]
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as e:
            raise DataError(path, f"cannot be decoded ({type(e).__name__}: {e})") from e
        im = ImageOps.fit(im, size, Image.Resampling.LANCZOS)  # scale to cover, centre-crop to width × height
        image = np.asarray(im, np.float32) / 127.5 - 1  # [H, W, 3] in [-1, 1]
        return dict(image=torch.from_numpy(np.ascontiguousarray(rearrange(image, "h w c -> c h w"))),
                    caption=self.caption(i))  # fmt: skip

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a data set of {len(self)}")
        same_size = [j for j in [(i + k) % len(self) for k in range(len(self))] if self.sizes[j] == self.sizes[i]]
        return self._first_good(same_size, f"images of size {self.sizes[i]}")  # i, then the next good one of its size

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"CaptionFolder({str(self.root)!r}, {len(self)} images, resolution={self.resolution}, "
                f"{len(set(self.sizes))} size(s), {self.n_skipped} skipped)")
