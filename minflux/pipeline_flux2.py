"""Sampling FLUX.2 [klein] and [dev]: a prompt, and any number of reference images, → images.

FluxPipeline (minflux/pipeline.py) with FLUX.2's inputs: the same seeds, offloading, LoRAs (load_lora), settings in
each PNG and one image at a time; what differs is what `prepare_flux2` gathers and the defaults of each variant:

    1. prepare   the prompt's stacked text-encoder states [B, 512, 7680] (Qwen3 for klein, Mistral for dev), no
                 pooled vector; the noise [B, 128, H/16, W/16] as tokens [B, L, 128] with 4-axis ids; each
                 reference encoded alone and appended after the image's tokens at t = 10, 20, ...
    2. generate  Euler over FLUX.2's schedule (the empirical mu); dev's guidance embedding, or Base's true CFG
                 against an empty negative prompt; unpack, decode (the VAE undoes its normalisation and patches)

    pipe = Flux2Pipeline.from_files(repo="FLUX.2-klein-4B")
    images = pipe("a prompt", image=["a.png", "b.png"], seed=0)

Defaults per variant (black-forest-labs/flux2, diffusers' pipeline_flux2*.py): klein (distilled) 4 steps, no
guidance; klein Base 50 steps, true CFG 4.0 with the empty prompt as the negative; dev 50 steps, guidance 4.0.
References as the official code prepares them: at most 2024² pixels for one, 1024² each for several (resized
keeping the aspect ratio), cropped to a multiple of 16; the output takes the first reference's size by default.
"""

import json
import math
from pathlib import Path

import torch
from PIL import Image

from minflux.files.images import image_to_tensor, read_image
from minflux.files.load import FLUX2_AE_MARKER, load_ae, load_flux
from minflux.files.load_flux2 import is_flux2 as is_flux2_keys
from minflux.files.load_flux2 import text_input
from minflux.files.load_llm import FAMILIES, llm_params, load_mistral, load_qwen3
from minflux.files.lora_files import check_generation
from minflux.files.weights import WeightsError, read_shapes
from minflux.pipeline import FluxPipeline, default_device, default_dtype, file_record, snap
from minflux.presets import configs
from minflux.sampling import get_noise_flux2, pack_flux2, prepare_flux2

# What each part is called in a FLUX.2 repo, tried in order: diffusers folders, then BFL's single files.
FLUX2_PARTS = {
    "flux": ("transformer", "flux-2-*.safetensors", "flux2-*.safetensors"),
    "ae": ("vae", "ae.safetensors"),
    "text_encoder": ("text_encoder",),
}
MAX_REFERENCES = {"klein": 4, "dev": 6}  # BFL's documented limits: klein up to 4, dev 6 recommended at most


def find_flux2_weights(repo=None, flux=None, ae=None, text_encoder=None) -> dict[str, Path]:
    """The paths given, and for the others what the repo folder holds; WeightsError naming what is missing."""
    paths = {"flux": flux, "ae": ae, "text_encoder": text_encoder}
    for part, names in FLUX2_PARTS.items():
        if paths[part] is None and repo is not None:
            found = [p for name in names for p in sorted(Path(repo).glob(name))]
            paths[part] = found[0] if found else None
        if paths[part] is None:
            where = f"{repo}: holds none of {', '.join(names)}" if repo else f"no path for the {part}"
            raise WeightsError(f"{where} (a FLUX.2 repo: transformer/, vae/, text_encoder/, tokenizer/)")
        paths[part] = Path(paths[part])
        if not paths[part].exists():
            raise WeightsError(f"{paths[part]}: no such file or folder (the FLUX.2 {part})")
    return paths


def is_flux2(repo=None, flux=None) -> bool:
    """Whether the transformer named (or the repo's) is FLUX.2's, told from its keys before anything is loaded."""
    names = ("transformer", "flux-2-*.safetensors", "flux2-*.safetensors", "flux1-*.safetensors")
    found = [Path(flux)] if flux is not None else [p for n in names for p in sorted(Path(repo).glob(n))]
    return bool(found) and found[0].exists() and is_flux2_keys(read_shapes(found[0]))


def is_distilled(repo, flux_path: Path) -> bool:
    """klein comes distilled (4 steps) and as Base (50 steps, CFG), with the same shapes: the repo's
    model_index.json says which (`is_distilled`), else the repo's or BFL's file name (FLUX.2-klein-base-4B)."""
    index = Path(repo) / "model_index.json" if repo is not None else None
    if index is not None and index.is_file():
        distilled = json.loads(index.read_text(encoding="utf-8")).get("is_distilled")
        if distilled is not None:
            return bool(distilled)
    return "base" not in f"{Path(repo).name if repo else ''} {flux_path.name}".lower()


