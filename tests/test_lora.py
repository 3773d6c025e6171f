"""LoRA: injection is the identity, merging is exact, and every file format loads to the same function.

diffusers + PEFT is the oracle: a LoRA saved in its layout, or converted by its own kohya converter, must give
the same output in diffusers' FluxTransformer2DModel as in minflux.
"""

import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from minflux.files.lora_files import load_lora, read_lora, save_lora
from minflux.lora import LoRALinear, inject_lora, linear_layers, lora_layers, lora_parameters, merge_lora, unload_lora
from minflux.model import Flux
from minflux.files.weights import WeightsError, read_metadata
from tests.flux_helpers import TINY, diffusers_flux, diffusers_forward, flux_inputs, save_peft_lora, tiny_flux

H = TINY.hidden_size  # 128
MLP = int(H * TINY.mlp_ratio)  # 512


def randomize_lora_(model, seed=0, size=0.3):
    """Random, non-zero down and up on every LoRA layer (so each one changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_down.weight, layer.lora_up.weight):
                p.copy_(size * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def delta(model, name):
    """The change to a layer's weight its LoRA makes, [out, in]."""
    return model.get_submodule(name).delta_weight()


# --- LoRALinear, inject, merge, unload ---------------------------------------------------------------------------


def test_inject_is_identity_then_merge_matches_unmerged_and_leaves_official_keys():
    model, inputs = tiny_flux(), flux_inputs(TINY)
    before = run(model, inputs)
    params = inject_lora(model, rank=4, alpha=8.0)
    # default targets: every linear layer of the blocks, 10 per double block and 3 per single block
    assert len(lora_layers(model)) == 10 * TINY.depth + 3 * TINY.depth_single_blocks
    assert len(params) == 2 * len(lora_layers(model)) and all(p.requires_grad for p in params)
    assert torch.equal(run(model, inputs), before), "up = 0 at injection: the output must not change"

    randomize_lora_(model)
    unmerged = run(model, inputs)
    assert (unmerged - before).abs().max() > 0.1 * before.std(), "random LoRA weights must change the output"
    merge_lora(model)
    merged = run(model, inputs)
    rel = ((merged - unmerged).abs().max() / unmerged.abs().max()).item()
    assert rel <= 1e-5, f"merged vs unmerged: max|Δ| / max = {rel:.3g}"
    assert list(model.state_dict()) == list(Flux(TINY).state_dict()), "merged model: plain official keys only"
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_lora_linear_keeps_the_base_parameters_and_official_keys():
    base = torch.nn.Linear(6, 9)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(layer.state_dict()) == {"weight", "bias", "lora_down.weight", "lora_up.weight", "alpha"}
    randomize_lora_(torch.nn.Sequential(layer))
    layer.scale = 0.5
    x = randn(3, 6)
    expected = base(x) + 4.0 / 2 * 0.5 * x @ layer.lora_down.weight.T @ layer.lora_up.weight.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.merge()(x), expected, atol=1e-6)


def test_inject_targets_named_groups_patterns_and_any_module():
    model = tiny_flux()
    inject_lora(model, rank=2, targets="attn")
    assert sorted(lora_layers(model)) == sorted(
        f"double_blocks.{i}.{s}_attn.{p}" for i in range(TINY.depth) for s in ("img", "txt") for p in ("qkv", "proj")
    )
    inject_lora(model, rank=2, targets=["single_blocks.1.linear*", "final"])
    assert {"single_blocks.1.linear1", "single_blocks.1.linear2", "final_layer.adaLN_modulation.1"} <= set(
        lora_layers(model)
    )
    with pytest.raises(ValueError, match="no linear layer"):
        inject_lora(model, rank=2, targets="no_such_layer")

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))  # not a Flux
    params = inject_lora(mlp, rank=2, targets="*")
    assert len(params) == 4 and set(lora_layers(mlp)) == {"0", "2"}


def test_unload_restores_plain_layers_and_the_base_output():
    model, inputs = tiny_flux(), flux_inputs(TINY)
    before = run(model, inputs)
    inject_lora(model, rank=3, targets="all")
    randomize_lora_(model)
    assert not torch.equal(run(model, inputs), before)
    unload_lora(model)
    assert torch.equal(run(model, inputs), before)
    assert list(model.state_dict()) == list(Flux(TINY).state_dict())


