"""What every training task shares: the batch it hands the loop, the caption-embedding cache, the frozen parts.

A task (vis2ir.py, t2i.py) encodes everything frozen once, then draws each step's global `Batch` from that cache;
train.py keeps its process's share and calls `flow_matching_loss` with it, the same call for every task.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minflux.files.load import load_ae, load_clip, load_flux, load_t5
from minflux.files.weights import WeightsError
from minflux.flux2 import Flux2, Flux2Params
from minflux.lora import inject_lora, lora_layers
from minflux.model import Flux
from minflux.presets import configs
from minflux.sampling import Inputs


@dataclass
class Batch:
    """One training batch: the clean target latents, their noise and times, and the model's other inputs."""

    x0: Tensor  # [B, L, 64]  packed clean latents of the target
    noise: Tensor  # [B, L, 64]
    t: Tensor  # [B]  in (0, 1)
    guidance: Tensor | None  # [B]  the guidance embedding's input (models without one ignore it; FLUX.2 klein: None)
    inputs: Inputs  # img_ids, txt, txt_ids, y and the conditions (img is None: x_t is made from x0)
    loss_mask: Tensor | None = None  # [B, L] bool: the tokens the loss counts (None: all)

    def share(self, rank: int, world: int) -> "Batch":
        """This process's rows of the global batch (every process drew the same global batch)."""
        per = self.x0.shape[0] // world
        rows = slice(rank * per, (rank + 1) * per)
        return self._map(lambda name, t: t[rows])

    def to(self, device, dtype) -> "Batch":
        """On `device`, the floating tensors in `dtype` (the ids and the mask as they are)."""
        return self._map(
            lambda name, t: t.to(device, dtype if t.is_floating_point() and not name.endswith("_ids") else None)
        )

    def _map(self, fn) -> "Batch":
        mask = None if self.loss_mask is None else fn("loss_mask", self.loss_mask)
        return Batch(
            fn("x0", self.x0),
            fn("noise", self.noise),
            fn("t", self.t),
            None if self.guidance is None else fn("guidance", self.guidance),
            self.inputs.map(fn),
            mask,
        )


@dataclass
class TextCache:
    """The frozen text encoders' outputs for every distinct caption, computed once and kept on the CPU.

    `t5` and `clip` look prompts up in it, so the cache stands in for the encoders: prepare(cache.t5, cache.clip, ...).
    FLUX.2 has one text encoder (Qwen3 or Mistral), in T5's place: prepare_flux2(cache.t5, ...), and no pooled vector.
    """

    texts: list[str]  # the distinct captions, sorted
    txt: Tensor  # [U, T, 4096]  T5 hidden states  (FLUX.2: [U, 512, 3 · hidden] stacked LLM layers)
    y: Tensor | None  # [U, 768]  pooled CLIP  (FLUX.2: None)

    @classmethod
    @torch.no_grad()
    def encode(cls, t5, clip, captions: list[str], dtype=None, chunk: int = 64) -> "TextCache":
        """t5: prompts → [B, T, C] (FLUX.2: the LLM embedder); clip: prompts → [B, 768], or None (FLUX.2)."""
        texts = sorted(set(captions))
        chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
        y = None if clip is None else torch.cat([clip(c) for c in chunks]).to("cpu", dtype)  # [U, 768]
        txt = torch.cat([t5(c) for c in chunks])  # [U, 512, 4096]
        return cls(texts, txt.to("cpu", dtype), y)

    def index(self, prompts: list[str]) -> Tensor:
        where = {text: i for i, text in enumerate(self.texts)}
        return torch.tensor([where[p] for p in prompts], dtype=torch.long)  # [B]

    def t5(self, prompts: list[str]) -> Tensor:
        return self.txt[self.index(prompts)]  # [B, 512, 4096]

    def clip(self, prompts: list[str]) -> Tensor:
        return self.y[self.index(prompts)]  # [B, 768]


def frozen_parts(ae, clip, text_encoder) -> dict[str, nn.Module]:
    """The frozen modules by name, for --params and for freezing: FLUX.1's VAE, CLIP and T5, or FLUX.2's VAE and
    its one text encoder (clip None)."""
    if clip is None:
        return {"ae": ae, "text_encoder": text_encoder.model}
    return {"ae": ae, "clip": clip.model, "t5": text_encoder.model}


def load_frozen(cfg, device, dtype):
    """(ae, clip, t5) from the official weights the config names (--repo, or --flux with --ae, --clip, --t5)."""
    missing = [name for name in ("ae", "clip", "t5") if getattr(cfg, name) is None]
    if missing:
        raise WeightsError(f"--flux given without --{', --'.join(missing)} (or --repo with all of them)")
    ae = load_ae(cfg.ae, device=device, dtype=dtype)
    clip = load_clip(cfg.clip, device=device, dtype=dtype)
    t5 = load_t5(cfg.t5, max_length=cfg.t5_max_length, device=device, dtype=dtype)
    return ae, clip, t5


def lora_transformer(cfg, device, dtype) -> Flux | Flux2:
    """The official transformer the config names (--flux), frozen, with LoRA on the layers of --lora-targets
    (kohya's default: every linear layer of the blocks). The LoRA weights are kept in fp32 (their AdamW updates
    are smaller than bf16 resolves); under bf16 autocast the forward pass still runs in bf16.
    --full-finetune: no LoRA; every weight is trained, kept in fp32 for the same reason (the master weights)."""
    if cfg.full_finetune:
        flux = load_flux(cfg.flux, device=device, dtype=torch.float32)
        flux.gradient_checkpointing = cfg.gradient_checkpointing
        return flux.requires_grad_(True)
    flux = load_flux(cfg.flux, device=device, dtype=dtype)
    flux.requires_grad_(False)
    fp32_lora(flux, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(",") if cfg.lora_targets else None)
    flux.gradient_checkpointing = cfg.gradient_checkpointing
    return flux


def fp32_lora(flux: nn.Module, rank: int, alpha: float | None = None, targets=None) -> nn.Module:
    """inject_lora (targets None: the generation's defaults), the LoRA weights kept in fp32 whatever the base's
    dtype, as train.py trains them (lora_transformer; the memory tables of minflux.study.memory)."""
    inject_lora(flux, rank, alpha, targets=targets)
    for layer in lora_layers(flux).values():
        layer.lora_down.float()
        layer.lora_up.float()
    return flux


def scratch_transformer(cfg, device) -> Flux | Flux2:
    """The embedded default's transformer: the small preset, randomly initialised from the run's seed, with DiT's
    zero output layer (the first prediction is 0), every weight trained."""
    torch.manual_seed(cfg.seed)
    params = configs[cfg.preset].params
    flux = (Flux2 if isinstance(params, Flux2Params) else Flux)(params)
    with torch.no_grad():
        flux.final_layer.linear.weight.zero_()
        if flux.final_layer.linear.bias is not None:  # FLUX.2's layers have no biases
            flux.final_layer.linear.bias.zero_()
    flux.variant = cfg.preset
    flux.gradient_checkpointing = cfg.gradient_checkpointing
    return flux.to(device)
