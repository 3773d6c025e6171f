"""FLUX.2's sampling recipe: the schedule, the ids and the token layout, against diffusers' FLUX.2 pipelines."""

import numpy as np
import pytest
import torch

from minflux.sampling import (
    empirical_mu,
    get_noise_flux2,
    get_schedule_flux2,
    latent_ids_flux2,
    pack_flux2,
    txt_ids_flux2,
    unpack_flux2,
)

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux2 import pipeline_flux2_klein as klein  # noqa: E402

KLEIN = klein.Flux2KleinPipeline


@pytest.mark.parametrize("steps, seq_len", [(4, 4096), (50, 4096), (28, 1024), (4, 6400), (50, 256)])
def test_schedule_matches_diffusers_flux2_timesteps(steps, seq_len):
    assert empirical_mu(seq_len, steps) == pytest.approx(klein.compute_empirical_mu(seq_len, steps), abs=1e-12)
    # the scheduler of the FLUX.2 repos: dynamic, exponential shift; the pipeline's sigmas 1 .. 1/N, then 0
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=klein.compute_empirical_mu(seq_len, steps))
    ours = torch.tensor(get_schedule_flux2(steps, seq_len))
    assert ours.shape == (steps + 1,) and ours[0] == 1 and ours[-1] == 0
    torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), rtol=0, atol=1e-6)


def test_ids_and_tokens_match_diffusers_layout():
    z = torch.randn(2, 128, 3, 5)
    torch.testing.assert_close(pack_flux2(z), KLEIN._pack_latents(z))
    torch.testing.assert_close(unpack_flux2(pack_flux2(z), 48, 80), z)
    torch.testing.assert_close(latent_ids_flux2(z), KLEIN._prepare_latent_ids(z).float())
    refs = [torch.randn(1, 128, 3, 5), torch.randn(1, 128, 2, 4)]
    theirs = KLEIN._prepare_image_ids(refs).float()
    ours = torch.cat([latent_ids_flux2(r, t=10.0 * (k + 1)) for k, r in enumerate(refs)], dim=1)
    torch.testing.assert_close(ours, theirs)
    txt = torch.randn(2, 7, 12)
    torch.testing.assert_close(txt_ids_flux2(2, 7), KLEIN._prepare_text_ids(txt).float())


def test_noise_is_one_generator_per_image_as_diffusers_draws_it():
    noise = get_noise_flux2(2, 64, 96, seed=5)
    assert noise.shape == (2, 128, 4, 6)
    for i in range(2):
        expected = torch.randn((1, 128, 4, 6), generator=torch.Generator().manual_seed(5 + i))
        torch.testing.assert_close(noise[i : i + 1], expected)
