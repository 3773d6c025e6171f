"""Shape traces: every tensor's shape at every stage of a real step, one line per stage.

    python -m minflux.study.trace flux-dev-kontext          one 1024×1024 Kontext step: the Kontext walk-through
    python -m minflux.study.trace vis2ir --batch 4          one vis2ir training step, with the design's DEBUG shapes
    python -m minflux.study.trace flux-dev --params         parameter counts of every component and block type
    python -m minflux.study.trace flux2-klein-4b            FLUX.2: two references, Qwen3 read (trace_flux2.py)

The presets are built at full size on torch's meta device: tensors there have shapes and dtypes but no
storage, so FLUX.1-dev, its VAE, CLIP-L and T5-XXL run through a whole step in seconds, with no weights and
no memory. The trace is recorded from the real code: PyTorch's module hooks see the modules, and the plain
functions marked as stages (`minflux.hooks.stage`: pack, prepare, denoise, ...) report to the open trace.

Use in a script (train.py and sample.py take `--trace`):

    from minflux.study.trace import shape_trace
    with shape_trace():                 # prints one line per stage when the block ends
        loss = flow_matching_loss(model, x0, noise, t, **inputs)

A trace line reads `stage (producer)   inputs → outputs   ×calls   (note)`: the stage is the module's path in
its model (block numbers folded into `*`) or the function's name; lines are in the order the data flows, a
stage inside another indented under it; a stage that one caller repeats with the same shapes (19 double
blocks, 50 sampling steps) is one line, with its number of calls, but one called from two places is two. Notes
say what shapes do not: how `velocity` joins the conditions and cuts the output, `embed_ids`'s complex pairs;
the `euler step` line (inline in `denoise`) prints the schedule's t, t_prev and the guidance, Python floats.
"""

import argparse
import dataclasses
import functools
import inspect
import itertools
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from minflux import hooks
from minflux.study.params import meta_components, parameter_table

# Modules printed as a stage wherever they appear (by class name, so a refactor does not break the trace).
STAGE_MODULES = {
    "Flux", "Vis2IR", "Encoder", "Decoder", "CLIPTextModel", "T5Encoder", "MLPEmbedder", "Modulation",
    "DoubleStreamBlock", "SingleStreamBlock", "LastLayer", "SemanticConditioningAdapter",
    "SemanticCrossAttention", "BlockInjection", "Flux2", "Qwen3", "DecoderLayer",
}  # fmt: skip
# The direct children of these are stages too: the Linear, norm and MLP layers of the walk-through.
EXPANDED_MODULES = {"Flux", "DoubleStreamBlock", "SingleStreamBlock", "SelfAttention", "Vis2IR", "Flux2"}
EXPANDED_MODULES |= {"DecoderLayer", "Attention", "MLP", "ModuleDict"}  # Qwen3's (ModuleDict: its `model`)


def _attention_note(inputs: dict, output, lines: list) -> str:
    """The walk-through writes the joint q, k, v before the transpose, as [B, L, H, D]; minflux keeps [B, H, L, D]."""
    q = inputs.get("q")
    if isinstance(q, Tensor) and q.ndim == 4:
        B, H, L, D = q.shape
        return f"heads [B, L, H, D] = {fmt_shape((B, L, H, D))}, [B, H, L, D] = {fmt_shape(q.shape)}"
    return ""


def _rope_note(inputs: dict, output, lines: list) -> str:
    """The RoPE table pe holds one e^{i·a} per pair of head channels: its last axis is half the head dim."""
    axes, names = inputs["axes_dim"], "axis0, row, col" if len(inputs["axes_dim"]) == 3 else "t, h, w, l"  # FLUX.2
    return f"{sum(axes) // 2} pairs of {sum(axes)} channels: {' + '.join(str(d // 2) for d in axes)} for {names}"


