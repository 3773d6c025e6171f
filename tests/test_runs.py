"""No run is ever lost: a new run never writes into another's folder, a resumed run is cleaned of what a crash left,
a signal during the final writes keeps the checkpoint, and every bad setting is refused before any work.

Most tests run train.py's own loop on TinyTask (a small FLUX on random latents: seconds, not minutes); the ones
marked slow run the real vis2ir task."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from minflux.files.images import DataError
from minflux.files.load import save_flux
from minflux.files.weights import read_state_dict, write_text_atomic
from minflux.sampling import Inputs, prepare_img_ids, prepare_txt_ids
from minflux.tasks.common import Batch
from minflux.tasks.folders import make_run_folder
from tests.flux_helpers import TINY, tiny_flux
from tests.test_train import TINY as TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]
SMALLEST = replace(
    TINY,
    hidden_size=64,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    context_in_dim=16,
    vec_in_dim=8,
    guidance_embed=False,
)


class TinyTask:
    """train.py's task interface on a 1+1-block FLUX of width 64 and random latents. `fail` makes setup fail; the
    environment
    variable TINY_TASK_SLOW_FINISH makes finish stop after its first file, as a long evaluation would, and
    TINY_TASK_SLOW_ENCODE makes encoding last, as a large data set's would."""

    what = "random latents"
    fail = False

    def __init__(self, cfg, run, device, dtype):
        if self.fail:
            raise DataError(run, "stands for a data folder that cannot be used")
        self.cfg, self.run, self.frozen = cfg, run, {}

    def encode(self):
        self.seq_len = 16 + 4  # image + text tokens
        if os.environ.get("TINY_TASK_SLOW_ENCODE"):
            print("encoding", flush=True)
            time.sleep(300)  # a large data set: a signal must cut it short

    def build_model(self, device=None):
        torch.manual_seed(self.cfg.seed)
        model = tiny_flux(SMALLEST)
        return model, [{"params": list(model.parameters()), "lr": self.cfg.lr, "name": "transformer"}]

    def draw(self, gen):
        B = self.cfg.batch_size
        inputs = Inputs(
            None,
            prepare_img_ids(B, 4, 4),
            torch.randn(B, 4, 16, generator=gen),
            prepare_txt_ids(B, 4),
            torch.randn(B, 8, generator=gen),
        )
        x0, noise = torch.randn(B, 16, 64, generator=gen), torch.randn(B, 16, 64, generator=gen)
        return Batch(x0, noise, torch.rand(B, generator=gen), torch.zeros(B), inputs)

    def final_files(self, model):
        return ["transformer.safetensors", "metrics.json"]

    def finish(self, model, losses, steps, train_seconds):
        save_flux(model, self.run / "transformer.safetensors")
        if os.environ.get("TINY_TASK_SLOW_FINISH"):
            print("evaluating", flush=True)
            time.sleep(300)  # the evaluation of a large model: a signal must cut it short
        write_text_atomic(self.run / "metrics.json", json.dumps({"steps": steps}))


FAST = ["--batch-size", "2", "--lr-warmup-steps", "1", "--checkpoint-every", "2"]
RUNNER = (
    "import runpy, sys; from minflux.tasks import TASKS; from tests.test_runs import TinyTask; "
    "TASKS['vis2ir'] = TinyTask; sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')"
)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """train.main on TinyTask, writing under tmp_path/runs."""
    monkeypatch.setitem(train.TASKS, "vis2ir", TinyTask)
    return lambda *args: train.main([*FAST, "--out", str(tmp_path / "runs"), *args])


