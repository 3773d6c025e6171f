"""Check your own layer against minflux's: python -m minflux.study.exercises check FILE.py [--what WHAT].

The course asks you to write cross-attention, RoPE, the flow-matching loss and a double block yourself. This
harness imports what FILE.py defines, builds minflux's counterpart with the same arguments, copies minflux's
weights into yours by name, runs both on the same seeded inputs in float32 and prints one verdict per check:
the shape first, then the values (max |Δ| over the std of minflux's output, within 1e-5), and, where your
output matches one, the common mistake that gives it.

What FILE.py must define (by default every one of these it has is checked; --what picks one):

  cross-attention     class CrossAttention(dim, num_heads): the names of minflux.semantic.SemanticCrossAttention,
                      norm_image and norm_semantic (nn.LayerNorm(dim)), to_q, to_k, to_v, to_out (nn.Linear(dim,
                      dim)), scale (nn.Parameter of shape [1], initialised to 0); forward(image_feat [B, L, dim],
                      semantic_feat [B, S, dim][, positions]) returns image_feat + scale · to_out(attention).
                      positions, if your forward takes them: (image ids [B, L, 3], semantic ids [B, S, 3]).
  rope                def rope(pos [B, L], dim, theta): the angles [B, L, dim/2], as e^(i·angle) (complex), or
                      the official code's rotation matrices [B, L, dim/2, 2, 2]. Optionally def apply_rope(xq,
                      xk, freqs) (or apply_rope(x, freqs)), freqs being rope's output with a heads axis at 1.
  flow-matching-loss  def flow_matching_loss(model, x0, noise, t): the loss, a scalar; x0 and noise [B, L, C],
                      t [B]; call the model as model(x_t, t), which returns the velocity [B, L, C].
  double-block        class DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias): the names of
                      minflux.model.DoubleStreamBlock; forward(img, txt, vec, pe) returns (img, txt), pe being
                      minflux.attention.embed_ids's output for the ids of [txt | img].

Why a naive comparison passes: SemanticCrossAttention's scale starts at 0, and at 0 the layer returns its input
whatever its attention computes. Here every parameter that its initialisation leaves at one constant (the scale
at 0, a norm's weight at 1 and bias at 0) is moved away first: a scale to 0.5, a norm's by noise of std 0.1.
Your layer must also start as the identity (scale 0), and its output must move with the semantic input.

Exit status: 0 every check passes; 1 one differs; 2 FILE cannot be loaded, or lacks the name.
"""

import argparse
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux import attention, model, sampling, semantic
from minflux.sampling import prepare_img_ids, prepare_txt_ids

TOL = 1e-5  # max |Δ| / std of minflux's output, in float32
MOVES = 1e-3  # an output that changes less than this (relative) when an input is redrawn does not depend on it


class Unloadable(Exception):
    """FILE cannot be imported (exit status 2)."""


