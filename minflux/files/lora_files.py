"""LoRA files: every common layout read into minflux's LoRA layers, and written in the ones other tools read.

LoRA files differ only in how they name the layers and how they cut FLUX's fused layers into pieces:

    minflux    double_blocks.0.img_attn.qkv.lora_down.weight / .lora_up.weight / .alpha      official names
    kohya      lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / ... / .alpha        sd-scripts, ComfyUI
    diffusers  transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight      PEFT: q, k, v split
    BFL        (diffusion_model.)double_blocks.0.img_attn.qkv.lora_A.weight / .lora_B.weight  official names, no alpha
               (/ .lora_B.bias)                        flux/modules/lora.py; ai-toolkit's FLUX.2 LoRAs ("non-diffusers")
    XLabs      double_blocks.0.processor.qkv_lora1.down.weight / .up.weight                   lora1 img, lora2 txt

Both generations: FLUX.2's official names are FLUX.1's but for its three shared modulations (double_stream_
modulation_img.lin, ...); diffusers' Flux2Transformer2DModel names its layers otherwise than FluxTransformer2DModel
(ff.linear_in; the single blocks' fused attn.to_qkv_mlp_proj, not split). `layer_names` lists every such name for each
linear layer of a model (the tables are in keys.py for FLUX.1, load_flux2.py for FLUX.2), so reading any of these
files is one dictionary lookup per key. XLabs wrote FLUX.1 LoRAs only. The alpha (the update is alpha / rank · up @
down) is a tensor of the file in kohya's and minflux's layouts; a diffusers / PEFT file keeps it in its PEFT
LoraConfig instead, in the file's metadata or in adapter_config.json beside it (`peft_config`); BFL and XLabs files
have none (factor 1).

References: kohya-ss/sd-scripts (networks/lora_flux.py: how split q/k/v LoRAs are saved); black-forest-labs/flux
(src/flux/modules/lora.py); XLabs-AI/x-flux (src/flux/modules/layers.py); diffusers (loaders/
lora_conversion_utils.py: _convert_kohya_flux_lora_to_diffusers, _convert_xlabs_flux_lora_to_diffusers, and for
FLUX.2 _convert_kohya_flux2_lora_to_diffusers, _convert_non_diffusers_flux2_lora_to_diffusers), whose conversions
the tests use as the oracle.
"""

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from minflux.files.keys import LORA_PREFIXES, LORA_SUFFIXES, SWAPPED_HALVES, XLABS, diffusers_key_pairs, swap_halves
from minflux.files import warn_caller
from minflux.files.load_flux2 import FLUX2_SWAPPED_HALVES, flux2_key_pairs
from minflux.files.weights import WeightsError, read_metadata, read_state_dict, save_atomic, whole
from minflux.lora import LoRALinear, LoRAWeights, apply_lora, linear_layers, lora_layers, model_generation

# --- the names other tools give the layers ------------------------------------------------------------------


@dataclass
class Target:
    """Where a layer name in a LoRA file points: a linear layer of the model, and which of its output rows."""

    module: str  # "double_blocks.0.img_attn.qkv"
    rows: slice | None = None  # q, k, v or mlp inside a fused layer; None = all rows
    swap_halves: bool = False  # diffusers' norm_out.linear is (scale, shift), the official layer (shift, scale)


def _blocks(layers, kind: str) -> int:
    return len({name.split(".")[1] for name in layers if name.startswith(kind + ".")})


def diffusers_names(model: nn.Module) -> dict[str, Target]:
    """diffusers module name -> Target, from the key table of the model's generation (keys.py: FLUX.1's
    FluxTransformer2DModel; load_flux2.py: FLUX.2's Flux2Transformer2DModel). to_q, to_k, to_v (and FLUX.1's single
    blocks' proj_mlp) are rows of the official fused qkv / linear1: [h | h | h] or [h | h | h | mlp]; FLUX.2's
    linear1 is one layer in both (attn.to_qkv_mlp_proj)."""
    layers = linear_layers(model)
    depths = _blocks(layers, "double_blocks"), _blocks(layers, "single_blocks")
    flux2 = model_generation(model) == "FLUX.2"
    pairs = flux2_key_pairs(*depths) if flux2 else diffusers_key_pairs(*depths)
    swapped = FLUX2_SWAPPED_HALVES if flux2 else SWAPPED_HALVES
    names = {}
    for ours, theirs in pairs:
        module = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or module not in layers:
            continue
        layer = layers[module]
        h = layer.in_features  # the hidden size, for qkv and linear1 alike
        sizes = ([h] * 3 + [layer.out_features - 3 * h])[: len(theirs)]
        start = 0
        for name, size in zip(theirs, sizes):
            rows = slice(start, start + size) if len(theirs) > 1 else None
            names[name.removesuffix(".weight")] = Target(module, rows, swap_halves=ours in swapped)
            start += size
    return names


