"""Sampling pipelines: a prompt → images with FLUX.1 dev / schnell, Fill and Kontext; visible + semantic → infrared.

A pipeline holds the loaded parts, reads and checks the images, and runs the one recipe of minflux/sampling.py:

    1. prepare   the prompt's T5 [B, 512, 4096] and CLIP [B, 768] encodings and the packed noise [B, L, 64];
                 Fill: + the image with the masked area erased, encoded, and the mask [B, L, 320] (prepare_fill);
                 Kontext: + the reference image, encoded and packed [B, L', 64], ids with axis0 = 1 (prepare_kontext)
    2. generate  Euler over the shifted schedule (denoise), guidance embedding, optional true CFG; unpack, decode

    pipe = FluxPipeline.from_files(repo="FLUX.1-dev")
    images = pipe("a prompt", width=1024, height=768, num_steps=28, guidance=3.5, seed=0)   # PIL images

Every image carries in `image.info` what determines its pixels (prompt, seed, steps, guidance, size, variant, T5
length, dtype, device, the weights' and LoRAs' absolute paths, with the LoRAs' and images' SHA-256), which
`save_image` writes as PNG text chunks (minflux/files/images.py: an A1111 "parameters" chunk for the image tools,
a "minflux" JSON chunk for `sample.py --from`), so an image holds what it takes to make it again. Without a seed,
one is drawn at random (as the official CLI does) and recorded. Image i is made alone, from noise drawn on the CPU
in float32 with the seed seed + i (`get_noise`): a seed gives the same image alone, in a batch, and again from its
PNG, on every CPU (diffusers' pipelines with that list of generators draw the same noise). FLUX.2's pipeline,
minflux/pipeline_flux2.py, is this one with FLUX.2's inputs.

Defaults are the official ones, kept with the presets (minflux/presets.py, from BFL's src/flux/cli*.py): schnell 4
steps, no schedule shift, no guidance embedding, T5 256 tokens; dev 50 steps, guidance 3.5; Fill 50 steps, guidance
30; Kontext 30 steps, guidance 2.5, the reference resized to the trained resolution nearest its aspect ratio.
"""

import dataclasses
from dataclasses import dataclass
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from minflux.files.images import DataError, a1111_parameters, image_to_tensor, mask_to_tensor, read_image
from minflux.files.images import settings_text, to_pil
from minflux.files.load import FLUX2_AE_MARKER, find_weights, load_ae, load_clip, load_flux, load_t5
from minflux.files.lora_files import load_lora
from minflux.files.weights import WeightsError, read_shapes, read_state_dict, sha256
from minflux.presets import spec_for
from minflux.sampling import generate, get_noise, pack, prepare, prepare_fill, prepare_kontext

# The resolutions Kontext was trained at, as (width, height); a reference image is resized to the one nearest
# its aspect ratio (black-forest-labs/flux, src/flux/util.py; diffusers' pipeline_flux_kontext.py).
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]  # fmt: skip


def task_of(model) -> str:
    """ "fill" (384 input channels: image, mask and noise), "kontext" (told by the variant name) or "t2i"."""
    if model.params.in_channels == 384:
        return "fill"
    return "kontext" if "kontext" in (getattr(model, "variant", None) or "") else "t2i"