def load(path: Path):
    """Import the student's file by its path, as a module of its own."""
    if not path.is_file():
        raise Unloadable(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"student_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the file look their module up here
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a syntax error, a failed import, anything at its top level
        raise Unloadable(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    return module


# --- the pieces of every check ------------------------------------------------------------------------------


def attempt(fn, *args):
    """(fn(*args), None), or (None, the exception as text): the student's code may fail in any way."""
    try:
        return fn(*args), None
    except Exception as e:
        return None, f"raised {type(e).__name__}: {e}"


def relative(mine: Tensor, ref: Tensor) -> float:
    """max |mine − ref| over the std of ref (over |ref| for a scalar), in float64; complex as (re, im) pairs."""
    mine, ref = (torch.view_as_real(x) if x.is_complex() else x for x in (mine.detach(), ref.detach()))
    mine, ref = mine.double(), ref.double()
    spread = ref.std().item() if ref.numel() > 1 else ref.abs().item()
    return (mine - ref).abs().max().item() / max(spread, 1e-12)


def compare(what: str, mine, ref: Tensor, mistakes: dict[str, Tensor] | None = None, values: bool = True):
    """One verdict: the shape, then the values; on a difference, the common mistake whose output yours matches."""
    if not isinstance(mine, Tensor):
        return False, f"{what}: yours is a {type(mine).__name__}, minflux's a tensor {list(ref.shape)}"
    if mine.shape != ref.shape:
        return False, f"{what}: yours is {list(mine.shape)}, minflux's {list(ref.shape)}"
    if not values:
        return True, f"{what}: {list(ref.shape)} as minflux's"
    err, of = relative(mine, ref), "std of minflux's" if ref.numel() > 1 else "minflux's |value|"
    if err <= TOL:
        return True, f"{what}: shape {list(ref.shape)}, max |Δ| = {err:.1e} × {of}"
    like = [name for name, out in (mistakes or {}).items() if out.shape == mine.shape and relative(mine, out) <= TOL]
    hint = f"; yours matches minflux's with {like[0]}" if like else ""
    return False, f"{what}: max |Δ| = {err:.1e} × {of} (tolerance {TOL:.0e}){hint}"


@torch.no_grad()
def off_init(module: nn.Module, g: torch.Generator) -> None:
    """Move every parameter that its initialisation leaves at one constant away from it: a scale or gate of 0 to
    0.5, a norm's weight (1) and bias (0) by noise of std 0.1. Otherwise a layer that skips them would pass."""
    for p in module.parameters():
        if p.numel() == 1 and p.item() == 0:
            p.fill_(0.5)
        elif p.numel() > 1 and (p == p.flatten()[0]).all():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def listing(label: str, items: list[str]) -> str:
    """`label: a, b, c`, wrapped between the items at 110 columns, each further line indented under the first."""
    lines = [f"          {label}:"]
    for i, item in enumerate(items):
        piece = f" {item}" + ("," if i < len(items) - 1 else "")
        if len(lines[-1]) + len(piece) > 110:
            lines.append(" " * 12)
        lines[-1] += piece
    return "\n".join(lines)


def copy_weights(mine: nn.Module, ref: nn.Module, name: str):
    """minflux's tensors into yours, matched by name and shape; the names it expects, and which are missing."""
    theirs, yours = ref.state_dict(), mine.state_dict()
    shaped = lambda keys, d: [f"{k} {list(d[k].shape)}" for k in keys]  # noqa: E731
    missing = [k for k in theirs if k not in yours]
    extra = [k for k in yours if k not in theirs]
    wrong = [k for k in theirs if k in yours and yours[k].shape != theirs[k].shape]
    if missing or wrong:
        lines = [f"weights: minflux's cannot be copied into your {name} by name"]
        lines += [listing("missing", shaped(missing, theirs))] if missing else []
        lines += [
            listing(f"shape of {k}", [f"yours {list(yours[k].shape)}", f"minflux's {list(theirs[k].shape)}"])
            for k in wrong
        ]
        lines += [listing("not in minflux's", shaped(extra, yours))] if extra else []
        lines += [listing("expected", shaped(theirs, theirs))]
        return False, "\n".join(lines)
    mine.load_state_dict(theirs, strict=False)
    note = f"; yours also has {', '.join(shaped(extra, yours))}, left as it is" if extra else ""
    return True, f"weights: {len(theirs)} tensors copied from minflux's by name{note}"


def moves(what: str, out, redrawn, why: str):
    """A verdict on whether an output changes when one input is redrawn."""
    if not (isinstance(out, Tensor) and isinstance(redrawn, Tensor) and redrawn.shape == out.shape):
        return False, f"{what}: not compared with {why} redrawn (no output of one shape both times)"
    change = relative(redrawn, out)
    if change > MOVES:
        return True, f"{what} moves with {why}: max |Δ| = {change:.1e} × std when it is redrawn"
    return False, f"{what} does not move with {why} (max |Δ| = {change:.1e} × std)"


# --- cross-attention: SemanticCrossAttention, its scale away from 0 ------------------------------------------

CROSS_MISTAKES = {  # cross_attention_by_hand's mistake → what the student is told
    "softmax -2": "the softmax over the queries (dim=-2), not the keys (dim=-1)",
    "no sqrt d": "no 1/√d on the scores",
    "no image norm": "no LayerNorm on the image features",
    "no semantic norm": "no LayerNorm on the semantic features",
    "self": "K and V from the image features (self-attention), not the semantic ones",
    "(D H)": "the heads split as (D H), not (H D)",
    "no residual": "no residual: scale · attention alone",
    "no scale": "the scale left out: image + attention",
    "identity": "no attention at all: the output is image_feat",
}


def cross_attention_by_hand(ref, image: Tensor, sem: Tensor, mistake: str | None = None) -> Tensor:
    """SemanticCrossAttention.forward (no positions) written out; `mistake` (a key of CROSS_MISTAKES) makes one."""
    if mistake == "identity":
        return image
    x = image if mistake == "no image norm" else ref.norm_image(image)  # [B, 48, 64]
    s = x if mistake == "self" else sem if mistake == "no semantic norm" else ref.norm_semantic(sem)  # [B, 24, 64]
    heads = "(D H)" if mistake == "(D H)" else "(H D)"
    split = lambda t: rearrange(t, f"B L {heads} -> B H L D", H=ref.num_heads)  # noqa: E731
    q, k, v = split(ref.to_q(x)), split(ref.to_k(s)), split(ref.to_v(s))  # q [B, 8, 48, 8], k and v [B, 8, 24, 8]
    scores = q @ k.transpose(-2, -1) / (1 if mistake == "no sqrt d" else math.sqrt(q.shape[-1]))  # [B, 8, 48, 24]
    weights = scores.softmax(dim=-2 if mistake == "softmax -2" else -1)
    out = ref.to_out(rearrange(weights @ v, f"B H L D -> B L {heads}"))  # [B, 48, 64]
    out = out if mistake == "no scale" else ref.scale * out
    return out if mistake == "no residual" else image + out


@torch.no_grad()
def check_cross_attention(cls, module) -> list:
    dim, heads, g = 64, 8, torch.Generator().manual_seed(0)
    image, sem, other = (torch.randn(2, n, dim, generator=g) for n in (48, 24, 24))
    positions = (prepare_img_ids(2, 6, 8), prepare_img_ids(2, 4, 6))  # a 6 × 8 image grid, a 4 × 6 semantic one
    ref = semantic.SemanticCrossAttention(dim, heads).eval()
    off_init(ref, g)
    mine, error = attempt(cls, dim, heads)
    if error or not isinstance(mine, nn.Module):
        return [(False, f"CrossAttention({dim}, {heads}) {error or 'is no nn.Module'}: expected (dim, num_heads)")]
    mine.eval()
    out, error = attempt(mine, image, sem)
    if error:
        return [(False, f"forward(image [2, 48, 64], semantic [2, 24, 64]) {error}")]
    results = [compare("output shape", out, image, values=False)]
    if results[0][0] is False:
        return results
    start = relative(out, image)
    if start <= TOL:
        results.append((True, "starts as the identity: the output is image_feat (scale initialised to 0)"))
    else:
        results.append((False, f"does not start as the identity (max |Δ| = {start:.1e} × std): scale starts at 0?"))
    results.append(copy_weights(mine, ref, "CrossAttention"))
    copied = results[-1][0]
    if not copied:
        off_init(mine, g)  # your own weights, your scale away from 0: does the semantic input reach the output?
    mistakes = {told: cross_attention_by_hand(ref, image, sem, mistake) for mistake, told in CROSS_MISTAKES.items()}
    out, error = attempt(mine, image, sem)
    what = "values (scale 0.5)"
    if not copied:
        results.append((None, "values: not compared, minflux's weights could not be copied into yours"))
    elif error:
        results.append((False, f"{what}: {error}"))
    else:
        results.append(compare(what, out, ref(image, sem), mistakes))
    if copied and len(inspect.signature(mine.forward).parameters) >= 3:
        turned, error = attempt(mine, image, sem, positions)
        what, want = "values with positions (RoPE on Q and K)", ref(image, sem, positions)
        results.append((False, f"{what}: {error}") if error else compare(what, turned, want))
    elif copied:
        results.append((None, "values with positions: not checked, your forward takes no positions"))
    results.append(moves("the output", out, attempt(mine, image, other)[0], "the semantic input"))
    return results


# --- RoPE: the angles and the rotation ---------------------------------------------------------------------


def rope_by_hand(pos: Tensor, dim: int, theta: int, step: int = 2, sign: int = -1) -> Tensor:
    """rope written out: pair i turns by pos · theta^(−2i/dim); step and sign give two common mistakes."""
    exponents = torch.arange(0, dim, step, dtype=torch.float64)[: dim // 2] / dim  # [dim/2]
    return pos.double()[..., None] * theta ** (sign * exponents)  # [B, L, dim/2]


def as_layout(angles: Tensor, like) -> Tensor:
    """The angles in the student's layout: as they are, e^(i·angle), or the official [..., 2, 2] matrices."""
    if isinstance(like, Tensor) and like.is_complex():
        return torch.polar(torch.ones_like(angles), angles)
    if isinstance(like, Tensor) and like.shape == (*angles.shape, 2, 2):
        cos, sin = angles.cos(), angles.sin()
        return rearrange(torch.stack([cos, -sin, sin, cos], -1), "... (i j) -> ... i j", i=2)
    return angles


def rotate_by_hand(x: Tensor, angles: Tensor, half: bool = False, sign: int = 1) -> Tensor:
    """Turn channel pairs of x [B, H, L, D] by angles [B, 1, L, D/2]: neighbours (2i, 2i+1), or with half=True
    (i, i + D/2), the rotate-half of GPT-NeoX and Llama, which FLUX does not use."""
    cos, sin = angles.cos().float(), (sign * angles).sin().float()
    if half:
        x0, x1 = x.chunk(2, dim=-1)
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [B, H, L, D/2] each
    return rearrange(torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1), "... d two -> ... (d two)")


@torch.no_grad()
def check_rope(fn, module) -> list:
    dim, theta, g = 16, 10_000, torch.Generator().manual_seed(0)
    pos = torch.randint(0, 64, (2, 10), generator=g).float()  # [2, 10]
    angles = attention.rope(pos, dim, theta)  # [2, 10, 8], float64
    mine, error = attempt(fn, pos, dim, theta)
    if error:
        return [(False, f"rope(pos [2, 10], {dim}, {theta}) {error}")]
    mistakes = {
        "theta^(−i/dim), not theta^(−2i/dim)": rope_by_hand(pos, dim, theta, step=1),
        "theta^(+2i/dim), not theta^(−2i/dim)": rope_by_hand(pos, dim, theta, sign=1),
    }
    layout = lambda a: as_layout(a, mine)  # noqa: E731
    mistakes = {name: layout(a) for name, a in mistakes.items()}
    results = [compare(f"rope(pos [2, 10], {dim}, {theta})", mine, layout(angles), mistakes)]
    if not hasattr(module, "apply_rope"):
        return results + [(None, "apply_rope: not checked, FILE has none")]
    if isinstance(mine, Tensor) and mine.shape not in (angles.shape, (*angles.shape, 2, 2)):
        return results + [(None, "apply_rope: not checked, rope's output is in no layout the harness knows")]
    xq, xk = torch.randn(2, 2, 4, 10, dim, generator=g)  # [B, H, L, D] each
    freqs = layout(angles).unsqueeze(1)  # the right angles, in your layout, with a heads axis: [2, 1, 10, 8, ...]
    apply = module.apply_rope
    if len(inspect.signature(apply).parameters) == 2:  # apply_rope(x, freqs)
        out, error = attempt(lambda: (apply(xq, freqs), apply(xk, freqs)))
    else:
        out, error = attempt(apply, xq, xk, freqs)
    if error:
        return results + [(False, f"apply_rope {error}")]
    pe = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).unsqueeze(1)  # as embed_ids: [2, 1, 10, 8]
    ref = torch.stack([attention.rotate(xq, pe), attention.rotate(xk, pe)])  # [2 (q, k), B, H, L, D]
    by_hand = lambda **switch: torch.stack([rotate_by_hand(x, angles[:, None], **switch) for x in (xq, xk)])  # noqa: E731
    mistakes = {
        "pairs (i, i + D/2) (rotate-half, as Llama), not neighbours (2i, 2i + 1)": by_hand(half=True),
        "the turn the other way (−angle)": by_hand(sign=-1),
    }
    stacked = torch.stack(list(out)) if isinstance(out, (tuple, list)) and len(out) == 2 else out
    return results + [compare("apply_rope: the rotated queries and keys", stacked, ref, mistakes)]


# --- the flow-matching loss ------------------------------------------------------------------------------------


class TinyVelocity(nn.Module):
    """The model the loss is checked with: v = Linear(x_t) · (1 + t), a map over channels that depends on t."""

    def __init__(self, channels: int):
        super().__init__()
        self.lin = nn.Linear(channels, channels)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.lin(x_t) * (1 + t.view(-1, 1, 1))  # [B, L, C]


def flow_loss_by_hand(net, x0, noise, t, sign=1, target_noise=False, reverse=False, on_x0=False, reduce=torch.mean):
    """flow_matching_loss written out, with a switch for each common mistake."""
    s = t.view(-1, 1, 1)
    s = 1 - s if reverse else s
    x_t = (1 - s) * x0 + s * noise  # [B, L, C]
    target = noise if target_noise else sign * (noise - x0)
    return reduce((net(x0 if on_x0 else x_t, t) - target).pow(2))


def check_flow_matching_loss(fn, module) -> list:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 8, generator=g)  # [B, L, C] each
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    torch.manual_seed(0)
    net = TinyVelocity(8)
    ref = sampling.flow_matching_loss(
        lambda img, timesteps, **_: net(img, timesteps), x0, noise, t, img_ids=None, txt=None, txt_ids=None, y=None
    )
    mine, error = attempt(fn, net, x0, noise, t)
    if error:
        return [(False, f"flow_matching_loss(model, x0 [4, 16, 8], noise [4, 16, 8], t [4]) {error}")]
    mistakes = {
        "the target x₀ − ε (the sign flipped)": dict(sign=-1),
        "the target ε (noise prediction, as DDPM)": dict(target_noise=True),
        "x_t = t·x₀ + (1 − t)·ε (t runs the other way)": dict(reverse=True),
        "the model given x₀, not x_t": dict(on_x0=True),
        "a sum, not a mean": dict(reduce=torch.sum),
    }
    with torch.no_grad():
        mistakes = {name: flow_loss_by_hand(net, x0, noise, t, **switch) for name, switch in mistakes.items()}
    results = [compare("the loss (a scalar)", mine, ref.detach(), mistakes)]
    if not (isinstance(mine, Tensor) and mine.requires_grad):
        return results + [(False, "gradient: none reaches the model; is the loss detached (.item(), torch.no_grad)?")]
    params = list(net.parameters())
    grads, error = attempt(lambda: torch.cat([d.flatten() for d in torch.autograd.grad(mine.sum(), params)]))
    ref_grads = torch.cat([d.flatten() for d in torch.autograd.grad(ref, params)])
    return results + [(False, f"gradient: {error}") if error else compare("gradient on the model", grads, ref_grads)]


