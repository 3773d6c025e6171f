"""Image-editing pairs from folders: a target with its instruction, and the images the edit starts from (one per
reference folder), for Kontext on FLUX.1 and FLUX.2 (`train.py --task kontext`)."""

import math
from pathlib import Path

from minflux.files.images import DataError
from minflux.tasks.data import CaptionFolder, image_files, image_tensor, probe_image


def own_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """An image's own aspect at about resolution² pixels, sides multiples of 16: a control that keeps its shape."""
    snap = lambda x: max(16, round(x / 16) * 16)  # noqa: E731
    aspect = w / h
    return snap(resolution * math.sqrt(aspect)), snap(resolution / math.sqrt(aspect))


class KontextFolder(CaptionFolder):
    """Image-editing pairs: root/a.png (the target) with its instruction root/a.txt, and root/control/a.png (the image
    the edit starts from), matched by file name without the extension; `control` names another folder of controls.
    The layout ai-toolkit reads. More references per target (FLUX.2, or FLUX.1 Kontext's axis0 = 2, 3, ...): the
    folders control2/, control3/, ... beside the first (its name with a number appended, without a gap: the slots
    control_path_1, _2, _3 of ai-toolkit's multi-reference datasets, in order), each with one image per target.

    Targets are sized as CaptionFolder sizes its images (one square, or aspect-ratio buckets). A control is resized
    to its target's size (control_size="target"), or keeps its own aspect at about resolution² pixels ("own": the
    sequence concatenation takes any size). A target without one of its controls, a control without its target, a
    control that cannot be read, is smaller than 16 px or (with "target") whose aspect differs from its target's by
    more than 1.5× is named in a DataError, or skipped and listed under on_error="skip"; two targets or two controls
    of one stem (a.png, a.jpg) are both, and the pair is left out. A control is read as its target is.

    Each sample: dict(image=[3, H, W], controls=[[3, H', W'], ...] one per folder, control=controls[0], in [-1, 1],
    caption=str).
    """

    MAX_ASPECT_CHANGE = 1.5

    def __init__(
        self,
        root,
        control=None,
        resolution: int = 512,
        default_caption: str | None = None,
        on_error: str = "skip",
        buckets: bool = False,
        control_size: str = "target",
    ):
        if control_size not in ("target", "own"):
            raise ValueError(f"control_size must be 'target' or 'own', got {control_size!r}")
        self.control_dir = Path(control) if control else Path(root) / "control"  # named by CaptionFolder's checks
        super().__init__(root, resolution, default_caption, on_error, buckets)
        self.control_dirs = reference_folders(self.control_dir)
        targets = {p.stem for p in image_files(self.root)}  # a target skipped above still has its controls
        found = []  # per folder: its images by stem
        for k, folder in enumerate(self.control_dirs):
            shares = lambda stem: f"the target {stem}.* in {self.root}"  # noqa: E731
            controls, ambiguous = self._by_stem(image_files(folder), shares)
            for stem in sorted(set(controls) - targets):
                self._reject(DataError(controls[stem], f"a control without its target: no {self.root}/{stem}.* image"))
            found.append((folder, controls, ambiguous))
        items, sizes, self.controls, self.control_sizes = [], [], [], []
        for path, size in zip(self.items, self.sizes):
            if any(path.stem in ambiguous for _, _, ambiguous in found):  # its two controls were named above
                continue
            try:
                paths, own = [], []
                for folder, controls, _ in found:
                    if path.stem not in controls:
                        raise DataError(path, f"a target without its control: no {folder}/{path.stem}.* image")
                    w, h = probe_image(controls[path.stem])
                    if control_size == "target":
                        self._check_aspect(controls[path.stem], (w, h), path, size)
                    paths.append(controls[path.stem])
                    own.append(size if control_size == "target" else own_size(w, h, resolution))
            except DataError as e:
                self._reject(e)
                continue
            items.append(path)
            sizes.append(size)
            self.controls.append(paths)
            self.control_sizes.append(tuple(own))
        self.items, self.sizes = items, sizes
        if not self.items:
            raise self._all_skipped()

    def _check_aspect(self, control: Path, control_size: tuple[int, int], target: Path, size: tuple[int, int]):
        (w, h) = control_size
        change = max(w / h, size[0] / size[1]) / min(w / h, size[0] / size[1])
        if change > self.MAX_ASPECT_CHANGE:
            raise DataError(
                control,
                f"is {w}×{h}, its target {target.name} is {size[0]}×{size[1]}: an aspect {change:.1f}× apart would "
                "be distorted; crop it, or keep its own size with --control-size own",
            )

    def _shared(self, stem: str) -> str:
        return f"the caption {stem}.txt and the control {stem}.* in {self.control_dir}"

    @property
    def n_references(self) -> int:
        return len(self.control_dirs)

    def group(self, i: int):
        """What the pairs of one batch share: the target's size and each control's."""
        return self.sizes[i], self.control_sizes[i]

    def load(self, i: int) -> dict:
        controls = [image_tensor(path, size) for path, size in zip(self.controls[i], self.control_sizes[i])]
        return super().load(i) | {"controls": controls, "control": controls[0]}  # [3, H', W'] each


def reference_folders(first: Path) -> list[Path]:
    """The folders of the references, in order: `first` (control/), then control2/, control3/, ... while they
    exist; DataError for a missing first folder, or a numbered folder after a gap (control3/ without control2/)."""
    if not first.is_dir():
        raise DataError(first, "no such folder: the controls, one per target image with its file name")
    folders, k = [first], 2
    while (folder := first.with_name(f"{first.name}{k}")).is_dir():
        folders.append(folder)
        k += 1
    if (gap := first.with_name(f"{first.name}{k + 1}")).is_dir():
        raise DataError(
            gap,
            f"a reference folder after a gap: {first.with_name(f'{first.name}{k}').name}/ is missing "
            f"(the references are {first.name}/, {first.name}2/, {first.name}3/, ... without a gap)",
        )
    return folders
