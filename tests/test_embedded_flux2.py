"""FLUX.2's embedded default: the small Qwen3 and its tokenizer in klein's layout, and the shipped Flux2AutoEncoder."""

import math
from dataclasses import replace

import pytest
import torch
from einops import rearrange
from safetensors.torch import save_file
from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

from minflux.autoencoder import AutoEncoder, Flux2AutoEncoder
from minflux.files.load import load_ae
from minflux.files.load_llm import QWEN3_LAYERS, llm_params, load_qwen3
from minflux.files.tokenizers import ChatTokenizer, qwen3_chat
from minflux.files.weights import read_metadata, read_state_dict
from minflux.flux2 import Flux2
from minflux.pipeline_flux2 import check_text_encoder
from minflux.presets import configs
from minflux.tasks import embedded, embedded_flux2
from minflux.tasks.data import triptychs
from minflux.tasks.runs import TrainConfig
from minflux.tasks.scenes import SyntheticTriptychs, split_triptych

AE_PARAMS = configs["flux2-small"].ae_params
# The generated scenes' longest caption is 20 tokens ("a building, a tree, a vehicle and a person on the ground under
# the sky, infrared view"), the chat template adds 14: 34 in all.
TEMPLATE_TOKENS, LONGEST_CAPTION = 14, 20
MAX_LENGTH = 40
# The shipped VAE reconstructs the 32 held-out infrared panels, each encoded alone, at SHIPPED_BOUND_DB: measured
# 28.94 dB when it was trained (visible panels 21.85, semantic 27.15; FLUX.1's shipped VAE, on the same panels alone:
# 29.56, 22.76, 27.87). Another CPU's convolutions round differently, by far less than the margin.
SHIPPED_BOUND_DB = 28.9
MARGIN_DB = 0.5


@pytest.fixture(scope="module")
def default_train():
    cfg = TrainConfig()
    return SyntheticTriptychs(cfg.train_samples, cfg.panel_size, "train", cfg.seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, default_train):
    """The text encoder of a default run: tokenizer/ and text_encoder/ made from the training captions."""
    folder = tmp_path_factory.mktemp("klein")
    embedded_flux2.write_qwen3_encoder(folder, default_train.captions(), seed=0)
    return folder


