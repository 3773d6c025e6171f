"""Images in and out: reading pictures as tensors, PNGs with their settings, grids and plots for the run folders.

    read_image, image_to_tensor, mask_to_tensor    a file (or a PIL image) → [1, 3, H, W] in [-1, 1], a 0/1 mask
    deep_to_float, to_8bit                         16-bit and float images scaled by their depth, not clipped
    to_pil                                         [3, H, W] in [-1, 1] → a PIL image
    save_png, save_image, read_settings            a PNG written atomically, with settings in its text chunks
    save_new                                       a PNG under a new name when the one asked for is taken
    checked_settings                               the settings read back, each checked against what minflux writes
    shown                                          a setting's value as JSON, cut short for a message
    settings_text, a1111_parameters                what the text chunks of a generated image hold
    image_grid, line_plot                          the pictures of a run folder (samples.png, loss.png)

A file that cannot be used raises DataError, which names it and says what was expected.

A generated image carries its settings in three PNG text chunks, each for its readers:

    parameters   AUTOMATIC1111's "infotext", which A1111, Forge, CivitAI and ComfyUI's drop-to-load read:
                     the prompt (A1111's <lora:name:scale> tags added)
                     Negative prompt: ...
                     Steps: 28, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7, Size: 1024x768, ...
    minflux      every setting that determines the pixels, as JSON (what `sample.py --from` reads back)
    Software     "minflux" (the PNG standard's keyword)

None of them is named "prompt" or "workflow": ComfyUI parses those as its own JSON graphs.
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from minflux.files.weights import write_atomic


class DataError(ValueError):
    """A data folder or file that cannot be used. `path` is the file; the message says what was expected."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why


def read_image(source, mode: str = "RGB") -> Image.Image:
    """A PIL image from a path (or a PIL image as is), converted to `mode`; an unreadable file names itself."""
    if isinstance(source, Image.Image):
        return to_8bit(source).convert(mode)
    try:
        with Image.open(source) as im:
            return to_8bit(im).convert(mode)
    except FileNotFoundError as e:
        raise DataError(source, "no such file") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(source, f"cannot be read as an image ({type(e).__name__}: {e})") from e


def deep_to_float(im: Image.Image) -> Image.Image:
    """An image of more than 8 bits a channel as a float image (mode "F") on the 8-bit scale [0, 255], unrounded;
    other images as they are. convert("RGB") would clip such values at 255 (a 16-bit infrared frame turns white).

        16-bit grey ("I;16", the usual infrared format)   scaled by its bit depth: 65535 → 255
        32-bit integer ("I")                              the same when its values fit 16 bits, else its min–max
        float ("F", a float TIFF)                         values in [0, 1] as they are, else stretched from the
                                                          image's own min–max (a float file states no range)
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)  # [H, W]
        finite = a[np.isfinite(a)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
            a = a / 65535
        elif not (im.mode == "F" and lo >= 0 and hi <= 1):
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray((np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0) * 255).astype(np.float32))
    return im


def to_8bit(im: Image.Image) -> Image.Image:
    """deep_to_float rounded to an 8-bit grey image ("L"); 8-bit images as they are. (PIL's own float → 8-bit
    conversion truncates.)"""
    im = deep_to_float(im)
    return Image.fromarray(np.round(np.asarray(im)).astype(np.uint8)) if im.mode == "F" else im


def image_to_tensor(image: Image.Image) -> Tensor:
    """A PIL RGB image → [1, 3, H, W] in [-1, 1], the range the VAE expects."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, 3] in [0, 1]
    return (x.permute(2, 0, 1)[None] * 2 - 1).contiguous()  # [1, 3, H, W]


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """A PIL mask → [1, 1, H, W] of 0 and 1: white (≥ 50 %) is where the model paints."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return (m >= 0.5).float()[None, None]  # [1, 1, H, W]


def save_png(image: Image.Image, path, text: dict[str, str] | None = None, exclusive: bool = False) -> Path:
    """A PNG written atomically, with `text` in its tEXt chunks (settings that reproduce the image); with
    `exclusive`, FileExistsError rather than replacing a file already there (weights.write_atomic)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), exclusive=exclusive)


def save_new(image: Image.Image, path, text: dict[str, str] | None = None) -> Path:
    """save_png to `path`, or when it is taken to its stem + -2, -3, ...: each name taken exclusively, so an earlier
    file is never replaced and two processes never take the same name."""
    path = name = Path(path)
    for n in itertools.count(2):
        try:
            return save_png(image, name, text=text, exclusive=True)
        except FileExistsError:
            name = path.with_name(f"{path.stem}-{n}{path.suffix}")


def save_image(image: Image.Image, path, exclusive: bool = False) -> Path:
    """save_png with the settings a pipeline put in `image.info` as the text chunks."""
    return save_png(image, path, text={k: v for k, v in image.info.items() if isinstance(v, str)}, exclusive=exclusive)


def settings_text(settings: dict, parameters: str) -> dict[str, str]:
    """The text chunks of a generated image (the module docstring): `settings` as JSON, `parameters` as is."""
    return {"parameters": parameters, "minflux": json.dumps(settings), "Software": "minflux"}


