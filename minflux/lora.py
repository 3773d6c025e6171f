"""LoRA for FLUX: low-rank adapters on the transformer's linear layers, read and written in other tools' formats.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a linear layer's weight
W [out, in] frozen and learns a low-rank update beside it:

    y = W x + b + (alpha / rank) · scale · up(down(x))        down [rank, in], up [out, rank]

`up` starts at zero, so a freshly injected model computes exactly what the base model computes. Training moves
only `down` and `up`: rank · (in + out) numbers per layer instead of in · out (rank 16 on a qkv layer: 0.2 M
instead of 28 M). `alpha / rank` is a constant fixed at training time; `scale` is the user's strength knob.

LoRA files differ only in how they name the layers and how they cut FLUX's fused layers into pieces:

    minflux    double_blocks.0.img_attn.qkv.lora_down.weight / .lora_up.weight / .alpha      official names
    kohya      lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / ... / .alpha        sd-scripts, ComfyUI
    diffusers  transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight      PEFT: q, k, v split
    BFL        double_blocks.0.img_attn.qkv.lora_A.weight / .lora_B.weight (/ .lora_B.bias)   flux/modules/lora.py
    XLabs      double_blocks.0.processor.qkv_lora1.down.weight / .up.weight                   lora1 img, lora2 txt

`layer_names` lists every such name for each linear layer of a model (the diffusers names come from the table
in loaders.py), so reading any of these files is one dictionary lookup per key.

References: microsoft/LoRA (loralib/layers.py); kohya-ss/sd-scripts (networks/lora_flux.py: what is trained by
default, how split q/k/v LoRAs are saved); black-forest-labs/flux (src/flux/modules/lora.py); XLabs-AI/x-flux
(src/flux/modules/layers.py); diffusers (loaders/lora_conversion_utils.py: _convert_kohya_flux_lora_to_diffusers,
_convert_xlabs_flux_lora_to_diffusers), whose conversions the tests use as the oracle.
"""

import fnmatch
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from minflux.loaders import SWAPPED_HALVES, diffusers_key_pairs
from minflux.weights import WeightsError, read_state_dict, save_atomic


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank update: y = W x + b + (alpha / rank) · scale · up(down(x)).

    It holds the wrapped layer's own weight and bias Parameters (no copy), so the base keys stay the official
    `….weight` / `….bias`; the adapter adds `….lora_down.weight` [rank, in], `….lora_up.weight` [out, rank] and
    `….alpha`. One adapter per layer: a second LoRA is stacked onto it (`add_lora`), which stays exact.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        w = base.weight
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta", dtype=w.dtype)
        self.weight, self.bias = base.weight, base.bias  # the same Parameters, requires_grad as they were
        self.scale = 1.0  # the user's multiplier; not saved
        down = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype).weight  # kaiming-uniform
        up = torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)  # zero: injection is the identity
        self.set_lora(down.detach(), up, rank if alpha is None else alpha)

    def set_lora(self, down: Tensor, up: Tensor, alpha: float, bias: Tensor | None = None):
        """Replace the adapter: down [r, in], up [out, r], and an optional bias of up [out] (BFL, PEFT lora_bias)."""
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_down = nn.Linear(self.in_features, down.shape[0], bias=False, **like)
        self.lora_up = nn.Linear(down.shape[0], self.out_features, bias=bias is not None, **like)
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
            if bias is not None:
                self.lora_up.bias.copy_(bias)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=self.weight.device))

    @property
    def rank(self) -> int:
        return self.lora_down.out_features

    @property
    def factor(self) -> Tensor:
        """alpha / rank · scale, the number the adapter's output is multiplied by."""
        return self.alpha / self.rank * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.factor * self.lora_up(self.lora_down(x))  # [..., in] -> [..., r] -> [..., out]

    def delta_weight(self) -> Tensor:
        """ΔW = factor · up @ down, [out, in], in float32."""
        return self.factor.float() * (self.lora_up.weight.float() @ self.lora_down.weight.float())

    def add_lora(self, down: Tensor, up: Tensor, alpha: float, scale: float = 1.0, bias: Tensor | None = None):
        """Stack a second LoRA onto this layer; the two updates add up, exactly.

            [up₁·f₁ | up₂·f₂] @ [down₁; down₂] = f₁ · up₁ @ down₁ + f₂ · up₂ @ down₂      f = alpha / rank · scale

        The ranks add up; each LoRA's factor is folded into its columns of `up`, after which the layer's alpha is
        its rank and its scale 1, so `scale` turns the sum. To change one LoRA's strength later, reload them.
        """
        f_old, f_new = self.factor.item(), alpha / down.shape[0] * scale
        down = torch.cat([self.lora_down.weight.float(), down.float()])  # [r₁ + r₂, in]
        up = torch.cat([f_old * self.lora_up.weight.float(), f_new * up.float()], dim=1)  # [out, r₁ + r₂]
        biases = [f * b.float() for f, b in ((f_old, self.lora_up.bias), (f_new, bias)) if b is not None]
        self.set_lora(down, up, alpha=down.shape[0], bias=sum(biases) if biases else None)
        self.scale = 1.0

    def is_zero(self) -> bool:
        """True while the adapter changes nothing (just injected, not trained)."""
        return self.lora_up.bias is None and not self.lora_up.weight.any()

    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding W + ΔW (and b + Δb): the same function, with no adapter left."""
        has_bias = self.bias is not None or self.lora_up.bias is not None
        merged = nn.Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
        with torch.no_grad():
            weight = self.weight.float() + self.delta_weight()
            merged.weight = nn.Parameter(weight.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
            if has_bias:
                bias = self.bias.float() if self.bias is not None else torch.zeros_like(weight[:, 0])
                if self.lora_up.bias is not None:
                    bias = bias + self.factor.float() * self.lora_up.bias.float()
                merged.bias = nn.Parameter(bias.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        return merged

    def base(self) -> nn.Linear:
        """The wrapped layer alone: a plain nn.Linear holding the same weight and bias Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        alpha = "?" if self.alpha.is_meta else f"{self.alpha.item():g}"
        return f"{super().extra_repr()}, rank={self.rank}, alpha={alpha}, scale={self.scale:g}"


