"""load_flux: official files, diffusers folders, stored dtypes, and clear errors for bad input."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from minflux.presets import configs
from minflux.files.keys import diffusers_to_flux, flux_to_diffusers
from minflux.files.load import load_flux, save_flux, variant_name
from minflux.model import Flux
from minflux.files.weights import WeightsError, load_into, read_state_dict
from tests.flux_helpers import TINY, TINY_VARIANTS, diffusers_flux, flux_inputs, tiny_flux

# head dim 128, so a file without metadata is read with the official RoPE split 16/56/56
HEAD128 = replace(TINY, hidden_size=256, num_heads=2, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1)


def outputs(model, params=TINY):
    with torch.no_grad():
        return model(**flux_inputs(params))


@pytest.mark.parametrize("variant", ["dev", "schnell", "fill"])
def test_official_file_and_diffusers_folder_load_to_identical_models(tmp_path, variant):
    params = TINY_VARIANTS[variant]
    model = tiny_flux(params)
    save_flux(model, tmp_path / "flux1-tiny.safetensors")
    diffusers_flux(params, model.state_dict()).save_pretrained(
        tmp_path / "repo" / "transformer", max_shard_size="300KB"
    )
    assert (tmp_path / "repo" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()

    official = load_flux(tmp_path / "flux1-tiny.safetensors")
    from_diffusers = load_flux(tmp_path / "repo")  # a repo root: transformer/ is found
    assert official.params == from_diffusers.params == params
    assert torch.equal(outputs(official, params), outputs(from_diffusers, params))
    assert torch.equal(outputs(official, params), outputs(model, params))


def test_diffusers_conversion_round_trips_every_tensor():
    sd = tiny_flux(TINY).state_dict()
    back = diffusers_to_flux(flux_to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_file_without_metadata_gets_params_from_shapes_and_official_rope_split(tmp_path):
    model = tiny_flux(HEAD128)
    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    loaded = load_flux(tmp_path / "plain.safetensors")
    assert loaded.params == HEAD128
    assert torch.equal(outputs(loaded, HEAD128), outputs(model, HEAD128))


def test_comfyui_prefixed_checkpoint_with_other_models_inside_loads_the_transformer(tmp_path):
    model = tiny_flux(HEAD128)
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "comfy.safetensors")
    assert torch.equal(outputs(load_flux(tmp_path / "comfy.safetensors"), HEAD128), outputs(model, HEAD128))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_low_precision_files_load_and_upcast(tmp_path, stored):
    model = tiny_flux(TINY)
    save_flux(model.to(stored) if stored != torch.float8_e4m3fn else _to_fp8(model), tmp_path / "w.safetensors")
    kept = load_flux(tmp_path / "w.safetensors")
    assert next(kept.parameters()).dtype == (torch.bfloat16 if stored == torch.float8_e4m3fn else stored)
    upcast = load_flux(tmp_path / "w.safetensors", dtype=torch.float32)
    assert next(upcast.parameters()).dtype == torch.float32
    reference = outputs(tiny_flux(TINY))
    err = (outputs(upcast) - reference).abs().max() / reference.std()
    assert err < {torch.bfloat16: 0.05, torch.float16: 0.01, torch.float8_e4m3fn: 0.5}[stored]
    assert err > 0  # the rounding of the stored dtype is really there


def _to_fp8(model):
    class Stub(torch.nn.Module):  # save_flux needs .params and .state_dict()
        params = model.params

        def state_dict(self):
            return {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}

    return Stub()


def test_weights_are_assigned_not_copied(tmp_path):
    """One copy in memory: the loaded tensors become the model's parameters."""
    sd = tiny_flux(TINY).state_dict()
    with torch.device("meta"):
        model = Flux(TINY)
    load_into(model, sd, "test")
    assert model.img_in.weight.data_ptr() == sd["img_in.weight"].data_ptr()


def test_variant_is_read_from_the_weights():
    assert variant_name(configs["flux-dev"].params, _path("flux1-dev.safetensors")) == "flux-dev"
    assert variant_name(configs["flux-dev"].params, _path("flux1-kontext-dev.safetensors")) == "flux-dev-kontext"
    assert variant_name(configs["flux-schnell"].params, _path("x.safetensors")) == "flux-schnell"
    assert variant_name(configs["flux-dev-fill"].params, _path("x.safetensors")) == "flux-dev-fill"
    assert variant_name(TINY, _path("x.safetensors")) is None


def _path(name):
    from pathlib import Path

    return Path(name)


