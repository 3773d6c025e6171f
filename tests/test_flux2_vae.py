"""Tests for Flux2AutoEncoder (minflux/autoencoder.py): FLUX.2's VAE against diffusers' AutoencoderKLFlux2, its
official size and keys, and loading it through minflux.files.load.load_ae.

diffusers is the oracle here and only here. The model holds the encoder and decoder; the 2x2 patchify and the
batch-norm normalisation live in the FLUX.2 pipelines, so those are run from Flux2KleinPipeline's own code.
The weights reach the oracle through diffusers' LDM converter (the official keys are LDM keys, with the two 1x1
convs moved under encoder./decoder.), independently of minflux's diffusers -> official map.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from minflux.autoencoder import AE_PARAMS_FLUX, AE_PARAMS_FLUX2, AutoEncoder, AutoEncoderParams, Flux2AutoEncoder
from minflux.files.keys import official_state_dict
from minflux.files.load import ae_params_from_shapes, load_ae
from minflux.files.weights import save_atomic

diffusers = pytest.importorskip("diffusers")

# Three levels (4x down, then 2x2 patches: 8 pixels per latent value), 8 latent channels -> 32 after patchify.
# 32 and 64 channels keep diffusers' default of 32 GroupNorm groups valid.
TINY = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    z_channels=8,
    scale_factor=AE_PARAMS_FLUX2.scale_factor,
    shift_factor=AE_PARAMS_FLUX2.shift_factor,
)
# max |diff| / std of diffusers' output. In fp32, diffusers' own decode is 1.6e-5 from its fp64 result (random
# weights: the residual stream grows and GroupNorm subtracts its mean), so minflux cannot be closer to it than that.
PARITY = {torch.float32: {"encode": 1e-5, "decode": 4e-5}, torch.float64: {"encode": 1e-10, "decode": 1e-10}}


def random_flux2_ae(params: AutoEncoderParams = TINY, seed: int = 0) -> Flux2AutoEncoder:
    """Every weight random, norms included, and batch-norm statistics far from mean 0, variance 1."""
    torch.manual_seed(seed)
    ae = Flux2AutoEncoder(params).eval()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        ae.bn.running_mean.copy_(0.5 * torch.randn_like(ae.bn.running_mean))
        ae.bn.running_var.copy_(0.05 + 2.0 * torch.rand_like(ae.bn.running_var))
        ae.bn.num_batches_tracked.fill_(1234)
    return ae


def ldm_layout(sd: dict) -> dict:
    """Official FLUX.2 keys -> LDM keys, where the quant convs sit at the top level (what diffusers converts)."""
    top = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    out = {}
    for key, t in sd.items():
        for ours, theirs in top.items():
            key = theirs + key.removeprefix(ours) if key.startswith(ours) else key
        out[key] = t
    return out


def diffusers_flux2_vae(ae: Flux2AutoEncoder):
    """diffusers' AutoencoderKLFlux2 at the size of `ae`, holding its weights and statistics."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    p = ae.params
    levels = len(p.ch_mult)
    config = dict(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
    )
    ref = diffusers.AutoencoderKLFlux2(**config).eval()
    sd = ldm_layout(ae.state_dict())
    converted = convert_ldm_vae_checkpoint(sd, {**config, "use_quant_conv": True, "use_post_quant_conv": True})
    converted.update({k: t for k, t in sd.items() if k.startswith("bn.")})  # the same name in both
    ref.load_state_dict(converted, strict=True)
    return ref


@pytest.fixture(scope="module")
def ae():
    return random_flux2_ae()


@pytest.fixture(scope="module")
def ref(ae):
    return diffusers_flux2_vae(ae)


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def pair(request, ae, ref):
    """minflux's and diffusers' model in one dtype; fp64 shows that they compute the same function."""
    dtype = request.param
    if dtype == torch.float32:
        return ae, ref, dtype
    return copy.deepcopy(ae).to(dtype), copy.deepcopy(ref).to(dtype), dtype


