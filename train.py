"""Train FLUX.1-Fill for visible → infrared translation (vis2ir), guided by a semantic map; or a text-to-image
LoRA on FLUX.1 dev or schnell (t2i).

    python train.py                                   the embedded default: a small FLUX trained from scratch
                                                      on CPU, on generated [visible | infrared | semantic] scenes
    python train.py --semantic none                   the same without the semantic map (the ablation)
    python train.py --finetune runs/vis2ir-zeroconv   fine-tune a finished small run with LoRA
    python train.py --repo FLUX.1-Fill-dev --data triptychs/    LoRA on the official Fill model (GPU)
    torchrun --nproc_per_node=2 train.py ...          the same, data-parallel (gloo on CPU, NCCL on CUDA)
    torchrun --nproc_per_node=8 train.py --parallel fsdp --repo FLUX.1-dev --full-finetune ...
                                                      sharded (FSDP2): each process holds 1/8 of the model
    python train.py --task t2i --repo FLUX.1-dev --data photos/     a LoRA from images with same-named .txt
                                                      captions (minflux/tasks/t2i.py has the step)
    python train.py --task t2i --repo FLUX.2-klein-base-4B --data photos/    the same on FLUX.2 klein Base or dev
                                                      (minflux/tasks/t2i_flux2.py)

One step, for every task: draw a batch of clean latents x_0 with their conditions (the task encoded them once with
the frozen VAE and text encoders), times t and noise ε; x_t = (1 − t) x_0 + t ε; the model predicts v; loss =
MSE(v, ε − x_0) (minflux.flow_matching_loss). What differs between tasks (data, model, evaluation) is in
minflux/tasks/. Every flag below is a field of TrainConfig; `--config file.toml` sets the same fields. The last
line printed is the run folder.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from minflux.attention import cpu_bf16_note
from minflux.files.weights import DiskFull, WeightsError, is_disk_full, write_text_atomic
from minflux.model import compile_blocks
from minflux.sampling import flow_matching_loss
from minflux.study.params import parameter_table
from minflux.study.trace import shape_trace
from minflux.tasks import TASKS
from minflux.tasks.flags import to_toml
from minflux.tasks.folders import checkpoint_step, finished, load_checkpoint, make_run_folder, replace_run
from minflux.tasks.folders import removed_unless_checkpointed, resume_folder, save_checkpoint
from minflux.tasks.parallel import activation_bytes, check_fits, clip_gradients, describe, memory_estimate, shard
from minflux.tasks.progress import Progress, log, rank, world
from minflux.tasks.runs import TrainConfig, is_flux2_preset, parse_train_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv=None) -> TrainConfig:
    """The command line as a TrainConfig (minflux/tasks/runs.py): checked, exit code 2 on a bad value."""
    return parse_train_args(argv, __doc__, tasks=TASKS)


def main(argv=None) -> int:
    cfg = parse(argv)
    if cfg.resume and (done := finished(Path(cfg.resume), cfg.steps)):
        log(done)
        return 0
    device, dtype = start_processes(cfg)
    sharded = cfg.parallel == "fsdp"
    run = on_first_process(lambda: resume_folder(Path(cfg.resume)) if cfg.resume else new_folder(cfg))
    torch.manual_seed(cfg.seed)
    for sig in (signal.SIGINT, signal.SIGTERM):  # while setting up, Ctrl-C and SIGTERM alike stop at once
        signal.signal(sig, raise_stopped)

    with removed_unless_checkpointed(run, fresh=not cfg.resume):
        # 1. data and the frozen parts; everything they compute is computed once
        task = TASKS[cfg.task](cfg, run, device, dtype)
        for part in task.frozen.values():
            part.requires_grad_(False)  # never given to the optimiser, and counted as frozen by --params
        print_params(cfg, task.frozen, "the frozen parts")
        with maybe_trace(cfg.trace, f"encoding the data ({task.what})"):
            task.encode()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # 2. the trainable model (FSDP: built on the CPU, its shards sent to the device) and its optimiser
        model, groups = task.build_model(torch.device("cpu") if sharded else device)
        if cfg.compile:
            compile_blocks(model)  # each block kind compiles in the first step that runs it
        parts = dict(model.named_children()) if hasattr(model, "flux") else {"transformer": model}
        print_params(cfg, parts, "the model")
        batch = cfg.batch_size // world()
        budget = memory_estimate(model, batch, task.seq_len, cfg.gradient_checkpointing, dtype, world())
        log(f"warning: --full-finetune trains every weight; {budget}" if cfg.full_finetune else budget)
        acts = activation_bytes(model, batch, task.seq_len, cfg.gradient_checkpointing, dtype)
        check_fits(cfg.batch_size, acts, device)  # a batch far beyond the memory: refused before the first step
    if cfg.overwrite and not cfg.resume:  # set up without a fault: now the new run takes the old one's place
        run = task.run = on_first_process(lambda: replace_run(run, Path(cfg.output_dir) / run_name(cfg)))
    with removed_unless_checkpointed(run, fresh=not cfg.resume):
        try:
            return train(cfg, task, model, groups, run, device, dtype)
        except OSError as e:  # a full disk: DiskFull from write_atomic, a plain OSError from a log line
            step = checkpoint_step(run)
            if not is_disk_full(e) or not step:
                raise  # with no checkpoint the run folder is removed: __main__ says so
            full = e if isinstance(e, DiskFull) else DiskFull(e.filename or run / "log.jsonl")
            log(
                f"train.py: {full}: the last checkpoint (step {step}) is whole; free space, then: python train.py "
                f"--resume {run}"
            )
            return 1


def start_processes(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The process group under torchrun (or a group of one for FSDP's CPU offload), and this process's device and
    dtype."""
    backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group(backend)
    elif cfg.parallel == "fsdp":  # one process: FSDP for its CPU offload, in a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # the GPU of this process on its node
        torch.cuda.set_device(device)
    dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if note := cpu_bf16_note(device, dtype):
        log(note)
    return device, dtype


