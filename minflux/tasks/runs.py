"""The run: its typed config (flags, TOML, the run folder's config.toml, all one dataclass; the generic
flag and TOML code is flags.py).

    TrainConfig               every setting of `python train.py`; its fields are the flags one to one
                              (`batch_size` is `--batch-size`) and the keys of a TOML file given with --config
    parse_train_args          the command line → a TrainConfig, checked (flags win over a TOML file; --resume
                              starts from the run's own config.toml)
    read_run                  a run folder → Run: its TrainConfig, read here alone, and the paths of its weights

How the run folder is made, replaced and resumed is folders.py; the processes and the progress line progress.py.
"""

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from minflux.files.load import WeightPaths, find_weights
from minflux.tasks.parallel import DEVICE, device_problem
from minflux.tasks.flags import field_type, add_config_flags, config_from_args, dashed, read_toml
from minflux.files.weights import read_shapes
from minflux.flux2 import Flux2Params
from minflux.presets import configs
from minflux.semantic import SEMANTIC_MODES
from minflux.tasks.t2i_flux2 import flux2_config

# --- the config ---------------------------------------------------------------------------------------------

# The defaults, in one table. TrainConfig's own are those of `python train.py`: the embedded vis2ir default, a
# small FLUX trained whole from scratch, at a higher learning rate than a LoRA takes (held-out PSNR of the default
# run: lr 1e-3 23.2 dB, 2e-3 23.6, 3e-3 23.7, 5e-3 23.7), for 1200 steps (with the shipped VAE: 1000 steps 24.4 dB,
# 1300 24.9; 1200 keeps the run within 10 minutes on a 2-core AVX2 CPU; study/BENCH.md). Each row changes some of
# them for another kind of run (the rows that apply, in order); given flags and TOML keys win over all of them.
CASES = {
    # a LoRA (or --finetune) of vis2ir on given weights: the settings the injection ablations were run with
    "vis2ir on given weights": {"lr": 1e-3, "steps": 1300},
    # the embedded Kontext default: the vis2ir scenes, a small Kontext-architecture (64-channel) transformer
    "kontext from scratch": {"preset": "flux-small-kontext", "semantic": "none", "lr": 1e-3, "steps": 1300},
    # the embedded FLUX.2 default (--preset flux2-small): the scenes as edits with two references, visible and map;
    # Qwen3's chat template takes 14 of the 40 text tokens, the longest caption 20
    "FLUX.2 from scratch": {"semantic": "reference", "t5_max_length": 40, "lr": 1e-3, "steps": 1300},
    # a LoRA on a 12 B transformer: the settings of common FLUX LoRA recipes (kohya's sd-scripts, ai-toolkit);
    # T5's length follows the variant as the official pipelines (dev 512, schnell 256), read from the weights
    "t2i or kontext on given weights": {"lr": 1e-4, "batch_size": 4, "steps": 1000, "lr_warmup_steps": 10,
                                        "checkpoint_every": 250, "sample_steps": 20, "gradient_checkpointing": True},
    # every weight moves: at a LoRA's lr/10
    "--full-finetune": {"lr": 1e-5},
}  # fmt: skip


def cases(cfg) -> list[str]:
    """The rows of CASES that apply to a run (TrainConfig's own defaults apply to every run)."""
    weights = bool(cfg.repo or cfg.flux or cfg.finetune)
    rows = {
        "vis2ir": "vis2ir on given weights" if weights else None,
        "kontext": "t2i or kontext on given weights" if weights else "kontext from scratch",
        "t2i": "t2i or kontext on given weights",
    }
    flux2 = "FLUX.2 from scratch" if not weights and is_flux2_preset(cfg.preset) else None
    return [r for r in (rows.get(cfg.task), flux2, "--full-finetune" if cfg.full_finetune else None) if r]


def is_flux2_preset(name: str) -> bool:
    """A FLUX.2 preset (flux2-small, ...): the architecture of a run trained from scratch."""
    return name in configs and isinstance(configs[name].params, Flux2Params)


LORA_FORMATS = ("kohya", "diffusers", "bfl", "minflux")


