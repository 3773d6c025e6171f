"""The embedded default's VAE: shipped with the package, read by the default run, trained again by one command."""

import math
from dataclasses import replace

import pytest
import torch

from minflux.files.load import load_ae
from minflux.files.weights import read_metadata, read_state_dict
from minflux.presets import AE_SMALL
from minflux.tasks import embedded
from minflux.tasks.data import triptychs
from minflux.tasks.runs import TrainConfig
from minflux.tasks.scenes import SyntheticTriptychs, split_triptych
from minflux.tasks.vis2ir import reconstruct_infrared

# The shipped VAE's bound on the 32 held-out infrared panels was measured at SHIPPED_BOUND_DB (study/BENCH.md); another
# CPU's convolutions round differently, by far less than this margin.
SHIPPED_BOUND_DB = 29.5
MARGIN_DB = 0.5


@pytest.fixture(scope="module")
def default_scenes():
    cfg = TrainConfig()
    train = SyntheticTriptychs(cfg.train_samples, cfg.panel_size, "train", cfg.seed)
    return train, embedded.vae_scenes(train)  # [512, 3, 64, 192]


def test_the_shipped_vae_is_the_default_recipes(default_scenes):
    """The file in the package records the recipe of TrainConfig's defaults: a change to the recipe (its steps, the
    batch mix, the scenes) without training the VAE again fails here, and the default run would train its own."""
    _, scenes = default_scenes
    cfg = TrainConfig()
    assert embedded.SHIPPED_VAE.exists()
    assert embedded.shipped_recipe() == embedded.vae_recipe(AE_SMALL, scenes, cfg.vae_steps, seed=cfg.seed)
    assert embedded.shipped_recipe() != embedded.vae_recipe(AE_SMALL, scenes, cfg.vae_steps + 1, seed=cfg.seed)
    assert embedded.shipped_recipe() != embedded.vae_recipe(AE_SMALL, scenes[:-1], cfg.vae_steps, seed=cfg.seed)


def test_the_default_run_reads_the_shipped_vae_and_trains_none(default_scenes, tmp_path, monkeypatch, capsys):
    train, _ = default_scenes

    def no_training(*args, **kwargs):
        raise AssertionError("the default run trained a VAE")

    monkeypatch.setattr(embedded, "train_autoencoder", no_training)
    cfg = replace(TrainConfig(), output_dir=str(tmp_path / "out"))
    run = tmp_path / "run"
    run.mkdir()
    ae, _, _ = embedded.embedded_parts(cfg, train, run, torch.device("cpu"))
    shipped = read_state_dict(embedded.SHIPPED_VAE)
    copied = read_state_dict(run / "ae.safetensors")
    assert shipped.keys() == copied.keys() and all(torch.equal(shipped[k], copied[k]) for k in shipped)
    assert not (tmp_path / "out" / "cache").exists()
    # however few scenes the run trains on, the VAE's 512 are the generator's: the shipped one still serves
    few = SyntheticTriptychs(16, cfg.panel_size, "train", cfg.seed)
    assert torch.equal(embedded.vae_scenes(few), embedded.vae_scenes(train))
    embedded.embedded_parts(replace(cfg, train_samples=16), few, run, torch.device("cpu"))
    # another recipe trains its own, and says why first
    with pytest.raises(AssertionError, match="trained a VAE"):
        embedded.embedded_parts(replace(cfg, vae_steps=cfg.vae_steps - 1), train, run, torch.device("cpu"))
    assert f"vae: --vae-steps {cfg.vae_steps - 1}: not the shipped VAE's recipe" in capsys.readouterr().out


def test_the_shipped_vae_reconstructs_the_held_out_infrared_at_its_measured_bound():
    held = triptychs(SyntheticTriptychs(32, 64, "heldout", 0))  # [32, 3, 64, 192]
    ae = load_ae(embedded.SHIPPED_VAE)
    with torch.no_grad():
        recon = torch.cat([reconstruct_infrared(ae, part, "zeroconv") for part in held.split(8)])
    mse = ((recon.clamp(-1, 1) - split_triptych(held)[1]) / 2).pow(2).mean().item()
    assert 10 * math.log10(1 / mse) >= SHIPPED_BOUND_DB - MARGIN_DB
    assert "torch" in read_metadata(embedded.SHIPPED_VAE)["minflux.trained_with"]


def test_training_the_vae_again_gives_the_same_weights(tmp_path, capsys):
    """The command that trained the shipped file, for 3 steps, twice: the same tensors, bit for bit, and the same
    metadata (safetensors writes the metadata's keys in an order of its own, so the files' bytes may differ there)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert embedded.main(["--out", str(a), "--steps", "3"]) == 0
    assert embedded.main(["--out", str(b), "--steps", "3"]) == 0
    ta, tb = read_state_dict(a), read_state_dict(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert read_metadata(a) == read_metadata(b)
    assert read_metadata(a)["minflux.vae_recipe"] != embedded.shipped_recipe()  # 3 steps: another recipe
    before = a.read_bytes()
    assert embedded.main(["--out", str(a), "--steps", "3"]) == 2  # kept unless --overwrite
    assert "exists" in capsys.readouterr().err and a.read_bytes() == before
    assert embedded.main(["--out", str(tmp_path / "c.safetensors"), "--steps", "0"]) == 2
    assert not (tmp_path / "c.safetensors").exists()
