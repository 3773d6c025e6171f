"""What each GPU needs to train FLUX.1 or FLUX.2 at 1024², from the presets built on the meta device (no memory).

    python -m minflux.study.memory                   FLUX.1 [dev], FLUX.2 [klein] 4B and 9B, FLUX.2 [dev]
    python -m minflux.study.memory flux2-klein-4b    one table: any preset of minflux.presets.configs

Each table counts the transformer as train.py trains it, by memory_budget (minflux/tasks/parallel.py: the estimate
train.py prints before the first step): one 1024 × 1024 image per GPU (4,096 image tokens, a token per 16 × 16
pixels in both generations, + 512 text tokens), gradient checkpointing on, bf16 maths. Two rows:
- LoRA rank 16 on the generation's default targets (minflux/lora.py: the blocks' linear layers, FLUX.1's per-block
  modulations among them), the base frozen in bf16, the LoRA weights in fp32 as tasks/common.py keeps them;
- full fine-tune: every weight trained, kept in fp32 (the master weights), with its gradient and AdamW's moments.
Columns: one GPU; DDP over any K (a whole copy each); FSDP over K = 2, 4, 8; FSDP + --cpu-offload (the GPU holds
two gathered blocks and the activations, the host 1/K of the rest per process). The tables in
minflux/study/BENCH.md are this tool's output (tests/test_memory.py recomputes them).
"""

import argparse
import sys

import torch
from torch import nn

from minflux.flux2 import Flux2, Flux2Params
from minflux.model import Flux
from minflux.presets import configs
from minflux.tasks.common import fp32_lora
from minflux.tasks.parallel import GB, MemoryBudget, memory_budget

PRESETS = ("flux-dev", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev")
SIZE, TEXT_TOKENS, RANK, SHARDS = 1024, 512, 16, (2, 4, 8)
HEADER = [
    "| per GPU | 1 GPU | DDP, any K | FSDP, K = 2 | K = 4 | K = 8 | FSDP + offload |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def training_model(preset: str, full: bool) -> nn.Module:
    """The preset's transformer on the meta device, as train.py holds it: every weight trained in fp32 (`full`), or
    the base frozen in bf16 with a rank-16 LoRA of the default targets in fp32."""
    params = configs[preset].params
    with torch.device("meta"):
        flux = (Flux2 if isinstance(params, Flux2Params) else Flux)(params)
    if full:
        return flux.float().requires_grad_(True)
    flux.to(torch.bfloat16).requires_grad_(False)
    return fp32_lora(flux, RANK)  # the generation's DEFAULT_TARGETS


def budget(model: nn.Module) -> MemoryBudget:
    """One 1024² image per GPU: (1024 / 16)² image tokens + 512 text tokens, checkpointed, bf16."""
    return memory_budget(model, 1, (SIZE // 16) ** 2 + TEXT_TOKENS, True, torch.bfloat16)


def count(n: int) -> str:
    """A parameter count in billions or, below one, millions: "11.9 B", "76.6 M"."""
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def memory_row(model: nn.Module) -> str:
    """One markdown row: what the model trains, then GB per GPU in each column."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    if frozen:
        label = f"LoRA rank {RANK} (bf16 base {frozen / GB:.1f} GB, {count(trained)} fp32 LoRA weights)"
    else:
        label = f"full fine-tune ({count(trained)} fp32 master weights + AdamW)"
    m = budget(model)
    cells = [f"{n / GB:.1f} GB" for n in (m.ddp, m.ddp, *(m.fsdp(k) for k in SHARDS))]
    offload = f"{m.offload_device / GB:.1f} GB GPU + {m.host(1) / GB:.3g}/K GB host"
    return "| " + " | ".join([label, *cells, offload]) + " |"


def memory_table(preset: str) -> str:
    """The preset's table: the header, the LoRA row, the full fine-tune row."""
    return "\n".join([*HEADER, *(memory_row(training_model(preset, full)) for full in (False, True))])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minflux.study.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "presets", nargs="*", default=list(PRESETS), metavar="PRESET", help=f"default: {' '.join(PRESETS)}"
    )
    args = parser.parse_args(argv)
    if unknown := [p for p in args.presets if p not in configs]:
        parser.error(f"unknown preset {', '.join(unknown)}; known: {', '.join(configs)}")
    for preset in args.presets:
        n = sum(p.numel() for p in training_model(preset, full=True).parameters())
        print(f"{preset} ({count(n)} parameters): 1024², one image per GPU, gradient checkpointing, bf16\n")
        print(memory_table(preset) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
