"""Training data from folders: vis2ir triptychs, and images with captions for text-to-image.

Real vis2ir data: `TriptychFolder` reads a folder of triptych images [visible | infrared | semantic], or three
aligned folders visible/, infrared/, semantic/, with optional captions, and reports every file it cannot use by
its path. Each sample has the format of the generated scenes (scenes.py): dict(triptych=[3, S, 3S], caption=str).

Text-to-image data: `CaptionFolder` reads a folder of images with same-named .txt captions (the layout of
kohya's sd-scripts, ai-toolkit and diffusers' DreamBooth scripts), resized and centre-cropped to one square
size or to aspect-ratio buckets. Editing pairs (a target and the images it is made from): pairs.py.
"""

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from minflux.files.images import DataError, deep_to_float, to_8bit
from minflux.tasks.scenes import to_tensor


def captions(data) -> list[str]:
    """Every sample's caption, in order (a data set's own list when it has one: no image is decoded)."""
    return data.captions() if hasattr(data, "captions") else [data[i]["caption"] for i in range(len(data))]


def triptychs(data, idx=None) -> Tensor:
    """The triptychs of samples `idx` (all by default), stacked: [N, 3, S, 3S]."""
    return torch.stack([data[i]["triptych"] for i in (range(len(data)) if idx is None else idx)])


# --- real data: a folder of triptychs, or three aligned folders -----------------------------------------------


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
PANELS = ("visible", "infrared", "semantic")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _probe(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, after a check of its structure (PNG checksums, for one)."""
    try:
        with Image.open(path) as im:
            im.verify()
            return im.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(path, f"cannot be read as an image ({type(e).__name__}: {e})") from e


def probe_image(path: Path) -> tuple[int, int]:
    """_probe, and DataError when a side is under 16 pixels (one latent token: VAE ×8, then 2×2 packing)."""
    w, h = _probe(path)
    if min(w, h) < 16:
        raise DataError(path, f"is {w}×{h} pixels; images must be at least 16 pixels on each side")
    return w, h


def _caption_text(path: Path, default: str | None = None) -> str | None:
    """The caption file's text, stripped; `default` when there is none; DataError naming it when it is not UTF-8."""
    if not path.is_file():
        return default
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(path, f"is not UTF-8 text ({e.reason} at byte {e.start}): save the caption as UTF-8") from e
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or e})") from e


def _read(path: Path) -> Image.Image:
    """The image at 8 bits ("RGB"), or at its own depth as a float image ("F", 0-255 scale) when it has more bits
    (a 16-bit infrared frame keeps its levels; see images.deep_to_float)."""
    try:
        with Image.open(path) as im:
            im = deep_to_float(im)
            return im if im.mode == "F" else im.convert("RGB")
    except Exception as e:
        raise DataError(path, f"cannot be decoded ({type(e).__name__}: {e})") from e


def _rgb(panel: np.ndarray) -> np.ndarray:
    """[S, S, 3] in [0, 1]: a grey panel (a 16-bit or float image, read as "F") becomes three equal channels."""
    if panel.ndim == 2:
        panel = np.repeat(panel[..., None], 3, axis=2)
    return np.clip(panel, 0.0, 1.0)  # bicubic resizing of a float image overshoots a little