def layer_names(model: nn.Module) -> dict[str, Target]:
    """Every name a LoRA file may give a linear layer of `model`, mapped to that layer (and rows of it)."""
    names, xlabs = {}, XLABS if model_generation(model) != "FLUX.2" else {}
    for name, layer in linear_layers(model).items():
        names[name] = Target(name)  # minflux, BFL, ComfyUI: the official name
        names["lora_unet_" + name.replace(".", "_")] = Target(name)  # kohya sd-scripts
        kind, _, rest = name.partition(".")
        index, _, rest = rest.partition(".")
        if rest in xlabs.get(kind, {}):
            rows = slice(0, 3 * layer.in_features) if rest == "linear1" else None
            names[f"{kind}.{index}.processor.{xlabs[kind][rest]}"] = Target(name, rows)
    for name, target in diffusers_names(model).items():
        names[name] = target  # diffusers / PEFT
        names["lora_transformer_" + name.replace(".", "_")] = target  # diffusers names written kohya-style
        if name.startswith("transformer_blocks."):  # "transformer." cut off with "tran": some FLUX.2 exports, which
            names[name.removeprefix("tran")] = target  # diffusers reads as transformer_blocks (sformer_blocks.0...)
    return names


def _split_key(key: str, names: dict) -> tuple[str, str] | None:
    """ "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" -> ("transformer_blocks.0.attn.to_q", "down")."""
    for suffix, part in LORA_SUFFIXES.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            for prefix in LORA_PREFIXES:
                if name.startswith(prefix) and name[len(prefix) :] in names:
                    return name[len(prefix) :], part
    return None


# --- the alpha of a PEFT file ---------------------------------------------------------------------------------


def peft_config(path) -> dict | None:
    """The PEFT LoraConfig (as a dict) a diffusers / PEFT LoRA file comes with, or None.

    diffusers keeps it in the safetensors metadata under "lora_adapter_metadata" (JSON; `save_lora_weights`
    prefixes its keys with "transformer.", a model's `save_lora_adapter` does not); PEFT's `save_pretrained` writes
    adapter_config.json beside adapter_model.safetensors. Without one, PEFT's rule holds: alpha = rank.
    """
    path = Path(path)
    raw = read_metadata(path).get("lora_adapter_metadata")
    sidecar = (path if path.is_dir() else path.parent) / "adapter_config.json"
    if raw:
        config = json.loads(raw)  # a pipeline's file: the transformer's keys under "transformer."; a model's: its own
        ours = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
        config = ours or config
    elif sidecar.is_file():
        config = json.loads(sidecar.read_text(encoding="utf-8"))
    else:
        return None
    return config if "lora_alpha" in config or "r" in config else None


