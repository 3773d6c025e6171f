"""The sampling pipelines end to end against diffusers' FluxPipeline and FluxFillPipeline.

One small random model of every part (transformer, VAE, CLIP, T5 with tokenizer files built here) is saved in
the diffusers repo layout. minflux loads the folder through its own loaders; diffusers runs the same objects.
Same prompt, same tokenizer files, same initial noise (minflux draws image i's noise from
torch.Generator().manual_seed(seed + i); diffusers gets that list of generators), and the images must agree
in [0, 1] pixels.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minflux.files.images import DataError
from minflux.sampling import get_noise, pack
from minflux.model import Flux
from minflux.files.images import read_settings, save_image
from minflux.files.weights import sha256
from minflux.pipeline import FluxPipeline, snap
from minflux.files.weights import WeightsError
from tests.flux_helpers import TINY, diffusers_flux, randomize_
from tests.text_fixtures import write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TEXT_DIM, POOLED_DIM = 32, 48  # T5 d_model, CLIP hidden size
FLUX = replace(
    TINY,
    context_in_dim=TEXT_DIM,
    vec_in_dim=POOLED_DIM,
    hidden_size=64,
    num_heads=2,
    depth=1,
    depth_single_blocks=2,
    axes_dim=[8, 12, 12],
)
VARIANTS = {"dev": FLUX, "schnell": replace(FLUX, guidance_embed=False), "fill": replace(FLUX, in_channels=384)}
PROMPT = "a photo of a cat sitting on a red chair"


def random_vae():
    """diffusers' AutoencoderKL of the FLUX layout (4 levels, so 8× downsampling), small and random. The encoder's
    log-variance is pinned at diffusers' lower clamp (std 3e-7): diffusers' Fill pipeline encodes the masked
    image with a draw from the posterior, minflux with its mean, and this makes the two the same."""
    from tests.test_autoencoder import diffusers_config
    from minflux.autoencoder import AutoEncoderParams

    params = AutoEncoderParams(
        resolution=64,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**diffusers_config(params)).eval()
    with torch.no_grad():
        vae.encoder.conv_out.weight[16:] = 0
        vae.encoder.conv_out.bias[16:] = -100
    return vae


def text_encoders(root):
    """A small CLIP and T5 in the official folder layout, with tokenizer folders learned here."""
    from tests.test_t5 import randomize as randomize_t5, train_sentencepiece

    clip_tok = write_clip_tokenizer(root / "tokenizer")
    vocab = len(transformers.CLIPTokenizer.from_pretrained(clip_tok))
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=POOLED_DIM,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        )
    ).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in clip.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5 if "embedding" not in name else 1))
    train_sentencepiece(root / "tokenizer_2")
    t5 = randomize_t5(
        transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=256,
                d_model=TEXT_DIM,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6,
                dropout_rate=0.0,
            )
        )
    )
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2")
    return clip, t5


def scheduler(shift: bool):
    return diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        shift=1.0,
        use_dynamic_shifting=shift,
    )


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """{variant: (repo folder in the diffusers layout, diffusers pipeline of the same objects)}."""
    shared = tmp_path_factory.mktemp("parts")
    clip, t5 = text_encoders(shared)
    vae = random_vae()
    out = {}
    for name, params in VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        for folder in ("tokenizer", "tokenizer_2"):
            (root / folder).symlink_to(shared / folder)
        for folder in ("text_encoder", "text_encoder_2"):
            (root / folder).symlink_to(shared / folder)
        transformer = diffusers_flux(params, randomize_(Flux(params), seed=1).state_dict())
        transformer.save_pretrained(root / "transformer")
        vae.save_pretrained(root / "vae")
        parts = dict(
            scheduler=scheduler(shift=name != "schnell"),
            vae=vae,
            text_encoder=clip,
            text_encoder_2=t5,
            tokenizer=transformers.CLIPTokenizer.from_pretrained(shared / "tokenizer"),
            tokenizer_2=transformers.T5TokenizerFast.from_pretrained(shared / "tokenizer_2"),
            transformer=transformer,
        )
        cls = diffusers.FluxFillPipeline if name == "fill" else diffusers.FluxPipeline
        out[name] = root, cls(**parts)
        if name == "dev":  # Kontext has dev's shapes: the same weights, driven by diffusers' Kontext pipeline
            out["kontext"] = root, diffusers.FluxKontextPipeline(**parts)
    return out


def compare(ours: torch.Tensor, reference: np.ndarray) -> float:
    """max |Δ| in [0, 1] pixels; also checks the images are not saturated flat, so the comparison means something."""
    ref = torch.from_numpy(reference).permute(0, 3, 1, 2)  # [N, H, W, 3] -> [N, 3, H, W]
    assert ours.shape == ref.shape
    inside = ((ref > 0.01) & (ref < 0.99)).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of the reference pixels are inside (0, 1): a weak comparison"
    return (ours - ref).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_text_to_image_matches_diffusers_flux_pipeline(repos, variant):
    root, reference = repos[variant]
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    cfg = dict(negative_prompt="blurry, low quality", true_cfg_scale=2.5) if variant == "dev" else {}
    ours = pipe(PROMPT, width=64, height=48, num_steps=4, guidance=3.5, seed=7, num_images=2, output="tensor", **cfg)
    expected = reference(
        PROMPT,
        width=64,
        height=48,
        num_inference_steps=4,
        guidance_scale=3.5,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
        output_type="np",
        max_sequence_length=pipe.t5.tokenizer.max_length,
        **cfg,
    ).images
    err = compare(ours, expected)
    print(f"{variant}: max |Δ| = {err:.2e} in [0, 1] pixels")
    assert err <= 1e-3
    # the official defaults: schnell's T5 length is 256 and it has no guidance embedding
    assert pipe.t5.tokenizer.max_length == (256 if variant == "schnell" else 512)


@pytest.mark.slow
def test_fill_matches_diffusers_flux_fill_pipeline(repos, tmp_path):
    root, reference = repos["fill"]
    g = torch.Generator().manual_seed(5)
    image = Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 24:56] = 255
    mask = Image.fromarray(mask)
    image.save(tmp_path / "image.png"), mask.save(tmp_path / "mask.png")

    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    assert pipe.task == "fill"
    ours = pipe(
        PROMPT,
        image=tmp_path / "image.png",
        mask=tmp_path / "mask.png",
        num_steps=4,
        guidance=30.0,
        seed=3,
        output="tensor",
    )
    expected = reference(
        PROMPT,
        image=image,
        mask_image=mask,
        width=64,
        height=48,
        num_inference_steps=4,
        guidance_scale=30.0,
        latents=pack(get_noise(1, 48, 64, seed=3)),
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    err = compare(ours, expected)
    print(f"fill: max |Δ| = {err:.2e} in [0, 1] pixels")
    assert err <= 1e-3


def kontext_pipeline(root) -> FluxPipeline:
    """The dev-like weights as a Kontext model: Kontext has dev's shapes, only its name tells it apart."""
    from minflux import load_ae, load_clip, load_flux, load_t5

    model = load_flux(root)
    model.variant = "flux-dev-kontext"
    parts = load_ae(root / "vae"), load_clip(root / "text_encoder"), load_t5(root / "text_encoder_2")
    return FluxPipeline(model, *parts, device="cpu")


