"""Rectified flow matching for FLUX, as plain functions: packing, position ids, schedule, sampling, training.

The straight path from data to noise:   x_t = (1 − t) · x₀ + t · ε,   t ∈ [0, 1]
its constant velocity:                  v = dx_t/dt = ε − x₀          (what the transformer predicts)
sampling runs it backwards with Euler:  x ← x + (t_prev − t) · v      (t_prev < t, so the step is negative)

References: black-forest-labs/flux (src/flux/sampling.py); Liu et al. 2022 (rectified flow); Esser et al.
2024 (logit-normal t sampling, resolution-dependent shift); cloneofsimo/minRF.
"""

import math

import torch
from einops import rearrange, repeat
from torch import Tensor

# --- 2×2 packing: latent images <-> token sequences ------------------------------------------------------


def pack(z: Tensor) -> Tensor:
    """Latent [B, C, H, W] → tokens [B, H/2 · W/2, C · 4]: each 2×2 patch of the latent becomes one token."""
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # [B, 16, 128, 128] -> [B, 4096, 64]


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens [B, L, C · 4] → latent [B, C, H, W] for an image of height × width pixels (VAE factor 8, patch 2)."""
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)  # [B, 16, 128, 128]


def prepare_img_ids(batch: int, h: int, w: int, axis0: float = 0.0, device=None) -> Tensor:
    """Position ids (axis0, row, col) of an h × w grid of tokens → [B, h · w, 3].

    axis0 is 0 for the image being generated; Kontext gives its reference image axis0 = 1, so the two
    images share rows and columns but are told apart by the first RoPE axis.
    """
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = axis0
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)  # [B, 4096, 3]


def prepare_txt_ids(batch: int, length: int, device=None) -> Tensor:
    """Text tokens all sit at position (0, 0, 0): their order is already in the T5 hidden states."""
    return torch.zeros(batch, length, 3, device=device)  # [B, 512, 3]


def latent_ids(z: Tensor, axis0: float = 0.0) -> Tensor:
    """The ids of pack(z) for a latent z [B, C, H, W]."""
    return prepare_img_ids(z.shape[0], z.shape[2] // 2, z.shape[3] // 2, axis0, device=z.device)


def pack_mask(mask: Tensor) -> Tensor:
    """A pixel mask [B, 1, H, W] → tokens [B, H/16 · W/16, 256], aligned with pack(latent) (Fill).

    Each latent pixel covers 8×8 image pixels: those 64 mask values become its 64 channels, and the 2×2
    token patch then gives 64 · 4 = 256 channels per token.
    """
    mask = rearrange(mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=8, pw=8)  # [B, 64, H/8, W/8]
    return pack(mask)  # [B, 2048, 256]


def fill_condition(ae, image: Tensor, mask: Tensor, sample: bool = True) -> Tensor:
    """FLUX.1-Fill's extra input channels: the image with the masked area erased, encoded, plus the mask.

    image [B, 3, H, W] in [-1, 1]; mask [B, 1, H, W], 1 where the model must generate.
    → [B, L, 320] = [packed latent of the erased image (64) | packed mask (256)]
    """
    latent = ae.encode(image * (1 - mask), sample=sample)  # [B, 16, 64, 128]
    return torch.cat((pack(latent), pack_mask(mask)), dim=-1)  # [B, 2048, 64 + 256]


# --- the schedule ------------------------------------------------------------------------------------------


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """Move t towards 1 (more noise): t' = e^mu / (e^mu + (1/t − 1)^sigma). With mu = 0, sigma = 1, t' = t."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu linear in the number of image tokens: 256 tokens (512²) → 0.5, 4096 tokens (1024²) → 1.15."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_seq_len - 256)


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """num_steps + 1 values of t from 1 (noise) to 0 (image).

    Larger images keep more of their structure at a given noise level, so their schedule spends more steps
    at high t: the shift grows with the token count (dev). schnell was distilled without it (shift=False).
    """
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        timesteps = time_shift(shift_mu(image_seq_len, base_shift, max_shift), 1.0, timesteps)
    return timesteps.tolist()


# --- sampling ------------------------------------------------------------------------------------------------


def denoise(
    model,
    img: Tensor,  # [B, L, 64]  packed noise
    img_ids: Tensor,  # [B, L, 3]
    txt: Tensor,  # [B, T, 4096]
    txt_ids: Tensor,  # [B, T, 3]
    vec: Tensor,  # [B, 768]  pooled CLIP
    timesteps: list[float],
    guidance: float = 4.0,
    img_cond: Tensor | None = None,  # [B, L, C]  Fill: concatenated on channels
    img_cond_seq: Tensor | None = None,  # [B, L', 64]  Kontext: appended to the sequence
    img_cond_seq_ids: Tensor | None = None,  # [B, L', 3]
    neg_txt: Tensor | None = None,  # true CFG: the negative prompt's embeddings
    neg_txt_ids: Tensor | None = None,
    neg_vec: Tensor | None = None,
    true_cfg_scale: float = 1.0,
    callback=None,  # called as callback(step, num_steps) after every step, for a progress line
) -> Tensor:
    """Euler integration of the flow from t = timesteps[0] to timesteps[-1]. Returns the packed latent."""
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    num_steps = len(timesteps) - 1
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        x, x_ids = img, img_ids
        if img_cond is not None:
            x = torch.cat((x, img_cond), dim=-1)  # [B, 2048, 64] + [B, 2048, 320] -> [B, 2048, 384]
        if img_cond_seq is not None:
            x = torch.cat((x, img_cond_seq), dim=1)  # [B, 4096, 64] + [B, 4096, 64] -> [B, 8192, 64]
            x_ids = torch.cat((x_ids, img_cond_seq_ids), dim=1)

        def velocity(t5, t5_ids, pooled):
            v = model(img=x, img_ids=x_ids, txt=t5, txt_ids=t5_ids, timesteps=t_vec, y=pooled, guidance=guidance_vec)
            return v[:, : img.shape[1]]  # keep the generated image's tokens: [B, 4096, 64]

        pred = velocity(txt, txt_ids, vec)
        if neg_txt is not None and true_cfg_scale != 1.0:
            neg_pred = velocity(neg_txt, neg_txt_ids, neg_vec)
            pred = neg_pred + true_cfg_scale * (pred - neg_pred)
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback(step + 1, num_steps)
    return img


# --- training ------------------------------------------------------------------------------------------------


def sample_t(
    batch: int,
    sampling: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mu: float | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """Training times t [B] in (0, 1).

    "uniform": every noise level equally often. "logit_normal": sigmoid of a normal, which favours the
    middle of the path, where the velocity is hardest to predict (Esser et al. 2024). `mu` applies the same
    resolution-dependent shift as sampling (`shift_mu(seq_len)`), so training sees the noise levels that
    sampling will visit.
    """
    if sampling == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif sampling == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"sample_t: sampling {sampling!r}, expected 'uniform' or 'logit_normal'")
    return time_shift(mu, 1.0, t) if mu is not None else t


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t) · x₀ + t · ε, with t [B] broadcast over the other axes."""
    t = t.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity along the straight path, the regression target: ε − x₀."""
    return noise - x0
