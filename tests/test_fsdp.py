"""--parallel fsdp: two CPU processes (gloo) against one, on a finished tiny run fine-tuned with LoRA and in full."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minflux.files.weights import read_state_dict
from minflux.lora import inject_lora
from minflux.model import Flux
from minflux.presets import configs
from minflux.tasks.parallel import memory_estimate

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train-samples",
    "16",
    "--heldout-samples",
    "2",
    "--vae-steps",
    "4",
    "--batch-size",
    "4",
    "--sample-steps",
    "2",
    "--panel-size",
    "64",
    "--lr-warmup-steps",
    "2",
    "--device",
    "cpu",
    "--semantic",
    "zeroconv",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PORTS = iter(range(29561, 29600))


def train(out: Path, *args, processes: int = 1) -> str:
    """train.py in a fresh process (torchrun for processes > 1); its stdout."""
    launch = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={next(PORTS)}"]
        if processes > 1
        else [sys.executable]
    )
    done = subprocess.run(
        [*launch, "train.py", *TINY, "--out", str(out), *args], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished embedded run: its transformer stands in for official weights."""
    out = tmp_path_factory.mktemp("fsdp")
    train(out, "--steps", "2", "--name", "base")
    return out / "base"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lora", "full"])
def test_two_fsdp_processes_equal_one_process_with_the_same_global_batch(base, tmp_path, how):
    args = ["--finetune", str(base), "--steps", "4", *(["--full-finetune"] if how == "full" else [])]
    train(tmp_path, *args, "--name", "one")
    checkpointing = ["--gradient-checkpointing", "true"] if how == "lora" else []  # composes: the same gradients
    out = train(tmp_path, *args, *checkpointing, "--name", "two", "--parallel", "fsdp", processes=2)
    weights = "lora.safetensors" if how == "lora" else "transformer.safetensors"
    one, two = (read_state_dict(tmp_path / name / weights) for name in ("one", "two"))
    assert worst(one, two) < 1e-5  # the same maths, the gradients summed in another order
    before = read_state_dict(base / "transformer.safetensors")
    if how == "full":  # every weight moved, not only a LoRA
        assert sum(not torch.equal(two[k], before[k]) for k in before) > 0.9 * len(before)
    else:
        assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in two.items())
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    # each process holds half the parameters' bytes, measured from its shards (padding: a few elements)
    held = re.search(r"fsdp: 2 processes hold ([\d,]+), ([\d,]+) of the ([\d,]+) parameter bytes", out)
    mine, theirs, total = (int(g.replace(",", "")) for g in held.groups())
    assert abs(mine - total / 2) < 0.01 * total and abs(theirs - total / 2) < 0.01 * total
    assert "warning: --full-finetune" in out if how == "full" else "warning" not in out
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["heldout_mse"] > 0  # evaluated sharded


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_to_the_weights_of_a_straight_run(base, tmp_path):
    args = ["--finetune", str(base), "--steps", "4", "--parallel", "fsdp"]
    train(tmp_path, *args, "--name", "straight", processes=2)
    train(tmp_path, *args, "--name", "halves", "--stop-at", "2", processes=2)
    folder = tmp_path / "halves" / "checkpoints" / "step-000002"
    assert (tmp_path / "halves" / "checkpoints" / "latest").read_text().strip() == folder.name
    assert {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"}
    assert not (tmp_path / "halves" / "lora.safetensors").exists()
    train(tmp_path, "--resume", str(tmp_path / "halves"), processes=2)
    for name in ("lora.safetensors", "adapter.safetensors"):
        a, b = (read_state_dict(tmp_path / run / name) for run in ("straight", "halves"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert losses(tmp_path / "straight") == losses(tmp_path / "halves")


def test_the_memory_estimate_of_flux_dev_shards_the_weights_and_the_optimizer():
    """FLUX.1-dev on the meta device: a LoRA's frozen bf16 base (22.2 GiB) and the fp32 full fine-tune, per process."""
    for full in (False, True):
        with torch.device("meta"):
            flux = Flux(configs["flux-dev"].params).to(torch.float32 if full else torch.bfloat16)
        if not full:
            flux.requires_grad_(False)
            inject_lora(flux, 16)
        line = memory_estimate(flux, 1, 4608, True, torch.bfloat16, 8)
        ddp, fsdp = (
            float(x) for x in re.search(r"DDP ([\d.]+) GB, FSDP over 8 process\(es\) ([\d.]+) GB", line).groups()
        )
        weights = 11_901_408_320 * (4 if full else 2) / 2**30
        assert float(re.search(r"weights ([\d.]+) GB", line).group(1)) == pytest.approx(weights, abs=0.5)
        assert fsdp < ddp / 4 if full else fsdp < ddp / 2  # the sharded part dominates


def test_full_finetune_and_offload_flags_are_checked_before_any_work(base, capsys):
    import train

    for bad, says in (
        (["--full-finetune"], "--full-finetune trains every weight of given weights"),
        (["--cpu-offload"], "--cpu-offload offloads FSDP's shards"),
    ):
        with pytest.raises(SystemExit) as e:
            train.parse(bad)
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert train.parse(["--finetune", str(base), "--full-finetune"]).lr == 1e-5  # a small default
    assert train.parse(["--finetune", str(base), "--full-finetune", "--lr", "3e-4"]).lr == 3e-4  # a given lr wins
    assert train.parse(["--finetune", str(base)]).lr == 1e-3
