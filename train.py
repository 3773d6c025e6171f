"""Train FLUX.1-Fill for visible → infrared translation (vis2ir), guided by a semantic map; or a text-to-image
LoRA on FLUX.1 dev or schnell (t2i).

    python train.py                                   the embedded default: a small FLUX trained from scratch
                                                      on CPU, on generated [visible | infrared | semantic] scenes
    python train.py --semantic none                   the same without the semantic map (the ablation)
    python train.py --finetune runs/vis2ir-zeroconv   fine-tune a finished small run with LoRA
    python train.py --repo FLUX.1-Fill-dev --data triptychs/    LoRA on the official Fill model (GPU)
    torchrun --nproc_per_node=2 train.py ...          the same, data-parallel (gloo on CPU, NCCL on CUDA)
    python train.py --task t2i --repo FLUX.1-dev --data photos/     a LoRA from images with same-named .txt
                                                      captions (minflux/t2i.py has the step)

One step (seeds 000/001; minflux/vis2ir.py has the shapes): encode the triptych with the frozen VAE into
x_0, the Fill condition and the semantic tokens; draw t and ε; x_t = (1 − t) x_0 + t ε; inject the semantic
map; the transformer predicts v; loss = MSE(v, ε − x_0). t2i is the same step on plain images: no Fill
condition, no semantic map, the caption's embeddings. Every flag below is a field of TrainConfig;
`--config file.toml` sets the same fields. The last line printed is the run folder.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from minflux.autoencoder import load_ae
from minflux.clip import load_clip
from minflux.data import CaptionFolder, SyntheticTriptychs, TriptychFolder, split_triptych
from minflux.embedded import build_text_encoders, train_autoencoder
from minflux.flow import prepare_img_ids, prepare_txt_ids, sample_t, shift_mu
from minflux.loaders import load_flux, save_flux
from minflux.lora import inject_lora, load_lora, lora_layers, save_lora
from minflux.model import Flux
from minflux.presets import configs, spec_for
from minflux.runs import (
    Progress,
    add_config_flags,
    config_from_args,
    image_grid,
    line_plot,
    read_toml,
    save_png,
    to_toml,
    write_text_atomic,
)
from minflux.t2i import draw_batch, generate, t2i_loss
from minflux.t2i import encode_dataset as encode_captioned
from minflux.t5 import load_t5
from minflux.trace import parameter_table, shape_trace
from minflux.vis2ir import SEMANTIC_MODES, Vis2IR, encode_triptych, generate_infrared, vis2ir_loss
from minflux.weights import WeightsError, read_shapes, read_state_dict, save_atomic, write_atomic


# t2i trains a LoRA on a 12 B transformer: the settings of common FLUX LoRA recipes (kohya's sd-scripts,
# ai-toolkit), where the from-scratch vis2ir defaults would not fit. Given flags and TOML keys win.
T2I_DEFAULTS = {"lr": 1e-4, "batch_size": 4, "steps": 1000, "lr_warmup_steps": 10, "checkpoint_every": 250,
                "sample_steps": 20, "gradient_checkpointing": True}  # fmt: skip
TASKS = ("vis2ir", "t2i")
LORA_FORMATS = ("minflux", "kohya", "diffusers")


@dataclass
class TrainConfig:
    # what to learn
    semantic: str = "zeroconv"
    adapter_layers: int = 1
    adapter_heads: int = 8
    data: str | None = None
    on_error: str = "skip"
    panel_size: int = 64
    train_samples: int = 2000
    heldout_samples: int = 32
    # which task: vis2ir (the fields above) or t2i (the fields below; data and on_error serve both)
    task: str = "vis2ir"
    resolution: int = 512
    buckets: bool = False
    default_caption: str | None = None
    caption_dropout: float = 0.0
    # weights: none given = the embedded default, a small preset trained from scratch
    preset: str = "flux-small-fill"
    repo: str | None = None
    flux: str | None = None
    ae: str | None = None
    clip: str | None = None
    t5: str | None = None
    finetune: str | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: str | None = None
    lora_format: str = "minflux"
    # optimisation
    steps: int = 1300
    batch_size: int = 16
    lr: float = 1e-3
    adapter_lr: float | None = None
    lr_warmup_steps: int = 50
    adapter_warmup_steps: int = 0
    t_sampling: str = "logit_normal"
    target_only: bool = False
    max_grad_norm: float = 1.0
    guidance: float = 1.0
    t5_max_length: int = 24
    vae_steps: int = 1000
    seed: int = 0
    # evaluation and output
    sample_steps: int = 16
    out: str = "runs"
    name: str | None = None
    checkpoint_every: int = 500
    stop_at: int | None = None
    resume: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    # for study: what runs, shape by shape
    trace: bool = False
    params: bool = False

    HELP = {
        "task": "vis2ir (Fill + semantic map, on triptychs) or t2i (a LoRA on dev/schnell from images with .txt "
        "captions; its defaults differ: " + ", ".join(f"{k} {v}" for k, v in {**T2I_DEFAULTS, "t5_max_length":
        "512 (dev) / 256 (schnell)"}.items()) + ")",
        "semantic": f"how the semantic map is injected: {', '.join(SEMANTIC_MODES)}",
        "adapter_layers": "SemanticCrossAttention layers",
        "adapter_heads": "heads per SemanticCrossAttention layer",
        "data": "vis2ir: a folder of triptychs, or of visible/ infrared/ semantic/ folders (none = generated "
        "scenes); t2i: a folder of images, each with a same-named .txt caption",
        "on_error": "an unusable data file: 'skip' (and count) or 'stop'",
        "panel_size": "panel side in pixels (a multiple of 16)",
        "train_samples": "generated training scenes",
        "heldout_samples": "held-out scenes (generated), or held-out files (taken from the folder's end)",
        "resolution": "t2i: image side in pixels (a multiple of 16); images are scaled and centre-cropped to it",
        "buckets": "t2i: aspect-ratio buckets of about resolution² pixels instead of square crops",
        "default_caption": "t2i: the caption of an image without a .txt file (default: such an image is an error)",
        "caption_dropout": "t2i: probability of training a step's image with the empty caption",
        "preset": "the architecture trained from scratch when no weights are given",
        "repo": "an official repo folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizers)",
        "flux": "transformer weights (file or folder): FLUX.1-Fill for vis2ir, dev or schnell for t2i",
        "ae": "autoencoder weights",
        "clip": "CLIP-L text encoder (folder or file)",
        "t5": "T5-XXL text encoder (folder or file)",
        "finetune": "a finished run folder: fine-tune its model with LoRA",
        "lora_rank": "LoRA rank (LoRA is used with given weights or --finetune)",
        "lora_alpha": "LoRA alpha (default: the rank)",
        "lora_targets": "comma-separated LoRA target groups or module patterns (default: lora.py's)",
        "lora_format": "lora.safetensors layout: minflux (official names), kohya (sd-scripts, ComfyUI) or diffusers",
        "steps": "optimisation steps",
        "batch_size": "global batch size (split across processes under torchrun)",
        "lr": "peak learning rate (linear warm-up, then cosine decay to lr/10)",
        "adapter_lr": "learning rate of the semantic adapter (default: lr)",
        "lr_warmup_steps": "linear learning-rate warm-up steps",
        "adapter_warmup_steps": "seed 002's first stage: only the adapter trains for this many steps",
        "t_sampling": "training time distribution: logit_normal or uniform (shifted by image size)",
        "target_only": "count the loss on the target half of the diptych only",
        "max_grad_norm": "gradient clipping: the gradient's norm is scaled down to at most this",
        "guidance": "guidance value fed in training to guidance-distilled models (dev, official Fill)",
        "t5_max_length": "T5 tokens per prompt (512 for the official dev models, 256 for schnell)",
        "vae_steps": "training steps of the embedded default's VAE (cached)",
        "seed": "seed of everything random",
        "sample_steps": "Euler steps of the held-out evaluation (t2i: of samples.png; 0 writes none)",
        "out": "folder holding the run folders",
        "name": "run folder name (default: vis2ir-<semantic>, or t2i-<data folder name>)",
        "checkpoint_every": "steps between checkpoints (also written at the end and on Ctrl-C / SIGTERM)",
        "stop_at": "stop after this step with a checkpoint (for jobs with a time limit; continue with --resume)",
        "resume": "a run folder to continue from its last checkpoint",
        "device": "auto, cpu or cuda",
        "dtype": "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16",
        "gradient_checkpointing": "recompute block activations in backward to save memory",
        "trace": "print the tensor shapes of every stage of the data encoding and of the first step",
        "params": "print the parameter table of every component, trainable and frozen",
    }


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(*args):
    if rank() == 0:
        print(*args, flush=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# --- setting up: data, frozen parts, the trainable model ---------------------------------------------------


def load_data(cfg: TrainConfig):
    """(train, heldout) data sets."""
    if cfg.data is None:
        return (
            SyntheticTriptychs(cfg.train_samples, cfg.panel_size, "train", cfg.seed),
            SyntheticTriptychs(cfg.heldout_samples, cfg.panel_size, "heldout", cfg.seed),
        )
    folder = TriptychFolder(cfg.data, size=cfg.panel_size, on_error=cfg.on_error)
    if folder.n_skipped:
        log(f"data: skipped {folder.n_skipped} unusable file(s), e.g. {folder.skipped[0][0]}: {folder.skipped[0][1]}")
    n_held = min(cfg.heldout_samples, len(folder) // 10)
    idx = list(range(len(folder)))
    return torch.utils.data.Subset(folder, idx[: len(idx) - n_held]), torch.utils.data.Subset(folder, idx[-n_held:])


def frozen_parts(cfg: TrainConfig, train_set, run: Path, device, dtype):
    """(ae, clip, t5): official weights when given, else the embedded default's small components."""
    if cfg.flux:
        missing = [name for name in ("ae", "clip", "t5") if getattr(cfg, name) is None]
        if missing:
            raise WeightsError(f"--flux given without --{', --'.join(missing)} (or --repo with all of them)")
        ae = load_ae(cfg.ae, device=device, dtype=dtype)
        clip = load_clip(cfg.clip, device=device, dtype=dtype)
        t5 = load_t5(cfg.t5, max_length=cfg.t5_max_length, device=device, dtype=dtype)
        return ae, clip, t5

    spec = configs[cfg.preset]
    cache = Path(cfg.out) / "cache"
    scenes = range(min(len(train_set), 512))
    panels = torch.stack([p for i in scenes for p in split_triptych(train_set[i]["triptych"])])  # [1536, 3, 64, 64]
    if rank() == 0:  # rank 0 trains and writes them; the other processes wait, then read them
        train_autoencoder(spec.ae_params, panels, cfg.vae_steps, cache, seed=cfg.seed, log=log)
        build_text_encoders(run, captions(train_set), cfg.t5_max_length, seed=cfg.seed)
    if dist.is_initialized():
        dist.barrier()
    ae = train_autoencoder(spec.ae_params, panels, cfg.vae_steps, cache, seed=cfg.seed, log=lambda *a: None)  # cached
    clip, t5 = build_text_encoders(run, captions(train_set), cfg.t5_max_length, seed=cfg.seed)  # written: loaded
    if rank() == 0:
        save_atomic(ae.state_dict(), run / "ae.safetensors", metadata=_ae_metadata(ae))
    return ae.to(device), clip, t5


