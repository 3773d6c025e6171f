"""Packing, ids, the schedule and Euler sampling, checked against diffusers' scheduler and transformer."""

import math

import numpy as np
import pytest
import torch

from minflux.sampling import (
    denoise,
    get_schedule,
    interpolate,
    latent_ids,
    pack,
    prepare_img_ids,
    sample_t,
    shift_mu,
    unpack,
    velocity_target,
)
from tests.flux_helpers import TINY, TINY_VARIANTS, diffusers_flux, flux_inputs, tiny_flux


def test_pack_makes_one_token_per_2x2_patch_and_unpack_inverts_it():
    z = torch.randn(2, 16, 128, 128)
    tokens = pack(z)
    assert tokens.shape == (2, 4096, 64)  # the walk-through: [1, 16, 128, 128] -> [1, 4096, 64]
    # token (row 3, col 5) holds channel c of pixel (6+i, 10+j) at position c*4 + i*2 + j
    assert torch.equal(tokens[0, 3 * 64 + 5].view(16, 2, 2), z[0, :, 6:8, 10:12])
    assert torch.equal(unpack(tokens, 1024, 1024), z)


def test_img_ids_hold_row_and_column_and_kontext_ids_axis0_one():
    ids = prepare_img_ids(2, 3, 4)
    assert ids.shape == (2, 12, 3)
    assert ids[0, 6].tolist() == [0, 1, 2]  # token 6 of a 3×4 grid: row 1, col 2
    assert latent_ids(torch.zeros(1, 16, 6, 8), axis0=1)[0, 5].tolist() == [1, 1, 1]


def test_shift_mu_is_linear_between_the_official_anchor_points():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


def diffusers_scheduler(shift: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler_config.json, and schnell's (no dynamic shift)
    if shift:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("num_steps,seq_len", [(4, 256), (28, 1024), (50, 4096), (20, 2048)])
def test_schedule_matches_diffusers_flow_match_euler_scheduler(shift, num_steps, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = diffusers_scheduler(shift)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)  # what FluxPipeline passes
    kwargs = {"mu": calculate_shift(seq_len)} if shift else {}
    sched.set_timesteps(sigmas=sigmas, **kwargs)
    ours = torch.tensor(get_schedule(num_steps, seq_len, shift=shift))
    assert ours.shape == sched.sigmas.shape
    assert (ours - sched.sigmas.double()).abs().max() <= 1e-6
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_euler_update_matches_diffusers_scheduler_step():
    sched = diffusers_scheduler(shift=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=0.8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 64, generator=g)
    ts = sched.sigmas.tolist()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 24, 64, generator=g)
        theirs = sched.step(v, t, x).prev_sample
        ours = x + (ts[i + 1] - ts[i]) * v
        assert (ours - theirs).abs().max() <= 1e-6
        x = theirs


def reference_loop(ref, inputs, num_steps, guidance, img_cond=None, cond_seq=None, cond_ids=None):
    """The sampling loop of diffusers' Flux pipelines, with diffusers' transformer and scheduler."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = diffusers_scheduler(shift=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(inputs["img"].shape[1]))
    x = inputs["img"]
    img_ids = inputs["img_ids"][0]
    for t in sched.timesteps:
        model_in, ids = x, img_ids
        if img_cond is not None:
            model_in = torch.cat((x, img_cond), dim=2)
        if cond_seq is not None:
            model_in, ids = torch.cat((x, cond_seq), dim=1), torch.cat((img_ids, cond_ids[0]), dim=0)
        v = ref(
            hidden_states=model_in,
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=(t / 1000).expand(x.shape[0]),
            img_ids=ids,
            txt_ids=inputs["txt_ids"][0],
            guidance=torch.full((x.shape[0],), guidance) if ref.config.guidance_embeds else None,
            return_dict=False,
        )[0][:, : x.shape[1]]
        x = sched.step(v, t, x).prev_sample
    return x


@pytest.mark.parametrize("mode", ["dev", "schnell", "fill", "kontext"])
def test_denoise_matches_diffusers_sampling_loop(mode):
    params = TINY_VARIANTS["fill" if mode == "fill" else "schnell" if mode == "schnell" else "dev"]
    model = tiny_flux(params)
    ref = diffusers_flux(params, model.state_dict())
    inputs = flux_inputs(TINY, batch=2, h=8, w=8)
    timesteps = get_schedule(5, inputs["img"].shape[1])
    g = torch.Generator().manual_seed(3)
    kw = {}
    if mode == "fill":
        kw["img_cond"] = torch.randn(2, 16, 320, generator=g)
    if mode == "kontext":
        cond = torch.randn(2, 16, 8, 8, generator=g)
        kw["img_cond_seq"], kw["img_cond_seq_ids"] = pack(cond), latent_ids(cond, axis0=1)
    with torch.no_grad():
        ours = denoise(
            model,
            inputs["img"],
            inputs["img_ids"],
            inputs["txt"],
            inputs["txt_ids"],
            inputs["y"],
            timesteps,
            guidance=3.5,
            **kw,
        )
        theirs = reference_loop(
            ref, inputs, 5, 3.5, kw.get("img_cond"), kw.get("img_cond_seq"), kw.get("img_cond_seq_ids")
        )
    assert not torch.allclose(ours, inputs["img"])
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.std()


def test_true_cfg_combines_negative_and_positive_predictions():
    model = tiny_flux(TINY)
    inputs = flux_inputs(TINY, batch=1)
    g = torch.Generator().manual_seed(5)
    neg_txt, neg_vec = torch.randn_like(inputs["txt"]), torch.randn(1, TINY.vec_in_dim, generator=g)
    ts = [1.0, 0.6]
    args = (model, inputs["img"], inputs["img_ids"])
    with torch.no_grad():
        pos = denoise(*args, inputs["txt"], inputs["txt_ids"], inputs["y"], ts, guidance=2.0)
        neg = denoise(*args, neg_txt, inputs["txt_ids"], neg_vec, ts, guidance=2.0)
        cfg = denoise(
            *args,
            inputs["txt"],
            inputs["txt_ids"],
            inputs["y"],
            ts,
            guidance=2.0,
            neg_txt=neg_txt,
            neg_txt_ids=inputs["txt_ids"],
            neg_y=neg_vec,
            true_cfg_scale=4.0,
        )
    # one Euler step is linear in the prediction, so the guided step is neg + 4 (pos − neg) in x too
    assert torch.allclose(cfg, neg + 4.0 * (pos - neg), atol=1e-5)


def test_training_pair_lies_on_the_straight_path_and_target_is_its_velocity():
    x0, noise = torch.randn(3, 10, 64), torch.randn(3, 10, 64)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x0, noise, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    # moving along the path by dt changes x_t by dt · target
    dt = 0.1
    assert torch.allclose(interpolate(x0, noise, t + dt) - xt, dt * velocity_target(x0, noise), atol=1e-6)


def test_sample_t_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = sample_t(20000, "uniform", generator=g)
    logit = sample_t(20000, "logit_normal", generator=g)
    shifted = sample_t(20000, "logit_normal", mu=1.15, generator=g)
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    assert abs(logit.median() - 0.5) < 0.01 and logit.std() < uniform.std()  # concentrated mid-path
    assert shifted.median() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=0.01)  # towards noise
    with pytest.raises(ValueError, match="sampling"):
        sample_t(2, "cosine")
