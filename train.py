"""Train FLUX.1-Fill for visible → infrared translation (vis2ir), guided by a semantic map.

    python train.py                                   the embedded default: a small FLUX trained from scratch
                                                      on CPU, on generated [visible | infrared | semantic] scenes
    python train.py --semantic none                   the same without the semantic map (the ablation)
    python train.py --finetune runs/vis2ir-zeroconv   fine-tune a finished small run with LoRA
    python train.py --repo FLUX.1-Fill-dev --data triptychs/    LoRA on the official Fill model (GPU)
    torchrun --nproc_per_node=2 train.py ...          the same, data-parallel (gloo on CPU, NCCL on CUDA)

One step (seeds 000/001; minflux/vis2ir.py has the shapes): encode the triptych with the frozen VAE into
x_0, the Fill condition and the semantic tokens; draw t and ε; x_t = (1 − t) x_0 + t ε; inject the semantic
map; the transformer predicts v; loss = MSE(v, ε − x_0). Every flag below is a field of TrainConfig;
`--config file.toml` sets the same fields. The last line printed is the run folder.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from minflux.autoencoder import load_ae
from minflux.clip import load_clip
from minflux.data import SyntheticTriptychs, TriptychFolder, split_triptych
from minflux.embedded import build_text_encoders, train_autoencoder
from minflux.flow import prepare_txt_ids, sample_t, shift_mu
from minflux.loaders import load_flux, save_flux
from minflux.lora import inject_lora, load_lora, save_lora
from minflux.model import Flux
from minflux.presets import configs
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
from minflux.t5 import load_t5
from minflux.vis2ir import SEMANTIC_MODES, Vis2IR, encode_triptych, generate_infrared, vis2ir_loss
from minflux.weights import WeightsError, read_state_dict, save_atomic, write_atomic


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

    HELP = {
        "semantic": f"how the semantic map is injected: {', '.join(SEMANTIC_MODES)}",
        "adapter_layers": "SemanticCrossAttention layers",
        "adapter_heads": "heads per SemanticCrossAttention layer",
        "data": "a folder of triptychs, or of visible/ infrared/ semantic/ folders; none = generated scenes",
        "on_error": "an unusable data file: 'skip' (and count) or 'stop'",
        "panel_size": "panel side in pixels (a multiple of 16)",
        "train_samples": "generated training scenes",
        "heldout_samples": "held-out scenes (generated), or held-out files (taken from the folder's end)",
        "preset": "the architecture trained from scratch when no weights are given",
        "repo": "an official repo folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizers)",
        "flux": "FLUX.1-Fill transformer weights (file or folder)",
        "ae": "autoencoder weights",
        "clip": "CLIP-L text encoder (folder or file)",
        "t5": "T5-XXL text encoder (folder or file)",
        "finetune": "a finished run folder: fine-tune its model with LoRA",
        "lora_rank": "LoRA rank (LoRA is used with given weights or --finetune)",
        "lora_alpha": "LoRA alpha (default: the rank)",
        "lora_targets": "comma-separated LoRA target groups or module patterns (default: lora.py's)",
        "steps": "optimisation steps",
        "batch_size": "global batch size (split across processes under torchrun)",
        "lr": "peak learning rate (linear warm-up, then cosine decay to lr/10)",
        "adapter_lr": "learning rate of the semantic adapter (default: lr)",
        "lr_warmup_steps": "linear learning-rate warm-up steps",
        "adapter_warmup_steps": "seed 002's first stage: only the adapter trains for this many steps",
        "t_sampling": "training time distribution: logit_normal or uniform (shifted by image size)",
        "target_only": "count the loss on the target half of the diptych only",
        "max_grad_norm": "gradient clipping: the gradient's norm is scaled down to at most this",
        "guidance": "guidance value fed to guidance-distilled models (official Fill)",
        "t5_max_length": "T5 tokens per prompt (512 for the official dev models)",
        "vae_steps": "training steps of the embedded default's VAE (cached)",
        "seed": "seed of everything random",
        "sample_steps": "Euler steps of the held-out evaluation",
        "out": "folder holding the run folders",
        "name": "run folder name (default: vis2ir-<semantic>)",
        "checkpoint_every": "steps between checkpoints (also written at the end and on Ctrl-C / SIGTERM)",
        "stop_at": "stop after this step with a checkpoint (for jobs with a time limit; continue with --resume)",
        "resume": "a run folder to continue from its last checkpoint",
        "device": "auto, cpu or cuda",
        "dtype": "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16",
        "gradient_checkpointing": "recompute block activations in backward to save memory",
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


def build_model(cfg: TrainConfig, device, dtype) -> tuple[Vis2IR, list, list]:
    """The Fill transformer with the semantic injection: (model, its trained transformer parameters — all of them
    from scratch, the LoRA's with given weights — and the injection's parameters)."""
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


def memory_estimate(model: Vis2IR, n_trained: int, batch: int, seq: int, checkpointing: bool) -> str:
    """A rough budget, printed before the first step: weights, what training adds per trained parameter
    (its gradient and AdamW's two fp32 moments), and activations (about 30 hidden-size tensors per token in a
    block kept for backward, or one per block with gradient checkpointing)."""
    p = model.flux.params
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


# --- checkpoints -------------------------------------------------------------------------------------------


def trainable_state(model: Vis2IR, cfg: TrainConfig) -> dict:
    sd = model.injection_state_dict()
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
    if args.resume:  # the run's own config, then whatever this command line changes
        given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
        cfg = replace(_cfg_of(Path(args.resume)), **{"stop_at": None, **given})  # an old --stop-at is done
    else:
        cfg = config_from_args(TrainConfig, args)
    if cfg.semantic not in SEMANTIC_MODES:
        parser.error(f"--semantic {cfg.semantic}: expected one of {', '.join(SEMANTIC_MODES)}")
    if cfg.preset not in configs or configs[cfg.preset].params.in_channels != 384:
        fill = [n for n, s in configs.items() if s.params.in_channels == 384]
        parser.error(f"--preset {cfg.preset}: expected a Fill preset ({', '.join(fill)})")
    return resolve_weight_paths(cfg)


def main(argv=None) -> int:
    cfg = parse(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu"))
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    run = Path(cfg.resume) if cfg.resume else Path(cfg.out) / (cfg.name or f"vis2ir-{cfg.semantic}")
    run.mkdir(parents=True, exist_ok=True)
    if rank() == 0 and not cfg.resume:
        write_text_atomic(run / "config.toml", to_toml(cfg))
    torch.manual_seed(cfg.seed)

    # 1. data and the frozen parts; everything they compute is computed once
    train_set, heldout_set = load_data(cfg)
    ae, clip, t5 = frozen_parts(cfg, train_set, run, device, dtype)
    enc = encode_dataset(train_set, ae, clip, t5, cfg, device, dtype)
    held = encode_dataset(heldout_set, ae, clip, t5, cfg, device, dtype)
    del clip, t5  # the text encoders are done: free them before the transformer trains
    log(f"data: {len(train_set)} train, {len(heldout_set)} held-out; x0 {list(enc['x0'].shape[1:])}, "
        f"x_cond {list(enc['x_cond'].shape[1:])}, text {list(enc['txt'].shape[1:])}")  # fmt: skip

    # 2. the trainable model and its optimiser
    model, base_params, adapter_params = build_model(cfg, device, dtype)
    groups = [{"params": base_params, "lr": cfg.lr, "name": "transformer"}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": cfg.adapter_lr or cfg.lr, "name": "adapter"})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {n_train:,} trained"
        f"{' (LoRA + adapter)' if cfg.flux else ''}; semantic injection {sum(p.numel() for p in adapter_params):,}")  # fmt: skip
    seq = enc["x0"].shape[1] + enc["txt"].shape[1]
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
    B, per_rank = cfg.batch_size, cfg.batch_size // world()
    mu = shift_mu(enc["x0"].shape[1])
    progress = Progress(cfg.steps, label="step ")
    log_file = open(run / "log.jsonl", "a", buffering=1) if rank() == 0 else None  # line-buffered: a crash loses no line
    start = time.perf_counter()
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    while step < last and stop["signal"] is None:
        idx = torch.randint(len(enc["x0"]), (B,), generator=gen)
        t = sample_t(B, cfg.t_sampling, mu=mu, generator=gen)
        noise = torch.randn((B, *enc["x0"].shape[1:]), generator=gen)
        mine = slice(rank() * per_rank, (rank() + 1) * per_rank)  # this process's share of the global batch
        batch = {k: v[idx[mine]].to(device) for k, v in enc.items()}
        txt_ids = prepare_txt_ids(per_rank, batch["txt"].shape[1], device=device)
        guidance = torch.full((per_rank,), cfg.guidance, device=device, dtype=dtype)
        for g in opt.param_groups:  # seed 002's first stage trains the adapter alone
            base_lr = cfg.adapter_lr or cfg.lr if g["name"] == "adapter" else cfg.lr
            g["lr"] = base_lr * lr_factor(step, cfg)
            if g["name"] == "transformer" and step < cfg.adapter_warmup_steps:
                g["lr"] = 0.0

        loss = vis2ir_loss(
            ddp, batch, batch["txt"], txt_ids, batch["y"], t[mine].to(device, dtype), noise[mine].to(device, dtype),
            guidance, target_only=cfg.target_only,
        )  # fmt: skip
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
    if rank() == 0:
        finish(run, cfg, model, ae, held, heldout_set, losses, step, train_seconds, device, dtype)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    log(run)
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
        save_lora(model.flux, run / "lora.safetensors")
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


def _smooth(xs: list[float], k: int = 20) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (WeightsError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