def variant_of(model, distilled: bool) -> str:
    """The preset name of a loaded FLUX.2 transformer: its size from the shapes, Base or not from the repo."""
    for name in ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b"):
        if configs[name].params == model.params:
            return name if name == "flux2-dev" or distilled else name.replace("klein-", "klein-base-")
    return "custom"


def check_flux2_parts(paths: dict[str, Path]) -> bool:
    """find_flux2_weights' parts checked from their headers, before anything is loaded: FLUX.2's VAE and
    transformer, and the text encoder that transformer reads (check_text_encoder). Returns whether it is [dev].
    WeightsError's message starts with the path of the part at fault."""
    if FLUX2_AE_MARKER not in read_shapes(paths["ae"]):
        raise WeightsError(f"{paths['ae']}: a FLUX.1 VAE (no batch-norm statistics); FLUX.2 needs its own VAE")
    if not is_flux2(flux=paths["flux"]):
        raise WeightsError(f"{paths['flux']}: a FLUX.1 transformer; FLUX.2's pipeline needs FLUX.2 weights")
    return check_text_encoder(paths["flux"], paths["text_encoder"])


def check_text_encoder(flux: Path, text_encoder: Path) -> bool:
    """The text encoder's family and width checked against the transformer's txt_in from the headers, before
    anything is loaded: Mistral for [dev] (which has a guidance embedding), Qwen3 for [klein], three stacked layers
    of it as wide as txt_in takes. Returns whether the transformer is [dev]."""
    channels, dev = text_input(flux)
    family = "mistral" if dev else "qwen3"
    params, _ = llm_params(text_encoder, family)
    if 3 * params.hidden_size != channels:
        raise WeightsError(
            f"{text_encoder}: a {FAMILIES[family][2]} of hidden size {params.hidden_size} (3 stacked layers: "
            f"{3 * params.hidden_size} channels); the transformer {flux} takes {channels} (klein 4B: Qwen3-4B, "
            "7680; klein 9B: Qwen3-8B, 12288; dev: Mistral-Small-3.2, 15360)"
        )
    return dev


def check_lora(path, repo=None, flux=None) -> None:
    """A LoRA file checked against the transformer named, from the headers, before anything is loaded: one for
    the other generation is refused naming the key that shows it."""
    shapes = {k: list(s) for k, (s, _) in read_shapes(path).items()}  # a bad header is named here, in any case
    if repo is not None or flux is not None:
        check_generation(path, shapes, "FLUX.2" if is_flux2(repo, flux) else "FLUX.1", flux or repo)


def cap_reference(image: Image.Image, count: int, notes: list[str]) -> Image.Image:
    """A reference as the official code prepares it: at most 2024² pixels alone, 1024² each with others (area kept
    by a LANCZOS resize), then centre-cropped to a multiple of 16."""
    limit = 2024**2 if count == 1 else 1024**2
    w, h = image.size
    if w * h > limit:
        scale = math.sqrt(limit / (w * h))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        notes.append(f"reference {w}×{h} → {image.size[0]}×{image.size[1]} (at most {limit:,} pixels)")
    w, h = image.size
    cw, ch = w // 16 * 16, h // 16 * 16
    if (cw, ch) != (w, h):
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
        notes.append(f"reference {w}×{h} cropped to {cw}×{ch} (a multiple of 16)")
    return image


