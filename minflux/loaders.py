"""Loading FLUX transformer weights: official single files, diffusers folders, any stored dtype.

The official flux1-*.safetensors keys are minflux's module names, so that layout loads as it is.
diffusers stores the same weights under other names, with q, k and v split into three tensors; the table
below is the whole correspondence, as data, used in both directions (tests convert minflux weights to
diffusers' layout to run diffusers as an oracle).
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from minflux.presets import configs
from minflux.model import Flux, FluxParams
from minflux.weights import (
    WeightsError,
    load_into,
    read_metadata,
    read_shapes,
    read_state_dict,
    save_atomic,
    weight_files,
)

# Prefixes other tools put in front of the transformer's keys (ComfyUI checkpoints, some merges).
KNOWN_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.")
MARKER_KEYS = ("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight")

# --- the diffusers layout, as data -----------------------------------------------------------------------
# official name (a module: .weight and .bias; or a full key) -> diffusers name(s). A tuple means the official
# tensor is the concatenation of the diffusers tensors along dim 0 (fused q|k|v, or q|k|v|mlp).
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # official (shift, scale), diffusers (scale, shift)
}
DOUBLE_BLOCK = {  # double_blocks.{i}.*  <->  transformer_blocks.{i}.*
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
SINGLE_BLOCK = {  # single_blocks.{i}.*  <->  single_transformer_blocks.{i}.*
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}


def diffusers_key_pairs(depth: int, depth_single: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every official key with the diffusers key(s) it is made of, for a model of the given depths."""
    tables = [("", "", TOP_LEVEL)]
    tables += [(f"double_blocks.{i}.", f"transformer_blocks.{i}.", DOUBLE_BLOCK) for i in range(depth)]
    tables += [(f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", SINGLE_BLOCK) for i in range(depth_single)]
    pairs = []
    for ours, theirs, table in tables:
        for name, target in table.items():
            targets = target if isinstance(target, tuple) else (target,)
            if name.endswith(".scale"):  # a full key
                pairs.append((ours + name, tuple(theirs + t for t in targets)))
                continue
            for suffix in (".weight", ".bias"):
                pairs.append((ours + name + suffix, tuple(theirs + t + suffix for t in targets)))
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def _block_count(keys, prefix: str) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith(prefix)})


def diffusers_to_flux(sd: dict[str, torch.Tensor], source="weights") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> official keys. Consumes `sd` as it goes (one copy in memory)."""
    sd = dict(sd)
    depth = _block_count(sd, "transformer_blocks.")
    depth_single = _block_count(sd, "single_transformer_blocks.")
    out = {}
    for ours, theirs in diffusers_key_pairs(depth, depth_single):
        if not all(t in sd for t in theirs):
            continue  # absent in this variant (guidance_in in schnell, biases of a bias-free model)
        t = torch.cat([sd.pop(k) for k in theirs], dim=0)
        out[ours] = _swap_halves(t) if ours in SWAPPED_HALVES else t
    if sd:
        raise WeightsError(f"{source}: diffusers keys with no official counterpart: {', '.join(list(sd)[:5])}")
    return out


def flux_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> diffusers FluxTransformer2DModel keys (q, k, v and the single blocks' mlp split)."""
    depth = _block_count(sd, "double_blocks.")
    depth_single = _block_count(sd, "single_blocks.")
    hidden = sd["img_in.weight"].shape[0]
    out = {}
    for ours, theirs in diffusers_key_pairs(depth, depth_single):
        if ours not in sd:
            continue
        t = _swap_halves(sd[ours]) if ours in SWAPPED_HALVES else sd[ours]
        if len(theirs) == 1:
            out[theirs[0]] = t
            continue
        sizes = [hidden] * 3 + [t.shape[0] - 3 * hidden] * (len(theirs) - 3)
        out.update(zip(theirs, t.split(sizes, dim=0)))
    return out


# --- reading the variant from the weights ---------------------------------------------------------------------


