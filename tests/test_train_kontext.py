"""train.py --task kontext: a LoRA on a tiny official-layout Kontext checkpoint from a folder of edit pairs.

No downloads: tiny random weights in the official layouts (as in test_train_t2i.py), a folder of targets with .txt
instructions and a control/ folder of the same names. The training losses of Kontext, t2i and Fill are checked
against diffusers' FluxTransformer2DModel fed as diffusers' training scripts feed it
(examples/dreambooth/train_dreambooth_lora_flux_kontext.py and train_dreambooth_lora_flux.py); the LoRA it writes
is read back by sample.py and by diffusers' FluxKontextPipeline.load_lora_weights.
"""

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import sample
import train
from minflux.files.images import DataError
from minflux.files.load import load_flux, save_flux
from minflux.files.lora_files import load_lora
from minflux.files.weights import WeightsError, read_state_dict
from minflux.lora import lora_layers
from minflux.presets import AE_SMALL, FLUX_SMALL
from minflux.sampling import fill_condition, flow_matching_loss, latent_ids, pack, prepare_txt_ids, velocity
from minflux.tasks.pairs import KontextFolder
from minflux.tasks.kontext import KontextTask
from minflux.tasks.t2i import T2ITask
from tests.flux_helpers import diffusers_flux, random_image, resume_matches_straight, save_frozen_parts, tiny_flux

diffusers = pytest.importorskip("diffusers")

