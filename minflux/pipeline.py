"""Sampling pipelines: a prompt → images with FLUX.1 dev / schnell, Fill and Kontext; visible + semantic → infrared.

A pipeline holds the loaded parts and runs the stages of seed 003's inference walk-through, each a plain
function of minflux:

    1. text     CLIP pooled vector [B, 768] and T5 hidden states [B, 512, 4096]          (clip.py, t5.py)
    2. noise    [B, 16, H/8, W/8], packed into tokens [B, H/16 · W/16, 64]                (flow.pack)
    3. images   Fill: the image with the masked area erased, encoded, + the mask [B, L, 320] (flow.fill_condition)
                Kontext: the reference image, encoded and packed [B, L', 64], ids with axis0 = 1
    4. denoise  Euler over the shifted schedule, guidance embedding, optional true CFG       (flow.denoise)
    5. decode   unpack → VAE decoder → image [B, 3, H, W]                                   (autoencoder.py)

    pipe = FluxPipeline.from_files(repo="FLUX.1-dev")
    images = pipe("a prompt", width=1024, height=768, num_steps=28, guidance=3.5, seed=0)   # PIL images

Every image carries its settings in `image.info` (prompt, seed, steps, guidance, size, variant, LoRAs), which
`save_image` writes as PNG text chunks, so an image holds what it takes to make it again. The initial noise
is drawn on the CPU in float32 from `torch.Generator().manual_seed(seed + i)` for image i, so a seed gives
the same image on any device and in any batch (diffusers' FluxPipeline with that list of generators draws the
same noise).

Defaults are the official ones, kept with the presets (minflux/presets.py, from black-forest-labs/flux's
src/flux/cli*.py): schnell 4 steps, no schedule shift, no guidance embedding, T5 256 tokens; dev 50 steps,
guidance 3.5; Fill 50 steps, guidance 30; Kontext 30 steps, guidance 2.5, the reference resized to the
trained resolution nearest its aspect ratio.
"""

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from minflux.data import DataError
from minflux.flow import denoise, fill_condition, get_schedule, latent_ids, pack, prepare_txt_ids, unpack
from minflux.presets import spec_for


# The resolutions Kontext was trained at, as (width, height); a reference image is resized to the one nearest
# its aspect ratio (black-forest-labs/flux, src/flux/util.py; diffusers' pipeline_flux_kontext.py).
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]  # fmt: skip


def task_of(model) -> str:
    """"fill" (384 input channels: image, mask and noise), "kontext" (told by the variant name) or "t2i"."""
    if model.params.in_channels == 384:
        return "fill"
    return "kontext" if "kontext" in (getattr(model, "variant", None) or "") else "t2i"


def snap(size: int, what: str, notes: list[str], multiple: int = 16) -> int:
    """A width or height rounded to the nearest multiple of 16 (the VAE's 8 × the 2×2 packing), with a note."""
    snapped = max(multiple, int(size / multiple + 0.5) * multiple)  # halves round up
    if snapped != size:
        notes.append(f"{what} {size} → {snapped} (a multiple of {multiple})")
    return snapped