def snap(size: int, what: str, notes: list[str], multiple: int = 16) -> int:
    """A width or height rounded down to a multiple of 16 (the VAE's 8 × the 2×2 packing), with a note: as the
    official CLI (`16 * (width // 16)`) and diffusers' pipelines do."""
    snapped = max(multiple, size // multiple * multiple)
    if snapped != size:
        notes.append(f"{what} {size} → {snapped} (a multiple of {multiple})")
    return snapped


def random_seed() -> int:
    """A seed for a run that names none: drawn from the OS (never the same twice), printed and recorded."""
    return random.SystemRandom().randrange(2**32)


def file_record(path) -> dict:
    """A file an image was made from, for its settings: where it is (absolute) and what it holds (SHA-256)."""
    if isinstance(path, (Image.Image, dict)):
        return {"in_memory": type(path).__name__}  # nothing to find again
    return {"path": str(Path(path).resolve()), "sha256": sha256(path)}


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA (the weights' own precision), fp32 on CPU (where bf16 matmuls are slow and inexact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _outputs(images: list[Tensor], output: str):
    """The decoded images [3, H, W] in [-1, 1] as PIL images, or with output="tensor" as [N, 3, H, W] in [0, 1]."""
    if output == "tensor":
        return ((torch.stack(images).float() + 1) / 2).clamp(0, 1).cpu()
    return [to_pil(x) for x in images]


class FluxPipeline:
    """Text-to-image (dev, schnell), Fill (image + mask) and Kontext (reference image + instruction).

    model, ae, clip, t5: the loaded parts (load_flux, load_ae, load_clip, load_t5). With `offload`, the parts
    wait on the CPU and each stage moves only what it needs to `device` and back: the text encoders (and the VAE)
    for the prompt, then the transformer and the VAE for the denoising and decoding (BFL's --offload, diffusers'
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
        self.encoders = (clip.model, t5.model, ae)  # on the device while the inputs are prepared
        self.task = task_of(model)
        self.defaults = spec_for(model)  # num_steps, guidance, shift, t5_max_length of the variant
        self.loras: list[dict] = []  # {"path", "sha256", "scale"} of each LoRA loaded, in order
        self.weights: dict[str, str] = {}  # the parts' files, when loaded by from_files
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    @classmethod
    def from_files(
        cls,
        repo=None,
        flux=None,
        ae=None,
        clip=None,
        t5=None,
        variant: str | None = None,
        device=None,
        dtype=None,
        offload: bool = False,
        max_length: int | None = None,
    ) -> "FluxPipeline":
        """Load the parts from one official repo folder (BFL or diffusers layout) and/or one path per part.

        A BFL repo holds flux1-*.safetensors and ae.safetensors; a diffusers repo transformer/ and vae/; both
        hold text_encoder/ (CLIP), text_encoder_2/ (T5) and their tokenizer folders. `variant` names the preset
        when the weights cannot tell (Kontext has dev's shapes). `max_length`: T5 tokens, the variant's default
        (512, schnell 256) when None.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        paths = find_weights(repo, flux, ae, clip, t5).require(repo)
        if FLUX2_AE_MARKER in read_shapes(paths.ae):  # checked before anything is loaded
            raise WeightsError(f"{paths.ae}: a FLUX.2 VAE (batch-norm statistics, 32 channels); FLUX.1 needs its own")
        load_to = "cpu" if offload else device
        model = load_flux(paths.flux, name=variant, device=load_to, dtype=dtype)
        length = max_length or spec_for(model).t5_max_length
        pipe = cls(
            model,
            load_ae(paths.ae, device=load_to, dtype=dtype),
            load_clip(paths.clip, device=load_to, dtype=dtype),
            load_t5(paths.t5, max_length=length, device=load_to, dtype=dtype),
            device=device,
            dtype=dtype,
            offload=offload,
        )
        pipe.weights = {k: str(Path(v).resolve()) for k, v in dataclasses.asdict(paths).items() if v is not None}
        return pipe

    def load_lora(self, path, scale: float = 1.0) -> list[str]:
        """Apply a LoRA file of any supported format (kohya, diffusers, BFL, XLabs, minflux); several stack."""
        layers = load_lora(self.model, path, scale)
        self.model.to(self.dtype)
        self.loras.append({**file_record(path), "scale": scale})
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
    def __call__(
        self,
        prompt: str,
        width: int | None = None,
        height: int | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,  # None: a random seed (recorded in each image's settings)
        num_images: int = 1,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 1.0,
        image=None,  # Fill: the image to paint into; Kontext: the reference (a path or a PIL image)
        mask=None,  # Fill: white where the model paints, the image's size
        callback=None,  # callback(step, total) after every denoising step, counted over all the images
        output: str = "pil",  # "pil": PIL images with their settings in .info; "tensor": [N, 3, H, W] in [0, 1]
    ):
        d = self.defaults
        seed = random_seed() if seed is None else seed
        num_steps = num_steps or d.num_steps
        guidance = d.guidance if guidance is None else guidance
        if not self.model.params.guidance_embed:
            guidance = None  # schnell was distilled without guidance: a value would be ignored
        notes, times = [], {}
        start = time.perf_counter()

        # 1. the image inputs, checked before anything is computed
        condition = self._prepare_images(image, mask, width, height, notes)
        width, height = condition.pop("size")

        # 2. the inputs: text, and the images' conditions (encoded to the posterior mean, not a draw)
        t0 = time.perf_counter()
        noise = self._noise(height, width, seed)  # [1, 16, H/8, W/8]
        with self._on_device(*self.encoders):
            inp, negative = self._inputs(prompt, noise, condition, negative_prompt, true_cfg_scale)
        times["prepare"] = time.perf_counter() - t0

        # 3. each image alone, from its own noise: the same image whatever the batch
        images, stages = [], {}
        with self._on_device(self.model, self.ae):
            for i in range(num_images):
                if i:
                    inp = dataclasses.replace(inp, img=self.pack(self._noise(height, width, seed + i)))
                step_done = None if callback is None else lambda s, n, i=i: callback(i * n + s, num_images * n)
                images.append(
                    generate(
                        self.model,
                        self.ae,
                        inp,
                        num_steps,
                        guidance,
                        d.shift,
                        negative,
                        true_cfg_scale,
                        step_done,
                        stages,
                    )[0]
                )  # [3, H, W]
                for k, v in stages.items():
                    times[k] = times.get(k, 0.0) + v
        times["total"] = time.perf_counter() - start
        self.timings, self.notes = times, notes

        out = _outputs(images, output)
        if output != "tensor":
            if negative_prompt is None or true_cfg_scale == 1.0:  # not used: not recorded
                negative_prompt, true_cfg_scale = None, 1.0
            for i, im in enumerate(out):
                im.info.update(
                    self._settings(
                        prompt,
                        negative_prompt,
                        true_cfg_scale,
                        seed + i,
                        num_steps,
                        guidance,
                        width,
                        height,
                        condition.get("sources", {}),
                    )
                )
        return out

    pack = staticmethod(pack)  # noise → tokens, for the images after the first

    def _noise(self, height: int, width: int, seed: int) -> Tensor:
        return get_noise(1, height, width, seed).to(self.device, self.dtype)  # [1, 16, H/8, W/8]

    def _inputs(self, prompt, noise, condition, negative_prompt, true_cfg_scale):
        """The task's inputs (the one recipe's prepare*), and the negative prompt's for true CFG (or None)."""
        if self.task == "fill":
            image, mask = (condition[k].to(self.device, self.dtype) for k in ("image", "mask"))
            inp = prepare_fill(self.t5, self.clip, noise, prompt, self.ae, image, mask)
        elif self.task == "kontext":
            inp = prepare_kontext(self.t5, self.clip, noise, prompt, self.ae, condition["image"].to(noise))
        else:
            inp = prepare(self.t5, self.clip, noise, prompt)
        negative = None
        if negative_prompt is not None and true_cfg_scale != 1.0:
            negative = prepare(self.t5, self.clip, noise, negative_prompt)
        return inp, negative

    def _prepare_images(self, image, mask, width, height, notes: list[str]) -> dict:
        """Read and check the task's images; fix the output size. Errors name the file and what was expected."""
        out = {}
        if self.task == "t2i":
            if image is not None or mask is not None:
                raise ValueError(
                    f"{self.model.variant or 'this model'} is a text-to-image model: an image is "
                    "for a Fill model (image + mask) or a Kontext model (reference image)"
                )
            out["size"] = (snap(width or 1024, "width", notes), snap(height or 1024, "height", notes))
            return out
        if image is None:
            what = "an image and a mask" if self.task == "fill" else "a reference image"
            raise ValueError(f"{self.model.variant or self.task}: this model needs {what} (image=...)")
        pil = read_image(image)
        out["sources"] = {"image": file_record(image)}
        if self.task == "fill":
            if mask is None:
                raise ValueError(f"{self.model.variant or 'Fill'}: a mask is needed (white where the model paints)")
            pil_mask = read_image(mask, "L")
            if pil_mask.size != pil.size:
                raise DataError(
                    mask if not isinstance(mask, Image.Image) else "mask",
                    f"the mask is {pil_mask.size[0]}×{pil_mask.size[1]}, the image "
                    f"{pil.size[0]}×{pil.size[1]}: they must be the same size",
                )
            out["sources"]["mask"] = file_record(mask)
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
        """What determines an image's pixels, as PNG text chunks: for `sample.py --from`, and for A1111's readers."""
        variant, text = self.model.variant or "custom", getattr(self, "text_encoder", self.t5)  # FLUX.2's or T5
        settings = {
            "task": self.task, "variant": variant, "prompt": prompt, "negative_prompt": negative,
            "true_cfg_scale": cfg, "seed": seed, "steps": steps, "guidance": guidance, "width": width,
            "height": height, "t5_max_length": getattr(getattr(text, "tokenizer", None), "max_length", None),
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)), "device": str(self.device),
            "weights": self.weights, "loras": self.loras, **sources,
        }  # fmt: skip
        # A1111 names a LoRA by its file's stem: <lora:stem:scale> in the prompt, "stem: sha256[:12]" in Lora hashes
        names = [(Path(lora.get("path", "lora")).stem, lora) for lora in self.loras]
        tags = "".join(f" <lora:{name}:{lora['scale']:g}>" for name, lora in names)
        hashes = ", ".join(f"{name}: {lora['sha256'][:12]}" for name, lora in names if "sha256" in lora) or None
        fields = {
            "Steps": steps,
            "Sampler": "Euler",
            "CFG scale": cfg,
            "Distilled CFG Scale": guidance,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": variant,
            "Lora hashes": hashes,
            "Version": "minflux",
        }
        return settings_text(settings, a1111_parameters(prompt + tags, negative, fields))


# --- a finished run, loaded ---------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A finished vis2ir run, loaded."""

    model: object  # Vis2IR: the Fill transformer (its LoRA loaded) with the semantic injection
    ae: object  # AutoEncoder
    clip: object  # CLIPEmbedder
    t5: object  # T5Embedder
    run: object  # minflux.tasks.runs.Run: its config and files


def load_run(folder, device="cpu", dtype=None) -> LoadedRun:
    """A finished vis2ir run folder, loaded from its files and the base weights its config names."""
    from minflux.files.load_llm import load_qwen3
    from minflux.tasks.runs import is_flux2_preset, read_run
    from minflux.tasks.vis2ir import vis2ir_model

    run = read_run(folder)
    if run.weights.flux is None:
        raise WeightsError(f"{folder}: holds no transformer.safetensors and its config.toml names no --flux")
    flux2 = is_flux2_preset(run.config.preset) and not run.config.flux  # FLUX.2 from scratch: Qwen3 in text_encoder/
    cfg, paths = run.config, run.weights if flux2 else run.weights.require(folder)
    text = dict(max_length=cfg.t5_max_length, device=device, dtype=dtype)
    flux = load_flux(paths.flux, device=device, dtype=dtype)
    if run.lora is not None:
        load_lora(flux, run.lora)
    model = vis2ir_model(flux, cfg)
    injection = model.injection_state_dict()
    if injection:
        if run.adapter is None:
            raise WeightsError(f"{folder}: --semantic {cfg.semantic} needs adapter.safetensors, which is missing")
        sd = read_state_dict(run.adapter, dtype=dtype)
        if missing := set(injection) - set(sd):
            raise WeightsError(f"{run.adapter}: missing key(s) {sorted(missing)[:3]}")
        model.load_state_dict({**model.state_dict(), **sd})
    return LoadedRun(
        model=model.to(device).eval(),
        ae=load_ae(paths.ae, device=device, dtype=dtype),
        clip=None if flux2 else load_clip(paths.clip, device=device, dtype=dtype),
        t5=load_qwen3(paths.clip, **text) if flux2 else load_t5(paths.t5, **text),
        run=run,
    )


class Vis2IRPipeline:
    """Visible image + semantic map → infrared image, with a finished `python train.py` run.

    The run holds the Fill transformer (trained in full, or LoRA on the official Fill base its config.toml
    names), the semantic injection, the VAE and the text encoders (load_run). The two panels
    are centre-cropped to squares and resized to the run's panel size (the semantic map with nearest-neighbour, so
    no colour between two classes is invented), laid out as the training triptych with an empty target panel,
    and the target half of the diptych is generated.
    """

    def __init__(self, parts, device=None, dtype=None):  # parts: LoadedRun
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.run = parts.run  # minflux.tasks.runs.Run: the folder and its files
        self.config = self.run.config  # its TrainConfig
        self.model = parts.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.ae = parts.ae.to(self.device, self.dtype).eval().requires_grad_(False)
        self.clip, self.t5 = parts.clip, parts.t5
        self.timings: dict[str, float] = {}

    @classmethod
    def from_run(cls, run, device=None, dtype=None) -> "Vis2IRPipeline":
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        return cls(load_run(run, device=device, dtype=dtype), device, dtype)

    @torch.no_grad()
    def infrared(
        self,
        triptychs: Tensor,
        prompts: list[str],
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
    ) -> Tensor:
        """Triptychs [N, 3, S, 3S] in [-1, 1] → the generated infrared panels [N, 3, S, S] in [-1, 1]; scene i
        from the noise of seed + i. The triptychs' middle (target) panel is not read: the Fill condition erases it.
        sample.py passes held-out triptychs, so it can compare with their target."""
        from minflux.tasks.vis2ir import generate_infrared, in_context_of, prepare_for_run

        cfg = self.config
        num_steps, guidance = num_steps or cfg.sample_steps, cfg.guidance if guidance is None else guidance
        t0 = time.perf_counter()
        inp = prepare_for_run(
            cfg, self.t5, self.clip, self.ae, triptychs.to(self.device, self.dtype), prompts, seed, self.dtype
        )
        self.timings["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        infrared = generate_infrared(self.model, self.ae, inp, num_steps, guidance, in_context_of(cfg))  # [N, 3, S, S]
        self.timings["denoise + decode"] = time.perf_counter() - t0
        return infrared

    @torch.no_grad()
    def __call__(
        self,
        visible,
        semantic,
        prompt: str = "",
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        output: str = "pil",
    ):
        """visible, semantic: paths or PIL images, or equally long lists of them. Returns one infrared image each.
        Without a seed, one is drawn at random and recorded in each image's settings."""
        from minflux.tasks.data import fit_panel

        visible = visible if isinstance(visible, (list, tuple)) else [visible]
        semantic = semantic if isinstance(semantic, (list, tuple)) else [semantic]
        if len(visible) != len(semantic):
            raise ValueError(f"{len(visible)} visible image(s) but {len(semantic)} semantic map(s): give one map each")
        cfg, seed = self.config, random_seed() if seed is None else seed
        size, num_steps = cfg.panel_size, num_steps or cfg.sample_steps
        guidance = cfg.guidance if guidance is None else guidance
        start = time.perf_counter()
        panels = []
        for v, s in zip(visible, semantic):
            v_img, s_img = fit_panel(read_image(v), size, semantic=False), fit_panel(read_image(s), size, semantic=True)
            v_t, s_t = image_to_tensor(v_img), image_to_tensor(s_img)  # [1, 3, S, S] each
            panels.append(torch.cat((v_t, torch.zeros_like(v_t), s_t), dim=-1))  # [1, 3, S, 3S], target empty
        infrared = self.infrared(torch.cat(panels), [prompt] * len(panels), num_steps, guidance, seed)  # [N, 3, S, S]
        self.timings["total"] = time.perf_counter() - start
        out = _outputs(list(infrared), output)
        if output != "tensor":
            run = Path(self.run.folder).resolve()
            for i, (im, v, s) in enumerate(zip(out, visible, semantic)):
                settings = {
                    "task": "vis2ir",
                    "run": str(run),
                    "prompt": prompt,
                    "seed": seed + i,
                    "steps": num_steps,
                    "guidance": guidance,
                    "semantic_mode": self.config.semantic,
                    "visible": file_record(v),
                    "semantic_map": file_record(s),
                    "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
                    "device": str(self.device),
                }
                fields = {
                    "Steps": num_steps,
                    "Sampler": "Euler",
                    "Distilled CFG Scale": guidance,
                    "Seed": seed + i,
                    "Size": f"{size}x{size}",
                    "Model": f"vis2ir {run.name}",
                    "Version": "minflux",
                }
                im.info.update(settings_text(settings, a1111_parameters(prompt, None, fields)))
        return out