# Kontext has dev's shapes (64 input channels, a guidance embedding); the variant in the header tells them apart.
TINY = replace(
    FLUX_SMALL, hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], depth=1, depth_single_blocks=1, guidance_embed=True
)
TINY_FILL = replace(TINY, in_channels=384)
INSTRUCTIONS = ["make the square red", "turn the circle blue", "add a green stripe", "remove the yellow dot"]
ARGS = [
    "--resolution",
    "32",
    "--batch-size",
    "2",
    "--lora-rank",
    "4",
    "--lr",
    "1e-2",
    "--t5-max-length",
    "8",
    "--sample-steps",
    "2",
    "--gradient-checkpointing",
    "false",
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{kontext, dev, fill, ae, clip, t5}: paths of tiny random weights in the official layouts."""
    root = tmp_path_factory.mktemp("weights")
    paths = {
        "kontext": save_flux(tiny_flux(TINY, seed=0), root / "flux1-kontext-dev-tiny.safetensors", "flux-dev-kontext"),
        "dev": save_flux(tiny_flux(TINY, seed=1), root / "flux1-dev-tiny.safetensors", "flux-dev"),
        "fill": save_flux(tiny_flux(TINY_FILL, seed=2), root / "flux1-fill-dev-tiny.safetensors", "flux-dev-fill"),
    }
    torch.manual_seed(0)
    params = replace(AE_SMALL, scale_factor=0.5, shift_factor=0.1)  # a scale and shift that are not the identity
    return {**paths, **save_frozen_parts(root, INSTRUCTIONS, params)}


@pytest.fixture
def pairs(tmp_path):
    """DATA/00.png + 00.txt (target, instruction), DATA/control/00.png (the image the edit starts from), ..."""
    data = tmp_path / "data"
    (data / "control").mkdir(parents=True)
    for i, instruction in enumerate(INSTRUCTIONS):
        random_image(i).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(instruction + "\n")
        random_image(100 + i, size=(44, 40)).save(data / "control" / f"{i:02d}.png")
    return data


def weight_args(weights, model="kontext") -> list[str]:
    return [
        "--flux",
        str(weights[model]),
        "--ae",
        str(weights["ae"]),
        "--clip",
        str(weights["clip"]),
        "--t5",
        str(weights["t5"]),
    ]


def run_kontext(tmp_path, weights, data, *args) -> int:
    return train.main(
        ["--task", "kontext", "--data", str(data), *weight_args(weights), "--out", str(tmp_path / "runs"), *ARGS, *args]
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- 1. the training loss against diffusers ----------------------------------------------------------------------


def diffusers_loss(ref, z, noise, t, guidance, txt, y, cond=None, cond_axis0=1.0):
    """One training loss as diffusers' DreamBooth LoRA scripts compute it (train_dreambooth_lora_flux.py, and
    train_dreambooth_lora_flux_kontext.py with a control): latents [B, 16, h, w], sigmas = t, the noisy target
    packed, the control's packed latents after it with its ids' first column 1, txt_ids zeros, the prediction
    cut to the target's tokens, unpacked, and mean((pred − (noise − x0))²) (weighting_scheme "none": 1).
    `cond` with [B, C', h, w] of Fill's 320 channels instead goes on the channels, as FluxFillPipeline has it."""
    P = diffusers.FluxKontextPipeline
    B, C, h, w = z.shape
    sigmas = t.view(B, 1, 1, 1)
    hidden = P._pack_latents((1 - sigmas) * z + sigmas * noise, B, C, h, w)  # [B, L, 64]
    target_len = hidden.shape[1]
    ids = P._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32)  # [L, 3]
    if cond is not None and cond.ndim == 3:  # Fill: packed masked-image latents and mask, on the channels
        hidden = torch.cat((hidden, cond), dim=2)
    elif cond is not None:  # Kontext: the control's tokens after the target's
        cond_ids = P._prepare_latent_image_ids(B, cond.shape[2] // 2, cond.shape[3] // 2, "cpu", torch.float32)
        cond_ids[..., 0] = cond_axis0
        hidden = torch.cat((hidden, P._pack_latents(cond, B, C, cond.shape[2], cond.shape[3])), dim=1)
        ids = torch.cat((ids, cond_ids), dim=0)
    pred = ref(
        hidden_states=hidden,
        timestep=t,
        guidance=guidance,
        pooled_projections=y,
        encoder_hidden_states=txt,
        txt_ids=torch.zeros(txt.shape[1], 3),
        img_ids=ids,
        return_dict=False,
    )[0]
    pred = P._unpack_latents(pred[:, :target_len], h * 8, w * 8, 8)  # [B, 16, h, w]
    return ((pred.float() - (noise - z).float()) ** 2).reshape(B, -1).mean(1).mean()


def task_batch(task_cls, weights, data, tmp_path, model, *args):
    """A task built as train.py builds it, its frozen parts encoded, its model (the transformer with a LoRA that
    starts as the identity), and one drawn batch (3 of its items)."""
    cfg = train.parse(
        [
            "--task",
            "kontext" if task_cls is KontextTask else "t2i",
            "--data",
            str(data),
            *weight_args(weights, model),
            *ARGS,
            "--batch-size",
            "3",
            *args,
        ]
    )
    task = task_cls(cfg, tmp_path, torch.device("cpu"), torch.float32)
    task.encode()
    flux, _ = task.build_model()
    return task, flux.eval(), task.draw(torch.Generator().manual_seed(3))


@torch.no_grad()
def items_of(task, batch):
    """The data items of the batch's rows, found by their latents, and each item's own latents (target, control)."""
    ae, data, P = task.ae, task.data, diffusers.FluxKontextPipeline
    own = {}
    for i in range(len(data)):
        sample = data[i]
        own[i] = [ae.encode(sample[k][None], sample=False) for k in ("image", "control") if k in sample]
    packed = {i: P._pack_latents(z[0], 1, 16, z[0].shape[2], z[0].shape[3])[0] for i, z in own.items()}
    rows = [min(packed, key=lambda i: (packed[i] - x0).abs().max()) for x0 in batch.x0]
    assert all((packed[i] - x0).abs().max() < 1e-5 for i, x0 in zip(rows, batch.x0))
    return rows, own


@pytest.mark.parametrize("control_size", ["target", "own"])
def test_kontext_loss_matches_diffusers_dreambooth_kontext_script(weights, pairs, tmp_path, control_size):
    """The task's batch (target latents, control tokens at axis0 = 1, t, noise, guidance) through flow_matching_loss
    equals diffusers' Kontext training loss on the same items, t and noise (control_size own: a 64×48 control
    beside a 48×48 target)."""
    for i in range(len(INSTRUCTIONS)):
        random_image(100 + i, size=(66, 48)).save(pairs / "control" / f"{i:02d}.png")  # 11:8, within 1.5× of square
    task, model, batch = task_batch(
        KontextTask, weights, pairs, tmp_path, "kontext", "--resolution", "48", "--control-size", control_size
    )
    rows, own = items_of(task, batch)
    assert len(set(rows)) >= 2  # the rows are different pairs
    assert batch.inputs.img_cond_seq.shape[1] == (9 if control_size == "target" else 12)  # 48×48, or 64×48 (own)
    base = load_flux(weights["kontext"])
    ref = diffusers_flux(base.params, base.state_dict())
    with torch.no_grad():
        ours = flow_matching_loss(
            model, batch.x0, batch.noise, batch.t, batch.guidance, batch.loss_mask, **batch.inputs
        )
        z, cond = (torch.cat([own[i][k] for i in rows]) for k in (0, 1))  # [3, 16, 6, 6], [3, 16, h', w']
        noise = diffusers.FluxKontextPipeline._unpack_latents(batch.noise, 48, 48, 8)  # [3, 16, 6, 6]
        captions = [task.data.caption(i) for i in rows]
        txt, y = task.texts.t5(captions), task.texts.clip(captions)
        theirs = diffusers_loss(ref, z, noise, batch.t, batch.guidance, txt, y, cond)
        wrong_ids = diffusers_loss(ref, z, noise, batch.t, batch.guidance, txt, y, cond, cond_axis0=0.0)
    err = abs(ours - theirs).item() / theirs.item()
    print(f"kontext loss ({control_size}): minflux {ours.item():.6f}, diffusers {theirs.item():.6f}, rel {err:.1e}")
    assert err <= 1e-5
    assert abs(ours - wrong_ids).item() / theirs.item() > 100 * max(err, 1e-7)  # the control's axis0 = 1 matters


def test_t2i_loss_matches_diffusers_dreambooth_flux_script(weights, pairs, tmp_path):
    task, model, batch = task_batch(T2ITask, weights, pairs, tmp_path, "dev", "--guidance", "3.5")
    assert batch.inputs.img_cond_seq is None and torch.equal(batch.guidance, torch.full((3,), 3.5))
    rows, own = items_of(task, batch)
    base = load_flux(weights["dev"])
    ref = diffusers_flux(base.params, base.state_dict())
    with torch.no_grad():
        ours = flow_matching_loss(
            model, batch.x0, batch.noise, batch.t, batch.guidance, batch.loss_mask, **batch.inputs
        )
        z = torch.cat([own[i][0] for i in rows])
        noise = diffusers.FluxKontextPipeline._unpack_latents(batch.noise, 32, 32, 8)
        captions = [task.data.caption(i) for i in rows]
        txt, y = task.texts.t5(captions), task.texts.clip(captions)
        theirs = diffusers_loss(ref, z, noise, batch.t, batch.guidance, txt, y)
    err = abs(ours - theirs).item() / theirs.item()
    print(f"t2i loss: minflux {ours.item():.6f}, diffusers {theirs.item():.6f}, rel {err:.1e}")
    assert err <= 1e-5


def test_fill_loss_matches_diffusers_fill_inputs(weights):
    """Fill: fill_condition's 320 channels (the erased image's latent, the mask's 8×8 pixels per latent pixel) against
    FluxFillPipeline.prepare_mask_latents, concatenated to the noisy target on the channels."""
    from minflux.files.load import load_ae

    model, ae = load_flux(weights["fill"]), load_ae(weights["ae"])
    ref = diffusers_flux(model.params, model.state_dict())
    g = torch.Generator().manual_seed(4)
    B, H, W = 2, 32, 48
    image = torch.rand(B, 3, H, W, generator=g) * 2 - 1
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, 4:20, 8:40], mask[1, :, 16:, :13] = 1, 1  # not aligned to the 8-px latent grid
    with torch.no_grad():
        z = ae.encode(image, sample=False)  # [2, 16, 4, 6]
        noise, t = torch.randn(z.shape, generator=g), torch.tensor([0.3, 0.8])
        guidance, txt = torch.tensor([30.0, 30.0]), torch.randn(B, 8, 64, generator=g)
        y = torch.randn(B, 64, generator=g)
        img_cond = fill_condition(ae, image, mask)  # [2, 6, 320]
        ours = flow_matching_loss(
            model,
            pack(z),
            pack(noise),
            t,
            guidance,
            img_ids=latent_ids(z),
            txt=txt,
            txt_ids=prepare_txt_ids(B, 8),
            y=y,
            img_cond=img_cond,
        )
        vae = SimpleNamespace(config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0))  # ae.encode has scaled it
        stub = SimpleNamespace(vae=vae, vae_scale_factor=8, _pack_latents=diffusers.FluxFillPipeline._pack_latents)
        masked = ae.encode(image * (1 - mask), sample=False)  # as FluxFillPipeline: init_image * (1 − mask_image)
        packed_mask, packed_masked = diffusers.FluxFillPipeline.prepare_mask_latents(
            stub, mask, masked, B, 16, 1, H, W, torch.float32, "cpu", None
        )
        cond = torch.cat((packed_masked, packed_mask), dim=-1)  # [2, 6, 320]
        theirs = diffusers_loss(ref, z, noise, t, guidance, txt, y, cond)
    err = abs(ours - theirs).item() / theirs.item()
    print(f"fill loss: minflux {ours.item():.6f}, diffusers {theirs.item():.6f}, rel {err:.1e}")
    assert err <= 1e-5


# --- 2. and 3. a run from a folder, and its resumption ----------------------------------------------------------------


def kontext_output(model, control_tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The model's velocity for a 32-px target with a 32-px control (4 tokens each) after it, at axis0 = 1."""
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(1, 4, 64, generator=g), torch.randn(1, 8, 64, generator=g)
    y = torch.randn(1, 64, generator=g)
    ids = latent_ids(torch.zeros(1, 16, 4, 4))
    with torch.no_grad():
        return velocity(
            model,
            img,
            torch.tensor([0.5]),
            torch.tensor([1.0]),
            ids,
            txt,
            prepare_txt_ids(1, 8),
            y,
            img_cond_seq=control_tokens,
            img_cond_seq_ids=latent_ids(torch.zeros(1, 16, 4, 4), 1.0),
        )


