"""vis2ir: visible → infrared translation as FLUX.1-Fill in-context inpainting, guided by a semantic map.

The training step, with the shapes of the vis2ir design (512-pixel panels, batch 4):

    triptych [B, 3, 512, 1536] = [visible | infrared target | semantic]
    diptych  [B, 3, 512, 1024] = [visible | target];  mask [B, 1, 512, 1024] = 1 on the target half
    x_0      [B, 2048, 64]   packed latent of the diptych (the clean image the flow ends at)
    x_cond   [B, 2048, 320]  Fill condition: packed latent of the diptych with the target erased (64)
                             + the packed 8×8 mask (256)
    semantic [B, 1024, 64]   packed latent of the semantic panel (frozen VAE, no gradient)
    x_t = (1 − t) x_0 + t ε;  x_t' = injection(x_t, semantic)  → cat(x_t', x_cond) [B, 2048, 384]
    v = FLUX-Fill(...) [B, 2048, 64];  loss = MSE(v, ε − x_0) over the whole diptych (the sampler denoises
    both halves), or with target_only over the target half alone

Design choice (the vis2ir design writes [B, 2048, 64] for the semantic tokens, but a 512×512 panel packs to
[B, 1024, 64]): the semantic panel is encoded alone, 1024 tokens, and its tokens get the position ids of
the *target* half of the diptych. The 2048 image queries attend to those 1024 keys; with positions on
(semantic="xattn_rope") a target token and the semantic token of the same place share (row, col).

The injection designs (`--semantic`) are model code, in minflux/semantic.py (Vis2IR). This file holds the task:
the triptych encoding, the training batches, the held-out evaluation and the run folder's files.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minflux.autoencoder import Flux2AutoEncoder
from minflux.files.images import DataError, image_grid, line_plot, save_png
from minflux.files.load import save_flux
from minflux.files.lora_files import save_lora
from minflux.files.weights import save_atomic, write_text_atomic
from minflux.sampling import (
    Inputs,
    fill_condition,
    generate,
    get_noise,
    latent_ids,
    pack,
    kontext_condition,
    prepare_fill,
    prepare_kontext,
    prepare_img_ids,
    prepare_txt_ids,
    sample_t,
    shift_mu,
)
from minflux.hooks import stage
from minflux.semantic import Vis2IR
from minflux.tasks.common import Batch, TextCache, frozen_parts, load_frozen, lora_transformer
from minflux.tasks.common import scratch_transformer
from minflux.tasks.data import TriptychFolder, captions, triptychs
from minflux.tasks.progress import Progress, log, smooth
from minflux.tasks.scenes import SyntheticTriptychs, split_triptych

SEMANTIC_TOKEN_MODES = (
    "zeroconv",
    "xattn",
    "xattn_rope",
    "blocks",
    "adapters",
)  # the modes that read the semantic tokens


# --- the triptych, encoded --------------------------------------------------------------------------------------


@stage
def target_mask(batch: int, height: int, width: int, device=None) -> Tensor:
    """The Fill mask of a diptych height × width: 1 on the right (target) half, where the model generates."""
    mask = torch.zeros(batch, 1, height, width, device=device)
    mask[..., width // 2 :] = 1.0
    return mask  # [B, 1, 512, 1024]


def right_half_ids(batch: int, h: int, w: int, device=None) -> Tensor:
    """Ids of the target half of an h × 2w token grid, for the semantic panel's h × w tokens."""
    ids = prepare_img_ids(batch, h, w, device=device).clone()  # an h × w grid: rows, cols 0..w-1
    ids[..., 2] += w  # shifted to the right half's columns
    return ids  # [B, 1024, 3]


