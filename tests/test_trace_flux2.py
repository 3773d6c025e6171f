"""The FLUX.2 shape trace (minflux/study/trace_flux2.py): one 1024×1024 step with two 1024×1024 references, on the
meta device, through prepare_flux2 and generate, the text encoder (Qwen3 or Mistral) and the VAE included.

klein 4B at 1024×1024: 64×64 = 4096 tokens per image, the target's then two references' (2 × 4096 = 8192), 512
text tokens: 512 + 3 · 4096 = 12800 in the joint sequence; Qwen3-4B's hidden states 9, 18, 27 stacked: 3 × 2560.
"""

import re

import pytest

from minflux.presets import configs
from minflux.study.trace import main, trace_preset
from minflux.study.trace_flux2 import trace_flux2


@pytest.fixture(scope="module")
def klein():
    return trace_flux2("flux2-klein-4b", 1024, 1024, batch=1, steps=1, references=2, quiet=True)


@pytest.fixture(scope="module")
def dev():
    return trace_flux2("flux2-dev", quiet=True)


def line(trace, label):
    """The stage labelled `label` ("attention", "Encoder"), else the first whose label contains it."""
    found = [s for s in trace.stages if s.label == label] or trace.find(label)
    assert found, f"no stage {label!r} in the trace:\n{trace.text()}"
    return found[0]


def test_klein_trace_shows_the_text_encoder_reading_the_prompt(klein):
    qwen = line(klein, "text_encoder (Qwen3)")
    assert qwen.inputs == "input_ids [1, 512], attention_mask [1, 512]" and qwen.outputs == "[1, 512, 7680]"
    assert qwen.note == "Qwen3-4B: hidden states 9, 18, 27 of 36, side by side: 3 × 2560 = 7680"
    assert line(klein, "embed_tokens").outputs == "[1, 512, 2560]"
    layer = line(klein, "layers.* (DecoderLayer)")
    assert layer.calls == 27 and layer.outputs == "[1, 512, 2560]"  # 27 of the 36 layers run
    assert line(klein, "self_attn.q_proj").outputs == "[1, 512, 4096]"  # 32 query heads × 128
    assert line(klein, "self_attn.k_proj").outputs == "[1, 512, 1024]"  # 8 key/value heads × 128
    assert line(klein, "self_attn.q_norm").outputs == "[1, 512, 32, 128]"
    assert line(klein, "mlp.gate_proj").outputs == "[1, 512, 9728]"


def test_klein_trace_shows_the_tokens_ids_and_references(klein):
    prepare = line(klein, "prepare_flux2")
    assert "references 2 × [1, 3, 1024, 1024]" in prepare.inputs
    for shape in ("img [1, 4096, 128]", "txt [1, 512, 7680]", "img_cond_seq [1, 8192, 128]"):
        assert shape in prepare.outputs
    assert line(klein, "pack_flux2").outputs == "[1, 4096, 128]"  # the noise's tokens
    assert line(klein, "latent_ids_flux2").outputs == "[1, 4096, 4]"  # ids with 4 axes (t, h, w, l)
    assert line(klein, "txt_ids_flux2").outputs == "[1, 512, 4]"
    references = line(klein, "reference_condition")
    assert references.outputs == "[1, 8192, 128], [1, 8192, 4]" and references.note.endswith("10, 20")
    encode = line(klein, "Flux2AutoEncoder.encode")
    assert encode.calls == 2 and encode.outputs == "[1, 128, 64, 64]" and encode.parent is references
    assert line(klein, "Encoder").outputs == "[1, 64, 128, 128]"  # mean and log-variance of 32 channels


def test_klein_trace_shows_the_joint_sequence_and_the_cut(klein):
    velocity = line(klein, "velocity")
    assert velocity.outputs == "[1, 4096, 128]"  # v of the target's tokens
    assert velocity.note == (
        "img [1, 4096, 128] + reference img_cond_seq [1, 8192, 128] on the sequence"
        " → [1, 12288, 128] → model → [1, 12288, 128] → cut to [1, 4096, 128]"
    )
    model = line(klein, "transformer (Flux2)")
    assert model.inputs.startswith(
        "img [1, 12288, 128], img_ids [1, 12288, 4], txt [1, 512, 7680], txt_ids [1, 512, 4]"
    )
    assert line(klein, "transformer.txt_in").outputs == "[1, 512, 3072]"
    embed = line(klein, "embed_ids")
    assert embed.inputs == "ids [1, 12800, 4]" and embed.outputs == "[1, 1, 12800, 64] complex"
    assert embed.note == "64 pairs of 128 channels: 16 + 16 + 16 + 16 for t, h, w, l"
    assert "q [1, 24, 12800, 128]" in line(klein, "attention").inputs
    assert line(klein, "double_blocks.* (DoubleStreamBlock)").calls == 5
    single = line(klein, "single_blocks.* (SingleStreamBlock)")
    assert single.calls == 20 and single.outputs == "[1, 12800, 3072]"
    assert (
        line(klein, "linear1").outputs == "[1, 12800, 27648]" and line(klein, "mlp_act").outputs == "[1, 12800, 9216]"
    )
    assert line(klein, "final_layer").outputs == "[1, 12288, 128]"
    assert not klein.find("guidance_in")  # klein: no guidance embedding