def fit_panel(panel: Image.Image, size: int | None, semantic: bool) -> Image.Image:
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
    under "skip" it is left out and listed in `skipped` as (path, why). Two images of one stem (a.png, a.jpg)
    are ambiguous (which one does a.txt caption?): under "skip" both are left out and listed."""

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

    def _by_stem(self, paths: list[Path], shares) -> tuple[dict[str, Path], set[str]]:
        """The images by file name without the extension, and the stems held by two or more (a.png and a.jpg):
        those are ambiguous, each is rejected naming them all and what they would share (shares(stem))."""
        groups: dict[str, list[Path]] = {}
        for path in paths:
            groups.setdefault(path.stem, []).append(path)
        for stem, twins in groups.items():
            if len(twins) > 1:
                names = ", ".join(p.name for p in twins[:-1]) + f" and {twins[-1].name}"
                for path in twins:
                    self._reject(
                        DataError(
                            path,
                            f"{names} differ only in their extension and would share "
                            f"{shares(stem)}; rename or remove one",
                        )
                    )
        ambiguous = {stem for stem, twins in groups.items() if len(twins) > 1}
        return {stem: twins[0] for stem, twins in groups.items() if stem not in ambiguous}, ambiguous

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
        return DataError(
            self.root,
            f"all {len(self.skipped)} images were skipped; the first: {self.skipped[0][0]}: {self.skipped[0][1]}",
        )


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
    wrong width, a panel without its partners or of another size, smaller than 16 px, a caption not in UTF-8, two
    images of one stem in a folder: a.png and a.jpg, both) raises DataError with its path under on_error="stop";
    under on_error="skip" it is left out and listed in `skipped` as (path, why).
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
            raise DataError(
                self.root,
                f"has {', '.join(f'{p}/' for p in folders)} but no {missing}; "
                "the three-folder layout needs visible/, infrared/ and semantic/",
            )
        self.layout = "folders" if folders else "triptychs"
        if folders:
            candidates = self._match_folders()
        else:
            found, _ = self._by_stem(image_files(self.root), lambda stem: f"the caption {stem}.txt")
            candidates = [(p,) for p in sorted(found.values())]

        self.items: list[tuple[Path, ...]] = []  # (triptych,) or (visible, infrared, semantic)
        for files in candidates:
            try:
                self._check(files)
                _caption_text(files[0].with_suffix(".txt"))  # a caption that cannot be read is found now, not mid-run
                self.items.append(files)
            except DataError as e:
                self._reject(e)
        if not self.items:
            if not self.skipped:
                raise DataError(
                    self.root,
                    "no images found; expected triptych images (width = 3 × height) "
                    "or folders visible/, infrared/ and semantic/",
                )
            raise self._all_skipped()

    def _match_folders(self) -> list[tuple[Path, Path, Path]]:
        """Pair visible/, infrared/ and semantic/ by stem; a file without both partners is rejected by name, and
        so are two panels of one stem in one folder (their partners are then left out unnamed)."""
        found, ambiguous = {}, set()  # panel -> {stem: path}; stems held twice in a folder
        for panel in PANELS:

            def shares(stem: str, panel: str = panel) -> str:
                return "the panels " + " and ".join(f"{p}/{stem}.*" for p in PANELS if p != panel)

            found[panel], twice = self._by_stem(image_files(self.root / panel), shares)
            ambiguous |= twice
        matched = []
        for stem in sorted(set().union(*found.values()) - ambiguous):
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
                raise DataError(
                    f,
                    f"is {s[0]}×{s[1]} pixels but {files[0].name} is {sizes[0][0]}×{sizes[0][1]}; "
                    "the three panels must be aligned, of one size",
                )
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
        panels = [
            _rgb(np.asarray(fit_panel(im, self.size, semantic=k == 2), np.float32) / 255) for k, im in enumerate(images)
        ]
        caption = _caption_text(files[0].with_suffix(".txt"), default="")
        return dict(triptych=to_tensor(panels), caption=caption)  # triptych [3, S, 3S]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a data set of {len(self)}")
        return self._first_good([(i + k) % len(self) for k in range(len(self))], "images")  # i, then the next good one

    def __repr__(self) -> str:
        return (
            f"TriptychFolder({str(self.root)!r}, {len(self)} triptychs, layout={self.layout}, "
            f"size={self.size}, {self.n_skipped} skipped)"
        )


# --- text-to-image data: images with same-named captions ----------------------------------------------------

# Aspect-ratio buckets (width : height). Each becomes a size of about resolution² pixels, sides multiples of 16.
BUCKET_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 16 / 9, 2)


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) per ratio of BUCKET_RATIOS: the area of a resolution² square, sides snapped to 16."""
    snap = lambda x: max(16, round(x / 16) * 16)  # noqa: E731
    sizes = [(snap(resolution * math.sqrt(r)), snap(resolution / math.sqrt(r))) for r in BUCKET_RATIOS]
    return list(dict.fromkeys(sizes))  # small resolutions snap some ratios to one size: keep it once


def image_tensor(path: Path, size: tuple[int, int]) -> Tensor:
    """[3, H, W] in [-1, 1] for size (W, H): the image with its EXIF orientation applied, one deeper than 8 bits
    scaled by its depth (images.to_8bit), scaled to cover W × H and centre-cropped; DataError if it fails to decode."""
    try:
        with Image.open(path) as im:
            im = to_8bit(ImageOps.exif_transpose(im)).convert("RGB")
    except Exception as e:
        raise DataError(path, f"cannot be decoded ({type(e).__name__}: {e})") from e
    im = ImageOps.fit(im, size, Image.Resampling.LANCZOS)  # scale to cover, centre-crop to width × height
    image = np.asarray(im, np.float32) / 127.5 - 1  # [H, W, 3] in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(rearrange(image, "h w c -> c h w")))


