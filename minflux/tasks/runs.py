"""The run: its typed config (flags, TOML, the run folder's config.toml, all one dataclass), processes, progress.

    TrainConfig               every setting of `python train.py`; its fields are the flags one to one
                              (`batch_size` is `--batch-size`) and the keys of a TOML file given with --config
    parse_train_args          the command line → a TrainConfig, checked (flags win over a TOML file; --resume
                              starts from the run's own config.toml)
    read_run                  a run folder → Run: its TrainConfig, read here alone, and the paths of its weights
    rank, world, log          which process this is under torchrun; print once
    Progress                  one progress line
"""

import argparse
import dataclasses
import math
import os
import sys
import time
import tomllib
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import torch.distributed as dist

from minflux.files.load import WeightPaths, find_weights
from minflux.files.weights import read_shapes
from minflux.presets import configs
from minflux.semantic import SEMANTIC_MODES

# --- processes ----------------------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args):
    """print, on the first process only."""
    if rank() == 0:
        print(*args, flush=True)


# --- progress -----------------------------------------------------------------------------------------------


class Progress:
    """One line, rewritten in place on a terminal: step, rate, ETA, and whatever the caller adds."""

    def __init__(self, total: int, label: str = "", stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stdout
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, step: int, **fields) -> None:
        if rank() != 0:  # under torchrun every process counts the same steps: one line is enough
            return
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"{self.label}{step}/{self.total}", f"{rate:.2f} it/s", f"eta {format_seconds(eta)}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + " " * 4 + ("\n" if step >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def smooth(xs: list[float], k: int = 20) -> list[float]:
    """The running mean over the last k values (for the loss curve)."""
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# --- the config ---------------------------------------------------------------------------------------------

# t2i trains a LoRA on a 12 B transformer: the settings of common FLUX LoRA recipes (kohya's sd-scripts,
# ai-toolkit), where the from-scratch vis2ir defaults would not fit. Given flags and TOML keys win.
T2I_DEFAULTS = {"lr": 1e-4, "batch_size": 4, "steps": 1000, "lr_warmup_steps": 10, "checkpoint_every": 250,
                "sample_steps": 20, "gradient_checkpointing": True}  # fmt: skip
LORA_FORMATS = ("kohya", "diffusers", "minflux")