@pytest.mark.slow
def test_kontext_matches_diffusers_flux_kontext_pipeline(repos):
    root, reference = repos["kontext"]
    pipe = kontext_pipeline(root)
    assert pipe.task == "kontext" and pipe.defaults.num_steps == 30 and pipe.defaults.guidance == 2.5
    g = torch.Generator().manual_seed(6)
    ref_image = Image.fromarray((torch.rand(832, 1248, 3, generator=g) * 255).to(torch.uint8).numpy())  # a trained size
    ours = pipe(PROMPT, image=ref_image, width=64, height=48, num_steps=3, guidance=2.5, seed=2, output="tensor")
    expected = reference(
        image=ref_image,
        prompt=PROMPT,
        width=64,
        height=48,
        max_area=64 * 48,
        num_inference_steps=3,
        guidance_scale=2.5,
        generator=[torch.Generator().manual_seed(2)],
        output_type="np",
    ).images
    err = compare(ours, expected)
    print(f"kontext: max |Δ| = {err:.2e} in [0, 1] pixels")
    assert err <= 1e-3
    # the reference matters: another reference image, another result (by far more than the parity error)
    other = pipe(
        PROMPT,
        image=ref_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        width=64,
        height=48,
        num_steps=3,
        guidance=2.5,
        seed=2,
        output="tensor",
    )
    assert (other - ours).abs().max() > 1e-3


