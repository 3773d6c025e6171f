"""train.py: a smoke run of the embedded default, exact resume, checkpoints on signals, DDP, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from minflux.files.weights import read_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train-samples", "16", "--heldout-samples", "2", "--vae-steps", "4", "--batch-size", "4",
    "--sample-steps", "2", "--panel-size", "64", "--lr-warmup-steps", "2",
]  # fmt: skip


def run_train(tmp_path, *args) -> int:
    return train.main([*TINY, "--out", str(tmp_path), *args])


@pytest.mark.slow
def test_default_pipeline_writes_a_complete_run_folder(tmp_path, capsys):
    assert run_train(tmp_path, "--steps", "6", "--name", "smoke", "--semantic", "xattn_rope") == 0
    run = tmp_path / "smoke"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run)  # the last line is the run folder
    for name in (
        "transformer.safetensors",
        "adapter.safetensors",
        "ae.safetensors",
        "config.toml",
        "metrics.json",
        "loss.png",
        "samples.png",
        "log.jsonl",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/spiece.model",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["heldout_mse"] > 0 and metrics["train_seconds"] > 0
    assert 0 < metrics["heldout_psnr"] < 100 and 0 < metrics["vae_psnr"] < 100
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7)) and all("scales" in r for r in lines)
    # the adapter's scale starts at 0 and moves once trained
    assert lines[-1]["scales"][0] != 0.0
    assert json.loads((run / "metrics.json").read_text())["semantic"] == "xattn_rope"


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    assert run_train(tmp_path, "--steps", "6", "--name", "straight") == 0
    assert run_train(tmp_path, "--steps", "6", "--stop-at", "3", "--name", "halves") == 0
    assert not (tmp_path / "halves" / "metrics.json").exists()
    assert (tmp_path / "halves" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert run_train(tmp_path, "--resume", str(tmp_path / "halves")) == 0
    a = read_state_dict(tmp_path / "straight" / "transformer.safetensors")
    b = read_state_dict(tmp_path / "halves" / "transformer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = read_state_dict(tmp_path / "straight" / "adapter.safetensors")
    b = read_state_dict(tmp_path / "halves" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_plan_c_adapters_train_resume_exactly_plot_their_gates_and_sample(tmp_path, capsys):
    import sample
    from minflux.pipeline import Vis2IRPipeline

    plan_c = ["--semantic", "adapters", "--adapter-width", "32", "--adapter-heads", "4", "--adapter-every", "2"]
    assert run_train(tmp_path, "--steps", "4", "--name", "straight", "--sample-every", "3", *plan_c) == 0
    with Image.open(tmp_path / "straight" / "samples" / "step-000003.png") as grid:  # the 2 held-out scenes at step 3
        assert grid.size == (4 * (64 + 2) + 2, 14 + 2 * (64 + 2) + 2)  # [visible | semantic | generated | truth]
    assert [p.name for p in (tmp_path / "straight" / "samples").iterdir()] == ["step-000003.png"]
    assert run_train(tmp_path, "--steps", "4", "--stop-at", "2", "--name", "halves", *plan_c) == 0
    assert run_train(tmp_path, "--resume", str(tmp_path / "halves")) == 0
    for name in ("transformer.safetensors", "adapter.safetensors"):
        a, b = (read_state_dict(tmp_path / run / name) for run in ("straight", "halves"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("blocks.adapters.2.layers.0.cross_q") for k in a)  # 6 small-preset blocks, every 2nd
    gates = [json.loads(line)["scales"] for line in (tmp_path / "halves" / "log.jsonl").read_text().splitlines()]
    assert len(gates) == 4 and all(len(g) == 3 for g in gates) and gates[-1] != [0.0, 0.0, 0.0]
    assert (tmp_path / "halves" / "scales.png").is_file()
    capsys.readouterr()
    assert sample.main(["--run", str(tmp_path / "halves"), "--num-images", "2", "--steps", "2"]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]).is_file()
    assert Vis2IRPipeline.from_run(tmp_path / "halves").model.semantic == "adapters"


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        *TINY,
        "--out",
        str(tmp_path),
        "--name",
        "sig",
        "--steps",
        "100000",
        "--checkpoint-every",
        "100000",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "sig" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "resume with: python train.py --resume" in out
    latest = (tmp_path / "sig" / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert step >= 2 and (tmp_path / "sig" / "checkpoints" / latest / "weights.safetensors").is_file()
    assert run_train(tmp_path, "--resume", str(tmp_path / "sig"), "--steps", str(step + 1)) == 0
    assert json.loads((tmp_path / "sig" / "metrics.json").read_text())["steps"] == step + 1


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, capsys):
    code = run_train(tmp_path, "--steps", "50", "--lr", "1e30", "--name", "boom", "--checkpoint-every", "1")
    assert code == 1
    assert "stopping. The last good checkpoint is in" in capsys.readouterr().out
    assert (tmp_path / "boom" / "checkpoints" / "latest").is_file()
    assert not (tmp_path / "boom" / "metrics.json").exists()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*TINY, "--out", str(tmp_path), "--steps", "3", "--device", "cpu"]
    one = subprocess.run(
        [sys.executable, "train.py", *common, "--name", "one"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            "train.py",
            *common,
            "--name",
            "two",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    encode = [
        [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("encode ")] for r in (one, two)
    ]
    assert encode[1] == encode[0] == ["encode 16/16"]  # printed once, not once per process
    a = read_state_dict(tmp_path / "one" / "transformer.safetensors")
    b = read_state_dict(tmp_path / "two" / "transformer.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst  # the same maths, summed in another order across the two processes
    assert a["final_layer.linear.weight"].abs().sum() > 0  # trained away from its zero initialisation


def test_unknown_config_key_is_an_error_listing_the_valid_keys(tmp_path):
    (tmp_path / "bad.toml").write_text("steps = 3\nlearning_rate = 0.1\n")
    out = subprocess.run(
        [sys.executable, "train.py", "--config", str(tmp_path / "bad.toml")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "unknown key(s) learning_rate" in out.stderr and "valid keys: semantic" in out.stderr


def test_config_file_sets_fields_and_flags_win(tmp_path):
    import argparse

    from minflux.tasks.flags import add_config_flags, config_from_args

    (tmp_path / "c.toml").write_text('steps = 5\nlr = 0.5\nsemantic = "none"\n')
    parser = argparse.ArgumentParser()
    add_config_flags(parser, train.TrainConfig)
    args = parser.parse_args(["--config", str(tmp_path / "c.toml"), "--steps", "7", "--target-only", "true"])
    cfg = config_from_args(train.TrainConfig, args)
    assert train.TrainConfig().target_only is False  # so True below is the flag at work
    assert (cfg.steps, cfg.lr, cfg.semantic, cfg.target_only) == (7, 0.5, "none", True)


# A string with what TOML must escape (quote, backslash, control characters, DEL) and what JSON would write as
# surrogate pairs (beyond U+FFFF).
TRICKY = 'caption ü ∞ 😀 𝄞 "quoted" back\\slash\nnew line\ttab \x7f \x01 [x] = # not a comment'


def test_config_toml_round_trips_every_field_type_with_unicode_inf_and_nan(tmp_path):
    import dataclasses
    import math
    import tomllib

    from minflux.tasks.flags import field_type, to_toml

    kinds = {}
    for floats in ((math.inf, -math.inf, 1e-300), (0.1, 2.5e20, math.nan)):
        values = {}
        for i, f in enumerate(dataclasses.fields(train.TrainConfig)):
            kind = field_type(f)
            kinds.setdefault(kind, []).append(f.name)
            values[f.name] = {
                str: f"{TRICKY} {i}",
                int: 2**40 + i,
                float: floats[i % 3],
                bool: f.default is not True,
            }[kind]
        cfg = train.TrainConfig(**values)
        (tmp_path / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
        back = tomllib.loads(
            (tmp_path / "config.toml").read_text(encoding="utf-8")
        )  # valid TOML, by the standard reader
        for (
            name,
            value,
        ) in values.items():  # (the values are not the accepted ones: read_toml's checks are tested apart)
            got = back[name]
            assert got == value or (math.isnan(value) and math.isnan(got)), (name, value, got)
            assert type(got) is type(value), name
    assert set(kinds) == {str, int, float, bool}, kinds  # every type a flag takes was written and read back
    with pytest.raises(ValueError, match="name: .* is not valid Unicode"):
        to_toml(train.TrainConfig(name="run\udcff"))  # undecodable command-line bytes: named, not written


def test_max_grad_norm_inf_then_resume_reads_the_config_back(tmp_path):
    from minflux.tasks.flags import to_toml

    cfg = train.parse(["--max-grad-norm", "inf", "--default-caption", TRICKY, "--out", str(tmp_path)])
    run = tmp_path / "run"
    run.mkdir()
    from minflux.files.weights import write_text_atomic

    write_text_atomic(run / "config.toml", to_toml(cfg))  # as train.py writes it
    resumed = train.parse(["--resume", str(run)])
    assert resumed.max_grad_norm == float("inf") and resumed.default_caption == TRICKY


def test_output_dir_is_the_flag_out_and_bfl_underscores_are_aliases_and_old_configs_read(tmp_path):
    assert train.parse(["--output-dir", "a"]).output_dir == "a"
    assert train.parse(["--out", "b"]).output_dir == "b"  # the earlier name
    assert train.parse(["--output_dir", "c", "--batch_size=8", "--max_grad_norm", "2"]).output_dir == "c"
    assert train.parse(["--batch_size=8"]).batch_size == 8
    (tmp_path / "old.toml").write_text('out = "d"\nsteps = 3\n')  # a config.toml written before the rename
    assert train.parse(["--config", str(tmp_path / "old.toml")]).output_dir == "d"


def test_a_batch_the_processes_do_not_divide_is_refused_and_progress_prints_once(monkeypatch, capsys):
    import io

    from minflux.tasks import progress

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before the process group starts
    assert train.parse(["--batch-size", "4"]).batch_size == 4
    with pytest.raises(SystemExit) as e:
        train.parse(["--batch-size", "3"])
    assert e.value.code == 2
    assert "--batch-size 3 is the global batch: it must split evenly over the 2 processes" in capsys.readouterr().err

    lines = {}
    for r in (0, 1):
        monkeypatch.setattr(progress, "rank", lambda r=r: r)
        stream = io.StringIO()
        progress.Progress(4, label="encode ", stream=stream).update(4)
        lines[r] = stream.getvalue()
    assert lines[0].startswith("encode 4/4") and lines[1] == ""


def test_bad_semantic_mode_is_rejected():
    with pytest.raises(SystemExit) as e:
        train.parse(["--semantic", "telepathy"])
    assert e.value.code == 2


@pytest.mark.slow
def test_finetune_a_finished_run_with_lora_and_sample_it(tmp_path, capsys):
    """The official-weights path on CPU: a finished small run's files are loaded like the official ones."""
    assert run_train(tmp_path, "--steps", "2", "--name", "base", "--semantic", "xattn") == 0
    base = tmp_path / "base"
    code = run_train(
        tmp_path, "--steps", "2", "--name", "lora", "--semantic", "xattn", "--finetune", str(base), "--lora-rank", "4"
    )
    assert code == 0
    run = tmp_path / "lora"
    assert (run / "lora.safetensors").is_file() and not (run / "transformer.safetensors").exists()
    out = capsys.readouterr().out
    assert "(LoRA + adapter)" in out and "memory estimate per process: weights" in out
    lora = read_state_dict(run / "lora.safetensors")
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in lora.items())  # trained
    # bf16 maths on the fp32 LoRA and adapter: the encoding (an fp32 mask) and the evaluation (autocast) as trained
    assert (
        run_train(
            tmp_path,
            "--steps",
            "1",
            "--name",
            "bf16",
            "--semantic",
            "xattn",
            "--finetune",
            str(base),
            "--dtype",
            "bf16",
        )
        == 0
    )
    assert {v.dtype for v in read_state_dict(tmp_path / "bf16" / "lora.safetensors").values()} == {torch.float32}
    import sample

    assert sample.main(["--run", str(run), "--num", "2", "--steps", "2"]) == 0
    # vis2ir on one's own images: the LoRA and the adapter on the base its config names
    from PIL import Image

    from minflux.pipeline import Vis2IRPipeline

    pipe = Vis2IRPipeline.from_run(run, device="cpu")
    assert pipe.model.flux.double_blocks[0].img_attn.qkv.__class__.__name__ == "LoRALinear"
    image = pipe(Image.new("RGB", (80, 80), (30, 120, 30)), Image.new("RGB", (80, 80), (200, 0, 0)), num_steps=2)[0]
    from minflux.files.images import read_settings

    assert image.size == (64, 64) and read_settings(image)["task"] == "vis2ir"