def initial_noise(seeds: list[int], height: int, width: int) -> Tensor:
    """One latent of noise per seed [N, 16, H/8, W/8], each from its own CPU generator, in float32."""
    shape = (16, 2 * (height // 16), 2 * (width // 16))
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


# --- images in and out -----------------------------------------------------------------------------------------


def read_image(source, mode: str = "RGB") -> Image.Image:
    """A PIL image from a path (or a PIL image as is), converted to `mode`; an unreadable file names itself."""
    if isinstance(source, Image.Image):
        return source.convert(mode)
    try:
        with Image.open(source) as im:
            return im.convert(mode)
    except FileNotFoundError as e:
        raise DataError(source, "no such file") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(source, f"cannot be read as an image ({type(e).__name__}: {e})") from e


def image_to_tensor(image: Image.Image) -> Tensor:
    """A PIL RGB image → [1, 3, H, W] in [-1, 1], the range the VAE expects."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, 3] in [0, 1]
    return (x.permute(2, 0, 1)[None] * 2 - 1).contiguous()  # [1, 3, H, W]


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """A PIL mask → [1, 1, H, W] of 0 and 1: white (≥ 50 %) is where the model paints."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return (m >= 0.5).float()[None, None]  # [1, 1, H, W]


def tensor_to_images(x: Tensor) -> list[Image.Image]:
    """Decoded images [B, 3, H, W] in [-1, 1] → PIL images."""
    from minflux.runs import to_pil

    return [to_pil(img) for img in x]


def save_image(image: Image.Image, path) -> Path:
    """Write a PNG atomically, with the settings in `image.info` as its text chunks."""
    from minflux.runs import save_png

    return save_png(image, path, text={k: v for k, v in image.info.items() if isinstance(v, str)})


def read_settings(path) -> dict[str, str]:
    """The settings a minflux PNG carries in its text chunks (what `save_image` wrote)."""
    with Image.open(path) as im:
        return dict(getattr(im, "text", {}))


# --- where the parts live: devices, dtypes, offloading -----------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA (the weights' own precision), fp32 on CPU (where bf16 matmuls are slow and inexact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class FluxPipeline:
    """Text-to-image (dev, schnell), Fill (image + mask) and Kontext (reference image + instruction).

    model, ae, clip, t5: the loaded parts (load_flux, load_ae, load_clip, load_t5). With `offload`, the parts
    wait on the CPU and each stage moves only what it needs to `device` and back: the text encoders for the
    prompt, then the transformer for the denoising loop, then the VAE (BFL's --offload, diffusers'
    enable_model_cpu_offload). `timings` holds the seconds of each stage of the last call.
    """

    def __init__(self, model, ae, clip, t5, device=None, dtype=None, offload: bool = False):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.offload = offload
        self.model, self.ae, self.clip, self.t5 = model, ae, clip, t5
        home = torch.device("cpu") if offload else self.device
        for part in (model, ae):
            part.to(home, self.dtype).eval().requires_grad_(False)
        for part in (clip.model, t5.model):  # kept in their loaded dtype (T5 in fp16 keeps fp32 parts)
            part.to(home).eval().requires_grad_(False)
        self.task = task_of(model)
        self.defaults = spec_for(model)  # num_steps, guidance, shift, t5_max_length of the variant
        self.loras: list[tuple[str, float]] = []
        self.timings: dict[str, float] = {}

    @classmethod
    def from_files(
        cls, repo=None, flux=None, ae=None, clip=None, t5=None, variant: str | None = None, device=None,
        dtype=None, offload: bool = False, max_length: int | None = None,
    ) -> "FluxPipeline":  # fmt: skip
        """Load the parts from one official repo folder (BFL or diffusers layout) and/or one path per part.

        A BFL repo holds flux1-*.safetensors and ae.safetensors; a diffusers repo transformer/ and vae/; both
        hold text_encoder/ (CLIP), text_encoder_2/ (T5) and their tokenizer folders. `variant` names the preset
        when the weights cannot tell (Kontext has dev's shapes). `max_length`: T5 tokens, the variant's default
        (512, schnell 256) when None.
        """
        from minflux.autoencoder import load_ae
        from minflux.clip import load_clip
        from minflux.loaders import load_flux
        from minflux.t5 import load_t5
        from minflux.weights import WeightsError

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        repo = Path(repo) if repo is not None else None

        def part(given, *names):
            if given is not None:
                return Path(given)
            if repo is None:
                raise WeightsError(f"no path for the {names[0]}: give repo= (an official repo folder) or its file")
            for name in names:
                if (repo / name).exists():
                    return repo / name
            raise WeightsError(f"{repo}: holds none of {', '.join(names)}")

        load_to = "cpu" if offload else device
        flux_path = Path(flux) if flux is not None else repo
        if flux_path is None:
            raise WeightsError("no path for the transformer: give repo= (an official repo folder) or flux=")
        model = load_flux(flux_path, name=variant, device=load_to, dtype=dtype)
        length = max_length or spec_for(model).t5_max_length
        return cls(
            model,
            load_ae(part(ae, "ae.safetensors", "vae"), device=load_to, dtype=dtype),
            load_clip(part(clip, "text_encoder"), device=load_to, dtype=dtype),
            load_t5(part(t5, "text_encoder_2"), max_length=length, device=load_to, dtype=dtype),
            device=device, dtype=dtype, offload=offload,
        )  # fmt: skip

    def load_lora(self, path, scale: float = 1.0) -> list[str]:
        """Apply a LoRA file of any supported format (kohya, diffusers, BFL, XLabs, minflux); several stack."""
        from minflux.lora import load_lora

        layers = load_lora(self.model, path, scale)
        self.model.to(self.dtype)
        self.loras.append((str(path), scale))
        return layers

    @contextmanager
    def _on_device(self, *parts):
        """With offloading, move `parts` to the device for the enclosed stage and back to the CPU after it."""
        if self.offload:
            for p in parts:
                p.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for p in parts:
                    p.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts → T5 hidden states [B, 512, 4096] and the pooled CLIP vector [B, 768], on the device."""
        with self._on_device(self.clip.model, self.t5.model):
            txt, vec = self.t5(prompts), self.clip(prompts)
        return txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        width: int | None = None,
        height: int | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        num_images: int = 1,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 1.0,
        image=None,  # Fill: the image to paint into; Kontext: the reference (a path or a PIL image)
        mask=None,  # Fill: white where the model paints, the image's size
        callback=None,  # callback(step, num_steps) after every denoising step
        output: str = "pil",  # "pil": PIL images with their settings in .info; "tensor": [N, 3, H, W] in [0, 1]
    ):
        d = self.defaults
        num_steps = num_steps or d.num_steps
        guidance = d.guidance if guidance is None else guidance
        if not self.model.params.guidance_embed:
            guidance = None  # schnell was distilled without guidance: a value would be ignored
        notes, times = [], {}
        start = time.perf_counter()

        # 1. the image inputs, checked before anything is computed
        condition = self._prepare_images(image, mask, width, height, notes)
        width, height = condition.pop("size")

        # 2. text
        t0 = time.perf_counter()
        prompts = [prompt] * num_images
        txt, vec = self.encode_prompt(prompts)
        txt_ids = prepare_txt_ids(num_images, txt.shape[1], device=self.device)
        neg = {}
        if negative_prompt is not None and true_cfg_scale != 1.0:
            neg_txt, neg_vec = self.encode_prompt([negative_prompt] * num_images)
            neg = dict(neg_txt=neg_txt, neg_txt_ids=txt_ids, neg_vec=neg_vec, true_cfg_scale=true_cfg_scale)
        times["text"] = time.perf_counter() - t0

        # 3. noise and the images' conditions (encoded to the posterior mean, not a draw: no random state)
        t0 = time.perf_counter()
        seeds = [seed + i for i in range(num_images)]
        noise = initial_noise(seeds, height, width).to(self.device, self.dtype)  # [N, 16, H/8, W/8]
        img, img_ids = pack(noise), latent_ids(noise)  # [N, 4096, 64], [N, 4096, 3]
        cond = {}
        with self._on_device(self.ae):
            if self.task == "fill":
                image, mask = condition["image"].to(self.device, self.dtype), condition["mask"].to(self.device, self.dtype)
                x_cond = fill_condition(self.ae, image, mask, sample=False)  # [1, 4096, 320]
                cond["img_cond"] = x_cond.expand(num_images, -1, -1)  # [N, 4096, 320]
            elif self.task == "kontext":
                ref = self.ae.encode(condition["image"].to(self.device, self.dtype), sample=False)  # [1, 16, 128, 128]
                cond["img_cond_seq"] = pack(ref).expand(num_images, -1, -1)  # [N, 4096, 64]
                cond["img_cond_seq_ids"] = latent_ids(ref, axis0=1.0).expand(num_images, -1, -1)  # axis0 = 1
        times["encode images"] = time.perf_counter() - t0

        # 4. denoise: the schedule is shifted by the generated image's token count alone
        t0 = time.perf_counter()
        timesteps = get_schedule(num_steps, img.shape[1], shift=d.shift)
        with self._on_device(self.model):
            latent = denoise(
                self.model, img, img_ids, txt, txt_ids, vec, timesteps,
                guidance=guidance if guidance is not None else 0.0, callback=callback, **cond, **neg,
            )  # fmt: skip
        times["denoise"] = time.perf_counter() - t0

        # 5. decode
        t0 = time.perf_counter()
        with self._on_device(self.ae):
            decoded = self.ae.decode(unpack(latent, height, width))  # [N, 3, H, W]
        times["decode"] = time.perf_counter() - t0
        times["total"] = time.perf_counter() - start
        self.timings, self.notes = times, notes

        if output == "tensor":
            return ((decoded.float() + 1) / 2).clamp(0, 1).cpu()
        images = tensor_to_images(decoded)
        for im, s in zip(images, seeds):
            im.info.update(self._settings(prompt, negative_prompt, true_cfg_scale, s, num_steps, guidance, width,
                                          height, condition.get("sources", {})))  # fmt: skip
        return images

    def _prepare_images(self, image, mask, width, height, notes: list[str]) -> dict:
        """Read and check the task's images; fix the output size. Errors name the file and what was expected."""
        out = {}
        if self.task == "t2i":
            if image is not None or mask is not None:
                raise ValueError(f"{self.model.variant or 'this model'} is a text-to-image model: an image is "
                                 "for a Fill model (image + mask) or a Kontext model (reference image)")  # fmt: skip
            out["size"] = (snap(width or 1024, "width", notes), snap(height or 1024, "height", notes))
            return out
        if image is None:
            what = "an image and a mask" if self.task == "fill" else "a reference image"
            raise ValueError(f"{self.model.variant or self.task}: this model needs {what} (image=...)")
        pil = read_image(image)
        out["sources"] = {"image": str(image) if not isinstance(image, Image.Image) else "PIL image"}
        if self.task == "fill":
            if mask is None:
                raise ValueError(f"{self.model.variant or 'Fill'}: a mask is needed (white where the model paints)")
            pil_mask = read_image(mask, "L")
            if pil_mask.size != pil.size:
                raise DataError(mask if not isinstance(mask, Image.Image) else "mask",
                                f"the mask is {pil_mask.size[0]}×{pil_mask.size[1]}, the image "
                                f"{pil.size[0]}×{pil.size[1]}: they must be the same size")  # fmt: skip
            out["sources"]["mask"] = str(mask) if not isinstance(mask, Image.Image) else "PIL image"
            w = snap(width or pil.size[0], "width", notes)
            h = snap(height or pil.size[1], "height", notes)
            out["image"] = image_to_tensor(pil.resize((w, h), Image.Resampling.LANCZOS) if pil.size != (w, h) else pil)
            pil_mask = pil_mask.resize((w, h), Image.Resampling.NEAREST) if pil_mask.size != (w, h) else pil_mask
            out["mask"] = mask_to_tensor(pil_mask)
            out["size"] = (w, h)
        else:  # Kontext: the reference at the trained resolution nearest its aspect ratio
            aspect = pil.size[0] / pil.size[1]
            _, rw, rh = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
            if (rw, rh) != pil.size:
                notes.append(f"reference {pil.size[0]}×{pil.size[1]} → {rw}×{rh} (Kontext's nearest trained size)")
            out["image"] = image_to_tensor(pil.resize((rw, rh), Image.Resampling.LANCZOS))
            out["size"] = (snap(width or rw, "width", notes), snap(height or rh, "height", notes))
        return out

    def _settings(self, prompt, negative, cfg, seed, steps, guidance, width, height, sources) -> dict[str, str]:
        """What an image needs to be made again, as strings for PNG text chunks."""
        s = {
            "prompt": prompt,
            "seed": str(seed),
            "steps": str(steps),
            "guidance": "none" if guidance is None else f"{guidance:g}",
            "width": str(width),
            "height": str(height),
            "variant": self.model.variant or "custom",
            "task": self.task,
            "software": "minflux",
        }
        if negative is not None and cfg != 1.0:
            s |= {"negative_prompt": negative, "true_cfg_scale": f"{cfg:g}"}
        if self.loras:
            s["loras"] = ", ".join(f"{name}:{scale:g}" for name, scale in self.loras)
        return s | sources


class Vis2IRPipeline:
    """Visible image + semantic map → infrared image, with a finished `python train.py` run.

    The run holds the Fill transformer (trained in full, or LoRA on the official Fill base its config.toml
    names), the semantic injection, the VAE and the text encoders (minflux.vis2ir.load_run). The two panels are
    centre-cropped to squares and resized to the run's panel size (the semantic map with nearest-neighbour, so
    no colour between two classes is invented), laid out as the training triptych with an empty target panel,
    and the target half of the diptych is generated.
    """

    def __init__(self, parts: dict, device=None, dtype=None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.config = parts["config"]
        self.model = parts["model"].to(self.device, self.dtype).eval().requires_grad_(False)
        self.ae = parts["ae"].to(self.device, self.dtype).eval().requires_grad_(False)
        self.clip, self.t5 = parts["clip"], parts["t5"]
        self.run = parts.get("run")
        self.timings: dict[str, float] = {}

    @classmethod
    def from_run(cls, run, device=None, dtype=None) -> "Vis2IRPipeline":
        from minflux.vis2ir import load_run

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        return cls(load_run(run, device=device, dtype=dtype) | {"run": str(run)}, device, dtype)

    def _settings(self, num_steps: int | None, guidance: float | None) -> tuple[int, float]:
        """The run's sampling settings where none are given."""
        num_steps = num_steps or self.config.get("sample_steps", 16)
        return num_steps, self.config.get("guidance", 1.0) if guidance is None else guidance

    @torch.no_grad()
    def infrared(self, triptychs: Tensor, prompts: list[str], num_steps: int | None = None,
                 guidance: float | None = None, seed: int = 0) -> Tensor:  # fmt: skip
        """Triptychs [N, 3, S, 3S] in [-1, 1] → the generated infrared panels [N, 3, S, S] in [-1, 1].

        The triptychs' middle (target) panel is not read: the Fill condition erases it, and the generation
        starts from noise. sample.py passes held-out triptychs, so it can compare with their target.
        """
        from minflux.vis2ir import encode_triptych, generate_infrared

        num_steps, guidance = self._settings(num_steps, guidance)
        t0 = time.perf_counter()
        batch = encode_triptych(self.ae, triptychs.to(self.device, self.dtype), self.config.get("semantic", "xattn_rope"))
        txt, y = self.t5(prompts).to(self.dtype), self.clip(prompts).to(self.dtype)
        self.timings["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        txt_ids = prepare_txt_ids(len(prompts), txt.shape[1], device=self.device)
        infrared = generate_infrared(self.model, self.ae, batch, txt, txt_ids, y, num_steps, guidance, seed=seed)
        self.timings["denoise + decode"] = time.perf_counter() - t0
        return infrared  # [N, 3, S, S]

    @torch.no_grad()
    def __call__(self, visible, semantic, prompt: str = "", num_steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, output: str = "pil"):  # fmt: skip
        """visible, semantic: paths or PIL images, or equally long lists of them. Returns one infrared image each."""
        from minflux.data import _fit

        visible = visible if isinstance(visible, (list, tuple)) else [visible]
        semantic = semantic if isinstance(semantic, (list, tuple)) else [semantic]
        if len(visible) != len(semantic):
            raise ValueError(f"{len(visible)} visible image(s) but {len(semantic)} semantic map(s): give one map each")
        size = self.config.get("panel_size") or 512
        num_steps, guidance = self._settings(num_steps, guidance)
        start = time.perf_counter()
        panels = []
        for v, s in zip(visible, semantic):
            v_img, s_img = _fit(read_image(v), size, semantic=False), _fit(read_image(s), size, semantic=True)
            v_t, s_t = image_to_tensor(v_img), image_to_tensor(s_img)  # [1, 3, S, S] each
            panels.append(torch.cat((v_t, torch.zeros_like(v_t), s_t), dim=-1))  # [1, 3, S, 3S], target empty
        infrared = self.infrared(torch.cat(panels), [prompt] * len(panels), num_steps, guidance, seed)  # [N, 3, S, S]
        self.timings["total"] = time.perf_counter() - start
        if output == "tensor":
            return ((infrared.float() + 1) / 2).clamp(0, 1).cpu()
        images = tensor_to_images(infrared)
        for im, v, s in zip(images, visible, semantic):
            im.info.update({
                "task": "vis2ir", "run": str(self.run), "prompt": prompt, "seed": str(seed), "steps": str(num_steps),
                "guidance": f"{guidance:g}", "semantic_mode": str(self.config.get("semantic")),
                "visible": str(v) if not isinstance(v, Image.Image) else "PIL image",
                "semantic_map": str(s) if not isinstance(s, Image.Image) else "PIL image", "software": "minflux",
            })  # fmt: skip
        return images
