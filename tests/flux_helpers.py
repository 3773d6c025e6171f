"""Shared test helpers: small FLUX configs, random weights, and diffusers as a reference oracle."""

from dataclasses import replace

import torch

from minflux.sampling import latent_ids, pack, prepare_txt_ids
from minflux.model import Flux, FluxParams

TINY = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=32,
    context_in_dim=48,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[8, 12, 12],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
TINY_VARIANTS = {
    "dev": TINY,
    "schnell": replace(TINY, guidance_embed=False),
    "fill": replace(TINY, in_channels=384),
}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1, the rest around 0), so no term of the maths is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("scale") or "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.05 * noise)
    return module


def tiny_flux(params: FluxParams = TINY, seed: int = 0) -> Flux:
    return randomize_(Flux(params), seed).eval()


def flux_inputs(params: FluxParams, batch: int = 2, h: int = 8, w: int = 6, txt_len: int = 7, seed: int = 1):
    """Random model inputs for a latent of h×w (so h/2 · w/2 image tokens)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, params.in_channels // 4, h, w, generator=g)
    return dict(
        img=pack(z),
        img_ids=latent_ids(z),
        txt=torch.randn(batch, txt_len, params.context_in_dim, generator=g),
        txt_ids=prepare_txt_ids(batch, txt_len),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, params.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )


def diffusers_flux(params: FluxParams, state_dict: dict):
    """diffusers' FluxTransformer2DModel of the same shape, holding `state_dict` converted to its layout."""
    from diffusers import FluxTransformer2DModel

    from minflux.files.keys import flux_to_diffusers

    ref = FluxTransformer2DModel(
        patch_size=1,
        in_channels=params.in_channels,
        out_channels=params.out_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.hidden_size // params.num_heads,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed,
        axes_dims_rope=tuple(params.axes_dim),
    )
    ref.load_state_dict(flux_to_diffusers(state_dict), strict=True)
    return ref.eval()


def diffusers_forward(ref, inputs: dict) -> torch.Tensor:
    """diffusers' call for the same inputs: its ids are per sequence ([L, 3]), its guidance is not scaled."""
    return ref(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"][0],
        txt_ids=inputs["txt_ids"][0],
        guidance=inputs["guidance"],
        return_dict=False,
    )[0]


def save_peft_lora(transformer, config, pipeline, folder, seed: int = 0):
    """PEFT's LoRA (a LoraConfig) added to a diffusers transformer and saved as the diffusers `pipeline` class saves
    one: the tensors, and the config in the file's metadata (where the alphas are). Returns the file."""
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)  # the LoRA's initial weights
    transformer.add_adapter(config)
    pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def random_image(i: int, size=(40, 40)):
    """A PIL image of random pixels, seeded by i."""
    from PIL import Image

    g = torch.Generator().manual_seed(i)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def save_frozen_parts(root, captions: list[str], ae_params) -> dict:
    """Small frozen parts in the official layouts under root: ae.safetensors (random, `ae_params` in its metadata) and
    the CLIP/T5 folders with tokenizers learned from `captions`. {ae, clip, t5}: their paths."""
    import json
    from dataclasses import asdict

    from minflux.autoencoder import AutoEncoder
    from minflux.files.weights import save_atomic
    from minflux.tasks.embedded import write_text_encoders

    ae = save_atomic(
        AutoEncoder(ae_params).state_dict(),
        root / "ae.safetensors",
        metadata={"minflux.ae_params": json.dumps(asdict(ae_params))},
    )
    write_text_encoders(root, captions)
    return {"ae": ae, "clip": root / "text_encoder", "t5": root / "text_encoder_2"}


def resume_matches_straight(runs, steps: int = 4, stopped_at: int = 2) -> None:
    """runs/halves stopped at `stopped_at` with a checkpoint and no LoRA yet; resumed, its LoRA equals runs/straight's
    bit for bit and its log has one line per step."""
    import train
    from minflux.files.weights import read_state_dict

    halves = runs / "halves"
    assert not (halves / "lora.safetensors").exists()
    assert (halves / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:06d}"
    assert train.main(["--resume", str(halves)]) == 0
    a = read_state_dict(runs / "straight" / "lora.safetensors")
    b = read_state_dict(halves / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((halves / "log.jsonl").read_text().splitlines()) == steps  # 2 + 2 steps