def test_saved_small_preset_reloads_with_its_variant_name(tmp_path):
    model = tiny_flux(configs["flux-small"].params)
    save_flux(model, tmp_path / "small.safetensors", variant="flux-small")
    assert load_flux(tmp_path / "small.safetensors").variant == "flux-small"
    assert load_flux(tmp_path / "small.safetensors", name="flux-small").params == configs["flux-small"].params


# --- bad input -----------------------------------------------------------------------------------------


def test_truncated_file_is_reported_with_its_name(tmp_path):
    save_flux(tiny_flux(TINY), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"w\.safetensors.*(truncated|cannot be read)"):
        load_flux(tmp_path / "w.safetensors")


def test_non_safetensors_file_is_reported(tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are not weights")
    with pytest.raises(WeightsError, match=r"notes\.safetensors: not a readable \.safetensors file"):
        load_flux(tmp_path / "notes.safetensors")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_flux(tmp_path / "absent.safetensors")


def test_file_of_another_model_is_reported(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "ae.safetensors")
    with pytest.raises(WeightsError, match=r"ae\.safetensors: not a FLUX transformer"):
        load_flux(tmp_path / "ae.safetensors")


def test_missing_key_is_named(tmp_path):
    sd = tiny_flux(TINY).state_dict()
    del sd["single_blocks.1.linear2.bias"]
    save_file(sd, tmp_path / "w.safetensors", metadata={"minflux.params": json.dumps({"axes_dim": TINY.axes_dim})})
    with pytest.raises(WeightsError, match=r"(?s)w\.safetensors.*missing 1 key.*single_blocks\.1\.linear2\.bias"):
        load_flux(tmp_path / "w.safetensors")


def test_unexpected_key_is_named(tmp_path):
    sd = tiny_flux(TINY).state_dict()
    sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "w.safetensors", metadata={"minflux.params": json.dumps({"axes_dim": TINY.axes_dim})})
    with pytest.raises(WeightsError, match=r"(?s)unexpected 1 key.*double_blocks\.0\.img_attn\.extra\.weight"):
        load_flux(tmp_path / "w.safetensors")


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    sd = tiny_flux(TINY).state_dict()
    sd["double_blocks.1.txt_mlp.2.weight"] = torch.zeros(128, 500)
    save_file(sd, tmp_path / "w.safetensors", metadata={"minflux.params": json.dumps({"axes_dim": TINY.axes_dim})})
    with pytest.raises(
        WeightsError, match=r"'double_blocks\.1\.txt_mlp\.2\.weight' has shape \[128, 500\].*\[128, 512\]"
    ):
        load_flux(tmp_path / "w.safetensors")


def test_weights_that_do_not_fit_the_named_variant_are_reported(tmp_path):
    save_flux(tiny_flux(configs["flux-small"].params), tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"'img_in\.weight' has shape \[256, 64\], the FLUX transformer \(flux-small-fill\) expects \[256, 384\]",
    ):
        load_flux(tmp_path / "w.safetensors", name="flux-small-fill")


def test_unknown_variant_name_lists_the_known_ones(tmp_path):
    save_flux(tiny_flux(TINY), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"unknown variant 'flux-pro'.*flux-dev, flux-schnell"):
        load_flux(tmp_path / "w.safetensors", name="flux-pro")


def test_unknown_head_split_without_metadata_asks_for_a_name(tmp_path):
    save_file(tiny_flux(TINY).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"head dim 32 .*pass name="):
        load_flux(tmp_path / "w.safetensors")


def test_pickled_checkpoints_are_read_weights_only(tmp_path):
    model = tiny_flux(HEAD128)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert torch.equal(outputs(load_flux(tmp_path / "w.pt"), HEAD128), outputs(model, HEAD128))

    class Payload:  # an arbitrary object: weights_only loading must refuse it, never run its code
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"img_in.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"evil\.pt: cannot be read as a weights-only torch checkpoint"):
        load_flux(tmp_path / "evil.pt")


def test_index_listing_a_missing_shard_is_reported(tmp_path):
    folder = tmp_path / "transformer"
    diffusers_flux(TINY, tiny_flux(TINY).state_dict()).save_pretrained(folder, max_shard_size="300KB")
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"missing: .*{shard.name}"):
        load_flux(folder)


def test_read_state_dict_applies_scaled_fp8_weights(tmp_path):
    w = torch.randn(4, 4)
    save_file(
        {
            "a.weight": (w / 2).to(torch.float8_e4m3fn),
            "a.scale_weight": torch.tensor([2.0]),
            "scaled_fp8": torch.zeros(1),
        },
        tmp_path / "s.safetensors",
    )
    sd = read_state_dict(tmp_path / "s.safetensors", dtype=torch.float32)
    assert list(sd) == ["a.weight"]
    assert torch.allclose(sd["a.weight"], w, rtol=0.13, atol=0.02)