def diptych(triptych: Tensor, semantic: str, pixel_alpha: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(diptych [B, 3, H, 2H] = [visible | target], its Fill mask [B, 1, H, 2H], the semantic panel [B, 3, H, H])."""
    visible, infrared, sem_img = panels(triptych, semantic, pixel_alpha)
    pair = torch.cat((visible, infrared), dim=-1)  # [B, 3, 512, 1024]
    B, _, H, W = pair.shape
    return pair, target_mask(B, H, W, device=pair.device), sem_img


def panels(triptych: Tensor, semantic: str, pixel_alpha: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(visible, infrared, semantic) [B, 3, H, H] each; with semantic="pixel" the map blended into the visible panel
    (the vis2ir design's baseline)."""
    visible, infrared, sem_img = split_triptych(triptych)  # [B, 3, 512, 512] each
    if semantic == "pixel":
        visible = (1 - pixel_alpha) * visible + pixel_alpha * sem_img
    return visible, infrared, sem_img


def reference_images(visible: Tensor, semantic_map: Tensor, semantic: str) -> list[Tensor]:
    """The references of an in-context edit: the visible panel, and the semantic map with --semantic reference."""
    return [visible, semantic_map] if semantic == "reference" else [visible]


def semantic_tokens(
    ae, sem_img: Tensor, semantic: str, in_context: str = "fill", layout: str = "panel"
) -> dict[str, Tensor]:
    """The semantic panel's tokens and their ids, for the modes that read them (else {}). layout "panel": the map
    alone, at the ids of the target's place (the right half of the diptych, Fill) or of the generated image
    (Kontext); "diptych": the map beside itself, [B, 2048, 64] at the diptych's ids, one token per x_t token."""
    if semantic not in SEMANTIC_TOKEN_MODES:
        return {}
    if layout == "diptych":
        s = ae.encode(torch.cat((sem_img, sem_img), dim=-1), sample=False)  # [B, 16, 64, 128]
        return {"semantic": pack(s), "semantic_ids": latent_ids(s)}  # [B, 2048, 64], [B, 2048, 3]
    s = ae.encode(sem_img, sample=False)  # [B, 16, 64, 64]
    B, h, w = s.shape[0], s.shape[2] // 2, s.shape[3] // 2
    ids = right_half_ids(B, h, w, device=s.device) if in_context == "fill" else latent_ids(s)
    return {"semantic": pack(s), "semantic_ids": ids}  # [B, 1024, 64], [B, 1024, 3]


@dataclass
class Encoded:
    """What the frozen VAE makes of triptychs, for training: one row per triptych. Fill: the diptych and its Fill
    condition; Kontext: the infrared panel and the references (the visible panel, the semantic map)."""

    x0: Tensor  # [B, 2048, 64]  the latent to generate: the diptych's (Fill), the infrared panel's (Kontext)
    img_ids: Tensor  # [B, 2048, 3]
    semantic: dict[str, Tensor]  # semantic [B, 1024, 64], semantic_ids [B, 1024, 3], or nothing
    x_cond: Tensor | None = None  # [B, 2048, 320]  Fill condition
    target_tokens: Tensor | None = None  # [B, 2048] bool: the diptych's target half (Fill)
    refs: Tensor | None = None  # [B, 1024 · k, 64]  Kontext: the k references' tokens
    ref_ids: Tensor | None = None  # [B, 1024 · k, 3]  at axis0 = 1, 2

    def rows(self, idx) -> "Encoded":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Encoded(
            self.x0[idx],
            self.img_ids[idx],
            {k: v[idx] for k, v in self.semantic.items()},
            pick(self.x_cond),
            pick(self.target_tokens),
            pick(self.refs),
            pick(self.ref_ids),
        )


@stage
@torch.no_grad()
def encode_triptych(
    ae,
    triptych: Tensor,
    semantic: str = "xattn_rope",
    pixel_alpha: float = 0.5,
    in_context: str = "fill",
    layout: str = "panel",
) -> Encoded:
    """The frozen-VAE part of the training step: everything the trainable part needs, from a batch of triptychs."""
    if in_context == "kontext":
        visible, infrared, sem_img = panels(triptych, semantic, pixel_alpha)
        z = ae.encode(infrared, sample=False)  # [B, 16, 64, 64]
        refs, ref_ids = kontext_condition(ae, reference_images(visible, sem_img, semantic))
        return Encoded(
            pack(z), latent_ids(z), semantic_tokens(ae, sem_img, semantic, in_context), refs=refs, ref_ids=ref_ids
        )
    pair, mask, sem_img = diptych(triptych, semantic, pixel_alpha)
    z = ae.encode(pair, sample=False)  # [B, 16, 64, 128]
    return Encoded(
        x0=pack(z),  # [B, 2048, 64]
        img_ids=latent_ids(z),  # [B, 2048, 3]
        semantic=semantic_tokens(ae, sem_img, semantic, layout=layout),
        x_cond=fill_condition(ae, pair, mask),  # [B, 2048, 320]
        target_tokens=pack(mask[:, :, ::8, ::8].expand(-1, 4, -1, -1))[..., 0] > 0.5,  # [B, 2048] bool
    )


@stage
@torch.no_grad()
def prepare_vis2ir(
    t5,
    clip,
    noise: Tensor,
    prompts: list[str],
    ae,
    triptych: Tensor,
    semantic: str,
    in_context: str = "fill",
    layout: str = "panel",
) -> Inputs:
    """Sampling inputs. Fill: the diptych with its target half to generate (prepare_fill); Kontext: the infrared
    panel to generate, the visible panel (and the semantic map) as references (prepare_kontext). Then the semantic
    tokens. The triptychs' middle (target) panel is not read."""
    if in_context == "kontext":
        visible, _, sem_img = panels(triptych, semantic)
        references = reference_images(visible, sem_img, semantic)
        inp = prepare_kontext(t5, clip, noise, prompts, ae, references)  # img [B, 1024, 64], img_cond_seq
    else:
        pair, mask, sem_img = diptych(triptych, semantic)
        inp = prepare_fill(t5, clip, noise, prompts, ae, pair, mask)  # img [B, 2048, 64], img_cond [B, 2048, 320]
    tokens = semantic_tokens(ae, sem_img, semantic, in_context, layout)
    inp.extra = {k: v.to(noise) if not k.endswith("_ids") else v for k, v in tokens.items()}
    return inp


@torch.no_grad()
def generate_infrared(model, ae, inp: Inputs, num_steps: int, guidance: float, in_context: str = "fill") -> Tensor:
    """The generated infrared panels [B, 3, H, W]: the target half of each diptych (Fill), or the image (Kontext)."""
    out = generate(model, ae, inp, num_steps, guidance, shift=True)  # [B, 3, 512, 1024] or [B, 3, 512, 512]
    return out[..., out.shape[-1] // 2 :] if in_context == "fill" else out  # [B, 3, 512, 512]


@torch.no_grad()
def reconstruct_infrared(ae, triptych: Tensor, semantic: str, in_context: str = "fill") -> Tensor:
    """The VAE's own reconstruction of the infrared panels [B, 3, H, H], encoded as the task encodes them (in the
    diptych for Fill, alone for Kontext): how close the latents the transformer learns can bring it to the truth."""
    x = diptych(triptych, semantic)[0] if in_context == "fill" else split_triptych(triptych)[1]
    out = ae.decode(ae.encode(x, sample=False))  # [B, 3, 512, 1024] or [B, 3, 512, 512]
    return out[..., -triptych.shape[-2] :]  # the infrared panel: the right half of the diptych, or all of it


def in_context_of(cfg) -> str:
    """How a run's config puts the visible panel in context: "kontext" for --task kontext, else "fill"."""
    return "kontext" if cfg.task == "kontext" else "fill"


def vis2ir_model(flux, cfg) -> Vis2IR:
    """The transformer with the semantic injection a run's config asks for."""
    return Vis2IR(
        flux,
        cfg.semantic,
        cfg.adapter_layers,
        cfg.adapter_heads,
        in_context_of(cfg),
        cfg.adapter_width,
        cfg.adapter_every,
        cfg.adapter_scale_init,
    )


def noise_for(triptych: Tensor, in_context: str, seed: int) -> Tensor:
    """The starting noise of each scene's generated image (seed + i for scene i): [N, 16, S/8, S/4] for the Fill
    diptych, [N, 16, S/8, S/8] for Kontext's single panel."""
    S = triptych.shape[-2]
    return get_noise(len(triptych), S, 2 * S if in_context == "fill" else S, seed)


def prepare_for_run(cfg, t5, clip, ae, triptych: Tensor, prompts: list[str], seed: int, dtype) -> Inputs:
    """prepare_vis2ir as a run's config says (its in-context design, semantic mode and layout), from the noise of
    seed + i for scene i in `dtype`: the held-out evaluation, sample.py and the attention maps all start here. A
    FLUX.2 run (its VAE tells it) takes its own: vis2ir_flux2.prepare_vis2ir_flux2."""
    if isinstance(ae, Flux2AutoEncoder):
        from minflux.tasks.vis2ir_flux2 import prepare_vis2ir_flux2

        return prepare_vis2ir_flux2(cfg, t5, ae, triptych, prompts, seed, dtype)
    in_context = in_context_of(cfg)
    noise = noise_for(triptych, in_context, seed).to(triptych.device, dtype)  # [N, 16, S/8, S/4] (Fill)
    return prepare_vis2ir(t5, clip, noise, prompts, ae, triptych, cfg.semantic, in_context, cfg.semantic_layout)


def datasets(cfg, heldout: int | None = None):
    """(train, held-out): generated scenes (`heldout` of them, or heldout_samples), or a triptych folder whose last
    tenth (at least one, at most heldout_samples) is held out; a folder of fewer than 2 usable triptychs is an error."""
    if cfg.data is None:
        return (
            SyntheticTriptychs(cfg.train_samples, cfg.panel_size, "train", cfg.seed),
            SyntheticTriptychs(heldout or cfg.heldout_samples, cfg.panel_size, "heldout", cfg.seed),
        )
    folder = TriptychFolder(cfg.data, size=cfg.panel_size, on_error=cfg.on_error)
    if folder.n_skipped:
        log(f"data: skipped {folder.n_skipped} unusable file(s), e.g. {folder.skipped[0][0]}: {folder.skipped[0][1]}")
    if len(folder) < 2:
        raise DataError(
            folder.root,
            f"{len(folder)} usable triptych: too few to hold any out for the evaluation; "
            "at least 2 are needed (one to train on, one held out)",
        )
    n_held = min(cfg.heldout_samples, max(1, len(folder) // 10))
    n_train = len(folder) - n_held
    return torch.utils.data.Subset(folder, range(n_train)), torch.utils.data.Subset(folder, range(n_train, len(folder)))


# --- the task: what train.py runs ---------------------------------------------------------------------------------


class Vis2IRTask:
    """vis2ir training for train.py: the frozen parts, the encoded data, the model, the batches, the evaluation.

    The visible panel is in context as FLUX.1-Fill takes an image (the diptych, --task vis2ir) or as FLUX.1-Kontext
    takes a reference (the sequence, --task kontext on the generated scenes)."""

    what = "triptychs, captions"

    def __init__(self, cfg, run: Path, device, dtype):
        self.cfg, self.run, self.device, self.dtype = cfg, run, device, dtype
        self.in_context = in_context_of(cfg)
        self.train_set, self.heldout_set = datasets(cfg)
        self.ae, self.clip, self.t5 = self.load_frozen()
        self.frozen = frozen_parts(self.ae, self.clip, self.t5)

    def load_frozen(self):
        """(ae, clip, t5): the official ones the config names, or the embedded default's, made for this run."""
        if self.cfg.flux:
            return load_frozen(self.cfg, self.device, self.dtype)
        from minflux.tasks.embedded import embedded_parts

        return embedded_parts(self.cfg, self.train_set, self.run, self.device)

    @torch.no_grad()
    def encode(self):
        """Everything the frozen parts compute, once: the training cache, and the held-out scenes' sampling inputs.
        The text encoders are freed after it."""
        cfg, data, ae_dtype = self.cfg, self.train_set, self.ae.encoder.conv_in.weight.dtype
        parts, progress = [], Progress(len(data), label="encode ")
        for start in range(0, len(data), 32):
            batch = triptychs(data, range(start, min(start + 32, len(data))))
            parts.append(self.encode_scenes(batch.to(self.device, ae_dtype)))
            if start % 256 == 0 or start + 32 >= len(data):
                progress.update(min(start + 32, len(data)))

        def cat(name, xs):  # on the CPU; the floating tensors in the training dtype, the ids in float32
            if xs[0] is None:
                return None
            keep = not xs[0].is_floating_point() or name.endswith("ids")
            return torch.cat(xs).to("cpu", None if keep else self.dtype)

        fields = ("x0", "img_ids", "semantic", "x_cond", "target_tokens", "refs", "ref_ids")
        self.cache = Encoded(
            *(
                cat(k, [getattr(p, k) for p in parts])
                if k != "semantic"
                else {n: cat(n, [p.semantic[n] for p in parts]) for n in parts[0].semantic}
                for k in fields
            )
        )
        self.texts = TextCache.encode(self.t5, self.clip, captions(data), self.dtype)
        self.text_index = self.texts.index(captions(data))  # [N]
        self.seq_len = self.cache.x0.shape[1] + self.texts.txt.shape[1]  # image + text tokens

        held = triptychs(self.heldout_set)  # [N, 3, S, 3S]
        self.held = prepare_for_run(
            cfg,
            self.t5,
            self.clip,
            self.ae,
            held.to(self.device, ae_dtype),
            captions(self.heldout_set),
            cfg.seed,
            self.dtype,
        ).to("cpu")
        context = self.cache.x_cond if self.cache.x_cond is not None else self.cache.refs
        log(
            f"data: {len(data)} train, {len(held)} held-out; x0 {list(self.cache.x0.shape[1:])}, "
            f"{'x_cond' if self.in_context == 'fill' else 'references'} {list(context.shape[1:])}, "
            f"text {list(self.texts.txt.shape[1:])}"
        )
        del self.clip, self.t5  # done: freed before the transformer trains
        self.frozen = {"ae": self.ae}

    def encode_scenes(self, triptychs: Tensor) -> Encoded:
        """The training cache's rows of these triptychs (encode_triptych as the run's config says)."""
        cfg = self.cfg
        return encode_triptych(self.ae, triptychs, cfg.semantic, in_context=self.in_context, layout=cfg.semantic_layout)

    def build_model(self, device=None):
        """The Fill transformer with the semantic injection, and the optimiser's groups: the transformer's trained
        parameters (all of them from scratch or with --full-finetune, the LoRA's on given weights) and the
        injection's. On `device` (default: the task's; FSDP builds on the CPU and shards onto the GPU)."""
        cfg, device = self.cfg, device or self.device
        flux = lora_transformer(cfg, device, self.dtype) if cfg.flux else scratch_transformer(cfg, device)
        trained = [p for p in flux.parameters() if p.requires_grad]
        model = vis2ir_model(flux, cfg)
        model.to(device) if cfg.flux else model.to(device, self.dtype)  # the LoRA stays fp32
        adapter = [p for n, p in model.named_parameters() if not n.startswith("flux.")]
        groups = [{"params": trained, "lr": cfg.lr, "name": "transformer"}]
        if adapter:
            groups.append({"params": adapter, "lr": cfg.adapter_lr or cfg.lr, "name": "adapter"})
        log(
            f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{sum(p.numel() for p in trained + adapter):,} trained{' (LoRA + adapter)' if self.uses_lora else ''}; "
            f"semantic injection {sum(p.numel() for p in adapter):,}"
        )
        return model, groups

    @property
    def uses_lora(self) -> bool:
        """A LoRA on given weights (written as lora.safetensors); else every weight trained
        (transformer.safetensors)."""
        return bool(self.cfg.flux) and not self.cfg.full_finetune

    def draw(self, gen: torch.Generator) -> Batch:
        """A global batch: scenes drawn with replacement, logit-normal times shifted by the token count, noise."""
        cfg, enc = self.cfg, self.cache
        B, (L, C) = cfg.batch_size, enc.x0.shape[1:]
        idx = torch.randint(len(enc.x0), (B,), generator=gen)
        t = sample_t(B, cfg.t_sampling, mu=self.mu(L), generator=gen)
        noise = torch.randn((B, L, C), generator=gen)
        rows, text = enc.rows(idx), self.text_index[idx]
        txt = self.texts.txt[text]  # [B, 512, 4096]
        inputs = Inputs(
            None,
            rows.img_ids,
            txt,
            self.txt_ids(B, txt.shape[1]),
            None if self.texts.y is None else self.texts.y[text],
            img_cond=rows.x_cond,
            img_cond_seq=rows.refs,
            img_cond_seq_ids=rows.ref_ids,
            extra=rows.semantic,
        )
        return Batch(rows.x0, noise, t, self.guidance(B), inputs, rows.target_tokens if cfg.target_only else None)

    def mu(self, seq_len: int) -> float:
        return shift_mu(seq_len)  # the training times shifted by the token count, as dev's schedule is

    def txt_ids(self, batch: int, length: int) -> Tensor:
        return prepare_txt_ids(batch, length)  # [B, T, 3] zeros

    def guidance(self, batch: int) -> Tensor | None:
        return torch.full((batch,), self.cfg.guidance)  # [B]

    def final_files(self, model) -> list[str]:
        """What finish writes, in order: metrics.json last, as it marks a finished run."""
        weights = "lora.safetensors" if self.uses_lora else "transformer.safetensors"
        adapter = ["adapter.safetensors"] if model.injection_state_dict() else []
        scales = ["scales.png"] if model.scales else []
        return [weights, *adapter, "loss.png", *scales, "samples.png", "metrics.json"]

    @torch.no_grad()
    def generate_heldout(self, model, n: int | None = None) -> Tensor:
        """The generated infrared panels of the first n held-out scenes (all by default), [n, 3, S, S] on the CPU."""
        was_training = model.training
        model.eval()
        held = self.held if n is None else self.held.map(lambda name, t: t[:n])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):  # as trained
            out = (
                generate_infrared(
                    model,
                    self.ae,
                    held.to(self.device, self.dtype),
                    self.cfg.sample_steps,
                    self.cfg.guidance,
                    self.in_context,
                )
                .float()
                .cpu()
            )
        model.train(was_training)
        return out

    def grid(self, generated: Tensor, path: Path, text: dict) -> Path:
        """samples.png: [visible | semantic | generated | ground truth] for the first held-out scenes."""
        visible, truth, semantic = split_triptych(triptychs(self.heldout_set, range(min(len(generated), 8))))
        rows = [[visible[i], semantic[i], generated[i], truth[i]] for i in range(len(visible))]
        return save_png(
            image_grid(rows, captions=["visible", "semantic", "generated", "ground truth"]), path, text=text
        )

    def samples(self, model, path: Path) -> Path:
        """The samples of --sample-every: four held-out scenes, as samples.png shows them."""
        return self.grid(self.generate_heldout(model, 4), path, {"steps": str(self.cfg.sample_steps)})

    @torch.no_grad()
    def finish(self, model, losses: list[float], steps: int, train_seconds: float) -> None:
        """Held-out MSE and PSNR of the generated infrared panels; the weights, metrics, loss.png and samples.png."""
        cfg, run = self.cfg, self.run
        generated = self.generate_heldout(model)
        n = len(generated)
        held = triptychs(self.heldout_set)
        truth = split_triptych(held)[1]
        mse = ((generated.clamp(-1, 1) - truth) / 2).pow(2).mean().item()  # in [0, 1] pixel units
        ae_dtype = self.ae.encoder.conv_in.weight.dtype
        recon = torch.cat(
            [
                reconstruct_infrared(self.ae, part.to(self.device, ae_dtype), cfg.semantic, self.in_context)
                .float()
                .cpu()
                for part in held.split(8)
            ]
        )
        vae_mse = ((recon.clamp(-1, 1) - truth) / 2).pow(2).mean().item()
        metrics = {
            "heldout_mse": mse,
            "heldout_psnr": 10 * math.log10(1 / mse),
            "vae_psnr": 10 * math.log10(1 / vae_mse),  # the VAE's reconstruction of the same panels
            "train_seconds": train_seconds,
            "steps": steps,
            "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
            "task": cfg.task,
            "semantic": cfg.semantic,
            "adapter_scales": model.scales,
        }
        if self.uses_lora:
            save_lora(model.flux, run / "lora.safetensors", format=cfg.lora_format)
        else:
            save_flux(model.flux, run / "transformer.safetensors", variant=None if cfg.flux else cfg.preset)
        injection = model.injection_state_dict()
        if injection:
            save_atomic(injection, run / "adapter.safetensors", metadata={"minflux.semantic": cfg.semantic})
        save_png(line_plot({"loss": smooth(losses)}, f"training loss ({cfg.semantic})"), run / "loss.png")
        if model.scales:  # every scale or gate over the steps, from log.jsonl (whole after a resume)
            with open(run / "log.jsonl", encoding="utf-8") as f:
                history = [json.loads(line)["scales"] for line in f]
            series = {
                f"{'scale' if cfg.semantic != 'adapters' else 'gate'} {i}": [h[i] for h in history]
                for i in range(len(model.scales))
            }
            save_png(line_plot(series, f"injection scales ({cfg.semantic})", log_y=False), run / "scales.png")
        self.grid(generated, run / "samples.png", {"heldout_psnr": f"{metrics['heldout_psnr']:.2f}"})
        write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # last: marks a finished run
        log(
            f"held-out: mse {mse:.5f}, psnr {metrics['heldout_psnr']:.2f} dB ({cfg.sample_steps} Euler steps, "
            f"{n} scenes);"
            f" the VAE's reconstruction of them {metrics['vae_psnr']:.2f} dB"
        )
