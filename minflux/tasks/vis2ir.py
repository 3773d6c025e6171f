"""vis2ir: visible → infrared translation as FLUX.1-Fill in-context inpainting, guided by a semantic map.

The training step, with the shapes of the vis2ir notes (512-pixel panels, batch 4):

    triptych [B, 3, 512, 1536] = [visible | infrared target | semantic]
    diptych  [B, 3, 512, 1024] = [visible | target];  mask [B, 1, 512, 1024] = 1 on the target half
    x_0      [B, 2048, 64]   packed latent of the diptych (the clean image the flow ends at)
    x_cond   [B, 2048, 320]  Fill condition: packed latent of the diptych with the target erased (64)
                             + the packed 8×8 mask (256)
    semantic [B, 1024, 64]   packed latent of the semantic panel (frozen VAE, no gradient)
    x_t = (1 − t) x_0 + t ε;  x_t' = injection(x_t, semantic)  → cat(x_t', x_cond) [B, 2048, 384]
    v = FLUX-Fill(...) [B, 2048, 64];  loss = MSE(v, ε − x_0) over the whole diptych (the sampler denoises
    both halves), or with target_only over the target half alone

Design choice (the notes write [B, 2048, 64] for the semantic tokens, but a 512×512 panel packs to
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

from minflux.files.images import DataError, image_grid, line_plot, save_png
from minflux.files.load import load_ae, load_clip, load_flux, load_t5, save_flux
from minflux.files.lora_files import load_lora, save_lora
from minflux.files.weights import WeightsError, read_state_dict, save_atomic, write_text_atomic
from minflux.lora import inject_lora
from minflux.model import Flux
from minflux.presets import configs
from minflux.sampling import (
    Inputs,
    fill_condition,
    generate,
    get_noise,
    latent_ids,
    pack,
    prepare_fill,
    prepare_img_ids,
    prepare_txt_ids,
    sample_t,
    shift_mu,
)
from minflux.hooks import stage
from minflux.semantic import Vis2IR
from minflux.tasks.common import Batch, TextCache, load_frozen
from minflux.tasks.data import TriptychFolder, captions, triptychs
from minflux.tasks.runs import Progress, Run, log, read_run, smooth
from minflux.tasks.scenes import SyntheticTriptychs, split_triptych

SEMANTIC_TOKEN_MODES = ("zeroconv", "xattn", "xattn_rope", "blocks")  # the modes that read the semantic tokens


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
    visible, infrared, sem_img = split_triptych(triptych)  # [B, 3, 512, 512] each
    if semantic == "pixel":  # the notes' baseline: the map blended into the visible panel
        visible = (1 - pixel_alpha) * visible + pixel_alpha * sem_img
    pair = torch.cat((visible, infrared), dim=-1)  # [B, 3, 512, 1024]
    B, _, H, W = pair.shape
    return pair, target_mask(B, H, W, device=pair.device), sem_img


def semantic_tokens(ae, sem_img: Tensor, semantic: str) -> dict[str, Tensor]:
    """The semantic panel's tokens and their ids (the target half's), for the modes that read them; else {}."""
    if semantic not in SEMANTIC_TOKEN_MODES:
        return {}
    s = ae.encode(sem_img, sample=False)  # [B, 16, 64, 64]
    return {"semantic": pack(s), "semantic_ids": right_half_ids(s.shape[0], s.shape[2] // 2, s.shape[3] // 2,
                                                                  device=s.device)}  # [B, 1024, 64], [B, 1024, 3]


@dataclass
class Encoded:
    """What the frozen VAE makes of triptychs, for training: one row per triptych."""

    x0: Tensor  # [B, 2048, 64]  the diptych's latent
    x_cond: Tensor  # [B, 2048, 320]  Fill condition
    img_ids: Tensor  # [B, 2048, 3]
    target_tokens: Tensor  # [B, 2048] bool: the target half
    semantic: dict[str, Tensor]  # semantic [B, 1024, 64], semantic_ids [B, 1024, 3], or nothing

    def rows(self, idx) -> "Encoded":
        return Encoded(self.x0[idx], self.x_cond[idx], self.img_ids[idx], self.target_tokens[idx],
                       {k: v[idx] for k, v in self.semantic.items()})  # fmt: skip


@stage
@torch.no_grad()
def encode_triptych(ae, triptych: Tensor, semantic: str = "xattn_rope", pixel_alpha: float = 0.5) -> Encoded:
    """The frozen-VAE part of the training step: everything the trainable part needs, from a batch of triptychs."""
    pair, mask, sem_img = diptych(triptych, semantic, pixel_alpha)
    z = ae.encode(pair, sample=False)  # [B, 16, 64, 128]
    return Encoded(
        x0=pack(z),  # [B, 2048, 64]
        x_cond=fill_condition(ae, pair, mask),  # [B, 2048, 320]
        img_ids=latent_ids(z),  # [B, 2048, 3]
        target_tokens=pack(mask[:, :, ::8, ::8].expand(-1, 4, -1, -1))[..., 0] > 0.5,  # [B, 2048] bool
        semantic=semantic_tokens(ae, sem_img, semantic),
    )


@stage
@torch.no_grad()
def prepare_vis2ir(t5, clip, noise: Tensor, prompts: list[str], ae, triptych: Tensor, semantic: str) -> Inputs:
    """Sampling inputs: the Fill inputs of the diptych with its target half to generate, and the semantic tokens.
    The triptychs' middle (target) panel is not read: the Fill condition erases it."""
    pair, mask, sem_img = diptych(triptych, semantic)
    inp = prepare_fill(t5, clip, noise, prompts, ae, pair, mask)  # img [B, 2048, 64], img_cond [B, 2048, 320]
    inp.extra = {k: v.to(noise) if not k.endswith("_ids") else v for k, v in semantic_tokens(ae, sem_img, semantic).items()}
    return inp