def train_script(*args, env=None, **kwargs):
    """train.py as its own process on TinyTask (for signals and exit codes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *FAST, *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


# --- 1. a new run never writes into an existing run folder ------------------------------------------------------------


def test_a_second_run_of_a_name_gets_a_fresh_numbered_folder_and_leaves_the_first_untouched(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert tiny("--steps", "3") == 0
    first = files(runs / "vis2ir-zeroconv")
    assert tiny("--steps", "2") == 0  # the same default name
    out = capsys.readouterr().out
    assert f"{runs / 'vis2ir-zeroconv'} is taken: this run is {runs / 'vis2ir-zeroconv-2'}" in out
    assert out.strip().splitlines()[-1] == str(runs / "vis2ir-zeroconv-2")  # the last line is the run folder
    assert files(runs / "vis2ir-zeroconv") == first  # not a byte changed
    assert log_steps(runs / "vis2ir-zeroconv-2") == [1, 2]

    assert tiny("--steps", "2", "--name", "mine") == 0 and tiny("--steps", "2", "--name", "mine") == 0
    assert sorted(p.name for p in runs.iterdir()) == ["mine", "mine-2", "vis2ir-zeroconv", "vis2ir-zeroconv-2"]
    assert tiny("--steps", "1", "--name", "mine", "--overwrite") == 0  # explicitly: replaced, old files gone
    assert log_steps(runs / "mine") == [1] and not (runs / "mine-3").exists()
    assert tiny("--config", str(runs / "mine" / "config.toml"), "--steps", "2") == 0  # its config, again: a new run
    assert log_steps(runs / "mine") == [1] and log_steps(runs / "mine-3") == [1, 2]


def test_overwrite_of_a_name_no_run_has_yet_makes_the_run(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert tiny("--steps", "1", "--name", "fresh", "--overwrite") == 0  # nothing to replace: a plain new run
    assert log_steps(runs / "fresh") == [1] and sorted(p.name for p in runs.iterdir()) == ["fresh"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(runs / "fresh")


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny, tmp_path):
    (tmp_path / "runs" / "photos").mkdir(parents=True)
    (tmp_path / "runs" / "photos" / "holiday.jpg").write_bytes(b"precious")
    (tmp_path / "runs" / "userproj").mkdir()  # a config.toml of its own does not make a folder a run
    (tmp_path / "runs" / "userproj" / "config.toml").write_text("steps = 1\n")
    (tmp_path / "runs" / "userproj" / "important.txt").write_text("precious")
    for name in ("photos", "userproj"):
        with pytest.raises(
            ValueError,
            match=rf"{name} is not a run folder made by train\.py \(no \.minflux-run in it\); "
            "left as it is",
        ):
            tiny("--steps", "1", "--name", name, "--overwrite")
    assert (tmp_path / "runs" / "photos" / "holiday.jpg").read_bytes() == b"precious"
    assert files(tmp_path / "runs" / "userproj") == {"config.toml": b"steps = 1\n", "important.txt": b"precious"}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["photos", "userproj"]  # nothing made


def test_overwrite_replaces_a_run_only_once_the_new_one_is_set_up(tiny, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert tiny("--steps", "2", "--name", "precious") == 0
    before = files(runs / "precious")
    with pytest.raises(SystemExit) as e:  # a typo in --data: refused before anything is touched
        tiny("--steps", "1", "--name", "precious", "--overwrite", "--data", str(tmp_path / "typo"))
    assert e.value.code == 2 and "typo: no such file or folder" in capsys.readouterr().err
    monkeypatch.setattr(TinyTask, "fail", True)  # data that turn out unusable while setting up
    with pytest.raises(DataError):
        tiny("--steps", "1", "--name", "precious", "--overwrite")
    assert files(runs / "precious") == before and sorted(p.name for p in runs.iterdir()) == ["precious"]
    monkeypatch.setattr(TinyTask, "fail", False)
    assert tiny("--steps", "1", "--name", "precious", "--overwrite") == 0  # set up: now it replaces the old run
    assert log_steps(runs / "precious") == [1] and sorted(p.name for p in runs.iterdir()) == ["precious"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(runs / "precious")


def test_resuming_a_finished_run_touches_nothing(tiny, tmp_path, capsys):
    run = tmp_path / "runs" / "done"
    assert tiny("--steps", "3", "--name", "done") == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    (tmp_path / "again.toml").write_text(f'resume = "{run}"\n')
    for how in (["--resume", str(run)], ["--config", str(tmp_path / "again.toml")]):
        assert train.main(how) == 0
        assert f"{run} is finished (step 3 of 3, metrics.json written): nothing to resume" in capsys.readouterr().out
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0  # asked for more steps: it trains them
    assert log_steps(run) == [1, 2, 3, 4]


def test_resume_removes_the_temporaries_safetensors_leaves_after_a_kill(tiny, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    assert tiny("--steps", "4", "--stop-at", "2", "--name", "r") == 0
    (run / ".tmpAb12Cd").write_bytes(b"half a tensor")  # safetensors' own temporary, killed mid-write
    (run / "checkpoints" / ".tmpZz99Yy").write_bytes(b"half a tensor")
    (run / ".tmpnotours").write_bytes(b"a name safetensors never makes")
    assert train.main(["--resume", str(run)]) == 0
    assert "removed 2 temporary file(s) of unfinished writes" in capsys.readouterr().out
    assert sorted(p.name for p in run.rglob(".tmp*")) == [".tmpnotours"]


def test_a_given_path_that_names_nothing_is_refused_before_any_work(tmp_path, capsys):
    base = tmp_path / "notarun"
    base.mkdir()
    for argv, message in (
        (["--repo", "/nonexistent"], "--repo /nonexistent: no such file or folder"),
        (["--task", "t2i", "--repo", "/nonexistent"], "--repo /nonexistent: no such file or folder"),
        (["--finetune", "/nonexistent"], "--finetune /nonexistent: no such file or folder"),
        (["--finetune", str(base)], f"--finetune {base}: expected a finished run folder"),
        (["--flux", "/nonexistent/flux1-dev.safetensors"], "--flux /nonexistent/flux1-dev.safetensors: no such file"),
        (["--data", "typo/"], "--data typo/: no such file or folder"),
    ):
        with pytest.raises(SystemExit) as e:
            train.main([*argv, "--out", str(tmp_path / "runs")])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "runs").exists()


def test_sizes_no_machine_can_hold_are_refused(tiny, tmp_path, capsys):
    for flag, value in (
        ("--panel-size", "65536"),
        ("--resolution", "65536"),
        ("--t5-max-length", "100000000"),
        ("--sample-steps", "1000000000000"),
    ):
        with pytest.raises(SystemExit) as e:
            train.parse([flag, value])
        assert e.value.code == 2 and f"{flag} {value}: expected" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--batch-size 99999999999999: one step's activations need about .* GB"):
        tiny("--steps", "1", "--batch-size", "99999999999999")  # refused before the first step, the folder removed
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused(capsys):
    for device in ("cuda", "cuda:99"):
        with pytest.raises(SystemExit) as e:
            train.parse(["--device", device])
        assert e.value.code == 2 and f"--device {device}: no CUDA device is available" in capsys.readouterr().err


def test_config_files_with_a_date_or_bytes_that_are_not_utf8_are_named(tmp_path, capsys):
    (tmp_path / "date.toml").write_text("guidance = 2024-01-01\n")
    (tmp_path / "latin1.toml").write_bytes('name = "café"\n'.encode("latin-1"))
    for name, message in (
        ("date.toml", "guidance = 2024-01-01 (a date): expected a finite number"),
        ("latin1.toml", "cannot read the config: not UTF-8 text (byte 0xe9"),
    ):
        with pytest.raises(SystemExit) as e:
            train.parse(["--config", str(tmp_path / name)])
        assert e.value.code == 2 and f"{tmp_path / name}: " in (err := capsys.readouterr().err) and message in err


def test_resume_refuses_a_change_of_model_or_data_before_any_work(tiny, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    assert tiny("--steps", "4", "--stop-at", "2", "--name", "r") == 0
    (tmp_path / "none.toml").write_text(f'resume = "{run}"\nsemantic = "none"\n')
    for how, named in (
        (["--resume", str(run), "--semantic", "none"], "--semantic none: "),
        (["--config", str(tmp_path / "none.toml")], "none.toml: semantic = 'none': "),
    ):
        with pytest.raises(SystemExit) as e:
            train.parse(how)
        err = capsys.readouterr().err
        assert e.value.code == 2 and named in err and "was trained with semantic = 'zeroconv'" in err
    assert train.parse(["--resume", str(run), "--semantic", "zeroconv", "--lr", "1e-4"]).lr == 1e-4  # the same: fine


def test_resume_names_a_damaged_checkpoint_and_removes_nothing(tiny, tmp_path):
    run = tmp_path / "runs" / "r"
    assert tiny("--steps", "4", "--stop-at", "2", "--name", "r") == 0
    (run / ".tmpAb12Cd").write_bytes(b"left by a kill")
    for name in ("state.pt", "weights.safetensors"):
        path = run / "checkpoints" / "step-000002" / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])  # truncated
        with pytest.raises(ValueError, match=rf"{path} is damaged \(truncated or overwritten\?\)"):
            train.main(["--resume", str(run)])
        path.write_bytes(whole)
    assert (run / ".tmpAb12Cd").exists()  # nothing was cleaned before the checkpoint was found damaged


def test_runs_started_at_once_never_share_a_folder(tmp_path):
    made, threads = (
        [],
        [threading.Thread(target=lambda: made.append(make_run_folder(tmp_path, "run"))) for _ in range(8)],
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == sorted(["run", *(f"run-{k}" for k in range(2, 9))])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_encoding_removes_the_new_run_whatever_the_signal(tmp_path, sig):
    proc = train_script(
        "--out", str(tmp_path / "runs"), "--name", "enc", "--steps", "3", env={"TINY_TASK_SLOW_ENCODE": "1"}
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "encoding":
            break
    assert (tmp_path / "runs" / "enc" / "config.toml").is_file()
    proc.send_signal(sig)
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + sig and "Traceback" not in out, out
    assert f"stopped by signal {sig} while setting up, before the first step" in out
    assert not (tmp_path / "runs" / "enc").exists()


def test_a_new_run_whose_setup_fails_leaves_no_folder_behind(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(TinyTask, "fail", True)
    with pytest.raises(DataError, match="cannot be used"):
        tiny("--steps", "1", "--name", "broken")
    assert not (tmp_path / "runs" / "broken").exists()  # the corrected run can take the name


# --- 5. resuming removes what a crash left: temporaries, orphan checkpoints, log lines past the checkpoint ------------


def test_resume_removes_stale_temporaries_orphan_checkpoints_and_log_lines_past_the_checkpoint(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert tiny("--steps", "6", "--name", "straight") == 0
    assert tiny("--steps", "6", "--stop-at", "4", "--name", "crashed") == 0
    run = runs / "crashed"
    # what a SIGKILL while writing step 6's checkpoint leaves, after steps 5 and 6 (and half of 7) were logged
    (run / ".config.toml.1a2b3c4d.tmp").write_text("half")
    (run / "checkpoints" / "step-000004" / ".state.pt.5e6f7a8b.tmp").write_bytes(b"half")
    (run / "checkpoints" / "step-000006").mkdir()
    (run / "checkpoints" / "step-000006" / "weights.safetensors").write_bytes(b"whole, but never pointed to")
    (run / "checkpoints" / "step-000006" / ".state.pt.9c0d1e2f.tmp").write_bytes(b"half")
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n{"step": 7, "lo')
    capsys.readouterr()

    assert train.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert (
        f"resuming {run}: removed 3 temporary file(s) of unfinished writes; the unfinished checkpoint(s) "
        "step-000006; 3 line(s) of log.jsonl after step 4"
    ) in out
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]  # each step once
    assert not list(run.rglob("*.tmp")) and sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step-000006",
    ]
    a = read_state_dict(runs / "straight" / "transformer.safetensors")
    b = read_state_dict(run / "transformer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resumed run is still the uninterrupted one


def test_a_run_killed_in_its_first_checkpoint_says_there_is_nothing_to_resume(tiny, tmp_path):
    assert tiny("--steps", "4", "--stop-at", "2", "--name", "early") == 0
    run = tmp_path / "runs" / "early"
    # the state a SIGKILL leaves while the first checkpoint's state.pt is written: no pointer yet
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step-000002" / "state.pt").rename(run / "checkpoints" / "step-000002" / ".state.pt.ab.tmp")
    out = subprocess.run([sys.executable, "train.py", "--resume", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (
        f"train.py: {run}: nothing to resume: the run stopped before its first checkpoint was complete (removed: "
        "1 temporary file(s) of unfinished writes; the unfinished checkpoint(s) step-000002). Start it again: "
        f"python train.py --config {run / 'config.toml'} --out {run.parent} --name early --overwrite"
    ) in out.stderr
    assert not (run / "checkpoints" / "step-000002").exists()  # a full-size one would be 24 GB


def test_after_sigkill_mid_run_the_resumed_log_holds_each_step_once(tmp_path):
    run = tmp_path / "runs" / "killed"
    proc = train_script(
        "--out", str(tmp_path / "runs"), "--name", "killed", "--steps", "100000", "--checkpoint-every", "3"
    )
    deadline = time.time() + 120
    while time.time() < deadline and (not (run / "log.jsonl").exists() or len(log_steps(run)) < 8):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.communicate(timeout=60)
    logged = len((run / "log.jsonl").read_text().splitlines())
    resumed = subprocess.run(
        [sys.executable, "-c", RUNNER, "--resume", str(run), "--steps", str(logged + 2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert log_steps(run) == list(range(1, logged + 3))
    assert not list(run.rglob("*.tmp"))


# --- 10. a signal during the final evaluation and writes --------------------------------------------------------------


def test_a_signal_during_the_final_writes_stops_keeps_the_checkpoint_and_says_what_is_not_written(tmp_path):
    sig = signal.SIGTERM  # a job's time limit; Ctrl-C (SIGINT) is the slow test's below
    run = tmp_path / "runs" / "final"
    proc = train_script(
        "--out", str(tmp_path / "runs"), "--name", "final", "--steps", "3", env={"TINY_TASK_SLOW_FINISH": "1"}
    )
    lines = []
    for line in proc.stdout:  # until finish has written its first file and is evaluating
        lines.append(line)
        if line.strip() == "evaluating":
            break
    proc.send_signal(sig)
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + sig, out
    assert (
        f"stopped by signal {sig} during the final evaluation and writes; not written: metrics.json. The "
        f"checkpoint of step 3 is kept; write them with: python train.py --resume {run}"
    ) in out
    assert "Traceback" not in out and not (run / "metrics.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    resumed = subprocess.run(
        [sys.executable, "-c", RUNNER, "--resume", str(run)], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0 and json.loads((run / "metrics.json").read_text()) == {"steps": 3}


# --- 7. every setting checked when it is read, before any work --------------------------------------------------------

BAD_FLAGS = [
    (["--steps", "0"], "--steps 0: expected an integer ≥ 1"),
    (["--steps", "-5"], "--steps -5: expected an integer ≥ 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: expected an integer ≥ 1"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer ≥ 1"),
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--lr=-1e-3"], "--lr -0.001: expected a finite number > 0"),
    (["--adapter-lr", "inf"], "--adapter-lr inf: expected a finite number > 0"),
    (["--stop-at", "0"], "--stop-at 0: expected an integer ≥ 1"),
    (["--dtype", "fp64"], "--dtype fp64: expected one of auto, fp32, bf16, fp16"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: expected a number > 0 (inf: no clipping)"),
    (["--t-sampling", "gaussian"], "--t-sampling gaussian: expected one of logit_normal, uniform"),
    (["--panel-size", "100"], "--panel-size 100: expected a multiple of 16 from 16 to 1024"),
    (["--caption-dropout", "1"], "--caption-dropout 1.0: expected a probability in [0, 1)"),
    (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda, cuda:N or mps"),
    (["--name", "../elsewhere"], "--name ../elsewhere: expected a folder name"),
    (["--seed", "-1"], "--seed -1: expected an integer from 0 to 2^63 - 1"),
    (["--sample-steps", "0"], "--sample-steps 0: the held-out evaluation of vis2ir needs at least 1 step"),
    (["--target-only", "maybe"], "--target-only: expected true or false, got 'maybe'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_naming_the_flag_and_the_accepted_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


BAD_TOML = [
    ('steps = "ten"', 'steps = "ten": expected an integer ≥ 1'),
    ('target_only = "yes"', 'target_only = "yes": expected true or false'),
    ("lr = nan", "lr = NaN: expected a finite number > 0"),
    ("batch_size = 0", "batch_size = 0: expected an integer ≥ 1"),
    ('dtype = "fp64"', 'dtype = "fp64": expected one of auto, fp32, bf16, fp16'),
    ("steps = 1.5", "steps = 1.5: expected an integer ≥ 1"),
    ("lr = true", "lr = true: expected a finite number > 0"),
    ("name = 3", "name = 3: expected a folder name"),
]


@pytest.mark.parametrize("line, message", BAD_TOML, ids=[line for line, _ in BAD_TOML])
def test_bad_toml_values_are_refused_naming_the_file_and_the_key(line, message, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        train.parse(["--config", str(tmp_path / "c.toml")])
    assert e.value.code == 2 and f"{tmp_path / 'c.toml'}: {message}" in capsys.readouterr().err


def test_a_bad_value_stops_train_py_with_exit_2_before_any_folder_is_made(tmp_path):
    (tmp_path / "c.toml").write_text('steps = "ten"\n')
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            *TINY_FLAGS,
            "--out",
            str(tmp_path / "runs"),
            "--config",
            str(tmp_path / "c.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and 'steps = "ten": expected an integer ≥ 1' in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


def test_a_resumed_runs_config_is_checked_too(tiny, tmp_path, capsys):
    assert tiny("--steps", "2", "--stop-at", "1", "--name", "r") == 0
    config = tmp_path / "runs" / "r" / "config.toml"
    config.write_text(config.read_text().replace("steps = 2", "steps = -2"))
    with pytest.raises(SystemExit) as e:
        train.parse(["--resume", str(tmp_path / "runs" / "r")])
    assert e.value.code == 2 and f"{config}: steps = -2: expected an integer ≥ 1" in capsys.readouterr().err


# --- 2, 4. small and uncaptioned triptych folders ---------------------------------------------------------------------


def triptych_folder(folder: Path, n: int, captions: bool) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (192, 64), (40 * i, 100, 200)).save(folder / f"{i:02d}.png")
        if captions:
            (folder / f"{i:02d}.txt").write_text("a scene, infrared view")
    return folder


def test_a_small_folder_holds_out_a_real_split_and_one_triptych_is_too_few(tmp_path):
    from minflux.tasks.runs import TrainConfig
    from minflux.tasks.vis2ir import datasets

    cfg = TrainConfig(data=str(triptych_folder(tmp_path / "five", 5, captions=True)), panel_size=64)
    train_set, held = datasets(cfg)
    assert (list(train_set.indices), list(held.indices)) == ([0, 1, 2, 3], [4])  # 4 train, 1 held out, disjoint
    cfg = replace(cfg, data=str(triptych_folder(tmp_path / "one", 1, captions=True)))
    with pytest.raises(DataError, match=r"one: 1 usable triptych: too few to hold any out .*at least 2 are needed"):
        datasets(cfg)


def test_captions_that_are_all_empty_still_make_text_encoders_for_the_empty_caption(tmp_path):
    from minflux.files.load import load_clip, load_t5
    from minflux.tasks.embedded import write_text_encoders

    write_text_encoders(tmp_path, ["", "", ""])  # a triptych folder without any .txt: sentencepiece had no text
    clip, t5 = load_clip(tmp_path / "text_encoder"), load_t5(tmp_path / "text_encoder_2", max_length=8)
    assert clip([""]).isfinite().all() and t5([""]).shape == (1, 8, 64)


@pytest.mark.slow
def test_a_small_uncaptioned_folder_trains_and_a_signal_in_the_final_writes_keeps_the_checkpoint(tmp_path):
    """The real vis2ir task: 5 triptychs without captions train (4 train, 1 held out); Ctrl-C during the held-out
    evaluation stops it promptly, names the files not written, and --resume writes them from the checkpoint."""
    data = triptych_folder(tmp_path / "data", 5, captions=False)
    run = tmp_path / "runs" / "small"
    cmd = [
        sys.executable,
        "train.py",
        *TINY_FLAGS,
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "small",
        "--data",
        str(data),
        "--steps",
        "2",
        "--sample-steps",
        "10000",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "latest").exists() and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)  # into the 10000-step evaluation
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "data: no triptych has a caption (a .txt beside it): every one trains with the empty caption" in out
    assert "data: 4 train, 1 held-out" in out
    assert (
        "not written: transformer.safetensors, adapter.safetensors, loss.png, samples.png, metrics.json. The "
        "checkpoint of step 2 is kept"
    ) in out
    resumed = subprocess.run(
        [sys.executable, "train.py", "--resume", str(run), "--sample-steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2 and (run / "samples.png").is_file()


# --- 8. a full disk or a read-only one: a message, the last checkpoint whole, nothing half-written --------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) makes tmp_path/disk a tmpfs of that size (root, where the platform permits; else the test skips)."""
    where = tmp_path / "disk"
    where.mkdir()

    def mount(size: str, *options: str) -> Path:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
        return where

    yield mount
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Take every free byte of folder's filesystem."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


