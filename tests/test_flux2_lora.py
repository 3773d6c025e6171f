"""LoRA for FLUX.2: injected, written in every layout, read from every layout diffusers reads, applied by the pipeline.

diffusers 0.42 + PEFT is the oracle: a LoRA minflux writes loads into diffusers' Flux2Transformer2DModel by the route
Flux2KleinPipeline.load_lora_weights takes, every key consumed, to the same output; and the files diffusers' FLUX.2
converters read (kohya, BFL / ai-toolkit, PEFT-wrapped official names, PEFT's own) give minflux the output they give
diffusers.
"""

import ast
import json
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline  # noqa: E402

from minflux.files.lora_files import load_lora, lora_generation, read_lora, save_lora  # noqa: E402
from minflux.files.weights import WeightsError, read_metadata, read_shapes  # noqa: E402
from minflux.lora import DEFAULT_TARGETS_FLUX2, TARGET_GROUPS, inject_lora, lora_layers, merge_lora  # noqa: E402
from tests.flux2_helpers import TINY2_VARIANTS, diffusers_flux2, diffusers_forward, flux2_inputs  # noqa: E402
from tests.flux2_helpers import tiny_flux2, write_klein_repo  # noqa: E402
from tests.flux_helpers import TINY, save_peft_lora, tiny_flux  # noqa: E402
from tests.test_lora import randomize_lora_  # noqa: E402

RANK, ALPHA = 4, 8.0  # alpha / rank = 2, a power of two: folding it into lora_B (diffusers, bfl) is exact
MODULATIONS = {"double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"}
# The layers diffusers 0.42 reads right from each layout minflux writes (save_lora warns of the others, tested below).
READ_BY_DIFFUSERS = {
    "kohya": [*DEFAULT_TARGETS_FLUX2, "img_in", "txt_in", "time_in.*", "final_layer.linear"],
    "diffusers": ["all"],
    "bfl": [*DEFAULT_TARGETS_FLUX2, "mod", "embed", "final_layer.linear"],  # not the final adaLN: halves unswapped
}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def lora_model(params, targets, rank=RANK, alpha=ALPHA, seed=0):
    """A tiny Flux2 (the same base weights every time) with a random, non-zero LoRA on `targets`."""
    model = tiny_flux2(params)
    inject_lora(model, rank, alpha, targets=targets)
    return randomize_lora_(model, seed=seed)


def relative_error(ours, theirs) -> float:
    return ((ours - theirs).abs().max() / theirs.std()).item()


@contextmanager
def diffusers_log():
    """The messages diffusers logs at WARNING or above meanwhile (its loggers do not propagate to pytest)."""
    from diffusers.utils import logging as diffusers_logging

    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        yield said
    finally:
        root.removeHandler(handler)


def diffusers_with_lora(params, base: dict, lora):
    """diffusers' transformer holding `base`, the LoRA (a file or a state dict) loaded by Flux2KleinPipeline's
    load_lora_weights on a pipeline of that transformer alone; fails unless every key diffusers' converter made of the
    file is loaded, unchanged, and nothing is logged (unsupported, unexpected or missing keys)."""
    from peft.utils import get_peft_model_state_dict

    ref = diffusers_flux2(params, base)
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=ref)
    source = dict(lora) if isinstance(lora, dict) else str(lora)
    with diffusers_log() as said:
        converted = Flux2KleinPipeline.lora_state_dict(dict(lora) if isinstance(lora, dict) else str(lora))
        pipe.load_lora_weights(source, adapter_name="test")
    assert said == []
    loaded = get_peft_model_state_dict(ref, adapter_name="test")
    assert sorted(loaded) == sorted(k.removeprefix("transformer.") for k in converted)
    assert all(torch.equal(t, converted[f"transformer.{k}"]) for k, t in loaded.items())
    return ref


# --- injection ----------------------------------------------------------------------------------------------------