def _velocity_note(inputs: dict, output, lines: list) -> str:
    """The concatenation and the cut in `velocity`: the image tokens and their conditions → the model's input (read
    off the model's own line, the first stage velocity ran) → its output → the image's tokens."""
    img, channels, sequence = inputs["img"], inputs.get("img_cond"), inputs.get("img_cond_seq")
    if channels is None and sequence is None:
        return ""
    text = f"img {fmt_shape(img.shape)}"
    text += f" + img_cond {fmt_shape(channels.shape)} on the channels" if channels is not None else ""  # Fill
    text += f" + reference img_cond_seq {fmt_shape(sequence.shape)} on the sequence" if sequence is not None else ""
    if lines:  # the model's line, the first stage velocity ran: the joined tokens are its first input
        model_in, model_out = ((re.findall(r"\[[\d, ]*\]", x) or ["?"])[0] for x in (lines[0].inputs, lines[0].outputs))
        text += f" → {model_in} → model → {model_out}"
    return text + (f" → cut to {fmt_value(output)}" if sequence is not None else "")


NOTES = {"attention": _attention_note, "embed_ids": _rope_note, "velocity": _velocity_note}


def _euler_step(fn, inputs: dict, output, denoise: "Stage") -> None:
    """denoise's Euler update, x ← x + (t_prev − t) · v, as a line after its model calls: the number of steps, and
    the first step's t and t_prev (from the schedule) and guidance, Python floats that the meta device keeps."""
    timesteps, x = inputs["timesteps"], fmt_shape(inputs["img"].shape)
    if len(timesteps) < 2:  # no step
        return
    guidance = inputs.get("guidance", _signature(fn).parameters["guidance"].default)  # its default if left out
    embedded = getattr(getattr(inputs["model"], "params", None), "guidance_embed", True)  # schnell: none
    steps, t, t_prev = len(timesteps) - 1, timesteps[0], timesteps[1]
    guidance = f"guidance {guidance:g}" if embedded else "no guidance embedding"
    note = f"x + (t_prev − t) · v; step 1/{steps}: t {t:.3f} → t_prev {t_prev:.3f}, {guidance}"
    denoise.children.append(Stage(denoise.depth + 1, "euler step", denoise, f"x {x}, v {x}", x, note, steps))


# --- formatting --------------------------------------------------------------------------------------------


def fmt_shape(shape) -> str:
    """The walk-through's notation: [B, 2048, 64]."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _tensors(x) -> list[Tensor]:
    """Every tensor in a (nested) value, in order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [t for f in dataclasses.fields(x) for t in _tensors(getattr(x, f.name))]
    return []


def _collapse(shapes: list[str]) -> str:
    """["[1, 1, 3072]"] * 6 → "6 × [1, 1, 3072]"; other runs listed with commas."""
    runs = [(shape, len(list(run))) for shape, run in itertools.groupby(shapes)]
    return ", ".join(shape if n == 1 else f"{n} × {shape}" for shape, n in runs)


def fmt_value(x) -> str:
    """Shapes of a value: a tensor, a tuple/list of them, a dict (with its keys), a dataclass of tensors."""
    if isinstance(x, Tensor):  # "complex": RoPE's table pe, one e^{i·a} per pair of channels
        return fmt_shape(x.shape) + (" complex" if x.is_complex() else "")
    if isinstance(x, dict):
        return ", ".join(f"{k} {fmt_value(v)}" for k, v in x.items() if _tensors(v))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # its fields by name; a dict field's own names
        values = [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
        return ", ".join(
            fmt_value(v) if isinstance(v, dict) else f"{k} {fmt_value(v)}" for k, v in values if _tensors(v)
        )
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, str) for v in x):
        return f"[{len(x)} str]"
    if isinstance(x, str):
        return "[1 str]"
    return _collapse([fmt_value(t) for t in _tensors(x)])


def fmt_inputs(inputs: dict) -> str:
    """Named inputs that hold tensors (or prompts): "img [1, 4096, 64], txt [1, 512, 4096]"."""
    return ", ".join(f"{name} {fmt_value(v)}" for name, v in inputs.items() if _tensors(v) or "prompt" in name)


