"""Tests for minflux/autoencoder.py: the FLUX VAE against diffusers' AutoencoderKL, its loaders, errors, tiling.

diffusers is the oracle here and only here: minflux itself never imports it. Its own LDM -> diffusers
converter (`convert_ldm_vae_checkpoint`, the official ae.safetensors keys are LDM keys) writes the weights
into the oracle, so minflux's diffusers -> official map (DIFFUSERS_TO_OFFICIAL) is checked against an
independent one.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minflux.autoencoder import AE_PARAMS_FLUX, AutoEncoder, AutoEncoderParams, tile_starts, tiled
from minflux.files.keys import official_state_dict
from minflux.files.load import load_ae
from minflux.files.weights import WeightsError, save_atomic

# Three levels (4x down), so the decoder's up.1 and up.2 have equal shapes: a wrong up-block order would
# load without a shape error and show only in the outputs. 32 channels: GroupNorm has 32 groups.
SMALL = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 2, 2],
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)


def random_ae(params: AutoEncoderParams = SMALL, seed: int = 0) -> AutoEncoder:
    """An AutoEncoder with every weight random, norms included (default norms are 1 and 0: too easy to match)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(params).eval()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            # conv weights keep their random (Kaiming-uniform) initialisation
    return ae


def diffusers_config(params: AutoEncoderParams) -> dict:
    """The diffusers AutoencoderKL config of the FLUX VAE, at the size of `params`."""
    levels = len(params.ch_mult)
    return dict(
        in_channels=params.in_channels,
        out_channels=params.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[params.ch * m for m in params.ch_mult],
        layers_per_block=params.num_res_blocks,
        latent_channels=params.z_channels,
        norm_num_groups=32,
        sample_size=params.resolution,
        scaling_factor=params.scale_factor,
        shift_factor=params.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        act_fn="silu",
    )


def diffusers_vae(ae: AutoEncoder):
    """diffusers' AutoencoderKL holding the same weights as `ae`, converted by diffusers' own converter."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = diffusers_config(ae.params)
    ref = diffusers.AutoencoderKL(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), config), strict=True)
    return ref


@pytest.fixture(scope="module")
def ae():
    return random_ae()


@pytest.fixture(scope="module")
def ref(ae):
    return diffusers_vae(ae)


def image(b=2, h=32, w=32, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent(b=2, h=8, w=8, seed=2):
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a: AutoEncoder, b: AutoEncoder):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def rel_err(out, expected) -> float:
    """max |out - expected| in units of the expected output's standard deviation."""
    return ((out.float() - expected.float()).abs().max() / expected.float().std()).item()


def mean_err(out, expected) -> float:
    """mean |out - expected| in units of the expected output's standard deviation."""
    return ((out.float() - expected.float()).abs().mean() / expected.float().std()).item()


# --- 1. parity with diffusers -------------------------------------------------------------------------
# Measured in fp32 (max |diff| / std of diffusers' output): moments 3.4e-6, encode 3.5e-6, decode 9.0e-6.


@torch.no_grad()
def test_encode_matches_diffusers_autoencoderkl(ae, ref):
    x = image()
    expected = ref.encode(x).latent_dist
    moments = torch.cat([expected.mean, expected.logvar], dim=1)
    assert rel_err(ae.encoder(x), moments) <= 1e-4  # mean and log-variance, before any scaling
    z = ae.encode(x, sample=False)
    assert z.shape == (2, 16, 8, 8)
    assert rel_err(z, SMALL.scale_factor * (expected.mean - SMALL.shift_factor)) <= 1e-4


@torch.no_grad()
def test_decode_matches_diffusers_autoencoderkl(ae, ref):
    z = latent()
    expected = ref.decode(z / SMALL.scale_factor + SMALL.shift_factor).sample  # what FluxPipeline does
    out = ae.decode(z)
    assert out.shape == (2, 3, 32, 32)
    assert rel_err(out, expected) <= 1e-4


@torch.no_grad()
def test_encode_returns_the_mean_by_default_and_samples_when_asked_like_the_official_code(ae):
    # black-forest-labs/flux: AutoEncoder(params, sample_z=False) -> DiagonalGaussian(sample=False): the mean
    x = image()
    mean, logvar = ae.encoder(x).chunk(2, dim=1)
    torch.manual_seed(7)
    z = ae.encode(x, sample=True)
    torch.manual_seed(7)
    noise = torch.randn_like(mean)
    expected = SMALL.scale_factor * (mean + torch.exp(0.5 * logvar) * noise - SMALL.shift_factor)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(ae.encode(x), SMALL.scale_factor * (mean - SMALL.shift_factor))
    assert torch.equal(ae.encode(x), ae.encode(x)) and not torch.equal(z, ae.encode(x))