def test_the_mask_changes_the_fill_output(repos):
    """The Fill condition reaches the model: two masks give two images (the parity above is not a dead path)."""
    root, _ = repos["fill"]
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    a = pipe("x", image=image, mask=Image.new("L", (32, 32), 255), num_steps=2, seed=0, output="tensor")
    b = pipe("x", image=image, mask=Image.new("L", (32, 32), 0), num_steps=2, seed=0, output="tensor")
    assert (a - b).abs().max() > 1e-2


def test_kontext_resizes_the_reference_to_a_trained_resolution_and_appends_its_tokens(repos, monkeypatch):
    root, _ = repos["dev"]
    pipe = kontext_pipeline(root)
    seen = {}
    real_forward = pipe.model.forward

    def spy(img, img_ids, *args, **kwargs):
        seen["img"], seen["ids"] = img.shape, img_ids
        return real_forward(img, img_ids, *args, **kwargs)

    monkeypatch.setattr(pipe.model, "forward", spy)
    images = pipe("make it red", image=Image.new("RGB", (300, 200), (10, 200, 10)), num_steps=1, width=64, height=48)
    assert pipe.notes[0] == "reference 300×200 → 1248×832 (Kontext's nearest trained size)"  # 3:2
    assert images[0].size == (64, 48)
    generated, reference = 3 * 4, (832 // 16) * (1248 // 16)
    assert seen["img"] == (1, generated + reference, 64)
    assert (seen["ids"][0, :generated, 0] == 0).all() and (seen["ids"][0, generated:, 0] == 1).all()


def test_a_seed_gives_the_same_image_alone_or_in_a_batch(repos):
    root, _ = repos["schnell"]
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    batch = pipe(PROMPT, width=32, height=32, seed=10, num_images=3, output="tensor")
    alone = pipe(PROMPT, width=32, height=32, seed=11, output="tensor")
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_png_text_chunks_hold_the_settings_and_reproduce_the_image(repos, tmp_path):
    root, _ = repos["dev"]
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    image = pipe(
        PROMPT, width=40, height=33, num_steps=3, guidance=2.0, seed=4, negative_prompt="ugly", true_cfg_scale=1.5
    )[0]
    assert image.size == (32, 32) and pipe.notes == [
        "width 40 → 32 (a multiple of 16)",
        "height 33 → 32 (a multiple of 16)",
    ]
    save_image(image, tmp_path / "a.png")
    s = read_settings(tmp_path / "a.png")
    assert (s["prompt"], s["seed"], s["steps"], s["guidance"]) == (PROMPT, 4, 3, 2.0)
    assert (s["width"], s["height"], s["negative_prompt"], s["true_cfg_scale"]) == (32, 32, "ugly", 1.5)
    assert (s["t5_max_length"], s["dtype"], s["device"], s["variant"]) == (
        512,
        "fp32",
        "cpu",
        "custom",
    )  # tiny shapes: no preset
    assert s["weights"]["flux"] == str((root / "transformer").resolve())
    again = pipe(
        s["prompt"],
        width=s["width"],
        height=s["height"],
        num_steps=s["steps"],
        guidance=s["guidance"],
        seed=s["seed"],
        negative_prompt=s["negative_prompt"],
        true_cfg_scale=s["true_cfg_scale"],
    )[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "a.png")))


