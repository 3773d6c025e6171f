"""Shape traces and parameter tables (minflux/study/), checked against the walk-through's and the vis2ir design's
numbers.

The full-size traces run on the meta device: FLUX.1-dev, its VAE, CLIP-L and T5-XXL with no weights.
"""

import dataclasses
import re

import pytest
import torch

import minflux
from minflux import hooks, sampling
from minflux.study.params import meta_components, parameter_table
from minflux.study.trace import shape_trace, trace_preset


@pytest.fixture(scope="module")
def kontext():
    """The Kontext walk-through: flux-dev-kontext, 1024×1024, a 512-token prompt, one step."""
    return trace_preset("flux-dev-kontext", 1024, 1024, batch=1, steps=1, quiet=True)


def line(trace, label):
    """The first stage whose label contains `label`."""
    found = trace.find(label)
    assert found, f"no stage {label!r} in the trace:\n{trace.text()}"
    return found[0]


def test_kontext_trace_reproduces_the_walk_through_shapes(kontext):
    clip = line(kontext, "clip")
    assert "[1, 77]" in clip.inputs and "[1, 768]" in clip.outputs
    t5 = line(kontext, "t5")
    assert "[1, 512]" in t5.inputs and t5.outputs == "[1, 512, 4096]"
    assert line(kontext, "AutoEncoder.encode").outputs == "[1, 16, 128, 128]"
    assert line(kontext, "pack").outputs == "[1, 4096, 64]"
    img_in = line(kontext, "img_in")
    assert img_in.inputs == "input [1, 8192, 64]" and img_in.outputs == "[1, 8192, 3072]"
    assert line(kontext, "txt_in").outputs == "[1, 512, 3072]"
    attention = line(kontext, "attention")
    assert "[1, 8704, 24, 128]" in attention.note and "q [1, 24, 8704, 128]" in attention.inputs
    assert line(kontext, "mlp_act").outputs == "[1, 8704, 12288]"
    assert line(kontext, "linear2").inputs == "input [1, 8704, 15360]"
    assert line(kontext, "linear2").outputs == "[1, 8704, 3072]"
    assert line(kontext, "final_layer").outputs == "[1, 8192, 64]"
    assert line(kontext, "denoise").outputs == "[1, 4096, 64]"
    assert line(kontext, "embed_ids").outputs == "[1, 1, 8704, 64] complex"
    assert line(kontext, "unpack").outputs == "[1, 16, 128, 128]"
    assert line(kontext, "AutoEncoder.decode").outputs == "[1, 3, 1024, 1024]"


def test_kontext_trace_is_in_data_flow_order_with_blocks_folded(kontext):
    labels = [s.label for s in kontext.stages]
    order = [
        "clip",
        "t5",
        "AutoEncoder.encode",
        "denoise",
        "velocity",
        "transformer (Flux)",
        "transformer.img_in",
        "transformer.double_blocks.* (DoubleStreamBlock)",
        "transformer.single_blocks.* (SingleStreamBlock)",
        "transformer.final_layer",
        "euler step",
        "unpack",
        "AutoEncoder.decode",
    ]
    positions = [next(i for i, line in enumerate(labels) if line.startswith(o)) for o in order]
    assert positions == sorted(positions)
    assert line(kontext, "double_blocks.* (DoubleStreamBlock)").calls == 19
    assert line(kontext, "single_blocks.* (SingleStreamBlock)").calls == 38
    assert len(kontext.stages) < 80  # one line per stage, not one per call


def test_kontext_trace_shows_the_concatenation_and_the_cut_in_velocity(kontext):
    """denoise takes [1, 4096, 64], the transformer [1, 8192, 64]: velocity, between them, has a line of its own."""
    (velocity,) = [s for s in kontext.stages if s.label == "velocity"]
    assert velocity.parent.label == "denoise" and velocity.depth == line(kontext, "denoise").depth + 1
    assert "img [1, 4096, 64]" in velocity.inputs and "img_cond_seq [1, 4096, 64]" in velocity.inputs
    assert velocity.outputs == "[1, 4096, 64]"
    assert velocity.note == (
        "img [1, 4096, 64] + reference img_cond_seq [1, 4096, 64] on the sequence"
        " → [1, 8192, 64] → model → [1, 8192, 64] → cut to [1, 4096, 64]"
    )
    model = velocity.children[0]  # the shapes in the note are the model's line's
    assert model.label == "transformer (Flux)" and model.inputs.startswith("img [1, 8192, 64]")
    assert model.outputs == "[1, 8192, 64]"