# --- 2. loading ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_load_ae_reads_an_official_file_and_its_size(ae, tmp_path):
    path = save_atomic(ae.state_dict(), tmp_path / "ae.safetensors")
    loaded = load_ae(path)
    assert loaded.params == SMALL  # ch, ch_mult, num_res_blocks, z_channels read off the shapes
    assert_same_weights(loaded, ae)
    assert torch.equal(loaded.decode(latent()), ae.decode(latent()))


@torch.no_grad()
def test_load_ae_reads_a_diffusers_folder_single_and_sharded(ae, ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    ref.save_pretrained(tmp_path / "vae_sharded", max_shard_size="200KB")
    assert (tmp_path / "vae_sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list((tmp_path / "vae_sharded").glob("*.safetensors"))) > 1
    for folder in ("vae", "vae_sharded"):
        loaded = load_ae(tmp_path / folder)
        assert loaded.params == SMALL
        assert_same_weights(loaded, ae)
        assert torch.equal(loaded.encode(image(), sample=False), ae.encode(image(), sample=False))
        assert torch.equal(loaded.decode(latent()), ae.decode(latent()))


def test_load_ae_reads_a_single_file_with_diffusers_keys(ae, ref, tmp_path):
    path = save_atomic(ref.state_dict(), tmp_path / "vae.safetensors")
    assert_same_weights(load_ae(path), ae)


def test_load_ae_takes_scale_and_shift_from_the_diffusers_config(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE: same architecture, other numbers
    config_file.write_text(json.dumps(config))
    loaded = load_ae(tmp_path / "vae")
    assert (loaded.scale_factor, loaded.shift_factor) == (1.5305, 0.0609)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_load_ae_keeps_a_half_precision_dtype_or_casts(ae, tmp_path, stored):
    path = save_atomic({k: v.to(stored) for k, v in ae.state_dict().items()}, tmp_path / "ae.safetensors")
    kept = load_ae(path)
    assert {p.dtype for p in kept.parameters()} == {stored}
    for key, t in kept.state_dict().items():
        assert torch.equal(t, ae.state_dict()[key].to(stored)), key
    cast = load_ae(path, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    out = kept.decode(latent().to(stored))
    assert out.dtype == stored
    assert rel_err(out, ae.decode(latent())) < 0.2  # measured: bf16 0.082, fp16 0.012


@torch.no_grad()
def test_load_ae_reads_fp8_weights_as_bf16(ae, tmp_path):
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in ae.state_dict().items()}
    path = save_atomic(fp8, tmp_path / "ae_fp8.safetensors")
    loaded = load_ae(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, fp8[key].to(torch.bfloat16)), key  # fp8 values are exact in bf16
    out = loaded.decode(latent().to(torch.bfloat16))
    rounded = AutoEncoder(SMALL)
    rounded.load_state_dict({k: t.float() for k, t in fp8.items()}, assign=True)
    assert rel_err(out, rounded.decode(latent())) < 0.2  # bf16 arithmetic only; measured: 0.071
    # e4m3 keeps 3 mantissa bits (steps of up to 6%), so the outputs only resemble the fp32 model's
    assert mean_err(out, ae.decode(latent())) < 0.2  # measured: 0.099 (max 0.74)


# --- 3. the official preset -----------------------------------------------------------------------------
# ae.safetensors holds 244 tensors, 83,819,683 values: diffusers' AutoencoderKL with the FLUX.1-dev vae/
# config has exactly that many on the meta device, and published tensor walks of ae.safetensors agree.


def official_keys_by_hand() -> set[str]:
    """The ae.safetensors key set written out from the architecture, independently of the model code."""
    resnet = ["norm1", "conv1", "norm2", "conv2"]
    modules = ["encoder.conv_in", "encoder.norm_out", "encoder.conv_out"]
    modules += ["decoder.conv_in", "decoder.norm_out", "decoder.conv_out"]
    for part in ("encoder", "decoder"):
        for block in ("block_1", "block_2"):
            modules += [f"{part}.mid.{block}.{m}" for m in resnet]
        modules += [f"{part}.mid.attn_1.{m}" for m in ("norm", "q", "k", "v", "proj_out")]
    widths = [128, 128, 256, 512, 512]  # conv_in, then the four levels
    for level in range(4):
        for i in range(2):
            modules += [f"encoder.down.{level}.block.{i}.{m}" for m in resnet]
        if widths[level] != widths[level + 1]:  # the first block of a level that widens
            modules.append(f"encoder.down.{level}.block.0.nin_shortcut")
        if level != 3:
            modules.append(f"encoder.down.{level}.downsample.conv")
    for level in range(4):  # decoder.up.{level} narrows from the width of the level below it to its own
        for i in range(3):
            modules += [f"decoder.up.{level}.block.{i}.{m}" for m in resnet]
        below = widths[level + 2] if level < 3 else 512
        if below != widths[level + 1]:
            modules.append(f"decoder.up.{level}.block.0.nin_shortcut")
        if level != 0:
            modules.append(f"decoder.up.{level}.upsample.conv")
    return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}


def test_official_preset_has_the_official_keys_and_parameter_count():
    with torch.device("meta"):  # no memory is allocated
        model = AutoEncoder(AE_PARAMS_FLUX)
    sd = model.state_dict()
    assert len(sd) == 244
    assert sum(t.numel() for t in sd.values()) == 83_819_683
    assert set(sd) == official_keys_by_hand()
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)  # mean and log-variance of 16 channels
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_official_preset_matches_diffusers_flux_vae_through_the_key_map():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**diffusers_config(AE_PARAMS_FLUX)).state_dict()
        ours = AutoEncoder(AE_PARAMS_FLUX).state_dict()
    assert sum(t.numel() for t in theirs.values()) == 83_819_683
    mapped = official_state_dict(theirs, num_levels=4)
    assert mapped.keys() == ours.keys()
    assert all(mapped[k].shape == ours[k].shape for k in ours)


