"""The key tables of the weight files other tools write, as data, with the conversions that read them.

Official names are minflux's module names. What other layouts call them:
  the transformer   diffusers FluxTransformer2DModel (q, k, v split; the final norm's halves swapped), and the
                    prefixes ComfyUI checkpoints add
  the VAE           diffusers AutoencoderKL (its own names; Linear attention weights; decoder levels reversed)
  CLIP-L            the prefixes of the files that hold a text tower (SD, SDXL, ComfyUI all-in-one)
  T5-XXL            the anchor key after which a file's T5 keys start
  LoRA files        kohya / ComfyUI, diffusers / PEFT, BFL, XLabs: layer names and the suffixes of their parts

Each table is used in both directions where both are needed (the tests turn minflux weights into diffusers'
layout to run diffusers as an oracle).
"""

import torch

from minflux.files.weights import WeightsError

# --- the transformer -------------------------------------------------------------------------------------

# Prefixes other tools put in front of the transformer's keys (ComfyUI checkpoints, some merges).
FLUX_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.")
FLUX_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight")

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


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def block_count(keys, prefix: str) -> int:
    """How many blocks the keys under `prefix` number (double_blocks.0. ... double_blocks.18.: 19)."""
    return len({k.split(".")[1] for k in keys if k.startswith(prefix)})


def diffusers_to_flux(sd: dict[str, torch.Tensor], source="weights") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> official keys. Consumes `sd` as it goes (one copy in memory)."""
    sd = dict(sd)
    depth = block_count(sd, "transformer_blocks.")
    depth_single = block_count(sd, "single_transformer_blocks.")
    out = {}
    for ours, theirs in diffusers_key_pairs(depth, depth_single):
        if not all(t in sd for t in theirs):
            continue  # absent in this variant (guidance_in in schnell, biases of a bias-free model)
        t = torch.cat([sd.pop(k) for k in theirs], dim=0)
        out[ours] = swap_halves(t) if ours in SWAPPED_HALVES else t
    if sd:
        raise WeightsError(f"{source}: diffusers keys with no official counterpart: {', '.join(list(sd)[:5])}")
    return out


def flux_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> diffusers FluxTransformer2DModel keys (q, k, v and the single blocks' mlp split)."""
    depth = block_count(sd, "double_blocks.")
    depth_single = block_count(sd, "single_blocks.")
    hidden = sd["img_in.weight"].shape[0]
    out = {}
    for ours, theirs in diffusers_key_pairs(depth, depth_single):
        if ours not in sd:
            continue
        t = swap_halves(sd[ours]) if ours in SWAPPED_HALVES else sd[ours]
        if len(theirs) == 1:
            out[theirs[0]] = t
            continue
        sizes = [hidden] * 3 + [t.shape[0] - 3 * hidden] * (len(theirs) - 3)
        out.update(zip(theirs, t.split(sizes, dim=0)))
    return out


# --- the VAE ---------------------------------------------------------------------------------------------

# diffusers' AutoencoderKL (and AutoencoderKLFlux2) names -> the official names, as whole dotted pieces of a key,
# applied in this order (the mid_block entries before the general "resnets"). Two rules are not in the table:
#   decoder.up_blocks.{i} runs lowest resolution first, so it is decoder.up.{n - 1 - i} (n levels);
#   diffusers' attention has Linear q/k/v/out weights [C, C], the official 1x1 convs [C, C, 1, 1].
DIFFUSERS_TO_OFFICIAL = {
    "conv_norm_out": "norm_out",
    "mid_block.resnets.0": "mid.block_1",
    "mid_block.attentions.0": "mid.attn_1",
    "mid_block.resnets.1": "mid.block_2",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "down_blocks": "down",
    "up_blocks": "up",
    "resnets": "block",
    "downsamplers.0": "downsample",
    "upsamplers.0": "upsample",
    "conv_shortcut": "nin_shortcut",
    "quant_conv": "encoder.quant_conv",  # FLUX.2: diffusers keeps the 1x1 convs at the top level
    "post_quant_conv": "decoder.post_quant_conv",
}
ATTENTION_WEIGHTS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def is_diffusers_layout(keys) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys)


def official_key(diffusers_key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key -> the official ae.safetensors key."""
    key = f".{diffusers_key}."
    for theirs, ours in DIFFUSERS_TO_OFFICIAL.items():
        key = key.replace(f".{theirs}.", f".{ours}.")
    key = key[1:-1]
    if key.startswith("decoder.up."):
        _, _, i, rest = key.split(".", 3)
        key = f"decoder.up.{num_levels - 1 - int(i)}.{rest}"
    return key


def official_state_dict(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """A diffusers-layout state dict with official keys and shapes. Views only: no tensor is copied."""
    out = {}
    for key, t in sd.items():
        key = official_key(key, num_levels)
        if key.endswith(ATTENTION_WEIGHTS) and t.ndim == 2:
            t = t[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[key] = t
    return out


# --- CLIP-L and T5 --------------------------------------------------------------------------------------

# What stands in front of the text tower's own names (embeddings.*, encoder.*, final_layer_norm.*) in the files
# other tools write, tried in this order. Data, in one place; every key is renamed to "text_model." + own name.
CLIP_PREFIXES = (
    "text_model.",  # the official layout: FLUX.1 text_encoder/, clip_l.safetensors, a full CLIP model
    "",  # transformers >= 5 drops "text_model." when it saves a CLIPTextModel
    "cond_stage_model.transformer.text_model.",  # Stable Diffusion 1.x full checkpoints
    "text_encoders.clip_l.transformer.text_model.",  # ComfyUI all-in-one checkpoints (SD3.5, FLUX)
    "conditioner.embedders.0.transformer.text_model.",  # SDXL full checkpoints (CLIP-L is embedder 0)
)
CLIP_TOWER = ("embeddings.", "encoder.", "final_layer_norm.")
CLIP_TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"

# config.json name → CLIPParams field, where they differ.
CLIP_CONFIG_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}

T5_ANCHOR = "encoder.final_layer_norm.weight"  # present in every T5 encoder file; what precedes it is the prefix


# --- LoRA files ------------------------------------------------------------------------------------------

# XLabs-AI/x-flux names its LoRA layers after the block's processor: lora1 is the image stream, lora2 the text
# stream; in single blocks qkv_lora covers the first 3·h rows of linear1 (q, k, v, not the mlp).
XLABS = {
    "double_blocks": {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1",
                      "txt_attn.qkv": "qkv_lora2", "txt_attn.proj": "proj_lora2"},
    "single_blocks": {"linear1": "qkv_lora", "linear2": "proj_lora"},
}  # fmt: skip


# How each tool names the parts of one layer's LoRA; tried in this order (".lora.down" before ".down").
LORA_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_up.bias": "bias", ".alpha": "alpha",  # kohya, minflux
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias",  # PEFT / diffusers, BFL
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # older diffusers
    ".down.weight": "down", ".up.weight": "up",  # XLabs
}  # fmt: skip
# What other tools put in front of the layer names: diffusers pipelines, ComfyUI, PEFT-wrapped models.
LORA_PREFIXES = ("", "transformer.", "diffusion_model.", "model.diffusion_model.", "base_model.model.")
