"""Rectified flow matching for FLUX, as plain functions: packing, ids, noise, conditioning, schedule, sampling, loss.

The straight path from data to noise:   x_t = (1 − t) · x₀ + t · ε,   t ∈ [0, 1]
its constant velocity:                  v = dx_t/dt = ε − x₀          (what the transformer predicts)
sampling runs it backwards with Euler:  x ← x + (t_prev − t) · v      (t_prev < t, so the step is negative)

One recipe for every caller, as the official sampling.py has it: `prepare` (text), `prepare_fill` (+ image and
mask on the channels), `prepare_kontext` (+ a reference image in the sequence) or, for FLUX.2, `prepare_flux2`
(text and any number of references) gather the model's inputs;
`generate` runs the schedule, `denoise` and the decoder. Training calls `flow_matching_loss` with the same
inputs; `velocity` is the one place where they are put together for the model.

References: black-forest-labs/flux (src/flux/sampling.py); Liu et al. 2022 (rectified flow); Esser et al.
2024 (logit-normal t sampling, resolution-dependent shift); cloneofsimo/minRF.
"""

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from torch import Tensor

from minflux.flux2 import Flux2
from minflux.hooks import stage

# --- 2×2 packing: latent images <-> token sequences ------------------------------------------------------


@stage
def pack(z: Tensor) -> Tensor:
    """Latent [B, C, H, W] → tokens [B, H/2 · W/2, C · 4]: each 2×2 patch of the latent becomes one token."""
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # [B, 16, 128, 128] -> [B, 4096, 64]


@stage
def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens [B, L, C · 4] → latent [B, C, H, W] for an image of height × width pixels (VAE factor 8, patch 2)."""
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)  # [B, 16, 128, 128]


@stage
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


@stage
def prepare_txt_ids(batch: int, length: int, device=None) -> Tensor:
    """Text tokens all sit at position (0, 0, 0): their order is already in the T5 hidden states."""
    return torch.zeros(batch, length, 3, device=device)  # [B, 512, 3]


@stage
def latent_ids(z: Tensor, axis0: float = 0.0) -> Tensor:
    """The ids of pack(z) for a latent z [B, C, H, W]."""
    return prepare_img_ids(z.shape[0], z.shape[2] // 2, z.shape[3] // 2, axis0, device=z.device)


@stage
def pack_mask(mask: Tensor) -> Tensor:
    """A pixel mask [B, 1, H, W] → tokens [B, H/16 · W/16, 256], aligned with pack(latent) (Fill).

    Each latent pixel covers 8×8 image pixels: those 64 mask values become its 64 channels, and the 2×2
    token patch then gives 64 · 4 = 256 channels per token.
    """
    mask = rearrange(mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=8, pw=8)  # [B, 64, H/8, W/8]
    return pack(mask)  # [B, 2048, 256]


def get_noise(num: int, height: int, width: int, seed: int) -> Tensor:
    """The starting noise of `num` images of height × width pixels → [N, 16, H/8, W/8], float32, on the CPU.

    Image i is drawn from its own generator, seeded with seed + i: a seed gives the same noise alone, in a
    batch and on any device (diffusers' pipelines draw the same with a list of CPU generators)."""
    shape = (16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(num)])


# --- the model's inputs, gathered once per kind of conditioning ----------------------------------------------


