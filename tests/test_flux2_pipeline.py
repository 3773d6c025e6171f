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
from tests.flux2_helpers import write_klein_repo  # noqa: E402
from tests.flux_helpers import tiny_flux  # noqa: E402
from tests.test_qwen3 import SMALL  # noqa: E402

LAYERS = (9, 18, 27)  # klein's layers of a tiny Qwen3 of 28 layers: 3 × 64 = 192 channels


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny FLUX.2 [klein] repo in the diffusers layout: transformer/, vae/, text_encoder/, tokenizer/."""
    return write_klein_repo(tmp_path_factory.mktemp("klein"))


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
    common = [
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "48",
        "--output-dir",
        str(tmp_path / "out"),
        "--max-length",
        "64",
    ]
    assert sample.main(["--repo", str(repo), "--prompt", "a chair", "--seed", "3", *refs, *common]) == 0
    first = sorted((tmp_path / "out").glob("*.png"))
    assert len(first) == 1
    settings = json.loads(Image.open(first[0]).info["minflux"])
    assert settings["task"] == "edit" and len(settings["image"]) == 2 and settings["steps"] == 2
    assert settings["t5_max_length"] == 64  # the prompt's tokens, as for FLUX.1's T5
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


# --- the other generation's parts, refused before anything is loaded ------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Any transformer load fails the test: what is refused must be refused from the file headers alone."""

    def loaded(*args, **kwargs):
        raise AssertionError("a transformer was loaded before the bad input was refused")

    monkeypatch.setattr("minflux.pipeline_flux2.load_flux", loaded)
    monkeypatch.setattr("minflux.pipeline.load_flux", loaded)


def lora_files(tmp_path):
    """A FLUX.1 and a FLUX.2 LoRA in kohya's layout (the official names with underscores), as minflux writes them."""
    from minflux.files.lora_files import save_lora
    from minflux.lora import inject_lora
    from tests.flux2_helpers import tiny_flux2

    paths = {}
    for generation, model in (("FLUX.1", tiny_flux()), ("FLUX.2", tiny_flux2())):
        inject_lora(model, 2)
        paths[generation] = save_lora(model, tmp_path / f"{generation}.safetensors", format="kohya")
    return paths