@functools.lru_cache(maxsize=None)
def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _bind(fn, args, kwargs, skip_self: bool = False) -> dict:
    """The call's arguments by parameter name (positional ones too), as the function names them."""
    sig = _signature(getattr(fn, "__func__", fn))  # a bound method: its function, `self` first
    skip_self = skip_self or hasattr(fn, "__func__")
    try:
        bound = sig.bind_partial(*((None,) if hasattr(fn, "__func__") else ()), *args, **kwargs).arguments
    except (AttributeError, TypeError):  # no signature (sig None), or one the call does not fit
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    out = {}
    for name, value in list(bound.items())[1 if skip_self else 0 :]:  # **kwargs of the callee, flattened
        out.update(value if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return out


# --- the trace ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Stage:
    """One line of the trace, and the lines of the stages it ran."""

    depth: int  # nesting: a stage called inside another is one deeper
    label: str  # "double_blocks.*.img_attn.qkv (Linear)" or "pack"
    parent: "Stage | None" = field(default=None, repr=False)  # the line of the stage it runs in
    inputs: str = ""
    outputs: str = ""
    note: str = ""
    calls: int = 1
    children: list["Stage"] = field(default_factory=list, repr=False)  # in the order they ran, repeats folded

    @property
    def key(self):
        """Two calls of one caller with the same key are one line."""
        return (self.label, self.inputs, self.outputs)

    def flat(self) -> list["Stage"]:
        """This line, then the lines of the stages it ran, in order."""
        return [self] + [s for child in self.children for s in child.flat()]

    def line(self, width: int) -> str:
        calls, note = f"   ×{self.calls}" if self.calls > 1 else "", f"   ({self.note})" if self.note else ""
        return f"{'  ' * self.depth + self.label:<{width}}  {self.inputs} → {self.outputs}{calls}{note}"


def _merge(first: Stage, repeat: Stage) -> None:
    """Count `repeat`, a call of the same caller with the same shapes, into `first`, and its lines into first's by
    the same rule: the 19 double blocks become one line, and each of their layers one line under it."""
    first.calls += repeat.calls
    for child in repeat.children:
        same = next((c for c in first.children if c.key == child.key), None)
        if same is None:
            child.parent = first
            first.children.append(child)
        else:
            _merge(same, child)


class ShapeTrace(hooks.Observer):
    """The state of one `shape_trace()`: the stages seen so far, as a tree in data-flow order, repeats folded."""

    def __init__(self, max_depth: int = 7):
        self.max_depth = max_depth
        self.roots: list[Stage] = []  # the outermost stages; each holds the stages it ran
        self._open: list[Stage | None] = []  # the stages being computed, innermost last
        self._names: dict[nn.Module, tuple[str, str | None]] = {}  # module → (path label, parent class)
        self._roots: dict[nn.Module, str] = {}

    # ... a marked function or method (minflux.hooks.stage) runs
    def stage(self, label: str, fn, args: tuple, kwargs: dict):
        method = "." in fn.__qualname__
        name = label
        if method and args and isinstance(args[0], nn.Module):  # a module's method: named by the module's path
            path, _ = self.name_module(args[0])
            name = f"{path}.{fn.__name__}" if path else label
        self.enter(name)
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            self.abandon()
            raise
        inputs = _bind(fn, args, kwargs, skip_self=method)
        current = self._open[-1]  # this stage's line (None past max_depth), its own stages' lines under it
        if label == "denoise" and current is not None and current.depth + 1 < self.max_depth:
            _euler_step(fn, inputs, out, current)  # the update inline in denoise, a line after its model calls
        lines = current.children if current is not None else []
        self.leave(inputs, out, NOTES[label](inputs, out, lines) if label in NOTES else "")
        return out

    # ... entering and leaving a stage
    def enter(self, label: str | None) -> None:
        outer = [s for s in self._open if s is not None]
        if label is None or len(outer) >= self.max_depth:
            self._open.append(None)
            return
        stage = Stage(depth=len(outer), label=label, parent=outer[-1] if outer else None)
        (stage.parent.children if stage.parent else self.roots).append(stage)
        self._open.append(stage)

    def leave(self, inputs: dict, output, note: str = "") -> None:
        stage = self._open.pop()
        if stage is None:
            return
        stage.inputs, stage.outputs, stage.note = fmt_inputs(inputs), fmt_value(output), note
        siblings = stage.parent.children if stage.parent else self.roots
        first = next((s for s in siblings if s is not stage and s.key == stage.key), None)
        if first is not None:  # the same caller ran it before, with the same shapes: one line
            siblings.remove(stage)
            _merge(first, stage)

    def abandon(self) -> None:
        """A stage raised: close it without output."""
        stage = self._open.pop()
        if stage is not None:
            stage.outputs = "(raised)"

    # ... naming modules
    def name_module(self, module: nn.Module) -> tuple[str | None, str | None]:
        """(label, parent class name) of a module, registering the tree of a model seen for the first time."""
        if module not in self._names and type(module).__name__ in STAGE_MODULES:
            root = self._roots.get(module, type(module).__name__)
            for path, sub in module.named_modules():
                if sub not in self._names:
                    self._names[sub] = (_fold(f"{root}.{path}" if path else root), None)
            for path, sub in module.named_modules():  # parents: for the "children of EXPANDED_MODULES" rule
                for child in sub.children():
                    self._names[child] = (self._names[child][0], type(sub).__name__)
        return self._names.get(module, (None, None))

    def module_label(self, module: nn.Module) -> str | None:
        path, parent = self.name_module(module)
        cls = type(module).__name__
        if path is None or not (cls in STAGE_MODULES or parent in EXPANDED_MODULES):
            return None
        return f"{path} ({cls})" if not path.endswith(cls) else path

    # ... output
    @property
    def stages(self) -> list[Stage]:
        """Every line in print order: each stage, then the stages it ran."""
        return [s for root in self.roots for s in root.flat()]

    def lines(self) -> list[str]:
        width = max((2 * s.depth + len(s.label) for s in self.stages), default=0)
        return [s.line(width) for s in self.stages]

    def text(self) -> str:
        return "\n".join(self.lines())

    def find(self, label: str) -> list[Stage]:
        """The stages whose label contains `label`."""
        return [s for s in self.stages if label in s.label]


def _fold(path: str) -> str:
    """double_blocks.7.img_attn → double_blocks.*.img_attn: repeated blocks share one line."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


@contextmanager
def shape_trace(quiet: bool = False, file=None, max_depth: int = 7, **names: nn.Module):
    """Record the shape of every stage run inside the block; print the trace when it ends (to `file`, default
    stdout), unless `quiet`.

    Modules are named by their path in the outermost minflux model they run in (`Flux`, `Vis2IR`, ...);
    pass `flux=model` to name a model's root yourself. `max_depth` bounds the nesting that is printed.
    Yields the ShapeTrace: `.lines()`, `.text()`, `.stages`, `.find(label)`.
    """
    trace = ShapeTrace(max_depth)
    trace._roots.update({module: label for label, module in names.items()})

    def pre_hook(module, args):
        trace.enter(trace.module_label(module))

    def post_hook(module, args, kwargs, output):
        if trace._open:
            trace.leave(_bind(module.forward, args, kwargs), output)

    with hooks.observing(trace):
        handles = [
            module_hooks.register_module_forward_pre_hook(pre_hook),
            module_hooks.register_module_forward_hook(post_hook, with_kwargs=True),
        ]
        try:
            yield trace
        finally:
            for h in handles:
                h.remove()
            if not quiet:
                print(trace.text(), file=file or sys.stdout, flush=True)


# --- the walk-throughs, at full size on the meta device ---------------------------------------------------------


def _meta_text_encoder(module: nn.Module, length: int, pooled: bool):
    """A prompt encoder for the meta device: every prompt becomes `length` token ids (zeros, as no tokenizer
    file is read), then the module's output: T5's hidden states, or CLIP's pooled vector."""

    def encode(prompts: list[str]) -> Tensor:
        out = module(torch.zeros(len(prompts), length, dtype=torch.long, device="meta"))
        return out[1] if pooled else out

    return encode


def trace_preset(
    preset: str,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    steps: int = 1,
    t5_length: int | None = None,
    quiet: bool = False,
    references: int = 2,
) -> ShapeTrace:
    """One sampling step of a preset at full size on the meta device, traced through the one recipe (prepare*,
    generate). Text-to-image for dev and schnell, inpainting for Fill (an image and a mask), editing for Kontext
    (a reference image appended to the sequence): the Kontext walk-through for flux-dev-kontext at 1024×1024.
    FLUX.2: `references` reference images, its text encoder fed t5_length (512) tokens: trace_flux2.py."""
    from minflux.presets import configs
    from minflux.sampling import generate, prepare, prepare_fill, prepare_kontext
    from minflux.study.trace_flux2 import trace_flux2

    spec = configs[preset]
    if spec.name.startswith("flux2"):
        return trace_flux2(preset, height, width, batch, steps, t5_length or 512, references, quiet)
    flux, ae, clip, t5 = meta_components(preset).values()
    clip_call = _meta_text_encoder(clip, clip.params.max_position_embeddings, pooled=True)  # ids [1, 77]
    t5_call = _meta_text_encoder(t5, t5_length or spec.t5_max_length, pooled=False)  # ids [1, 512]
    with torch.no_grad(), shape_trace(quiet, transformer=flux, ae=ae, clip=clip, t5=t5) as trace:
        noise = torch.randn(batch, ae.params.z_channels, height // 8, width // 8, device="meta")  # [1, 16, 128, 128]
        prompts = ["a prompt"] * batch
        if flux.params.in_channels > 64:  # Fill: the image with the area to fill erased, and the mask
            image = torch.randn(batch, 3, height, width, device="meta")
            mask = torch.ones(batch, 1, height, width, device="meta")
            inp = prepare_fill(t5_call, clip_call, noise, prompts, ae, image, mask)  # + img_cond [1, 4096, 320]
        elif spec.name.endswith("kontext"):  # Kontext: the reference image's tokens follow the noise's
            reference = torch.randn(batch, 3, height, width, device="meta")  # [1, 3, 1024, 1024]
            inp = prepare_kontext(t5_call, clip_call, noise, prompts, ae, reference)  # + img_cond_seq [1, 4096, 64]
        else:
            inp = prepare(t5_call, clip_call, noise, prompts)
        generate(flux, ae, inp, steps, spec.guidance if flux.params.guidance_embed else None, spec.shift)
    return trace


def trace_vis2ir(
    batch: int = 4,
    panel: int = 512,
    semantic: str = "xattn",
    t5_length: int = 512,
    quiet: bool = False,
    layout: str = "panel",
) -> ShapeTrace:
    """One vis2ir training step at the size of the vis2ir design: FLUX.1-Fill-dev, 512-pixel panels."""
    from minflux.sampling import Inputs, flow_matching_loss, prepare_txt_ids, sample_t
    from minflux.semantic import Vis2IR
    from minflux.tasks.vis2ir import encode_triptych

    parts = meta_components("flux-dev-fill")
    ae, clip, t5 = parts["ae"], parts["clip"], parts["t5"]
    meta = torch.device("meta")
    with torch.device("meta"):
        model = Vis2IR(parts["transformer"], semantic)
    with torch.no_grad(), shape_trace(quiet, ae=ae, clip=clip, t5=t5) as trace:
        triptych = torch.randn(batch, 3, panel, 3 * panel, device=meta)  # [4, 3, 512, 1536]
        enc = encode_triptych(ae, triptych, semantic, layout=layout)
        _, y = clip(torch.zeros(batch, 77, dtype=torch.long, device=meta))  # [4, 768]
        txt = t5(torch.zeros(batch, t5_length, dtype=torch.long, device=meta))  # [4, 512, 4096]
        t = sample_t(batch, device=meta)  # [4]
        noise = torch.randn(enc.x0.shape, device=meta)  # [4, 2048, 64]
        txt_ids = prepare_txt_ids(batch, t5_length, device=meta)  # [4, 512, 3]
        inputs = Inputs(None, enc.img_ids, txt, txt_ids, y, img_cond=enc.x_cond, extra=enc.semantic)
        # x_t, the injection, FLUX-Fill, the loss
        flow_matching_loss(model, enc.x0, noise, t, torch.ones(batch, device=meta), **inputs)
    return trace


def vis2ir_debug_lines(trace: ShapeTrace) -> list[str]:
    """The DEBUG lines of the vis2ir design, filled in from the trace: the design's name, then the shape here."""
    first = lambda label: (trace.find(label) or [None])[0]  # noqa: E731
    named = lambda text: dict(re.findall(r"(\w+) (\[[^\]]*\])", text))  # noqa: E731  "x0 [4, 2048, 64], ..." → dict
    enc, split, ae_in, mask = map(first, ("encode_triptych", "split_triptych", "AutoEncoder.encode", "target_mask"))
    adapter, flux, loss = map(first, ("SemanticConditioningAdapter", "Flux", "flow_matching_loss"))
    out = named(enc.outputs) if enc else {}
    adapter_in = named(adapter.inputs) if adapter else {}
    lines = [
        f"triptych: {split.inputs.split(' ', 1)[1] if split else '?'}",
        f"visible_img, target_img, semantic_img: {split.outputs if split else '?'}",
        f"diptych: {ae_in.inputs.split(' ', 1)[1] if ae_in else '?'}",
        f"mask_diptych: {mask.outputs if mask else '?'}",
        f"x_0: {out.get('x0', '?')}",
        f"x_cond: {out.get('x_cond', '?')}",
        f"semantic_tokens: {out.get('semantic', 'none (this --semantic mode encodes no semantic tokens)')}",
    ]
    if adapter:
        lines += [f"x_t: {adapter_in.get('image_feat', '?')}", f"x_t_enhanced: {adapter.outputs}"]
    lines += [f"hidden_states (final): {named(flux.inputs).get('img', '?')}"] if flux else []
    lines += [f"loss: {loss.outputs}"] if loss else []
    return lines


def main(argv=None) -> int:
    from minflux.presets import configs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help=f"vis2ir, or a preset: {', '.join(configs)}")
    parser.add_argument("--height", type=int, default=None, help="image height (default 1024; vis2ir: the panel, 512)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default 1024)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1; vis2ir: 4, the design's)")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps to run (the trace folds repeats)")
    parser.add_argument("--t5-length", type=int, default=None, help="T5 tokens (default: the preset's, 512 for dev)")
    parser.add_argument("--references", type=int, default=2, help="FLUX.2: reference images (default 2)")
    parser.add_argument("--semantic", default="xattn", help="vis2ir: the injection (default xattn, the design's)")
    layouts = "vis2ir: the semantic tokens of the map alone (1024) or beside itself (2048, the vis2ir design's)"
    parser.add_argument("--semantic-layout", default="panel", choices=("panel", "diptych"), help=layouts)
    parser.add_argument("--params", action="store_true", help="print the parameter table instead of the trace")
    args = parser.parse_args(argv)
    if args.preset != "vis2ir" and args.preset not in configs:
        parser.error(f"unknown preset {args.preset!r}: expected vis2ir or one of {', '.join(configs)}")

    if args.params:
        if args.preset == "vis2ir":
            from minflux.semantic import Vis2IR

            parts = meta_components("flux-dev-fill")
            with torch.device("meta"):
                model = Vis2IR(parts["transformer"], args.semantic)
            for m in parts.values():  # the vis2ir design's setup: FLUX, VAE and text encoders frozen
                m.requires_grad_(False)
            injection = {k: v for k, v in model.named_children() if k != "flux"}  # the adapter
            parts = {"transformer": parts.pop("transformer"), **injection, **parts}  # then ae, clip, t5
        else:
            parts = meta_components(args.preset)
            for name in set(parts) - {"transformer"}:  # frozen in FLUX: only the transformer is ever trained
                parts[name].requires_grad_(False)
        print(parameter_table(parts))
        return 0

    start = time.perf_counter()
    if args.preset == "vis2ir":
        panel, batch = args.height or 512, args.batch or 4
        step = f"vis2ir training step on the meta device: FLUX.1-Fill-dev, {batch} triptychs of {panel}-pixel panels"
        print(f"{step}, --semantic {args.semantic}, --semantic-layout {args.semantic_layout}")
        try:
            trace = trace_vis2ir(batch, panel, args.semantic, args.t5_length or 512, layout=args.semantic_layout)
        except ValueError as e:
            parser.error(str(e))
        print("\nthe DEBUG lines of the vis2ir design, from this trace:")
        for line in vis2ir_debug_lines(trace):
            print(f"[DEBUG] {line}")
    else:
        height, width, batch = args.height or 1024, args.width or 1024, args.batch or 1
        print(f"{args.preset}: {args.steps} sampling step(s) at {height}×{width}, batch {batch}, on the meta device")
        trace_preset(args.preset, height, width, batch, args.steps, args.t5_length, references=args.references)
    print(f"\ntraced in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