def test_png_parameters_chunk_reads_in_a1111_and_collides_with_no_tool(repos, tmp_path):
    from tests.other_tools import a1111_parse_parameters, comfyui_png_drop

    root, _ = repos["dev"]
    lora = random_lora(root, tmp_path)
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    pipe.load_lora(lora, 0.7)
    prompt = 'a cat: "Tom", on a chair, 2 m tall\nsecond line, ünïcode ∞'
    image = pipe(
        prompt,
        width=48,
        height=32,
        num_steps=2,
        guidance=3.5,
        seed=12,
        negative_prompt="blurry, dark",
        true_cfg_scale=1.5,
    )[0]
    save_image(image, tmp_path / "a.png")
    text = Image.open(tmp_path / "a.png").text
    assert set(text) == {"parameters", "minflux", "Software"} and text["Software"] == "minflux"
    assert comfyui_png_drop(text) == "parameters"  # no "prompt" / "workflow" chunk for ComfyUI's JSON.parse to fail on
    p = a1111_parse_parameters(text["parameters"])
    assert p["Prompt"] == prompt + f" <lora:{lora.stem}:0.7>"  # A1111 carries a LoRA and its scale in the prompt
    assert p["Negative prompt"] == "blurry, dark"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Distilled CFG Scale"], p["Seed"]) == (
        "2",
        "Euler",
        "1.5",
        "3.5",
        "12",
    )
    assert (p["Size-1"], p["Size-2"], p["Model"], p["Version"]) == ("48", "32", "custom", "minflux")
    assert p["Lora hashes"] == f"{lora.stem}: {read_settings(tmp_path / 'a.png')['loras'][0]['sha256'][:12]}"

    schnell = FluxPipeline.from_files(repo=repos["schnell"][0], device="cpu")
    p = a1111_parse_parameters(schnell("x", width=32, height=32, seed=1)[0].info["parameters"])
    assert "Distilled CFG Scale" not in p and "Negative prompt" not in p["Prompt"] and p["CFG scale"] == "1"


def test_read_settings_reads_pngs_of_an_earlier_minflux_and_nothing_from_other_pngs(tmp_path):
    from minflux.files.images import save_png

    old = {
        "software": "minflux",
        "prompt": "p",
        "seed": "4",
        "guidance": "none",
        "loras": "a.safetensors:0.5, b:1",
        "image": "photo.png",
        "mask": "PIL image",
    }  # one chunk per setting, as minflux wrote them before
    save_png(Image.new("RGB", (16, 16)), tmp_path / "old.png", text=old)
    s = read_settings(tmp_path / "old.png")
    assert (s["prompt"], s["seed"], s["image"], s["mask"]) == ("p", "4", {"path": "photo.png"}, {"in_memory": "Image"})
    assert s["loras"] == [{"path": "a.safetensors", "scale": 0.5}, {"path": "b", "scale": 1.0}]
    save_png(Image.new("RGB", (16, 16)), tmp_path / "other.png", text={"prompt": '{"3": {}}'})  # ComfyUI's
    assert read_settings(tmp_path / "other.png") == {}


def test_without_a_seed_one_is_drawn_and_recorded(repos):
    root, _ = repos["schnell"]
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    a, b = pipe("x", width=32, height=32), pipe("x", width=32, height=32)
    seeds = [read_settings(im[0])["seed"] for im in (a, b)]
    assert seeds[0] != seeds[1] and not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    again = pipe("x", width=32, height=32, seed=seeds[0])[0]
    assert np.array_equal(np.asarray(again), np.asarray(a[0]))


def test_snap_rounds_down_to_a_multiple_of_16_as_the_official_cli_with_a_note():
    notes = []
    sizes = [snap(1000, "width", notes), snap(1024, "height", notes), snap(5, "width", notes), snap(1023, "w", notes)]
    assert sizes == [992, 1024, 16, 1008]  # BFL's cli.py: 16 * (width // 16); diffusers: the same floor
    assert notes == [
        "width 1000 → 992 (a multiple of 16)",
        "width 5 → 16 (a multiple of 16)",
        "w 1023 → 1008 (a multiple of 16)",
    ]


