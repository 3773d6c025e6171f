"""Named presets: the official FLUX.1 variants and small configurations of the same architecture for CPU.

Each preset is a ModelSpec: the transformer's FluxParams, the autoencoder's AutoEncoderParams, and the
sampling defaults the variant was released with. The official numbers are those of the BFL reference
(src/flux/util.py) and of the diffusers configs in the black-forest-labs/FLUX.1-* repositories.
"""

from dataclasses import dataclass, replace

from minflux.autoencoder import AE_PARAMS_FLUX as AE_FLUX
from minflux.autoencoder import AutoEncoderParams
from minflux.model import FluxParams


@dataclass
class ModelSpec:
    name: str
    params: FluxParams
    ae_params: AutoEncoderParams
    num_steps: int = 50  # sampling defaults of the variant
    guidance: float = 3.5
    shift: bool = True  # resolution-dependent time shift of the schedule
    t5_max_length: int = 512  # 256 for schnell


FLUX_DEV = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)

# The small presets keep every part of the architecture (3-axis RoPE, double and single blocks, the
# 16-channel latent, the 8× VAE) and shrink the widths, so they train from scratch on a CPU.
FLUX_SMALL = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=64,
    context_in_dim=64,
    hidden_size=256,
    mlp_ratio=4.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=4,
    axes_dim=[16, 24, 24],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,
)
AE_SMALL = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    z_channels=16,
    scale_factor=1.0,
    shift_factor=0.0,  # scale and shift are measured after training
    norm_groups=8,  # 4 channels per group, as FLUX's 128 channels in 32 groups
)

configs: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec("flux-dev", FLUX_DEV, AE_FLUX, num_steps=50, guidance=3.5, shift=True),
    "flux-schnell": ModelSpec(
        "flux-schnell",
        replace(FLUX_DEV, guidance_embed=False),
        AE_FLUX,
        num_steps=4,
        guidance=0.0,
        shift=False,
        t5_max_length=256,
    ),
    # Fill: the model input is [noisy latent 64 | masked-image latent 64 | 8×8-packed mask 256] = 384 channels
    "flux-dev-fill": ModelSpec("flux-dev-fill", replace(FLUX_DEV, in_channels=384), AE_FLUX, guidance=30.0),
    # Kontext: the weights have the dev shapes; the reference image is appended to the sequence instead
    "flux-dev-kontext": ModelSpec("flux-dev-kontext", FLUX_DEV, AE_FLUX, num_steps=30, guidance=2.5),
    "flux-small": ModelSpec("flux-small", FLUX_SMALL, AE_SMALL, num_steps=20, guidance=0.0, shift=True),
    "flux-small-fill": ModelSpec(
        "flux-small-fill", replace(FLUX_SMALL, in_channels=384), AE_SMALL, num_steps=20, guidance=0.0
    ),
    # the same shapes as flux-small: like Kontext beside dev, told apart by its name
    "flux-small-kontext": ModelSpec("flux-small-kontext", FLUX_SMALL, AE_SMALL, num_steps=20, guidance=0.0),
}


def spec_for(model) -> ModelSpec:
    """The preset whose sampling defaults a loaded model takes: its variant's (read from the weights or the file
    name by load_flux), else those of its kind: schnell's without a guidance embedding (4 steps, no shift, no
    guidance, 256 T5 tokens), Fill's with 384 input channels, dev's otherwise."""
    variant = getattr(model, "variant", None)
    if variant in configs:
        return configs[variant]
    if not model.params.guidance_embed:
        return configs["flux-schnell"]
    return configs["flux-dev-fill" if model.params.in_channels == 384 else "flux-dev"]