@dataclass
class Inputs:
    """The inputs of `denoise` and `flow_matching_loss`, with the image size they decode to.

    A mapping too (`keys`, `[]`: the tensors that are set, and `extra`), so `denoise(model, **inp, ...)` reads as
    in the official code. `extra` holds what a wrapper model takes besides (Vis2IR: semantic, semantic_ids).
    """

    img: Tensor | None  # [B, L, 64]  packed noise (None in training, where x_t is made from x₀)
    img_ids: Tensor  # [B, L, 3]  (FLUX.2: [B, L, 4])
    txt: Tensor  # [B, T, 4096]  T5 hidden states  (FLUX.2: [B, 512, 7680] stacked Qwen3 layers)
    txt_ids: Tensor  # [B, T, 3]  (FLUX.2: [B, T, 4])
    y: Tensor | None  # [B, 768]  pooled CLIP  (FLUX.2: None, it has no pooled vector)
    img_cond: Tensor | None = None  # [B, L, 320]  Fill: the masked image's latent and the mask, on the channels
    img_cond_seq: Tensor | None = None  # [B, L', 64]  Kontext: the reference's tokens, after the image's
    img_cond_seq_ids: Tensor | None = None  # [B, L', 3]  their ids, axis0 = 1
    extra: dict[str, Tensor] = field(default_factory=dict)
    height: int = 0  # pixels of the generated image (what unpack needs)
    width: int = 0

    def keys(self) -> list[str]:
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("extra", "height", "width")]
        return [n for n in names if getattr(self, n) is not None] + list(self.extra)

    def __getitem__(self, key: str):
        return self.extra[key] if key in self.extra else getattr(self, key)

    def map(self, fn) -> "Inputs":
        """The same inputs with fn(name, tensor) applied to every tensor: `inp.map(lambda name, t: t[rows])`."""
        changed = {k: fn(k, v) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, **changed, extra={k: fn(k, v) for k, v in self.extra.items()})

    def to(self, device, dtype=None) -> "Inputs":
        """On `device`; the floating tensors in `dtype`, except the ids (positions stay exact in float32)."""
        keep = lambda name, t: not t.is_floating_point() or name.endswith("_ids")  # noqa: E731
        return self.map(lambda name, t: t.to(device, None if keep(name, t) else dtype))


def _prompts(prompt: str | list[str], batch: int) -> list[str]:
    return [prompt] * batch if isinstance(prompt, str) else list(prompt)


@stage
def prepare(t5, clip, noise: Tensor, prompt: str | list[str]) -> Inputs:
    """Text-to-image: the noise latent [B, 16, H/8, W/8] packed with its ids, and the prompt's T5 and CLIP encodings.

    t5 and clip are anything that maps a list of prompts to [B, T, 4096] and [B, 768] (load_t5, load_clip)."""
    prompts = _prompts(prompt, noise.shape[0])
    y = clip(prompts).to(noise)  # [B, 768]
    txt = t5(prompts).to(noise)  # [B, 512, 4096]
    return Inputs(
        img=pack(noise),  # [B, 4096, 64]
        img_ids=latent_ids(noise),  # [B, 4096, 3]
        txt=txt,
        txt_ids=prepare_txt_ids(txt.shape[0], txt.shape[1], device=noise.device),  # [B, 512, 3]
        y=y,
        height=8 * noise.shape[2],
        width=8 * noise.shape[3],
    )


@stage
def fill_condition(ae, image: Tensor, mask: Tensor, sample: bool = False) -> Tensor:
    """FLUX.1-Fill's extra input channels: the image with the masked area erased, encoded, plus the mask.

    image [B, 3, H, W] in [-1, 1]; mask [B, 1, H, W], 1 where the model must generate.
    → [B, L, 320] = [packed latent of the erased image (64) | packed mask (256)]
    """
    latent = ae.encode(image * (1 - mask.to(image.dtype)), sample=sample)  # [B, 16, 64, 128]
    return torch.cat((pack(latent), pack_mask(mask)), dim=-1)  # [B, 2048, 64 + 256]


@stage
def prepare_fill(t5, clip, noise: Tensor, prompt, ae, image: Tensor, mask: Tensor) -> Inputs:
    """Inpainting (FLUX.1-Fill): `prepare`, plus the image [B, 3, H, W] with the masked area erased and the mask
    [B, 1, H, W], concatenated to the noise on the channels (img_cond [B, L, 320]). Encoded to the VAE's mean."""
    inp = prepare(t5, clip, noise, prompt)
    inp.img_cond = fill_condition(ae, image, mask).to(noise)  # [B, 4096, 320]
    return inp