def train(cfg: TrainConfig, task, model, groups, run: Path, device, dtype) -> int:
    """The optimiser, the loop and the finish of a run whose task is set up."""
    sharded = cfg.parallel == "fsdp"
    if sharded:
        groups = shard(model, groups, dtype, cfg.cpu_offload)
        log(describe(model, device))
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, fused=True)  # fused: about half the time
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() and not sharded else model
    gen = torch.Generator().manual_seed(cfg.seed)  # batches, times and noise: its state is checkpointed
    step, losses = load_checkpoint(run, model, opt, gen, sharded) if cfg.resume else (0, [])
    saved = step if cfg.resume else None  # the step of the newest checkpoint
    if step:
        log(f"resumed at step {step}")
    stop = {"signal": None}  # from here a signal ends the loop after its step, with a checkpoint
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.update(signal=s))

    # 3. the loop: every process draws the same global batch, times and noise from `gen`, then keeps its share
    steps_log, first, last = StepLog(run, cfg.steps), step, min(cfg.steps, cfg.stop_at or cfg.steps)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # fp32 LoRA, bf16 maths
    while step < last and stop["signal"] is None:
        set_learning_rates(opt, step, cfg)
        with maybe_trace(cfg.trace and step == first, "the first training step"), autocast:
            batch = task.draw(gen).share(rank(), world()).to(device, dtype)
            loss = flow_matching_loss(
                ddp, batch.x0, batch.noise, batch.t, batch.guidance, batch.loss_mask, **batch.inputs
            )
        if not math.isfinite(loss.item()):
            log(
                f"step {step + 1}: the loss is {loss.item()}; stopping. "
                + (
                    f"The last good checkpoint is in {run / 'checkpoints'}"
                    if saved
                    else "No checkpoint had been written yet."
                )
            )
            return 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        opt.step()
        step += 1

        losses.append(averaged(loss))
        stop["signal"] = agreed(stop["signal"], device)  # a signal to any process stops every process at this step
        steps_log.write(step, losses, grad_norm, getattr(model, "scales", []))  # (FSDP: every process gathers)
        if step % cfg.checkpoint_every == 0 or step == last or stop["signal"] is not None:
            save_checkpoint(run, model, opt, step, gen, losses, sharded)
            saved = step
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and (sharded or rank() == 0):
            with written_by_first(task, sharded):  # the last: samples.png
                task.samples(model, task.run / "samples" / f"step-{step:06d}.png")
    train_seconds = steps_log.close()
    if stop["signal"] is not None:
        if saved != step:  # the signal came after this step's checkpoint test (while sampling, say)
            save_checkpoint(run, model, opt, step, gen, losses, sharded)
        log(f"stopped by signal {stop['signal']} at step {step}; resume with: python train.py --resume {run}")
        return 128 + stop["signal"]
    if step < cfg.steps:
        log(f"stopped at step {step} of {cfg.steps} (--stop-at); continue with: python train.py --resume {run}")
        return 0
    return finish(cfg, task, model, run, losses, step, train_seconds, stop)