class CaptionFolder(_Folder):
    """Text-to-image training data: root/a.png with its caption in root/a.txt, root/b.jpg with root/b.txt, ...

    Every image becomes `resolution` × `resolution` pixels (a multiple of 16: VAE ×8, then 2×2 packing): scaled
    to cover the square, then centre-cropped. With buckets=True each image gets instead the size of
    `bucket_sizes(resolution)` nearest its aspect ratio, so a portrait keeps its portrait framing; the trainer
    draws each batch from one size. EXIF orientation is applied, so phone photos stand the right way up.

    A caption is the .txt file's text, stripped (an empty file is the empty caption). An image without a .txt
    gets `default_caption`; with default_caption=None that is an error naming every such image (not a file to
    skip: the folder is missing text, not holding a broken file). An image that cannot be read, is smaller than
    16 px, or whose caption is not UTF-8 raises DataError with that file's path under on_error="stop"; under
    on_error="skip" it is left out and listed in `skipped` as (path, why); so are both of a.png and a.jpg (one
    stem: which does a.txt caption?). A file that passes the check but fails to decode later is replaced by the
    next good image of the same size, and listed the same way.

    Each sample: dict(image=[3, H, W] float in [-1, 1], caption=str).
    """

    def __init__(
        self,
        root,
        resolution: int = 512,
        default_caption: str | None = None,
        on_error: str = "skip",
        buckets: bool = False,
    ):
        super().__init__(root, on_error)
        if resolution % 16 or resolution < 16:
            raise ValueError(f"resolution must be a multiple of 16 (VAE ×8, then 2×2 packing), got {resolution}")
        self.resolution = resolution
        if not self.root.is_dir():
            raise DataError(self.root, "no such folder")
        files = image_files(self.root)
        if not files:
            raise DataError(
                self.root,
                f"no images found; expected image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                " each with a same-named .txt caption",
            )
        files = sorted(self._by_stem(files, self._shared)[0].values())
        uncaptioned = [f for f in files if not f.with_suffix(".txt").is_file()]
        if uncaptioned and default_caption is None:
            names = ", ".join(f.name for f in uncaptioned[:3]) + (" ..." if len(uncaptioned) > 3 else "")
            raise DataError(
                uncaptioned[0],
                f"no caption file {uncaptioned[0].with_suffix('.txt').name} "
                f"({len(uncaptioned)} of {len(files)} images have none: {names}); "
                "write one per image, or pass a default caption (--default-caption)",
            )
        self.default_caption = default_caption
        self.n_default_captions = len(uncaptioned)
        choices = bucket_sizes(resolution) if buckets else [(resolution, resolution)]

        self.items: list[Path] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) each image is made, in pixels
        for f in files:
            try:
                w, h = probe_image(f)
                _caption_text(f.with_suffix(".txt"))  # a caption that cannot be read is found now, not mid-run
            except DataError as e:
                self._reject(e)
                continue
            self.items.append(f)
            self.sizes.append(min(choices, key=lambda s: abs(math.log((s[0] / s[1]) / (w / h)))))  # nearest ratio
        if not self.items:
            raise self._all_skipped()

    def _shared(self, stem: str) -> str:
        """What an image of this stem is paired with (named when two images have the stem)."""
        return f"the caption {stem}.txt"

    def caption(self, i: int) -> str:
        return _caption_text(self.items[i].with_suffix(".txt"), self.default_caption)

    def group(self, i: int):
        """What the images of one batch share: their size."""
        return self.sizes[i]

    def captions(self) -> list[str]:
        """Every image's caption, in order (read without decoding the images)."""
        return [self.caption(i) for i in range(len(self))]

    def load(self, i: int) -> dict:
        """Sample i, or DataError naming the file that failed to decode."""
        return dict(image=image_tensor(self.items[i], self.sizes[i]), caption=self.caption(i))  # image [3, H, W]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a data set of {len(self)}")
        same_size = [j for j in [(i + k) % len(self) for k in range(len(self))] if self.group(j) == self.group(i)]
        return self._first_good(same_size, f"images of size {self.sizes[i]}")  # i, then the next good one of its size

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (
            f"CaptionFolder({str(self.root)!r}, {len(self)} images, resolution={self.resolution}, "
            f"{len(set(self.sizes))} size(s), {self.n_skipped} skipped)"
        )
