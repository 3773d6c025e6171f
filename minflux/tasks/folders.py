"""The run folder: made new (never over another run), replaced on --overwrite only once the new run is set up, or
cleaned and checked when a run resumes; and the checkpoints in it.

    make_run_folder, replace_run       a new folder (NAME, NAME-2, ...), or one that takes NAME's place
    removed_unless_checkpointed        a new run that fails before its first checkpoint leaves no folder
    resume_folder, check_checkpoint    what a crash left removed, the checkpoint found whole, before any work
    finished, checkpoint_step          what the folder says of the run: finished, or its newest checkpoint
    save_checkpoint, load_checkpoint   checkpoints/step-N/ (the trained weights, the optimiser, the generator)
    latest_run                         the newest finished run under a folder (sample.py's default)
"""

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from minflux.files.weights import DiskFull, WeightsError, is_disk_full, read_shapes, read_state_dict, save_atomic
from minflux.files.weights import save_torch, write_text_atomic
from minflux.tasks.parallel import load_sharded, save_sharded
from minflux.tasks.progress import log, rank

# Every run folder train.py makes holds this file: --overwrite replaces only a folder that has it (or an empty one).
RUN_MARKER = ".minflux-run"


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / RUN_MARKER).is_file()


def make_run_folder(out, name: str, overwrite: bool = False) -> Path:
    """A new, empty run folder, made here with its marker. A name already taken (a finished or an unfinished run,
    anything) gets the first free suffix, NAME-2, NAME-3, ...; mkdir decides, so two runs started at once never share
    one. overwrite: a hidden folder OUT/.NAME.new-RANDOM instead, which replace_run puts in the place of OUT/NAME
    once the run's setup has succeeded; OUT/NAME must be a run folder train.py made (its marker) or empty, else
    ValueError and nothing is touched."""
    folder = Path(out) / name
    try:
        if overwrite and folder.exists():
            if not folder.is_dir() or (any(folder.iterdir()) and not is_run_folder(folder)):
                raise ValueError(
                    f"--overwrite: {folder} is not a run folder made by train.py (no {RUN_MARKER} in "
                    "it); left as it is: remove it yourself, or choose another --name"
                )
            new = Path(out) / f".{name}.new-{secrets.token_hex(4)}"
            new.mkdir()
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            for k in itertools.count(1):
                new = Path(out) / (name if k == 1 else f"{name}-{k}")
                try:
                    new.mkdir()
                    break
                except FileExistsError:
                    continue
        try:
            (new / RUN_MARKER).write_text("a run folder of minflux's train.py (train.py --overwrite may replace it)\n")
        except OSError:
            shutil.rmtree(new, ignore_errors=True)
            raise
        return new
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(folder / RUN_MARKER) from None
        raise ValueError(f"--out {out}: cannot make the run folder {name} there: {e}") from None


