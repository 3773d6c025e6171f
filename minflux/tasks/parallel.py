"""Training on many processes: DDP (a whole copy of the model per process) or FSDP2 (each process holds 1/K of it).

    torchrun --nproc_per_node=K train.py ...                   DDP: weights, gradients and AdamW's state on every GPU
    torchrun --nproc_per_node=K train.py --parallel fsdp ...   FSDP2: every double and single block, and the whole
                                                               model, `fully_shard`ed: parameters, gradients and
                                                               optimiser state split over the K processes

Under FSDP a block's parameters are all-gathered just before it runs and freed after; gradients are reduce-scattered
(averaged over the processes, as DDP's all-reduce averages them); AdamW updates each process's shard. With bf16 the
shards keep their stored dtype (the fp32 LoRA, the fp32 master weights of a full fine-tune) and are gathered in bf16,
gradients reduced in fp32 (`MixedPrecisionPolicy`). `--cpu-offload` keeps the shards in host memory between uses.

Checkpoints are `torch.distributed.checkpoint` folders: every process writes its shards of the trained parameters
and of the optimiser state; `--resume` reads them back on the same number of processes. Finished weights are
gathered into the usual single files (see save_atomic in minflux/files/weights.py).

What each process needs: memory_budget counts it from the model's parameters (as numbers: MemoryBudget, which
minflux/study/memory.py tabulates for the official presets), memory_estimate prints it before the first step.
The device, for one process or many: device_problem (a --device this machine lacks), device_memory and check_fits
(a batch far beyond the memory is refused before the first step).
"""

import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from minflux.files.weights import whole
from minflux.tasks.progress import world

GB = 2**30
# A Linear on [B, L, C] returns a view of its 2-D product, which FSDP2 warns about in case it is written in place;
# nothing in minflux writes into a model's output.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def shard(model: nn.Module, groups: list[dict], dtype: torch.dtype, offload: bool) -> list[dict]:
    """fully_shard every transformer block, then the whole model (the embedders, the final layer, a semantic
    injection); returns the optimiser's groups with the sharded parameters (fully_shard replaces each parameter
    by a sharded one of the same name, so the groups made before sharding are remapped by name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [[names[id(p)] for p in g["params"]] for g in groups]
    options = {}
    if dtype != torch.float32:  # gathered in dtype, gradients reduced in fp32
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if offload:  # pinned host memory, where there is a GPU to copy to
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    flux = getattr(model, "flux", model)
    for block in [*flux.double_blocks, *flux.single_blocks]:
        fully_shard(block, **options)
    fully_shard(model, **options)
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, chosen)]


def local_bytes(model: nn.Module) -> int:
    """The bytes of parameters this process holds (its shards under FSDP, everything otherwise)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ over every process's gradients: under FSDP the norm of the sharded gradients is a
    distributed tensor, made whole here (every process takes part)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = whole(torch.nn.utils.get_total_norm([p.grad for p in params]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


# --- sharded checkpoints -------------------------------------------------------------------------------------

OPTIONS = StateDictOptions(ignore_frozen_params=True)  # the frozen base is not checkpointed: it is on disk already


def save_sharded(model: nn.Module, opt: torch.optim.Optimizer, folder) -> None:
    """Every process writes its shards of the trained parameters and the optimiser state into `folder`
    (torch.distributed.checkpoint: one .distcp file per process, and .metadata, written last)."""
    model_state, optim_state = get_state_dict(model, opt, options=OPTIONS)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, folder) -> None:
    """The shards of `folder` into the model and the optimiser (the same number of processes that wrote it)."""
    model_state, optim_state = get_state_dict(model, opt, options=OPTIONS)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )  # the frozen base: as loaded


# --- what each process needs ---------------------------------------------------------------------------------


@dataclass
class MemoryBudget:
    """What one process needs, in bytes, counted from the parameters of the model it trains (memory_budget)."""

    weights: int  # every parameter as stored: the frozen base, the fp32 LoRA or fp32 master weights
    trained: int  # per trained parameter, its gradient (as stored) and AdamW's two fp32 moments
    block: int  # the largest block's parameters in the compute dtype, as FSDP gathers them
    root: int  # the parameters outside the blocks (embedders, shared modulations, final layer), gathered throughout
    activations: int

    @property
    def ddp(self) -> int:
        """A whole copy per process: weights, gradients, AdamW's state and the activations (one GPU alike)."""
        return self.weights + self.trained + self.activations

    def fsdp(self, processes: int) -> float:
        """1/K of the weights, gradients and AdamW's state, two blocks gathered (the one running, the next being
        fetched), the parameters outside the blocks (FSDP2 keeps the root's gathered through the step) and the
        activations."""
        return self.host(processes) + self.offload_device

    @property
    def offload_device(self) -> int:
        """FSDP + --cpu-offload on the device: the two gathered blocks, the root's parameters and the activations."""
        return 2 * self.block + self.root + self.activations

    def host(self, processes: int) -> float:
        """1/K of the weights, gradients and AdamW's state: the shards, kept in host memory with --cpu-offload."""
        return (self.weights + self.trained) / processes