class FillingTask(TinyTask):
    """TinyTask that fills its disk when the batch of step `at_step` is drawn, or as finish starts."""

    at_step, in_finish = None, False

    def draw(self, gen):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == self.at_step:
            fill(self.run.parent)
        return super().draw(gen)

    def finish(self, model, losses, steps, train_seconds):
        if self.in_finish:
            fill(self.run.parent)
        super().finish(model, losses, steps, train_seconds)


def test_a_full_disk_says_so_keeps_the_last_checkpoint_whole_and_resumes_to_the_same_weights(
    small_disk, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(train.TASKS, "vis2ir", FillingTask)
    whole = lambda *args: train.main([*FAST, "--steps", "6", "--name", "r", *args])  # noqa: E731
    assert whole("--out", str(tmp_path / "runs")) == 0  # the reference: no disk trouble
    reference = read_state_dict(tmp_path / "runs" / "r" / "transformer.safetensors")
    disk = small_disk("16m")
    run = disk / "r"

    monkeypatch.setattr(FillingTask, "at_step", 3)  # full before the checkpoint of step 4
    assert whole("--out", str(disk)) == 1
    out = capsys.readouterr().out
    assert f"train.py: no space left on the device of {run / 'checkpoints'}" in out, out
    assert f"the last checkpoint (step 2) is whole; free space, then: python train.py --resume {run}" in out
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]  # no half checkpoint
    assert not [p for p in run.rglob(".*") if p.name != ".minflux-run"]  # no temporary left
    (disk / "filler").unlink()
    monkeypatch.setattr(FillingTask, "at_step", None)
    monkeypatch.setattr(FillingTask, "in_finish", True)  # full again, in the final writes
    assert train.main(["--resume", str(run)]) == 1
    assert "the last checkpoint (step 6) is whole" in capsys.readouterr().out
    assert not (run / "metrics.json").exists() and not [p for p in run.rglob(".*") if p.name != ".minflux-run"]
    (disk / "filler").unlink()
    monkeypatch.setattr(FillingTask, "in_finish", False)
    assert train.main(["--resume", str(run)]) == 0  # space freed: the final files written
    resumed = read_state_dict(run / "transformer.safetensors")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference) and resumed.keys() == reference.keys()

    fill(disk)  # full from the start: nothing is left behind
    with pytest.raises(OSError, match="no space left"):
        whole("--out", str(disk), "--name", "new")
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "r"]


def test_a_full_disk_before_the_first_checkpoint_is_one_message_from_the_script(small_disk):
    disk = small_disk("1m")
    fill(disk)
    proc = train_script("--out", str(disk), "--name", "r", "--steps", "2")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert "train.py: no space left on the device" in out and "nothing was kept" in out
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_resume_on_a_read_only_filesystem_says_so_before_any_work(small_disk, tiny, capsys):
    disk = small_disk("16m")
    assert train.main([*FAST, "--out", str(disk), "--name", "r", "--steps", "4", "--stop-at", "2"]) == 0
    before = files(disk / "r")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(ValueError, match=rf"--resume {disk / 'r'}: cannot write into the run folder \(Read-only"):
        train.main(["--resume", str(disk / "r")])
    with pytest.raises(ValueError, match=rf"--out {disk}: cannot make the run folder r2 there"):
        train.main([*FAST, "--out", str(disk), "--name", "r2"])
    assert files(disk / "r") == before
