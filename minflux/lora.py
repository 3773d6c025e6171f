"""LoRA for FLUX: low-rank adapters on the transformer's linear layers.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a linear layer's weight
W [out, in] frozen and learns a low-rank update beside it:

    y = W x + b + (alpha / rank) · scale · up(down(x))        down [rank, in], up [out, rank]

`up` starts at zero, so a freshly injected model computes exactly what the base model computes. Training moves
only `down` and `up`: rank · (in + out) numbers per layer instead of in · out (rank 16 on a qkv layer: 0.2 M
instead of 28 M). `alpha / rank` is a constant fixed at training time; `scale` is the user's strength knob.

The files other tools write (kohya / ComfyUI, diffusers / PEFT, BFL, XLabs) are read and written by
minflux.files.lora_files, which hands each layer's LoRA to `apply_lora` as `LoRAWeights`.

Both generations: FLUX.1's Flux and FLUX.2's Flux2 share the official layer names but for the modulations, so one
set of target groups serves both (TARGET_GROUPS, `model_generation` tells the two apart).

References: microsoft/LoRA (loralib/layers.py); kohya-ss/sd-scripts (networks/lora_flux.py: what is trained by
default on FLUX.1) and kohya-ss/musubi-tuner (networks/lora_flux_2.py: on FLUX.2).
"""

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
# Both generations share the official names but for the modulations: FLUX.1's live in each block, FLUX.2's are
# three shared layers beside the blocks; a pattern of the other generation matches nothing.
TARGET_GROUPS = {
    "attn": ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
             "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj"],
    "mlp": ["double_blocks.*.img_mlp.*", "double_blocks.*.txt_mlp.*"],  # FLUX.2: SwiGLU's .0 (2 · mlp wide) and .2
    "single": ["single_blocks.*.linear1", "single_blocks.*.linear2"],
    "mod": ["double_blocks.*.img_mod.lin", "double_blocks.*.txt_mod.lin", "single_blocks.*.modulation.lin",  # FLUX.1
            "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"],
    "embed": ["img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*"],
    "final": ["final_layer.linear", "final_layer.adaLN_modulation.1"],
    "all": ["*"],
}  # fmt: skip
# The default of kohya's trainers: every linear layer inside the double and single blocks. FLUX.1's blocks hold
# their modulations (sd-scripts networks/lora_flux.py trains them); FLUX.2's hold none, and musubi-tuner's FLUX.2
# network (networks/lora_flux_2.py) trains the blocks alone: its three shared modulations, each one layer steering
# every block, come with "mod" only (nor does diffusers' kohya converter for FLUX.2 read them).
DEFAULT_TARGETS = ("attn", "mlp", "single", "mod")  # FLUX.1
DEFAULT_TARGETS_FLUX2 = ("attn", "mlp", "single")


def model_generation(model: nn.Module) -> str | None:
    """ "FLUX.2" for a FLUX.2 transformer (shared modulations beside the blocks), "FLUX.1" for a FLUX.1 one, None
    for any other module; a module holding the transformer as .flux (Vis2IR) counts as the transformer."""
    transformer = getattr(model, "flux", model)
    if not hasattr(transformer, "double_blocks"):
        return None
    return "FLUX.2" if hasattr(transformer, "double_stream_modulation_img") else "FLUX.1"


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=None) -> list[nn.Parameter]:
    """Wrap the targeted nn.Linear layers of `model` in LoRALinear, in place; returns their LoRA parameters.

    targets: one string or a list, each a group of TARGET_GROUPS ("attn", "mlp", "single", "mod", "embed",
    "final", "all") or an fnmatch pattern over module names ("double_blocks.1?.img_attn.qkv"), so any nn.Module
    works. None: every linear layer of the double and single blocks (kohya's default): DEFAULT_TARGETS for FLUX.1,
    DEFAULT_TARGETS_FLUX2 for FLUX.2 (without its shared modulations: targets=[*DEFAULT_TARGETS_FLUX2, "mod"]).
    alpha: None means alpha = rank (factor 1). Layers that already carry a LoRA keep it.

    Nothing is frozen here: the new LoRA parameters are trainable and the base keeps its requires_grad. To train
    the LoRA alone, the caller freezes the base first, `model.requires_grad_(False)`, then injects (or injects,
    freezes, and re-enables the returned parameters).
    """
    if targets is None:
        targets = DEFAULT_TARGETS_FLUX2 if model_generation(model) == "FLUX.2" else DEFAULT_TARGETS
    targets = [targets] if isinstance(targets, str) else targets
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


@dataclass
class LoRAWeights:
    """One layer's LoRA, in float32: ΔW = alpha / rank · up @ down, and Δb = alpha / rank · bias if any."""

    down: Tensor  # [rank, in]
    up: Tensor  # [out, rank]
    alpha: float
    bias: Tensor | None = None  # [out]


def apply_lora(model: nn.Module, loras: dict[str, LoRAWeights], scale: float = 1.0) -> list[str]:
    """Put each layer's LoRA into `model` ({layer name: LoRAWeights}); returns the layer names.

    Layers not yet wrapped are wrapped in LoRALinear. A layer already carrying a trained LoRA gets the new one
    stacked onto it (LoRALinear.add_lora): several LoRAs load one after another, each with its own `scale`.
    An adapter that is still zero (injected, untrained) is replaced.
    """
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