def test_default_targets_are_the_blocks_linear_layers_and_mod_adds_the_shared_modulations():
    params = TINY2_VARIANTS["dev"]
    model, inputs = tiny_flux2(params), flux2_inputs(params)
    before = run(model, inputs)
    inject_lora(model, 2)
    per_double = [f"{s}_{p}" for s in ("img", "txt") for p in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    assert sorted(lora_layers(model)) == sorted(
        [f"double_blocks.{i}.{p}" for i in range(params.depth) for p in per_double]
        + [f"single_blocks.{i}.linear{n}" for i in range(params.depth_single_blocks) for n in (1, 2)]
    )  # the blocks' layers, as musubi-tuner trains FLUX.2; its shared modulations are not in the blocks
    assert torch.equal(run(model, inputs), before), "up = 0 at injection: the output must not change"
    blocks = set(lora_layers(model))
    inject_lora(model, 2, targets="mod")
    assert set(lora_layers(model)) - blocks == MODULATIONS

    for group in TARGET_GROUPS:  # every group names layers of both generations
        for other in (tiny_flux(), tiny_flux2(params)):
            inject_lora(other, 1, targets=group)
    flux1 = tiny_flux()
    inject_lora(flux1, 1, targets="mod")
    assert len(lora_layers(flux1)) == 2 * TINY.depth + TINY.depth_single_blocks  # FLUX.1: each block's own

    randomize_lora_(model)
    unmerged = run(model, inputs)
    assert relative_error(unmerged, before) > 0.1
    merge_lora(model)
    assert relative_error(run(model, inputs), unmerged) <= 1e-5


# --- writing: back into minflux, and into diffusers ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "bfl", "minflux"])
def test_every_layout_loads_back_into_minflux_exactly(fmt, tmp_path):
    params = TINY2_VARIANTS["dev"]
    src, inputs = lora_model(params, "all"), flux2_inputs(params)  # every layer: fused qkv, linear1, final adaLN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what diffusers reads of kohya and bfl: tested below
        path = save_lora(src, tmp_path / f"{fmt}.safetensors", format=fmt)
    metadata = read_metadata(path)
    assert [metadata[f"minflux.lora_{k}"] for k in ("format", "rank", "alpha")] == [fmt, "4", "8"]
    assert metadata["minflux.in_channels"] == "32"  # TINY2's; a real FLUX.2's 128, which FLUX.1's 64 is not
    assert lora_generation({k: list(s) for k, (s, _) in read_shapes(path).items()})[0] == "FLUX.2"

    dst = tiny_flux2(params)
    assert sorted(load_lora(dst, path)) == sorted(lora_layers(src))
    folded = fmt in ("diffusers", "bfl")  # no alpha in the file: alpha / rank = 2 is in lora_B, exactly
    for name, layer in lora_layers(src).items():
        got = dst.get_submodule(name)
        assert torch.equal(got.lora_down.weight, layer.lora_down.weight), name
        assert torch.equal(got.lora_up.weight, (2 if folded else 1) * layer.lora_up.weight), name
        assert got.alpha.item() == (RANK if folded else ALPHA)
    assert torch.equal(run(dst, inputs), run(src, inputs))


@pytest.mark.parametrize("variant", ["dev", "klein"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "bfl"])
def test_a_lora_minflux_writes_loads_into_diffusers_to_the_same_output(fmt, variant, tmp_path):
    params = TINY2_VARIANTS[variant]
    model, inputs = lora_model(params, READ_BY_DIFFUSERS[fmt], seed=1), flux2_inputs(params)
    base = tiny_flux2(params).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is one diffusers reads: save_lora says nothing
        path = save_lora(model, tmp_path / "lora.safetensors", format=fmt)
    ref = diffusers_with_lora(params, base, path)
    ours, theirs = run(model, inputs), diffusers_forward(ref, inputs).detach()
    assert relative_error(ours, run(tiny_flux2(params), inputs)) > 0.1, "the LoRA must change the output"
    assert relative_error(ours, theirs) <= 1e-5


def test_save_lora_names_the_layers_diffusers_does_not_read_right(tmp_path):
    params = TINY2_VARIANTS["dev"]
    model, inputs = lora_model(params, "all", seed=2), flux2_inputs(params)
    base = tiny_flux2(params).state_dict()
    unread = {"guidance_in.in_layer", "guidance_in.out_layer", "final_layer.adaLN_modulation.1", *MODULATIONS}
    with pytest.warns(UserWarning, match="does not load 6 LoRA layer.* kohya file.*guidance_in.in_layer"):
        kohya = save_lora(model, tmp_path / "kohya.safetensors")
    ref = diffusers_flux2(params, base)
    with diffusers_log() as said:
        ref.load_lora_adapter(Flux2KleinPipeline.lora_state_dict(str(kohya)), prefix="transformer")
    listed = ast.literal_eval(said[0].removeprefix("Unsupported keys for Kohya Flux2 LoRA conversion: "))
    assert {key.split(".")[0] for key in listed} == {"lora_unet_" + n.replace(".", "_") for n in unread}

    with pytest.warns(UserWarning, match="does not load 1 LoRA layer.* bfl file right .final_layer.adaLN_modulation.1"):
        bfl = save_lora(model, tmp_path / "bfl.safetensors", format="bfl")
    lora = load_file(bfl)
    ours = run(model, inputs)
    theirs = diffusers_forward(diffusers_with_lora(params, base, lora), inputs).detach()
    assert relative_error(ours, theirs) > 0.1  # diffusers' converter takes BFL's (shift, scale) as its (scale, shift)
    key = "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"
    lora[key] = torch.cat(lora[key].chunk(2)[::-1])  # the halves swapped by hand: diffusers then agrees
    theirs = diffusers_forward(diffusers_with_lora(params, base, lora), inputs).detach()
    assert relative_error(ours, theirs) <= 1e-5


# --- reading what other tools write ----------------------------------------------------------------------------------


def by_hand(model, layout: str) -> dict:
    """A LoRA's tensors under the names other tools give them: kohya (alpha kept), BFL / ai-toolkit with or without
    diffusion_model., PEFT wrapping the official model (base_model.model.; no alpha: alpha / rank in lora_B)."""
    sd = {}
    for name, layer in lora_layers(model).items():
        down, up = layer.lora_down.weight.detach().clone(), layer.lora_up.weight.detach().clone()
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": layer.alpha.clone()}
        else:
            prefix = {"bfl": "diffusion_model.", "bfl bare": "", "peft official": "base_model.model."}[layout]
            sd[f"{prefix}{name}.lora_A.weight"] = down
            sd[f"{prefix}{name}.lora_B.weight"] = layer.alpha.item() / layer.rank * up
    return sd


@pytest.mark.parametrize("layout", ["kohya", "bfl", "peft official", "diffusers block names"])
def test_layouts_diffusers_reads_give_minflux_its_output(layout, tmp_path):
    params = TINY2_VARIANTS["dev"]
    targets = READ_BY_DIFFUSERS["kohya" if layout == "kohya" else "bfl"]
    model, inputs = lora_model(params, targets, rank=6, alpha=3.0, seed=3), flux2_inputs(params)
    up = model.get_submodule("double_blocks.0.img_attn.qkv").lora_up.weight  # [3 · 64, 6]
    with torch.no_grad():  # block-diagonal, as a split-qkv kohya LoRA: diffusers' converter splits its downs
        up.mul_(torch.block_diag(*[torch.ones(params.hidden_size, 2)] * 3))
    if layout == "diffusers block names":  # ai-toolkit: diffusers' names in the blocks, "sformer_blocks" for some
        blocks = {k: v for k, v in load_file(save_lora(model, tmp_path / "d.safetensors", format="diffusers")).items()}
        lora = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in blocks.items() if "blocks." in k}
        lora = {k.replace("diffusion_model.transformer_blocks.1.", "diffusion_model.sformer_blocks.1."): v
                for k, v in lora.items()}  # fmt: skip
        lora |= {k: v for k, v in by_hand(model, "bfl").items() if "blocks." not in k}
        assert any(".sformer_blocks.1." in k for k in lora) and any(".transformer_blocks.0." in k for k in lora)
    else:
        lora = by_hand(model, layout)
    fresh = tiny_flux2(params)
    assert sorted(load_lora(fresh, dict(lora))) == sorted(lora_layers(model))
    ours = run(fresh, inputs)
    assert relative_error(ours, run(tiny_flux2(params), inputs)) > 0.1, "the LoRA must change the output"
    theirs = diffusers_forward(diffusers_with_lora(params, tiny_flux2(params).state_dict(), lora), inputs).detach()
    assert relative_error(ours, theirs) <= 1e-5
    assert relative_error(ours, run(model, inputs)) <= 1e-5


