"""The transformer: parity with diffusers, the official presets' sizes and keys, the attention paths."""

import pytest
import torch

from minflux.attention import AttentionMaps, attention_backend
from minflux.presets import configs
from minflux.model import Flux
from tests.flux_helpers import TINY, TINY_VARIANTS, diffusers_flux, diffusers_forward, flux_inputs, tiny_flux

# The official sizes: flux1-dev.safetensors holds 11,901,408,320 parameters in 780 tensors; schnell has
# no guidance embedding (2 Linear layers fewer); Fill's img_in takes 384 channels instead of 64.
OFFICIAL_COUNTS = {
    "flux-dev": (11_901_408_320, 780),
    "flux-schnell": (11_901_408_320 - (256 * 3072 + 3072) - (3072 * 3072 + 3072), 776),
    "flux-dev-fill": (11_901_408_320 + 320 * 3072, 780),
    "flux-dev-kontext": (11_901_408_320, 780),
}


def official_keys(depth=19, depth_single=38, guidance=True) -> set[str]:
    """The key set of flux1-dev.safetensors, written out independently of minflux's module tree."""
    linear = lambda name: {f"{name}.weight", f"{name}.bias"}  # noqa: E731
    keys = linear("img_in") | linear("txt_in") | linear("final_layer.linear")
    keys |= linear("final_layer.adaLN_modulation.1")
    for emb in ["time_in", "vector_in"] + (["guidance_in"] if guidance else []):
        keys |= linear(f"{emb}.in_layer") | linear(f"{emb}.out_layer")
    for i in range(depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            keys |= linear(f"{b}_mod.lin") | linear(f"{b}_attn.qkv") | linear(f"{b}_attn.proj")
            keys |= linear(f"{b}_mlp.0") | linear(f"{b}_mlp.2")
            keys |= {f"{b}_attn.norm.query_norm.scale", f"{b}_attn.norm.key_norm.scale"}
    for i in range(depth_single):
        b = f"single_blocks.{i}"
        keys |= linear(f"{b}.linear1") | linear(f"{b}.linear2") | linear(f"{b}.modulation.lin")
        keys |= {f"{b}.norm.query_norm.scale", f"{b}.norm.key_norm.scale"}
    return keys


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_full_presets_have_official_parameter_count_and_keys_on_meta_device(name):
    with torch.device("meta"):
        model = Flux(configs[name].params)
    count = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    assert (count, len(keys)) == OFFICIAL_COUNTS[name]
    assert keys == official_keys(guidance=configs[name].params.guidance_embed)
    assert all(p.device.type == "meta" for p in model.parameters())  # no memory: shapes only


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_flux_matches_diffusers_transformer(variant):
    params = TINY_VARIANTS[variant]
    model = tiny_flux(params)
    inputs = flux_inputs(params, batch=2)
    ref = diffusers_flux(params, model.state_dict())
    with torch.no_grad():
        ours, theirs = model(**inputs), diffusers_forward(ref, inputs)
    assert ours.shape == (2, inputs["img"].shape[1], params.out_channels)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * theirs.std().item(), f"{variant}: max|Δ| {err:.3g}, std {theirs.std():.3g}"


def test_flux_output_depends_on_every_input():
    """The parity test above is only as strong as the inputs are used: each one must change the output."""
    model = tiny_flux(TINY)
    inputs = flux_inputs(TINY)
    with torch.no_grad():
        base = model(**inputs)
        for key in ("img", "img_ids", "txt", "timesteps", "y", "guidance"):
            changed = dict(inputs)
            changed[key] = inputs[key] + 0.5
            assert not torch.allclose(model(**changed), base), f"output does not depend on {key}"


def test_explicit_attention_matches_sdpa():
    model = tiny_flux(TINY)
    inputs = flux_inputs(TINY)
    with torch.no_grad():
        fused = model(**inputs)
        with attention_backend("explicit"):
            explicit = model(**inputs)
    assert (fused - explicit).abs().max() <= 1e-5 * fused.std()


def test_attention_maps_are_recorded_per_block_and_sum_to_one():
    model = tiny_flux(TINY)
    inputs = flux_inputs(TINY, batch=1, h=4, w=4, txt_len=5)
    with torch.no_grad(), AttentionMaps() as maps:
        model(**inputs)
    assert len(maps.probs) == TINY.depth + TINY.depth_single_blocks
    L = 5 + 4  # text tokens + 2×2 image tokens
    assert maps.probs[0].shape == (1, TINY.num_heads, L, L)
    assert torch.allclose(maps.probs[-1].sum(-1), torch.ones(1, TINY.num_heads, L), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = flux_inputs(TINY)
    grads = []
    for checkpointing in (False, True):
        model = tiny_flux(TINY).train()
        model.gradient_checkpointing = checkpointing
        model(**inputs).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_guidance_is_required_by_guidance_distilled_models():
    inputs = flux_inputs(TINY)
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        tiny_flux(TINY)(**inputs)


def test_params_with_inconsistent_rope_axes_are_rejected():
    from dataclasses import replace

    with pytest.raises(ValueError, match="axes_dim"):
        Flux(replace(TINY, axes_dim=[8, 8, 8]))