# --- finding the layers ------------------------------------------------------------------------------------


def linear_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """name -> layer for every nn.Linear of `module` (a LoRALinear counts once: its adapters are not listed)."""
    layers = {}
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            layers[prefix + name] = child
        else:
            layers.update(linear_layers(child, prefix + name + "."))
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: layer for name, layer in linear_layers(model).items() if isinstance(layer, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' weights (down, up and any bias of up) of every LoRA layer: what an optimizer trains."""
    layers = lora_layers(model).values()
    return [p for layer in layers for m in (layer.lora_down, layer.lora_up) for p in m.parameters()]


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# Named groups of FLUX layers for inject_lora(targets=...): fnmatch patterns over module names ("*" spans dots).
TARGET_GROUPS = {
    "attn": ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
             "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj"],
    "mlp": ["double_blocks.*.img_mlp.*", "double_blocks.*.txt_mlp.*"],
    "single": ["single_blocks.*.linear1", "single_blocks.*.linear2"],
    "mod": ["double_blocks.*.img_mod.lin", "double_blocks.*.txt_mod.lin", "single_blocks.*.modulation.lin"],
    "embed": ["img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*"],
    "final": ["final_layer.linear", "final_layer.adaLN_modulation.1"],
    "all": ["*"],
}  # fmt: skip
# kohya's sd-scripts (networks/lora_flux.py) trains every linear layer of the double and single blocks by default.
DEFAULT_TARGETS = ("attn", "mlp", "single", "mod")


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=None) -> list[nn.Parameter]:
    """Wrap the targeted nn.Linear layers of `model` in LoRALinear, in place; returns their LoRA parameters.

    targets: one string or a list, each a group of TARGET_GROUPS ("attn", "mlp", "single", "mod", "embed",
    "final", "all") or an fnmatch pattern over module names ("double_blocks.1?.img_attn.qkv"), so any nn.Module
    works. None: DEFAULT_TARGETS, every linear layer of the double and single blocks (kohya's default).
    alpha: None means alpha = rank (factor 1). Layers that already carry a LoRA keep it.

    Nothing is frozen here: the new LoRA parameters are trainable and the base keeps its requires_grad. To train
    the LoRA alone, the caller freezes the base first, `model.requires_grad_(False)`, then injects (or injects,
    freezes, and re-enables the returned parameters).
    """
    targets = DEFAULT_TARGETS if targets is None else [targets] if isinstance(targets, str) else targets
    patterns = [p for t in targets for p in TARGET_GROUPS.get(t, [t])]
    chosen = [name for name in linear_layers(model) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"inject_lora: no linear layer of the model matches {list(targets)}")
    params = []
    for name in chosen:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, rank, alpha)
            _replace(model, name, layer)
        params += [layer.lora_down.weight, layer.lora_up.weight]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its layer (W ← W + ΔW): plain nn.Linear layers, official keys, no extra cost."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merge())
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA: plain nn.Linear layers again, holding the untouched base weights."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.base())
    return model


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
    """diffusers module name -> Target, from the table in loaders.py; to_q, to_k, to_v (and the single blocks'
    proj_mlp) are rows of the official fused qkv / linear1: [h | h | h] or [h | h | h | mlp]."""
    layers = linear_layers(model)
    names = {}
    for ours, theirs in diffusers_key_pairs(_blocks(layers, "double_blocks"), _blocks(layers, "single_blocks")):
        module = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or module not in layers:
            continue
        layer = layers[module]
        h = layer.in_features  # the hidden size, for qkv and linear1 alike
        sizes = ([h] * 3 + [layer.out_features - 3 * h])[: len(theirs)]
        start = 0
        for name, size in zip(theirs, sizes):
            rows = slice(start, start + size) if len(theirs) > 1 else None
            names[name.removesuffix(".weight")] = Target(module, rows, swap_halves=ours in SWAPPED_HALVES)
            start += size
    return names


