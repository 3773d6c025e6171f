"""FLUX.2's training loss: minflux's flow_matching_loss on a Flux2 against the same loss computed by hand with
diffusers' Flux2Transformer2DModel, the ids and the [image | references] sequence built as diffusers' FLUX.2
pipelines build them."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline  # noqa: E402

from minflux.sampling import flow_matching_loss, latent_ids_flux2, pack_flux2, txt_ids_flux2  # noqa: E402
from tests.flux2_helpers import TINY2_VARIANTS, diffusers_flux2, tiny_flux2  # noqa: E402

REFERENCES = [(4, 4), (2, 6)]  # two references' latent grids, of other sizes than the target's 4 × 6


@pytest.mark.parametrize("variant", list(TINY2_VARIANTS))
@pytest.mark.parametrize("n_refs", [0, 2], ids=["t2i", "two references"])
def test_flux2_training_loss_matches_diffusers_by_hand(variant, n_refs):
    params = TINY2_VARIANTS[variant]
    model = tiny_flux2(params)
    ref = diffusers_flux2(params, model.state_dict())
    g = torch.Generator().manual_seed(5)
    B, C, T = 2, params.in_channels, 7
    x0, noise = torch.randn(B, C, 4, 6, generator=g), torch.randn(B, C, 4, 6, generator=g)  # [B, 32, 4, 6]
    t = torch.rand(B, generator=g)
    txt = torch.randn(B, T, params.context_in_dim, generator=g)
    guidance = torch.tensor([3.5, 4.0]) if params.guidance_embed else None
    refs = [torch.randn(1, C, h, w, generator=g) for h, w in REFERENCES[:n_refs]]  # each encoded alone

    # minflux: the inputs as prepare_flux2 makes them, the loss of every training task
    inputs = dict(img_ids=latent_ids_flux2(x0), txt=txt, txt_ids=txt_ids_flux2(B, T))
    if refs:
        tokens = torch.cat([pack_flux2(z) for z in refs], dim=1).expand(B, -1, -1)  # [B, 28, 32]
        ids = torch.cat([latent_ids_flux2(z, t=10.0 * (k + 1)) for k, z in enumerate(refs)], dim=1)
        inputs |= dict(img_cond_seq=tokens, img_cond_seq_ids=ids.expand(B, -1, -1))
    ours = flow_matching_loss(model, pack_flux2(x0), pack_flux2(noise), t, guidance, **inputs)

    # diffusers, by hand: x_t on the straight path, the sequence [x_t | references], the target's velocity kept
    pipe = Flux2KleinPipeline
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    hidden, img_ids = pipe._pack_latents(x_t), pipe._prepare_latent_ids(x0)  # [B, 24, 32], [B, 24, 4]
    if refs:
        hidden = torch.cat([hidden] + [pipe._pack_latents(z).expand(B, -1, -1) for z in refs], dim=1)
        img_ids = torch.cat([img_ids, pipe._prepare_image_ids(refs).expand(B, -1, -1)], dim=1)
    txt_ids = pipe._prepare_text_ids(txt)
    assert torch.equal(
        img_ids.float(), torch.cat([inputs["img_ids"]] + ([inputs["img_cond_seq_ids"]] if refs else []), 1)
    )
    assert torch.equal(txt_ids.float(), inputs["txt_ids"])
    with torch.no_grad():
        pred = ref(hidden_states=hidden, encoder_hidden_states=txt, timestep=t, img_ids=img_ids[0],
                   txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]  # fmt: skip
    pred = pred[:, : x0.shape[2] * x0.shape[3]]  # the target's tokens: [B, 24, 32]
    theirs = ((pred - (pipe._pack_latents(noise) - pipe._pack_latents(x0))) ** 2).mean()
    assert theirs > 0.5  # a real loss: random weights predict far from ε − x₀
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()
