"""No run is ever lost: a new run never writes into another's folder, a resumed run is cleaned of what a crash left,
a signal during the final writes keeps the checkpoint, and every bad setting is refused before any work.

Most tests run train.py's own loop on TinyTask (a small FLUX on random latents: seconds, not minutes); the ones
marked slow run the real vis2ir task."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from minflux.files.images import DataError
from minflux.files.load import save_flux
from minflux.files.weights import write_text_atomic
from minflux.sampling import Inputs, prepare_img_ids, prepare_txt_ids
from minflux.tasks.common import Batch
from tests.flux_helpers import TINY, tiny_flux

ROOT = Path(__file__).resolve().parents[1]
SMALLEST = replace(TINY, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=16, vec_in_dim=8,
                   guidance_embed=False)  # fmt: skip


class TinyTask:
    """train.py's task interface on a 1+1-block FLUX of width 64 and random latents. `fail` makes setup fail; the environment
    variable TINY_TASK_SLOW_FINISH makes finish stop after its first file, as a long evaluation would."""

    what = "random latents"
    fail = False

    def __init__(self, cfg, run, device, dtype):
        if self.fail:
            raise DataError(run, "stands for a data folder that cannot be used")
        self.cfg, self.run, self.frozen = cfg, run, {}

    def encode(self):
        self.seq_len = 16 + 4  # image + text tokens

    def build_model(self):
        torch.manual_seed(self.cfg.seed)
        model = tiny_flux(SMALLEST)
        return model, [{"params": list(model.parameters()), "lr": self.cfg.lr, "name": "transformer"}]

    def draw(self, gen):
        B = self.cfg.batch_size
        inputs = Inputs(None, prepare_img_ids(B, 4, 4), torch.randn(B, 4, 16, generator=gen), prepare_txt_ids(B, 4),
                        torch.randn(B, 8, generator=gen))  # fmt: skip
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
RUNNER = ("import runpy, sys; from minflux.tasks import TASKS; from tests.test_runs import TinyTask; "
          "TASKS['vis2ir'] = TinyTask; sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')")  # fmt: skip


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """train.main on TinyTask, writing under tmp_path/runs."""
    monkeypatch.setitem(train.TASKS, "vis2ir", TinyTask)
    return lambda *args: train.main([*FAST, "--out", str(tmp_path / "runs"), *args])


def train_script(*args, env=None, **kwargs):
    """train.py as its own process on TinyTask (for signals and exit codes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *FAST, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


# --- 2, 4. small and uncaptioned triptych folders -----------------------------------------------------------------------


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