# --- bad input -------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named(repos, tmp_path):
    root, _ = repos["fill"]
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    Image.new("L", (32, 48)).save(tmp_path / "mask.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"mask.png: the mask is 32×48, the image 32×32"):
        pipe("x", image=tmp_path / "image.png", mask=tmp_path / "mask.png")
    with pytest.raises(DataError, match=r"broken.png: cannot be read as an image"):
        pipe("x", image=tmp_path / "broken.png", mask=tmp_path / "mask.png")
    with pytest.raises(DataError, match=r"missing.png: no such file"):
        pipe("x", image=tmp_path / "missing.png", mask=tmp_path / "mask.png")
    with pytest.raises(ValueError, match=r"needs an image and a mask"):
        pipe("x")
    t2i = FluxPipeline.from_files(repo=repos["dev"][0], device="cpu")
    with pytest.raises(ValueError, match=r"text-to-image model"):
        t2i("x", image=tmp_path / "image.png")
    with pytest.raises(WeightsError, match=r"holds none of ae.safetensors, vae"):
        FluxPipeline.from_files(repo=tmp_path, flux=root / "transformer")


# --- sample.py with official-layout weights ---------------------------------------------------------------------


def random_lora(repo, tmp_path, fmt="kohya"):
    """A LoRA for the repo's transformer, with every up matrix random (an untrained one would change nothing)."""
    from minflux.files.load import load_flux
    from minflux.files.lora_files import save_lora
    from minflux.lora import inject_lora

    model = load_flux(repo)
    for p in inject_lora(model, rank=4):
        torch.nn.init.normal_(p, std=0.3)
    return save_lora(model, tmp_path / f"lora-{fmt}.safetensors", format=fmt)


@pytest.mark.slow
def test_sample_py_writes_pngs_with_settings_and_reproduces_one_from_them(repos, tmp_path, capsys):
    import sample

    root, _ = repos["dev"]
    lora = random_lora(root, tmp_path)
    argv = [
        "--repo",
        str(root),
        "--prompt",
        PROMPT,
        "--width",
        "56",
        "--height",
        "32",
        "--steps",
        "3",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--lora",
        f"{lora}:0.7",
        "--device",
        "cpu",
    ]
    assert sample.main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == str(tmp_path / "a" / "img_0001.png") and out[-2] == str(tmp_path / "a" / "img_0000.png")
    assert sum(line.startswith("denoise ") for line in out) == 6  # a progress line per step of each image
    assert "note: width 56 → 48 (a multiple of 16)" in out and "seed 5" in out
    assert any(line.startswith("time per stage: load") and "| denoise" in line and "| decode" in line for line in out)
    second = Image.open(out[-1])
    s = read_settings(out[-1])
    assert s["seed"] == 6 and s["width"] == 48 and [(x["path"], x["scale"]) for x in s["loras"]] == [(str(lora), 0.7)]

    # the same image from its own settings, through --from
    assert sample.main(["--repo", str(root), "--from", out[-1], "--output-dir", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out.splitlines()[-1]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(second))
    # and the LoRA mattered
    assert sample.main([*argv[:-4], "--output-dir", str(tmp_path / "c")]) == 0  # without --lora
    plain = capsys.readouterr().out.splitlines()[-1]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(tmp_path / "a" / "img_0000.png")))


def test_several_loras_stack_with_their_scales(repos, tmp_path):
    root, _ = repos["schnell"]
    a, b = random_lora(root, tmp_path, "kohya"), random_lora(root, tmp_path, "diffusers")
    pipe = FluxPipeline.from_files(repo=root, device="cpu")
    base = pipe("x", width=32, height=32, seed=0, output="tensor")
    pipe.load_lora(a, 0.5)
    one = pipe("x", width=32, height=32, seed=0, output="tensor")
    pipe.load_lora(b, 0.5)
    two = pipe("x", width=32, height=32, seed=0, output="tensor")
    assert (base - one).abs().max() > 1e-3 and (one - two).abs().max() > 1e-3
    loras = read_settings(pipe("x", width=32, height=32)[0])["loras"]
    assert [(x["path"], x["scale"]) for x in loras] == [(str(a), 0.5), (str(b), 0.5)]
    assert [x["sha256"] for x in loras] == [sha256(a), sha256(b)]