@dataclass
class TrainConfig:
    # what to learn
    semantic: str = "zeroconv"
    adapter_layers: int = 1
    adapter_heads: int = 8
    data: str | None = None
    on_error: str = "skip"
    panel_size: int = 64
    train_samples: int = 2000
    heldout_samples: int = 32
    # which task: vis2ir (the fields above) or t2i (the fields below; data and on_error serve both)
    task: str = "vis2ir"
    resolution: int = 512
    buckets: bool = False
    default_caption: str | None = None
    caption_dropout: float = 0.0
    # weights: none given = the embedded default, a small preset trained from scratch
    preset: str = "flux-small-fill"
    repo: str | None = None
    flux: str | None = None
    ae: str | None = None
    clip: str | None = None
    t5: str | None = None
    finetune: str | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: str | None = None
    lora_format: str = "kohya"
    # optimisation
    steps: int = 1300
    batch_size: int = 16
    lr: float = 1e-3
    adapter_lr: float | None = None
    lr_warmup_steps: int = 50
    adapter_warmup_steps: int = 0
    t_sampling: str = "logit_normal"
    target_only: bool = False
    max_grad_norm: float = 1.0
    guidance: float = 1.0
    t5_max_length: int = 24
    vae_steps: int = 1000
    seed: int = 0
    # evaluation and output
    sample_steps: int = 16
    output_dir: str = "runs"
    name: str | None = None
    checkpoint_every: int = 500
    stop_at: int | None = None
    resume: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    # for study: what runs, shape by shape
    trace: bool = False
    params: bool = False

    HELP = {
        "task": "vis2ir (Fill + semantic map, on triptychs) or t2i (a LoRA on dev/schnell from images with .txt "
        "captions; its defaults differ: " + ", ".join(f"{k} {v}" for k, v in {**T2I_DEFAULTS, "t5_max_length":
        "512 (dev) / 256 (schnell)"}.items()) + ")",
        "semantic": f"how the semantic map is injected: {', '.join(SEMANTIC_MODES)}",
        "adapter_layers": "SemanticCrossAttention layers",
        "adapter_heads": "heads per SemanticCrossAttention layer",
        "data": "vis2ir: a folder of triptychs, or of visible/ infrared/ semantic/ folders (none = generated "
        "scenes); t2i: a folder of images, each with a same-named .txt caption",
        "on_error": "an unusable data file: 'skip' (and count) or 'stop'",
        "panel_size": "panel side in pixels (a multiple of 16)",
        "train_samples": "generated training scenes",
        "heldout_samples": "held-out scenes (generated), or held-out files (taken from the folder's end)",
        "resolution": "t2i: image side in pixels (a multiple of 16); images are scaled and centre-cropped to it",
        "buckets": "t2i: aspect-ratio buckets of about resolution² pixels instead of square crops",
        "default_caption": "t2i: the caption of an image without a .txt file (default: such an image is an error)",
        "caption_dropout": "t2i: probability of training a step's image with the empty caption",
        "preset": "the architecture trained from scratch when no weights are given",
        "repo": "an official repo folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizers)",
        "flux": "transformer weights (file or folder): FLUX.1-Fill for vis2ir, dev or schnell for t2i",
        "ae": "autoencoder weights",
        "clip": "CLIP-L text encoder (folder or file)",
        "t5": "T5-XXL text encoder (folder or file)",
        "finetune": "a finished run folder: fine-tune its model with LoRA",
        "lora_rank": "LoRA rank (LoRA is used with given weights or --finetune)",
        "lora_alpha": "LoRA alpha (default: the rank)",
        "lora_targets": "comma-separated LoRA target groups or module patterns (default: lora.py's)",
        "lora_format": "lora.safetensors layout: kohya (sd-scripts' names; ComfyUI, diffusers and minflux read it), "
        "diffusers (PEFT names, for diffusers and PEFT) or minflux (official names; keeps a LoRA bias)",
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
        "t5_max_length": "T5 tokens per prompt (512 for the official dev models, 256 for schnell)",
        "vae_steps": "training steps of the embedded default's VAE (cached)",
        "seed": "seed of everything random",
        "sample_steps": "Euler steps of the held-out evaluation (t2i: of samples.png; 0 writes none)",
        "output_dir": "folder holding the run folders (also --out)",
        "name": "run folder name (default: vis2ir-<semantic>, or t2i-<data folder name>)",
        "checkpoint_every": "steps between checkpoints (also written at the end and on Ctrl-C / SIGTERM)",
        "stop_at": "stop after this step with a checkpoint (for jobs with a time limit; continue with --resume)",
        "resume": "a run folder to continue from its last checkpoint",
        "device": "auto, cpu or cuda",
        "dtype": "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16",
        "gradient_checkpointing": "recompute block activations in backward to save memory",
        "trace": "print the tensor shapes of every stage of the data encoding and of the first step",
        "params": "print the parameter table of every component, trainable and frozen",
    }
    ALIASES = {"output_dir": ["--out"]}  # other spellings of a flag; BFL's underscores (--output_dir) come free
    RENAMED = {"out": "output_dir"}  # keys of older config.toml files


# --- dataclass <-> flags <-> TOML --------------------------------------------------------------------------


def _field_type(f: dataclasses.Field):
    """The plain type of a field: int, float, str, bool (Optional[X] → X)."""
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307 (our own annotations)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field, with the field's comment-free help: its type and default."""
    helps, aliases = getattr(cls, "HELP", {}), getattr(cls, "ALIASES", {})
    for f in dataclasses.fields(cls):
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = dict(type=kind, metavar=kind.__name__.upper())
        if kind is bool:  # "--trace" alone means true; "--trace false" is also accepted
            flag = dict(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            *aliases.get(f.name, []),
            dest=f.name,
            default=None,  # None = not given, so the TOML file or the dataclass default applies
            help=f"{helps.get(f.name, '')} (default: {default})".strip(),
            **flag,
        )
    parser.add_argument("--config", type=Path, help="a TOML file setting the same fields; flags win over it")