# --- round trips and diffusers parity --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["minflux", "kohya", "diffusers", "bfl"])
def test_save_load_round_trip_gives_identical_outputs(fmt, tmp_path):
    src, inputs = tiny_flux(), flux_inputs(TINY)
    inject_lora(src, rank=4, alpha=2.0, targets="all")  # every layer, incl. final_layer (diffusers swaps its halves)
    randomize_lora_(src)
    path = save_lora(src, tmp_path / f"lora_{fmt}.safetensors", format=fmt)
    assert read_metadata(path) == {
        "minflux.lora_format": fmt,
        "minflux.lora_rank": "4",
        "minflux.lora_alpha": "2",
        "minflux.in_channels": "64",
    }  # what a Fill model refuses (test_train_kontext.py)

    dst = tiny_flux()  # the same base weights, no LoRA yet
    loaded = load_lora(dst, path)
    assert sorted(loaded) == sorted(lora_layers(src))
    ours, theirs = run(dst, inputs), run(src, inputs)
    if fmt in ("diffusers", "bfl"):  # alpha / rank was folded into lora_B: equal up to rounding
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    else:
        assert torch.equal(ours, theirs)


def test_diffusers_format_loads_into_diffusers_with_the_same_output(tmp_path):
    model, inputs = tiny_flux(), flux_inputs(TINY)
    ref = diffusers_flux(TINY, model.state_dict())
    inject_lora(model, rank=4, alpha=8.0, targets="all")  # qkv split 3 ways, linear1 split 4 ways, norm_out swapped
    randomize_lora_(model, seed=1)
    path = save_lora(model, tmp_path / "lora.safetensors", format="diffusers")

    ref.load_lora_adapter(load_file(path), adapter_name="minflux", prefix="transformer")
    peft_layers = [m for m in ref.modules() if hasattr(m, "lora_A") and "minflux" in m.lora_A]
    extra = 2 * (2 * TINY.depth) + 3 * TINY.depth_single_blocks  # each qkv becomes 3 layers, each linear1 4
    assert len(peft_layers) == len(lora_layers(model)) + extra
    ours, theirs = run(model, inputs), diffusers_forward(ref, inputs).detach()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * theirs.std().item(), f"max|Δ| {err:.3g}, std {theirs.std():.3g}"


def test_diffusers_lora_with_alpha_other_than_rank_loads_at_the_strength_diffusers_reloads_it(tmp_path):
    """diffusers keeps a PEFT LoRA's alpha in the file's metadata (save_lora_weights(...,
    transformer_lora_adapter_metadata=LoraConfig.to_dict())). Reading the tensors alone: max|Δ|/std 1.45 here."""
    from diffusers import FluxPipeline
    from peft import LoraConfig

    model, inputs = tiny_flux(), flux_inputs(TINY)
    trained = diffusers_flux(TINY, model.state_dict())
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,  # random lora_B: every layer changes the output
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_mlp", "norm.linear"],
        rank_pattern={"single_transformer_blocks.1.attn.to_q": 2},  # other ranks and alphas by name
        alpha_pattern={"transformer_blocks.0.attn.to_k": 1.5, "single_transformer_blocks.1.attn.to_q": 6},
    )
    path = save_peft_lora(trained, config, FluxPipeline, tmp_path)

    reloaded = diffusers_flux(TINY, model.state_dict())  # what FluxPipeline.load_lora_weights does with the file
    state_dict, _, metadata = FluxPipeline.lora_state_dict(path, return_alphas=True, return_lora_metadata=True)
    reloaded.load_lora_adapter(state_dict, prefix="transformer", metadata=metadata, adapter_name="file")
    theirs = diffusers_forward(reloaded, inputs).detach()
    base = diffusers_forward(diffusers_flux(TINY, model.state_dict()), inputs).detach()
    assert (theirs - base).abs().max() > theirs.std(), "the LoRA must change the output for the check to mean much"
    assert torch.equal(theirs, diffusers_forward(trained, inputs).detach())

    load_lora(model, path)
    assert model.get_submodule("double_blocks.1.img_attn.proj").alpha.item() == 8.0  # to_out.0: lora_alpha, rank 4
    err = (run(model, inputs) - theirs).abs().max().item()
    assert err <= 1e-5 * theirs.std().item(), f"max|Δ| {err:.3g}, std {theirs.std():.3g}"