@pytest.mark.slow
def test_training_on_a_folder_of_triptychs_skips_and_counts_bad_files(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (192, 64), (10 * i, 100, 200)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a scene, infrared view")
    Image.new("RGB", (100, 64)).save(folder / "wrong_width.png")
    code = run_train(tmp_path, "--steps", "2", "--name", "folder", "--data", str(folder), "--heldout-samples", "2")
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped 1 unusable file(s)" in out and "wrong_width.png" in out
    assert "data: 11 train, 1 held-out" in out


def test_trace_and_params_print_the_shapes_of_a_step_and_the_parameter_tables(tmp_path, capsys):
    assert run_train(tmp_path, "--steps", "1", "--trace", "--params", "--sample-steps", "1") == 0
    out = capsys.readouterr().out
    assert "--trace: encoding the data (triptychs, captions)" in out and "--trace: the first training step" in out
    assert re.search(r"split_triptych\s+x \[16, 3, 64, 192\] → 3 × \[16, 3, 64, 64\]", out)  # the 16 training scenes
    loss_line = next(line for line in out.splitlines() if line.startswith("flow_matching_loss"))
    assert "noise [4, 32, 64]" in loss_line and loss_line.endswith("→ []")  # batch 4: the scalar loss
    assert "Vis2IR.flux (Flux)" in out and "img [4, 32, 384]" in out  # cat(x_t, x_cond) into the Fill model
    assert "--params: the frozen parts" in out and "--params: the model" in out
    frozen = out.split("--params: the frozen parts")[1].split("--params: the model")[0]
    assert re.search(r"ae \(AutoEncoder\)\s+377,827\s+0\s+377,827", frozen)  # counted as frozen: no gradient
    assert "zero_conv (Linear)                                20,800           20,800" in out
