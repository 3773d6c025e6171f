"""FLUX.2 at scale, on CPU: train.py --full-finetune on a tiny [klein] Base repo (a transformer that load_flux reads
back as a Flux2, resumed bit for bit), and --parallel fsdp on two gloo processes, or on one with --cpu-offload, equal
to one process. The repo is test_train_flux2's (tests/flux2_helpers.write_klein_repo); no downloads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import train  # noqa: E402
from minflux.files.load import load_flux  # noqa: E402
from minflux.files.weights import read_state_dict  # noqa: E402
from minflux.flux2 import Flux2  # noqa: E402
from tests.flux2_helpers import write_klein_repo  # noqa: E402
from tests.flux_helpers import random_image  # noqa: E402
from tests.test_train_flux2 import CAPTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PORTS = iter(range(29621, 29640))  # tests/test_fsdp.py takes 29561 to 29599
HOW = {"lora": ["--lora-rank", "4"], "full": ["--full-finetune"]}  # each with its default learning rate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The module's in-process runs on one thread, as its launched ones (OMP_NUM_THREADS=1): a tiny model gains
    nothing from more, and on a shared machine two threads wait on each other (seconds a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """test_train_flux2's tiny klein Base: "base" in the folder's name and model_index.json make it Base."""
    repo = write_klein_repo(tmp_path_factory.mktemp("flux2") / "FLUX.2-klein-base-tiny")
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": False}))
    return repo


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """test_train_flux2's three images and captions, once for the module."""
    folder = tmp_path_factory.mktemp("flux2-data")
    for i, caption in enumerate(CAPTIONS):
        random_image(i, size=(48, 32)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
    return folder


def command(repo: Path, data: Path, out: Path, how: str) -> list[str]:
    """train.py's flags for a 4-step run of global batch 2 at 32², LoRA or full fine-tune, without samples or
    gradient checkpointing."""
    return [
        "--task", "t2i", "--repo", str(repo), "--data", str(data), "--out", str(out), "--resolution", "32",
        "--batch-size", "2", "--t5-max-length", "40", "--steps", "4", "--sample-steps", "0", "--device", "cpu",
        "--gradient-checkpointing", "false", *HOW[how],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one(repo, data, tmp_path_factory) -> Path:
    """The one-process runs the others are compared with: lora/ and full/ in the folder returned."""
    out = tmp_path_factory.mktemp("one")
    for how in HOW:
        assert train.main([*command(repo, data, out, how), "--name", how]) == 0
    return out


def launched(argv: list[str], processes: int) -> str:
    """train.py in fresh processes (torchrun for two: FSDP's process group must not outlive the run); its stdout."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    launch += [f"--master_port={next(PORTS)}"]
    done = subprocess.run(
        [*(launch if processes > 1 else [sys.executable]), "train.py", *argv],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def trained(run: Path, how: str) -> dict[str, torch.Tensor]:
    """What the run trained: the whole transformer, or its LoRA's up matrices (zero at the start: each is its
    whole update)."""
    if how == "full":
        return read_state_dict(run / "transformer.safetensors")
    return {k: v for k, v in read_state_dict(run / "lora.safetensors").items() if k.endswith("lora_up.weight")}


def update_gap(a: dict, b: dict, start: dict) -> float:
    """‖b − a‖ / ‖a − start‖ over every tensor: how far apart two runs ended, relative to how far they went."""
    assert a.keys() == b.keys()
    apart = sum((b[k].double() - a[k].double()).square().sum() for k in a)
    went = sum((a[k].double() - start[k].double()).square().sum() for k in a)
    return (apart / went).sqrt().item()


def start_of(repo: Path, how: str, like: dict) -> dict:
    """The weights before training: the repo's transformer, or zero for the LoRA's up matrices."""
    return load_flux(repo).state_dict() if how == "full" else {k: torch.zeros_like(v) for k, v in like.items()}


# The same maths, the global batch's gradients reduced in another order: each gradient differs by fp32 rounding,
# ~1e-7 of it. AdamW divides a gradient by its own running size, so such an error stays ~1e-7 of that weight's
# update, except where the gradient itself is within rounding of zero: there its sign can flip, and AdamW moves
# the weight by up to lr either way (at the first step every weight moves by exactly lr). Such weights are few;
# over the whole update they weigh ~1e-5 (on the CPU this was written on: LoRA 5e-6, the full fine-tune 4e-5). 1e-3
# leaves room for another CPU's rounding; a process that kept its own gradients would be O(1) apart.
GAP = 1e-3


def test_a_full_finetune_writes_a_flux2_that_load_flux_reads_and_resumes_bit_for_bit(repo, data, one, tmp_path):
    run = one / "full"
    flux = load_flux(run / "transformer.safetensors")
    assert isinstance(flux, Flux2) and not flux.params.guidance_embed  # klein's shape, read from the file
    last = read_state_dict(run / "checkpoints" / "step-000004" / "weights.safetensors")  # the fp32 master weights
    weights = flux.state_dict()
    assert weights.keys() == last.keys() and all(torch.equal(weights[k], last[k]) for k in last)
    before = load_flux(repo).state_dict()
    assert all(not torch.equal(weights[k], before[k]) for k in before)  # every weight trained, not a LoRA

    argv = command(repo, data, tmp_path, "full")
    assert train.main([*argv, "--stop-at", "2", "--name", "halves"]) == 0
    halves = tmp_path / "halves"
    assert not (halves / "transformer.safetensors").exists()
    assert train.main(["--resume", str(halves)]) == 0
    a, b = read_state_dict(run / "transformer.safetensors"), read_state_dict(halves / "transformer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(halves) == losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("how", HOW)
def test_two_fsdp_processes_train_flux2_as_one_process_does(repo, one, data, tmp_path, how):
    checkpointing = ["--gradient-checkpointing", "true"] if how == "lora" else []  # composes: the same gradients
    argv = [*command(repo, data, tmp_path, how), *checkpointing, "--parallel", "fsdp", "--name", "two"]
    out = launched(argv, processes=2)
    a, b = trained(one / how, how), trained(tmp_path / "two", how)
    assert update_gap(a, b, start_of(repo, how, a)) < GAP
    x, y = losses(one / how), losses(tmp_path / "two")
    assert len(x) == len(y) == 4 and all(abs(p - q) <= 1e-5 * abs(p) for p, q in zip(x, y)), (x, y)
    held = re.search(r"fsdp: 2 processes hold ([\d,]+), ([\d,]+) of the ([\d,]+) parameter bytes", out)
    mine, theirs, total = (int(g.replace(",", "")) for g in held.groups())
    assert abs(mine - total / 2) < 0.01 * total and abs(theirs - total / 2) < 0.01 * total  # each half the model


@pytest.mark.slow
def test_fsdp_with_cpu_offload_trains_flux2_on_one_process(repo, one, data, tmp_path):
    argv = [*command(repo, data, tmp_path, "full"), "--parallel", "fsdp", "--cpu-offload", "--name", "off"]
    out = launched(argv, processes=1)
    assert "fsdp: 1 processes hold" in out and "warning: --full-finetune" in out
    a, b = trained(one / "full", "full"), trained(tmp_path / "off", "full")
    assert update_gap(a, b, start_of(repo, "full", a)) < GAP
    assert isinstance(load_flux(tmp_path / "off" / "transformer.safetensors"), Flux2)
    x, y = losses(one / "full"), losses(tmp_path / "off")
    assert all(abs(p - q) <= 1e-5 * abs(p) for p, q in zip(x, y)), (x, y)
