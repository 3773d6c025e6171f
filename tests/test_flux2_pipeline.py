"""FLUX.2 end to end: prompt (and reference images) → pixels, minflux's Flux2Pipeline against diffusers'
Flux2KleinPipeline on the same tiny random weights, each part loaded by minflux from the folders diffusers saved."""

import json

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline  # noqa: E402
from diffusers import Flux2Transformer2DModel  # noqa: E402
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from minflux.files.load import load_ae, load_flux, save_flux  # noqa: E402
from minflux.files.load_llm import load_qwen3  # noqa: E402
from minflux.pipeline_flux2 import Flux2Pipeline  # noqa: E402
from tests.flux2_helpers import TINY2_VARIANTS, diffusers_config  # noqa: E402
from tests.flux_helpers import randomize_, tiny_flux  # noqa: E402
from tests.test_qwen3 import SMALL, randomize, write_qwen_tokenizer  # noqa: E402

LAYERS = (9, 18, 27)  # klein's layers of a tiny Qwen3 of 28 layers: 3 × 64 = 192 channels


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny FLUX.2 [klein] repo in the diffusers layout: transformer/, vae/, text_encoder/, tokenizer/."""
    folder = tmp_path_factory.mktemp("klein")
    torch.manual_seed(0)
    params = TINY2_VARIANTS["klein"]
    transformer = Flux2Transformer2DModel(**dict(diffusers_config(params), joint_attention_dim=3 * 64))
    randomize_(transformer, seed=1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=4
    )  # 8 × 2×2 = 32 channels, the transformer's; 8× down and the 2×2 patch: 16 pixels a token, as FLUX.2's
    randomize_(vae, seed=2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(32))
        vae.bn.running_var.copy_(0.5 + torch.rand(32))
    text_encoder = randomize(Qwen3ForCausalLM(Qwen3Config(**dict(SMALL, num_hidden_layers=28))))
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    write_qwen_tokenizer(folder / "tokenizer")
    return folder


def theirs(repo, distilled: bool):
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=AutoencoderKLFlux2.from_pretrained(repo / "vae"),
        text_encoder=Qwen3ForCausalLM.from_pretrained(repo / "text_encoder"),
        tokenizer=Qwen2TokenizerFast.from_pretrained(str(repo / "tokenizer")),
        transformer=Flux2Transformer2DModel.from_pretrained(repo / "transformer"),
        is_distilled=distilled,
    )


def ours(repo, variant: str) -> Flux2Pipeline:
    parts = load_flux(repo / "transformer"), load_ae(repo / "vae"), load_qwen3(repo / "text_encoder")
    return Flux2Pipeline(*parts, variant=variant, device="cpu", dtype=torch.float32)


def references() -> list[Image.Image]:
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((64, 80), (96, 64))]


@pytest.mark.parametrize(
    "variant, distilled, refs",
    [("flux2-klein-4b", True, False), ("flux2-klein-4b", True, True), ("flux2-klein-base-4b", False, True)],
    ids=["distilled t2i", "distilled two references", "base true CFG two references"],
)
def test_pixels_match_the_klein_pipeline(repo, variant, distilled, refs):
    images = references() if refs else None
    prompt, seed, steps = "a red chair on a blue floor", 7, 3
    want = theirs(repo, distilled)(
        prompt=prompt,
        image=images,
        height=64,
        width=80,
        num_inference_steps=steps,
        guidance_scale=4.0,  # Base: true CFG against ""; ignored by the distilled model
        generator=[torch.Generator().manual_seed(seed)],
        output_type="pt",
        text_encoder_out_layers=LAYERS,  # the default; named for the reader
    ).images  # [1, 3, 64, 80] in [0, 1]
    pipe = ours(repo, variant)
    got = pipe(prompt, width=80, height=64, num_steps=steps, seed=seed, image=images, output="tensor")
    assert got.shape == want.shape == (1, 3, 64, 80)
    assert want.std() > 0.05  # a real image, not a constant
    assert (got - want).abs().max() <= 1e-4
    assert pipe.defaults.true_cfg == (1.0 if distilled else 4.0)


def test_settings_and_bad_references(repo):
    pipe = ours(repo, "flux2-klein-base-4b")
    im = pipe("a chair", width=64, height=64, num_steps=1, seed=0)[0]
    assert '"negative_prompt": ""' in im.info["minflux"] and '"true_cfg_scale": 4.0' in im.info["minflux"]
    with pytest.raises(ValueError, match="at most 4"):
        pipe("a chair", num_steps=1, image=references() * 3)
    with pytest.raises(ValueError, match="no mask"):
        pipe("a chair", num_steps=1, image=references()[:1], mask=references()[0])


def test_sample_py_runs_flux2_with_two_references_and_again_from_its_png(repo, tmp_path):
    import sample

    refs = []
    for i, im in enumerate(references()):
        refs += ["--image", str(tmp_path / f"ref{i}.png")]
        im.save(refs[-1])
    common = ["--steps", "2", "--width", "64", "--height", "48", "--output-dir", str(tmp_path / "out")]
    assert sample.main(["--repo", str(repo), "--prompt", "a chair", "--seed", "3", *refs, *common]) == 0
    first = sorted((tmp_path / "out").glob("*.png"))
    assert len(first) == 1
    settings = json.loads(Image.open(first[0]).info["minflux"])
    assert settings["task"] == "edit" and len(settings["image"]) == 2 and settings["steps"] == 2
    assert sample.main(["--from", str(first[0]), "--output-dir", str(tmp_path / "out")]) == 0
    second = sorted(set((tmp_path / "out").glob("*.png")) - set(first))
    assert len(second) == 1 and Image.open(second[0]).tobytes() == Image.open(first[0]).tobytes()


def test_sample_py_refuses_several_images_for_flux1(tmp_path, capsys):
    import sample

    flux1 = tmp_path / "FLUX.1-Kontext-dev"
    flux1.mkdir()
    a = tmp_path / "a.png"
    references()[0].save(a)
    save_flux(tiny_flux(), flux1 / "flux1-kontext-dev.safetensors")
    assert sample.main(["--repo", str(flux1), "--prompt", "x", "--image", str(a), "--image", str(a)]) == 2
    assert "FLUX.1 takes one" in capsys.readouterr().err


def test_a_vae_of_the_other_generation_is_refused_before_loading(repo, tmp_path):
    from safetensors.torch import save_file

    from minflux.autoencoder import AutoEncoder
    from minflux.files.weights import WeightsError
    from minflux.pipeline import FluxPipeline
    from minflux.presets import configs

    flux1_ae = tmp_path / "ae.safetensors"
    save_file(AutoEncoder(configs["flux-small"].ae_params).state_dict(), flux1_ae)
    with pytest.raises(WeightsError, match="a FLUX.1 VAE"):
        Flux2Pipeline.from_files(repo=repo, ae=flux1_ae)
    flux1 = tmp_path / "flux1.safetensors"
    save_flux(tiny_flux(), flux1)
    with pytest.raises(WeightsError, match="a FLUX.2 VAE"):
        FluxPipeline.from_files(flux=flux1, ae=repo / "vae", clip=flux1, t5=flux1)


def test_a_reference_under_64_pixels_is_named(repo, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 96)).save(small)
    with pytest.raises(ValueError, match="small.png: 48×96"):
        ours(repo, "flux2-klein-4b")("x", num_steps=1, image=[small])