def image(b=2, h=32, w=48, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent(b=2, h=4, w=6, seed=2):
    return torch.randn(b, 4 * TINY.z_channels, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(out, expected) -> float:
    return ((out - expected).abs().max() / expected.std()).item()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --- parity with diffusers -----------------------------------------------------------------------------------
# Measured (max |diff| / std of diffusers' output): fp32 encode 4.1e-6, decode 1.6e-5; fp64 both below 1e-13.


@torch.no_grad()
def test_encode_matches_diffusers_and_the_flux2_pipeline_normalisation(pair):
    from diffusers import Flux2KleinPipeline

    ae, ref, dtype = pair
    # The pipeline's own image encoding: the posterior's mode, patchified, normalised by vae.bn's statistics.
    pipe = SimpleNamespace(vae=ref, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    x = image().to(dtype)
    expected = Flux2KleinPipeline._encode_vae_image(pipe, x, generator=None)
    z = ae.encode(x)
    assert z.shape == expected.shape == (2, 32, 4, 6)
    assert rel_err(z, expected) <= PARITY[dtype]["encode"]


@torch.no_grad()
def test_decode_matches_diffusers_and_the_flux2_pipeline_denormalisation(pair):
    from diffusers import Flux2KleinPipeline

    ae, ref, dtype = pair
    z = latent().to(dtype)
    mean = ref.bn.running_mean.view(1, -1, 1, 1)  # as Flux2KleinPipeline.__call__ undoes the normalisation
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    expected = ref.decode(Flux2KleinPipeline._unpatchify_latents(z * std + mean)).sample
    out = ae.decode(z)
    assert out.shape == expected.shape == (2, 3, 32, 48)
    assert rel_err(out, expected) <= PARITY[dtype]["decode"]


@torch.no_grad()
def test_batch_norm_statistics_are_used_even_in_training_mode(ae):
    x = image(b=1)
    expected = ae.encode(x)
    ae.train()
    try:
        assert torch.equal(ae.encode(x), expected)
        assert ae.bn.num_batches_tracked.item() == 1234  # the statistics are read, never updated
    finally:
        ae.eval()


@torch.no_grad()
def test_tiles_as_large_as_the_input_are_exact_and_small_tiles_keep_the_shape(ae):
    x, z = image(b=1), latent(b=1)
    assert torch.equal(ae.encode(x, tile=48), ae.encode(x))
    assert torch.equal(ae.decode(z, tile=6), ae.decode(z))
    assert ae.encode(x, tile=16).shape == (1, 32, 4, 6)
    assert ae.decode(z, tile=2).shape == (1, 3, 32, 48)


# --- the official preset -------------------------------------------------------------------------------------


def test_official_preset_has_the_official_parameter_count_and_diffusers_keys():
    with torch.device("meta"):
        ours = Flux2AutoEncoder(AE_PARAMS_FLUX2).state_dict()
        theirs = diffusers.AutoencoderKLFlux2().state_dict()  # the FLUX.2 defaults
        flux1 = AutoEncoder(AE_PARAMS_FLUX2).state_dict()  # the same stack without FLUX.2's additions
    parameters = sum(t.numel() for k, t in ours.items() if not k.startswith("bn."))
    assert parameters == 84_046_115
    mapped = official_state_dict(theirs, num_levels=4)
    assert mapped.keys() == ours.keys()
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    added = {"encoder.quant_conv.weight", "encoder.quant_conv.bias", "decoder.post_quant_conv.weight"}
    added |= {"decoder.post_quant_conv.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert ours.keys() == flux1.keys() | added
    assert ours["encoder.quant_conv.weight"].shape == (64, 64, 1, 1)
    assert ours["decoder.post_quant_conv.weight"].shape == (32, 32, 1, 1)
    assert ours["bn.running_mean"].shape == ours["bn.running_var"].shape == (128,)


def test_shapes_of_the_official_file_give_the_flux2_params():
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in Flux2AutoEncoder(AE_PARAMS_FLUX2).state_dict().items()}
    assert ae_params_from_shapes(shapes, "ae.safetensors") == AE_PARAMS_FLUX2


# --- loading -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_official_file_and_diffusers_folder_load_as_flux2_with_the_same_output(ae, ref, tmp_path):
    official = save_atomic(ae.state_dict(), tmp_path / "ae.safetensors")
    ref.save_pretrained(tmp_path / "vae")
    x, z = image(), latent()
    for path in (official, tmp_path / "vae"):
        loaded = load_ae(path)
        assert type(loaded) is Flux2AutoEncoder and not loaded.training
        assert loaded.params == TINY
        assert_same_weights(loaded, ae)
        assert torch.equal(loaded.encode(x), ae.encode(x))
        assert torch.equal(loaded.decode(z), ae.decode(z))


def test_a_flux1_autoencoder_still_loads_as_flux1(tmp_path):
    small = AutoEncoderParams(256, 3, 32, 3, [1, 2], 1, 16, AE_PARAMS_FLUX.scale_factor, AE_PARAMS_FLUX.shift_factor)
    torch.manual_seed(0)
    flux1 = AutoEncoder(small)
    loaded = load_ae(save_atomic(flux1.state_dict(), tmp_path / "ae.safetensors"))
    assert type(loaded) is AutoEncoder
    assert loaded.params == small
    assert_same_weights(loaded, flux1)