def test_klein_trace_decodes_and_is_in_data_flow_order(klein):
    euler = line(klein, "euler step")
    assert euler.note == "x + (t_prev − t) · v; step 1/1: t 1.000 → t_prev 0.000, no guidance embedding"
    assert line(klein, "unpack_flux2").outputs == "[1, 128, 64, 64]"
    assert line(klein, "Flux2AutoEncoder.decode").outputs == "[1, 3, 1024, 1024]"
    assert line(klein, "generate").outputs == "[1, 3, 1024, 1024]"
    order = [
        "prepare_flux2",
        "text_encoder (Qwen3)",
        "reference_condition",
        "generate",
        "denoise",
        "velocity",
        "transformer (Flux2)",
        "transformer.double_blocks.* (DoubleStreamBlock)",
        "transformer.single_blocks.* (SingleStreamBlock)",
        "transformer.final_layer",
        "euler step",
        "unpack_flux2",
        "Flux2AutoEncoder.decode",
    ]
    labels = [s.label for s in klein.stages]
    positions = [next(i for i, label in enumerate(labels) if label.startswith(o)) for o in order]
    assert positions == sorted(positions)
    assert len(klein.stages) < 80  # one line per stage, not one per call


def test_dev_trace_shows_mistral_and_the_guidance_embedding(dev):
    mistral = line(dev, "text_encoder (Qwen3)")
    assert mistral.outputs == "[1, 512, 15360]"
    assert mistral.note == "Mistral Small 3.2: hidden states 10, 20, 30 of 40, side by side: 3 × 5120 = 15360"
    assert line(dev, "layers.* (DecoderLayer)").calls == 30
    assert not dev.find("q_norm")  # Mistral: no q/k norm
    guidance = line(dev, "transformer.guidance_in (MLPEmbedder)")
    assert guidance.inputs == "x [1, 256]" and guidance.outputs == "[1, 6144]"
    assert line(dev, "transformer.txt_in").outputs == "[1, 512, 6144]"
    assert "q [1, 48, 12800, 128]" in line(dev, "attention").inputs
    assert line(dev, "euler step").note.endswith("t 1.000 → t_prev 0.000, guidance 4")


def test_klein_base_text_to_image_runs_true_cfg_through_the_one_recipe():
    """No reference: nothing joined, nothing cut; klein Base's true CFG: a negative prompt, two model calls a step."""
    trace = trace_preset("flux2-klein-base-4b", references=0, quiet=True)
    assert not trace.find("reference_condition") and line(trace, "velocity").note == ""
    assert line(trace, "prepare_flux2").calls == 2  # the prompt and the empty negative prompt
    assert line(trace, "velocity").calls == 2 and line(trace, "transformer (Flux2)").inputs.startswith("img [1, 4096,")
    assert "q [1, 24, 4608, 128]" in line(trace, "attention").inputs  # 512 + 4096
    assert line(trace, "euler step").note.endswith("no guidance embedding; true CFG 4: v = v_neg + 4 · (v − v_neg)")


@pytest.mark.parametrize("preset", ["flux2-klein-9b", "flux2-small"])
def test_every_flux2_preset_traces_with_its_text_encoders_width(preset):
    trace = trace_flux2(preset, quiet=True)
    width = configs[preset].params.context_in_dim  # 3 × Qwen3-8B's 4096; 3 × the small Qwen3's 64
    assert line(trace, "text_encoder (Qwen3)").outputs == f"[1, 512, {width}]"
    assert line(trace, "velocity").outputs == "[1, 4096, 128]"
    assert line(trace, "Flux2AutoEncoder.decode").outputs == "[1, 3, 1024, 1024]"


def test_trace_command_prints_the_flux2_step(capsys):
    assert main(["flux2-klein-4b"]) == 0
    out = capsys.readouterr().out
    assert "2 reference image(s) of 1024×1024; text encoder Qwen3-4B, 27 of its 36 layers run, 512 tokens" in out
    assert re.search(
        r"^\s+velocity\s+img \[1, 4096, 128\].*→ \[1, 12288, 128\] → model → .*cut to \[1, 4096, 128\]\)$", out, re.M
    )
    assert re.search(r"traced in [\d.]+ s", out)


def test_params_command_gives_the_official_counts(capsys):
    """klein 4B: 3,875,544,576 in the transformer, 84,046,115 in the VAE; Qwen3-4B frozen, 27 of its 36 layers."""
    assert main(["flux2-klein-4b", "--params"]) == 0
    out = capsys.readouterr().out
    cells = {line.split(" (")[0]: re.split(r"\s{2,}", line)[1:4] for line in out.splitlines() if " (" in line}
    assert cells["transformer"] == ["3,875,544,576", "3,875,544,576", "0"]
    assert cells["ae"] == ["84,046,115", "0", "84,046,115"]
    assert cells["text_encoder"][1] == "0"
    assert "double_blocks (5 × DoubleStreamBlock)" in out and "single_blocks (20 × SingleStreamBlock)" in out
    assert "model.layers (27 × DecoderLayer)" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert re.split(r"\s{2,}", total)[2] == "3,875,544,576"  # only the transformer trains
    assert "all 36, no LM head: 4,022,468,096" in out  # Qwen3-4B with its tied embedding