def _ae_metadata(ae) -> dict:
    return {"minflux.ae_params": json.dumps(asdict(ae.params))}


def captions(data) -> list[str]:
    return data.captions() if hasattr(data, "captions") else [data[i]["caption"] for i in range(len(data))]


@torch.no_grad()
def encode_dataset(data, ae, clip, t5, cfg: TrainConfig, device, dtype) -> dict:
    """Everything the frozen parts compute, once: latents, Fill condition, semantic tokens, text embeddings."""
    parts, texts = [], captions(data)
    progress = Progress(len(data), label="encode ")
    for start in range(0, len(data), 32):
        batch = torch.stack([data[i]["triptych"] for i in range(start, min(start + 32, len(data)))])
        parts.append(encode_triptych(ae, batch.to(device, ae.encoder.conv_in.weight.dtype), cfg.semantic))
        if start % 256 == 0 or start + 32 >= len(data):
            progress.update(min(start + 32, len(data)))
    encoded = {k: torch.cat([p[k] for p in parts]).to(dtype if parts[0][k].is_floating_point() else None) for k in parts[0]}
    unique = sorted(set(texts))
    pooled = torch.cat([clip(unique[i : i + 64]) for i in range(0, len(unique), 64)]).to(dtype)
    hidden = torch.cat([t5(unique[i : i + 64]) for i in range(0, len(unique), 64)]).to(dtype)
    index = torch.tensor([unique.index(t) for t in texts])
    encoded["y"], encoded["txt"] = pooled[index], hidden[index]  # [N, 768], [N, 512, 4096]
    return encoded