def test_kontext_lora_trains_from_a_folder_of_pairs(tmp_path, weights, pairs, capsys):
    assert run_kontext(tmp_path, weights, pairs, "--steps", "4", "--sample-every", "2", "--name", "edit") == 0
    run = tmp_path / "runs" / "edit"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000002.png"]  # the last is samples.png
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(run)
    assert "data: 4 pairs, 4 distinct captions; sizes 32×32 (4)" in out
    for name in ("lora.safetensors", "config.toml", "metrics.json", "log.jsonl", "loss.png", "samples.png"):
        assert (run / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "kontext" and metrics["steps"] == 4 and metrics["images"] == 4
    with Image.open(run / "samples.png") as grid:  # [control | edited | target] for each of the 4 pairs
        assert grid.width > 3 * 32 and grid.height > 4 * 32 and "make the square red" in grid.text["captions"]

    base = load_flux(weights["kontext"])
    control = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(9))
    before = kontext_output(base, control)
    assert len(load_lora(base, run / "lora.safetensors")) == 13  # every linear layer of the double and single block
    after = kontext_output(base, control)
    assert (after - before).abs().max() > 1e-4  # the LoRA was trained
    assert (kontext_output(base, -control) - after).abs().max() > 1e-4  # and the control still counts


def test_kontext_resume_continues_exactly(tmp_path, weights, pairs):
    common = ["--steps", "4", "--sample-steps", "0", "--caption-dropout", "0.5"]
    assert run_kontext(tmp_path, weights, pairs, *common, "--name", "straight") == 0
    assert (
        run_kontext(tmp_path, weights, pairs, *common, "--stop-at", "2", "--checkpoint-every", "2", "--name", "halves")
        == 0
    )
    resume_matches_straight(tmp_path / "runs")