def test_bfl_without_its_prefix_reads_as_with_it():
    params = TINY2_VARIANTS["dev"]
    model = lora_model(params, "all", seed=4)
    prefixed = read_lora(by_hand(model, "bfl"), tiny_flux2(params))
    bare = read_lora(by_hand(model, "bfl bare"), tiny_flux2(params))
    assert sorted(prefixed) == sorted(bare) == sorted(lora_layers(model))
    for name, w in prefixed.items():
        assert torch.equal(w.down, bare[name].down) and torch.equal(w.up, bare[name].up), name
        assert torch.allclose(w.alpha / RANK * w.up @ w.down, model.get_submodule(name).delta_weight(), atol=1e-6)


def test_a_lora_diffusers_trains_and_saves_gives_minflux_its_output(tmp_path):
    """PEFT on diffusers' transformer, other ranks and alphas by name, saved by Flux2KleinPipeline.save_lora_weights
    with its LoraConfig in the metadata (the alphas): the fused layers get q, k, v of different ranks."""
    from peft import LoraConfig

    params = TINY2_VARIANTS["klein"]
    model, inputs = tiny_flux2(params), flux2_inputs(params)
    trained = diffusers_flux2(params, model.state_dict())
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        init_lora_weights=False,  # random lora_B: every layer changes the output
        target_modules=r".*(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|linear_in|linear_out|to_qkv_mlp_proj"
        r"|single_transformer_blocks\.\d+\.attn\.to_out|modulation_img\.linear|single_stream_modulation\.linear"
        r"|norm_out\.linear)",
        rank_pattern={"transformer_blocks.0.attn.to_k": 2},
        alpha_pattern={"transformer_blocks.0.attn.to_k": 5, "single_transformer_blocks.1.attn.to_qkv_mlp_proj": 1.5},
    )
    path = save_peft_lora(trained, config, Flux2KleinPipeline, tmp_path)
    theirs = diffusers_forward(trained, inputs).detach()
    assert relative_error(theirs, run(model, inputs)) > 0.1, "the LoRA must change the output"

    layers = load_lora(model, path)
    assert "double_stream_modulation_img.lin" in layers and "final_layer.adaLN_modulation.1" in layers
    assert model.get_submodule("double_blocks.0.img_attn.qkv").rank == 4 + 2 + 4  # q, k, v: own downs, fused
    assert model.get_submodule("single_blocks.1.linear1").alpha.item() == 1.5
    assert relative_error(run(model, inputs), theirs) <= 1e-5