def finish(cfg: TrainConfig, task, model, run: Path, losses: list, step: int, train_seconds: float, stop: dict) -> int:
    """4. The held-out evaluation and the run folder's files; a signal now stops it at once (the checkpoint of `step`
    is whole). Under FSDP every process runs the model (each forward gathers the shards) and the others write into a
    scratch folder that is then removed."""
    sharded = cfg.parallel == "fsdp"
    if rank() == 0 or sharded:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, raise_stopped)
        before = {f: (run / f).stat().st_mtime_ns for f in task.final_files(model) if (run / f).exists()}
        try:
            if stop["signal"] is not None:  # one that came as the loop ended
                raise Stopped(stop["signal"])
            with written_by_first(task, sharded):
                task.finish(model, losses, step, train_seconds)
        except Stopped as e:
            missing = [
                f
                for f in task.final_files(model)
                if not (run / f).exists() or (run / f).stat().st_mtime_ns == before.get(f)
            ]
            log(
                f"stopped by signal {e.signum} during the final evaluation and writes; not written: "
                f"{', '.join(missing)}. The checkpoint of step {step} is kept; write them with: "
                f"python train.py --resume {run}"
            )
            return 128 + e.signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if dist.is_initialized():
        dist.barrier()
    log(run)  # while the ranks are known: printed once
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def set_learning_rates(opt, step: int, cfg: TrainConfig) -> None:
    """The schedule (lr_factor) for every group; the staged plan's first stage trains the semantic adapter alone."""
    for g in opt.param_groups:
        base_lr = cfg.adapter_lr or cfg.lr if g["name"] == "adapter" else cfg.lr
        g["lr"] = base_lr * lr_factor(step, cfg)
        if g["name"] == "transformer" and step < cfg.adapter_warmup_steps:
            g["lr"] = 0.0


def averaged(loss: torch.Tensor) -> float:
    """The step's loss, averaged over the processes."""
    loss = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def agreed(signum: int | None, device) -> int | None:
    """The signal any process received this step (every process then stops at the same step)."""
    if not dist.is_initialized():
        return signum
    t = torch.tensor([signum or 0], device=device)  # (NCCL reduces CUDA tensors only)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