# --- 4. the LoRA in sample.py and in diffusers ------------------------------------------------------------------------


def test_kontext_lora_samples_in_sample_py(tmp_path, weights, pairs, capsys):
    assert run_kontext(tmp_path, weights, pairs, "--steps", "2", "--sample-steps", "0", "--name", "s") == 0
    lora = tmp_path / "runs" / "s" / "lora.safetensors"
    argv = [
        *weight_args(weights),
        "--image",
        str(pairs / "control" / "00.png"),
        "--prompt",
        INSTRUCTIONS[0],
        "--steps",
        "1",
        "--seed",
        "0",
        "--width",
        "32",
        "--height",
        "32",
        "--max-length",
        "8",
    ]
    assert sample.main([*argv, "--lora", str(lora), "--output-dir", str(tmp_path / "with")]) == 0
    out = capsys.readouterr().out
    assert f"LoRA {lora} (scale 1): 13 layers" in out and "flux-dev-kontext (kontext)" in out
    assert sample.main([*argv, "--output-dir", str(tmp_path / "without")]) == 0
    with Image.open(tmp_path / "with" / "img_0000.png") as a, Image.open(tmp_path / "without" / "img_0000.png") as b:
        assert a.size == (32, 32) and json.loads(a.text["minflux"])["loras"][0]["path"] == str(lora.resolve())
        assert a.tobytes() != b.tobytes()  # the LoRA changed the image


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_kontext_lora_loads_in_diffusers_kontext_pipeline_to_the_same_output(tmp_path, weights, pairs, fmt):
    """Every key of the file becomes a PEFT layer of diffusers' transformer, and its output with the LoRA is minflux's.
    kohya: diffusers' converter splits linear1 at FLUX.1's sizes (3072 × 3 + 12288), so at this width the kohya
    file leaves linear1 out (test_lora.py checks linear1 at FLUX.1's width, on the meta device)."""
    from peft.utils import get_peft_model_state_dict

    targets = ["--lora-targets", "attn,mlp,mod,single_blocks.*.linear2"] if fmt == "kohya" else []
    assert (
        run_kontext(
            tmp_path,
            weights,
            pairs,
            "--steps",
            "2",
            "--sample-steps",
            "0",
            "--lora-format",
            fmt,
            *targets,
            "--name",
            fmt,
        )
        == 0
    )
    path = tmp_path / "runs" / fmt / "lora.safetensors"
    model = load_flux(weights["kontext"])
    ref = diffusers_flux(model.params, model.state_dict())
    pipe = diffusers.FluxKontextPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=ref,
    )
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    pipe.load_lora_weights(str(path), adapter_name="edit")
    loaded = get_peft_model_state_dict(ref, adapter_name="edit")
    layers = load_lora(model, path)
    split = {"qkv": 3, "linear1": 4}  # diffusers' to_q, to_k, to_v (+ proj_mlp) of one fused layer
    assert len(loaded) == 2 * sum(split.get(name.rsplit(".", 1)[-1], 1) for name in layers)
    if fmt == "diffusers":  # key for key, tensor for tensor
        lora = read_state_dict(path)
        assert {f"transformer.{k}" for k in loaded} == set(lora)
        assert all(torch.equal(lora[f"transformer.{k}"], v) for k, v in loaded.items())
    after = {k: v for k, v in ref.state_dict().items() if "lora_" not in k}  # PEFT renames the base to base_layer
    assert all(torch.equal(base[k.replace(".base_layer", "")], v) for k, v in after.items())

    g = torch.Generator().manual_seed(5)
    control, img = torch.randn(1, 4, 64, generator=g), torch.randn(1, 4, 64, generator=g)
    txt, y, t = torch.randn(1, 8, 64, generator=g), torch.randn(1, 64, generator=g), torch.tensor([0.5])
    ids, control_ids = latent_ids(torch.zeros(1, 16, 4, 4)), latent_ids(torch.zeros(1, 16, 4, 4), 1.0)
    with torch.no_grad():
        ours = velocity(
            model,
            img,
            t,
            torch.tensor([2.5]),
            ids,
            txt,
            prepare_txt_ids(1, 8),
            y,
            img_cond_seq=control,
            img_cond_seq_ids=control_ids,
        )
        theirs = ref(
            hidden_states=torch.cat((img, control), 1),
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=torch.cat((ids, control_ids), 1)[0],
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([2.5]),
            return_dict=False,
        )[0][:, :4]
        pipe.set_adapters(["edit"], [0.0])
        without = ref(
            hidden_states=torch.cat((img, control), 1),
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=torch.cat((ids, control_ids), 1)[0],
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([2.5]),
            return_dict=False,
        )[0][:, :4]
    err = rel(ours, theirs)
    print(f"{fmt} LoRA in diffusers: rel max |Δ| {err:.1e}; the LoRA moves the output by {rel(without, theirs):.1e}")
    assert err <= 1e-5 and rel(without, theirs) > 100 * max(err, 1e-7)  # the LoRA is what the comparison is about


