"""Text-to-image LoRA training for FLUX.2 [klein] Base and [dev] (`train.py --task t2i --repo FLUX.2-klein-base-4B`).

T2ITask's step (t2i.py) with FLUX.2's parts; at 512 × 512 on klein Base 4B:

    image [B, 3, 512, 512] → VAE (frozen, mean, normalised) → z [B, 128, 32, 32] → pack_flux2 → x_0 [B, 1024, 128]
    caption → Qwen3 (klein) or Mistral (dev), frozen: 3 stacked layers [B, 512, 7680]; no pooled vector (y None)
    t ~ logit-normal, shifted by empirical_mu(L, the variant's sampling steps), as FLUX.2's sampling schedule is
    x_t = (1 − t) x_0 + t ε;   v = FLUX.2(x_t, img_ids [B, L, 4], txt, txt_ids [B, 512, 4], t, guidance) [B, 1024, 128]
    loss = MSE(v, ε − x_0)                                                       (sampling.flow_matching_loss)

klein has no guidance embedding (guidance None); dev's gets --guidance, 1.0 by default as FLUX.1 dev's LoRAs. The
distilled klein (4 steps) is refused unless --allow-distilled: a LoRA trained on it degrades (grey images); train on
Base, whose LoRAs load on either. Samples: Base with its true CFG against the empty caption, as Flux2Pipeline.

The weights are told FLUX.2 from the transformer's headers (`flux2_config`, called by parse_train_args), and their
paths checked there, before anything is loaded: cfg.text_encoder is set for FLUX.2 runs alone.
"""

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from minflux.files.load import load_ae
from minflux.files.load_llm import load_mistral, load_qwen3
from minflux.files.weights import WeightsError, read_shapes
from minflux.flux2 import Flux2
from minflux.pipeline_flux2 import check_flux2_parts, check_text_encoder, find_flux2_weights, is_distilled
from minflux.pipeline_flux2 import is_flux2, variant_of
from minflux.presets import ModelSpec, configs
from minflux.sampling import Inputs, empirical_mu, get_noise_flux2, latent_ids_flux2, pack_flux2, prepare_flux2
from minflux.sampling import txt_ids_flux2
from minflux.tasks.common import lora_transformer
from minflux.tasks.t2i import T2ITask