def test_peft_adapter_folder_with_adapter_config_json_and_rslora(tmp_path):
    """PEFT's save_pretrained writes the alpha in adapter_config.json beside the weights (0.61 max|Δ|/std without)."""
    from peft import LoraConfig, get_peft_model

    model, inputs = tiny_flux(), flux_inputs(TINY)
    ref = diffusers_flux(TINY, model.state_dict())
    config = LoraConfig(
        r=4,
        lora_alpha=3,
        use_rslora=True,
        init_lora_weights=False,  # scale alpha / √r
        target_modules=["to_q", "to_add_out", "proj_out"],
    )
    torch.manual_seed(1)
    get_peft_model(ref, config).save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors + adapter_config.json
    theirs = diffusers_forward(ref, inputs).detach()
    assert "lora_adapter_metadata" not in read_metadata(tmp_path / "adapter" / "adapter_model.safetensors")
    load_lora(model, tmp_path / "adapter" / "adapter_model.safetensors")
    err = (run(model, inputs) - theirs).abs().max().item()
    assert err <= 1e-5 * theirs.std().item(), f"max|Δ| {err:.3g}, std {theirs.std():.3g}"


def test_kohya_file_converted_by_diffusers_matches_minflux_loading_it(tmp_path):
    from diffusers import FluxPipeline

    model, inputs = tiny_flux(), flux_inputs(TINY)
    ref = diffusers_flux(TINY, model.state_dict())
    # linear1: diffusers' kohya converter hard-codes FLUX.1's 3072-wide split (checked at full width below);
    # final_layer: that converter ignores alpha there ("TODO: alphas"), so it is left out of this comparison.
    targets = ["attn", "mlp", "mod", "embed", "single_blocks.*.linear2"]
    inject_lora(model, rank=6, alpha=3.0, targets=targets)
    randomize_lora_(model, seed=2)
    # one qkv block-diagonal, as sd-scripts saves a split_qkv LoRA: diffusers detects it and splits the downs
    up = model.get_submodule("double_blocks.0.img_attn.qkv").lora_up.weight  # [3h, 6]
    with torch.no_grad():
        up.mul_(torch.block_diag(*[torch.ones(H, 2)] * 3))
    path = save_lora(model, tmp_path / "kohya.safetensors", format="kohya")
    assert all(k.startswith("lora_unet_") for k in load_file(path))

    fresh = tiny_flux()
    load_lora(fresh, path)  # minflux reads the kohya file directly
    converted = FluxPipeline.lora_state_dict(load_file(path))  # the route FluxPipeline.load_lora_weights takes
    # diffusers 0.42's converter leaves the embedders' keys (x_embedder, time_text_embed...) without the
    # "transformer." prefix, so its own loader drops them; put the prefix back to compare every layer
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    ref.load_lora_adapter(converted, adapter_name="kohya", prefix="transformer")
    ours, theirs = run(fresh, inputs), diffusers_forward(ref, inputs).detach()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * theirs.std().item(), f"max|Δ| {err:.3g}, std {theirs.std():.3g}"


def test_kohya_file_is_read_by_comfyui_key_for_key_to_the_same_output(tmp_path):
    from tests.other_tools import comfyui_apply, comfyui_key_map, comfyui_load_lora

    model, inputs = tiny_flux(), flux_inputs(TINY)
    base = model.state_dict()
    inject_lora(model, rank=4, alpha=3.0, targets="all")  # the blocks and every layer outside them
    randomize_lora_(model, seed=3)
    with pytest.warns(UserWarning, match="10 LoRA layer.* outside the double and single blocks.*diffusers"):
        path = save_lora(model, tmp_path / "lora.safetensors")  # the default format: kohya
    lora = load_file(path)
    assert all(k.startswith("lora_unet_") for k in lora)
    patches, not_loaded = comfyui_load_lora(lora, comfyui_key_map(base))
    assert not_loaded == [] and len(patches) == len(lora_layers(model)) == len(lora) // 3  # down, up, alpha each
    comfy = Flux(TINY)
    comfy.load_state_dict(comfyui_apply(base, patches))
    ours = run(model, inputs)
    assert (ours - run(tiny_flux(), inputs)).abs().max() > 0.1 * ours.std(), "the LoRA must change the output"
    err = (run(comfy, inputs) - ours).abs().max().item()
    assert err <= 1e-5 * ours.std().item(), f"max|Δ| {err:.3g}"

    minflux_names = load_file(save_lora(model, tmp_path / "minflux.safetensors", format="minflux"))
    assert len(comfyui_load_lora(minflux_names, comfyui_key_map(base))[1]) == len(minflux_names)  # ComfyUI: none