# --- the double block ----------------------------------------------------------------------------------------


@torch.no_grad()
def check_double_block(cls, module) -> list:
    hidden, heads, axes, g = 64, 4, [4, 6, 6], torch.Generator().manual_seed(0)
    img, txt, other = (torch.randn(2, n, hidden, generator=g) for n in (12, 5, 5))  # [2, 12, 64], [2, 5, 64]
    vec = torch.randn(2, hidden, generator=g)
    ids = torch.cat((prepare_txt_ids(2, 5), prepare_img_ids(2, 3, 4)), dim=1)  # [txt | img]: [2, 17, 3]
    pe = attention.embed_ids(ids, axes, 10_000)  # [2, 1, 17, 8] complex
    ref = model.DoubleStreamBlock(hidden, heads, 4.0, True).eval()
    off_init(ref, g)
    mine, error = attempt(cls, hidden, heads, 4.0, True)
    if error or not isinstance(mine, nn.Module):
        return [(False, f"DoubleStreamBlock({hidden}, {heads}, 4.0, True) {error or 'is no nn.Module'}")]
    results = [copy_weights(mine.eval(), ref, "DoubleStreamBlock")]
    copied = results[0][0]
    if not copied:
        off_init(mine, g)
    out, error = attempt(mine, img, txt, vec, pe)
    if error or not (isinstance(out, (tuple, list)) and len(out) == 2):
        return results + [(False, f"forward(img, txt, vec, pe) {error or 'returned no pair (img, txt)'}")]
    want = ref(img, txt, vec, pe)
    results += [compare(f"{name} output", out[i], want[i], values=copied) for i, name in enumerate(("img", "txt"))]
    results += [] if copied else [(None, "values: not compared, minflux's weights could not be copied into yours")]
    redrawn = attempt(mine, img, other, vec, pe)[0]
    return results + [moves("the img output", out[0], redrawn[0] if redrawn else None, "the text (joint attention)")]