# --- 5. bad input -----------------------------------------------------------------------------------------------------


def no_run_folder(tmp_path) -> bool:
    return not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "case", ["target without control", "control without target", "unreadable control", "aspect", "not utf-8"]
)
def test_a_bad_pair_is_skipped_and_counted_or_stops_naming_the_file(tmp_path, weights, pairs, capsys, case):
    if case == "target without control":
        random_image(7).save(pairs / "lonely.png")
        (pairs / "lonely.txt").write_text("an edit")
        bad, why = pairs / "lonely.png", "a target without its control"
    elif case == "control without target":
        bad, why = pairs / "control" / "orphan.png", "a control without its target"
        random_image(7).save(bad)
    elif case == "unreadable control":
        bad, why = pairs / "control" / "01.png", "cannot be read as an image"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "aspect":
        bad, why = pairs / "control" / "02.png", "an aspect 2.0× apart"
        random_image(7, size=(80, 40)).save(bad)
    else:
        bad, why = pairs / "03.txt", "is not UTF-8 text"
        bad.write_bytes("rendre le carr\xe9 rouge".encode("latin-1"))
    with pytest.raises(DataError) as e:
        run_kontext(tmp_path, weights, pairs, "--steps", "1", "--on-error", "stop")
    assert e.value.path == bad and why in str(e.value) and str(bad) in str(e.value)
    assert no_run_folder(tmp_path)  # found before training: the new run folder was removed again
    assert isinstance(e.value, ValueError)  # train.py's __main__: message on stderr, exit code 2 (tested below)

    capsys.readouterr()
    assert run_kontext(tmp_path, weights, pairs, "--steps", "1", "--sample-steps", "1", "--name", "skip") == 0
    out = capsys.readouterr().out
    n_good = 3 if case in ("unreadable control", "aspect", "not utf-8") else 4
    assert f"skipped 1 unusable file(s), e.g. {bad}: " in out and f"data: {n_good} pairs" in out