@dataclass
class TrainConfig:
    # what to learn
    semantic: str = "zeroconv"
    adapter_layers: int = 1
    adapter_heads: int = 8
    adapter_width: int = 64
    adapter_every: int = 1
    adapter_scale_init: float = 0.0
    semantic_layout: str = "panel"
    data: str | None = None
    on_error: str = "skip"
    panel_size: int = 64
    train_samples: int = 2000
    heldout_samples: int = 32
    # which task: vis2ir (the fields above), t2i or kontext (the fields below; data and on_error serve all)
    task: str = "vis2ir"
    resolution: int = 512
    buckets: bool = False
    default_caption: str | None = None
    caption_dropout: float = 0.0
    control: str | None = None
    control_size: str = "target"
    # weights: none given = the embedded default, a small preset trained from scratch
    preset: str = "flux-small-fill"
    repo: str | None = None
    flux: str | None = None
    ae: str | None = None
    clip: str | None = None
    t5: str | None = None
    text_encoder: str | None = None
    allow_distilled: bool = False
    sample_flux: str | None = None
    finetune: str | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: str | None = None
    lora_format: str = "kohya"
    full_finetune: bool = False
    # optimisation
    steps: int = 1200
    batch_size: int = 16
    lr: float = 3e-3
    adapter_lr: float | None = None
    lr_warmup_steps: int = 50
    adapter_warmup_steps: int = 0
    t_sampling: str = "logit_normal"
    target_only: bool = False
    max_grad_norm: float = 1.0
    guidance: float = 1.0
    t5_max_length: int = 24
    vae_steps: int = 4800
    seed: int = 0
    # evaluation and output
    sample_steps: int = 16
    sample_every: int = 0
    output_dir: str = "runs"
    name: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 500
    stop_at: int | None = None
    resume: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    parallel: str = "ddp"
    cpu_offload: bool = False
    # for study: what runs, shape by shape
    trace: bool = False
    params: bool = False

    HELP = {
        "task": "vis2ir (Fill + semantic map, on triptychs), t2i (a LoRA on FLUX.1 dev/schnell or FLUX.2 klein "
        "Base/dev from images with .txt captions) or kontext (a LoRA on Kontext from edit pairs; without weights, "
        "the embedded default with the visible panel as a Kontext reference). Each kind of run has its own "
        "defaults, shown with each flag",
        "semantic": f"how the semantic map is injected: {', '.join(SEMANTIC_MODES)}",
        "adapter_layers": "SemanticCrossAttention layers (xattn, xattn_rope); layers per adapter (adapters)",
        "adapter_heads": "heads of each SemanticCrossAttention (xattn, xattn_rope, blocks) or adapter layer",
        "adapter_width": "adapters: the adapters' width (the image tokens are projected down to it and back)",
        "adapter_every": "adapters: an adapter after every this-many-th block (1: after each block)",
        "adapter_scale_init": "the injection's residual scales/gates at initialisation (0: the identity at the start)",
        "semantic_layout": "the semantic tokens: 'panel' (the map alone, 1024 tokens at a 512-px panel, at the target "
        "half's positions) or 'diptych' (the map beside itself, 2048 tokens, one per x_t token: the vis2ir design's "
        "layout)",
        "data": "vis2ir: a folder of triptychs, or of visible/ infrared/ semantic/ folders (none = generated "
        "scenes); t2i: a folder of images, each with a same-named .txt caption; kontext: the edited targets, each "
        "with a .txt instruction, and control/ with the images they are made from, of the same names",
        "on_error": "an unusable data file: 'skip' (and count) or 'stop'",
        "panel_size": "panel side in pixels (a multiple of 16)",
        "train_samples": "generated training scenes",
        "heldout_samples": "held-out scenes (generated), or held-out files (taken from the folder's end)",
        "resolution": "t2i: image side in pixels (a multiple of 16); images are scaled and centre-cropped to it",
        "buckets": "t2i: aspect-ratio buckets of about resolution² pixels instead of square crops",
        "default_caption": "t2i: the caption of an image without a .txt file (default: such an image is an error)",
        "caption_dropout": "t2i: probability of training a step's image with the empty caption",
        "control": "kontext: the folder of control images (default: DATA/control), one per target, same file name; "
        "more references in CONTROL2, CONTROL3, ... (control2/ ...) beside it",
        "control_size": "kontext: 'target' (resized to its target's size) or 'own' (its own aspect, ~resolution²)",
        "preset": "the architecture trained from scratch when no weights are given",
        "repo": "an official repo folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizers; FLUX.2: "
        "transformer/, vae/, text_encoder/, tokenizer/)",
        "flux": "transformer weights (file or folder): FLUX.1-Fill for vis2ir, dev or schnell for t2i, Kontext for "
        "kontext",
        "ae": "autoencoder weights",
        "clip": "CLIP-L text encoder (folder or file)",
        "t5": "T5-XXL text encoder (folder or file)",
        "text_encoder": "FLUX.2: the Qwen3 (klein) or Mistral (dev) text encoder folder (default: the repo's)",
        "allow_distilled": "FLUX.2: train on the distilled klein (4 steps) anyway; its LoRAs degrade (grey images), "
        "train on klein Base",
        "sample_flux": "FLUX.2: the transformer (or repo) that draws the samples with the trained LoRA copied in, at "
        "its own steps: the distilled klein (FLUX.2-klein-4B: 4 steps, no CFG) previews a LoRA trained on Base",
        "finetune": "a finished run folder: fine-tune its model with LoRA",
        "lora_rank": "LoRA rank (LoRA is used with given weights or --finetune)",
        "lora_alpha": "LoRA alpha (default: the rank)",
        "lora_targets": "comma-separated LoRA target groups or module patterns (default: lora.py's)",
        "lora_format": "lora.safetensors layout: kohya (sd-scripts' names; ComfyUI, diffusers and minflux read it), "
        "diffusers (PEFT names, for diffusers and PEFT), bfl (official names; ComfyUI, FLUX.2's diffusers) or minflux",
        "full_finetune": "train every weight of the given transformer instead of a LoRA (fp32 master weights; needs "
        "sharding: see --parallel)",
        "steps": "optimisation steps",
        "batch_size": "global batch size (split across processes under torchrun)",
        "lr": "peak learning rate (linear warm-up, then cosine decay to lr/10)",
        "adapter_lr": "learning rate of the semantic adapter (default: lr)",
        "lr_warmup_steps": "linear learning-rate warm-up steps",
        "adapter_warmup_steps": "the staged plan's first stage: only the semantic adapter trains for this many steps",
        "t_sampling": "training time distribution: logit_normal or uniform (shifted by image size)",
        "target_only": "count the loss on the target half of the diptych only",
        "max_grad_norm": "gradient clipping: the gradient's norm is scaled down to at most this",
        "guidance": "guidance value fed in training to guidance-distilled models (dev, official Fill)",
        "t5_max_length": "T5 tokens per prompt (512 for the official dev models, 256 for schnell; FLUX.2: the text "
        "encoder's, 512)",
        "vae_steps": "training steps of the embedded default's VAE: the default's VAE ships with minflux, another "
        "number trains one (cached)",
        "seed": "seed of everything random",
        "sample_steps": "Euler steps of the held-out evaluation (t2i: of samples.png; 0 writes none)",
        "sample_every": "write samples/step-N.png every this many steps (0: only samples.png at the end)",
        "output_dir": "folder holding the run folders (also --out)",
        "name": "run folder name (default: vis2ir-<semantic>, or TASK-<data folder name>); a name already taken gets "
        "a numbered suffix (-2, -3, ...), so no run is ever written over",
        "overwrite": "replace the run folder of that name instead: only one train.py made, and only once the new run "
        "is set up",
        "checkpoint_every": "steps between checkpoints (also written at the end and on Ctrl-C / SIGTERM)",
        "stop_at": "stop after this step with a checkpoint (for jobs with a time limit; continue with --resume)",
        "resume": "a run folder to continue from its last checkpoint (its model and data stay as they were; a "
        "finished run is left as it is unless --steps asks for more)",
        "device": "auto, cpu or cuda",
        "dtype": "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16",
        "gradient_checkpointing": "recompute block activations in backward to save memory",
        "compile": "torch.compile each transformer block (model.compile_blocks): the first steps compile, the others "
        "run faster; pays on long runs, not on the embedded default's (minflux/study/BENCH.md)",
        "parallel": "with torchrun: ddp (a whole model per process) or fsdp (FSDP2: weights, gradients and optimizer "
        "state split over the processes)",
        "cpu_offload": "fsdp: keep the shards in host memory between uses (for small GPUs; slower)",
        "trace": "print the tensor shapes of every stage of the data encoding and of the first step",
        "params": "print the parameter table of every component, trainable and frozen",
    }
    CASES = CASES  # the defaults of other kinds of run, shown in --help beside TrainConfig's
    ALIASES = {"output_dir": ["--out"]}  # other spellings of a flag; BFL's underscores (--output_dir) come free
    RENAMED = {"out": "output_dir"}  # keys of older config.toml files

    @staticmethod
    def expected(name: str, value) -> str | None:  # read_toml's check of each key
        return check_value(name, value)