# --- the command -----------------------------------------------------------------------------------------------


class Target(NamedTuple):
    name: str  # what FILE.py must define
    minflux: object  # minflux's own, which does not count as yours
    against: str  # what it is compared with, on what
    check: object


TARGETS = {
    "cross-attention": Target(
        "CrossAttention",
        semantic.SemanticCrossAttention,
        "minflux.semantic.SemanticCrossAttention(64, 8), image [2, 48, 64], semantic [2, 24, 64]",
        check_cross_attention,
    ),
    "rope": Target("rope", attention.rope, "minflux.attention.rope and rotate, pos [2, 10], dim 16", check_rope),
    "flow-matching-loss": Target(
        "flow_matching_loss",
        sampling.flow_matching_loss,
        "minflux.sampling.flow_matching_loss, x0 and noise [4, 16, 8], t [4]",
        check_flow_matching_loss,
    ),
    "double-block": Target(
        "DoubleStreamBlock",
        model.DoubleStreamBlock,
        "minflux.model.DoubleStreamBlock(64, 4, 4.0, True), img [2, 12, 64], txt [2, 5, 64]",
        check_double_block,
    ),
}


def check(path, what: str | None = None, log=print) -> int:
    """Check FILE's targets (or the one named); print the verdicts. 0: all pass, 1: one differs, 2: no file/name."""
    path = Path(path)
    try:
        module = load(path)
    except Unloadable as e:
        log(f"check: {e}")
        return 2
    names = ", ".join(t.name for t in TARGETS.values())
    chosen = [what] if what else [w for w, t in TARGETS.items() if hasattr(module, t.name)]
    if not chosen:
        log(f"check: {path} defines none of {names}; the expected names and signatures: --help")
        return 2
    missing = [w for w in chosen if not hasattr(module, TARGETS[w].name)]
    if missing:
        log(f"check: {path} has no {TARGETS[missing[0]].name}, which --what {missing[0]} checks (see --help)")
        return 2
    verdicts = []
    for w in chosen:
        target = TARGETS[w]
        mine = getattr(module, target.name)
        log(f"{path}: {w}, your {target.name} against {target.against}")
        if mine is target.minflux or (isinstance(mine, type) and issubclass(mine, target.minflux)):
            results = [(False, f"{target.name} is minflux's own (imported from minflux), not yours")]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                results = target.check(mine, module)
        for ok, text in results:
            log(f"  {'ok  ' if ok else '--  ' if ok is None else 'FAIL'}  {text}")
        verdicts += [ok for ok, _ in results if ok is not None]
    failed = verdicts.count(False)
    log(f"{failed} of {len(verdicts)} checks differ" if failed else f"all {len(verdicts)} checks pass")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minflux.study.exercises check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="your Python file")
    parser.add_argument("--what", choices=list(TARGETS), help="the one thing to check (default: all FILE defines)")
    args = parser.parse_args(argv)
    return check(args.file, args.what)


if __name__ == "__main__":
    sys.exit(main())