def test_train_py_exits_2_naming_the_pair_and_leaves_no_run_folder(tmp_path, weights, pairs):
    import subprocess
    import sys
    from pathlib import Path

    (pairs / "control" / "01.png").unlink()
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--task",
            "kontext",
            "--data",
            str(pairs),
            *weight_args(weights),
            "--out",
            str(tmp_path / "runs"),
            *ARGS,
            "--steps",
            "1",
            "--on-error",
            "stop",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{pairs / '01.png'}: a target without its control: no {pairs / 'control'}/01.* image" in out.stderr
    assert no_run_folder(tmp_path)


def test_kontext_folder_names_a_missing_control_folder(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("an edit")
    with pytest.raises(DataError, match=r"control: no such folder"):
        KontextFolder(tmp_path, resolution=32)


def test_a_kontext_lora_is_refused_by_a_fill_model_naming_the_file(tmp_path, weights, pairs, capsys):
    assert run_kontext(tmp_path, weights, pairs, "--steps", "1", "--sample-steps", "0", "--name", "k") == 0
    lora = tmp_path / "runs" / "k" / "lora.safetensors"
    fill = load_flux(weights["fill"])
    with pytest.raises(WeightsError, match="64 input channels"):
        load_lora(fill, lora)
    assert not lora_layers(fill)  # refused before any layer was changed
    mask = tmp_path / "mask.png"
    Image.new("L", (40, 40), 255).save(mask)
    code = sample.main(
        [
            *weight_args(weights, "fill"),
            "--lora",
            str(lora),
            "--image",
            str(pairs / "00.png"),
            "--mask",
            str(mask),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--max-length",
            "8",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(lora) in err and "384" in err and "64" in err
    assert not (tmp_path / "out").exists()


def test_a_second_control_folder_is_a_second_reference_at_axis0_2(weights, pairs, tmp_path):
    """control2/ beside control/: each pair's two controls in the sequence one after another, the second at
    axis0 = 2 (as prepare_kontext places a second reference), and [control 1 | control 2 | edited | target] samples."""
    (pairs / "control2").mkdir()
    for i in range(len(INSTRUCTIONS)):
        random_image(200 + i, size=(40, 44)).save(pairs / "control2" / f"{i:02d}.png")
    task, model, batch = task_batch(KontextTask, weights, pairs, tmp_path, "kontext", "--control-size", "own")
    assert task.data.n_references == 2
    rows, _ = items_of(task, batch)
    with torch.no_grad():
        own = [[pack(task.ae.encode(task.data[i]["controls"][k][None], sample=False)) for k in (0, 1)] for i in rows]
    first, second = own[0][0].shape[1], own[0][1].shape[1]
    assert torch.allclose(batch.inputs.img_cond_seq, torch.cat([torch.cat(o, dim=1) for o in own]), atol=1e-5)
    axis0 = batch.inputs.img_cond_seq_ids[..., 0]  # [3, first + second]
    assert (axis0[:, :first] == 1).all() and (axis0[:, first:] == 2).all() and axis0.shape[1] == first + second
    grid = task.samples(model, tmp_path / "samples.png")
    assert Image.open(grid).width > 4 * 32  # four columns
