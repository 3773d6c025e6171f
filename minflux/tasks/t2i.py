"""Text-to-image LoRA training for FLUX.1 dev and schnell (`train.py --task t2i`; FLUX.2's: t2i_flux2.py).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minflux.files.images import image_grid, line_plot, save_png
from minflux.files.load import save_flux
from minflux.files.lora_files import save_lora
from minflux.files.weights import WeightsError, write_text_atomic
from minflux.presets import ModelSpec, spec_for
from minflux.sampling import (
    Inputs,
    generate,
    get_noise,
    pack,
    prepare,
    prepare_img_ids,
    prepare_kontext,
    prepare_txt_ids,
    sample_t,
    shift_mu,
)
from minflux.tasks.common import Batch, TextCache, frozen_parts, load_frozen, lora_transformer
from minflux.tasks.data import CaptionFolder
from minflux.tasks.progress import Progress, log, smooth


@dataclass
class Group:
    """The cached images of one size (and, for edit pairs, one control size): what one batch is drawn from."""

    size: tuple[int, int]  # (width, height) of the images, in pixels
    x0: Tensor  # [n, L, 64]  packed latents (the VAE's mean)
    text: Tensor  # [n]  each image's caption, as rows of the text cache
    refs: Tensor | None = None  # [n, L', 64]  edit pairs: the controls' packed latents
    ref_ids: Tensor | None = None  # [1, L', 3]  their ids, axis0 = 1


class T2ITask:
    """Text-to-image LoRA training for train.py: the official frozen parts, the cache, the LoRA, the samples."""

    what = "images, captions"
    name = "t2i"
    pack = staticmethod(pack)  # latent → tokens: FLUX.1's 2×2 patches (Flux2T2ITask: FLUX.2's)

    def __init__(self, cfg, run: Path, device, dtype):
        self.cfg, self.run, self.device, self.dtype = cfg, run, device, dtype
        self.data = self.dataset(cfg)
        self.train_items = list(range(len(self.data)))  # KontextTask holds some out, for its samples
        self.ae, self.clip, self.t5 = self.load_frozen(cfg, device, dtype)
        self.frozen = frozen_parts(self.ae, self.clip, self.t5)

    def load_frozen(self, cfg, device, dtype):
        """(ae, clip, t5): the VAE, the pooled text encoder and the one whose states the transformer reads."""
        return load_frozen(cfg, device, dtype)

    def dataset(self, cfg):
        return CaptionFolder(cfg.data, cfg.resolution, cfg.default_caption, cfg.on_error, cfg.buckets)

    @torch.no_grad()
    def encode(self, chunk: int = 8):
        """Everything the frozen parts compute, once, kept on the CPU: per group (image size; for pairs, the control
        size too) the packed latents (the VAE's mean, so a resumed run re-encodes to the same numbers) and each
        image's caption, and the captions' embeddings (the empty caption among them, for caption dropout). Then the
        text encoders are freed and the VAE waits on the CPU for the samples."""
        data, ae = self.data, self.ae
        device, ae_dtype = ae.encoder.conv_in.weight.device, ae.encoder.conv_in.weight.dtype
        encode = lambda images: self.pack(ae.encode(images.to(device, ae_dtype), sample=False))  # noqa: E731  [8, L, 64]
        progress, done, groups = Progress(len(self.train_items), label="encode "), 0, []
        for group in sorted({data.group(i) for i in self.train_items}):
            members = [i for i in self.train_items if data.group(i) == group]
            latents, refs, captions = [], [], []
            for start in range(0, len(members), chunk):
                samples = [
                    data[i] for i in members[start : start + chunk]
                ]  # a bad file: the next good one of its group
                latents.append(encode(torch.stack([s["image"] for s in samples])).to("cpu", self.dtype))
                if "controls" in samples[0]:  # edit pairs: the controls, one after another in the sequence
                    k_refs = range(len(samples[0]["controls"]))
                    tokens = [encode(torch.stack([s["controls"][k] for s in samples])) for k in k_refs]
                    refs.append(torch.cat(tokens, dim=1).to("cpu", self.dtype))  # [8, ΣL', 64]
                captions += [s["caption"] for s in samples]
                done += len(samples)
                progress.update(done)
            size = group if isinstance(group[0], int) else group[0]
            ref_ids = self.ref_ids(group[1]) if refs else None  # [1, ΣL', 3]
            groups.append(Group(size, torch.cat(latents), captions, torch.cat(refs) if refs else None, ref_ids))
        captions = [c for g in groups for c in g.text] + [data.caption(i) for i in self.sample_items()]
        self.texts = TextCache.encode(self.t5, self.clip, captions + [""], self.dtype)
        for g in groups:
            g.text = self.texts.index(g.text)  # [n] rows of the cache
        self.groups = groups
        self.seq_len = max(g.x0.shape[1] + (0 if g.refs is None else g.refs.shape[1]) for g in groups)
        self.seq_len += self.texts.txt.shape[1]  # image (+ control) + text tokens, at most
        del self.clip, self.t5
        self.ae.to("cpu")
        self.frozen = {"ae": self.ae}
        if data.n_skipped:  # unreadable at the check, or when encoded
            log(f"data: skipped {data.n_skipped} unusable file(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
        if data.n_default_captions:
            log(f"data: {data.n_default_captions} image(s) without a .txt caption get {self.cfg.default_caption!r}")
        sizes = ", ".join(f"{g.size[0]}×{g.size[1]} ({len(g.x0)})" for g in groups)
        log(
            f"data: {len(self.train_items)} {self.what.split(',')[0]}, {len(self.texts.texts) - 1} distinct captions; "
            f"sizes "
            f"{sizes}; text {list(self.texts.txt.shape[1:])}"
        )

    def build_model(self, device=None):
        """The frozen transformer with LoRA (fp32 LoRA weights, bf16 maths under autocast), or every weight trained
        (--full-finetune). On `device` (default: the task's; FSDP builds on the CPU and shards onto the GPU)."""
        cfg = self.cfg
        flux = lora_transformer(cfg, device or self.device, self.dtype)
        self.spec = self.spec_of(flux)  # the variant's sampling defaults: the shift of t, the samples
        trained = [p for p in flux.parameters() if p.requires_grad]
        log(
            f"model: {flux.variant or 'custom'}, {sum(p.numel() for p in flux.parameters()):,} parameters, "
            f"{sum(p.numel() for p in trained):,} trained "
            f"({'every weight' if cfg.full_finetune else f'LoRA rank {cfg.lora_rank}'})"
        )
        return flux, [{"params": trained, "lr": cfg.lr, "name": "transformer"}]

    def draw(self, gen: torch.Generator) -> Batch:
        """A global batch of one group (each as likely as its share of the images), drawn with replacement, each
        caption replaced by "" with probability caption_dropout; times (shifted by the target's token count as the
        variant's schedule is) and noise. Edit pairs: the controls appended to the sequence, at axis0 = 1."""
        cfg, B = self.cfg, self.cfg.batch_size
        k = int(torch.multinomial(torch.tensor([len(g.x0) for g in self.groups], dtype=torch.float), 1, generator=gen))
        g = self.groups[k]
        idx = torch.randint(len(g.x0), (B,), generator=gen)
        text = g.text[idx]  # [B]
        if cfg.caption_dropout > 0:
            drop = torch.rand(B, generator=gen) < cfg.caption_dropout
            text = torch.where(drop, self.texts.index([""])[0], text)
        x0 = g.x0[idx]  # [B, 1024, 64]
        t = sample_t(B, cfg.t_sampling, mu=self.mu(x0.shape[1]), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        width, height = g.size
        txt = self.texts.txt[text]  # [B, 512, 4096]
        img_ids, txt_ids = self.ids(B, height // 16, width // 16, txt.shape[1])
        inputs = Inputs(None, img_ids, txt, txt_ids, None if self.texts.y is None else self.texts.y[text])
        if g.refs is not None:
            inputs.img_cond_seq, inputs.img_cond_seq_ids = g.refs[idx], g.ref_ids.expand(B, -1, -1)  # [B, 1024, 64]
        return Batch(x0, noise, t, self.guidance(B), inputs)

    def spec_of(self, flux) -> ModelSpec:
        """The variant's sampling defaults, the transformer checked to be one this task trains."""
        if flux.params.in_channels != 64:
            raise WeightsError(
                f"{self.cfg.flux}: a transformer with {flux.params.in_channels} input channels "
                f"({flux.variant or 'custom'}); --task {self.cfg.task} trains FLUX.1 dev, schnell or Kontext (64)"
            )
        return spec_for(flux)

    def mu(self, seq_len: int) -> float | None:
        """The shift of the training times: dev's are shifted like its schedule, schnell's are not."""
        return shift_mu(seq_len) if self.spec.shift else None

    def ids(self, batch: int, h: int, w: int, txt_len: int) -> tuple[Tensor, Tensor]:
        """The ids of an h × w grid of image tokens and of the text: [B, h · w, 3], [B, T, 3]."""
        return prepare_img_ids(batch, h, w), prepare_txt_ids(batch, txt_len)

    def ref_ids(self, sizes: list[tuple[int, int]]) -> Tensor:
        """The ids of references of these (width, height), one after another: reference k at axis0 = k + 1, as
        Kontext's sampling places them (kontext_condition) → [1, ΣL', 3]."""
        ids = [prepare_img_ids(1, h // 16, w // 16, axis0=k + 1.0) for k, (w, h) in enumerate(sizes)]
        return torch.cat(ids, dim=1)

    def guidance(self, batch: int) -> Tensor | None:
        return torch.full((batch,), self.cfg.guidance)  # [B]  dev's guidance embedding; schnell ignores it

    @torch.no_grad()
    def finish(self, model, losses: list[float], steps: int, train_seconds: float) -> None:
        """lora.safetensors, loss.png, samples.png, and metrics.json last (it marks a finished run)."""
        cfg, run = self.cfg, self.run
        model.eval()
        if cfg.full_finetune:
            save_flux(model, run / "transformer.safetensors")
        else:
            save_lora(model, run / "lora.safetensors", format=cfg.lora_format)
        metrics = {
            "task": cfg.task,
            "train_seconds": train_seconds,
            "steps": steps,
            "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
            "images": len(self.data),
            "lora_format": cfg.lora_format,
        }
        save_png(line_plot({"loss": smooth(losses)}, f"training loss ({cfg.task})"), run / "loss.png")
        if cfg.sample_steps > 0:
            self.samples(model, run / "samples.png")
        write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # last: marks a finished run

    def final_files(self, model) -> list[str]:
        """What finish writes, in order: metrics.json last, as it marks a finished run."""
        weights = "transformer.safetensors" if self.cfg.full_finetune else "lora.safetensors"
        return [weights, "loss.png", *(["samples.png"] if self.cfg.sample_steps > 0 else []), "metrics.json"]

    def sample_items(self) -> list[int]:
        """The images whose caption is sampled: up to four training images of the first one's size (one grid)."""
        first = self.data.group(self.train_items[0])
        return [i for i in self.train_items if self.data.group(i) == first][:4]

    @torch.no_grad()
    def samples(self, model, path: Path) -> Path:
        """A grid of [training image | generated from its caption] (edit pairs: [controls | edited | target]), each
        from the noise of seed + i, at the variant's sampling guidance."""
        cfg, data = self.cfg, self.data
        was_training = model.training
        model.eval()
        sampler, spec = self.sampler(model)  # the trained model (FLUX.2: or the distilled klein with its LoRA)
        steps = cfg.sample_steps if sampler is model else spec.num_steps
        self.ae.to(self.device)
        rows, prompts = [], []
        to = lambda inputs: inputs if inputs is None else inputs.to(self.device, self.dtype)  # noqa: E731
        for i in self.sample_items():
            sample = data[i]
            width, height = data.sizes[i]
            noise = self.noise(height, width, cfg.seed + i).to(self.device, self.dtype)  # [1, 16, 64, 64]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                inp, negative = self.sample_inputs(sample, noise)
                image = generate(
                    sampler, self.ae, to(inp), steps, spec.guidance, spec.shift, to(negative), spec.true_cfg
                )
                image = image[0].float().cpu()  # [3, H, W]
            rows.append(
                [*sample["controls"], image, sample["image"]] if "controls" in sample else [sample["image"], image]
            )
            prompts.append(sample["caption"])
        k_refs = len(rows[0]) - 2  # edit pairs: the controls first
        controls = ["control"] if k_refs == 1 else [f"reference {k + 1}" for k in range(k_refs)]
        captions = [*controls, "edited", "target"] if k_refs else ["training image", "generated"]
        text = {"steps": steps, "guidance": spec.guidance, "captions": "\n".join(prompts)}  # the PNG's tEXt
        if spec.true_cfg != 1.0:
            text["true_cfg"] = spec.true_cfg
        save_png(image_grid(rows, captions=captions), path, text=text)
        self.ae.to("cpu")
        model.train(was_training)
        cfg_ = f', true CFG {spec.true_cfg} against ""' if spec.true_cfg != 1.0 else ""
        by = "" if sampler is model else f" by {cfg.sample_flux} with the LoRA"
        log(f"samples: {len(rows)} captions{by}, {steps} Euler steps, guidance {spec.guidance}{cfg_} → {path}")
        return path

    def sampler(self, model):
        """(the model that draws the samples, its sampling defaults): the trained one."""
        return model, self.spec

    def noise(self, height: int, width: int, seed: int) -> Tensor:
        return get_noise(1, height, width, seed)  # [1, 16, H/8, W/8]

    def sample_inputs(self, sample: dict, noise: Tensor) -> tuple[Inputs, Inputs | None]:
        """The inputs of a sample from its caption (edit pairs: and its control), the text from the cache; and the
        empty caption's for true CFG (None: FLUX.1's variants sample without it)."""
        if "controls" in sample:
            controls = [c[None].to(self.device, self.dtype) for c in sample["controls"]]  # [1, 3, H', W'] each
            return prepare_kontext(self.texts.t5, self.texts.clip, noise, sample["caption"], self.ae, controls), None
        return prepare(self.texts.t5, self.texts.clip, noise, sample["caption"]), None
