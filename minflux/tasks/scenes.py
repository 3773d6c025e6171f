"""Generated vis2ir scenes: triptychs [visible | infrared | semantic] drawn by a procedural generator.

The task (the vis2ir design): from a visible image and its semantic map, generate the infrared view. Each example
is one image of three square panels side by side, which the trainer splits along the width:

    triptych [3, S, 3S] = [ visible | infrared (the target) | semantic ]
                            [..., :S]  [..., S:2S]             [..., 2S:]

The vis2ir design trains on 512-px panels, [B, 3, 512, 1536]. Nothing can be downloaded on a fresh machine, so
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
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import Dataset

from minflux.hooks import stage


@stage
def split_triptych(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[..., 3, H, 3H] → (visible, infrared, semantic), each [..., 3, H, H]: views, not copies."""
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
PALETTE = (
    np.array(
        [
            (230, 25, 75),
            (60, 180, 75),
            (255, 225, 25),
            (0, 130, 200),
            (245, 130, 48),
            (145, 30, 180),
            (70, 240, 240),
            (240, 50, 230),
            (210, 245, 60),
            (250, 190, 212),
            (0, 128, 128),
            (170, 110, 40),
        ],
        np.float32,
    )
    / 255
)  # [12, 3]

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