# XLabs-AI/x-flux names its LoRA layers after the block's processor: lora1 is the image stream, lora2 the text
# stream; in single blocks qkv_lora covers the first 3·h rows of linear1 (q, k, v, not the mlp).
XLABS = {
    "double_blocks": {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1",
                      "txt_attn.qkv": "qkv_lora2", "txt_attn.proj": "proj_lora2"},
    "single_blocks": {"linear1": "qkv_lora", "linear2": "proj_lora"},
}  # fmt: skip


def layer_names(model: nn.Module) -> dict[str, Target]:
    """Every name a LoRA file may give a linear layer of `model`, mapped to that layer (and rows of it)."""
    names = {}
    for name, layer in linear_layers(model).items():
        names[name] = Target(name)  # minflux, BFL, ComfyUI: the official name
        names["lora_unet_" + name.replace(".", "_")] = Target(name)  # kohya sd-scripts
        kind, _, rest = name.partition(".")
        index, _, rest = rest.partition(".")
        if rest in XLABS.get(kind, {}):
            rows = slice(0, 3 * layer.in_features) if rest == "linear1" else None
            names[f"{kind}.{index}.processor.{XLABS[kind][rest]}"] = Target(name, rows)
    for name, target in diffusers_names(model).items():
        names[name] = target  # diffusers / PEFT
        names["lora_transformer_" + name.replace(".", "_")] = target  # diffusers names written kohya-style
    return names


# How each tool names the parts of one layer's LoRA; tried in this order (".lora.down" before ".down").
SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_up.bias": "bias", ".alpha": "alpha",  # kohya, minflux
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias",  # PEFT / diffusers, BFL
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # older diffusers
    ".down.weight": "down", ".up.weight": "up",  # XLabs
}  # fmt: skip
# What other tools put in front of the layer names: diffusers pipelines, ComfyUI, PEFT-wrapped models.
PREFIXES = ("", "transformer.", "diffusion_model.", "model.diffusion_model.", "base_model.model.")


def _split_key(key: str, names: dict) -> tuple[str, str] | None:
    """"transformer.transformer_blocks.0.attn.to_q.lora_A.weight" -> ("transformer_blocks.0.attn.to_q", "down")."""
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            for prefix in PREFIXES:
                if name.startswith(prefix) and name[len(prefix) :] in names:
                    return name[len(prefix) :], part
    return None


# --- reading --------------------------------------------------------------------------------------------------


@dataclass
class LoRAWeights:
    """One layer's LoRA, in float32: ΔW = alpha / rank · up @ down, and Δb = alpha / rank · bias if any."""

    down: Tensor  # [rank, in]
    up: Tensor  # [out, rank]
    alpha: float
    bias: Tensor | None = None  # [out]


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


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


def read_lora(path, model: nn.Module) -> dict[str, LoRAWeights]:
    """A LoRA file (or state dict) of any supported format, as {official layer name of `model`: LoRAWeights}.

    The model is used only for its layer names and shapes (a model on the meta device will do). Keys that name
    no layer are listed in a warning; shapes that do not fit the layer raise WeightsError naming the file and key.
    """
    source = "LoRA state dict" if isinstance(path, dict) else path
    sd = dict(path) if isinstance(path, dict) else read_state_dict(path)
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
        alpha = parts["alpha"][1].item() if "alpha" in parts else down.shape[0]  # no alpha stored: factor 1
        bias = parts["bias"][1].float() if "bias" in parts else None
        if bias is not None and tuple(bias.shape) != (rows.stop - rows.start,):
            raise WeightsError(f"{source}: key {parts['bias'][0]!r} has shape {list(bias.shape)}, expected "
                               f"[{rows.stop - rows.start}] for layer {target.module}")  # fmt: skip
        up = up.float()
        if target.swap_halves:
            up, bias = _swap_halves(up), None if bias is None else _swap_halves(bias)
        pieces.setdefault(target.module, []).append((rows, LoRAWeights(down.float(), up, alpha, bias)))

    if unmatched:
        listed = ", ".join(unmatched[:20]) + (f", ... ({len(unmatched) - 20} more)" if len(unmatched) > 20 else "")
        warnings.warn(f"{source}: {len(unmatched)} key(s) not loaded (no linear layer of this model, or no "
                      f"down/up pair): {listed}")  # fmt: skip
    return {module: _fuse(p, layers[module].out_features) for module, p in pieces.items()}