def test_kohya_file_at_flux_width_loads_in_diffusers_every_layer_but_those_outside_the_blocks(tmp_path):
    """FLUX.1's width (diffusers' converter hard-codes 3072 to split linear1), 2 + 2 blocks, on the meta device:
    names and shapes only. FluxPipeline.load_lora_weights takes every layer of the default targets; of
    `--lora-targets all` it leaves out the 10 outside the blocks (its converter names them without "transformer.")."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    params = replace(
        TINY,
        hidden_size=3072,
        num_heads=24,
        axes_dim=[16, 56, 56],
        depth=2,
        depth_single_blocks=2,
        context_in_dim=4096,
        vec_in_dim=768,
    )
    with torch.device("meta"):
        reference = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=reference,
    )
    g = torch.Generator().manual_seed(0)
    for targets in (None, "all"):
        with torch.device("meta"):
            model = Flux(params)
        inject_lora(model, rank=2, alpha=1.0, targets=targets)
        for layer in lora_layers(model).values():  # real LoRA tensors on a meta model
            layer.lora_down.to_empty(device="cpu")
            layer.lora_up.to_empty(device="cpu")
            with torch.no_grad():
                for p in (layer.lora_down.weight, layer.lora_up.weight):
                    p.copy_(torch.randn(p.shape, generator=g))
            layer.alpha = torch.tensor(1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = save_lora(model, tmp_path / f"{targets}.safetensors")
        pipe.load_lora_weights(str(path), adapter_name=str(targets))
        layers = lora_layers(model)
        outside = [n for n in layers if not n.startswith(("double_blocks.", "single_blocks."))]
        split = (
            2 * 2 * 2 + 2 * 3
        )  # each qkv becomes to_q, to_k, to_v (+2); each linear1 to_q, to_k, to_v, proj_mlp (+3)
        loaded = [m for m in reference.modules() if hasattr(m, "lora_A") and str(targets) in m.lora_A]
        assert len(loaded) == len(layers) + split - len(outside), targets
        assert len(outside) == (10 if targets == "all" else 0)


def test_kohya_linear1_split_matches_diffusers_converter_at_full_width():
    from diffusers import FluxPipeline

    # names and shapes only: a FLUX.1-wide model on the meta device, one block of each kind
    params = replace(TINY, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        model = Flux(params)
    name = "lora_unet_single_blocks_0_linear1"
    sd = {
        f"{name}.lora_down.weight": randn(4, 3072, seed=1),
        f"{name}.lora_up.weight": randn(3 * 3072 + 12288, 4, seed=2),
        f"{name}.alpha": torch.tensor(2.0),
    }
    ours = read_lora(sd, model)["single_blocks.0.linear1"]
    converted = FluxPipeline.lora_state_dict(dict(sd))
    probe = randn(3072, 8, seed=3)  # compare ΔW @ probe: [21504, 8] instead of two 21504 × 3072 matrices
    prefix = "transformer.single_transformer_blocks.0."
    theirs = torch.cat([
        converted[f"{prefix}{n}.lora_B.weight"] @ (converted[f"{prefix}{n}.lora_A.weight"] @ probe)
        for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ])  # fmt: skip
    mine = ours.alpha / ours.down.shape[0] * ours.up @ (ours.down @ probe)
    assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


# --- other layouts, several LoRAs, errors ------------------------------------------------------------------------


PROJ = "double_blocks.0.img_attn.proj"


@pytest.mark.parametrize(
    "down_key, layer, swapped",
    [
        ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", PROJ, False),  # kohya sd-scripts
        ("diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight", PROJ, False),  # ComfyUI
        ("double_blocks.0.img_attn.proj.lora_A.weight", PROJ, False),  # BFL
        ("base_model.model.double_blocks.0.img_attn.proj.lora_A.weight", PROJ, False),  # PEFT-wrapped official
        ("transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight", PROJ, False),  # diffusers
        ("transformer_blocks.0.attn.to_out.0.lora_A.weight", PROJ, False),  # diffusers, no prefix
        ("transformer.transformer_blocks.0.attn.to_out.0.lora.down.weight", PROJ, False),  # older diffusers
        ("lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight", PROJ, False),  # kohya-style diffusers
        ("double_blocks.0.processor.proj_lora1.down.weight", PROJ, False),  # XLabs
        ("transformer.transformer_blocks.1.norm1_context.linear.lora_A.weight", "double_blocks.1.txt_mod.lin", False),
        ("transformer.single_transformer_blocks.1.norm.linear.lora_A.weight", "single_blocks.1.modulation.lin", False),
        ("transformer.norm_out.linear.lora_A.weight", "final_layer.adaLN_modulation.1", True),
    ],
)
def test_every_key_variant_names_the_right_layer(down_key, layer, swapped):
    model = tiny_flux()
    base = model.get_submodule(layer)
    up_key = down_key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    up_key = up_key.replace("lora.down", "lora.up").replace("proj_lora1.down", "proj_lora1.up")
    down, up = randn(2, base.in_features, seed=1), randn(base.out_features, 2, seed=2)
    assert load_lora(model, {down_key: down, up_key: up}) == [layer]
    half = base.out_features // 2
    expected = torch.cat([up[half:], up[:half]]) @ down if swapped else up @ down  # norm_out: (scale, shift)
    assert torch.allclose(delta(model, layer), expected, atol=1e-6)


def test_xlabs_file_loads_to_the_expected_deltas():
    model = tiny_flux()
    r = 3
    down, up = randn(r, H, seed=1), randn(3 * H, r, seed=2)
    sd = {  # x-flux: lora1 = image stream, lora2 = text stream; no alpha (factor 1)
        "double_blocks.0.processor.qkv_lora1.down.weight": down,
        "double_blocks.0.processor.qkv_lora1.up.weight": up,
        "double_blocks.1.processor.proj_lora2.down.weight": down,
        "double_blocks.1.processor.proj_lora2.up.weight": up[:H],
        "single_blocks.1.processor.qkv_lora.down.weight": down,  # q, k, v rows of linear1, not the mlp's
        "single_blocks.1.processor.qkv_lora.up.weight": up,
    }
    assert sorted(load_lora(model, sd)) == [
        "double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.proj", "single_blocks.1.linear1"
    ]  # fmt: skip
    assert torch.allclose(delta(model, "double_blocks.0.img_attn.qkv"), up @ down, atol=1e-6)
    assert torch.allclose(delta(model, "double_blocks.1.txt_attn.proj"), up[:H] @ down, atol=1e-6)
    d = delta(model, "single_blocks.1.linear1")  # [3h + mlp, h]
    assert torch.allclose(d[: 3 * H], up @ down, atol=1e-6) and not d[3 * H :].any()


def test_bfl_layout_loads_lora_a_b_and_bias_with_scale():
    model = tiny_flux()
    base = model.get_submodule("double_blocks.1.img_mlp.0")
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    A, B, bias = randn(4, H, seed=1), randn(MLP, 4, seed=2), randn(MLP, seed=3)
    sd = {  # black-forest-labs/flux LinearLora: y = base(x) + lora_B(lora_A(x)) · scale, lora_B has a bias
        "double_blocks.1.img_mlp.0.lora_A.weight": A,
        "double_blocks.1.img_mlp.0.lora_B.weight": B,
        "double_blocks.1.img_mlp.0.lora_B.bias": bias,
    }
    load_lora(model, sd, scale=0.5)
    merged = model.get_submodule("double_blocks.1.img_mlp.0").merge()
    assert torch.allclose(merged.weight - w0, 0.5 * B @ A, atol=1e-5)
    assert torch.allclose(merged.bias - b0, 0.5 * bias, atol=1e-6)


def test_split_qkv_loras_with_different_downs_are_fused_exactly():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model = tiny_flux()
    ranks, alphas = {"q": 2, "k": 3, "v": 4, "mlp": 5}, {"q": 1.0, "k": 6.0, "v": 4.0, "mlp": 2.5}
    rows = {"q": H, "k": H, "v": H, "mlp": MLP}
    names = {"q": "attn_to_q", "k": "attn_to_k", "v": "attn_to_v", "mlp": "proj_mlp"}
    down = {x: randn(ranks[x], H, seed=i) for i, x in enumerate(ranks)}
    up = {x: randn(rows[x], ranks[x], seed=10 + i) for i, x in enumerate(ranks)}
    sd = {}  # diffusers' layer names written kohya-style, q, k, v (and mlp) trained as separate layers
    for block, parts in (("transformer_blocks_0", "qkv"), ("single_transformer_blocks_1", ("q", "k", "v", "mlp"))):
        for x in parts:
            key = f"lora_transformer_{block}_{names[x]}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down[x], up[x]
            sd[f"{key}.alpha"] = torch.tensor(alphas[x])
    # the same split as PEFT keys (no alpha: factor 1) for the text stream of block 1
    for x, name in (("q", "add_q_proj"), ("k", "add_k_proj"), ("v", "add_v_proj")):
        sd |= {
            f"transformer.transformer_blocks.1.attn.{name}.lora_A.weight": down[x],
            f"transformer.transformer_blocks.1.attn.{name}.lora_B.weight": up[x],
        }

    loras = read_lora(sd, model)
    for layer, parts, with_alpha in (
        ("double_blocks.0.img_attn.qkv", "qkv", True),
        ("single_blocks.1.linear1", ("q", "k", "v", "mlp"), True),
        ("double_blocks.1.txt_attn.qkv", "qkv", False),
    ):
        w = loras[layer]
        assert w.down.shape[0] == sum(ranks[x] for x in parts), "rank grows to the sum: the product stays exact"
        expected = torch.cat([(alphas[x] / ranks[x] if with_alpha else 1.0) * up[x] @ down[x] for x in parts])
        assert torch.allclose(w.alpha / w.down.shape[0] * w.up @ w.down, expected, atol=1e-5), layer

    # diffusers' own converter reads the kohya-style split the same way
    kohya_only = {k: v for k, v in sd.items() if k.startswith("lora_transformer_transformer_blocks_0_")}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya_only))
    prefix = "transformer.transformer_blocks.0.attn."
    theirs = torch.cat(
        [converted[f"{prefix}to_{x}.lora_B.weight"] @ converted[f"{prefix}to_{x}.lora_A.weight"] for x in "qkv"]
    )
    w = loras["double_blocks.0.img_attn.qkv"]
    assert torch.allclose(w.alpha / w.down.shape[0] * w.up @ w.down, theirs, atol=1e-5)


def test_second_lora_stacks_onto_the_first_with_its_own_scale(tmp_path):
    model, inputs = tiny_flux(), flux_inputs(TINY)
    loras = []
    for seed in (1, 2):
        src = tiny_flux()
        inject_lora(src, rank=2 + seed, alpha=float(seed), targets=["attn", "single"])
        randomize_lora_(src, seed=seed)
        loras.append((save_lora(src, tmp_path / f"lora{seed}.safetensors"), src))
    load_lora(model, loras[0][0], scale=0.5)
    load_lora(model, loras[1][0], scale=2.0)
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"):
        expected = 0.5 * delta(loras[0][1], name) + 2.0 * delta(loras[1][1], name)
        assert torch.allclose(delta(model, name), expected, atol=1e-5)
        assert model.get_submodule(name).rank == 3 + 4
    assert len(lora_parameters(model)) == 2 * len(lora_layers(model))
    before = run(model, inputs)
    merge_lora(model)
    assert (run(model, inputs) - before).abs().max() <= 1e-5 * before.abs().max()


def test_unmatched_keys_are_listed_in_a_warning():
    model = tiny_flux()
    sd = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": randn(2, H),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": randn(H, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": randn(2, 768),  # a CLIP LoRA
        "double_blocks.0.img_attn.norm.query_norm.scale": randn(32),  # a BFL Control LoRA's full tensor
    }
    with pytest.warns(UserWarning, match="2 key.*lora_te1_text_model_encoder_layers_0_mlp_fc1.*query_norm.scale"):
        assert load_lora(model, sd) == ["double_blocks.0.img_attn.proj"]


def test_lora_for_another_architecture_raises_weights_error_naming_file_and_key(tmp_path):
    model = tiny_flux()
    sdxl = tmp_path / "sdxl_lora.safetensors"  # names of no FLUX layer
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": randn(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": randn(320, 4),
        },
        sdxl,
    )
    with pytest.raises(WeightsError, match="sdxl_lora.safetensors.*another architecture.*lora_unet_down_blocks_0"):
        load_lora(model, sdxl)

    wide = tmp_path / "flux_dev_lora.safetensors"  # FLUX names, FLUX.1-dev widths: shapes do not fit TINY
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": randn(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": randn(9216, 4),
        },
        wide,
    )
    with pytest.raises(WeightsError, match="flux_dev_lora.safetensors: key 'lora_unet_double_blocks_0_img_attn_qkv"):
        load_lora(model, wide)
    assert not lora_layers(model), "a failed load leaves the model untouched"
    assert set(linear_layers(model)) == set(linear_layers(Flux(TINY)))