def memory_budget(model: nn.Module, batch: int, seq: int, checkpointing: bool, dtype: torch.dtype) -> MemoryBudget:
    """A rough budget per process, for DDP and for FSDP over K processes: weights (as stored; FSDP: 1/K of them,
    plus the largest block gathered in `dtype`), what training adds per trained parameter (its gradient and AdamW's
    two fp32 moments; FSDP: 1/K), and activations (activation_bytes; the same for both, as each process runs its own
    share of the batch); under FSDP the parameters outside the blocks (the embedders, FLUX.2's shared modulations,
    the final layer), which FSDP2 keeps gathered through the step. Not counted: CUDA's workspace and the allocator's
    slack."""
    flux = getattr(model, "flux", model)
    size = torch.finfo(dtype).bits // 8
    blocks = [*flux.double_blocks, *flux.single_blocks]
    return MemoryBudget(
        weights=sum(t.numel() * t.element_size() for t in model.parameters()),
        trained=sum(t.numel() * (t.element_size() + 8) for t in model.parameters() if t.requires_grad),
        block=max(sum(t.numel() for t in b.parameters()) for b in blocks) * size,
        root=(sum(t.numel() for t in flux.parameters()) - sum(t.numel() for b in blocks for t in b.parameters()))
        * size,
        activations=activation_bytes(model, batch, seq, checkpointing, dtype),
    )


def memory_estimate(
    model: nn.Module, batch: int, seq: int, checkpointing: bool, dtype: torch.dtype, processes: int = 1
) -> str:
    """memory_budget as the line train.py prints before the first step: DDP and FSDP over `processes`; with
    --cpu-offload the shards wait in host memory."""
    m = memory_budget(model, batch, seq, checkpointing, dtype)
    gb = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
    return (
        f"memory estimate per process: weights {gb(m.weights)}, gradients + optimizer {gb(m.trained)}, activations "
        f"~{gb(m.activations)} (batch {batch} × {seq} tokens); DDP {gb(m.ddp)}, FSDP over {processes} process(es) "
        f"{gb(m.fsdp(processes))} (1/{processes} of the weights and optimizer + two blocks and the rest gathered), "
        f"FSDP + --cpu-offload {gb(m.offload_device)} on the device and {gb(m.host(processes))} of host memory"
    )


def activation_bytes(model: nn.Module, batch: int, seq: int, checkpointing: bool, dtype: torch.dtype) -> int:
    """memory_estimate's activations: about 30 hidden-size tensors per token in a block kept for backward, or one
    per block with gradient checkpointing."""
    p = getattr(model, "flux", model).params
    blocks = p.depth + p.depth_single_blocks
    return batch * seq * p.hidden_size * (torch.finfo(dtype).bits // 8) * blocks * (1 if checkpointing else 30)


def device_memory(device: torch.device) -> int:
    """The memory of `device` in bytes: a GPU's own, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")  # what --device takes


def device_problem(device: str) -> str | None:
    """Why torch cannot use `device` (auto, cpu, cuda, cuda:N, mps) on this machine; None when it can."""
    if not DEVICE.fullmatch(device):
        return "expected auto, cpu, cuda, cuda:N or mps"
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this build of torch has no CUDA" if torch.version.cuda is None else "this machine has none"
        return f"no CUDA device is available ({why}); use cpu or auto"
    if device.startswith("cuda:") and int(device[5:]) >= (n := torch.cuda.device_count()):
        names = "cuda:0" if n == 1 else f"cuda:0 to cuda:{n - 1}"
        return f"this machine has {n} CUDA device{'s' if n > 1 else ''}: {names}"
    if device == "mps" and not torch.backends.mps.is_available():
        return "no MPS device is available (Apple silicon and a torch built for it only)"
    return None


def check_fits(batch_size: int, activations: int, device: torch.device) -> None:
    """A ValueError before the first step when the activations of one step alone exceed the device's whole memory
    (the estimate is rough, so only a batch far too large is refused; a smaller excess meets the allocator)."""
    total = device_memory(device)
    if activations > total:
        raise ValueError(
            f"--batch-size {batch_size}: one step's activations need about {activations / GB:,.0f} GB "
            f"(memory estimate), more than the {total / GB:,.0f} GB of {device}; lower --batch-size (the "
            "global batch), the image size (--panel-size, --resolution), or use --gradient-checkpointing"
        )


def describe(model: nn.Module, device: torch.device) -> str:
    """What each process holds after sharding, measured from the local shards (every process takes part; the count
    travels on `device`, as NCCL gathers CUDA tensors only)."""
    mine = torch.tensor([local_bytes(model)], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world())]
    dist.all_gather(every, mine)
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    held = ", ".join(f"{int(t.item()):,}" for t in every)
    return f"fsdp: {world()} processes hold {held} of the {total:,} parameter bytes"