# --- the other generation's LoRA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "bfl"])
def test_the_other_generations_lora_is_refused_naming_the_key(fmt, tmp_path):
    for source, target, ours in ((tiny_flux(), tiny_flux2(), "FLUX.2"), (tiny_flux2(), tiny_flux(), "FLUX.1")):
        inject_lora(source, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FLUX.1 in bfl: diffusers reads none of it
            path = save_lora(source, tmp_path / f"{fmt}.safetensors", format=fmt)
        generation, key = lora_generation({k: list(s) for k, (s, _) in read_shapes(path).items()})
        assert generation != ours and any(k.startswith(key.split(",")[0]) for k in load_file(path))
        with pytest.raises(WeightsError, match=f"{fmt}.safetensors: a {generation} LoRA .shown by {key.split(',')[0]}"):
            read_lora(path, target)
        assert not lora_layers(target)


# --- the pipeline and sample.py ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_klein_repo(tmp_path_factory.mktemp("klein"))


def repo_loras(repo, folder) -> list:
    """Two LoRAs for the repo's transformer: kohya with the default targets, diffusers' layout on the attention
    (where the two stack) and the shared modulations."""
    from minflux.files.load import load_flux

    paths = []
    for seed, fmt, targets in ((1, "kohya", None), (2, "diffusers", ["attn", "mod"])):
        model = load_flux(repo / "transformer")
        inject_lora(model, RANK, ALPHA, targets=targets)
        randomize_lora_(model, seed=seed, size=1.0)
        paths.append((save_lora(model, folder / f"{fmt}.safetensors", format=fmt), model))
    return paths


def test_the_pipeline_stacks_flux2_loras_with_their_scales(repo, tmp_path):
    from minflux.pipeline_flux2 import Flux2Pipeline

    loras = repo_loras(repo, tmp_path)
    pipe = Flux2Pipeline.from_files(repo=repo, device="cpu", dtype=torch.float32)
    for (path, _), scale in zip(loras, (0.8, 0.5)):
        pipe.load_lora(path, scale)
    assert [(r["path"], r["scale"]) for r in pipe.loras] == [
        (str(p.resolve()), s) for (p, _), s in zip(loras, (0.8, 0.5))
    ]
    for name in ("double_blocks.0.img_attn.qkv", "double_stream_modulation_img.lin"):
        expected = sum(s * m.get_submodule(name).delta_weight() for (_, m), s in zip(loras, (0.8, 0.5)) if
                       name in lora_layers(m))  # fmt: skip
        assert torch.allclose(pipe.model.get_submodule(name).delta_weight(), expected, atol=1e-5), name


def test_sample_py_applies_a_flux2_lora_records_it_and_from_reproduces_the_image(repo, tmp_path):
    import sample

    loras = repo_loras(repo, tmp_path)
    common = ["--prompt", "a chair", "--seed", "3", "--steps", "2", "--width", "64", "--height", "48"]
    common += ["--max-length", "64"]

    def made(out, *args) -> Image.Image:
        assert sample.main([*args, "--output-dir", str(tmp_path / out)]) == 0
        (png,) = (tmp_path / out).glob("*.png")
        return Image.open(png)

    plain = made("plain", "--repo", str(repo), *common)
    with_loras = made(
        "lora", "--repo", str(repo), *common, "--lora", f"{loras[0][0]}:0.8", "--lora", f"{loras[1][0]}:0.5"
    )
    assert plain.tobytes() != with_loras.tobytes()
    settings = json.loads(with_loras.info["minflux"])
    assert [(r["path"], r["scale"]) for r in settings["loras"]] == [(str(loras[0][0].resolve()), 0.8),
                                                                    (str(loras[1][0].resolve()), 0.5)]  # fmt: skip
    assert "<lora:kohya:0.8> <lora:diffusers:0.5>" in with_loras.info["parameters"]
    again = made("again", "--from", with_loras.filename)
    assert again.tobytes() == with_loras.tobytes()
