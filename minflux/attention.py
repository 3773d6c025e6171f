"""Attention and 3-axis rotary position embedding (RoPE) as plain functions.

FLUX attends over one joint sequence [txt | img] and tells the tokens apart only by their positions:
every token has an id (axis0, row, col), and RoPE rotates pairs of query/key channels by angles that
depend on those ids. With head_dim 128 the channels are split 16 / 56 / 56 across the three axes: 8 + 28 + 28 =
64 pairs, so the table pe has 64 complex numbers per token, [B, 1, 8704, 64] beside q's [B, 24, 8704, 128]. The
shapes in the comments are the running example of minflux/model.py: FLUX.1 Kontext at 1024×1024, batch 1, 8704
tokens (512 text + 4096 target + 4096 reference).

Two attention paths compute the same softmax(Q Kᵀ / √d) V:
- "sdpa": torch.nn.functional.scaled_dot_product_attention, which picks fused flash / memory-efficient
  kernels on CUDA.
- "explicit": the formula written out, for reading, and for recording the attention maps (`AttentionMaps`).
The default, "auto", picks the faster of the two for the tensors and the machine at hand (`scaled_dot_product`).
Choose one yourself with `with attention_backend("explicit"): ...`.

References: the official FLUX code (black-forest-labs/flux, src/flux/math.py); RoFormer (Su et al. 2021).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange

from minflux import hooks

_BACKEND = "auto"


@contextmanager
def attention_backend(name: str):
    """Run the enclosed code with attention computed by `name`: "auto", "sdpa" (fused) or "explicit"."""
    global _BACKEND
    if name not in ("auto", "sdpa", "explicit"):
        raise ValueError(f"attention backend {name!r}: expected 'auto', 'sdpa' or 'explicit'")
    previous, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = previous


class AttentionMaps(hooks.Observer):
    """Records the attention probabilities of every attention call inside `with AttentionMaps() as maps:`.

    Recording runs the explicit path. `maps.probs` is a list, one [B, H, L, L] tensor per call, in the
    order the blocks ran (19 double blocks, then 38 single blocks, for each model call). To save memory,
    `reduce` (e.g. `lambda p: p.mean(1)`) is applied to each map before it is stored; None is not stored.
    """

    wants_attention = True

    def __init__(self, reduce=None):
        self.reduce = reduce or (lambda p: p)
        self.probs = []

    def attention_probs(self, probs: torch.Tensor) -> None:
        kept = self.reduce(probs.detach())
        if kept is not None:
            self.probs.append(kept)

    def __enter__(self):
        self._open = hooks.observing(self)
        return self._open.__enter__()

    def __exit__(self, *exc):
        return self._open.__exit__(*exc)


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively, from what it reports, never from a timing (the same
    inputs give the same numbers on a loaded machine as on an idle one): AVX512-BF16 or AMX, with PyTorch's kernels
    not restricted below AVX-512 (ATEN_CPU_CAPABILITY=avx2 runs the AVX2 kernels, which emulate bf16). Where bf16
    is native it is several times faster than fp32; where it is emulated, several times slower (study/BENCH.md).
    Set _CPU_BF16_NATIVE to decide it otherwise (the tests do)."""
    if _CPU_BF16_NATIVE is not None:
        return _CPU_BF16_NATIVE
    reported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return reported and "AVX512" in torch.backends.cpu.get_cpu_capability()


_CPU_BF16_NATIVE: bool | None = None


def cpu_bf16_note(device, dtype) -> str | None:
    """What a script tells a user who asks for bf16 on a CPU that emulates it; None where nothing needs saying."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16 or cpu_bf16_native():
        return None
    return (
        "note: this CPU has no native bf16 matrix multiply (no AVX512-BF16 or AMX), so bf16 is emulated and "
        "several times slower than fp32 here: --dtype fp32 is faster"
    )


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V for q [B, H, Lq, D], k and v [B, H, Lk, D] → [B, H, Lq, D].

    This is the one place where the attention path is chosen. "auto" (the default) takes
    - the explicit formula for bfloat16 tensors on a CPU with native bf16 matrix multiplies (`cpu_bf16_native`):
      PyTorch's fused CPU kernel runs bf16 at float32 speed, while the two products below run as bf16 matrix
      multiplies. The cost: Q Kᵀ is rounded to bf16 before the softmax, and the [B, H, Lq, Lk] scores are held
      in memory (the fused kernels never hold them; autograd keeps the probabilities for backward).
    - SDPA everywhere else: flash / memory-efficient kernels on CUDA; on the CPU in float32, and in bf16 where
      bf16 is emulated, its kernel is the faster (minflux/study/BENCH.md).
    """
    observer = hooks.current()
    recording = observer is not None and observer.wants_attention
    explicit = _BACKEND == "explicit" or (
        _BACKEND == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16 and cpu_bf16_native()
    )
    if not (recording or explicit):
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, Lq, Lk]; scaling q costs Lq·D, not Lq·Lk
    probs = scores.softmax(dim=-1)  # a bf16 softmax accumulates in float32 inside, as .float().softmax() would
    if recording:
        observer.attention_probs(probs)
    return probs @ v  # [B, H, Lq, D]


@hooks.stage
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Joint attention with RoPE. q, k, v [B, H, L, D]; pe [B, 1, L, D/2] from `embed_ids` → [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    x = scaled_dot_product(q, k, v)  # [B, 24, 8704, 128]
    return rearrange(x, "B H L D -> B L (H D)")  # [B, 8704, 3072]


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation angles for one axis. pos [B, L] → [B, L, dim/2], float64.

    Channel pair i turns by the angle pos · theta^(-2i/dim): low pairs turn fast (fine position),
    high pairs slowly (coarse position). Computed in float64, as the official code does, so that large
    positions keep their precision.
    """
    assert dim % 2 == 0, f"rope: axis dim {dim} must be even"
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    return torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)  # [B, L, dim/2]


@hooks.stage
def embed_ids(ids: torch.Tensor, axes_dim: list[int], theta: int) -> torch.Tensor:
    """RoPE for 3-axis ids. ids [B, L, 3] → pe [B, 1, L, sum(axes_dim)/2], complex64 (1: broadcast over heads).

    pe holds e^{i·a} = cos a + i·sin a for the angle a of every channel pair, computed once per forward and
    shared by every block. (The official code stores the same cos and sin as 2×2 rotation matrices,
    [B, 1, L, 64, 2, 2]; `rotate` shows why one complex number per pair says the same.)
    """
    angles = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-1)  # [B, L, 64]
    pe = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # cos a + i·sin a, from float64
    return pe.unsqueeze(1)  # [B, 1, L, 64]


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys that share positions (self-attention)."""
    return rotate(xq, pe), rotate(xk, pe)


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive channel pair (x0, x1) of x [B, H, L, D] by its angle a; pe from `embed_ids`.

    Read the pair as the complex number x0 + i·x1. Turning it by a multiplies it by e^{i·a}:

        (x0 + i·x1)(cos a + i·sin a) = (x0 cos a − x1 sin a) + i·(x0 sin a + x1 cos a)

    which is the official code's [[cos, −sin], [sin, cos]] @ (x0, x1), with the same products and sums (the
    result is bit-identical), as one elementwise product. In float32, as the official code computes it.
    """
    pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2).contiguous()  # [B, H, L, 64, 2]
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * pe)  # [B, H, L, 64, 2]
    return rearrange(rotated, "... d two -> ... (d two)").type_as(x)  # [B, H, L, 128]
