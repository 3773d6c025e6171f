"""What the scripts share: config dataclasses as flags and TOML, run folders, atomic writes, logs and pictures.

A config is a dataclass. Its fields are the script's flags, one to one (`batch_size` is `--batch-size`), and
the keys of a TOML file given with `--config` (flags given on the command line win over the file).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
import tomllib
import typing
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from minflux.weights import write_atomic

# --- configs: dataclass <-> flags <-> TOML -----------------------------------------------------------------


def _field_type(f: dataclasses.Field):
    """The plain type of a field: int, float, str, bool (Optional[X] → X)."""
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307 (our own annotations)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field, with the field's comment-free help: its type and default."""
    helps = getattr(cls, "HELP", {})
    for f in dataclasses.fields(cls):
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = dict(type=kind, metavar=kind.__name__.upper())
        if kind is bool:  # "--trace" alone means true; "--trace false" is also accepted
            flag = dict(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,  # None = not given, so the TOML file or the dataclass default applies
            help=f"{helps.get(f.name, '')} (default: {default})".strip(),
            **flag,
        )
    parser.add_argument("--config", type=Path, help="a TOML file setting the same fields; flags win over it")


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass from defaults, then the TOML file, then the flags given. Unknown TOML keys are an error."""
    values = {}
    if getattr(args, "config", None):
        values.update(read_toml(args.config, cls))
    for f in dataclasses.fields(cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def read_toml(path, cls) -> dict:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config: {e}") from None
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    return data


def to_toml(config) -> str:
    """A flat dataclass as TOML (None values are left out: absent means default)."""
    lines = []
    for key, value in dataclasses.asdict(config).items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")  # JSON strings, numbers, bools and lists are valid TOML
    return "\n".join(lines) + "\n"


# --- atomic files ----------------------------------------------------------------------------------------


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def save_png(image: Image.Image, path, text: dict[str, str] | None = None) -> Path:
    """A PNG written atomically, with `text` in its tEXt chunks (settings that reproduce the image)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


# --- logs and progress -----------------------------------------------------------------------------------


class Progress:
    """One line, rewritten in place on a terminal: step, rate, ETA, and whatever the caller adds."""

    def __init__(self, total: int, label: str = "", stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stdout
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, step: int, **fields) -> None:
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"{self.label}{step}/{self.total}", f"{rate:.2f} it/s", f"eta {format_seconds(eta)}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + " " * 4 + ("\n" if step >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# --- pictures ------------------------------------------------------------------------------------------------


def to_pil(x: torch.Tensor) -> Image.Image:
    """An image tensor [3, H, W] in [-1, 1] → a PIL image."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


def image_grid(rows: list[list[torch.Tensor]], captions: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Rows of equally sized images [3, H, W] in [-1, 1] as one picture, with an optional caption per column."""
    h, w = rows[0][0].shape[-2:]
    top = 14 if captions else 0
    grid = Image.new("RGB", (len(rows[0]) * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, caption in enumerate(captions or []):
        draw.text((pad + c * (w + pad), 1), caption, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(to_pil(img), (pad + c * (w + pad), top + pad + r * (h + pad)))
    return grid


def line_plot(series: dict[str, list[float]], title: str, size=(640, 360), log_y: bool = True) -> Image.Image:
    """A small line chart (e.g. the loss curve), drawn with pillow alone."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, size[0] - 10, 25, size[1] - 30
    values = [v for ys in series.values() for v in ys if math.isfinite(v) and (v > 0 or not log_y)]
    if not values:
        draw.text((left, top), f"{title}: no data", fill="black")
        return img
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    hi = hi if hi > lo else lo + 1
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 5), title, fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        v = lo + frac * (hi - lo)
        draw.text((2, y - 6), f"{10**v:.3g}" if log_y else f"{v:.3g}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for (name, ys), colour in zip(series.items(), colours):
        pts = [
            (left + i / max(len(ys) - 1, 1) * (right - left), bottom - (f(v) - lo) / (hi - lo) * (bottom - top))
            for i, v in enumerate(ys)
            if math.isfinite(v) and (v > 0 or not log_y)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        draw.text((right - 150, top + 5 + 12 * list(series).index(name)), name, fill=colour)
    draw.text((left, bottom + 8), "step", fill="black")
    return img