def infer_params(sd: dict[str, torch.Tensor], axes_dim: list[int] | None, source) -> FluxParams:
    """FluxParams from the tensor shapes: width, depths, channels, guidance embedding, qkv bias."""
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        params = FluxParams(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0],
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
            num_heads=hidden // head_dim,
            depth=_block_count(sd, "double_blocks."),
            depth_single_blocks=_block_count(sd, "single_blocks."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )
    except KeyError as e:
        raise WeightsError(f"{source}: not a FLUX transformer: key {e.args[0]!r} is missing") from None
    if axes_dim is None:
        if head_dim != 128:
            raise WeightsError(
                f"{source}: head dim {head_dim} is not the official 128 and the file does not say how RoPE "
                "splits it (no 'minflux.params' metadata): pass name= a preset of this shape"
            )
        axes_dim = [16, 56, 56]
    params.axes_dim = list(axes_dim)
    return params


def _find_prefix(shapes: dict, source) -> str:
    """The prefix under which the file holds a FLUX transformer (official or diffusers keys)."""
    for prefix in KNOWN_PREFIXES:
        if any(prefix + marker in shapes for marker in MARKER_KEYS):
            return prefix
    raise WeightsError(
        f"{source}: not a FLUX transformer: none of {', '.join(MARKER_KEYS)} found "
        f"(first keys: {', '.join(list(shapes)[:5]) or 'none'})"
    )


def _find_transformer(path: Path) -> Path:
    """A repo root holds transformer/ (diffusers) or flux1-*.safetensors beside ae.safetensors (BFL)."""
    if path.is_dir():
        if (path / "transformer").is_dir():
            return path / "transformer"
        official = sorted(path.glob("flux1-*.safetensors"))
        if official:
            return official[0]
    return path


def load_flux(path, name: str | None = None, device="cpu", dtype: torch.dtype | None = None) -> Flux:
    """A Flux transformer from an official file, a diffusers transformer/ folder or a repo root.

    name: a preset of minflux.configs to check the weights against; None reads the variant from the weights.
    dtype: None keeps the stored dtype (fp8, a storage format, becomes bf16); else every tensor is cast.
    The model is built on the meta device and the loaded tensors are assigned into it, so the weights are
    held in memory once.
    """
    path = _find_transformer(Path(path))
    if name is not None and name not in configs:
        raise WeightsError(f"{path}: unknown variant {name!r}; known presets: {', '.join(configs)}")
    files = weight_files(path)
    metadata = read_metadata(path)
    prefix = _find_prefix(read_shapes(path), path)
    sd = read_state_dict(path, dtype=dtype, select=lambda k: k.startswith(prefix))
    sd = {k[len(prefix) :]: v for k, v in sd.items()}

    axes_dim = None
    config_file = files[0].parent / "config.json"
    if MARKER_KEYS[0] not in sd:  # the diffusers layout
        sd = diffusers_to_flux(sd, source=path)
        if config_file.exists():
            axes_dim = json.loads(config_file.read_text()).get("axes_dims_rope")
    if "minflux.params" in metadata:
        axes_dim = json.loads(metadata["minflux.params"])["axes_dim"]

    if name is not None:
        params = configs[name].params
    else:
        params = infer_params(sd, axes_dim, path)
        name = metadata.get("minflux.variant") or variant_name(params, path)
    with torch.device("meta"):
        model = Flux(params)
    load_into(model, sd, path, what=f"FLUX transformer ({name or 'custom'})")
    model.variant = name
    return model.to(device)


def variant_name(params: FluxParams, path: Path) -> str | None:
    """The preset whose params these are; Kontext has dev's shapes, so only the file name tells them apart."""
    matches = [n for n, spec in configs.items() if spec.params == params]
    if "flux-dev" in matches and "kontext" in path.name.lower():
        return "flux-dev-kontext"
    return matches[0] if matches else None


def save_flux(model: Flux, path, variant: str | None = None) -> Path:
    """Write the official single-file layout, with the params in the header so small models reload exactly."""
    metadata = {"minflux.params": json.dumps(asdict(model.params))}
    if variant or getattr(model, "variant", None):
        metadata["minflux.variant"] = variant or model.variant
    return save_atomic(model.state_dict(), path, metadata=metadata)