def dashed(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with BFL's underscore spellings of the flags (--num_steps, --output_dir) written as this parser's
    (--num-steps, --output-dir), so that commands pasted from the official scripts run."""
    known = parser._option_string_actions  # every option string the parser takes
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "_" in flag and flag.replace("_", "-") in known:
            arg = flag.replace("_", "-") + eq + value
        out.append(arg)
    return out


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass from defaults, then the TOML file, then the flags given. Unknown TOML keys are an error."""
    values = {}
    if getattr(args, "config", None):
        values.update(read_toml(args.config, cls))
    for f in dataclasses.fields(cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def read_toml(path, cls) -> dict:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config: {e}") from None
    data = {getattr(cls, "RENAMED", {}).get(k, k): v for k, v in data.items()}
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    return data


def to_toml(config) -> str:
    """A flat dataclass as TOML, UTF-8 (None values are left out: absent means default)."""
    return "".join(f"{key} = {toml_value(value, key)}\n" for key, value in dataclasses.asdict(config).items()
                   if value is not None)  # fmt: skip


# TOML basic strings escape ", \\ and the control characters (U+0000-U+001F, U+007F); any other character is itself.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def toml_value(value, key: str = "value") -> str:
    """One value as TOML: a string, an integer, a float (inf, -inf and nan included), a boolean, or a list of them.
    JSON is not TOML for inf/nan ("Infinity") nor for characters beyond U+FFFF (JSON writes surrogate pairs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr: "inf", "-inf", "0.001", "1e-05", all TOML
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    if not isinstance(value, str):
        raise TypeError(f"{key}: cannot write a {type(value).__name__} as TOML")
    if any("\ud800" <= c <= "\udfff" for c in value):  # undecodable bytes on the command line, kept as surrogates
        raise ValueError(f"{key}: {value!r} is not valid Unicode text (bytes that are not UTF-8?)")
    return '"' + "".join(_toml_char(c) for c in value) + '"'


def _toml_char(c: str) -> str:
    return _TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)


# --- the command line, checked --------------------------------------------------------------------------------


def parse_train_args(argv, description: str = "", tasks=("vis2ir", "t2i")) -> TrainConfig:
    """train.py's command line → its TrainConfig: defaults, then the TOML file, then the flags given (with --resume:
    the run's config.toml, then the flags given). Bad values stop here, with exit code 2 and the flag named."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, TrainConfig)
    args = parser.parse_args(dashed(parser, sys.argv[1:] if argv is None else argv))
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    if args.resume:  # the run's own config, then whatever this command line changes
        cfg = replace(read_run(args.resume).config, **{"stop_at": None, **{k: getattr(args, k) for k in given}})
    else:
        cfg = config_from_args(TrainConfig, args)
        given |= set(read_toml(args.config, TrainConfig)) if args.config else set()
        if cfg.task == "t2i":
            cfg = replace(cfg, **{k: v for k, v in T2I_DEFAULTS.items() if k not in given})
    if cfg.task not in tasks:
        parser.error(f"--task {cfg.task}: expected one of {', '.join(tasks)}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, known before the process group starts
    if cfg.batch_size % processes:
        parser.error(f"--batch-size {cfg.batch_size} is the global batch: it must split evenly over the {processes} "
                     f"processes (a multiple of {processes}, e.g. {cfg.batch_size // processes * processes or processes})")  # fmt: skip
    if cfg.lora_format not in LORA_FORMATS:
        parser.error(f"--lora-format {cfg.lora_format}: expected one of {', '.join(LORA_FORMATS)}")
    if cfg.semantic not in SEMANTIC_MODES:
        parser.error(f"--semantic {cfg.semantic}: expected one of {', '.join(SEMANTIC_MODES)}")
    if cfg.preset not in configs or configs[cfg.preset].params.in_channels != 384:
        fill = [n for n, s in configs.items() if s.params.in_channels == 384]
        parser.error(f"--preset {cfg.preset}: expected a Fill preset ({', '.join(fill)})")
    if cfg.repo or cfg.finetune:  # a folder names the parts not given one by one
        paths = find_weights(cfg.repo or cfg.finetune, cfg.flux, cfg.ae, cfg.clip, cfg.t5)
        cfg = replace(cfg, **{k: str(v) if v is not None else None for k, v in dataclasses.asdict(paths).items()})
    if cfg.task == "t2i":
        if not cfg.data:
            parser.error("--task t2i needs --data FOLDER: images, each with a same-named .txt caption")
        if not cfg.flux:
            parser.error("--task t2i trains a LoRA on official weights: pass --repo FLUX.1-dev (or FLUX.1-schnell), "
                         "or --flux, --ae, --clip and --t5")  # fmt: skip
        if cfg.resolution % 16 or cfg.resolution < 16:
            parser.error(f"--resolution {cfg.resolution}: expected a multiple of 16 (VAE ×8, then 2×2 packing)")
        if not 0 <= cfg.caption_dropout < 1:
            parser.error(f"--caption-dropout {cfg.caption_dropout}: expected a probability in [0, 1)")
        if "t5_max_length" not in given and not args.resume:  # as the official pipelines: dev 512, schnell 256
            cfg = replace(cfg, t5_max_length=512 if has_guidance_embedding(cfg.flux) else 256)
    return cfg


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


def latest_run(runs) -> Path | None:
    """The most recently finished run under `runs` (the one whose metrics.json is newest)."""
    finished = sorted(Path(runs).glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return finished[-1].parent if finished else None
