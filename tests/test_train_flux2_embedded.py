"""The embedded FLUX.2 default (`python train.py --preset flux2-small`), at a smoke size: a small FLUX.2 trained from
scratch on the generated scenes as multi-reference edits (visible at t = 10, the map at t = 20, the infrared panel
the target), its folder in the official [klein] layout, an exact resume, sample.py --run, bad flags refused."""

import json

import pytest
import torch

import sample
import train
from minflux.autoencoder import Flux2AutoEncoder
from minflux.files.load import load_ae, load_flux
from minflux.files.weights import read_state_dict
from minflux.flux2 import Flux2
from minflux.sampling import empirical_mu, latent_ids_flux2, pack_flux2, sample_t
from minflux.tasks import TASKS
from minflux.tasks.data import triptychs
from minflux.tasks.scenes import split_triptych
from minflux.tasks.vis2ir_flux2 import Flux2Vis2IRTask
from tests.test_train import TINY


def run_flux2(tmp_path, *args) -> int:
    return train.main([*TINY, "--preset", "flux2-small", "--out", str(tmp_path), *args])


def test_the_batch_is_the_infrared_panel_with_two_references_at_their_own_t(tmp_path):
    cfg = train.parse([*TINY, "--preset", "flux2-small", "--out", str(tmp_path)])
    assert (cfg.task, cfg.semantic, cfg.t5_max_length) == ("kontext", "reference", 40)  # the FLUX.2 defaults
    task = TASKS[cfg.task](cfg, tmp_path, torch.device("cpu"), torch.float32)
    assert isinstance(task, Flux2Vis2IRTask) and isinstance(task.ae, Flux2AutoEncoder) and task.clip is None
    task.encode()
    model, _ = task.build_model()
    assert isinstance(model.flux, Flux2)
    batch = task.draw(torch.Generator().manual_seed(2))

    g = torch.Generator().manual_seed(2)  # draw's order: scenes, times, noise
    idx = torch.randint(16, (4,), generator=g)
    visible, infrared, semantic = split_triptych(triptychs(task.train_set, idx.tolist()))  # [4, 3, 64, 64] each
    with torch.no_grad():
        z, refs = task.ae.encode(infrared), [task.ae.encode(visible), task.ae.encode(semantic)]  # [4, 128, 4, 4]
    assert torch.allclose(batch.x0, pack_flux2(z), atol=1e-5) and batch.x0.shape == (4, 16, 128)
    assert torch.allclose(batch.inputs.img_cond_seq, torch.cat([pack_flux2(r) for r in refs], 1), atol=1e-5)
    ids = torch.cat([latent_ids_flux2(r, t=10.0 * (k + 1)) for k, r in enumerate(refs)], dim=1)  # t 10, then 20
    assert torch.equal(batch.inputs.img_cond_seq_ids, ids) and torch.equal(batch.inputs.img_ids, latent_ids_flux2(z))
    assert torch.equal(batch.t, sample_t(4, "logit_normal", mu=empirical_mu(16, 2), generator=g))
    assert torch.equal(batch.noise, torch.randn(4, 16, 128, generator=g))
    assert batch.guidance is None and batch.inputs.y is None and batch.inputs.txt.shape == (4, 40, 192)
    assert torch.equal(batch.inputs.txt_ids[0, :, 3], torch.arange(40.0))  # the text's order on the fourth axis


@pytest.mark.slow
def test_the_embedded_flux2_default_trains_resumes_and_samples(tmp_path, capsys):
    assert run_flux2(tmp_path, "--steps", "4") == 0
    run = tmp_path / "flux2-kontext-reference"
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(run)
    assert "references [32, 128]" in out  # two references of 16 tokens each
    for name in ("transformer.safetensors", "ae.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "metrics.json", "samples.png", "loss.png"):  # fmt: skip
        assert (run / name).is_file(), name
    assert isinstance(load_flux(run / "transformer.safetensors"), Flux2)
    assert isinstance(load_ae(run / "ae.safetensors"), Flux2AutoEncoder)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 < metrics["heldout_psnr"] < 100 and 0 < metrics["vae_psnr"] < 100

    assert run_flux2(tmp_path, "--steps", "4", "--stop-at", "2", "--name", "halves") == 0
    assert run_flux2(tmp_path, "--resume", str(tmp_path / "halves")) == 0
    a = read_state_dict(run / "transformer.safetensors")
    b = read_state_dict(tmp_path / "halves" / "transformer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert sample.main(["--run", str(run), "--num-images", "2", "--output-dir", str(tmp_path / "edits")]) == 0
    out = capsys.readouterr().out
    assert "2 held-out scenes, 2 Euler steps" in out and (tmp_path / "edits" / "sample-0.png").is_file()

    from minflux.study.maps import main as maps

    assert maps(["text", "--run", str(run), "--out", str(tmp_path / "maps.png")]) == 0  # the chat template's tokens
    assert "to the 40 text tokens" in capsys.readouterr().out and (tmp_path / "maps.png").is_file()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--task", "vis2ir"], "--task vis2ir: --preset flux2-small trains the scenes as multi-reference edits"),
        (["--semantic", "zeroconv"], "--semantic zeroconv: --preset flux2-small trains"),
        (["--semantic", "blocks"], "--semantic blocks: --preset flux2-small trains"),
    ],
)
def test_what_the_flux2_default_cannot_train_is_refused(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as e:
        run_flux2(tmp_path, *flags)
    assert e.value.code == 2 and named in capsys.readouterr().err and not any(tmp_path.iterdir())