def test_kontext_trace_shows_one_euler_step_with_its_values(kontext):
    euler = line(kontext, "euler step")
    assert euler.parent is line(kontext, "denoise") and euler.parent.children[-1] is euler  # after the model call
    assert euler.inputs == "x [1, 4096, 64], v [1, 4096, 64]" and euler.outputs == "[1, 4096, 64]"
    assert euler.note == "x + (t_prev − t) · v; step 1/1: t 1.000 → t_prev 0.000, guidance 2.5"  # Kontext's 2.5
    assert euler.calls == 1


def test_euler_step_line_of_a_real_run_gives_the_first_step_of_its_schedule():
    """A small model on the CPU, three steps of a given schedule: one line counted ×3 with the first step's values;
    the guidance left out of the call is denoise's default; a model with no guidance embedding says so."""
    torch.manual_seed(0)
    params = minflux.configs["flux-small"].params  # no guidance embedding, as schnell
    img, txt, y = torch.randn(1, 16, 64), torch.randn(1, 5, params.context_in_dim), torch.randn(1, 64)
    ids, txt_ids = sampling.prepare_img_ids(1, 4, 4), sampling.prepare_txt_ids(1, 5)
    for guidance_embed, values in ((True, "guidance 4"), (False, "no guidance embedding")):
        model = minflux.Flux(dataclasses.replace(params, guidance_embed=guidance_embed))
        with shape_trace(quiet=True) as trace:
            sampling.denoise(model, img, ids, txt, txt_ids, y, [1.0, 0.75, 0.5, 0.0])
        euler = line(trace, "euler step")
        assert euler.note == f"x + (t_prev − t) · v; step 1/3: t 1.000 → t_prev 0.750, {values}"
        assert euler.calls == 3 and line(trace, "velocity").calls == 3
        assert "   ×3   (x + (t_prev − t) · v; step 1/3" in trace.text()
        assert line(trace, "velocity").note == ""  # no condition: nothing joined, nothing cut


def test_kontext_trace_names_the_complex_pairs_of_the_rope_table(kontext):
    embed = line(kontext, "embed_ids")
    assert embed.outputs == "[1, 1, 8704, 64] complex"
    assert embed.note == "64 pairs of 128 channels: 8 + 28 + 28 for axis0, row, col"
    assert "pe [1, 1, 8704, 64] complex" in line(kontext, "double_blocks.* (DoubleStreamBlock)").inputs
    assert "pe [1, 1, 8704, 64] complex" in line(kontext, "attention").inputs


def test_kontext_trace_folds_only_the_repeats_of_one_caller(kontext):
    """prepare and kontext_condition each call latent_ids, which calls prepare_img_ids: one line under each."""
    ids = [s for s in kontext.stages if s.label == "prepare_img_ids"]
    assert [s.calls for s in ids] == [1, 1]
    assert [s.parent.parent.label for s in ids] == ["prepare", "kontext_condition"]


@hooks.stage
def _inner(x):
    return x + 1


@hooks.stage
def _caller_a(x):
    return _inner(_inner(x))


@hooks.stage
def _caller_b(x):
    return _inner(x)


def test_a_stage_called_from_two_callers_is_two_lines():
    """Two callers → two lines; the same caller's repeats fold into one line, and their own stages with them."""
    x = torch.zeros(2, 3)
    with shape_trace(quiet=True) as trace:
        _caller_a(x)
        _caller_b(x)
        _caller_a(x)
    assert [(s.depth, s.label, s.calls) for s in trace.stages] == [
        (0, "_caller_a", 2),
        (1, "_inner", 4),
        (0, "_caller_b", 1),
        (1, "_inner", 1),
    ]
    assert trace.lines()[1].strip().startswith("_inner") and trace.lines()[1].endswith("×4")


