"""Every command of minflux/study/EXERCISES.md runs, and shows what the exercise says it shows.

The commands are read from EXERCISES.md itself and run in a fresh folder, in order (the attention-map
exercises use the runs trained before them). Commands that take minutes as written run here with smaller
flags, added at the end (`SMALLER`): train.py runs a few steps instead of 1200 (the real run takes about 9 minutes),
the maps sample 2 Euler steps, and the class-label experiment trains for 30 steps on 64 scenes, which checks
that it runs and reports, not its conclusion (test_class_label_conclusion checks that, at full size: about
4 minutes on 2 cores).
A command added to the file is run too, so the course cannot rot.
"""

import importlib
import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXERCISES = REPO / "minflux" / "study" / "EXERCISES.md"

TINY_TRAIN = "--steps 2 --vae-steps 2 --train-samples 16 --heldout-samples 2 --sample-steps 1 --batch-size 2"
SMALLER = {  # command prefix → flags appended in the test
    "python train.py": TINY_TRAIN,
    "python -m minflux.study.maps": "--steps 2",
    "python -m minflux.study.exercises class-label": "--steps 30 --train 64 --heldout 16",
}


def commands() -> list[str]:
    """The `python ...` lines of the bash blocks of EXERCISES.md, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", EXERCISES.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("python")]


def run(command: str, capsys) -> str:
    """Run one command in this process (no new interpreter to start) and return what it printed."""
    extra = next((flags for prefix, flags in SMALLER.items() if command.startswith(prefix)), "")
    argv = shlex.split(command)[1:] + shlex.split(extra)
    if argv[0] == "-m":
        main = importlib.import_module(argv[1]).main
        args = argv[2:]
    else:
        spec = importlib.util.spec_from_file_location("exercise_script", REPO / argv[0])
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        main, args = script.main, argv[1:]
    code = main(args)
    out = capsys.readouterr().out
    assert code in (0, None), f"{command} exited with {code}:\n{out[-2000:]}"
    return out


def test_every_exercise_command_runs_and_shows_what_it_says(tmp_path_factory, capsys):
    """All commands, in the file's order; each exercise's observation is checked on its output."""
    folder = tmp_path_factory.mktemp("course")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        out = {command: run(command, capsys) for command in commands()}
    finally:
        os.chdir(previous)
    assert len(out) >= 12

    # 1. the Kontext walk-through and the vis2ir design's DEBUG shapes
    kontext = out["python -m minflux.study.trace flux-dev-kontext"]
    for shape in ("[1, 8192, 64] → [1, 8192, 3072]", "[1, 8704, 24, 128]", "[1, 8704, 15360]", "[1, 3, 1024, 1024]"):
        assert shape in kontext
    assert "[DEBUG] hidden_states (final): [4, 2048, 384]" in out["python -m minflux.study.trace vis2ir --batch 4"]
    # 2. the adapter's real size
    assert re.search(r"^adapter .*\b16,897\s+16,897\s+0$", out["python -m minflux.study.trace vis2ir --params"], re.M)
    # 3. cross-attention by hand
    hand = out["python -m minflux.study.exercises cross-attention"]
    assert "Q: [2, 8, 64, 64]" in hand and "K: [2, 8, 77, 64]" in hand and "weights: [2, 8, 64, 77]" in hand
    assert float(re.search(r"fused SDPA\| = (\S+)", hand)[1]) < 1e-5
    # 4. attention maps: PNGs written
    for command, text in out.items():
        if command.startswith("python -m minflux.study.maps"):
            assert Path(folder, text.strip().splitlines()[-1]).is_file(), command
    other_prompt = next(text for command, text in out.items() if "--prompt" in command)
    assert "prompt: 'two people" in other_prompt
    # 5. CLIP similarities: a symmetric matrix with ones on the diagonal
    clip = out["python -m minflux.study.exercises clip-similarity"].splitlines()
    rows = [line.split()[1:] for line in clip if re.match(r"\s+\[\d\]\s+[\d.-]+\s", line)]
    assert len(rows) == 4 and all(float(rows[i][i]) == pytest.approx(1.0, abs=1e-3) for i in range(4))
    # 6. the semantic ablation: runs with and without cross-attention finished
    for mode in ("none", "blocks", "xattn_rope"):
        assert (folder / "runs" / f"vis2ir-{mode}" / "metrics.json").is_file()
    # 7. the thought question: all four conditions trained and compared
    report = out["python -m minflux.study.exercises class-label"]
    for condition in ("none", "class label", "cross-attention", "cross-attention + positions"):
        assert re.search(rf"^{re.escape(condition)}\s+held-out MSE", report, re.M)
    # 8. FLUX.1 and FLUX.2: per-block and shared modulation, SwiGLU halving its input
    assert re.search(
        r"^\s+img_mod \(Modulation\)\s+56,641,536", out["python -m minflux.study.trace flux-dev --params"], re.M
    )
    klein = out["python -m minflux.study.trace flux2-klein-4b --params"]
    assert re.search(r"^\s+single_stream_modulation \(Modulation\)\s+28,311,552", klein, re.M)
    assert "mlp_act (SwiGLU)" in (trace := out["python -m minflux.study.trace flux2-klein-4b"])
    assert "x [1, 12800, 18432] → [1, 12800, 9216]" in trace


@pytest.mark.slow
def test_class_label_conclusion():
    """The exercise's answer, at its full size: with positions, cross-attention to the semantic map beats the
    class label several times on the objects, and the class label beats nothing by little."""
    from minflux.study.exercises import class_label_experiment

    r = class_label_experiment(log=lambda *a: None)
    assert r["cross-attention + positions"]["objects_mse"] * 3 < r["class label"]["objects_mse"]
    assert r["class label"]["objects_mse"] < r["none"]["objects_mse"]