def build_model(cfg: TrainConfig, device, dtype) -> tuple[Vis2IR | Flux, list, list]:
    """The Fill transformer with the semantic injection: (model, its trained transformer parameters — all of them
    from scratch, the LoRA's with given weights — and the injection's parameters). t2i: the dev or schnell
    transformer with LoRA, (flux, its LoRA parameters, [])."""
    if cfg.task == "t2i":
        flux = build_t2i_model(cfg, device, dtype)
        return flux, [p for p in flux.parameters() if p.requires_grad], []
    if cfg.flux:
        flux = load_flux(cfg.flux, device=device, dtype=dtype)
        flux.requires_grad_(False)
        targets = cfg.lora_targets.split(",") if cfg.lora_targets else None
        trained = inject_lora(flux, cfg.lora_rank, cfg.lora_alpha, targets=targets)
    else:
        torch.manual_seed(cfg.seed)
        flux = Flux(configs[cfg.preset].params)
        with torch.no_grad():  # DiT's init: the output layer starts at zero, so the first prediction is 0
            flux.final_layer.linear.weight.zero_()
            flux.final_layer.linear.bias.zero_()
        flux.variant = cfg.preset
        trained = list(flux.parameters())
    flux.gradient_checkpointing = cfg.gradient_checkpointing
    model = Vis2IR(flux, cfg.semantic, cfg.adapter_layers, cfg.adapter_heads).to(device, dtype)
    adapter = [p for n, p in model.named_parameters() if not n.startswith("flux.")]
    return model, trained, adapter


