"""Loading a FLUX.2 transformer ([dev], [klein]): an official flux2-*.safetensors file or a diffusers transformer/.

    load_flux2   a file with official keys (with or without a ComfyUI-style prefix), a diffusers transformer/ folder
                 or a file with diffusers keys, or a repo root holding either → Flux2

load_flux (load.py) hands FLUX.2 weights here: `is_flux2` tells them apart by the model-level modulation FLUX.1
lacks. The model is built on the meta device and the loaded tensors are assigned into it, so the weights are held
in memory once; its Flux2Params are read off the tensor shapes. The diffusers names are the table below.
"""

from pathlib import Path

import torch

from minflux.files.keys import FLUX_PREFIXES, swap_halves
from minflux.files.weights import WeightsError, is_finite_number, is_sizes, load_into, metadata_json, numbered
from minflux.files.weights import read_json, read_metadata, read_shapes, read_state_dict, sizes_of, weight_files
from minflux.flux2 import Flux2, Flux2Params
from minflux.presets import configs

# The shared double-block modulation of the image stream: in every FLUX.2 transformer, in none of FLUX.1's.
FLUX2_MARKERS = ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")

# official key -> diffusers Flux2Transformer2DModel key(s). A tuple means the official tensor is the concatenation
# of the diffusers tensors along dim 0 (fused q|k|v). FLUX.2 has no biases: every key is a weight or a norm scale.
FLUX2_TOP_LEVEL = {
    "img_in.weight": "x_embedder.weight",
    "txt_in.weight": "context_embedder.weight",
    "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
    "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
    "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
    "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
    "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
    "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight",  # official (shift, scale), diffusers swapped
    "final_layer.linear.weight": "proj_out.weight",
}
FLUX2_DOUBLE_BLOCK = {  # double_blocks.{i}.*  <->  transformer_blocks.{i}.*
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight",
    "txt_attn.proj.weight": "attn.to_add_out.weight",
    "img_mlp.0.weight": "ff.linear_in.weight",
    "img_mlp.2.weight": "ff.linear_out.weight",
    "txt_mlp.0.weight": "ff_context.linear_in.weight",
    "txt_mlp.2.weight": "ff_context.linear_out.weight",
}
FLUX2_SINGLE_BLOCK = {  # single_blocks.{i}.*  <->  single_transformer_blocks.{i}.*
    "linear1.weight": "attn.to_qkv_mlp_proj.weight",  # q|k|v|SwiGLU in both layouts
    "linear2.weight": "attn.to_out.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
FLUX2_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1.weight"}


def is_flux2(keys) -> bool:
    """Whether these keys (official or diffusers, with or without a prefix) are a FLUX.2 transformer's."""
    return any(prefix + marker in keys for prefix in FLUX_PREFIXES for marker in FLUX2_MARKERS)


def flux2_key_pairs(depth: int, depth_single: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every official key with the diffusers key(s) it is made of, for a model of the given depths."""
    tables = [("", "", FLUX2_TOP_LEVEL)]
    tables += [(f"double_blocks.{i}.", f"transformer_blocks.{i}.", FLUX2_DOUBLE_BLOCK) for i in range(depth)]
    tables += [
        (f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", FLUX2_SINGLE_BLOCK) for i in range(depth_single)
    ]
    pairs = []
    for ours, theirs, table in tables:
        for name, target in table.items():
            targets = target if isinstance(target, tuple) else (target,)
            pairs.append((ours + name, tuple(theirs + t for t in targets)))
    return pairs


def diffusers_to_flux2(sd: dict[str, torch.Tensor], source="weights") -> dict[str, torch.Tensor]:
    """diffusers Flux2Transformer2DModel keys -> official keys. Consumes `sd` as it goes (one copy in memory)."""
    sd = dict(sd)
    depth = numbered(sd, "transformer_blocks.", source)
    depth_single = numbered(sd, "single_transformer_blocks.", source)
    out = {}
    for ours, theirs in flux2_key_pairs(depth, depth_single):
        if not all(t in sd for t in theirs):
            continue  # absent in this variant: guidance_in in [klein]
        t = torch.cat([sd.pop(k) for k in theirs], dim=0)
        out[ours] = swap_halves(t) if ours in FLUX2_SWAPPED_HALVES else t
    if sd:
        raise WeightsError(f"{source}: diffusers keys with no FLUX.2 counterpart: {', '.join(list(sd)[:5])}")
    return out


def infer_flux2_params(sd: dict[str, torch.Tensor], axes_dim, theta: int, source) -> Flux2Params:
    """Flux2Params from the tensor shapes: width, heads (the QK-norm's length is the head dim), depths, channels,
    guidance embedding. RoPE's split is not in the shapes: `axes_dim`, else 4 equal axes, as every official one."""
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]  # 128
        params = Flux2Params(
            in_channels=in_channels,
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=numbered(sd, "double_blocks.", source),
            depth_single_blocks=numbered(sd, "single_blocks.", source),
            axes_dim=list(axes_dim) if axes_dim else [head_dim // 4] * 4,
            theta=theta,
            mlp_ratio=sd["double_blocks.0.img_mlp.2.weight"].shape[1] / hidden,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )
    except KeyError as e:
        raise WeightsError(f"{source}: not a FLUX.2 transformer: key {e.args[0]!r} is missing") from None
    if sum(params.axes_dim) != head_dim or any(d % 2 for d in params.axes_dim):
        raise WeightsError(f"{source}: RoPE axes {params.axes_dim} do not split the head dim {head_dim} into pairs")
    return params


def diffusers_rope(config_file: Path) -> tuple[list[int] | None, int | None]:
    """(axes_dims_rope, rope_theta) from a diffusers config.json; None for what it does not set."""
    config = read_json(config_file)
    return config.get("axes_dims_rope"), config.get("rope_theta")


def weights_in(path: Path) -> Path:
    """The transformer's weights in a repo root (transformer/ or flux2-*.safetensors); other paths as they are."""
    if not path.is_dir():
        return path
    if (path / "transformer").is_dir():
        return path / "transformer"
    return next(iter(sorted(path.glob("flux2-*.safetensors"))), path)


def text_input(path) -> tuple[int, bool]:
    """The channels a FLUX.2 transformer's txt_in takes (3 × the text encoder's hidden size) and whether it has a
    guidance embedding ([dev], whose text encoder is Mistral), from the file headers alone."""
    shapes = read_shapes(weights_in(Path(path)))
    for prefix in FLUX_PREFIXES:
        for txt_in, guidance in (
            ("txt_in.weight", "guidance_in."),
            ("context_embedder.weight", "time_guidance_embed.guidance"),
        ):
            if prefix + txt_in in shapes:
                has_guidance = any(k.startswith(prefix + guidance) for k in shapes)
                return shapes[prefix + txt_in][0][1], has_guidance
    raise WeightsError(f"{path}: not a FLUX.2 transformer: no txt_in.weight (or context_embedder.weight)")


def load_flux2(path, device="cpu", dtype: torch.dtype | None = None, name: str | None = None) -> Flux2:
    """A Flux2 transformer from an official file, a diffusers transformer/ folder (or a file with its keys), or a
    repo root holding either.

    dtype: None keeps the stored dtype (fp8, a storage format, becomes bf16); else every tensor is cast.
    name: a FLUX.2 preset of minflux.configs to check the weights against; None reads the sizes from the weights.
    """
    path = weights_in(Path(path))
    if name is not None and not isinstance(getattr(configs.get(name), "params", None), Flux2Params):
        flux2 = ", ".join(n for n, spec in configs.items() if isinstance(spec.params, Flux2Params))
        raise WeightsError(f"{path}: {name!r} is not a FLUX.2 preset; these weights are FLUX.2's ({flux2})")
    shapes = read_shapes(path)
    prefix = next((p for p in FLUX_PREFIXES for m in FLUX2_MARKERS if p + m in shapes), None)
    if prefix is None:
        raise WeightsError(f"{path}: not a FLUX.2 transformer: none of {', '.join(FLUX2_MARKERS)} found")
    sd = read_state_dict(path, dtype=dtype, select=lambda k: k.startswith(prefix))
    sd = {k[len(prefix) :]: v for k, v in sd.items()}

    axes_dim, theta = None, None
    config_file = weight_files(path)[0].parent / "config.json"
    if FLUX2_MARKERS[0] not in sd:  # the diffusers layout
        sd = diffusers_to_flux2(sd, source=path)
        if config_file.exists():
            axes_dim, theta = diffusers_rope(config_file)
    metadata = read_metadata(path)
    fields = {"axes_dim": is_sizes(4), "theta": is_finite_number}
    stored = metadata_json(metadata, "minflux.params", fields, path)  # written by save_flux
    if stored is not None:
        axes_dim, theta = stored["axes_dim"], stored["theta"]

    if name is not None:
        params = configs[name].params
    else:
        with sizes_of(path, "FLUX.2 transformer"):
            params = infer_flux2_params(sd, axes_dim, theta or 2000, path)
        matches = [n for n, spec in configs.items() if spec.params == params]
        name = metadata.get("minflux.variant") or (matches[0] if matches else None)
    with torch.device("meta"), sizes_of(path, "FLUX.2 transformer"):
        model = Flux2(params)
    load_into(model, sd, path, what=f"FLUX.2 transformer ({name or 'custom'})")
    model.variant = name
    return model.to(device)
