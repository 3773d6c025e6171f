"""vis2ir on FLUX.2: the embedded FLUX.2 default, the generated scenes as multi-reference edits.

`python train.py --preset flux2-small` trains a small FLUX.2-architecture transformer from scratch, with the frozen
parts of embedded_flux2.py (a FLUX.2 VAE shipped with the package, a small Qwen3 whose tokenizer is learned from
the captions). One step, at the default's 64-pixel panels (batch 16):

    visible  [B, 3, 64, 64] → FLUX.2 VAE (mean, normalised) → [B, 128, 4, 4] → 16 tokens at t = 10  (reference 1)
    semantic [B, 3, 64, 64] →                                                  16 tokens at t = 20  (reference 2)
    infrared [B, 3, 64, 64] → x_0 [B, 16, 128] at t = 0;  x_t = (1 − t) x_0 + t ε
    caption → Qwen3, hidden states 9, 18, 27 side by side [B, T, 192], ids (0, 0, 0, i)
    v = FLUX.2([x_t | references], ...)[:, :16], the target's tokens → loss = MSE(v, ε − x_0)

--semantic none leaves the map out (the visible panel, one reference). The times are shifted as FLUX.2's sampling
schedule shifts them (empirical_mu at the run's sampling steps); no guidance embedding, no pooled text vector.
Everything else (the cache, the loop, the held-out evaluation, the files) is Vis2IRTask's: the model is its Vis2IR
wrapper, with no injection (the map is in the sequence).
"""

import torch
from torch import Tensor

from minflux.hooks import stage
from minflux.sampling import Inputs, empirical_mu, get_noise_flux2, latent_ids_flux2, pack_flux2, prepare_flux2
from minflux.sampling import reference_condition, txt_ids_flux2
from minflux.tasks.vis2ir import Encoded, Vis2IRTask, panels, reference_images


@stage
@torch.no_grad()
def encode_triptych_flux2(ae, triptych: Tensor, semantic: str = "reference") -> Encoded:
    """The frozen-VAE part of the step: the infrared panel's tokens (the target) and the references' (each encoded
    alone, reference k at t = 10 · (k + 1))."""
    visible, infrared, sem_img = panels(triptych, semantic)  # [B, 3, S, S] each
    z = ae.encode(infrared)  # [B, 128, 4, 4], normalised
    refs, ref_ids = reference_condition(ae, reference_images(visible, sem_img, semantic))  # [B, 16 · k, 128], ids
    return Encoded(pack_flux2(z), latent_ids_flux2(z), {}, refs=refs, ref_ids=ref_ids)  # x0 [B, 16, 128]


@torch.no_grad()
def prepare_vis2ir_flux2(cfg, text_encoder, ae, triptych: Tensor, prompts: list[str], seed: int, dtype) -> Inputs:
    """Sampling inputs of a FLUX.2 run: the infrared panel to generate from the noise of seed + i for scene i, the
    references as the run's --semantic says (prepare_flux2). The triptychs' middle (target) panel is not read."""
    S = triptych.shape[-2]
    noise = get_noise_flux2(len(triptych), S, S, seed).to(triptych.device, dtype)  # [N, 128, S/16, S/16]
    visible, _, sem_img = panels(triptych, cfg.semantic)
    return prepare_flux2(text_encoder, noise, prompts, ae, reference_images(visible, sem_img, cfg.semantic))


class Flux2Vis2IRTask(Vis2IRTask):
    """Vis2IRTask on FLUX.2: the embedded FLUX.2 parts, the scenes as multi-reference edits, FLUX.2's ids and times."""

    def load_frozen(self):
        """(ae, None, the text encoder): the embedded FLUX.2 default's, made for this run; the LLM stands where T5
        did, and FLUX.2 has no pooled CLIP."""
        from minflux.tasks.embedded_flux2 import embedded_parts_flux2

        ae, text_encoder = embedded_parts_flux2(self.cfg, self.train_set, self.run, self.device)
        return ae, None, text_encoder

    def encode_scenes(self, triptychs: Tensor) -> Encoded:
        return encode_triptych_flux2(self.ae, triptychs, self.cfg.semantic)

    def mu(self, seq_len: int) -> float:
        return empirical_mu(seq_len, self.cfg.sample_steps)  # FLUX.2's schedule at the steps the run samples with

    def txt_ids(self, batch: int, length: int) -> Tensor:
        return txt_ids_flux2(batch, length)  # [B, T, 4]  (0, 0, 0, i)

    def guidance(self, batch: int) -> None:
        return None  # no guidance embedding
