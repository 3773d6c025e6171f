"""Text-to-image LoRA training for FLUX.1 dev and schnell (`train.py --task t2i`).

One step, at 512 × 512 with the official sizes:

    image [B, 3, 512, 512] in [-1, 1] → VAE (frozen) → z [B, 16, 64, 64] → pack → x_0 [B, 1024, 64]   (cached)
    caption → T5 (frozen) [B, 512, 4096]; CLIP (frozen) pooled [B, 768]                                (cached)
    t ~ logit-normal, shifted by the token count like the variant's sampling schedule (dev's is, schnell's not)
    x_t = (1 − t) x_0 + t ε;   v = FLUX(x_t, img_ids, txt, txt_ids, t, y, guidance) [B, 1024, 64]
    loss = MSE(v, ε − x_0)                                                       (sampling.flow_matching_loss)

dev is guidance-distilled: its guidance embedding gets a fixed value while training (1.0 in kohya's sd-scripts
and diffusers' train_dreambooth_lora_flux), so the LoRA learns on the model it will run inside. schnell has no
guidance embedding. Only the LoRA's down/up matrices train; the transformer, VAE and text encoders stay frozen.

Aspect-ratio buckets: the cache holds one tensor per image size, and a batch is drawn from one size, so the
image tokens of a batch stack ([B, 920, 64] for 368 × 640 ... ) and the shift follows each size's token count.
"""

import json
from pathlib import Path

import torch

from minflux.files.images import image_grid, line_plot, save_png
from minflux.files.load import load_flux
from minflux.files.lora_files import save_lora
from minflux.files.weights import WeightsError, write_text_atomic
from minflux.lora import inject_lora, lora_layers
from minflux.presets import spec_for
from minflux.sampling import Inputs, generate, get_noise, pack, prepare, prepare_img_ids, prepare_txt_ids, sample_t
from minflux.sampling import shift_mu
from minflux.tasks.common import Batch, TextCache, load_frozen
from minflux.tasks.data import CaptionFolder
from minflux.tasks.runs import Progress, log, smooth