@stage
def kontext_condition(ae, references: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Reference images [B, 3, H', W'] → their packed latents one after another [B, ΣL', 64] and their ids
    [B, ΣL', 3]: reference i at axis0 = i + 1 (the official Kontext takes one, at axis0 = 1). Encoded to the mean."""
    tokens, ids = [], []
    for i, image in enumerate(references):
        z = ae.encode(image, sample=False)  # [B, 16, 128, 128]
        tokens.append(pack(z))  # [B, 4096, 64]
        ids.append(latent_ids(z, axis0=float(i + 1)))  # [B, 4096, 3]
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)


@stage
def prepare_kontext(t5, clip, noise: Tensor, prompt, ae, reference) -> Inputs:
    """Editing (FLUX.1-Kontext): `prepare`, plus the reference image [B, 3, H', W'] encoded and packed, appended to
    the sequence after the image's tokens (img_cond_seq [B, L', 64]), at axis0 = 1 (img_cond_seq_ids). A list of
    references appends them one after another, at axis0 = 1, 2, ..."""
    inp = prepare(t5, clip, noise, prompt)
    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    tokens, ids = kontext_condition(ae, references)  # [B, 4096, 64], [B, 4096, 3]
    inp.img_cond_seq, inp.img_cond_seq_ids = tokens.to(noise), ids
    return inp


# --- FLUX.2: the VAE patchifies, ids have four axes, references sit at t = 10, 20, ... ------------------------


@stage
def pack_flux2(z: Tensor) -> Tensor:
    """FLUX.2's latent [B, 128, H/16, W/16] → tokens [B, H/16 · W/16, 128]. The 2×2 patches are already on the
    channels (FLUX.2's VAE patchifies before normalising), so a token is one latent pixel."""
    return rearrange(z, "b c h w -> b (h w) c")  # [B, 128, 64, 64] -> [B, 4096, 128]


@stage
def unpack_flux2(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens [B, L, 128] → FLUX.2's latent [B, 128, H/16, W/16] for an image of height × width pixels."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=math.ceil(height / 16), w=math.ceil(width / 16))


@stage
def latent_ids_flux2(z: Tensor, t: float = 0.0) -> Tensor:
    """The ids (t, h, w, l) of pack_flux2(z) for z [B, C, h, w] → [B, h · w, 4]: t = 0 for the generated image,
    10 · (k + 1) for reference k; l = 0 (l counts text tokens)."""
    b, _, h, w = z.shape
    ids = torch.zeros(h, w, 4, device=z.device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, device=z.device)[:, None]
    ids[..., 2] = torch.arange(w, device=z.device)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=b)  # [B, 4096, 4]


@stage
def txt_ids_flux2(batch: int, length: int, device=None) -> Tensor:
    """FLUX.2's text ids (0, 0, 0, i): the text's order on the fourth RoPE axis (FLUX.1's text ids are all zero)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return repeat(ids, "l c -> b l c", b=batch)  # [B, 512, 4]


def get_noise_flux2(num: int, height: int, width: int, seed: int, channels: int = 128) -> Tensor:
    """FLUX.2's starting noise → [N, 128, H/16, W/16], image i from its own generator seeded with seed + i."""
    shape = (channels, math.ceil(height / 16), math.ceil(width / 16))
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(num)])


@stage
def reference_condition(ae, references: list[Tensor]) -> tuple[Tensor, Tensor]:
    """FLUX.2's references [B, 3, H', W'], each encoded alone → tokens one after another [B, ΣL', 128] and their
    ids [B, ΣL', 4], reference k at t = 10 · (k + 1) (FLUX.1 Kontext: axis0 = k + 1)."""
    tokens, ids = [], []
    for k, image in enumerate(references):
        z = ae.encode(image)  # [B, 128, 64, 64], normalised
        tokens.append(pack_flux2(z))  # [B, 4096, 128]
        ids.append(latent_ids_flux2(z, t=10.0 * (k + 1)))  # [B, 4096, 4]
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)