# --- the accepted values, checked wherever a config is read: flags, a TOML file, a run's config.toml ----------

SMALL_PRESETS = ("flux-small-fill", "flux-small-kontext", "flux2-small")  # from scratch: vis2ir (Fill), kontext
FLUX2_SEMANTIC = ("reference", "none")  # FLUX.2 from scratch: the map as a second reference, or no map
INFINITE_OK = ("max_grad_norm",)
TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _at_least(low: int):
    return f"an integer ≥ {low}", lambda v: v >= low


def _one_of(*values):
    return "one of " + ", ".join(values), lambda v: v in values


ACCEPTED = {  # field: (the accepted values in words, the check after the type's); the others: any value of the type
    "semantic": _one_of(*SEMANTIC_MODES),
    "adapter_layers": _at_least(1),
    "adapter_heads": _at_least(1),
    "adapter_width": _at_least(4),
    "adapter_every": _at_least(1),
    "semantic_layout": _one_of("panel", "diptych"),
    "on_error": _one_of("skip", "stop"),
    "panel_size": (
        "a multiple of 16 from 16 to 1024 (the diptych is 1024 × 2048 pixels then: 2 megapixels, the most "
        "FLUX.1 was trained at)",
        lambda v: 16 <= v <= 1024 and v % 16 == 0,
    ),
    "train_samples": _at_least(1),
    "heldout_samples": _at_least(1),
    "task": _one_of("vis2ir", "t2i", "kontext"),
    "control_size": _one_of("target", "own"),
    "sample_every": _at_least(0),
    "resolution": (
        "a multiple of 16 from 16 to 4096 (VAE ×8, then 2×2 packing; FLUX.1 was trained up to about 2 megapixels)",
        lambda v: 16 <= v <= 4096 and v % 16 == 0,
    ),
    "caption_dropout": ("a probability in [0, 1)", lambda v: 0 <= v < 1),
    "preset": ("a small preset (" + ", ".join(SMALL_PRESETS) + ")", lambda v: v in SMALL_PRESETS),
    "lora_rank": _at_least(1),
    "lora_alpha": ("a finite number > 0", lambda v: v > 0),
    "lora_format": _one_of(*LORA_FORMATS),
    "steps": _at_least(1),
    "batch_size": _at_least(1),
    "lr": ("a finite number > 0", lambda v: v > 0),
    "adapter_lr": ("a finite number > 0", lambda v: v > 0),
    "lr_warmup_steps": _at_least(0),
    "adapter_warmup_steps": _at_least(0),
    "t_sampling": _one_of("logit_normal", "uniform"),
    "max_grad_norm": ("a number > 0 (inf: no clipping)", lambda v: v > 0),
    "guidance": ("a finite number ≥ 0", lambda v: v >= 0),
    "t5_max_length": (
        "an integer from 1 to 512 (T5 tokens; the official models take at most 512)",
        lambda v: 1 <= v <= 512,
    ),
    "vae_steps": _at_least(1),
    "seed": ("an integer from 0 to 2^63 - 1", lambda v: 0 <= v < 2**63),
    "sample_steps": (
        "an integer from 0 to 10000 (each step is a forward of the transformer; FLUX.1 samples in 4 to 50)",
        lambda v: 0 <= v <= 10_000,
    ),
    "output_dir": ("a folder", lambda v: v != ""),
    "name": (
        "a folder name (no / and not . or ..; the parent folder is --out)",
        lambda v: v not in ("", ".", "..") and "/" not in v and os.sep not in v,
    ),
    "checkpoint_every": _at_least(1),
    "stop_at": _at_least(1),
    "device": ("auto, cpu, cuda, cuda:N or mps", lambda v: DEVICE.fullmatch(v) is not None),
    "dtype": _one_of("auto", "fp32", "bf16", "fp16"),
    "parallel": _one_of("ddp", "fsdp"),
}