@torch.no_grad()
def generate_infrared(model, ae, inp: Inputs, num_steps: int, guidance: float) -> Tensor:
    """The target half of each generated diptych: the infrared panels [B, 3, H, W]."""
    pair = generate(model, ae, inp, num_steps, guidance, shift=True)  # [B, 3, 512, 1024]
    return pair[..., pair.shape[-1] // 2 :]  # [B, 3, 512, 512]


# --- a finished run, loaded ---------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A finished vis2ir run, loaded."""

    model: Vis2IR  # the Fill transformer (its LoRA loaded) with the semantic injection
    ae: object  # AutoEncoder
    clip: object  # CLIPEmbedder
    t5: object  # T5Embedder
    run: Run  # its config and files


def load_run(folder, device="cpu", dtype=None) -> LoadedRun:
    """A finished vis2ir run folder, loaded from its files and the base weights its config names."""
    run = read_run(folder)
    if run.weights.flux is None:
        raise WeightsError(f"{folder}: holds no transformer.safetensors and its config.toml names no --flux")
    cfg, paths = run.config, run.weights.require(folder)
    flux = load_flux(paths.flux, device=device, dtype=dtype)
    if run.lora is not None:
        load_lora(flux, run.lora)
    model = Vis2IR(flux, cfg.semantic, cfg.adapter_layers, cfg.adapter_heads)
    injection = model.injection_state_dict()
    if injection:
        if run.adapter is None:
            raise WeightsError(f"{folder}: --semantic {cfg.semantic} needs adapter.safetensors, which is missing")
        sd = read_state_dict(run.adapter, dtype=dtype)
        missing = set(injection) - set(sd)
        if missing:
            raise WeightsError(f"{run.adapter}: missing key(s) {sorted(missing)[:3]}")
        model.load_state_dict({**model.state_dict(), **sd})
    return LoadedRun(
        model=model.to(device).eval(),
        ae=load_ae(paths.ae, device=device, dtype=dtype),
        clip=load_clip(paths.clip, device=device, dtype=dtype),
        t5=load_t5(paths.t5, max_length=cfg.t5_max_length, device=device, dtype=dtype),
        run=run,
    )


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
        raise DataError(folder.root, f"{len(folder)} usable triptych: too few to hold any out for the evaluation; "
                                     "at least 2 are needed (one to train on, one held out)")  # fmt: skip
    n_held = min(cfg.heldout_samples, max(1, len(folder) // 10))
    n_train = len(folder) - n_held
    return torch.utils.data.Subset(folder, range(n_train)), torch.utils.data.Subset(folder, range(n_train, len(folder)))


# --- the task: what train.py runs ---------------------------------------------------------------------------------


class Vis2IRTask:
    """vis2ir training for train.py: the frozen parts, the encoded data, the model, the batches, the evaluation."""

    what = "triptychs, captions"

    def __init__(self, cfg, run: Path, device, dtype):
        self.cfg, self.run, self.device, self.dtype = cfg, run, device, dtype
        self.train_set, self.heldout_set = datasets(cfg)
        if cfg.flux:
            self.ae, self.clip, self.t5 = load_frozen(cfg, device, dtype)
        else:
            from minflux.tasks.embedded import embedded_parts

            self.ae, self.clip, self.t5 = embedded_parts(cfg, self.train_set, run, device)
        self.frozen = {"ae": self.ae, "clip": self.clip.model, "t5": self.t5.model}

    @torch.no_grad()
    def encode(self):
        """Everything the frozen parts compute, once: the training cache, and the held-out scenes' sampling inputs.
        The text encoders are freed after it."""
        cfg, data, ae_dtype = self.cfg, self.train_set, self.ae.encoder.conv_in.weight.dtype
        parts, progress = [], Progress(len(data), label="encode ")
        for start in range(0, len(data), 32):
            batch = triptychs(data, range(start, min(start + 32, len(data))))
            parts.append(encode_triptych(self.ae, batch.to(self.device, ae_dtype), cfg.semantic))
            if start % 256 == 0 or start + 32 >= len(data):
                progress.update(min(start + 32, len(data)))
        cat = lambda xs: torch.cat(xs).to("cpu", self.dtype if xs[0].is_floating_point() else None)  # noqa: E731
        self.cache = Encoded(*(cat([getattr(p, k) for p in parts]) for k in ("x0", "x_cond", "img_ids", "target_tokens")),
                             {k: cat([p.semantic[k] for p in parts]) for k in parts[0].semantic})  # fmt: skip
        self.texts = TextCache.encode(self.t5, self.clip, captions(data), self.dtype)
        self.text_index = self.texts.index(captions(data))  # [N]
        self.seq_len = self.cache.x0.shape[1] + self.texts.txt.shape[1]  # image + text tokens

        held = triptychs(self.heldout_set)  # [N, 3, S, 3S]
        n, S = len(held), held.shape[-2]
        noise = get_noise(n, S, 2 * S, cfg.seed).to(self.device, self.dtype)  # [N, 16, S/8, S/4]: image i, seed + i
        self.held = prepare_vis2ir(self.t5, self.clip, noise, captions(self.heldout_set), self.ae,
                                   held.to(self.device, ae_dtype), cfg.semantic).to("cpu")  # fmt: skip
        log(f"data: {len(data)} train, {n} held-out; x0 {list(self.cache.x0.shape[1:])}, "
            f"x_cond {list(self.cache.x_cond.shape[1:])}, text {list(self.texts.txt.shape[1:])}")  # fmt: skip
        del self.clip, self.t5  # done: freed before the transformer trains
        self.frozen = {"ae": self.ae}

    def build_model(self):
        """The Fill transformer with the semantic injection, and the optimiser's groups: the transformer's trained
        parameters (all of them from scratch, the LoRA's on given weights) and the injection's."""
        cfg = self.cfg
        if cfg.flux:
            flux = load_flux(cfg.flux, device=self.device, dtype=self.dtype)
            flux.requires_grad_(False)
            trained = inject_lora(flux, cfg.lora_rank, cfg.lora_alpha, targets=lora_targets(cfg))
        else:
            torch.manual_seed(cfg.seed)
            flux = Flux(configs[cfg.preset].params)
            with torch.no_grad():  # DiT's init: the output layer starts at zero, so the first prediction is 0
                flux.final_layer.linear.weight.zero_()
                flux.final_layer.linear.bias.zero_()
            flux.variant = cfg.preset
            trained = list(flux.parameters())
        flux.gradient_checkpointing = cfg.gradient_checkpointing
        model = Vis2IR(flux, cfg.semantic, cfg.adapter_layers, cfg.adapter_heads).to(self.device, self.dtype)
        adapter = [p for n, p in model.named_parameters() if not n.startswith("flux.")]
        groups = [{"params": trained, "lr": cfg.lr, "name": "transformer"}]
        if adapter:
            groups.append({"params": adapter, "lr": cfg.adapter_lr or cfg.lr, "name": "adapter"})
        log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{sum(p.numel() for p in trained + adapter):,} trained{' (LoRA + adapter)' if cfg.flux else ''}; "
            f"semantic injection {sum(p.numel() for p in adapter):,}")  # fmt: skip
        return model, groups

    def draw(self, gen: torch.Generator) -> Batch:
        """A global batch: scenes drawn with replacement, logit-normal times shifted by the token count, noise."""
        cfg, enc = self.cfg, self.cache
        B, L = cfg.batch_size, enc.x0.shape[1]
        idx = torch.randint(len(enc.x0), (B,), generator=gen)
        t = sample_t(B, cfg.t_sampling, mu=shift_mu(L), generator=gen)
        noise = torch.randn((B, L, 64), generator=gen)
        rows, text = enc.rows(idx), self.text_index[idx]
        txt = self.texts.txt[text]  # [B, 512, 4096]
        inputs = Inputs(None, rows.img_ids, txt, prepare_txt_ids(B, txt.shape[1]), self.texts.y[text],
                        img_cond=rows.x_cond, extra=rows.semantic)  # fmt: skip
        return Batch(rows.x0, noise, t, torch.full((B,), cfg.guidance), inputs,
                     rows.target_tokens if cfg.target_only else None)  # fmt: skip

    def final_files(self, model) -> list[str]:
        """What finish writes, in order: metrics.json last, as it marks a finished run."""
        weights = "lora.safetensors" if self.cfg.flux else "transformer.safetensors"
        adapter = ["adapter.safetensors"] if model.injection_state_dict() else []
        return [weights, *adapter, "loss.png", "samples.png", "metrics.json"]

    @torch.no_grad()
    def finish(self, model, losses: list[float], steps: int, train_seconds: float) -> None:
        """Held-out MSE and PSNR of the generated infrared panels; the weights, metrics, loss.png and samples.png."""
        cfg, run = self.cfg, self.run
        model.eval()
        generated = generate_infrared(model, self.ae, self.held.to(self.device, self.dtype), cfg.sample_steps,
                                      cfg.guidance).float().cpu()  # fmt: skip
        n = len(generated)
        visible, truth, semantic = split_triptych(triptychs(self.heldout_set))
        mse = ((generated.clamp(-1, 1) - truth) / 2).pow(2).mean().item()  # in [0, 1] pixel units
        metrics = {
            "heldout_mse": mse,
            "heldout_psnr": 10 * math.log10(1 / mse),
            "train_seconds": train_seconds,
            "steps": steps,
            "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
            "semantic": cfg.semantic,
            "adapter_scales": model.scales,
        }
        if cfg.flux:
            save_lora(model.flux, run / "lora.safetensors", format=cfg.lora_format)
        else:
            save_flux(model.flux, run / "transformer.safetensors", variant=cfg.preset)
        injection = model.injection_state_dict()
        if injection:
            save_atomic(injection, run / "adapter.safetensors", metadata={"minflux.semantic": cfg.semantic})
        save_png(line_plot({"loss": smooth(losses)}, f"training loss ({cfg.semantic})"), run / "loss.png")
        rows = [[visible[i], semantic[i], generated[i], truth[i]] for i in range(min(n, 8))]
        grid = image_grid(rows, captions=["visible", "semantic", "generated", "ground truth"])
        save_png(grid, run / "samples.png", text={"heldout_psnr": f"{metrics['heldout_psnr']:.2f}"})
        write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # last: marks a finished run
        log(f"held-out: mse {mse:.5f}, psnr {metrics['heldout_psnr']:.2f} dB ({cfg.sample_steps} Euler steps, {n} scenes)")


def lora_targets(cfg) -> list[str] | None:
    return cfg.lora_targets.split(",") if cfg.lora_targets else None