@stage
def prepare_flux2(text_encoder, noise: Tensor, prompt, ae=None, references=()) -> Inputs:
    """FLUX.2 text-to-image, or editing with references: the noise [B, 128, H/16, W/16] as tokens with their ids, the
    prompt's stacked text-encoder states (Qwen3 or Mistral: [B, 512, 3 · hidden]), no pooled vector; each
    reference image encoded by `ae` and appended after the image's tokens (img_cond_seq), as Kontext's is."""
    prompts = _prompts(prompt, noise.shape[0])
    txt = text_encoder(prompts).to(noise)  # [B, 512, 7680]
    inp = Inputs(
        img=pack_flux2(noise),  # [B, 4096, 128]
        img_ids=latent_ids_flux2(noise),  # [B, 4096, 4]
        txt=txt,
        txt_ids=txt_ids_flux2(txt.shape[0], txt.shape[1], device=noise.device),  # [B, 512, 4]
        y=None,
        height=16 * noise.shape[2],
        width=16 * noise.shape[3],
    )
    if references:
        tokens, ids = reference_condition(ae, list(references))  # [B, 8192, 128], [B, 8192, 4] for two
        inp.img_cond_seq, inp.img_cond_seq_ids = tokens.to(noise), ids
    return inp


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


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift, fitted by BFL: linear in the token count above 4300 tokens; below, interpolated in the step
    count between the fits for 10 and 200 steps (fewer steps shift more)."""
    mu_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return mu_200
    mu_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (mu_200 - mu_10) / 190.0
    return mu_200 + slope * (num_steps - 200)


def get_schedule_flux2(num_steps: int, image_seq_len: int) -> list[float]:
    """FLUX.2's num_steps + 1 values of t from 1 to 0: the same time_shift, with the empirical mu."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return time_shift(empirical_mu(image_seq_len, num_steps), 1.0, timesteps).tolist()


# --- the model's prediction ------------------------------------------------------------------------------------


@stage
def velocity(
    model,
    img: Tensor,
    t: Tensor,
    guidance: Tensor | None,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    y: Tensor | None = None,
    img_cond: Tensor | None = None,
    img_cond_seq: Tensor | None = None,
    img_cond_seq_ids: Tensor | None = None,
    **extra,
) -> Tensor:
    """The model's velocity for the image tokens img [B, L, 64] at times t [B], the conditions put in place:
    Fill's on the channels, Kontext's reference after the image in the sequence (its predictions dropped). A stage:
    the trace's `velocity` line shows the concatenation and the cut."""
    x, x_ids = img, img_ids
    if img_cond is not None:
        x = torch.cat((x, img_cond), dim=-1)  # [B, 2048, 64] + [B, 2048, 320] -> [B, 2048, 384]
    if img_cond_seq is not None:
        x = torch.cat((x, img_cond_seq), dim=1)  # [B, 4096, 64] + [B, 4096, 64] -> [B, 8192, 64]
        x_ids = torch.cat((x_ids, img_cond_seq_ids), dim=1)
    if y is not None:  # FLUX.1's pooled CLIP vector; FLUX.2 has none
        extra["y"] = y
    v = model(img=x, img_ids=x_ids, txt=txt, txt_ids=txt_ids, timesteps=t, guidance=guidance, **extra)
    return v[:, : img.shape[1]]  # the generated image's tokens: [B, 4096, 64]


# --- sampling ------------------------------------------------------------------------------------------------


@stage
def denoise(
    model,
    img: Tensor,  # [B, L, 64]  packed noise
    img_ids: Tensor,  # [B, L, 3]
    txt: Tensor,  # [B, T, 4096]
    txt_ids: Tensor,  # [B, T, 3]
    y: Tensor | None,  # [B, 768]  pooled CLIP (FLUX.2: None)
    timesteps: list[float],
    guidance: float = 4.0,
    neg_txt: Tensor | None = None,  # true CFG: the negative prompt's embeddings
    neg_txt_ids: Tensor | None = None,
    neg_y: Tensor | None = None,
    true_cfg_scale: float = 1.0,
    callback=None,  # called as callback(step, num_steps) after every step, for a progress line
    **conditions,  # img_cond (Fill), img_cond_seq and img_cond_seq_ids (Kontext), a wrapper's own inputs
) -> Tensor:
    """Euler integration of the flow from t = timesteps[0] to timesteps[-1]. Returns the packed latent."""
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    num_steps = len(timesteps) - 1
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        pred = velocity(model, img, t_vec, guidance_vec, img_ids, txt, txt_ids, y, **conditions)
        if neg_txt is not None and true_cfg_scale != 1.0:
            neg_pred = velocity(model, img, t_vec, guidance_vec, img_ids, neg_txt, neg_txt_ids, neg_y, **conditions)
            pred = neg_pred + true_cfg_scale * (pred - neg_pred)
        img = img + (t_prev - t_curr) * pred  # [B, 4096, 64]: the Euler step (the trace's `euler step` line)
        if callback is not None:
            callback(step + 1, num_steps)
    return img