def test_kontext_trace_command_prints_the_walk_through(capsys):
    from minflux.study.trace import main

    assert main(["flux-dev-kontext"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"img_in \(Linear\)\s+input \[1, 8192, 64\] → \[1, 8192, 3072\]", out)
    assert re.search(
        r"^\s+velocity\s+img \[1, 4096, 64\].*→ \[1, 8192, 64\] → model → .*cut to \[1, 4096, 64\]\)$", out, re.M
    )
    assert re.search(r"^\s+euler step\s+x \[1, 4096, 64\].*t 1\.000 → t_prev 0\.000, guidance 2\.5\)$", out, re.M)
    assert re.search(r"traced in [\d.]+ s", out)


@pytest.mark.parametrize("layout", ["panel", "diptych"])
def test_vis2ir_trace_command_prints_the_designs_debug_shapes(capsys, layout):
    """`python -m minflux.study.trace vis2ir --batch 4`: the vis2ir design's DEBUG lines, read from the printed output;
    with --semantic-layout diptych every one of them, the design's [4, 2048, 64] semantic tokens included."""
    from minflux.study.trace import main

    assert main(["vis2ir", "--batch", "4", "--semantic-layout", layout]) == 0
    lines = capsys.readouterr().out.splitlines()
    debug = dict(line[len("[DEBUG] ") :].split(": ", 1) for line in lines if line.startswith("[DEBUG]"))
    assert debug["triptych"] == "[4, 3, 512, 1536]"
    assert debug["visible_img, target_img, semantic_img"] == "3 × [4, 3, 512, 512]"
    assert debug["diptych"] == "[4, 3, 512, 1024]"
    assert debug["mask_diptych"] == "[4, 1, 512, 1024]"
    assert debug["x_0"] == "[4, 2048, 64]"
    assert debug["x_cond"] == "[4, 2048, 320]"
    # minflux's default: the semantic panel alone; the design's layout: the map beside itself, a token per x_t token
    assert debug["semantic_tokens"] == {"panel": "[4, 1024, 64]", "diptych": "[4, 2048, 64]"}[layout]
    assert debug["x_t"] == debug["x_t_enhanced"] == "[4, 2048, 64]"
    assert debug["hidden_states (final)"] == "[4, 2048, 384]"
    assert any(re.search(r"Vis2IR\.adapter \(SemanticConditioningAdapter\)", line) for line in lines)


def test_parameter_table_gives_the_official_counts():
    table = parameter_table(meta_components("flux-dev"))
    for count in ("11,901,408,320", "83,819,683", "123,060,480", "4,762,310,656"):
        assert count in table, table
    assert "double_blocks (19 × DoubleStreamBlock)" in table and "single_blocks (38 × SingleStreamBlock)" in table


def test_vis2ir_params_count_the_adapter_not_the_designs_number(capsys):
    from minflux.study.trace import main

    main(["vis2ir", "--params"])
    out = capsys.readouterr().out
    adapter = next(line for line in out.splitlines() if line.startswith("adapter"))
    assert re.split(r"\s{2,}", adapter)[1:4] == ["16,897", "16,897", "0"]  # parameters, trainable, frozen
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert re.split(r"\s{2,}", total)[2] == "16,897"  # only the adapter trains
    assert "33,088" not in out


def test_shape_trace_of_a_real_model_matches_its_output_and_cleans_up():
    """A small model on the CPU, called twice: the trace's shapes are the real ones, the repeats fold, and
    closing the trace leaves no observer open and removes every hook."""
    torch.manual_seed(0)
    params = minflux.configs["flux-small"].params
    model = minflux.Flux(params)
    img, txt = torch.randn(2, 16, 64), torch.randn(2, 5, params.context_in_dim)
    args = (
        img,
        sampling.prepare_img_ids(2, 4, 4),
        txt,
        sampling.prepare_txt_ids(2, 5),
        torch.rand(2),
        torch.randn(2, 64),
    )
    with shape_trace(quiet=True) as trace:
        out = model(*args)
        model(*args)
    assert line(trace, "Flux").outputs == str(list(out.shape))
    assert line(trace, "Flux").calls == 2
    assert line(trace, "double_blocks.* (DoubleStreamBlock)").calls == 2 * params.depth
    assert hooks.current() is None  # the trace is closed: the marked functions call straight through again
    with shape_trace(quiet=True) as empty:  # hooks are gone: a second trace starts from nothing
        pass
    model(*args)
    assert empty.stages == []