def load_lora(model: nn.Module, path, scale: float = 1.0) -> list[str]:
    """Apply a LoRA file (any format of the module docstring, told apart by its key names); returns the layers.

    Layers not yet wrapped are wrapped in LoRALinear. A layer already carrying a trained LoRA gets the new one
    stacked onto it (LoRALinear.add_lora): several LoRAs load one after another, each with its own `scale`.
    An adapter that is still zero (injected, untrained) is replaced by the file's. After loading,
    lora_parameters(model) gives the parameters to train, to resume from the file.
    """
    loras = read_lora(path, model)
    for name, w in loras.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, rank=w.down.shape[0])
            _replace(model, name, layer)
        if layer.is_zero():
            layer.set_lora(w.down, w.up, w.alpha, w.bias)
            layer.scale = scale
        else:
            layer.add_lora(w.down, w.up, w.alpha, scale, w.bias)
    return list(loras)


# --- writing --------------------------------------------------------------------------------------------------


def _adapter_state(layer: LoRALinear) -> dict[str, Tensor]:
    """lora_down.weight, lora_up.weight (lora_up.bias), alpha: the layer's state without the base weights."""
    return {k: v for k, v in layer.state_dict().items() if k not in ("weight", "bias")}


def _diffusers_tensors(model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, Tensor]:
    """PEFT keys. A fused layer is split as diffusers splits it: every piece shares lora_A = down and takes its
    rows of up as lora_B. diffusers assumes alpha = rank, so alpha / rank is folded into lora_B."""
    pieces = {}  # official layer -> [(diffusers name, Target)]
    for name, target in diffusers_names(model).items():
        pieces.setdefault(target.module, []).append((name, target))
    tensors = {}
    for module, layer in layers.items():
        f = layer.alpha.item() / layer.rank
        up = f * layer.lora_up.weight.detach()  # [out, r]
        bias = None if layer.lora_up.bias is None else f * layer.lora_up.bias.detach()
        for name, target in pieces.get(module, [(module, Target(module))]):  # no diffusers name: keep ours
            rows = target.rows or slice(None)
            b, b_bias = up[rows], None if bias is None else bias[rows]
            if target.swap_halves:
                b, b_bias = _swap_halves(b), None if b_bias is None else _swap_halves(b_bias)
            tensors[f"transformer.{name}.lora_A.weight"] = layer.lora_down.weight.detach().clone()  # [r, in]
            tensors[f"transformer.{name}.lora_B.weight"] = b.clone()  # [rows, r]; safetensors wants no shared memory
            if b_bias is not None:
                tensors[f"transformer.{name}.lora_B.bias"] = b_bias.clone()
    return tensors


def save_lora(model: nn.Module, path, format: str = "minflux") -> Path:
    """Write the model's LoRA layers to a .safetensors file, atomically; the metadata names format, rank, alpha.

    format: "minflux" (official names, .lora_down / .lora_up / .alpha), "kohya" (lora_unet_…, as sd-scripts and
    ComfyUI write FLUX LoRAs) or "diffusers" (PEFT names under transformer., q/k/v split, alpha folded into
    lora_B). The user's `scale` is not saved: a file holds the LoRA as trained.
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
    elif format == "diffusers":
        tensors = _diffusers_tensors(model, layers)
    else:
        raise ValueError(f"save_lora: unknown format {format!r}; use 'minflux', 'kohya' or 'diffusers'")
    metadata = {
        "minflux.lora_format": format,
        "minflux.lora_rank": ", ".join(str(r) for r in sorted({layer.rank for layer in layers.values()})),
        "minflux.lora_alpha": ", ".join(f"{a:g}" for a in sorted({layer.alpha.item() for layer in layers.values()})),
    }
    return save_atomic(tensors, path, metadata=metadata)