def build_t2i_model(cfg: TrainConfig, device, dtype) -> Flux:
    """The frozen dev/schnell transformer with LoRA. The LoRA weights are kept in fp32 (their AdamW updates are
    smaller than bf16 can resolve); under bf16 autocast the forward pass still runs in bf16."""
    flux = load_flux(cfg.flux, device=device, dtype=dtype)
    if flux.params.in_channels != 64:
        raise WeightsError(f"{cfg.flux}: a transformer with {flux.params.in_channels} input channels "
                           f"({flux.variant or 'custom'}); --task t2i trains FLUX.1 dev or schnell (64)")  # fmt: skip
    flux.requires_grad_(False)
    inject_lora(flux, cfg.lora_rank, cfg.lora_alpha, targets=cfg.lora_targets.split(",") if cfg.lora_targets else None)
    for layer in lora_layers(flux).values():
        layer.lora_down.float()
        layer.lora_up.float()
    flux.gradient_checkpointing = cfg.gradient_checkpointing
    return flux


def memory_estimate(model: Vis2IR | Flux, n_trained: int, batch: int, seq: int, checkpointing: bool) -> str:
    """A rough budget, printed before the first step: weights, what training adds per trained parameter
    (its gradient and AdamW's two fp32 moments), and activations (about 30 hidden-size tensors per token in a
    block kept for backward, or one per block with gradient checkpointing)."""
    p = model.params if isinstance(model, Flux) else model.flux.params
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    size = next(model.parameters()).element_size()
    trained = n_trained * (size + 8)
    blocks = p.depth + p.depth_single_blocks
    acts = batch * seq * p.hidden_size * size * blocks * (1 if checkpointing else 30)
    gb = lambda n: f"{n / 2**30:.2f} GB"  # noqa: E731
    return f"memory estimate: weights {gb(weights)}, gradients + optimizer {gb(trained)}, activations ~{gb(acts)}"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the learning rate at the last step."""
    warmup = min(1.0, (step + 1) / max(cfg.lr_warmup_steps, 1))
    return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))))


# --- one step: the loss of a batch drawn from the cache ----------------------------------------------------------
# Every process draws the same global batch, times and noise from `gen`, then keeps its share.


def vis2ir_step(model, enc: dict, cfg: TrainConfig, gen: torch.Generator, device, dtype) -> torch.Tensor:
    B, per_rank = cfg.batch_size, cfg.batch_size // world()
    idx = torch.randint(len(enc["x0"]), (B,), generator=gen)
    t = sample_t(B, cfg.t_sampling, mu=shift_mu(enc["x0"].shape[1]), generator=gen)
    noise = torch.randn((B, *enc["x0"].shape[1:]), generator=gen)
    mine = slice(rank() * per_rank, (rank() + 1) * per_rank)  # this process's share of the global batch
    batch = {k: v[idx[mine]].to(device) for k, v in enc.items()}
    txt_ids = prepare_txt_ids(per_rank, batch["txt"].shape[1], device=device)
    guidance = torch.full((per_rank,), cfg.guidance, device=device, dtype=dtype)
    return vis2ir_loss(
        model, batch, batch["txt"], txt_ids, batch["y"], t[mine].to(device, dtype), noise[mine].to(device, dtype),
        guidance, target_only=cfg.target_only,
    )  # fmt: skip


def t2i_step(model, enc: dict, cfg: TrainConfig, gen: torch.Generator, device, dtype, shift: bool) -> torch.Tensor:
    B, per_rank = cfg.batch_size, cfg.batch_size // world()
    batch = draw_batch(enc, B, gen, cfg.caption_dropout)  # x0 [B, 1024, 64], txt [B, 512, 4096], y [B, 768]
    width, height = batch["size"]
    t = sample_t(B, cfg.t_sampling, mu=shift_mu(batch["x0"].shape[1]) if shift else None, generator=gen)
    noise = torch.randn(batch["x0"].shape, generator=gen)
    mine = slice(rank() * per_rank, (rank() + 1) * per_rank)
    x0, txt, y = (batch[k][mine].to(device, dtype) for k in ("x0", "txt", "y"))
    t, noise = t[mine].to(device, dtype), noise[mine].to(device, dtype)
    img_ids = prepare_img_ids(per_rank, height // 16, width // 16, device=device)  # [B, 1024, 3]
    txt_ids = prepare_txt_ids(per_rank, txt.shape[1], device=device)  # [B, 512, 3]
    guidance = torch.full((per_rank,), cfg.guidance, device=device, dtype=dtype)  # dev's; schnell ignores it
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):  # fp32 LoRA, bf16 maths
        return t2i_loss(model, x0, img_ids, txt, txt_ids, y, t, noise, guidance)


# --- for study: --trace and --params ------------------------------------------------------------------------


def maybe_trace(on: bool, what: str):
    """--trace: the shape of every stage of what runs inside, printed when it ends (minflux/trace.py)."""
    if not on or rank() != 0:
        return contextlib.nullcontext()
    log(f"--trace: {what}")
    return shape_trace()


def print_params(cfg: TrainConfig, parts: dict, what: str) -> None:
    if cfg.params and rank() == 0:
        log(f"--params: {what}\n{parameter_table(parts)}")


# --- checkpoints -------------------------------------------------------------------------------------------


def trainable_state(model: Vis2IR | Flux, cfg: TrainConfig) -> dict:
    sd = model.injection_state_dict() if isinstance(model, Vis2IR) else {}
    if cfg.flux:  # LoRA: only the LoRA tensors of the transformer
        sd.update({k: v for k, v in model.state_dict().items() if ".lora_" in k or k.endswith(".alpha")})
    else:
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("flux.")})
    return sd


def save_checkpoint(run: Path, model, opt, step: int, gen: torch.Generator, losses: list, cfg: TrainConfig):
    """checkpoints/step-N/{weights.safetensors, state.pt}, then the pointer checkpoints/latest: a crash at any
    point leaves the previous checkpoint whole and pointed to."""
    folder = run / "checkpoints" / f"step-{step:06d}"
    save_atomic(trainable_state(model, cfg), folder / "weights.safetensors")
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "losses": torch.tensor(losses),
    }
    write_atomic(folder / "state.pt", lambda tmp: torch.save(state, tmp))
    previous = (run / "checkpoints" / "latest").read_text().strip() if (run / "checkpoints" / "latest").exists() else None
    write_text_atomic(run / "checkpoints" / "latest", folder.name)
    if previous and previous != folder.name:  # keep the newest only
        for f in (run / "checkpoints" / previous).glob("*"):
            f.unlink()
        (run / "checkpoints" / previous).rmdir()


def load_checkpoint(run: Path, model, opt, gen: torch.Generator) -> tuple[int, list]:
    pointer = run / "checkpoints" / "latest"
    if not pointer.exists():
        raise WeightsError(f"{run}: no checkpoint to resume from (expected {pointer})")
    folder = run / "checkpoints" / pointer.read_text().strip()
    sd = read_state_dict(folder / "weights.safetensors")
    missing = set(trainable_state(model, _cfg_of(run))) - set(sd)
    if missing:
        raise WeightsError(f"{folder / 'weights.safetensors'}: missing {len(missing)} key(s), e.g. {sorted(missing)[:3]}")
    model.load_state_dict(sd, strict=False)
    state = torch.load(folder / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["losses"].tolist()


def _cfg_of(run: Path) -> TrainConfig:
    return TrainConfig(**read_toml(run / "config.toml", TrainConfig))


# --- the run -------------------------------------------------------------------------------------------------


def resolve_weight_paths(cfg: TrainConfig) -> TrainConfig:
    """--repo and --finetune name folders; the files inside fill --flux, --ae, --clip, --t5 where not given."""
    if cfg.repo:
        repo = Path(cfg.repo)
        cfg = replace(
            cfg,
            flux=cfg.flux or str(repo / "transformer"),
            ae=cfg.ae or str(repo / "vae" if (repo / "vae").is_dir() else repo / "ae.safetensors"),
            clip=cfg.clip or str(repo / "text_encoder"),
            t5=cfg.t5 or str(repo / "text_encoder_2"),
        )
    if cfg.finetune:
        done = Path(cfg.finetune)
        cfg = replace(
            cfg,
            flux=cfg.flux or str(done / "transformer.safetensors"),
            ae=cfg.ae or str(done / "ae.safetensors"),
            clip=cfg.clip or str(done / "text_encoder"),
            t5=cfg.t5 or str(done / "text_encoder_2"),
        )
    return cfg


def parse(argv) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, TrainConfig)
    args = parser.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    if args.resume:  # the run's own config, then whatever this command line changes
        cfg = replace(_cfg_of(Path(args.resume)), **{"stop_at": None, **{k: getattr(args, k) for k in given}})
    else:
        cfg = config_from_args(TrainConfig, args)
        given |= set(read_toml(args.config, TrainConfig)) if args.config else set()
        if cfg.task == "t2i":
            cfg = replace(cfg, **{k: v for k, v in T2I_DEFAULTS.items() if k not in given})
    if cfg.task not in TASKS:
        parser.error(f"--task {cfg.task}: expected one of {', '.join(TASKS)}")
    if cfg.lora_format not in LORA_FORMATS:
        parser.error(f"--lora-format {cfg.lora_format}: expected one of {', '.join(LORA_FORMATS)}")
    if cfg.semantic not in SEMANTIC_MODES:
        parser.error(f"--semantic {cfg.semantic}: expected one of {', '.join(SEMANTIC_MODES)}")
    if cfg.preset not in configs or configs[cfg.preset].params.in_channels != 384:
        fill = [n for n, s in configs.items() if s.params.in_channels == 384]
        parser.error(f"--preset {cfg.preset}: expected a Fill preset ({', '.join(fill)})")
    cfg = resolve_weight_paths(cfg)
    if cfg.task == "t2i":
        if not cfg.data:
            parser.error("--task t2i needs --data FOLDER: images, each with a same-named .txt caption")
        if not cfg.flux:
            parser.error("--task t2i trains a LoRA on official weights: pass --repo FLUX.1-dev (or FLUX.1-schnell), "
                         "or --flux, --ae, --clip and --t5")  # fmt: skip
        if cfg.resolution % 16 or cfg.resolution < 16:
            parser.error(f"--resolution {cfg.resolution}: expected a multiple of 16 (VAE ×8, then 2×2 packing)")
        if not 0 <= cfg.caption_dropout < 1:
            parser.error(f"--caption-dropout {cfg.caption_dropout}: expected a probability in [0, 1)")
        if "t5_max_length" not in given and not args.resume:  # as the official pipelines: dev 512, schnell 256
            cfg = replace(cfg, t5_max_length=512 if has_guidance_embedding(cfg.flux) else 256)
    return cfg


def has_guidance_embedding(flux_path) -> bool:
    """dev has a guidance embedding, schnell has none: told from the weights' key names, no tensor read."""
    return any("guidance_in." in k or "guidance_embedder." in k for k in read_shapes(flux_path))