class Flux2T2ITask(T2ITask):
    """T2ITask on FLUX.2: its VAE's latents, its one text encoder, its ids, schedule shift, guidance and samples."""

    pack = staticmethod(pack_flux2)  # [B, 128, H/16, W/16] → [B, L, 128]: a token is one latent pixel

    def load_frozen(self, cfg, device, dtype):
        """(ae, None, the text encoder): the LLM stands where FLUX.1's T5 does; FLUX.2 has no pooled CLIP."""
        dev = check_text_encoder(Path(cfg.flux), Path(cfg.text_encoder))  # [dev]: Mistral; [klein]: Qwen3
        load_text = load_mistral if dev else load_qwen3
        text = load_text(cfg.text_encoder, device=device, dtype=dtype, max_length=cfg.t5_max_length)
        return load_ae(cfg.ae, device=device, dtype=dtype), None, text

    def sampler(self, model):
        """(the model that draws the samples, its sampling defaults): the trained one; with --sample-flux the
        distilled klein, the trained LoRA copied into it, at its own steps without CFG (how the LoRA is used)."""
        cfg = self.cfg
        if not cfg.sample_flux:
            return model, self.spec
        flux = lora_transformer(replace(cfg, flux=str(transformer_path(cfg.sample_flux))), self.device, self.dtype)
        trained = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        flux.load_state_dict({**flux.state_dict(), **trained})
        flux.variant = variant_of(flux, distilled=True)
        return flux.eval(), configs.get(flux.variant, configs["flux2-klein-4b"])

    def spec_of(self, flux) -> ModelSpec:
        """The variant's sampling defaults (klein Base: 50 steps, true CFG 4.0; dev: 50 steps, guidance 4.0); a
        transformer of no official size takes those of its kind."""
        if not isinstance(flux, Flux2):
            raise WeightsError(f"{self.cfg.flux}: a FLUX.1 transformer; {self.cfg.text_encoder} is FLUX.2's")
        distilled = is_distilled(self.cfg.repo, Path(self.cfg.flux))
        flux.variant = variant_of(flux, distilled)
        self.guided, self.channels = flux.params.guidance_embed, flux.params.in_channels
        if flux.variant in configs:
            return configs[flux.variant]
        return configs["flux2-dev" if self.guided else "flux2-klein-4b" if distilled else "flux2-klein-base-4b"]

    def mu(self, seq_len: int) -> float:
        """FLUX.2's sampling schedule's shift (get_schedule_flux2) at the variant's own step count (Base and dev:
        50), so that training sees the noise levels sampling visits."""
        return empirical_mu(seq_len, self.spec.num_steps)

    def ids(self, batch: int, h: int, w: int, txt_len: int) -> tuple[Tensor, Tensor]:
        """(0, row, col, 0) of an h × w grid [B, h · w, 4] (only the latent's shape is read) and (0, 0, 0, i) of the
        text [B, T, 4]."""
        return latent_ids_flux2(torch.empty(batch, 0, h, w)), txt_ids_flux2(batch, txt_len)

    def guidance(self, batch: int) -> Tensor | None:
        return torch.full((batch,), self.cfg.guidance) if self.guided else None  # [B]  dev's; klein has none

    def noise(self, height: int, width: int, seed: int) -> Tensor:
        return get_noise_flux2(1, height, width, seed, self.channels)  # [1, 128, H/16, W/16]

    def ref_ids(self, sizes: list[tuple[int, int]]) -> Tensor:
        """The ids of references of these (width, height), one after another: reference k at t = 10 · (k + 1), as
        FLUX.2's sampling places them (reference_condition) → [1, ΣL', 4]."""
        grids = [torch.empty(1, 0, h // 16, w // 16) for w, h in sizes]
        return torch.cat([latent_ids_flux2(z, t=10.0 * (k + 1)) for k, z in enumerate(grids)], dim=1)

    def sample_inputs(self, sample: dict, noise: Tensor) -> tuple[Inputs, Inputs | None]:
        """prepare_flux2 with the cached text (edit pairs: and the controls as references); Base's true CFG runs
        against the empty caption (cached too), with the same references."""
        refs = [c[None].to(self.device, self.dtype) for c in sample.get("controls", [])]  # [1, 3, H', W'] each
        inp = prepare_flux2(self.texts.t5, noise, sample["caption"], self.ae, refs)
        return inp, prepare_flux2(self.texts.t5, noise, "", self.ae, refs) if self.spec.true_cfg != 1.0 else None


def t2i_task(cfg, run, device, dtype):
    """--task t2i: a LoRA on FLUX.2 (Flux2T2ITask: flux2_config found its text encoder) or on FLUX.1 (T2ITask)."""
    return (Flux2T2ITask if cfg.text_encoder else T2ITask)(cfg, run, device, dtype)


def flux2_config(cfg, given: set[str], resumed: bool):
    """For FLUX.2 weights (--repo or --flux, told from the transformer's headers): cfg with the paths of the
    transformer, VAE and text encoder, checked from their headers (and 512 text tokens unless given); None for
    other weights. ValueError naming the flag for what FLUX.2 cannot train, before anything is loaded."""
    weights = cfg.flux or cfg.repo
    try:
        flux2 = bool(weights) and not cfg.finetune and is_flux2(cfg.repo, cfg.flux)
    except WeightsError as e:  # unreadable: FLUX.1's path says so where it reads the file, unless FLUX.2's is asked
        if cfg.text_encoder:
            raise ValueError(f"--{'flux' if cfg.flux else 'repo'} {e}") from None  # e names the file
        flux2 = False
    if not flux2:
        if cfg.text_encoder:
            why = f"{weights} is FLUX.1, whose text encoders are --clip and --t5" if weights else "no transformer given"
            raise ValueError(
                f"--text-encoder {cfg.text_encoder}: FLUX.2's text encoder (Qwen3 or Mistral), but {why}; FLUX.2 "
                "weights go with --repo or --flux"
            )
        if cfg.sample_flux:
            raise ValueError(f"--sample-flux {cfg.sample_flux}: previews a LoRA trained on FLUX.2 weights, none given")
        return None
    flag = f"--flux {cfg.flux}" if cfg.flux else f"--repo {cfg.repo}"
    if cfg.task not in ("t2i", "kontext"):
        raise ValueError(f"--task {cfg.task}: {flag} is FLUX.2, which trains --task t2i or --task kontext")
    for name in ("clip", "t5"):
        if getattr(cfg, name):
            raise ValueError(
                f"--{name} {getattr(cfg, name)}: FLUX.1's text encoder; {flag} is FLUX.2, whose text encoder is "
                "Qwen3 or Mistral (--text-encoder, or the repo's text_encoder/)"
            )
    try:
        paths = find_flux2_weights(cfg.repo, cfg.flux, cfg.ae, cfg.text_encoder)
    except WeightsError as e:
        raise ValueError(f"{flag}: {e}; or give --ae and --text-encoder") from None
    try:
        dev = check_flux2_parts(paths)
    except WeightsError as e:  # its message starts with the part's path: the flag that gave it goes in front
        part = next((part for part, path in paths.items() if str(e).startswith(str(path))), None)
        raise ValueError(f"--{part.replace('_', '-')} {e}" if part else f"{flag}: {e}") from None
    if not dev and is_distilled(cfg.repo, paths["flux"]) and not cfg.allow_distilled:
        raise ValueError(
            f"{flag}: FLUX.2 [klein] distilled (4 steps; {paths['flux']}). A LoRA trained on the distilled model "
            "degrades (grey images): train on Base (FLUX.2-klein-base-4B or -9B), whose LoRA samples with either. "
            "--allow-distilled trains on it anyway"
        )
    if cfg.sample_flux:
        check_sample_flux(cfg, paths["flux"])
    found = {k: str(v) for k, v in paths.items()}
    length = cfg.t5_max_length if "t5_max_length" in given or resumed else 512  # the official pipelines' 512
    return replace(cfg, **found, t5_max_length=length)


def check_sample_flux(cfg, trained: Path) -> None:
    """--sample-flux, checked from the headers: a FLUX.2 transformer of the trained one's size, for a LoRA run."""
    flag = f"--sample-flux {cfg.sample_flux}"
    if cfg.full_finetune:
        raise ValueError(f"{flag}: copies the trained LoRA into another transformer; --full-finetune trains no LoRA")
    try:
        path = transformer_path(cfg.sample_flux)
        if not path.exists() or not is_flux2(flux=path):
            raise WeightsError(f"{path}: not a FLUX.2 transformer")
        count = lambda p: sum(math.prod(shape) for shape, _ in read_shapes(p).values())  # noqa: E731
        if count(path) != count(trained):
            raise WeightsError(f"{count(path):,} parameters, the trained transformer {trained} {count(trained):,}")
    except WeightsError as e:
        raise ValueError(f"{flag}: {e}; expected the distilled transformer of the trained one's size") from None


def transformer_path(path) -> Path:
    """A FLUX.2 transformer named by its file, its diffusers transformer/ folder or the repo holding that folder."""
    path = Path(path)
    return path / "transformer" if (path / "transformer").is_dir() else path