class Flux2Pipeline(FluxPipeline):
    """Text-to-image and multi-reference editing with FLUX.2 [klein] (distilled or Base) and [dev].

    model, ae, text_encoder: the loaded parts (load_flux, load_ae, load_qwen3 or load_mistral); `variant` a preset
    name (flux2-klein-4b, flux2-klein-base-4b, ..., flux2-dev) whose defaults apply.
    """

    pack = staticmethod(pack_flux2)

    def __init__(self, model, ae, text_encoder, variant: str, device=None, dtype=None, offload: bool = False):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.offload = offload
        self.model, self.ae, self.text_encoder = model, ae, text_encoder
        home = torch.device("cpu") if offload else self.device
        for part in (model, ae, text_encoder.model):
            part.to(home, self.dtype).eval().requires_grad_(False)
        self.encoders = (text_encoder.model, ae)  # on the device while the inputs are prepared
        self.task = "t2i/edit"  # one model for both: "edit" when a call gives references
        model.variant = variant
        self.defaults = configs[variant] if variant in configs else configs["flux2-klein-4b"]
        self.clip = self.t5 = None  # FLUX.1's text encoders: none here
        self.loras, self.weights, self.timings, self.notes = [], {}, {}, []

    @classmethod
    def from_files(
        cls,
        repo=None,
        flux=None,
        ae=None,
        text_encoder=None,
        variant=None,
        device=None,
        dtype=None,
        offload=False,
        max_length: int = 512,
    ) -> "Flux2Pipeline":
        """Load the parts from a FLUX.2 repo folder (diffusers folders or BFL's files) and/or one path per part;
        `max_length`: the prompt's tokens, padded or cut to it (512, as the official pipelines)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        paths = find_flux2_weights(repo, flux, ae, text_encoder)
        dev = check_flux2_parts(paths)  # before anything is loaded
        load_to = "cpu" if offload else device
        model = load_flux(paths["flux"], device=load_to, dtype=dtype)
        load_text = load_mistral if dev else load_qwen3
        pipe = cls(
            model,
            load_ae(paths["ae"], device=load_to, dtype=dtype),
            load_text(paths["text_encoder"], device=load_to, dtype=dtype, max_length=max_length),
            variant or variant_of(model, is_distilled(repo, paths["flux"])),
            device=device,
            dtype=dtype,
            offload=offload,
        )
        pipe.weights = {k: str(v.resolve()) for k, v in paths.items()}
        return pipe

    def __call__(self, prompt: str, *args, negative_prompt=None, true_cfg_scale: float | None = None, **kwargs):
        """FluxPipeline's call (width, height, num_steps, guidance, seed, num_images, image: a list of references,
        callback, output); true_cfg_scale None takes the variant's (Base: 4.0, with "" as the negative prompt)."""
        cfg = self.defaults.true_cfg if true_cfg_scale is None else true_cfg_scale
        negative = (negative_prompt or "") if cfg != 1.0 else negative_prompt
        return super().__call__(prompt, *args, negative_prompt=negative, true_cfg_scale=cfg, **kwargs)

    def _noise(self, height: int, width: int, seed: int):
        channels = self.model.params.in_channels
        return get_noise_flux2(1, height, width, seed, channels).to(self.device, self.dtype)  # [1, 128, H/16, W/16]

    def _inputs(self, prompt, noise, condition, negative_prompt, true_cfg_scale):
        """prepare_flux2 with the references; Base's true CFG takes the empty prompt as negative by default."""
        references = [r.to(noise) for r in condition.get("references", [])]
        inp = prepare_flux2(self.text_encoder, noise, prompt, self.ae, references)
        negative = None
        if true_cfg_scale != 1.0:
            negative = prepare_flux2(self.text_encoder, noise, negative_prompt or "", self.ae, references)
        return inp, negative

    def _prepare_images(self, image, mask, width, height, notes: list[str]) -> dict:
        """The references, read, capped and cropped; the output size (the first reference's by default)."""
        if mask is not None:
            raise ValueError("FLUX.2 takes no mask: its references are given with image=[...]")
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        family = "dev" if self.model.params.guidance_embed else "klein"
        if len(images) > MAX_REFERENCES[family]:
            raise ValueError(
                f"{len(images)} reference images: FLUX.2 [{family}] takes at most {MAX_REFERENCES[family]}"
            )
        pils = [read_image(im) for im in images]
        for im, pil in zip(images, pils):  # the official limits: no side under 64 pixels, no aspect beyond 8:1
            w, h = pil.size
            if min(w, h) < 64 or max(w / h, h / w) > 8:
                name = im if isinstance(im, (str, Path)) else "a reference image"
                raise ValueError(f"{name}: {w}×{h}; FLUX.2 takes references of at least 64 pixels a side, at most 8:1")
        pils = [cap_reference(pil, len(images), notes) for pil in pils]
        self.task = "edit" if images else "t2i"
        out = {"references": [image_to_tensor(p) for p in pils]}  # each [1, 3, H', W'] in [-1, 1]
        if images:
            out["sources"] = {"image": [file_record(im) for im in images]}
        first = pils[0].size if pils else (1024, 1024)
        out["size"] = (snap(width or first[0], "width", notes), snap(height or first[1], "height", notes))
        return out
