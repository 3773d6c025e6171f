"""Parameter tables: every component's parameters, trainable and frozen, with its block types folded.

python -m minflux.study.trace flux-dev --params        the official counts, from presets built on the meta device
python -m minflux.study.trace flux2-klein-4b --params  FLUX.2's: the transformer, its VAE, the text encoder as run

from minflux.study.params import parameter_table
print(parameter_table({"transformer": flux, "ae": ae}))
"""

import torch
from torch import nn

from minflux.autoencoder import AutoEncoder, Flux2AutoEncoder
from minflux.clip import CLIP_L, CLIPParams, CLIPTextModel
from minflux.files.load_llm import MISTRAL_LAYERS, QWEN3_LAYERS
from minflux.flux2 import Flux2, Flux2Params
from minflux.model import Flux
from minflux.presets import configs
from minflux.qwen3 import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, Qwen3, Qwen3Params
from minflux.t5 import T5_XXL, T5Encoder, T5Params


def _count(params) -> tuple[int, int]:
    """(total, trainable) over distinct parameters (T5's shared embedding is counted once)."""
    seen, total, trainable = set(), 0, 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def per_block(counts: list[int]) -> str:
    """The note of a ModuleList's row: "X each" when every block holds X, else each block's count in order, a run
    of equal ones as "N × X" (the VAE's levels: "738,944 + 2,690,304 + ...", T5's: "192,948,224 + 23 × ...")."""
    if len(set(counts)) == 1:
        return f"{counts[0]:,} each"
    runs = []  # [count, how many in a row]
    for c in counts:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return " + ".join(f"{n} × {c:,}" if n > 1 else f"{c:,}" for c, n in runs)


def parameter_rows(name: str, module: nn.Module, depth: int = 0, max_depth: int = 2) -> list[tuple[str, int, int, str]]:
    """(label, total, trainable, note) for a module and, down to max_depth, its children. A ModuleList is one row,
    "19 × DoubleStreamBlock" with "X each" when its blocks are equal, followed by the parts of one block; blocks
    of different sizes (the VAE's levels) get each one's count in the note instead. A wrapper with a single child
    (CLIP's text_model, T5's encoder) is looked through."""
    total, trainable = _count(module.parameters())
    rows = [("  " * depth + f"{name} ({type(module).__name__})", total, trainable, "")]
    children = [(n, c) for n, c in module.named_children() if _count(c.parameters())[0]]
    while len(children) == 1 and not isinstance(children[0][1], nn.ModuleList):  # look through a wrapper
        prefix, wrapper = children[0]
        children = [(f"{prefix}.{n}", c) for n, c in wrapper.named_children() if _count(c.parameters())[0]]
    if depth >= max_depth:
        return rows
    for child_name, child in children:
        if isinstance(child, nn.ModuleList) and len(child):
            kinds = {type(b).__name__ for b in child}
            t, tr = _count(child.parameters())
            kind = kinds.pop() if len(kinds) == 1 else "blocks"
            counts = [_count(b.parameters())[0] for b in child]
            rows.append(("  " * (depth + 1) + f"{child_name} ({len(child)} × {kind})", t, tr, per_block(counts)))
            if depth + 2 <= max_depth and kind != "blocks" and len(set(counts)) == 1:  # the parts of one block, once
                for part_name, part in child[0].named_children():
                    pt, ptr = _count(part.parameters())
                    if pt:
                        label = "  " * (depth + 2) + f"{part_name} ({type(part).__name__})"
                        rows.append((label, pt, ptr, "in one block"))
        else:
            rows += parameter_rows(child_name, child, depth + 1, max_depth)
    return rows


def parameter_table(parts: dict[str, nn.Module] | nn.Module, max_depth: int = 2) -> str:
    """A model summary: parameters of each component and of its children (block types folded), trainable and
    frozen, and the total. `parts`: {"transformer": flux, "ae": ae, ...} or one module. Works on meta models.
    A language model built only up to the layers read (FLUX.2's Qwen3) gets a line under the total: its full count."""
    if isinstance(parts, nn.Module):
        parts = {type(parts).__name__.lower(): parts}
    rows = []
    for name, module in parts.items():
        rows += parameter_rows(name, module, 0, max_depth)
    all_params = [p for m in parts.values() for p in m.parameters()]
    total, trainable = _count(all_params)
    rows.append(("total", total, trainable, ""))
    width = max(len(r[0]) for r in rows)
    header = f"{'component':<{width}}  {'parameters':>15}  {'trainable':>15}  {'frozen':>15}"
    lines = [header, "-" * len(header)]
    for label, t, tr, note in rows:
        if label == "total":
            lines.append("-" * len(header))
        lines.append(f"{label:<{width}}  {t:>15,}  {tr:>15,}  {t - tr:>15,}" + (f"  {note}" if note else ""))
    for name, module in parts.items():
        if isinstance(module, Qwen3) and 0 < module.depth < module.params.num_layers:
            layers, built = module.params.num_layers, module.depth
            full = _count(module.parameters())[0] + (layers - built) * _count(module.model.layers[0].parameters())[0]
            lines.append(
                f"{name}: the first {built} of {layers} layers, those read; all {layers}, no LM head: {full:,}"
            )
    return "\n".join(lines)


def flux2_text_encoder(params: Flux2Params) -> tuple[Qwen3Params, tuple[int, ...]]:
    """The language model a FLUX.2 transformer reads, and the hidden states it stacks: Qwen3-4B / 8B for [klein]
    4B / 9B (9, 18, 27), Mistral Small 3.2 for [dev] (10, 20, 30), from its context_in_dim = 3 · hidden; for a
    small preset a small Qwen3 of the width it reads (four layers, the first three read)."""
    for llm, layers in ((QWEN3_4B, QWEN3_LAYERS), (QWEN3_8B, QWEN3_LAYERS), (MISTRAL_SMALL_3_2, MISTRAL_LAYERS)):
        if params.context_in_dim == len(layers) * llm.hidden_size:
            return llm, layers
    width = params.context_in_dim // 3  # flux2-small: 192 = 3 × 64
    return Qwen3Params(160, width, 2 * width, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16), (1, 2, 3)


def meta_components(preset: str, t5_length: int | None = None) -> dict[str, nn.Module]:
    """The preset's transformer, VAE, CLIP and T5, built on the meta device (no storage: no memory, no time).

    The official presets get CLIP-L and T5-XXL; the small presets get the embedded default's small encoders,
    whose widths match their vec_in_dim and context_in_dim. FLUX.2: the transformer, its VAE and its text encoder,
    the language model built up to the deepest layer read (27 of Qwen3's 36), as FLUX.2 runs it."""
    spec = configs[preset]
    p = spec.params
    if isinstance(p, Flux2Params):
        llm, layers = flux2_text_encoder(p)
        with torch.device("meta"):
            return {
                "transformer": Flux2(p),
                "ae": Flux2AutoEncoder(spec.ae_params),
                "text_encoder": Qwen3(llm, max(layers)),
            }
    clip_params = CLIP_L if p.vec_in_dim == 768 else CLIPParams(512, p.vec_in_dim, 4 * p.vec_in_dim, 2, 2)
    t5_params = T5_XXL if p.context_in_dim == 4096 else T5Params(160, p.context_in_dim, 32, 2 * p.context_in_dim, 2, 2)
    with torch.device("meta"):
        return {
            "transformer": Flux(p),
            "ae": AutoEncoder(spec.ae_params),
            "clip": CLIPTextModel(clip_params),
            "t5": T5Encoder(t5_params),
        }
