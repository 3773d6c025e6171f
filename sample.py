"""Sample from minflux.

    python sample.py                                   infrared for held-out scenes, from the latest train.py run
    python sample.py --run runs/NAME --visible v.png --semantic-map s.png      vis2ir on your own images
    python sample.py --repo FLUX.1-schnell --prompt "a fox in the snow"      text-to-image (schnell or dev)
    python sample.py --repo FLUX.1-Fill-dev --image photo.png --mask mask.png --prompt "a red door"
    python sample.py --repo FLUX.1-Kontext-dev --image ref.png --prompt "make it winter"
    python sample.py --repo FLUX.1-dev --from outputs/img_0003.png          again, from the settings in a PNG
    python sample.py --repo FLUX.2-klein-4B --image a.png --image b.png --prompt "..."   FLUX.2, two references

With official weights, --repo is one official repo folder (BFL or diffusers layout); --flux/--ae/--clip/--t5
(FLUX.2: --text-encoder) name the parts one by one instead. Each image is written to --output-dir with its settings
in PNG text chunks: an A1111 "parameters" chunk (read by A1111, Forge, CivitAI, ComfyUI) and minflux's own, which
--from reads back (weights, LoRAs and images by absolute path, so it works from any folder). Without --seed a random
seed is drawn, printed and recorded. Defaults are the official ones: schnell 4 steps and no guidance, dev 50 steps
and guidance 3.5, Fill 50 and 30, Kontext 30 and 2.5; FLUX.2 [klein] 4 steps, no guidance; [klein] Base 50 steps,
true CFG 4; [dev] 50 steps, guidance 4. BFL's spellings (--num_steps, --output_dir, --name) are accepted too.
The held-out grid goes to RUN/sample-SEED.png, or to --output-dir, as sample-SEED-2.png, -3, ... when the name is
taken; --output names one file instead, replaced if there. The last line printed is the last file written.
"""

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from minflux.files.images import DataError, checked_settings, image_grid, read_image, save_image, save_new, save_png
from minflux.files.images import shown
from minflux.files.weights import WeightsError, sha256
from minflux.tasks.common import frozen_parts
from minflux.tasks.flags import dashed
from minflux.tasks.folders import latest_run
from minflux.tasks.parallel import device_problem
from minflux.tasks.progress import Progress

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the embedded default and vis2ir (a train.py run)")
    g.add_argument("--run", type=Path, help="a train.py run folder (default: the latest under --runs)")
    g.add_argument("--runs", type=Path, default=Path("runs"), help="where train.py writes its runs")
    g.add_argument("--visible", type=Path, nargs="+", help="visible image(s) to translate to infrared")
    g.add_argument("--semantic-map", type=Path, nargs="+", help="their semantic maps (class colours), one each")
    g.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the held-out grid PNG, replaced if there (default: "
        "RUN/sample-SEED.png, or sample-SEED-2.png, -3, ... when taken)",
    )

    g = p.add_argument_group("official weights")
    g.add_argument("--repo", type=Path, help="an official repo folder (FLUX.1-dev, -Fill-dev, ..., FLUX.2-klein-4B)")
    g.add_argument("--flux", type=Path, help="the transformer: flux1-*.safetensors or a diffusers transformer/ folder")
    g.add_argument("--ae", type=Path, help="ae.safetensors or a diffusers vae/ folder")
    g.add_argument("--clip", type=Path, help="CLIP-L: a text_encoder/ folder (its tokenizer/ beside it) or file")
    g.add_argument("--t5", type=Path, help="T5-XXL: a text_encoder_2/ folder (its tokenizer_2/ beside it) or file")
    g.add_argument("--text-encoder", type=Path, help="FLUX.2: Qwen3's or Mistral's text_encoder/ (tokenizer/ beside)")
    g.add_argument(
        "--variant",
        "--name",
        help="the preset when the weights cannot tell (flux-dev-kontext has dev's shapes); BFL's --name",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA (kohya, diffusers, BFL, XLabs or minflux file), scale 1 by default; repeat for more",
    )

    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", help="the prompt (vis2ir: default empty)")
    g.add_argument("--negative-prompt", help="a negative prompt, used with --true-cfg above 1 (two passes a step)")
    g.add_argument("--true-cfg", type=float, default=None, help="true classifier-free guidance scale (default 1: off)")
    g.add_argument(
        "--image",
        type=Path,
        action="append",
        help="Fill: the image to paint into; Kontext: the reference; FLUX.2: a reference, repeat for more",
    )
    g.add_argument("--mask", type=Path, help="Fill: white where the model paints, the image's size")
    g.add_argument(
        "--width",
        type=int,
        help="pixels, rounded down to a multiple of 16 as the official CLI (default 1024; Fill/Kontext: the image's)",
    )
    g.add_argument("--height", type=int, help="pixels, rounded down to a multiple of 16")
    g.add_argument("--steps", "--num-steps", type=int, help="Euler steps (default: the model's official number)")
    g.add_argument("--guidance", type=float, help="the guidance embedding's value (dev, Fill, Kontext)")
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of image 1; image i uses seed + i - 1 (default: drawn "
        "at random, printed and recorded; held-out scenes: 0)",
    )
    g.add_argument("--num-images", "--num", type=int, help="images to generate (default 1), or held-out scenes (8)")
    g.add_argument("--max-length", type=int, help="the prompt's tokens: T5's (512, schnell 256), FLUX.2's (512)")
    g.add_argument("--from", dest="settings_from", type=Path, help="take unset options from a minflux PNG's settings")
    g.add_argument(
        "--output-dir",
        "--out",
        type=Path,
        help="where images are written (default: outputs; the held-out grid: the run folder)",
    )

    g = p.add_argument_group("study")
    g.add_argument("--trace", action="store_true", help="print the tensor shapes of every stage, one line each")
    g.add_argument("--params", action="store_true", help="print the parameter table of every component")

    g = p.add_argument_group("device")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default, or auto: cuda when available)")
    g.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's blocks, on the CPU with "
        "their weights frozen in: the first step compiles (a minute), the others run faster "
        "(minflux/study/BENCH.md)",
    )
    g.add_argument(
        "--offload",
        action="store_true",
        help="keep the parts on the CPU and move each to the GPU only for its stage (less GPU memory)",
    )
    return p.parse_args(dashed(p, sys.argv[1:] if argv is None else argv))