@pytest.mark.slow
def test_from_is_self_contained_from_another_folder_and_says_when_a_lora_changed(repos, tmp_path, capsys, monkeypatch):
    import shutil

    import sample

    root, _ = repos["dev"]
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(random_lora(root, tmp_path), work / "style.safetensors")
    monkeypatch.chdir(work)  # relative paths, as typed by hand
    argv = [
        "--repo",
        str(root),
        "--prompt",
        PROMPT,
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--lora",
        "style.safetensors:0.7",
        "--max-length",
        "16",
        "--output-dir",
        "out",
    ]
    assert sample.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    made = work / out[-1]
    seed = read_settings(made)["seed"]
    assert f"seed {seed} (drawn at random; --seed to choose)" in out

    monkeypatch.chdir(elsewhere)  # no --repo, no --lora, no --max-length: all from the image
    assert sample.main(["--from", str(made), "--output-dir", "again"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert np.array_equal(np.asarray(Image.open(elsewhere / out[-1])), np.asarray(Image.open(made)))
    assert not any(line.startswith("note: the LoRA") for line in out)
    assert sample.main(["--from", str(made), "--max-length", "512", "--output-dir", "other"]) == 0  # T5's default
    longer = capsys.readouterr().out.splitlines()[-1]
    assert not np.array_equal(np.asarray(Image.open(elsewhere / longer)), np.asarray(Image.open(made)))

    shutil.copy(random_lora(repos["dev"][0], tmp_path / "work", "diffusers"), work / "style.safetensors")  # changed
    assert sample.main(["--from", str(made), "--output-dir", "changed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"note: the LoRA {work / 'style.safetensors'} differs from the one") for line in out)
    assert not np.array_equal(np.asarray(Image.open(elsewhere / out[-1])), np.asarray(Image.open(made)))


def test_sample_py_takes_bfl_spellings_and_num_with_official_weights(repos, tmp_path, capsys):
    import sample

    root, _ = repos["schnell"]
    argv = [
        "--repo",
        str(root),
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--num_steps",
        "1",
        "--output_dir",
        str(tmp_path / "o"),
        "--num",
        "2",
        "--seed",
        "9",
    ]
    assert sample.main(argv) == 0
    written = sorted((tmp_path / "o").glob("*.png"))
    assert len(written) == 2  # --num is --num-images: not ignored with --repo
    assert [(read_settings(p)["seed"], read_settings(p)["steps"]) for p in written] == [(9, 1), (10, 1)]
    args = sample.parse_args(
        ["--name", "flux-dev-kontext", "--max_length=77", "--negative_prompt", "snake_case", "--out", "imgs"]
    )
    assert (args.variant, args.max_length, args.negative_prompt) == ("flux-dev-kontext", 77, "snake_case")
    assert args.output_dir == Path("imgs")


@pytest.mark.parametrize("case", ["missing weights", "unreadable image", "mask of the wrong size", "foreign LoRA"])
def test_sample_py_bad_input_exits_non_zero_and_writes_nothing(repos, tmp_path, capsys, case):
    import sample
    from safetensors.torch import save_file

    root, _ = repos["fill"]
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    args = [
        "--repo",
        str(root),
        "--prompt",
        "x",
        "--image",
        str(tmp_path / "image.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--steps",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    if case == "missing weights":
        args += ["--flux", str(tmp_path / "flux1-dev.safetensors")]
        expected = "flux1-dev.safetensors"
    elif case == "unreadable image":
        (tmp_path / "image.png").write_bytes(b"not an image")
        expected = "image.png: cannot be read as an image"
    elif case == "mask of the wrong size":
        Image.new("L", (32, 16)).save(tmp_path / "mask.png")
        expected = "mask.png: the mask is 32×16, the image 32×32"
    else:  # an SDXL LoRA: its keys name no layer of a FLUX transformer
        sdxl = {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        }
        save_file(sdxl, tmp_path / "sdxl.safetensors")
        args += ["--lora", str(tmp_path / "sdxl.safetensors")]
        expected = "sdxl.safetensors: no key names a linear layer of this model: a LoRA for another architecture?"
    assert sample.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: ") and expected in err
    assert not (tmp_path / "out").exists()


def test_sample_py_exit_code_of_a_bad_input_in_a_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--flux",
            str(tmp_path / "nowhere.safetensors"),
            "--prompt",
            "x",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "nowhere.safetensors" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
