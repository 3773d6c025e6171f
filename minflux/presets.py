"""Named presets: the official FLUX.1 and FLUX.2 variants, and small configurations of each architecture for CPU.

Each preset is a ModelSpec: the transformer's FluxParams (Flux2Params for FLUX.2), the autoencoder's
AutoEncoderParams, and the sampling defaults the variant was released with. The official numbers are those of the
BFL references (src/flux/util.py, src/flux2/model.py) and of the diffusers configs in the black-forest-labs/FLUX.1-*
and FLUX.2-* repositories.
"""

from dataclasses import dataclass, replace

from minflux.autoencoder import AE_PARAMS_FLUX as AE_FLUX
from minflux.autoencoder import AE_PARAMS_FLUX2 as AE_FLUX2
from minflux.autoencoder import AutoEncoderParams
from minflux.flux2 import Flux2Params
from minflux.model import FluxParams


@dataclass
class ModelSpec:
    name: str
    params: FluxParams | Flux2Params
    ae_params: AutoEncoderParams | None
    num_steps: int = 50  # sampling defaults of the variant
    guidance: float = 3.5
    shift: bool = True  # resolution-dependent time shift of the schedule
    t5_max_length: int = 512  # 256 for schnell
    true_cfg: float = 1.0  # true classifier-free guidance by default (FLUX.2 [klein] Base: 4.0 against "")


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

# FLUX.2: [dev] (Mistral Small 3.2 text encoder, 3 layers stacked: 15360) and [klein] 4B / 9B (Qwen3-4B / 8B,
# 3 layers stacked: 7680 / 12288). No biases, SwiGLU MLPs (ratio 3), 4-axis RoPE with theta 2000.
FLUX2_DEV = Flux2Params(
    in_channels=128,
    context_in_dim=15360,
    hidden_size=6144,
    num_heads=48,
    depth=8,
    depth_single_blocks=48,
    axes_dim=[32, 32, 32, 32],
    theta=2000,
    mlp_ratio=3.0,
    guidance_embed=True,
)
FLUX2_KLEIN_4B = replace(
    FLUX2_DEV,
    context_in_dim=7680,
    hidden_size=3072,
    num_heads=24,
    depth=5,
    depth_single_blocks=20,
    guidance_embed=False,
)
FLUX2_KLEIN_9B = replace(
    FLUX2_DEV,
    context_in_dim=12288,
    hidden_size=4096,
    num_heads=32,
    depth=8,
    depth_single_blocks=24,
    guidance_embed=False,
)
# The FLUX.2 architecture shrunk for CPU: head dim 64 (4 axes × 16), a small Qwen3's 64 channels × 3 layers.
FLUX2_SMALL = Flux2Params(
    in_channels=128,
    context_in_dim=192,
    hidden_size=256,
    num_heads=4,
    depth=2,
    depth_single_blocks=4,
    axes_dim=[16, 16, 16, 16],
    theta=2000,
    mlp_ratio=3.0,
    guidance_embed=False,
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
    # FLUX.2: references are appended to the sequence (t = 10, 20, ...) by every variant.
    "flux2-dev": ModelSpec("flux2-dev", FLUX2_DEV, AE_FLUX2, num_steps=50, guidance=4.0),
    # klein is step-distilled: 4 steps, no guidance embedding, no CFG. The klein Base variants share its shapes
    # and sample with 50 steps and true CFG 4.0 against the empty prompt (the variant LoRAs are trained on).
    "flux2-klein-4b": ModelSpec("flux2-klein-4b", FLUX2_KLEIN_4B, AE_FLUX2, num_steps=4, guidance=1.0),
    "flux2-klein-9b": ModelSpec("flux2-klein-9b", FLUX2_KLEIN_9B, AE_FLUX2, num_steps=4, guidance=1.0),
    "flux2-klein-base-4b": ModelSpec("flux2-klein-base-4b", FLUX2_KLEIN_4B, AE_FLUX2, guidance=1.0, true_cfg=4.0),
    "flux2-klein-base-9b": ModelSpec("flux2-klein-base-9b", FLUX2_KLEIN_9B, AE_FLUX2, guidance=1.0, true_cfg=4.0),
    "flux2-small": ModelSpec("flux2-small", FLUX2_SMALL, replace(AE_SMALL, z_channels=32), num_steps=20, guidance=1.0),
}


def spec_for(model) -> ModelSpec:
    """The preset whose sampling defaults a loaded model takes: its variant's (read from the weights or the file
    name by load_flux), else those of its kind: schnell's without a guidance embedding (4 steps, no shift, no
    guidance, 256 T5 tokens), Fill's with 384 input channels, dev's otherwise. FLUX.2: the preset of its shapes,
    else [dev]'s with a guidance embedding, [klein] 4B's without."""
    variant = getattr(model, "variant", None)
    if variant in configs:
        return configs[variant]
    if isinstance(model.params, Flux2Params):
        matches = [name for name, spec in configs.items() if spec.params == model.params]
        return configs[matches[0] if matches else "flux2-dev" if model.params.guidance_embed else "flux2-klein-4b"]
    if not model.params.guidance_embed:
        return configs["flux-schnell"]
    return configs["flux-dev-fill" if model.params.in_channels == 384 else "flux-dev"]