# --- 4. errors ------------------------------------------------------------------------------------------


@pytest.fixture
def official_file(ae, tmp_path):
    def write(change=None):
        sd = dict(ae.state_dict())
        if change:
            change(sd)
        return save_atomic(sd, tmp_path / "ae.safetensors")

    return write


def test_load_ae_names_a_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors: no such file"):
        load_ae(tmp_path / "nope.safetensors")


def test_load_ae_names_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "ae.safetensors"
    path.write_text("this is not a weights file")
    with pytest.raises(WeightsError, match=r"ae\.safetensors: not a readable \.safetensors file"):
        load_ae(path)


def test_load_ae_names_a_truncated_file(official_file):
    path = official_file()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"ae\.safetensors.*truncated"):
        load_ae(path)


def test_load_ae_names_an_empty_folder(tmp_path):
    with pytest.raises(WeightsError, match="holds no .safetensors file"):
        load_ae(tmp_path)


def test_load_ae_names_a_missing_key(official_file):
    path = official_file(lambda sd: sd.pop("decoder.up.1.block.2.norm1.weight"))
    with pytest.raises(WeightsError) as e:
        load_ae(path)
    assert str(path) in str(e.value)
    assert "missing 1 key(s), e.g. decoder.up.1.block.2.norm1.weight" in str(e.value)


def test_load_ae_names_a_missing_key_it_needs_for_the_size(official_file):
    path = official_file(lambda sd: sd.pop("encoder.conv_in.weight"))
    with pytest.raises(WeightsError, match=r"ae\.safetensors: missing key 'encoder\.conv_in\.weight'"):
        load_ae(path)


def test_load_ae_names_an_unexpected_key(official_file):
    path = official_file(lambda sd: sd.update({"quant_conv.weight": torch.zeros(32, 32, 1, 1)}))
    with pytest.raises(WeightsError, match=r"ae\.safetensors.*\n.*unexpected 1 key\(s\), e\.g\. quant_conv\.weight"):
        load_ae(path)


def test_load_ae_names_a_key_with_the_wrong_shape(official_file):
    path = official_file(lambda sd: sd.update({"encoder.mid.attn_1.q.weight": torch.zeros(64, 64)}))
    message = r"key 'encoder\.mid\.attn_1\.q\.weight' has shape \[64, 64\], the autoencoder expects \[64, 64, 1, 1\]"
    with pytest.raises(WeightsError, match=r"ae\.safetensors: " + message):
        load_ae(path)


def test_load_ae_says_when_diffusers_keys_were_renamed(ref, tmp_path):
    sd = dict(ref.state_dict())
    sd.pop("decoder.up_blocks.0.resnets.0.norm1.weight")  # up_blocks.0 is the official decoder.up.2
    path = save_atomic(sd, tmp_path / "vae.safetensors")
    with pytest.raises(WeightsError, match=r"vae\.safetensors \(diffusers keys.*\n.*decoder\.up\.2\.block\.0\.norm1"):
        load_ae(path)


