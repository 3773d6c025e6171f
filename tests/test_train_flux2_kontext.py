"""train.py --task kontext on FLUX.2: multi-reference edit LoRAs on a tiny [klein] Base repo from a folder of targets
with instructions and the reference folders control/, control2/; the batch and its loss against diffusers by hand,
an exact resume, the LoRA in sample.py and in diffusers' Flux2KleinPipeline, and bad reference folders refused.
"""

import json
import math

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: E402

import train  # noqa: E402
from minflux.files.images import DataError  # noqa: E402
from minflux.files.weights import read_state_dict  # noqa: E402
from minflux.sampling import empirical_mu, flow_matching_loss, latent_ids_flux2, pack_flux2, sample_t  # noqa: E402
from minflux.tasks import TASKS  # noqa: E402
from minflux.tasks.kontext import Flux2KontextTask  # noqa: E402
from tests.flux_helpers import random_image, resume_matches_straight  # noqa: E402
from tests.test_flux2_pipeline import ours, theirs  # noqa: E402
from tests.test_train_flux2 import repos, run_flux2  # noqa: E402, F401  (repos: the tiny klein Base and distilled)

INSTRUCTIONS = ["make it infrared", "paint the square blue", "turn night into day"]


def write_pairs(root, n_refs: int = 2, sizes=((80, 64), (64, 80))):
    """root/NN.png + NN.txt (targets, instructions) and control/, control2/ ... with an image per target each (of at
    least 64 pixels a side, as FLUX.2's sampling takes them)."""
    root.mkdir()
    folders = [root / ("control" if k == 0 else f"control{k + 1}") for k in range(n_refs)]
    for folder in folders:
        folder.mkdir()
    for i, text in enumerate(INSTRUCTIONS):
        random_image(i, size=(48, 32)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(text + "\n")
        for k, folder in enumerate(folders):
            random_image(10 * (k + 1) + i, size=sizes[k]).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs")


def run_kontext(tmp_path, repo, data, *args) -> int:
    """test_train_flux2's tiny run (32², LoRA rank 4, 2 sampling steps) as an edit run of batch 2."""
    return run_flux2(tmp_path, repo, data, "--task", "kontext", "--batch-size", "2", *args)


def test_the_batch_holds_each_reference_at_its_own_t_and_its_loss_is_diffusers(tmp_path, repos):  # noqa: F811
    """One drawn batch rebuilt by hand (the target's and each control's normalised VAE mean, the controls at
    t = 10 and 20, t shifted by empirical_mu of the target's tokens); its loss equals diffusers' transformer's on
    the sequence [x_t | references] built as Flux2KleinPipeline builds it, the target's tokens kept."""
    pairs = write_pairs(tmp_path / "pairs", sizes=((48, 32), (32, 48)))  # two other aspects than the target's
    argv = ["--task", "kontext", "--repo", str(repos["base"]), "--data", str(pairs), "--resolution", "48"]
    cfg = train.parse([*argv, "--t5-max-length", "40", "--batch-size", "2", "--control-size", "own"])
    task = TASKS["kontext"](cfg, tmp_path, torch.device("cpu"), torch.float32)
    assert isinstance(task, Flux2KontextTask) and task.data.n_references == 2
    task.encode()
    model, _ = task.build_model()
    batch = task.draw(torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # draw's order: group, pairs, times, noise
    torch.multinomial(torch.tensor([3.0]), 1, generator=g)
    idx = torch.randint(3, (2,), generator=g)
    samples = [task.data[int(i)] for i in idx]
    with torch.no_grad():
        x0 = task.ae.encode(torch.stack([s["image"] for s in samples]))  # [2, 32, 3, 3]: 48 × 48 pixels
        refs = [task.ae.encode(torch.stack([s["controls"][k] for s in samples])) for k in range(2)]
    assert [tuple(z.shape[2:]) for z in refs] == [(2, 4), (4, 2)]  # own aspects: 64 × 32, 32 × 64
    assert torch.allclose(batch.x0, pack_flux2(x0), atol=1e-5)
    assert torch.allclose(batch.inputs.img_cond_seq, torch.cat([pack_flux2(z) for z in refs], dim=1), atol=1e-5)
    ids = torch.cat([latent_ids_flux2(z, t=10.0 * (k + 1)) for k, z in enumerate(refs)], dim=1)  # [2, 16, 4]
    assert torch.equal(batch.inputs.img_cond_seq_ids, ids)
    t = sample_t(2, "logit_normal", mu=empirical_mu(9, 50), generator=g)  # the target's 9 tokens, Base's 50 steps
    assert torch.equal(batch.t, t) and batch.guidance is None

    inputs = {k: getattr(batch.inputs, k) for k in ("img_ids", "txt", "txt_ids", "img_cond_seq", "img_cond_seq_ids")}
    with torch.no_grad():
        ours_loss = flow_matching_loss(model, batch.x0, batch.noise, batch.t, None, **inputs)
    ref = Flux2Transformer2DModel.from_pretrained(repos["base"] / "transformer")  # the LoRA is zero: the base's
    pipe, tt = Flux2KleinPipeline, batch.t[:, None, None, None]
    noise = batch.noise.transpose(1, 2).reshape(x0.shape)  # the tokens back on the latent grid: [2, 32, 3, 3]
    x_t = (1 - tt) * x0 + tt * noise
    hidden = torch.cat([pipe._pack_latents(x_t)] + [pipe._pack_latents(z) for z in refs], dim=1)  # [2, 25, 32]
    img_ids = torch.cat(
        [pipe._prepare_latent_ids(x0), pipe._prepare_image_ids([z[:1] for z in refs]).expand(2, -1, -1)], dim=1
    )
    txt_ids = pipe._prepare_text_ids(batch.inputs.txt)
    with torch.no_grad():
        pred = ref(hidden_states=hidden, encoder_hidden_states=batch.inputs.txt, timestep=batch.t,
                   img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=None, return_dict=False)[0][:, :9]  # fmt: skip
    theirs_loss = ((pred - (pipe._pack_latents(noise) - pipe._pack_latents(x0))) ** 2).mean()
    assert torch.equal(img_ids[0].float(), torch.cat([batch.inputs.img_ids[0], ids[0]]))
    assert theirs_loss > 0.1  # random weights predict far from ε − x₀ (the LoRA starts at zero: the base's output)
    assert abs(ours_loss.item() - theirs_loss.item()) <= 1e-5 * theirs_loss.item()


def test_a_two_reference_lora_trains_resumes_and_loads_in_sample_py_and_diffusers(
    tmp_path,
    repos,  # noqa: F811
    pairs,
    capsys,
):
    import sample

    base = repos["base"]
    assert run_kontext(tmp_path, base, pairs, "--steps", "4", "--name", "edits") == 0
    run = tmp_path / "runs" / "edits"
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(run)
    assert "data: 3 pairs, 3 distinct captions" in out and 'true CFG 4.0 against ""' in out
    grid = Image.open(run / "samples.png")
    assert grid.info["true_cfg"] == "4.0" and grid.width > 4 * 32  # reference 1 | reference 2 | edited | target
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)

    common = ["--steps", "4", "--sample-steps", "0", "--caption-dropout", "0.5", "--lora-format", "bfl"]
    assert run_kontext(tmp_path, base, pairs, *common, "--name", "straight") == 0
    assert run_kontext(tmp_path, base, pairs, *common, "--stop-at", "2", "--name", "halves") == 0
    resume_matches_straight(tmp_path / "runs")
    bfl = read_state_dict(tmp_path / "runs" / "straight" / "lora.safetensors")
    assert all(k.startswith("diffusion_model.") for k in bfl)  # BFL's layout, by flag

    lora = run / "lora.safetensors"
    controls = [pairs / "control" / "00.png", pairs / "control2" / "00.png"]
    common = ["--repo", str(base), "--prompt", INSTRUCTIONS[0], "--seed", "1", "--steps", "2", "--width", "32"]
    common += ["--height", "32", "--max-length", "40", "--image", str(controls[0]), "--image", str(controls[1])]

    def made(name, *args) -> Image.Image:
        assert sample.main([*common, *args, "--output-dir", str(tmp_path / name)]) == 0
        (png,) = (tmp_path / name).glob("*.png")
        return Image.open(png)

    plain, with_lora = made("plain"), made("lora", "--lora", f"{lora}:1")
    assert plain.tobytes() != with_lora.tobytes()

    # diffusers' Flux2KleinPipeline with the same LoRA file: the same pixels as minflux's pipeline
    images = [Image.open(c).convert("RGB") for c in controls]
    pipe = theirs(base, distilled=False)
    pipe.load_lora_weights(str(lora))
    want = pipe(prompt=INSTRUCTIONS[0], image=images, height=32, width=32, num_inference_steps=2,
                guidance_scale=4.0, generator=[torch.Generator().manual_seed(1)], output_type="pt").images  # fmt: skip
    mine = ours(base, "flux2-klein-base-4b")
    mine.load_lora(lora)
    got = mine(INSTRUCTIONS[0], width=32, height=32, num_steps=2, seed=1, image=images, output="tensor")
    without = ours(base, "flux2-klein-base-4b")(
        INSTRUCTIONS[0], width=32, height=32, num_steps=2, seed=1, image=images, output="tensor"
    )
    assert (got - without).abs().max() > 1e-3  # the trained LoRA changes the pixels
    assert (got - want).abs().max() <= 1e-4


def test_bad_reference_folders_are_refused_or_skipped(tmp_path, repos, capsys):  # noqa: F811
    argv = ["--task", "kontext", "--repo", str(repos["base"]), "--resolution", "32", "--on-error", "stop"]
    gap = write_pairs(tmp_path / "gap", n_refs=2)
    (gap / "control2").rename(gap / "control3")
    err = run_refused(tmp_path, capsys, *argv, "--data", str(gap))
    assert f"{gap / 'control3'}: a reference folder after a gap: control2/ is missing" in err

    missing = write_pairs(tmp_path / "missing", n_refs=2)
    (missing / "control2" / "01.png").unlink()
    err = run_refused(tmp_path, capsys, *argv, "--data", str(missing))
    assert f"{missing / '01.png'}: a target without its control: no {missing / 'control2'}/01.* image" in err

    orphan = write_pairs(tmp_path / "orphan", n_refs=2)
    random_image(9).save(orphan / "control2" / "07.png")
    err = run_refused(tmp_path, capsys, *argv, "--data", str(orphan))
    assert f"{orphan / 'control2' / '07.png'}: a control without its target" in err

    skip = ["--on-error", "skip", "--steps", "1", "--sample-steps", "0", "--t5-max-length", "40", "--name", "skip"]
    assert train.main([*argv, "--data", str(missing), "--out", str(tmp_path / "runs"), *skip]) == 0
    out = capsys.readouterr().out
    assert "data: skipped 1 unusable file(s)" in out and "data: 2 pairs" in out


def run_refused(tmp_path, capsys, *argv) -> str:
    """The message of a train.py run refused once its data is read (a DataError, which train.py's __main__ prints
    with exit code 2, as tests/test_train_kontext.py checks): no run folder is left."""
    with pytest.raises(DataError) as e:
        train.main([*argv, "--out", str(tmp_path / "runs"), "--t5-max-length", "40", "--name", "refused"])
    assert not (tmp_path / "runs" / "refused").exists()
    return str(e.value)
