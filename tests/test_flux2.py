"""The FLUX.2 transformer: parity with diffusers, the official presets' sizes and keys, loading its files."""

import pytest
import torch

from minflux.files.load import load_flux, save_flux
from minflux.files.weights import WeightsError, save_atomic
from minflux.flux2 import Flux2
from minflux.model import Flux
from minflux.presets import configs, spec_for
from tests.flux2_helpers import TINY2, TINY2_VARIANTS, diffusers_config, diffusers_flux2, diffusers_forward
from tests.flux2_helpers import flux2_inputs, tiny_flux2, to_diffusers
from tests.flux_helpers import TINY, flux_inputs, tiny_flux

# The official sizes, in parameters: no biases; [klein] has no guidance embedding.
OFFICIAL_COUNTS = {
    "flux2-dev": 32_223_281_152,
    "flux2-klein-4b": 3_875_544_576,
    "flux2-klein-9b": 9_078_581_248,
}


@pytest.mark.parametrize("variant", list(TINY2_VARIANTS))
def test_flux2_matches_diffusers_transformer_with_references(variant):
    params = TINY2_VARIANTS[variant]
    model = tiny_flux2(params)
    inputs = flux2_inputs(params, batch=2)  # a 4×6 target, then 4×4 and 2×6 references at t = 10, 20
    ref = diffusers_flux2(params, model.state_dict())
    with torch.no_grad():
        ours, theirs = model(**inputs), diffusers_forward(ref, inputs)
    assert ours.shape == (2, 24 + 16 + 12, params.in_channels)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5 * theirs.std().item(), f"{variant}: max|Δ| {err:.3g}, std {theirs.std():.3g}"


def test_flux2_output_depends_on_every_input():
    """The parity test above is only as strong as the inputs are used: each one must change the output."""
    model = tiny_flux2(TINY2)
    inputs = flux2_inputs(TINY2)
    with torch.no_grad():
        base = model(**inputs)
        for key in ("img", "img_ids", "txt", "txt_ids", "timesteps", "guidance"):
            changed = dict(inputs)
            changed[key] = inputs[key] + 0.5
            assert not torch.allclose(model(**changed), base), f"output does not depend on {key}"


def test_flux2_guidance_is_required_where_embedded():
    inputs = flux2_inputs(TINY2) | {"guidance": None}
    with pytest.raises(ValueError, match="guidance"):
        tiny_flux2(TINY2)(**inputs)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_flux2(TINY2)
    inputs = flux2_inputs(TINY2)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(**inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("name", [*OFFICIAL_COUNTS, "flux2-small"])
def test_presets_have_official_count_and_diffusers_keys_on_meta_device(name):
    from diffusers import Flux2Transformer2DModel

    params = configs[name].params
    with torch.device("meta"):
        model = Flux2(params)
        ref = Flux2Transformer2DModel(**diffusers_config(params))
    if name in OFFICIAL_COUNTS:
        assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name]
    ours = {k: tuple(t.shape) for k, t in to_diffusers(model.state_dict()).items()}
    assert ours == {k: tuple(t.shape) for k, t in ref.state_dict().items()}
    assert ("guidance_in.in_layer.weight" in model.state_dict()) == params.guidance_embed
    assert not any(k.endswith(".bias") for k in model.state_dict())


def test_spec_for_flux2_models():
    assert spec_for(Flux2(configs["flux2-small"].params)).name == "flux2-small"
    assert spec_for(tiny_flux2(TINY2)).name == "flux2-dev"  # no preset of its shapes: its kind's
    assert spec_for(tiny_flux2(TINY2_VARIANTS["klein"])).num_steps == 4


def test_official_and_diffusers_layouts_load_as_flux2(tmp_path):
    model = tiny_flux2(TINY2)
    inputs = flux2_inputs(TINY2)
    with torch.no_grad():
        expected = model(**inputs)
    prefixed = {f"model.diffusion_model.{k}": t for k, t in model.state_dict().items()}  # a ComfyUI checkpoint
    save_atomic(prefixed, tmp_path / "flux2-tiny.safetensors")
    diffusers_flux2(TINY2, model.state_dict()).save_pretrained(tmp_path / "repo" / "transformer")

    for path in (tmp_path / "flux2-tiny.safetensors", tmp_path / "repo" / "transformer", tmp_path / "repo"):
        loaded = load_flux(path)
        assert isinstance(loaded, Flux2) and loaded.params == TINY2, path
        with torch.no_grad():
            assert torch.equal(loaded(**inputs), expected), path


def test_flux2_saved_by_minflux_reloads_with_its_rope_split(tmp_path):
    params = configs["flux2-small"].params  # head dim 64
    save_flux(tiny_flux2(params), tmp_path / "small.safetensors", variant="flux2-small")
    loaded = load_flux(tmp_path / "small.safetensors")
    assert isinstance(loaded, Flux2) and loaded.params == params and loaded.variant == "flux2-small"
    with pytest.raises(WeightsError, match="not a FLUX.2 preset"):
        load_flux(tmp_path / "small.safetensors", name="flux-small")


def test_flux1_file_still_loads_as_flux(tmp_path):
    model = tiny_flux(TINY)
    save_flux(model, tmp_path / "flux1.safetensors")
    loaded = load_flux(tmp_path / "flux1.safetensors")
    assert type(loaded) is Flux and loaded.params == TINY
    inputs = flux_inputs(TINY)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_flux2_files_load_as_stored_or_upcast(tmp_path, stored):
    """A bf16 file stays bf16, an fp8 one (a storage format) becomes bf16 with its values kept exactly, and
    dtype=float32 upcasts; the outputs differ from the fp32 model's by the stored dtype's rounding alone."""
    model = tiny_flux2(TINY2)
    low = {k: t.to(stored) for k, t in model.state_dict().items()}
    save_atomic(low, tmp_path / "flux2-low.safetensors")
    kept = load_flux(tmp_path / "flux2-low.safetensors")
    assert isinstance(kept, Flux2) and {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    for key, t in kept.state_dict().items():
        assert torch.equal(t, low[key].to(torch.bfloat16)), key  # bf16 holds every fp8 value exactly
    upcast = load_flux(tmp_path / "flux2-low.safetensors", dtype=torch.float32)
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    inputs = flux2_inputs(TINY2)
    with torch.no_grad():
        reference, got = model(**inputs), upcast(**inputs)
    err = ((got - reference).abs().max() / reference.std()).item()
    assert 0 < err < {torch.bfloat16: 0.05, torch.float8_e4m3fn: 0.5}[stored]  # the rounding is there, and bounded