def peft_alpha(config: dict, name: str, rank: int) -> float:
    """minflux's alpha (factor alpha / rank) for the layer a PEFT config calls `name` (transformer_blocks.0.attn.to_q):
    its alpha_pattern entry (matched on the name's end, as PEFT matches), else lora_alpha (PEFT's default 8).
    rsLoRA (use_rslora) scales by lora_alpha / √rank, which is alpha = lora_alpha · √rank here."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


# --- reading --------------------------------------------------------------------------------------------------


def _fuse(pieces: list[tuple[slice, LoRAWeights]], out_features: int) -> LoRAWeights:
    """One LoRA for a layer from the pieces a file stores for row ranges of it (q, k, v, mlp of a fused layer).

    Pieces that share one down matrix (as diffusers' kohya converter and our diffusers files have it) keep rank r:
    their ups are stacked by rows. Otherwise the downs are stacked and the ups placed block-diagonally, each piece's
    alpha / rank folded in; exact, with rank r_q + r_k + r_v:

        [up_q        ]   [down_q]
        [    up_k    ] @ [down_k]  =  up_q @ down_q on q's rows, up_k @ down_k on k's rows, ...
        [        up_v]   [down_v]
    """
    rows, first = pieces[0]
    if len(pieces) == 1 and rows == slice(0, out_features):
        return first
    shared = all(torch.equal(p.down, first.down) and p.alpha == first.alpha for _, p in pieces)
    rank = first.down.shape[0] if shared else sum(p.down.shape[0] for _, p in pieces)
    up = torch.zeros(out_features, rank)  # [out, rank]
    bias = None if all(p.bias is None for _, p in pieces) else torch.zeros(out_features)
    col = 0
    for rows, p in pieces:
        r = p.down.shape[0]
        cols, f = (slice(0, r), 1.0) if shared else (slice(col, col + r), p.alpha / r)
        up[rows, cols] += f * p.up
        if p.bias is not None:
            bias[rows] += f * p.bias
        col += r
    down = first.down if shared else torch.cat([p.down for _, p in pieces])  # [rank, in]
    return LoRAWeights(down, up, first.alpha if shared else rank, bias)


def in_channels(model: nn.Module) -> int | None:
    """The transformer's input channels (64: dev, schnell, Kontext; 384: Fill), or None for another module."""
    params = getattr(model, "params", None) or getattr(getattr(model, "flux", None), "params", None)
    return getattr(params, "in_channels", None)


def check_in_channels(path, model: nn.Module) -> None:
    """A LoRA minflux wrote names the input channels of the transformer it was trained on: a Kontext or dev LoRA
    (64) has the shapes of a Fill model's blocks (384 only at img_in), so it would load there without a word."""
    trained_on, ours = read_metadata(path).get("minflux.in_channels"), in_channels(model)
    if trained_on is None or ours is None:
        return
    if not trained_on.isdigit():
        raise WeightsError(f"{path}: metadata minflux.in_channels = {trained_on!r}: expected a number of channels")
    if int(trained_on) == ours:
        return
    kinds = {384: "FLUX.1-Fill", 64: "dev, schnell or Kontext", 128: "FLUX.2"}
    raise WeightsError(
        f"{path}: a LoRA trained on a transformer with {trained_on} input channels "
        f"({kinds.get(int(trained_on), 'custom')}); this model has {ours} ({kinds.get(ours, 'custom')}): it belongs "
        "to another model, although its block layers have the same shapes"
    )


# --- which generation a LoRA was trained for -------------------------------------------------------------------

# Layer names only one generation's transformer has, in any layout once dots are underscores (kohya's names are the
# official ones with underscores; diffusers' differ between Flux- and Flux2Transformer2DModel).
GENERATION_NAMES = {
    "FLUX.2": (r"(double|single)_stream_modulation", r"to_qkv_mlp_proj", r"ff(_context)?_linear_(in|out)",
               r"time_guidance_embed"),
    "FLUX.1": (r"(img|txt)_mod_lin", r"single_blocks_\d+_modulation_lin", r"vector_in", r"ff(_context)?_net_[02]",
               r"proj_mlp", r"norm1(_context)?_linear", r"time_text_embed"),
}  # fmt: skip
# Layers both generations name alike, told apart by their widths: max(out, in) / min(out, in) of the LoRA's
# up · down. FLUX.1's MLPs are 4·D wide (GELU), FLUX.2's 3·D (SwiGLU, whose first layer makes 2 · 3·D).
GENERATION_WIDTHS = {
    r"single_blocks_\d+_linear1": {7: "FLUX.1", 9: "FLUX.2"},  # q, k, v + MLP: 3 + 4 or 3 + 2·3
    r"single_blocks_\d+_linear2": {5: "FLUX.1", 4: "FLUX.2"},  # attention + MLP back to D
    r"(img|txt)_mlp_0": {4: "FLUX.1", 6: "FLUX.2"},
    r"(img|txt)_mlp_2": {4: "FLUX.1", 3: "FLUX.2"},
}


def lora_generation(shapes: dict[str, list[int]]) -> tuple[str, str] | None:
    """("FLUX.1" or "FLUX.2", the key that tells) for a LoRA file's {key: shape}; None when nothing tells."""
    pairs = {}  # layer name -> {"down": shape, "up": shape}
    for key, shape in shapes.items():
        flat = key.replace(".", "_")
        for generation, patterns in GENERATION_NAMES.items():
            if any(re.search(p, flat) for p in patterns):
                return generation, key
        for suffix, part in LORA_SUFFIXES.items():
            if key.endswith(suffix) and part in ("down", "up") and len(shape) == 2:
                pairs.setdefault(key[: -len(suffix)], {})[part] = (key, shape)
    for name, parts in pairs.items():
        if len(parts) == 2:
            (_, (rows, _)), (_, (_, cols)) = parts["up"], parts["down"]  # up [out, rank], down [rank, in]
            for pattern, widths in GENERATION_WIDTHS.items():
                if re.search(pattern, name.replace(".", "_")) and min(rows, cols) > 0:
                    ratio = max(rows, cols) / min(rows, cols)
                    if ratio in widths:
                        return widths[ratio], f"{name}, which maps {cols} → {rows} channels ({ratio:g}×)"
    return None


def check_generation(source, shapes: dict[str, list[int]], ours: str | None, what="this transformer") -> None:
    """A LoRA (its {key: shape}) for the other generation than `ours` ("FLUX.1", "FLUX.2"; None: no check) is
    refused, naming the key that shows it; `what` names the transformer in the message."""
    found = lora_generation(shapes) if ours is not None else None
    if found is not None and found[0] != ours:
        raise WeightsError(f"{source}: a {found[0]} LoRA (shown by {found[1]}); {what} is {ours}")


def read_lora(path, model: nn.Module) -> dict[str, LoRAWeights]:
    """A LoRA file (or state dict) of any supported format, as {official layer name of `model`: LoRAWeights}.

    The model is used only for its layer names and shapes (a model on the meta device will do). Keys that name
    no layer are listed in a warning; shapes that do not fit the layer raise WeightsError naming the file and key,
    and so does a file minflux wrote for a transformer of other input channels (check_in_channels).
    """
    source = "LoRA state dict" if isinstance(path, dict) else path
    sd = dict(path) if isinstance(path, dict) else read_state_dict(path)
    check_generation(source, {k: list(t.shape) for k, t in sd.items()}, model_generation(model))
    if not isinstance(path, dict):
        check_in_channels(path, model)
    config = None if isinstance(path, dict) else peft_config(path)  # where a diffusers / PEFT file keeps its alpha
    names, layers = layer_names(model), linear_layers(model)

    groups, unmatched = {}, []  # {layer name in the file: {"down": (key, tensor), "up": ..., "alpha": ...}}
    for key, t in sd.items():
        found = _split_key(key, names)
        if found is None:
            unmatched.append(key)
        else:
            groups.setdefault(found[0], {})[found[1]] = (key, t)
    if not groups:
        raise WeightsError(
            f"{source}: no key names a linear layer of this model: a LoRA for another architecture? "
            f"(first keys: {', '.join(list(sd)[:3]) or 'none'})"
        )

    pieces = {}  # official layer name -> [(rows, LoRAWeights)]
    for name, parts in groups.items():
        if "down" not in parts or "up" not in parts:  # an alpha or a bias alone: nothing to apply
            unmatched += [key for key, _ in parts.values()]
            continue
        target = names[name]
        layer = layers[target.module]
        rows = target.rows or slice(0, layer.out_features)
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        if down.ndim != 2 or down.shape[1] != layer.in_features:
            raise WeightsError(
                f"{source}: key {down_key!r} has shape {list(down.shape)}; layer {target.module} takes "
                f"{layer.in_features} inputs, so [rank, {layer.in_features}] was expected (a LoRA for another model?)"
            )
        if up.ndim != 2 or tuple(up.shape) != (rows.stop - rows.start, down.shape[0]):
            raise WeightsError(
                f"{source}: key {up_key!r} has shape {list(up.shape)}; layer {target.module} expects "
                f"[{rows.stop - rows.start}, {down.shape[0]}] (a LoRA for another model?)"
            )
        if down.shape[0] == 0:
            raise WeightsError(f"{source}: key {down_key!r} has rank 0 (shape {list(down.shape)}); a LoRA has rank ≥ 1")
        alpha_key, a = parts.get("alpha", (None, torch.tensor(1.0)))
        if a.numel() != 1 or not a.float().isfinite().all():
            raise WeightsError(
                f"{source}: key {alpha_key!r} must be one finite number, found "
                f"{a.flatten()[:4].tolist()} of shape {list(a.shape)}"
            )
        rank = down.shape[0]
        if "alpha" in parts:  # kohya, minflux
            alpha = parts["alpha"][1].item()
        elif config is not None and down_key.endswith(".lora_A.weight"):  # diffusers / PEFT, with its LoraConfig
            alpha = peft_alpha(config, name, rank)
        else:  # no alpha anywhere: factor 1 (BFL, XLabs, PEFT without a config)
            alpha = rank
        bias = parts["bias"][1].float() if "bias" in parts else None
        if bias is not None and tuple(bias.shape) != (rows.stop - rows.start,):
            raise WeightsError(
                f"{source}: key {parts['bias'][0]!r} has shape {list(bias.shape)}, expected "
                f"[{rows.stop - rows.start}] for layer {target.module}"
            )
        up = up.float()
        if target.swap_halves:
            up, bias = swap_halves(up), None if bias is None else swap_halves(bias)
        pieces.setdefault(target.module, []).append((rows, LoRAWeights(down.float(), up, alpha, bias)))

    if unmatched:
        listed = ", ".join(unmatched[:20]) + (f", ... ({len(unmatched) - 20} more)" if len(unmatched) > 20 else "")
        warn_caller(
            f"{source}: {len(unmatched)} key(s) not loaded (no linear layer of this model, or no down/up "
            f"pair): {listed}"
        )
    return {module: _fuse(p, layers[module].out_features) for module, p in pieces.items()}


def load_lora(model: nn.Module, path, scale: float = 1.0) -> list[str]:
    """Apply a LoRA file (any format of the module docstring, told apart by its key names); returns the layers.

    Several LoRAs load one after another, each with its own `scale` (minflux.lora.apply_lora stacks them).
    After loading, lora_parameters(model) gives the parameters to train, to resume from the file.
    """
    return apply_lora(model, read_lora(path, model), scale)


# --- writing --------------------------------------------------------------------------------------------------


def _adapter_state(layer: LoRALinear) -> dict[str, Tensor]:
    """lora_down.weight, lora_up.weight (lora_up.bias), alpha: the layer's state without the base weights."""
    return {k: whole(v) for k, v in layer.state_dict().items() if k not in ("weight", "bias")}


# The layers diffusers 0.42's converters read right from a kohya or BFL file (fnmatch over official names), and why
# they read no others: save_lora names those in a warning (ComfyUI and minflux read every layer of either layout).
BLOCKS = ("double_blocks.*", "single_blocks.*")
DIFFUSERS_READS = {
    ("kohya", "FLUX.1"): (BLOCKS, "they lie outside the double and single blocks, its converter names those without "
                                  '"transformer." and its loader drops them without a word'),
    ("kohya", "FLUX.2"): ((*BLOCKS, "img_in", "txt_in", "time_in.*", "final_layer.linear"),
                          "its FLUX.2 kohya converter names none of the shared modulations, guidance_in and the "
                          "final adaLN"),
    ("bfl", "FLUX.1"): ((), "it reads a FLUX.1 file in this layout only as a BFL Control LoRA"),
    ("bfl", "FLUX.2"): ((*BLOCKS, "img_in", "txt_in", "time_in.*", "guidance_in.*", "*stream_modulation*.lin",
                         "final_layer.linear"),
                        "its converter keeps the final adaLN's halves in BFL's order, (shift, scale), where its "
                        "norm_out.linear is (scale, shift)"),
}  # fmt: skip
PEFT_PREFIXES = {"diffusers": "transformer.", "bfl": "diffusion_model."}  # where diffusers looks for each layout


def _peft_tensors(layers: dict[str, LoRALinear], prefix: str, names: dict[str, Target]) -> dict[str, Tensor]:
    """lora_A / lora_B (/ lora_B.bias) keys under `prefix`, each layer under the names `names` gives it ({name in the
    file: Target}), else under its official name: diffusers / PEFT files (diffusers' names) and BFL's (official
    names). Neither holds an alpha (PEFT's readers take alpha = rank), so alpha / rank is folded into lora_B. A fused
    layer is split as diffusers splits it: every piece shares lora_A = down and takes its rows of up as lora_B."""
    pieces = {}  # official layer -> [(name in the file, Target)]
    for name, target in names.items():
        pieces.setdefault(target.module, []).append((name, target))
    tensors = {}
    for module, layer in layers.items():
        f = layer.alpha.item() / layer.rank
        up = f * whole(layer.lora_up.weight.detach())  # [out, r]
        bias = None if layer.lora_up.bias is None else f * whole(layer.lora_up.bias.detach())
        down = whole(layer.lora_down.weight.detach())  # [r, in]
        for name, target in pieces.get(module, [(module, Target(module))]):  # no other name: keep ours
            rows = target.rows or slice(None)
            b, b_bias = up[rows], None if bias is None else bias[rows]
            if target.swap_halves:
                b, b_bias = swap_halves(b), None if b_bias is None else swap_halves(b_bias)
            tensors[f"{prefix}{name}.lora_A.weight"] = down.clone()  # [r, in]
            tensors[f"{prefix}{name}.lora_B.weight"] = b.clone()  # [rows, r]; safetensors wants no shared memory
            if b_bias is not None:
                tensors[f"{prefix}{name}.lora_B.bias"] = b_bias.clone()
    return tensors


def save_lora(model: nn.Module, path, format: str = "kohya") -> Path:
    """Write the model's LoRA layers to a .safetensors file, atomically; the metadata names format, rank, alpha.

    format: "kohya" (lora_unet_…, as sd-scripts and musubi-tuner write FLUX LoRAs: ComfyUI, diffusers'
    load_lora_weights and minflux read it), "diffusers" (PEFT names under transformer., q/k/v split, alpha folded
    into lora_B, so any PEFT reader gets it right without a config), "bfl" (official names under diffusion_model.,
    .lora_A / .lora_B, alpha folded in: ComfyUI, and for FLUX.2 diffusers, read it) or "minflux" (official names,
    .lora_down / .lora_up / .alpha; it and bfl keep a LoRA bias). A FLUX.1 or FLUX.2 model alike; the
    layers diffusers does not read from a kohya or bfl file are named in a warning (DIFFUSERS_READS). The user's
    `scale` is not saved: a file holds the LoRA as trained.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_lora: the model has no LoRA layers (call inject_lora or load_lora first)")
    if format == "minflux":
        tensors = {f"{name}.{k}": v for name, layer in layers.items() for k, v in _adapter_state(layer).items()}
    elif format == "kohya":
        with_bias = [name for name, layer in layers.items() if layer.lora_up.bias is not None]
        if with_bias:
            raise WeightsError(f"{path}: kohya files hold no LoRA bias, but {with_bias[0]} has one; save as minflux")
        tensors = {
            f"lora_unet_{name.replace('.', '_')}.{k}": v
            for name, layer in layers.items()
            for k, v in _adapter_state(layer).items()
        }
    elif format in PEFT_PREFIXES:
        tensors = _peft_tensors(layers, PEFT_PREFIXES[format], diffusers_names(model) if format == "diffusers" else {})
    else:
        raise ValueError(f"save_lora: unknown format {format!r}; use 'kohya', 'diffusers', 'bfl' or 'minflux'")
    read, why = DIFFUSERS_READS.get((format, model_generation(model)), (["*"], ""))
    unread = [name for name in layers if not any(fnmatch.fnmatchcase(name, p) for p in read)]
    if unread:
        warn_caller(
            f"{path}: diffusers 0.42 does not load {len(unread)} LoRA layer(s) of this {format} file right "
            f"({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}): {why}. ComfyUI and minflux read them; "
            "save in the diffusers format for diffusers"
        )
    metadata = {
        "minflux.lora_format": format,
        "minflux.lora_rank": ", ".join(str(r) for r in sorted({layer.rank for layer in layers.values()})),
        "minflux.lora_alpha": ", ".join(f"{a:g}" for a in sorted({layer.alpha.item() for layer in layers.values()})),
    }
    if in_channels(model) is not None:  # what read_lora checks the model against (check_in_channels)
        metadata["minflux.in_channels"] = str(in_channels(model))
    return save_atomic(tensors, path, metadata=metadata)
