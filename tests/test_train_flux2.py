"""train.py --task t2i on FLUX.2: a LoRA on a tiny [klein] Base repo (diffusers layout, Qwen3 text encoder) from an
image + caption folder, resumed exactly, sampled by sample.py; the distilled klein and FLUX.1 parts refused.

No downloads: tests/flux2_helpers.write_klein_repo writes the repo; "base" in its folder name and model_index.json
make it Base, as FLUX.2-klein-base-4B.
"""

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("diffusers")

import train  # noqa: E402
from minflux.files.lora_files import lora_generation  # noqa: E402
from minflux.files.weights import read_state_dict  # noqa: E402
from minflux.sampling import empirical_mu, latent_ids_flux2, pack_flux2, sample_t, txt_ids_flux2  # noqa: E402
from minflux.tasks import TASKS  # noqa: E402
from minflux.tasks.t2i_flux2 import Flux2T2ITask  # noqa: E402
from tests.flux2_helpers import write_klein_repo  # noqa: E402
from tests.flux_helpers import random_image, resume_matches_straight  # noqa: E402

CAPTIONS = ["a red square on white", "a blue circle on black", "a green stripe"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """{base, distilled}: one tiny klein repo as Base, and the same files as the distilled klein (model_index.json)."""
    root = tmp_path_factory.mktemp("flux2")
    base = write_klein_repo(root / "FLUX.2-klein-base-tiny")
    (base / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": False}))
    distilled = root / "FLUX.2-klein-tiny"
    distilled.mkdir()
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        (distilled / part).symlink_to(base / part)
    (distilled / "model_index.json").write_text(json.dumps({"is_distilled": True}))
    return {"base": base, "distilled": distilled}


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, caption in enumerate(CAPTIONS):
        random_image(i, size=(48, 32)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption + "\n")
    return data


def run_flux2(tmp_path, repo, data, *args) -> int:
    return train.main([
        "--task", "t2i", "--repo", str(repo), "--data", str(data), "--out", str(tmp_path / "runs"),
        "--resolution", "32", "--batch-size", "1", "--lora-rank", "4", "--lr", "1e-2", "--t5-max-length", "40",
        "--sample-steps", "2", "--gradient-checkpointing", "false", *args,
    ])  # fmt: skip


def test_klein_base_lora_trains_samples_with_true_cfg_and_loads_in_sample_py(tmp_path, repos, folder, capsys):
    import sample

    assert run_flux2(tmp_path, repos["base"], folder, "--steps", "4", "--name", "base", "--sample-every", "2") == 0
    run = tmp_path / "runs" / "base"
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(run)
    assert "data: 3 images, 3 distinct captions; sizes 32×32 (3); text [40, 192]" in out  # 3 Qwen3 layers × 64
    assert "model: custom" in out and 'true CFG 4.0 against ""' in out  # no official size: sampled as Base
    for name in ("lora.safetensors", "config.toml", "metrics.json", "log.jsonl", "loss.png", "samples.png"):
        assert (run / name).is_file(), name
    assert (run / "samples" / "step-000002.png").is_file()
    assert Image.open(run / "samples.png").info["true_cfg"] == "4.0"
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    config = (run / "config.toml").read_text()
    assert 'text_encoder = "' in config and "t5_max_length = 40" in config

    lora = read_state_dict(run / "lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in lora)  # kohya's layout, the default
    assert lora_generation({k: list(v.shape) for k, v in lora.items()})[0] == "FLUX.2"

    common = ["--repo", str(repos["base"]), "--prompt", CAPTIONS[0], "--seed", "1", "--steps", "2"]
    common += ["--width", "32", "--height", "32", "--max-length", "40"]

    def made(name, *args) -> Image.Image:
        assert sample.main([*common, *args, "--output-dir", str(tmp_path / name)]) == 0
        (png,) = (tmp_path / name).glob("*.png")
        return Image.open(png)

    plain, with_lora = made("plain"), made("lora", "--lora", f"{run / 'lora.safetensors'}:1")
    assert plain.size == with_lora.size == (32, 32)
    assert plain.tobytes() != with_lora.tobytes()

    # the same file in diffusers' Flux2KleinPipeline: minflux's pipeline's pixels
    from tests.test_flux2_pipeline import ours, theirs

    pipe = theirs(repos["base"], distilled=False)
    pipe.load_lora_weights(str(run / "lora.safetensors"))
    want = pipe(prompt=CAPTIONS[0], height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
                generator=[torch.Generator().manual_seed(1)], output_type="pt").images  # fmt: skip
    mine = ours(repos["base"], "flux2-klein-base-4b")
    mine.load_lora(run / "lora.safetensors")
    got = mine(CAPTIONS[0], width=32, height=32, num_steps=2, seed=1, output="tensor")
    assert (got - want).abs().max() <= 1e-4


def test_the_batch_is_flux2s_cache_ids_and_shifted_times(tmp_path, repos, folder):
    """One drawn batch, rebuilt by hand: the VAE's normalised mean packed by pack_flux2, 4-axis ids, no pooled vector
    and no guidance (klein), t shifted by empirical_mu at Base's 50 sampling steps."""
    argv = ["--task", "t2i", "--repo", str(repos["base"]), "--data", str(folder), "--resolution", "32"]
    cfg = train.parse([*argv, "--t5-max-length", "40", "--batch-size", "2", "--lora-rank", "4"])
    task = TASKS["t2i"](cfg, tmp_path, torch.device("cpu"), torch.float32)
    ae = task.ae
    task.encode()
    model, _ = task.build_model()
    assert isinstance(task, Flux2T2ITask) and task.spec.name == "flux2-klein-base-4b" and task.spec.num_steps == 50
    batch = task.draw(torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # draw's order: group, images, times, noise
    torch.multinomial(torch.tensor([3.0]), 1, generator=g)
    idx = torch.randint(3, (2,), generator=g)
    with torch.no_grad():
        x0 = pack_flux2(ae.encode(torch.stack([task.data[int(i)]["image"] for i in idx])))  # [2, 4, 32]
    assert torch.allclose(batch.x0, x0, atol=1e-5) and batch.x0.shape == (2, 4, 32)
    t = sample_t(2, "logit_normal", mu=empirical_mu(4, 50), generator=g)
    assert torch.equal(batch.t, t) and torch.equal(batch.noise, torch.randn(2, 4, 32, generator=g))
    inp = batch.inputs
    assert batch.guidance is None and inp.y is None and inp.txt.shape == (2, 40, 192)
    assert torch.equal(inp.img_ids, latent_ids_flux2(torch.zeros(2, 32, 2, 2))) and torch.equal(
        inp.txt_ids, txt_ids_flux2(2, 40)
    )
    assert torch.equal(inp.txt, task.texts.t5([CAPTIONS[int(i)] for i in idx]))


def test_flux2_resume_continues_exactly(tmp_path, repos, folder):
    common = ["--steps", "4", "--caption-dropout", "0.5", "--sample-steps", "0"]
    assert run_flux2(tmp_path, repos["base"], folder, *common, "--name", "straight") == 0
    assert run_flux2(tmp_path, repos["base"], folder, *common, "--stop-at", "2", "--name", "halves") == 0
    resume_matches_straight(tmp_path / "runs")


def refused(tmp_path, capsys, *argv) -> str:
    """train.py's message for a command refused with exit code 2; nothing is written."""
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and not (tmp_path / "runs").exists()
    return capsys.readouterr().err


def test_distilled_klein_is_refused_unless_insisted(tmp_path, repos, folder, capsys):
    argv = ["--task", "t2i", "--repo", str(repos["distilled"]), "--data", str(folder)]
    err = refused(tmp_path, capsys, *argv)
    assert f"--repo {repos['distilled']}: FLUX.2 [klein] distilled" in err
    assert "grey images" in err and "FLUX.2-klein-base-4B" in err and "--allow-distilled" in err
    cfg = train.parse([*argv, "--allow-distilled"])
    assert cfg.text_encoder.endswith("text_encoder") and cfg.t5_max_length == 512  # FLUX.2's prompt length


def test_what_flux2_cannot_train_is_refused_naming_the_flag(tmp_path, repos, folder, capsys):
    t5 = tmp_path / "text_encoder_2"  # a FLUX.1 T5 folder, as far as its header and config tell
    t5.mkdir()
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, t5 / "model.safetensors")
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    repo = ["--repo", str(repos["base"]), "--data", str(folder)]
    err = refused(tmp_path, capsys, "--task", "t2i", *repo, "--text-encoder", str(t5))
    assert f"--text-encoder {t5}: " in err and "Qwen3" in err
    err = refused(tmp_path, capsys, "--task", "t2i", *repo, "--t5", str(t5))
    assert f"--t5 {t5}: FLUX.1's text encoder" in err
    err = refused(tmp_path, capsys, *repo)  # the default task, vis2ir
    assert "--task vis2ir: " in err and "trains --task t2i or --task kontext" in err
    err = refused(tmp_path, capsys, "--task", "t2i", "--data", str(folder), "--text-encoder", str(t5))
    assert f"--text-encoder {t5}: FLUX.2's text encoder" in err
    shutil.rmtree(t5)


@pytest.fixture(scope="module")
def dev_repo(repos):
    """A tiny FLUX.2 [dev]: its transformer has the guidance embedding, its text encoder is a Mistral of 30 layers
    (states 10, 20, 30 stacked: 3 × 64 = 192 channels) with a Mistral tokenizer; the VAE is the klein repo's."""
    from diffusers import Flux2Transformer2DModel
    from transformers import MistralConfig, MistralForCausalLM

    from tests.flux2_helpers import TINY2_VARIANTS, diffusers_config
    from tests.flux_helpers import randomize_
    from tests.test_qwen3 import SMALL, randomize, write_mistral_tokenizer

    repo = repos["base"].parent / "FLUX.2-dev-tiny"
    transformer = Flux2Transformer2DModel(**dict(diffusers_config(TINY2_VARIANTS["dev"]), joint_attention_dim=3 * 64))
    randomize_(transformer, seed=4).save_pretrained(repo / "transformer")
    randomize(MistralForCausalLM(MistralConfig(**dict(SMALL, num_hidden_layers=30)))).save_pretrained(
        repo / "text_encoder"
    )
    write_mistral_tokenizer(repo / "tokenizer")
    (repo / "vae").symlink_to(repos["base"] / "vae")
    return repo


def test_dev_trains_with_its_guidance_embedding_and_mistral(tmp_path, dev_repo, folder, capsys):
    """[dev]: Mistral's states in the cache, the guidance embedding fed --guidance (1.0 by default, as FLUX.1 dev's
    LoRAs), t shifted at dev's 50 sampling steps; samples at dev's guidance 4.0, without true CFG."""
    argv = ["--task", "t2i", "--repo", str(dev_repo), "--data", str(folder), "--resolution", "32"]
    length = [
        "--t5-max-length",
        "160",
    ]  # Mistral's template holds FLUX.2's system message: ~110 tokens before the prompt
    cfg = train.parse([*argv, *length, "--batch-size", "2", "--lora-rank", "4"])
    task = TASKS["t2i"](cfg, tmp_path, torch.device("cpu"), torch.float32)
    task.encode()
    task.build_model()
    assert task.spec.name == "flux2-dev" and task.texts.txt.shape[1:] == (160, 192) and task.texts.y is None
    batch = task.draw(torch.Generator().manual_seed(3))
    assert torch.equal(batch.guidance, torch.ones(2))
    assert run_flux2(tmp_path, dev_repo, folder, *length, "--steps", "2", "--name", "dev", "--guidance", "2.5") == 0
    run = tmp_path / "runs" / "dev"
    out = capsys.readouterr().out
    assert "guidance 4.0 →" in out and "true CFG" not in out  # dev samples with its embedded guidance
    assert "guidance = 2.5" in (run / "config.toml").read_text()
    lora = read_state_dict(run / "lora.safetensors")
    assert lora_generation({k: list(v.shape) for k, v in lora.items()})[0] == "FLUX.2"


def test_samples_by_the_distilled_klein_with_the_lora_copied_in(tmp_path, repos, folder, capsys):
    """--sample-flux: a LoRA trained on Base previewed by the distilled klein, at its own 4 steps without CFG."""
    args = ["--steps", "2", "--name", "preview", "--sample-flux", str(repos["distilled"])]
    assert run_flux2(tmp_path, repos["base"], folder, *args) == 0
    out = capsys.readouterr().out
    assert f"samples: 3 captions by {repos['distilled']} with the LoRA, 4 Euler steps" in out
    info = Image.open(tmp_path / "runs" / "preview" / "samples.png").info
    assert info["steps"] == "4" and "true_cfg" not in info  # the distilled model's own sampling

    t5 = tmp_path / "t5.safetensors"  # not FLUX.2
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, t5)
    base = ["--task", "t2i", "--repo", str(repos["base"]), "--data", str(folder)]
    err = refused(tmp_path / "refused", capsys, *base, "--sample-flux", str(t5))
    assert f"--sample-flux {t5}: {t5}: not a FLUX.2 transformer" in err
    err = refused(tmp_path / "refused", capsys, *base, "--sample-flux", str(repos["distilled"]), "--full-finetune")
    assert "--full-finetune trains no LoRA" in err
    err = refused(tmp_path / "refused", capsys, "--sample-flux", str(repos["distilled"]))  # the embedded default
    assert f"--sample-flux {repos['distilled']}: previews a LoRA trained on FLUX.2 weights" in err