# What --from takes from an image's settings: {option: its key in the settings (files/images.checked_settings)}
FROM_SETTINGS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps", "width": "width",
    "height": "height", "guidance": "guidance", "true_cfg": "true_cfg_scale", "max_length": "t5_max_length",
    "dtype": "dtype",
}  # fmt: skip


def apply_settings(args) -> None:
    """Fill the options not given on the command line from the settings an earlier image carries (what determines
    its pixels), and say where what is found now differs from what made it. A setting that is not what minflux
    writes is a DataError naming the image and the setting (checked_settings)."""
    png = args.settings_from
    s = checked_settings(png)
    for arg, key in FROM_SETTINGS.items():
        if getattr(args, arg) is None and key in s:
            setattr(args, arg, s[key])
    if args.dtype not in (None, *DTYPES):
        expected = f"one of {', '.join(DTYPES)}"
        raise DataError(png, f'its "minflux" text chunk holds "dtype": {shown(args.dtype)}; expected {expected}')
    if args.variant is None and s.get("variant", "custom") != "custom":
        args.variant = s["variant"]
    if not (args.repo or args.flux):  # the weights it was made with, where they were
        for part, path in s.get("weights", {}).items():
            if getattr(args, part) is None:
                setattr(args, part, Path(path))
    if args.image is None and s.get("image"):  # one record (FLUX.1), a list of references (FLUX.2)
        records = [r for r in (s["image"] if isinstance(s["image"], list) else [s["image"]]) if "path" in r]
        args.image = [Path(r["path"]) for r in records] or None
        for record in records:
            check_same(png, "image", record)
    if args.mask is None and "path" in s.get("mask", {}):
        args.mask = Path(s["mask"]["path"])
        check_same(png, "mask", s["mask"])
    if not args.lora:
        for lora in (lora for lora in s.get("loras", []) if "path" in lora):  # not one given in memory
            args.lora.append(f"{lora['path']}:{lora['scale']:g}")
            check_same(png, "LoRA", lora)
    if args.device is None and "device" in s:
        if problem := device_problem(s["device"]):
            print(f"note: {png} was made on {s['device']} ({problem}); its pixels may differ on this machine")
        else:
            args.device = s["device"]


def check_same(png: Path, what: str, record: dict) -> None:
    """Say so when a file an image was made from is missing or holds something else now."""
    path = Path(record["path"])
    if not path.is_file():
        return  # loading it names it
    if "sha256" in record and sha256(path) != record["sha256"]:
        print(
            f"note: the {what} {path} differs from the one {png} was made with (sha256 {record['sha256'][:12]} "
            f"then, {sha256(path)[:12]} now): expect another image"
        )