def check_value(name: str, value) -> str | None:
    """What TrainConfig's field `name` accepts, in words, if `value` is not among it; else None."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = field_type(f)
    words, valid = ACCEPTED.get(name, (TYPE_WORDS[kind], lambda v: True))
    if value is None:
        return None if f.default is None else words
    if kind is float:  # finite, unless the field says otherwise (max_grad_norm = inf)
        typed = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        typed = typed and (math.isfinite(value) or name in INFINITE_OK)
    else:
        typed = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    return None if typed and valid(value) else words


# --- the command line, checked --------------------------------------------------------------------------------


def parse_train_args(argv, description: str = "", tasks=("vis2ir", "t2i")) -> TrainConfig:
    """train.py's command line → its TrainConfig: defaults, then the TOML file, then the flags given (with --resume:
    the run's config.toml, then the flags given). Bad values stop here, with exit code 2 and the flag named."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, TrainConfig)
    args = parser.parse_args(dashed(parser, sys.argv[1:] if argv is None else argv))
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    for name in sorted(given, key=[f.name for f in dataclasses.fields(TrainConfig)].index):
        expected = check_value(name, getattr(args, name))
        if expected:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected {expected}")
    try:  # a TOML file or the resumed run's config.toml: checked as it is read (read_toml)
        toml = read_toml(args.config, TrainConfig) if args.config else {}
        resume = args.resume or toml.get("resume")
        if resume:  # the run's own config, then whatever the TOML file and this command line change
            changes = {**toml, **{k: getattr(args, k) for k in given}, "resume": resume}
            run = read_run(resume).config
            for key, value in changes.items():
                if key in FIXED_ON_RESUME and not same_value(key, value, getattr(run, key)):
                    flag = f"--{key.replace('_', '-')} {value}" if key in given else f"{args.config}: {key} = {value!r}"
                    parser.error(
                        f"{flag}: {resume} was trained with {key} = {getattr(run, key)!r}, and a resumed run "
                        "keeps its model and data. Start a new run with it instead (--config "
                        f"{Path(resume) / 'config.toml'} --{key.replace('_', '-')} {value}), or fine-tune "
                        f"the finished run (--finetune {resume})"
                    )
            cfg = replace(run, **{"stop_at": None, **changes})
        else:
            cfg = config_from_args(TrainConfig, args)
            given |= set(toml)
            if is_flux2_preset(cfg.preset) and "task" not in given:  # FLUX.2 from scratch: the scenes as edits
                cfg = replace(cfg, task="kontext")
            for row in cases(cfg):  # this kind of run's defaults, where nothing was given
                cfg = replace(cfg, **{k: v for k, v in CASES[row].items() if k not in given})
    except ValueError as e:
        parser.error(str(e))
    if cfg.task not in tasks:
        parser.error(f"--task {cfg.task}: expected one of {', '.join(tasks)}")
    if problem := missing_path(cfg):
        parser.error(problem)
    if problem := device_problem(cfg.device):
        parser.error(f"--device {cfg.device}: {problem}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, known before the process group starts
    if cfg.batch_size % processes:
        parser.error(
            f"--batch-size {cfg.batch_size} is the global batch: it must split evenly over the {processes} "
            f"processes (a multiple of {processes}, e.g. {cfg.batch_size // processes * processes or processes})"
        )
    if cfg.task == "vis2ir" and cfg.sample_steps < 1:
        parser.error(f"--sample-steps {cfg.sample_steps}: the held-out evaluation of vis2ir needs at least 1 step")
    channels = (
        64 if cfg.task == "kontext" else 384
    )  # Kontext's reference is in the sequence, Fill's image on the channels
    lora_on_weights = cfg.task in ("t2i", "kontext") and bool(cfg.repo or cfg.flux)  # no preset, no semantic map
    if is_flux2_preset(cfg.preset) and not lora_on_weights:
        if cfg.task != "kontext" or cfg.semantic not in FLUX2_SEMANTIC:
            flag = f"--task {cfg.task}" if cfg.task != "kontext" else f"--semantic {cfg.semantic}"
            parser.error(
                f"{flag}: --preset {cfg.preset} trains the scenes as multi-reference edits (--task kontext), the "
                f"map as a second reference or not at all (--semantic {' or '.join(FLUX2_SEMANTIC)})"
            )
    elif not lora_on_weights and configs[cfg.preset].params.in_channels != channels:
        fits = [n for n, s in configs.items() if s.params.in_channels == channels and n.startswith("flux-small")]
        parser.error(
            f"--preset {cfg.preset}: expected a {'Kontext' if channels == 64 else 'Fill'} preset ({', '.join(fits)})"
        )
    if (
        (cfg.semantic == "reference") != (cfg.task == "kontext")
        and cfg.semantic in ("reference", "zeroconv")
        and not lora_on_weights
    ):
        parser.error(f"--semantic {cfg.semantic}: 'reference' is for --task kontext, 'zeroconv' for vis2ir (Fill)")
    if cfg.task == "t2i" and not cfg.data:
        parser.error("--task t2i needs --data FOLDER: images, each with a same-named .txt caption")
    try:  # FLUX.2 weights: their paths, checked from the headers (t2i_flux2.py); None for FLUX.1's
        flux2 = flux2_config(cfg, given, bool(args.resume))
    except ValueError as e:
        parser.error(str(e))
    if flux2:
        cfg = flux2
    elif cfg.repo or cfg.finetune:  # a folder names the parts not given one by one
        paths = find_weights(cfg.repo or cfg.finetune, cfg.flux, cfg.ae, cfg.clip, cfg.t5)
        cfg = replace(cfg, **{k: str(v) if v is not None else None for k, v in dataclasses.asdict(paths).items()})
    if cfg.full_finetune and not cfg.flux:
        parser.error(
            "--full-finetune trains every weight of given weights (--repo, --flux or --finetune); the "
            "embedded default trains every weight already"
        )
    if cfg.cpu_offload and cfg.parallel != "fsdp":
        parser.error("--cpu-offload offloads FSDP's shards: use it with --parallel fsdp")
    if cfg.compile and cfg.parallel == "fsdp":
        parser.error(
            "--compile is not supported with --parallel fsdp yet (the blocks are sharded after they are "
            "built): use one of the two"
        )
    if cfg.semantic_layout == "diptych" and cfg.task != "vis2ir":
        parser.error(
            "--semantic-layout diptych: the semantic map beside itself aligns with vis2ir's Fill diptych; "
            f"--task {cfg.task} generates the infrared panel alone"
        )
    hidden = 3072 if cfg.flux else configs[cfg.preset].params.hidden_size  # FLUX.1's width, or the small preset's
    width = {"xattn": 64, "xattn_rope": 64, "blocks": hidden, "adapters": cfg.adapter_width}.get(cfg.semantic)
    if width and (width % cfg.adapter_heads or width // cfg.adapter_heads % 4):
        parser.error(
            f"--adapter-heads {cfg.adapter_heads}: --semantic {cfg.semantic} attends at width {width}, which "
            "must split into heads of a multiple of 4 channels (RoPE turns channel pairs on two axes)"
        )
    if cfg.task == "kontext" and bool(cfg.data) != bool(cfg.flux):
        parser.error(
            "--task kontext trains on edit pairs (--data FOLDER: targets with .txt instructions, and "
            "control/) with official weights (--repo FLUX.1-Kontext-dev, or --flux, --ae, --clip, --t5); "
            "with neither, the embedded default on generated scenes"
        )
    if cfg.task == "t2i" and not cfg.flux:
        parser.error(
            "--task t2i trains a LoRA on official weights: pass --repo FLUX.1-dev (or FLUX.1-schnell, "
            "FLUX.2-klein-base-4B, FLUX.2-dev), or --flux, --ae, --clip and --t5 (FLUX.2: --flux, --ae, --text-encoder)"
        )
    if cfg.task in ("t2i", "kontext") and cfg.flux and "t5_max_length" not in given and not args.resume and not flux2:
        cfg = replace(cfg, t5_max_length=512 if has_guidance_embedding(cfg.flux) else 256)  # dev 512, schnell 256
    return cfg


# What a resumed run cannot change: its model's shape and its data (the checkpoint holds the rest of the state).
FIXED_ON_RESUME = (
    "task", "semantic", "adapter_layers", "adapter_heads", "adapter_width", "adapter_every", "adapter_scale_init",
    "semantic_layout", "data", "panel_size", "train_samples", "heldout_samples", "resolution", "buckets", "control",
    "control_size", "preset", "repo", "flux", "ae", "clip", "t5", "text_encoder", "finetune", "lora_rank",
    "lora_alpha", "lora_targets", "full_finetune", "t5_max_length", "vae_steps", "seed", "parallel",
)  # fmt: skip
PATH_FIELDS = ("data", "control", "repo", "flux", "ae", "clip", "t5", "text_encoder", "finetune", "resume")


def same_value(key: str, a, b) -> bool:
    """Two values of one field, paths compared as the files they name."""
    if key in PATH_FIELDS and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def missing_path(cfg: TrainConfig) -> str | None:
    """The first given path that names nothing (or a --finetune folder that is not a run), in words; else None."""
    for key in PATH_FIELDS:
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            return f"--{key.replace('_', '-')} {value}: no such file or folder"
    if cfg.finetune and not (Path(cfg.finetune) / "transformer.safetensors").is_file():
        return (
            f"--finetune {cfg.finetune}: expected a finished run folder of train.py's embedded default (its "
            "transformer.safetensors); it holds none"
        )
    return None


def has_guidance_embedding(flux_path) -> bool:
    """dev has a guidance embedding, schnell has none: told from the weights' key names, no tensor read."""
    return any("guidance_in." in k or "guidance_embedder." in k for k in read_shapes(flux_path))


# --- the run folder ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run folder of `python train.py`, read: its config, and where the weights it was trained into are."""

    folder: Path
    config: TrainConfig
    weights: WeightPaths  # transformer (the run's own, or the base its config names), ae, clip, t5
    lora: Path | None  # lora.safetensors of a LoRA run
    adapter: Path | None  # adapter.safetensors: the semantic injection of vis2ir


def read_run(folder) -> Run:
    """The run folder's config.toml as a TrainConfig (its defaults are TrainConfig's, the only ones), and its files:
    a from-scratch run holds transformer.safetensors and its small VAE and text encoders; a LoRA run holds
    lora.safetensors and names its base weights in config.toml."""
    from minflux.files.weights import WeightsError

    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        raise WeightsError(f"{folder}: not a train.py run folder (no config.toml)")
    cfg = TrainConfig(**read_toml(folder / "config.toml", TrainConfig))
    own = find_weights(folder)
    weights = find_weights(None, own.flux or cfg.flux, own.ae or cfg.ae, own.clip or cfg.clip, own.t5 or cfg.t5)
    existing = lambda name: folder / name if (folder / name).is_file() else None  # noqa: E731
    return Run(folder, cfg, weights, existing("lora.safetensors"), existing("adapter.safetensors"))