def test_a_lora_tells_its_generation_by_names_or_widths(tmp_path):
    from minflux.files.lora_files import lora_generation, save_lora
    from minflux.files.weights import read_shapes
    from minflux.lora import inject_lora

    paths = lora_files(tmp_path)
    shapes = {g: {k: list(s) for k, (s, _) in read_shapes(p).items()} for g, p in paths.items()}
    assert lora_generation(shapes["FLUX.1"])[0] == "FLUX.1"  # img_mod.lin: FLUX.1's own modulation
    assert lora_generation(shapes["FLUX.2"])[0] == "FLUX.2"
    for generation, hidden, ratio in (("FLUX.1", 128, 7), ("FLUX.2", 64, 9)):  # linear1: q, k, v + the MLP's input
        only = {k: s for k, s in shapes[generation].items() if "single_blocks_0_linear1" in k}
        said = f"lora_unet_single_blocks_0_linear1, which maps {hidden} → {ratio * hidden} channels ({ratio}×)"
        assert lora_generation(only) == (generation, said)
    qkv_only = {k: s for k, s in shapes["FLUX.2"].items() if "img_attn_qkv" in k}
    assert lora_generation(qkv_only) is None  # the same shapes in both generations: nothing tells
    flux1 = tiny_flux()
    inject_lora(flux1, 2)
    diffusers = save_lora(flux1, tmp_path / "diffusers.safetensors", format="diffusers")
    assert lora_generation({k: list(s) for k, (s, _) in read_shapes(diffusers).items()})[0] == "FLUX.1"
    flux2_diffusers = {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": [2, 64]}
    assert lora_generation(flux2_diffusers)[0] == "FLUX.2"


def test_a_lora_of_the_other_generation_is_refused_before_loading(repo, tmp_path, capsys, no_loading):
    import sample
    from minflux.files.lora_files import read_lora
    from minflux.files.weights import WeightsError
    from minflux.pipeline_flux2 import check_lora

    paths = lora_files(tmp_path)
    flux1 = tmp_path / "flux1.safetensors"
    save_flux(tiny_flux(), flux1)
    for model, lora, said in (
        (["--repo", str(repo)], "FLUX.1", f"a FLUX.1 LoRA (shown by lora_unet_double_blocks_0_img_mod_lin.alpha); "
                                          f"{repo} is FLUX.2"),
        (["--flux", str(flux1)], "FLUX.2", f"a FLUX.2 LoRA (shown by lora_unet_double_blocks_0_img_mlp_0, which "
                                           f"maps 64 → 384 channels (6×)); {flux1} is FLUX.1"),
    ):  # fmt: skip
        assert (
            sample.main([*model, "--prompt", "x", "--lora", f"{paths[lora]}:0.8", "--output-dir", str(tmp_path)]) == 2
        )
        assert said in capsys.readouterr().err
    with pytest.raises(WeightsError, match="a FLUX.2 LoRA .*; this transformer is FLUX.1"):
        read_lora(paths["FLUX.2"], tiny_flux())  # FluxPipeline.load_lora reads it so
    check_lora(paths["FLUX.2"], repo=repo)  # a FLUX.2 LoRA for a FLUX.2 model: not refused


def test_a_text_encoder_of_the_wrong_family_or_width_is_named_before_loading(repo, tmp_path, no_loading):
    from transformers import MistralConfig, MistralForCausalLM

    from minflux.files.weights import WeightsError

    mistral = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(**dict(SMALL, num_hidden_layers=30))).save_pretrained(mistral)
    with pytest.raises(WeightsError, match="model_type 'mistral', expected qwen3 \\(Qwen3 text encoder\\)"):
        Flux2Pipeline.from_files(repo=repo, text_encoder=mistral)  # [klein] reads Qwen3
    narrow = tmp_path / "qwen3-narrow"
    Qwen3ForCausalLM(Qwen3Config(**dict(SMALL, hidden_size=32, num_hidden_layers=28))).save_pretrained(narrow)
    with pytest.raises(
        WeightsError, match="hidden size 32 \\(3 stacked layers: 96 channels\\); the transformer .* takes 192"
    ):
        Flux2Pipeline.from_files(repo=repo, text_encoder=narrow)
    t5_folder = tmp_path / "t5"
    t5_folder.mkdir()
    save_flux(tiny_flux(), t5_folder / "model.safetensors")  # any file without a language model's keys
    with pytest.raises(WeightsError, match="not a Qwen3 text encoder: no key 'embed_tokens.weight'"):
        Flux2Pipeline.from_files(repo=repo, text_encoder=t5_folder)


def test_offload_puts_the_text_encoder_and_the_transformer_on_the_device_in_different_stages(repo, monkeypatch):
    """--offload: Qwen3 and the VAE while the inputs are encoded, then the transformer and the VAE; the same
    pixels as without. (On this CPU the device is the CPU: what is checked is which parts each stage asks for.)"""
    pipe = ours(repo, "flux2-klein-4b")
    want = pipe("a chair", width=64, height=48, num_steps=2, seed=5, output="tensor")
    stages, on_device = [], Flux2Pipeline._on_device

    def recording(self, *parts):
        stages.append(sorted(type(p).__name__ for p in parts))
        return on_device(self, *parts)

    monkeypatch.setattr(Flux2Pipeline, "_on_device", recording)
    pipe.offload = True
    got = pipe("a chair", width=64, height=48, num_steps=2, seed=5, output="tensor")
    assert stages == [["Flux2AutoEncoder", "Qwen3"], ["Flux2", "Flux2AutoEncoder"]]
    assert torch.equal(got, want)
