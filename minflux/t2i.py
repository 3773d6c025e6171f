"""Text-to-image LoRA training for FLUX.1 dev and schnell, as plain functions (`train.py --task t2i` runs them).

One step, at 512 × 512 with the official sizes:

    image [B, 3, 512, 512] in [-1, 1] → VAE (frozen) → z [B, 16, 64, 64] → pack → x_0 [B, 1024, 64]   (cached)
    caption → T5 (frozen) [B, 512, 4096]; CLIP (frozen) pooled [B, 768]                                (cached)
    t ~ logit-normal, shifted by the token count like the variant's sampling schedule (dev's is, schnell's not)
    x_t = (1 − t) x_0 + t ε;   v = FLUX(x_t, img_ids, txt, txt_ids, t, y, guidance) [B, 1024, 64]
    loss = MSE(v, ε − x_0)

dev is guidance-distilled: its guidance embedding gets a fixed value while training (1.0 in kohya's sd-scripts
and diffusers' train_dreambooth_lora_flux), so the LoRA learns on the model it will run inside. schnell has no
guidance embedding. Only the LoRA's down/up matrices train; the transformer, VAE and text encoders stay frozen.

Aspect-ratio buckets: the cache holds one tensor per image size, and a batch is drawn from one size, so the
image tokens of a batch stack ([B, 920, 64] for 368 × 640 ... ) and the shift follows each size's token count.
"""

import torch
from torch import Tensor

from minflux.flow import (
    denoise,
    get_schedule,
    interpolate,
    pack,
    prepare_img_ids,
    prepare_txt_ids,
    unpack,
    velocity_target,
)
from minflux.runs import Progress


# --- the cache: what the frozen parts compute, once ----------------------------------------------------------


@torch.no_grad()
def encode_images(ae, images: Tensor) -> Tensor:
    """images [B, 3, H, W] in [-1, 1] → x_0 [B, H/16 · W/16, 64]. The VAE's mean, not a sample: the cache is
    then exact, and a resumed run re-encodes to the same numbers."""
    return pack(ae.encode(images, sample=False))  # [B, 16, 64, 64] -> [B, 1024, 64]


@torch.no_grad()
def encode_texts(clip, t5, texts: list[str], chunk: int = 64) -> tuple[Tensor, Tensor]:
    """(pooled CLIP [U, 768], T5 hidden states [U, 512, 4096]) of each text."""
    pooled = torch.cat([clip(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
    hidden = torch.cat([t5(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
    return pooled, hidden


@torch.no_grad()
def encode_dataset(data, ae, clip, t5, dtype=None, chunk: int = 8) -> dict:
    """Everything the frozen parts compute for a CaptionFolder, once, kept on the CPU:

        sizes  [(width, height), ...]       the image sizes (one without buckets)
        x0     per size, [n, L, 64]         packed latents
        text   per size, [n] long           each image's caption, as an index into texts
        texts  the distinct captions, and "" (the dropped caption) last
        y      [U, 768], txt [U, T, 4096]   their CLIP pooled vectors and T5 hidden states
        empty  the index of ""
    """
    device, ae_dtype = ae.encoder.conv_in.weight.device, ae.encoder.conv_in.weight.dtype
    sizes = sorted(set(data.sizes))
    progress = Progress(len(data), label="encode ")
    x0, text, captions, done = [], [], [], 0
    for size in sizes:
        members = [i for i in range(len(data)) if data.sizes[i] == size]
        latents = []
        for start in range(0, len(members), chunk):
            samples = [data[i] for i in members[start : start + chunk]]  # a bad file: the next good one of its size
            images = torch.stack([s["image"] for s in samples])  # [8, 3, 512, 512]
            latents.append(encode_images(ae, images.to(device, ae_dtype)).to("cpu", dtype))  # [8, 1024, 64]
            captions += [s["caption"] for s in samples]
            done += len(samples)
            progress.update(done)
        x0.append(torch.cat(latents))  # [n, 1024, 64]
    texts = sorted(set(captions) - {""}) + [""]
    where = {t: k for k, t in enumerate(texts)}
    index = torch.tensor([where[c] for c in captions])  # [N], in the order of the sizes
    text = list(index.split([len(x) for x in x0]))
    y, txt = encode_texts(clip, t5, texts)
    return {"sizes": sizes, "x0": x0, "text": text, "texts": texts, "y": y.to("cpu", dtype),
            "txt": txt.to("cpu", dtype), "empty": len(texts) - 1}  # fmt: skip


def draw_batch(enc: dict, batch: int, gen: torch.Generator, caption_dropout: float = 0.0) -> dict:
    """A batch of the cache: one image size (each as likely as its share of the images), `batch` images of it
    drawn with replacement, and each caption replaced by "" with probability caption_dropout."""
    counts = torch.tensor([len(x) for x in enc["x0"]], dtype=torch.float)
    k = int(torch.multinomial(counts, 1, generator=gen))
    idx = torch.randint(len(enc["x0"][k]), (batch,), generator=gen)
    text = enc["text"][k][idx]  # [B]
    if caption_dropout > 0:
        drop = torch.rand(batch, generator=gen) < caption_dropout
        text = torch.where(drop, enc["empty"], text)
    return {"x0": enc["x0"][k][idx], "txt": enc["txt"][text], "y": enc["y"][text], "size": enc["sizes"][k]}


# --- the step and sampling -------------------------------------------------------------------------------------


def t2i_loss(
    model, x0: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, y: Tensor, t: Tensor, noise: Tensor,
    guidance: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Flow-matching loss of one batch: x0 [B, L, 64] packed latents, txt [B, T, 4096], y [B, 768], t [B]."""
    x_t = interpolate(x0, noise, t)  # [B, 1024, 64]
    v = model(x_t, img_ids, txt, txt_ids, t, y, guidance)  # [B, 1024, 64]
    return (v.float() - velocity_target(x0, noise).float()).pow(2).mean()


@torch.no_grad()
def generate(
    model, ae, txt: Tensor, y: Tensor, width: int, height: int, num_steps: int, guidance: float, shift: bool,
    seed: int = 0,
) -> Tensor:  # fmt: skip
    """Images [B, 3, height, width] for the embeddings txt [B, T, 4096], y [B, 768]: Euler from seeded noise."""
    B, h, w = txt.shape[0], height // 16, width // 16
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((B, h * w, 64), generator=g).to(txt)  # [B, 1024, 64]
    img_ids = prepare_img_ids(B, h, w, device=txt.device)  # [B, 1024, 3]
    txt_ids = prepare_txt_ids(B, txt.shape[1], device=txt.device)  # [B, 512, 3]
    timesteps = get_schedule(num_steps, h * w, shift=shift)
    latent = denoise(model, noise, img_ids, txt, txt_ids, y, timesteps, guidance=guidance)  # [B, 1024, 64]
    ae_dtype = ae.decoder.conv_in.weight.dtype
    return ae.decode(unpack(latent, height, width).to(ae_dtype))  # [B, 3, 512, 512]