def replace_run(new: Path, folder: Path) -> Path:
    """Put the run folder `new` (make_run_folder's hidden one) in the place of `folder`: the old folder is moved
    aside, the new one renamed into its place, then the old one deleted. A crash in between leaves both whole."""
    if new == folder:  # --overwrite where no run had the name: make_run_folder made the folder itself
        return folder
    aside = folder.parent / f".{folder.name}.replaced-{secrets.token_hex(4)}"
    if folder.exists():
        if folder.is_dir() and any(folder.iterdir()) and not is_run_folder(folder):  # made meanwhile by someone else
            raise ValueError(
                f"--overwrite: {folder} is no longer a run folder made by train.py; left as it is, this run is in {new}"
            )
        os.rename(folder, aside)
    os.rename(new, folder)
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def latest_run(runs) -> Path | None:
    """The most recently finished run under `runs` (the one whose metrics.json is newest)."""
    finished = sorted(Path(runs).glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return finished[-1].parent if finished else None


@contextlib.contextmanager
def removed_unless_checkpointed(run: Path, fresh: bool):
    """A new run that fails before its first checkpoint (bad data or weights, a signal while encoding, no memory for
    the first step) is removed again: it holds nothing to resume, and the corrected run can take its name."""
    try:
        yield
    except BaseException:
        if fresh and rank() == 0 and checkpoint_step(run) is None:
            shutil.rmtree(run, ignore_errors=True)
        raise


def checkpoint_step(run: Path) -> int | None:
    """The step of the run's newest whole checkpoint (the one checkpoints/latest names), or None."""
    pointer = run / "checkpoints" / "latest"
    m = re.fullmatch(r"step-(\d+)", pointer.read_text().strip()) if pointer.is_file() else None
    return int(m[1]) if m else None


def finished(run: Path, steps: int) -> str | None:
    """What to say when `run` has finished `steps` steps and written its files (metrics.json, written last); else
    None. Resuming a finished run touches nothing."""
    step = checkpoint_step(run)
    if step is None or step < steps or not (run / "metrics.json").is_file():
        return None
    return (
        f"{run} is finished (step {step} of {steps}, metrics.json written): nothing to resume, nothing changed. "
        f"Train it further with --resume {run} --steps N (N above {step}); sample from it with: python sample.py "
        f"--run {run}"
    )


# safetensors writes through a temporary file of its own, .tmpXXXXXX beside its target, left behind by a SIGKILL
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def resume_folder(run: Path) -> Path:
    """The run to resume, cleaned of what a crash or a full disk left: the temporaries of half-done writes
    (.NAME.*.tmp, and safetensors' own .tmpXXXXXX), checkpoint folders that checkpoints/latest does not point to, and
    log lines past its step (the resumed run writes those steps again). What is removed is said. A folder that
    cannot be written, or a checkpoint that is not whole, is a ValueError before anything is removed."""
    try:
        with tempfile.TemporaryFile(dir=run):  # resuming writes checkpoints and logs here
            pass
    except OSError as e:
        raise ValueError(
            f"--resume {run}: cannot write into the run folder ({e.strerror or e}); resuming writes its "
            "checkpoints and log there"
        ) from None
    pointer = run / "checkpoints" / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    if latest is not None:
        check_checkpoint(run / "checkpoints" / latest)
    temporaries = [
        p for p in run.rglob(".*") if p.is_file() and (p.name.endswith(".tmp") or SAFETENSORS_TMP.fullmatch(p.name))
    ]
    orphans = [p for p in (run / "checkpoints").glob("step-*") if p.name != latest]
    for p in temporaries:
        p.unlink()
    for p in orphans:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    removed = [f"{len(temporaries)} temporary file(s) of unfinished writes"] if temporaries else []
    removed += [f"the unfinished checkpoint(s) {', '.join(p.name for p in orphans)}"] if orphans else []
    if latest is None:
        raise ValueError(
            f"{run}: nothing to resume: the run stopped before its first checkpoint was complete"
            f"{' (removed: ' + '; '.join(removed) + ')' if removed else ''}. Start it again: {restart_command(run)}"
        )
    dropped = trim_log(run / "log.jsonl", int(latest.removeprefix("step-")))
    removed += [f"{dropped} line(s) of log.jsonl after step {int(latest.removeprefix('step-'))}"] if dropped else []
    if removed:
        log(f"resuming {run}: removed {'; '.join(removed)}")
    return run


def restart_command(run: Path) -> str:
    """The command that starts `run` again from its own config, in its own place."""
    return f"python train.py --config {run / 'config.toml'} --out {run.parent} --name {run.name} --overwrite"


def check_checkpoint(folder: Path) -> None:
    """A ValueError naming the file unless `folder` is a whole checkpoint: its weights (or FSDP's shards) and its
    state.pt, neither truncated."""
    run = folder.parents[1]
    if not re.fullmatch(r"step-\d+", folder.name) or not folder.is_dir():
        raise ValueError(
            f"{run / 'checkpoints' / 'latest'}: names {folder.name!r}, which is not a checkpoint folder of "
            f"{run / 'checkpoints'}"
        )
    damaged = "is damaged (truncated or overwritten?), and the checkpoint before it was replaced by it: this run cannot"
    damaged += f" be resumed; start it again: {restart_command(run)}"
    weights = folder / "weights.safetensors"
    if not (folder / ".metadata").is_file():  # FSDP's shards are checked as they are read
        try:
            read_shapes(weights)
        except WeightsError as e:
            raise ValueError(f"{weights} {damaged} ({e})") from None
    try:
        with zipfile.ZipFile(folder / "state.pt") as z:  # torch.save's format: a zip archive, its index at the end
            z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{folder / 'state.pt'} {damaged} ({e})") from None


def trim_log(path: Path, step: int) -> int:
    """Keep the lines of log.jsonl up to `step`, and no half-written line; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (s := step_of(line)) is not None and s <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# --- checkpoints -------------------------------------------------------------------------------------------


def trained_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: every parameter being trained, and the LoRA alphas (buffers)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trained or k.endswith(".alpha")}


def save_checkpoint(run: Path, model, opt, step: int, gen: torch.Generator, losses: list, sharded: bool) -> None:
    """checkpoints/step-N/{weights.safetensors, state.pt}, then the pointer checkpoints/latest: a crash at any
    point leaves the previous checkpoint whole and pointed to. FSDP: every process writes its shards of the weights
    and the optimizer (torch.distributed.checkpoint: *.distcp and .metadata) in place of the first two."""
    folder = run / "checkpoints" / f"step-{step:06d}"
    try:
        if sharded:
            save_sharded(model, opt, folder)
            dist.barrier()
        if rank() == 0:
            if not sharded:
                save_atomic(trained_state(model), folder / "weights.safetensors")
            state = {
                "step": step,
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "losses": torch.tensor(losses),
                **({} if sharded else {"optimizer": opt.state_dict()}),
            }
            save_torch(state, folder / "state.pt")
            latest = run / "checkpoints" / "latest"
            previous = latest.read_text().strip() if latest.exists() else None
            write_text_atomic(latest, folder.name)
    except Exception as e:  # a full disk, say: the unfinished folder goes, the previous checkpoint stays pointed to
        if checkpoint_step(run) != step:
            shutil.rmtree(folder, ignore_errors=True)
        if is_disk_full(e) and not isinstance(e, DiskFull):  # FSDP's writer says it in words of its own
            raise DiskFull(folder) from e
        raise
    if rank() == 0 and previous and previous != folder.name:  # keep the newest only
        shutil.rmtree(run / "checkpoints" / previous)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(run: Path, model, opt, gen: torch.Generator, sharded: bool) -> tuple[int, list]:
    pointer = run / "checkpoints" / "latest"
    if not pointer.exists():
        raise WeightsError(f"{run}: no checkpoint to resume from (expected {pointer})")
    folder = run / "checkpoints" / pointer.read_text().strip()
    if sharded != (folder / ".metadata").is_file():
        raise WeightsError(
            f"{folder}: a {'sharded (FSDP)' if not sharded else 'whole'} checkpoint; resume it with "
            f"--parallel {'fsdp' if not sharded else 'ddp'}"
        )
    state = torch.load(folder / "state.pt", weights_only=True)
    if sharded:
        load_sharded(model, opt, folder)
    else:
        sd = read_state_dict(folder / "weights.safetensors")
        missing = set(trained_state(model)) - set(sd)
        if missing:
            raise WeightsError(
                f"{folder / 'weights.safetensors'}: missing {len(missing)} key(s), e.g. {sorted(missing)[:3]}"
            )
        model.load_state_dict(sd, strict=False)
        opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["losses"].tolist()