def main(argv=None) -> int:
    cfg = parse(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu"))
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    default_name = f"t2i-{Path(cfg.data or '.').resolve().name}" if cfg.task == "t2i" else f"vis2ir-{cfg.semantic}"
    run = Path(cfg.resume) if cfg.resume else Path(cfg.out) / (cfg.name or default_name)
    run.mkdir(parents=True, exist_ok=True)
    if rank() == 0 and not cfg.resume:
        write_text_atomic(run / "config.toml", to_toml(cfg))
    torch.manual_seed(cfg.seed)

    # 1. data and the frozen parts; everything they compute is computed once
    if cfg.task == "t2i":
        train_set = CaptionFolder(cfg.data, cfg.resolution, cfg.default_caption, cfg.on_error, cfg.buckets)
        ae, clip, t5 = frozen_parts(cfg, train_set, run, device, dtype)
        print_params(cfg, {"ae": ae, "clip": clip.model, "t5": t5.model}, "the frozen parts")
        with maybe_trace(cfg.trace, "encoding the data (images, captions)"):
            enc = encode_captioned(train_set, ae, clip, t5, dtype)
        ae.to("cpu")  # the VAE waits on the CPU for samples.png
        log_t2i_data(train_set, enc, cfg)
    else:
        train_set, heldout_set = load_data(cfg)
        ae, clip, t5 = frozen_parts(cfg, train_set, run, device, dtype)
        print_params(cfg, {"ae": ae, "clip": clip.model, "t5": t5.model}, "the frozen parts")
        with maybe_trace(cfg.trace, "encoding the data (triptychs, captions)"):
            enc = encode_dataset(train_set, ae, clip, t5, cfg, device, dtype)
        held = encode_dataset(heldout_set, ae, clip, t5, cfg, device, dtype)
        log(f"data: {len(train_set)} train, {len(heldout_set)} held-out; x0 {list(enc['x0'].shape[1:])}, "
            f"x_cond {list(enc['x_cond'].shape[1:])}, text {list(enc['txt'].shape[1:])}")  # fmt: skip
    del clip, t5  # the text encoders are done: free them before the transformer trains
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. the trainable model and its optimiser
    model, base_params, adapter_params = build_model(cfg, device, dtype)
    groups = [{"params": base_params, "lr": cfg.lr, "name": "transformer"}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": cfg.adapter_lr or cfg.lr, "name": "adapter"})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    if cfg.task == "t2i":
        log(f"model: {getattr(model, 'variant', None) or 'custom'}, {sum(p.numel() for p in model.parameters()):,} "
            f"parameters, {n_train:,} trained (LoRA rank {cfg.lora_rank})")  # fmt: skip
        seq = max(x.shape[1] for x in enc["x0"]) + enc["txt"].shape[1]
        step_loss = partial(t2i_step, shift=spec_for(model).shift)
    else:
        log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {n_train:,} trained"
            f"{' (LoRA + adapter)' if cfg.flux else ''}; semantic injection {sum(p.numel() for p in adapter_params):,}")  # fmt: skip
        seq = enc["x0"].shape[1] + enc["txt"].shape[1]
        step_loss = vis2ir_step
    print_params(cfg, {"transformer": model} if isinstance(model, Flux) else dict(model.named_children()), "the model")
    log(memory_estimate(model, n_train, cfg.batch_size // world(), seq, cfg.gradient_checkpointing))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model

    gen = torch.Generator().manual_seed(cfg.seed)  # batches, times and noise: its state is checkpointed
    step, losses = load_checkpoint(run, model, opt, gen) if cfg.resume else (0, [])
    if step:
        log(f"resumed at step {step}")

    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.update(signal=s))

    # 3. the loop
    progress = Progress(cfg.steps, label="step ")
    log_file = open(run / "log.jsonl", "a", buffering=1) if rank() == 0 else None  # line-buffered: a crash loses no line
    start = time.perf_counter()
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    first_step = step
    while step < last and stop["signal"] is None:
        for g in opt.param_groups:  # seed 002's first stage trains the adapter alone
            base_lr = cfg.adapter_lr or cfg.lr if g["name"] == "adapter" else cfg.lr
            g["lr"] = base_lr * lr_factor(step, cfg)
            if g["name"] == "transformer" and step < cfg.adapter_warmup_steps:
                g["lr"] = 0.0

        with maybe_trace(cfg.trace and step == first_step, "the first training step"):
            loss = step_loss(ddp, enc, cfg, gen, device, dtype)
        if not math.isfinite(loss.item()):
            log(f"step {step + 1}: the loss is {loss.item()}; stopping. The last good checkpoint is in {run / 'checkpoints'}")
            return 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        opt.step()
        step += 1

        loss_all = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss_all, op=dist.ReduceOp.AVG)
        losses.append(loss_all.item())
        if rank() == 0:
            scales = model.adapter.scales if hasattr(model, "adapter") else []
            record = {"step": step, "loss": losses[-1], "grad_norm": grad_norm, "scales": scales}
            log_file.write(json.dumps({**record, "time": time.perf_counter() - start}) + "\n")
            if step % 10 == 0 or step == cfg.steps:
                fields = {"loss": sum(losses[-10:]) / len(losses[-10:])}
                if scales:
                    fields["scale"] = scales[0]
                progress.update(step, **fields)
            if step % cfg.checkpoint_every == 0 or step == last or stop["signal"] is not None:
                save_checkpoint(run, model, opt, step, gen, losses, cfg)
    if log_file:
        log_file.close()
    train_seconds = time.perf_counter() - start
    if stop["signal"] is not None:
        if rank() == 0 and (not (run / "checkpoints" / "latest").exists() or step % cfg.checkpoint_every):
            save_checkpoint(run, model, opt, step, gen, losses, cfg)
        log(f"stopped by signal {stop['signal']} at step {step}; resume with: python train.py --resume {run}")
        return 128 + stop["signal"]

    if step < cfg.steps:
        log(f"stopped at step {step} of {cfg.steps} (--stop-at); continue with: python train.py --resume {run}")
        return 0

    # 4. held-out evaluation and the run folder
    if rank() == 0 and cfg.task == "t2i":
        finish_t2i(run, cfg, model, ae, enc, train_set, losses, step, train_seconds, device, dtype)
    elif rank() == 0:
        finish(run, cfg, model, ae, held, heldout_set, losses, step, train_seconds, device, dtype)
    if dist.is_initialized():
        dist.barrier()
    log(run)  # while the ranks are known: printed once
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


@torch.no_grad()
def finish(run, cfg, model, ae, held, heldout_set, losses, step, train_seconds, device, dtype):
    model.eval()
    n = len(held["x0"])
    batch = {k: v.to(device) for k, v in held.items()}
    txt_ids = prepare_txt_ids(n, batch["txt"].shape[1], device=device)
    generated = generate_infrared(model, ae, batch, batch["txt"], txt_ids, batch["y"], cfg.sample_steps, cfg.guidance, seed=cfg.seed)
    truth = torch.stack([split_triptych(heldout_set[i]["triptych"])[1] for i in range(n)]).to(generated)
    mse = ((generated.clamp(-1, 1) - truth) / 2).pow(2).mean().item()  # in [0, 1] pixel units
    metrics = {
        "heldout_mse": mse,
        "heldout_psnr": 10 * math.log10(1 / mse),
        "train_seconds": train_seconds,
        "steps": step,
        "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
        "semantic": cfg.semantic,
        "adapter_scales": model.adapter.scales if hasattr(model, "adapter") else [],
    }
    if cfg.flux:
        save_lora(model.flux, run / "lora.safetensors", format=cfg.lora_format)
    else:
        save_flux(model.flux, run / "transformer.safetensors", variant=cfg.preset)
    adapter = model.injection_state_dict()
    if adapter:
        save_atomic(adapter, run / "adapter.safetensors", metadata={"minflux.semantic": cfg.semantic})
    write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_png(line_plot({"loss": _smooth(losses)}, f"training loss ({cfg.semantic})"), run / "loss.png")
    rows = []
    for i in range(min(n, 8)):
        visible, infrared, semantic = split_triptych(heldout_set[i]["triptych"])
        rows.append([visible, semantic, generated[i].cpu().float(), infrared])
    grid = image_grid(rows, captions=["visible", "semantic", "generated", "ground truth"])
    save_png(grid, run / "samples.png", text={"heldout_psnr": f"{metrics['heldout_psnr']:.2f}"})
    log(f"held-out: mse {mse:.5f}, psnr {metrics['heldout_psnr']:.2f} dB ({cfg.sample_steps} Euler steps, {n} scenes)")


def log_t2i_data(data: CaptionFolder, enc: dict, cfg: TrainConfig):
    if data.n_skipped:  # unreadable at the check, or when encoded
        log(f"data: skipped {data.n_skipped} unusable file(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
    if data.n_default_captions:
        log(f"data: {data.n_default_captions} image(s) without a .txt caption get {cfg.default_caption!r}")
    sizes = ", ".join(f"{w}×{h} ({len(x)})" for (w, h), x in zip(enc["sizes"], enc["x0"]))
    log(f"data: {len(data)} images, {len(enc['texts']) - 1} distinct captions; sizes {sizes}; "
        f"text {list(enc['txt'].shape[1:])}")  # fmt: skip


@torch.no_grad()
def finish_t2i(run, cfg, model, ae, enc, data, losses, step, train_seconds, device, dtype):
    """lora.safetensors, metrics.json, loss.png, and samples.png: [training image | generated from its caption]."""
    model.eval()
    save_lora(model, run / "lora.safetensors", format=cfg.lora_format)
    metrics = {
        "task": "t2i",
        "train_seconds": train_seconds,
        "steps": step,
        "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
        "images": len(data),
        "lora_format": cfg.lora_format,
    }
    write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_png(line_plot({"loss": _smooth(losses)}, "training loss (t2i)"), run / "loss.png")
    if cfg.sample_steps <= 0:
        return
    spec = spec_for(model)
    guidance, shift = spec.guidance, spec.shift
    ae.to(device)
    width, height = data.sizes[0]
    rows, prompts = [], []
    for i in [i for i in range(len(data)) if data.sizes[i] == (width, height)][:4]:  # one size: one grid
        sample = data[i]
        k = enc["texts"].index(sample["caption"])
        txt, y = enc["txt"][k : k + 1].to(device), enc["y"][k : k + 1].to(device)  # [1, 512, 4096], [1, 768]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            image = generate(model, ae, txt, y, width, height, cfg.sample_steps, guidance, shift, seed=cfg.seed + i)
        rows.append([sample["image"], image[0].float().cpu()])  # [3, 512, 512] each
        prompts.append(sample["caption"])
    text = {"steps": cfg.sample_steps, "guidance": guidance, "captions": "\n".join(prompts)}  # the PNG's tEXt
    save_png(image_grid(rows, captions=["training image", "generated"]), run / "samples.png", text=text)
    ae.to("cpu")
    log(f"samples: {len(rows)} captions, {cfg.sample_steps} Euler steps, guidance {guidance}")


def _smooth(xs: list[float], k: int = 20) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (WeightsError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