def read_settings(source) -> dict:
    """The settings a minflux image carries (a PNG's path, or a PIL image with them in .info): its "minflux" JSON
    chunk; from the PNG of an earlier minflux, its one chunk per setting. {} when it holds none; DataError when the
    chunk is not JSON or not an object (what each setting holds is for its reader to check: sample.apply_settings)."""
    name = (getattr(source, "filename", "") or "the image") if isinstance(source, Image.Image) else source
    if isinstance(source, Image.Image):
        text = dict(getattr(source, "text", None) or source.info)
    else:
        try:
            with Image.open(source) as im:
                text = dict(getattr(im, "text", {}))
        except FileNotFoundError as e:
            raise DataError(source, "no such file") from e
        except Exception as e:
            raise DataError(source, f"cannot be read as a PNG ({type(e).__name__}: {e})") from e
    if "minflux" in text:
        try:
            settings = json.loads(text["minflux"])
        except (ValueError, RecursionError) as e:
            raise DataError(
                name,
                f'its "minflux" text chunk is not valid JSON ({e}); expected the JSON object of '
                "settings minflux writes",
            ) from None
        if not isinstance(settings, dict):
            raise DataError(name, f'its "minflux" text chunk holds {shown(settings)}; expected a JSON object')
        return settings
    if text.get("software") != "minflux":
        return {}
    loras = [spec.rpartition(":") for spec in text.get("loras", "").split(", ") if spec]
    if not all(colon and is_number(scale) for _, colon, scale in loras):
        raise DataError(name, f'its "loras" text chunk is {shown(text["loras"])}; expected PATH:SCALE, ", " between')
    files = {
        k: {"path": text[k]} if text[k] != "PIL image" else {"in_memory": "Image"}
        for k in ("image", "mask")
        if k in text
    }
    return {**text, **files, "loras": [{"path": path, "scale": float(scale)} for path, _, scale in loras]}


# The settings a minflux image holds, and their types (what `checked_settings` accepts)
SETTING_TYPES = {
    "prompt": str, "negative_prompt": str, "seed": int, "steps": int, "width": int, "height": int, "guidance": float,
    "true_cfg_scale": float, "t5_max_length": int, "dtype": str, "variant": str, "device": str,
}  # fmt: skip
PARTS = ("flux", "ae", "clip", "t5", "text_encoder")  # the weights it was made with: {part: path}
EXPECTED = {int: "an integer", float: "a number", str: "a string"}


def checked_settings(source) -> dict:
    """read_settings, every setting checked against what minflux writes: the SETTING_TYPES values typed (an earlier
    minflux's one chunk per setting holds strings; "none" means absent), "weights" {part: path}, "image" and "mask"
    {"path", "sha256"} (or {"in_memory"}; FLUX.2's "image" a list of those), "loras" a list of those with a numeric
    "scale". DataError naming the image and the setting otherwise, or when it holds no settings."""
    s = read_settings(source)
    if not s:
        raise DataError(source, 'holds no minflux settings (no "minflux" PNG text chunk)')
    older = s.get("software") == "minflux"  # an earlier minflux's one text chunk per setting: each value a string

    def bad(field: str, value, expected: str) -> DataError:
        where = "its text chunks hold" if older else 'its "minflux" text chunk holds'
        return DataError(source, f"{where} {field}: {shown(value)}; expected {expected}")

    def typed(key: str, kind: type):
        value = s[key]
        if older and isinstance(value, str) and kind is not str:
            try:
                value = kind(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise bad(f'"{key}"', value, EXPECTED[kind])
        return kind(value)

    def file(field: str, record, lora: bool = False) -> dict:
        ok = isinstance(record, dict) and ("in_memory" in record or isinstance(record.get("path"), str))
        ok = ok and isinstance(record.get("sha256", ""), str)
        if lora:
            ok = ok and isinstance(record.get("scale"), (int, float)) and not isinstance(record["scale"], bool)
        if not ok:
            expected = 'an object with the file\'s "path" (a string)' + (' and a numeric "scale"' if lora else "")
            raise bad(field, record, expected)
        return record

    out = {key: typed(key, kind) for key, kind in SETTING_TYPES.items() if s.get(key) not in (None, "none")}
    weights = s.get("weights", {})
    if not (isinstance(weights, dict) and all(k in PARTS and isinstance(v, str) for k, v in weights.items())):
        raise bad('"weights"', weights, f"an object of part → path, the parts {', '.join(PARTS)}")
    out["weights"] = weights
    for part in (p for p in ("image", "mask") if s.get(p) is not None):
        if part == "image" and isinstance(s[part], list):  # FLUX.2's references
            out[part] = [file(f'"image"[{i}]', record) for i, record in enumerate(s[part])]
        else:
            out[part] = file(f'"{part}"', s[part])
    loras = s.get("loras", [])
    if not isinstance(loras, list):
        raise bad('"loras"', loras, 'a list of LoRAs, each an object with a "path" and a "scale"')
    out["loras"] = [file(f'"loras"[{i}]', lora, lora=True) for i, lora in enumerate(loras)]
    return out


def shown(value, limit: int = 60) -> str:
    """A setting's value as JSON, cut short for a message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def a1111_parameters(prompt: str, negative: str | None, fields: dict) -> str:
    """AUTOMATIC1111's infotext: the prompt, "Negative prompt: ..." (when there is one), then one line of
    "Key: value" pairs, a value holding a comma, colon or newline written as a JSON string (A1111's `quote`).
    Fields whose value is None are left out."""

    def quote(value) -> str:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


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
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for (name, ys), colour in zip(series.items(), itertools.cycle(colours)):
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