class T2ITask:
    """Text-to-image LoRA training for train.py: the official frozen parts, the cache, the LoRA, the samples."""

    what = "images, captions"

    def __init__(self, cfg, run: Path, device, dtype):
        self.cfg, self.run, self.device, self.dtype = cfg, run, device, dtype
        self.data = CaptionFolder(cfg.data, cfg.resolution, cfg.default_caption, cfg.on_error, cfg.buckets)
        self.ae, self.clip, self.t5 = load_frozen(cfg, device, dtype)
        self.frozen = {"ae": self.ae, "clip": self.clip.model, "t5": self.t5.model}

    @torch.no_grad()
    def encode(self, chunk: int = 8):
        """Everything the frozen parts compute, once, kept on the CPU: per image size the packed latents [n, L, 64]
        (the VAE's mean, so a resumed run re-encodes to the same numbers) and each image's caption, and the
        captions' embeddings (the empty caption among them, for caption dropout). Then the text encoders are freed
        and the VAE waits on the CPU for the samples."""
        data, ae = self.data, self.ae
        device, ae_dtype = ae.encoder.conv_in.weight.device, ae.encoder.conv_in.weight.dtype
        self.sizes = sorted(set(data.sizes))
        self.x0, self.captions = [], []  # per size: [n, L, 64], and the n captions
        progress, done = Progress(len(data), label="encode "), 0
        for size in self.sizes:
            members = [i for i in range(len(data)) if data.sizes[i] == size]
            latents, texts = [], []
            for start in range(0, len(members), chunk):
                samples = [data[i] for i in members[start : start + chunk]]  # a bad file: the next good one of its size
                images = torch.stack([s["image"] for s in samples]).to(device, ae_dtype)  # [8, 3, 512, 512]
                latents.append(pack(ae.encode(images, sample=False)).to("cpu", self.dtype))  # [8, 1024, 64]
                texts += [s["caption"] for s in samples]
                done += len(samples)
                progress.update(done)
            self.x0.append(torch.cat(latents))  # [n, 1024, 64]
            self.captions.append(texts)
        self.texts = TextCache.encode(self.t5, self.clip, [c for cs in self.captions for c in cs] + [""], self.dtype)
        self.text = [self.texts.index(cs) for cs in self.captions]  # per size: [n] rows of the cache
        self.seq_len = max(x.shape[1] for x in self.x0) + self.texts.txt.shape[1]  # image + text tokens, at most
        del self.clip, self.t5
        self.ae.to("cpu")
        self.frozen = {"ae": self.ae}
        if data.n_skipped:  # unreadable at the check, or when encoded
            log(f"data: skipped {data.n_skipped} unusable file(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
        if data.n_default_captions:
            log(f"data: {data.n_default_captions} image(s) without a .txt caption get {self.cfg.default_caption!r}")
        sizes = ", ".join(f"{w}×{h} ({len(x)})" for (w, h), x in zip(self.sizes, self.x0))
        log(f"data: {len(data)} images, {len(self.texts.texts) - 1} distinct captions; sizes {sizes}; "
            f"text {list(self.texts.txt.shape[1:])}")  # fmt: skip

    def build_model(self):
        """The frozen dev/schnell transformer with LoRA. The LoRA weights are kept in fp32 (their AdamW updates are
        smaller than bf16 can resolve); under bf16 autocast the forward pass still runs in bf16."""
        cfg = self.cfg
        flux = load_flux(cfg.flux, device=self.device, dtype=self.dtype)
        if flux.params.in_channels != 64:
            raise WeightsError(f"{cfg.flux}: a transformer with {flux.params.in_channels} input channels "
                               f"({flux.variant or 'custom'}); --task t2i trains FLUX.1 dev or schnell (64)")  # fmt: skip
        flux.requires_grad_(False)
        inject_lora(flux, cfg.lora_rank, cfg.lora_alpha, targets=cfg.lora_targets.split(",") if cfg.lora_targets else None)
        for layer in lora_layers(flux).values():
            layer.lora_down.float()
            layer.lora_up.float()
        flux.gradient_checkpointing = cfg.gradient_checkpointing
        self.shift = spec_for(flux).shift  # dev's training times are shifted like its schedule, schnell's are not
        trained = [p for p in flux.parameters() if p.requires_grad]
        log(f"model: {flux.variant or 'custom'}, {sum(p.numel() for p in flux.parameters()):,} parameters, "
            f"{sum(p.numel() for p in trained):,} trained (LoRA rank {cfg.lora_rank})")  # fmt: skip
        return flux, [{"params": trained, "lr": cfg.lr, "name": "transformer"}]

    def draw(self, gen: torch.Generator) -> Batch:
        """A global batch of one image size (each size as likely as its share of the images), drawn with
        replacement, each caption replaced by "" with probability caption_dropout; times and noise."""
        cfg, B = self.cfg, self.cfg.batch_size
        k = int(torch.multinomial(torch.tensor([len(x) for x in self.x0], dtype=torch.float), 1, generator=gen))
        idx = torch.randint(len(self.x0[k]), (B,), generator=gen)
        text = self.text[k][idx]  # [B]
        if cfg.caption_dropout > 0:
            drop = torch.rand(B, generator=gen) < cfg.caption_dropout
            text = torch.where(drop, self.texts.index([""])[0], text)
        x0 = self.x0[k][idx]  # [B, 1024, 64]
        t = sample_t(B, cfg.t_sampling, mu=shift_mu(x0.shape[1]) if self.shift else None, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        width, height = self.sizes[k]
        txt = self.texts.txt[text]  # [B, 512, 4096]
        inputs = Inputs(None, prepare_img_ids(B, height // 16, width // 16), txt, prepare_txt_ids(B, txt.shape[1]),
                        self.texts.y[text])  # fmt: skip
        return Batch(x0, noise, t, torch.full((B,), cfg.guidance), inputs)  # guidance: dev's; schnell ignores it

    @torch.no_grad()
    def finish(self, model, losses: list[float], steps: int, train_seconds: float) -> None:
        """lora.safetensors, loss.png, samples.png ([training image | generated from its caption]), metrics.json."""
        cfg, run, data = self.cfg, self.run, self.data
        model.eval()
        save_lora(model, run / "lora.safetensors", format=cfg.lora_format)
        metrics = {"task": "t2i", "train_seconds": train_seconds, "steps": steps,
                   "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1), "images": len(data),
                   "lora_format": cfg.lora_format}  # fmt: skip
        save_png(line_plot({"loss": smooth(losses)}, "training loss (t2i)"), run / "loss.png")
        if cfg.sample_steps > 0:
            self.samples(model)
        write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # last: marks a finished run

    def final_files(self, model) -> list[str]:
        """What finish writes, in order: metrics.json last, as it marks a finished run."""
        return ["lora.safetensors", "loss.png", *(["samples.png"] if self.cfg.sample_steps > 0 else []), "metrics.json"]

    @torch.no_grad()
    def samples(self, model) -> None:
        """samples.png: up to 4 training images of one size, each beside the image generated from its caption."""
        cfg, run, data = self.cfg, self.run, self.data
        spec = spec_for(model)
        self.ae.to(self.device)
        width, height = data.sizes[0]
        rows, prompts = [], []
        for i in [i for i in range(len(data)) if data.sizes[i] == (width, height)][:4]:  # one size: one grid
            sample = data[i]
            noise = get_noise(1, height, width, cfg.seed + i).to(self.device, self.dtype)  # [1, 16, 64, 64]
            inp = prepare(self.texts.t5, self.texts.clip, noise, sample["caption"]).to(self.device, self.dtype)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                image = generate(model, self.ae, inp, cfg.sample_steps, spec.guidance, spec.shift)  # [1, 3, H, W]
            rows.append([sample["image"], image[0].float().cpu()])  # [3, 512, 512] each
            prompts.append(sample["caption"])
        text = {"steps": cfg.sample_steps, "guidance": spec.guidance, "captions": "\n".join(prompts)}  # the PNG's tEXt
        save_png(image_grid(rows, captions=["training image", "generated"]), run / "samples.png", text=text)
        self.ae.to("cpu")
        log(f"samples: {len(rows)} captions, {cfg.sample_steps} Euler steps, guidance {spec.guidance}")