@stage
@torch.no_grad()
def generate(
    model,
    ae,
    inp: Inputs,
    num_steps: int,
    guidance: float | None = None,
    shift: bool = True,
    negative: Inputs | None = None,
    true_cfg_scale: float = 1.0,
    callback=None,
    timings: dict | None = None,
) -> Tensor:
    """The whole recipe after `prepare*`: schedule → denoise → unpack → decode. Images [B, 3, H, W], about [-1, 1].

    The schedule is shifted by the generated image's token count alone (shift: dev yes, schnell no; a FLUX.2
    model takes its own schedule and latent layout); guidance None is for models without a guidance embedding.
    `negative` (prepare's inputs of the negative prompt) with true_cfg_scale ≠ 1 runs true classifier-free
    guidance. `timings`, if given, gets the seconds of each stage.
    """
    start = time.perf_counter()
    conditions = {k: inp[k] for k in inp.keys() if k not in ("img", "img_ids", "txt", "txt_ids", "y")}
    cfg = {}
    if negative is not None and true_cfg_scale != 1.0:
        cfg = dict(neg_txt=negative.txt, neg_txt_ids=negative.txt_ids, neg_y=negative.y, true_cfg_scale=true_cfg_scale)
    flux2 = isinstance(getattr(model, "flux", model), Flux2)
    seq_len = inp.img.shape[1]
    timesteps = get_schedule_flux2(num_steps, seq_len) if flux2 else get_schedule(num_steps, seq_len, shift=shift)
    latent = denoise(
        model,
        inp.img,
        inp.img_ids,
        inp.txt,
        inp.txt_ids,
        inp.y,
        timesteps,
        guidance=guidance or 0.0,
        callback=callback,
        **cfg,
        **conditions,
    )  # [B, 4096, 64]
    decode_start = time.perf_counter()
    ae_dtype = next(ae.parameters()).dtype  # bf16 on CUDA: the latent meets the decoder in its dtype
    z = (unpack_flux2 if flux2 else unpack)(latent.to(ae_dtype), inp.height, inp.width)  # [B, 16, 128, 128]
    images = ae.decode(z)  # [B, 3, 1024, 1024]
    if timings is not None:
        timings["denoise"] = decode_start - start
        timings["decode"] = time.perf_counter() - decode_start
    return images


# --- training ------------------------------------------------------------------------------------------------


@stage
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


@stage
def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t) · x₀ + t · ε, with t [B] broadcast over the other axes."""
    t = t.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1 - t) * x0 + t * noise


@stage
def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity along the straight path, the regression target: ε − x₀."""
    return noise - x0


@stage
def flow_matching_loss(
    model,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    guidance: Tensor | None = None,
    loss_mask: Tensor | None = None,
    **inputs,
) -> Tensor:
    """The training objective of every task: x0, noise [B, L, 64] packed target latents, t [B] in [0, 1].

    x_t = (1 − t) x₀ + t ε; the model predicts v for the L target tokens with `inputs` (denoise's: img_ids, txt,
    txt_ids, y, img_cond, img_cond_seq, img_cond_seq_ids, and what a wrapper adds); the loss is the mean of
    (v − (ε − x₀))², over the tokens where loss_mask [B, L] is true when one is given.
    """
    x_t = interpolate(x0, noise, t)  # [B, 1024, 64]
    v = velocity(model, x_t, t, guidance, **inputs)  # [B, 1024, 64]
    err = (v.float() - velocity_target(x0, noise).float()).pow(2).mean(-1)  # [B, 1024]
    if loss_mask is None:
        return err.mean()
    weights = loss_mask.float()
    return (err * weights).sum() / weights.sum()