def test_load_ae_names_a_broken_config(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not valid json"):
        load_ae(tmp_path / "vae")


# --- 5. tiling ------------------------------------------------------------------------------------------


def blurred_noise(c: int, size: int, sigma: float, seed: int) -> torch.Tensor:
    """A smooth, stationary test input [1, c, size, size]: white noise blurred by a Gaussian, unit std."""
    noise = torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(seed))
    r = math.ceil(3 * sigma)
    k = torch.exp(-(torch.arange(-r, r + 1.0) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(noise, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x / x.std()


def column_jumps(e: torch.Tensor) -> torch.Tensor:
    """Mean |e[..., j] - e[..., j - 1]| for each column j >= 1 (index j - 1 of the result)."""
    return (e[..., 1:] - e[..., :-1]).abs().mean(dim=(0, 1, 2))


@torch.no_grad()
def test_tiled_with_a_tile_as_large_as_the_image_is_exact(ae):
    x, z = image(h=32, w=24), latent(h=8, w=6)
    for tile in (32, 40):
        assert torch.equal(ae.encode(x, sample=False, tile=tile), ae.encode(x, sample=False))
        torch.manual_seed(0)
        sampled = ae.encode(x, sample=True, tile=tile)
        torch.manual_seed(0)
        assert torch.equal(sampled, ae.encode(x, sample=True))
    for tile in (8, 16):
        assert torch.equal(ae.decode(z, tile=tile), ae.decode(z))


def test_tiled_blending_is_exact_for_networks_without_context():
    # A net whose output at each place depends only on the input there: any correct tiling (offsets,
    # scale, weights summing to 1) reproduces it. Sizes 44 and 36 force a last tile flush with the end.
    x = torch.randn(2, 5, 44, 36)

    def down(t):
        return F.avg_pool2d(t, 4) * 3 + 1  # like the encoder: 4x smaller

    def up(t):
        return F.interpolate(t, scale_factor=8, mode="nearest") - 2  # like the decoder: 8x larger

    assert tile_starts(44, 16, 12) == [0, 12, 24, 28]
    torch.testing.assert_close(tiled(down, x, 16, align=4), down(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled(up, x, 16), up(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled(up, x, 13), up(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiled(down, x, 18, align=4)


def diffusers_tiling(ref, tile_latent: int, downscale: int):
    """diffusers' own tiled encode/decode at the same tile size, as a baseline for how close tiling can be."""
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size = tile_latent, tile_latent * downscale
    return ref


# Each tile normalises with its own GroupNorm statistics and attends only to itself, so tiles cannot match
# the whole exactly. A random-weight network is very sensitive to those statistics, so "close" is measured
# against diffusers' tiling of the same network (overlap 1/4, too) on a smooth stationary input.


@torch.no_grad()
def test_tiled_decode_is_close_to_untiled_and_has_no_seam(ae):
    # Measured on a 32 x 32 latent in 3 x 3 tiles of 16: max 1.76 std, mean 0.26 std; diffusers 2.56, 0.31.
    z = blurred_noise(16, 32, sigma=1.0, seed=3)
    whole = ae.decode(z)  # [1, 3, 128, 128]
    tiles = ae.decode(z, tile=16)
    ref = diffusers_tiling(diffusers_vae(ae), tile_latent=16, downscale=4)
    theirs = ref.decode(z / SMALL.scale_factor + SMALL.shift_factor).sample
    assert rel_err(tiles, whole) < 2.5 and mean_err(tiles, whole) < 0.35
    assert mean_err(tiles, whole) <= mean_err(theirs, whole)

    # No seam: where a tile starts or ends, the error jumps about as much as anywhere (measured: 0.91x its
    # median jump between neighbouring columns).
    jumps = column_jumps(tiles - whole)
    starts = tile_starts(32, 16, 12)  # [0, 12, 16]
    edges = {4 * s for s in starts[1:]} | {4 * (s + 16) for s in starts[:-1]}  # in output pixels: 48, 64, 112
    assert max(jumps[j - 1] for j in edges) <= 1.5 * jumps.median()

    # The same measure does see the seam of two halves put side by side without overlap or blending
    # (measured: 8.0x its median jump).
    halves = torch.cat([ae.decode(z[..., :16]), ae.decode(z[..., 16:])], dim=-1)
    naive = column_jumps(halves - whole)
    assert naive[64 - 1] > 3 * naive.median()


@torch.no_grad()
def test_tiled_encode_is_close_to_untiled(ae):
    # Measured on a 64 x 64 image in 3 x 3 tiles of 32: max 2.70 std, mean 0.42 std; diffusers 3.45, 0.51.
    x = blurred_noise(3, 64, sigma=1.0, seed=4).clamp(-1, 1)
    whole = ae.encode(x, sample=False)
    tiles = ae.encode(x, sample=False, tile=32)
    ref = diffusers_tiling(diffusers_vae(ae), tile_latent=8, downscale=4)
    theirs = SMALL.scale_factor * (ref.encode(x).latent_dist.mean - SMALL.shift_factor)
    assert rel_err(tiles, whole) < 4.0 and mean_err(tiles, whole) < 0.55
    assert mean_err(tiles, whole) <= mean_err(theirs, whole)
    with pytest.raises(ValueError, match="multiple of 4"):
        ae.encode(x, tile=30)