class StepLog:
    """log.jsonl (a line a step, line-buffered: a crash loses no line) and the progress line, on the first process."""

    def __init__(self, run: Path, steps: int):
        self.steps, self.start = steps, time.perf_counter()
        self.progress = Progress(steps, label="step ")
        self.file = open(run / "log.jsonl", "a", buffering=1) if rank() == 0 else None

    def write(self, step: int, losses: list, grad_norm: float, scales: list) -> None:
        if self.file is None:
            return
        record = {"step": step, "loss": losses[-1], "grad_norm": grad_norm, "scales": scales}
        self.file.write(json.dumps({**record, "time": time.perf_counter() - self.start}) + "\n")
        if step % 10 == 0 or step == self.steps:
            fields = {"loss": sum(losses[-10:]) / len(losses[-10:])}
            self.progress.update(step, **fields, **({"scale": scales[0]} if scales else {}))

    def close(self) -> float:
        """Closes the file; returns the seconds since the loop started."""
        if self.file is not None:
            self.file.close()
        return time.perf_counter() - self.start


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the learning rate at the last step."""
    warmup = min(1.0, (step + 1) / max(cfg.lr_warmup_steps, 1))
    return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))))


# --- the run folder: a new one never written over, or the resumed one cleaned -----------------------------------


def on_first_process(make):
    """make() on the first process, and its result (or its ValueError) for every process: one run folder for all."""
    result = None
    if rank() == 0:
        try:
            result = make()
        except ValueError as e:
            result = ValueError(str(e))
    if dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, ValueError):
        raise result
    return result


def run_name(cfg: TrainConfig) -> str:
    """--name, or the default: vis2ir-<semantic>, or TASK-<data folder name>; flux2-kontext-<semantic> for the
    embedded FLUX.2 default."""
    what = Path(cfg.data).resolve().name if cfg.data and cfg.task != "vis2ir" else cfg.semantic
    flux2 = "flux2-" if is_flux2_preset(cfg.preset) and not (cfg.flux or cfg.data) else ""
    return cfg.name or f"{flux2}{cfg.task}-{what}"


def new_folder(cfg: TrainConfig) -> Path:
    """A new run's folder with its config.toml: OUT/NAME, or NAME-2, NAME-3, ... when taken (runs.make_run_folder).
    With --overwrite, a hidden folder that takes OUT/NAME's place once the run is set up (runs.replace_run)."""
    name = run_name(cfg)
    run = make_run_folder(Path(cfg.output_dir), name, cfg.overwrite)
    if run.name != name and not cfg.overwrite:
        log(f"{run.parent / name} is taken: this run is {run} (--resume continues a run, --overwrite replaces it)")
    with removed_unless_checkpointed(run, fresh=True):  # a full disk already, say
        write_text_atomic(run / "config.toml", to_toml(replace(cfg, overwrite=False)))  # --config it again: a new run
    return run


@contextlib.contextmanager
def written_by_first(task, sharded: bool):
    """Under FSDP every process runs the evaluation (each forward gathers the shards) and what it writes; the first
    writes into the run folder, the others into a scratch folder removed afterwards."""
    if not sharded or rank() == 0:
        yield
        return
    run, task.run = task.run, Path(tempfile.mkdtemp(prefix="minflux-rank"))
    try:
        yield
    finally:
        shutil.rmtree(task.run, ignore_errors=True)
        task.run = run


class Stopped(BaseException):
    """A signal while setting up (the new run is removed) or during the final evaluation and writes (the checkpoint
    is whole, --resume writes what is missing). A BaseException, as KeyboardInterrupt: no `except Exception` of a
    data loader takes it for a bad file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum, frame):
    raise Stopped(signum)


# --- for study: --trace and --params ------------------------------------------------------------------------


def maybe_trace(on: bool, what: str):
    """--trace: the shape of every stage of what runs inside, printed when it ends (minflux/study/trace.py)."""
    if not on or rank() != 0:
        return contextlib.nullcontext()
    log(f"--trace: {what}")
    return shape_trace()


def print_params(cfg: TrainConfig, parts: dict, what: str) -> None:
    if cfg.params and rank() == 0:
        log(f"--params: {what}\n{parameter_table(parts)}")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (WeightsError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
    except (Stopped, KeyboardInterrupt) as e:  # before the first step: no training to keep (a new run is removed)
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"train.py: stopped by signal {signum} while setting up, before the first step", file=sys.stderr)
        sys.exit(128 + signum)
    except OSError as e:  # before the first checkpoint (main says what is kept after it)
        if not is_disk_full(e):
            raise
        print(
            f"train.py: {e if isinstance(e, DiskFull) else 'no space left on the device'}: nothing was kept (a new "
            "run's folder is removed before its first checkpoint); free space and start again",
            file=sys.stderr,
        )
        sys.exit(1)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        print(
            f"train.py: out of memory ({str(e).splitlines()[0][:200]}): lower --batch-size (the global batch), the "
            "image size (--panel-size, --resolution) or --t5-max-length, or use --gradient-checkpointing",
            file=sys.stderr,
        )
        sys.exit(1)