def test_the_tokenizer_is_qwen3s_learned_on_the_captions(folder, default_train):
    """Every caption word and the template's words are single tokens; the template adds 14 tokens, as counted in
    MAX_LENGTH's comment; transformers' Qwen2TokenizerFast reads the folder and gives the same ids."""
    tok = ChatTokenizer(folder / "tokenizer", "qwen3", MAX_LENGTH)
    ids, mask = tok([""])
    assert mask.sum() == TEMPLATE_TOKENS
    captions = default_train.captions() + SyntheticTriptychs(32, 64, "heldout", 0).captions()
    ids, mask = tok(captions)
    assert mask.sum(1).max() == TEMPLATE_TOKENS + LONGEST_CAPTION <= MAX_LENGTH
    pieces = tok.backend.encode(qwen3_chat("a tree and two people on the ground under the sky, infrared view")).tokens
    assert pieces[:3] == ["<|im_start|>", "user", "Ċ"] and "Ġpeople" in pieces and "assistant" in pieces
    hf = Qwen2TokenizerFast.from_pretrained(str(folder / "tokenizer"))
    text = hf.apply_chat_template(
        [{"role": "user", "content": captions[0]}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert hf(text)["input_ids"] == ids[0, : mask[0].sum()].tolist()


def test_the_text_encoder_reads_back_as_klein_and_as_transformers(folder, tmp_path):
    """load_qwen3 reads text_encoder/ with tokenizer/ beside it, as klein's: [B, 40, 3 × 64] for flux2-small's
    txt_in, as the pipeline checks it; transformers' Qwen3ForCausalLM reads the same folder and gives the same
    hidden states."""
    torch.manual_seed(0)
    save_file(Flux2(configs["flux2-small"].params).state_dict(), tmp_path / "flux.safetensors")
    assert check_text_encoder(tmp_path / "flux.safetensors", folder / "text_encoder") is False  # klein's: Qwen3
    params, _ = llm_params(folder / "text_encoder", "qwen3")
    assert 3 * params.hidden_size == configs["flux2-small"].params.context_in_dim == 192
    assert params.num_layers > max(QWEN3_LAYERS)  # state 27 an inner layer's, as in klein's 36-layer Qwen3
    encoder = load_qwen3(folder / "text_encoder", max_length=MAX_LENGTH)
    prompts = [
        "a tree on the ground under the sky, infrared view",
        "a person on the ground under the sky, infrared view",
    ]
    states = encoder(prompts)
    assert states.shape == (2, MAX_LENGTH, 192) and torch.isfinite(states).all()
    # about unit size in each of the three stacked layers (measured 1.10 to 1.16; seeds 1, 2: up to 1.25), and the
    # captions told apart
    for layer in states.unflatten(-1, (3, 64)).unbind(-2):
        assert 0.5 < layer.std() < 2.0
    assert (states[0] - states[1]).norm() > 0.1 * states[
        0
    ].norm()  # measured 0.22 (seeds 1, 2: 0.20, 0.22): one word differs

    ids, mask = encoder.tokenizer(prompts)
    reference = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    want = torch.cat([out.hidden_states[k] for k in QWEN3_LAYERS], dim=-1)
    assert ((states - want).abs().max() / want.std()).item() <= 1e-5


def test_the_text_encoder_is_kept_and_reproducible(folder, tmp_path, default_train):
    before = read_state_dict(folder / "text_encoder")
    embedded_flux2.write_qwen3_encoder(folder, ["other captions"], seed=1)  # already there: kept
    again = read_state_dict(folder / "text_encoder")
    assert all(torch.equal(before[k], again[k]) for k in before)
    embedded_flux2.write_qwen3_encoder(tmp_path, default_train.captions(), seed=0)  # the same seed: the same weights
    made = read_state_dict(tmp_path / "text_encoder")
    assert made.keys() == before.keys() and all(torch.equal(before[k], made[k]) for k in before)
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == (
        folder / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    embedded_flux2.write_qwen3_encoder(tmp_path / "empty", ["", ""])  # a folder without captions still encodes ""
    assert load_qwen3(tmp_path / "empty" / "text_encoder", max_length=16)([""]).shape == (1, 16, 192)


def test_the_shipped_vae_is_the_default_recipes(default_train):
    """The shipped file records the recipe of TrainConfig's defaults for a Flux2AutoEncoder: a default FLUX.2 run
    reads it. The kind of VAE is part of the recipe, FLUX.1's recipes unchanged by it."""
    cfg = TrainConfig()
    scenes = embedded.vae_scenes(default_train)  # [512, 3, 64, 192]
    recipe = embedded.vae_recipe(AE_PARAMS, scenes, cfg.vae_steps, seed=cfg.seed, model=Flux2AutoEncoder)
    assert embedded.shipped_recipe(embedded_flux2.SHIPPED_VAE_FLUX2) == recipe
    assert embedded.vae_recipe(AE_PARAMS, scenes, cfg.vae_steps, seed=cfg.seed, model=AutoEncoder) != recipe
    assert embedded.shipped_recipe() != recipe  # FLUX.1's file


def test_the_default_run_reads_the_shipped_vae_and_writes_the_klein_layout(default_train, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the default run trained a VAE")

    monkeypatch.setattr(embedded, "train_autoencoder", no_training)
    cfg = replace(TrainConfig(), preset="flux2-small", output_dir=str(tmp_path / "out"), t5_max_length=MAX_LENGTH)
    run = tmp_path / "run"
    run.mkdir()
    ae, text_encoder = embedded_flux2.embedded_parts_flux2(cfg, default_train, run, torch.device("cpu"))
    assert isinstance(ae, Flux2AutoEncoder) and isinstance(load_ae(run / "ae.safetensors"), Flux2AutoEncoder)
    shipped, copied = read_state_dict(embedded_flux2.SHIPPED_VAE_FLUX2), read_state_dict(run / "ae.safetensors")
    assert shipped.keys() == copied.keys() and all(torch.equal(shipped[k], copied[k]) for k in shipped)
    assert {p.name for p in run.iterdir()} == {"ae.safetensors", "text_encoder", "tokenizer"}
    assert text_encoder(["a tree"]).shape == (1, MAX_LENGTH, 192)
    assert not (tmp_path / "out" / "cache").exists()


def test_the_shipped_vae_reconstructs_the_held_out_panels_at_its_measured_bound():
    held = triptychs(SyntheticTriptychs(32, 64, "heldout", 0))  # [32, 3, 64, 192]
    ae = load_ae(embedded_flux2.SHIPPED_VAE_FLUX2)
    assert isinstance(ae, Flux2AutoEncoder) and ae.latent_channels == 128 and ae.downscale == 16
    infrared = split_triptych(held)[1]  # [32, 3, 64, 64], each encoded alone, as a FLUX.2 reference or target
    with torch.no_grad():
        recon = torch.cat([ae.decode(ae.encode(part)) for part in infrared.split(8)])
    mse = ((recon.clamp(-1, 1) - infrared) / 2).pow(2).mean().item()
    assert 10 * math.log10(1 / mse) >= SHIPPED_BOUND_DB - MARGIN_DB
    assert "torch" in read_metadata(embedded_flux2.SHIPPED_VAE_FLUX2)["minflux.trained_with"]


def test_a_short_flux2_vae_training_is_deterministic_and_its_batch_norm_normalises(tmp_path):
    """Three steps on 32 scenes, twice: the same tensors bit for bit. The batch norm's statistics, measured on a
    sample of the training panels, normalise the latents of all of them: per channel mean 0 and std 1, within the
    sample's error (measured: |mean| <= 0.054, std 0.94 to 1.08; the bounds leave room for another CPU's rounding)."""
    scenes = triptychs(SyntheticTriptychs(32, 64, "train", 0))  # [32, 3, 64, 192]
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        embedded.train_autoencoder(AE_PARAMS, scenes, 3, path, model=Flux2AutoEncoder)
    a, b = (read_state_dict(path) for path in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(paths[0]) == read_metadata(paths[1])

    ae = load_ae(paths[0])
    assert isinstance(ae, Flux2AutoEncoder) and not torch.equal(ae.bn.running_var, torch.ones(128))
    visible, infrared, semantic = split_triptych(scenes)
    with torch.no_grad():  # the panels as the training mix holds them: alone, and visible beside infrared
        latents = ae.encode(torch.cat([visible, infrared, semantic])), ae.encode(scenes[..., :128])
    z = torch.cat([rearrange(latent, "b c h w -> c (b h w)") for latent in latents], dim=1)  # [128, 2560]
    assert z.mean(dim=1).abs().max() < 0.2
    assert (z.std(dim=1) - 1).abs().max() < 0.2


def test_the_command_keeps_an_existing_out(tmp_path, capsys):
    out = tmp_path / "vae.safetensors"
    out.write_bytes(b"kept")
    assert embedded_flux2.main(["--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"kept"