def lora_and_scale(spec: str) -> tuple[Path, float]:
    """ "style.safetensors:0.8" -> (Path("style.safetensors"), 0.8), "x:1e-3" -> (Path("x"), 0.001); no scale, or a
    ":" that is part of the path -> 1.0. A scale that is not finite (x:nan) is a ValueError."""
    path, colon, scale = spec.rpartition(":")
    try:
        value = float(scale) if colon else None
    except ValueError:
        value = None
    if value is None:
        return Path(spec), 1.0
    if not math.isfinite(value):
        raise ValueError(f"--lora {spec}: the scale {scale} is not a finite number")
    return Path(path), value


# Image sides are bounded: FLUX.1 was trained at up to about 2 megapixels, and attention over the (W/16)·(H/16)
# image tokens costs their square: 4096 × 4096 is already 65,536 tokens, hours of compute on one GPU.
MAX_SIDE = 4096
# Steps are bounded too: the official models use 4 (schnell) to 50 (dev), and each step is a full forward of the
# transformer; 10,000 of them is already hours at 1024 × 1024.
MAX_STEPS = 10_000


def check_args(args) -> None:
    """Every value checked before any weights are loaded: a bad one is a ValueError naming the flag."""
    numbers = [
        ("--num-images", args.num_images, lambda v: v >= 1, "an integer ≥ 1"),
        ("--steps", args.steps, lambda v: v >= 1, "an integer ≥ 1 (leave it out for the model's own number)"),
        ("--steps", args.steps, lambda v: v <= MAX_STEPS, (f"at most {MAX_STEPS:,} (the official models use 4 to "
                                                          "50; each step is a full forward of the transformer)")),
        ("--seed", args.seed, lambda v: 0 <= v < 2**63, "an integer ≥ 0"),
        ("--max-length", args.max_length, lambda v: 1 <= v <= 512, "an integer from 1 to 512 (the prompt's tokens)"),
        ("--guidance", args.guidance, lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0"),
        ("--true-cfg", args.true_cfg, lambda v: math.isfinite(v) and v >= 1, "a finite number ≥ 1 (1 is off)"),
        *((f"--{side}", getattr(args, side), lambda v: 16 <= v <= MAX_SIDE, f"16 to {MAX_SIDE} pixels (FLUX.1 was "
           f"trained up to about 2 megapixels; attention over the (W/16)·(H/16) image tokens costs their square)")
          for side in ("width", "height")),
    ]  # fmt: skip
    for flag, value, valid, expected in numbers:
        if value is not None and not valid(value):
            raise ValueError(f"{flag} {value}: expected {expected}")
    if args.device == "auto":  # train.py's word for the default
        args.device = None
    if args.device is not None and (problem := device_problem(args.device)):
        raise ValueError(f"--device {args.device}: {problem}")
    from minflux.pipeline_flux2 import check_lora

    for spec in args.lora:  # each header read now, not after the model has loaded
        path = lora_and_scale(spec)[0]
        if not path.exists():
            raise ValueError(f"--lora {spec}: no such file {path}")
        try:
            check_lora(path, args.repo, args.flux)  # the other generation's refused
        except WeightsError as e:
            raise ValueError(f"--lora {spec}: {str(e).removeprefix(f'{path}: ')}") from None
    for flag, paths in (
        ("--image", args.image or []),
        ("--mask", [args.mask]),
        ("--visible", args.visible or []),
        ("--semantic-map", args.semantic_map or []),
    ):
        for path in (p for p in paths if p is not None):
            if not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
            try:
                read_image(path)  # decoded now, not after the model has loaded
            except DataError as e:
                raise ValueError(f"{flag} {e}") from None
    if args.output is not None and (args.repo or args.flux or args.visible):
        raise ValueError(
            f"--output {args.output}: names the held-out grid only (sample.py --run RUN); images made "
            "with official weights or --visible are written to --output-dir"
        )
    if args.output is not None and args.output_dir is not None:
        raise ValueError(
            f"--output {args.output} and --output-dir {args.output_dir}: both say where the held-out "
            "grid goes; give one"
        )


def check_writable(folder: Path, flag: str) -> None:
    """`folder` is, or can be made, a folder that takes new files: found out before the work, not after it, and
    nothing is made (a bad run writes nothing)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: a file is in the way; expected a folder")
    existing = folder.absolute()
    while not existing.exists():  # the folder is made when the images are written: its first existing parent
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):  # unnamed, gone when closed
            pass
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None


def next_index(folder: Path) -> int:
    taken = [int(m[1]) for p in folder.glob("img_*.png") if (m := re.fullmatch(r"img_(\d+)\.png", p.name))]
    return max(taken, default=-1) + 1


def write_images(images, folder: Path) -> list[Path]:
    """Each image as img_NNNN.png after the highest index already there, written atomically. Each name is taken
    exclusively (a file there is never replaced), so two processes writing to one folder never pick the same one."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, index = [], next_index(folder)
    for im in images:
        while True:
            try:
                paths.append(save_image(im, folder / f"img_{index:04d}.png", exclusive=True))
                break
            except FileExistsError:  # another process took it since next_index looked
                index += 1
        index += 1
    return paths


def maybe_trace(on: bool):
    """--trace: the shape of every stage of what runs inside, printed when it ends (minflux/study/trace.py)."""
    from minflux.study.trace import shape_trace

    return shape_trace() if on else contextlib.nullcontext()


def print_params(args, parts: dict) -> None:
    if args.params:
        from minflux.study.params import parameter_table

        print(parameter_table(parts))


def print_bf16_note(pipe) -> None:
    from minflux.attention import cpu_bf16_note

    if note := cpu_bf16_note(pipe.device, pipe.dtype):
        print(note)


def maybe_compile(args, pipe) -> None:
    if args.compile:
        from minflux.model import compile_blocks

        compile_blocks(pipe.model, frozen=pipe.device.type == "cpu")  # weights fixed from here: frozen on the CPU


def print_timings(timings: dict[str, float]) -> None:
    print("time per stage: " + " | ".join(f"{k} {v:.2f} s" for k, v in timings.items()))


def official(args) -> int:
    """Text-to-image, Fill or Kontext with official weights (or any FLUX in their layouts)."""
    from minflux.pipeline import FluxPipeline, random_seed
    from minflux.pipeline_flux2 import Flux2Pipeline, is_flux2

    if args.prompt is None:
        raise ValueError("--prompt is needed with official weights (or --from an earlier image)")
    flux2 = is_flux2(args.repo, args.flux)
    if not flux2 and len(args.image or []) > 1:
        raise ValueError(f"--image given {len(args.image)} times: FLUX.1 takes one (several references: FLUX.2)")
    output_dir = args.output_dir or Path("outputs")
    check_writable(output_dir, "--output-dir")
    device = torch.device(args.device) if args.device else None
    start = time.perf_counter()
    where = dict(repo=args.repo, flux=args.flux, ae=args.ae, variant=args.variant, device=device)
    where |= dict(dtype=DTYPES.get(args.dtype), offload=args.offload)
    if flux2:
        pipe = Flux2Pipeline.from_files(**where, text_encoder=args.text_encoder, max_length=args.max_length or 512)
    else:
        pipe = FluxPipeline.from_files(**where, clip=args.clip, t5=args.t5, max_length=args.max_length)
    print_bf16_note(pipe)
    for spec in args.lora:
        path, scale = lora_and_scale(spec)
        layers = pipe.load_lora(path, scale)
        print(f"LoRA {path} (scale {scale:g}): {len(layers)} layers")
    maybe_compile(args, pipe)
    load_seconds = time.perf_counter() - start
    d = pipe.defaults
    steps = args.steps or d.num_steps
    guidance = args.guidance if args.guidance is not None else d.guidance
    print(
        f"{pipe.model.variant or 'custom'} ({pipe.task}) on {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}"
        f"{', offloading' if args.offload else ''}: {steps} steps, guidance "
        f"{guidance if pipe.model.params.guidance_embed else 'none (no guidance embedding)'}"
    )
    encoders = {"text encoder": pipe.text_encoder.model} if flux2 else {"clip": pipe.clip.model, "t5": pipe.t5.model}
    print_params(args, {"transformer": pipe.model, "ae": pipe.ae, **encoders})
    seed, num_images = random_seed() if args.seed is None else args.seed, args.num_images or 1
    print(f"seed {seed}" + (" (drawn at random; --seed to choose)" if args.seed is None else ""))
    progress = Progress(steps * num_images, label="denoise ")
    with maybe_trace(args.trace):
        images = pipe(
            args.prompt,
            width=args.width,
            height=args.height,
            num_steps=steps,
            guidance=args.guidance,
            seed=seed,
            num_images=num_images,
            negative_prompt=args.negative_prompt,
            true_cfg_scale=args.true_cfg if flux2 else args.true_cfg or 1.0,  # FLUX.2: None is the variant's
            image=args.image if flux2 or not args.image else args.image[0],
            mask=args.mask,
            callback=lambda step, total: progress.update(step),
        )
    for note in pipe.notes:
        print(f"note: {note}")
    paths = write_images(images, output_dir)
    print_timings({"load": load_seconds, **pipe.timings})
    for path in paths:
        print(path)
    return 0


def vis2ir(args, run: Path) -> int:
    """The run's vis2ir model on the given visible images and semantic maps."""
    from minflux.pipeline import Vis2IRPipeline, random_seed

    if not args.semantic_map or len(args.semantic_map) != len(args.visible):
        raise ValueError(f"--visible names {len(args.visible)} image(s): give --semantic-map with one map for each")
    output_dir = args.output_dir or Path("outputs")
    check_writable(output_dir, "--output-dir")
    if args.num_images is not None:
        raise ValueError("--num-images does not apply with --visible: one image is made for each visible image")
    seed = random_seed() if args.seed is None else args.seed
    print(f"seed {seed}" + (" (drawn at random; --seed to choose)" if args.seed is None else ""))
    device = torch.device(args.device) if args.device else None
    pipe = Vis2IRPipeline.from_run(run, device=device, dtype=DTYPES.get(args.dtype))
    print_bf16_note(pipe)
    maybe_compile(args, pipe)
    print_params(args, {**dict(pipe.model.named_children()), **frozen_parts(pipe.ae, pipe.clip, pipe.t5)})
    with maybe_trace(args.trace):
        images = pipe(
            args.visible,
            args.semantic_map,
            prompt=args.prompt or "",
            num_steps=args.steps,
            guidance=args.guidance,
            seed=seed,
        )
    paths = write_images(images, output_dir)
    print_timings(pipe.timings)
    for path in paths:
        print(path)
    return 0


def held_out(args, run: Path) -> int:
    """The embedded default: generated infrared for held-out scenes of the run's data, with the PSNR."""
    from minflux.pipeline import Vis2IRPipeline
    from minflux.tasks.data import captions, triptychs
    from minflux.tasks.scenes import split_triptych
    from minflux.tasks.vis2ir import datasets

    seed = args.seed or 0
    if args.output is not None:  # the file asked for, replaced if there
        output = args.output
        if output.is_dir():
            raise ValueError(f"--output {output}: a folder is in the way; expected a PNG file name")
        check_writable(output.parent, "--output")
    else:  # sample-SEED.png in the run folder or --output-dir, under a new name when taken (save_new)
        output = (args.output_dir or run) / f"sample-{seed}.png"
        check_writable(output.parent, "--output-dir" if args.output_dir else "--run")
    start = time.perf_counter()
    device = torch.device(args.device) if args.device else None
    pipe = Vis2IRPipeline.from_run(run, device=device, dtype=DTYPES.get(args.dtype))
    print_bf16_note(pipe)
    maybe_compile(args, pipe)
    cfg = pipe.config
    num = args.num_images or 8
    _, held = datasets(cfg, heldout=num)
    held = torch.utils.data.Subset(held, range(min(num, len(held))))
    scenes = triptychs(held)  # [N, 3, 64, 192]
    steps = args.steps or cfg.sample_steps
    print_params(args, {**dict(pipe.model.named_children()), **frozen_parts(pipe.ae, pipe.clip, pipe.t5)})
    with maybe_trace(args.trace):
        generated = pipe.infrared(scenes, captions(held), steps, seed=seed).float().cpu()  # [N, 3, 64, 64]
    visible, truth, semantic = split_triptych(scenes)
    mse = ((generated.clamp(-1, 1) - truth) / 2).pow(2).mean().item()
    psnr = 10 * math.log10(1 / mse)
    rows = [[visible[i], semantic[i], generated[i], truth[i]] for i in range(len(held))]
    settings = {"run": str(run), "seed": seed, "steps": steps, "semantic": cfg.semantic, "psnr": f"{psnr:.2f}"}
    grid = image_grid(rows, captions=["visible", "semantic", "generated", "ground truth"])
    output = save_png(grid, output, text=settings) if args.output else save_new(grid, output, settings)
    print(
        f"{len(held)} held-out scenes, {steps} Euler steps, {time.perf_counter() - start:.1f} s: "
        f"mse {mse:.5f}, psnr {psnr:.2f} dB"
    )
    print(json.dumps(settings))
    print(output)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.settings_from is not None:
            apply_settings(args)
        check_args(args)
        if args.repo or args.flux:
            return official(args)
        run = args.run or latest_run(args.runs)
        if run is None:
            print(
                f"sample.py: no finished run under {args.runs}/; train one first with:  python train.py",
                file=sys.stderr,
            )
            return 2
        return vis2ir(args, run) if args.visible else held_out(args, run)
    except (WeightsError, DataError, ValueError, FileNotFoundError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that filled up while writing, say: the image files are whole or absent
        print(f"sample.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
