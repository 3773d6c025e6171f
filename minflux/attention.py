"""Attention and 3-axis rotary position embedding (RoPE) as plain functions.

FLUX attends over one joint sequence [txt | img] and tells the tokens apart only by their positions:
every token has an id (axis0, row, col), and RoPE rotates pairs of query/key channels by angles that
depend on those ids. With head_dim 128 the channels are split 16 / 56 / 56 across the three axes.

Two attention paths compute the same softmax(Q Kᵀ / √d) V:
- "sdpa": torch.nn.functional.scaled_dot_product_attention, which picks fused flash / memory-efficient
  kernels on CUDA. The default.
- "explicit": the formula written out, for reading, and for returning the attention maps (`AttentionMaps`).
Choose with `with attention_backend("explicit"): ...`.

References: the official FLUX code (black-forest-labs/flux, src/flux/math.py); RoFormer (Su et al. 2021).
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange

_BACKEND = "sdpa"
_MAPS = None  # an AttentionMaps while one is recording


@contextmanager
def attention_backend(name: str):
    """Run the enclosed code with attention computed by `name`: "sdpa" (fused) or "explicit"."""
    global _BACKEND
    if name not in ("sdpa", "explicit"):
        raise ValueError(f"attention backend {name!r}: expected 'sdpa' or 'explicit'")
    previous, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = previous


class AttentionMaps:
    """Records the attention probabilities of every attention call inside `with AttentionMaps() as maps:`.

    Recording forces the explicit path. `maps.probs` is a list, one [B, H, L, L] tensor per call, in the
    order the blocks ran (19 double blocks, then 38 single blocks, for each model call). To save memory,
    `reduce` (e.g. `lambda p: p.mean(1)`) is applied to each map before it is stored.
    """

    def __init__(self, reduce=None):
        self.reduce = reduce or (lambda p: p)
        self.probs = []

    def __enter__(self):
        global _MAPS
        self._backend = attention_backend("explicit")
        self._backend.__enter__()
        _MAPS = self
        return self

    def __exit__(self, *exc):
        global _MAPS
        _MAPS = None
        self._backend.__exit__(*exc)


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V for q [B, H, Lq, D], k and v [B, H, Lk, D] → [B, H, Lq, D]."""
    if _BACKEND == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if _MAPS is not None:
        _MAPS.probs.append(_MAPS.reduce(probs.detach()))
    return probs @ v  # [B, H, Lq, D]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Joint attention with RoPE. q, k, v [B, H, L, D]; pe [B, 1, L, D/2, 2, 2] → [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    x = scaled_dot_product(q, k, v)  # [B, 24, 8704, 128]
    return rearrange(x, "B H L D -> B L (H D)")  # [B, 8704, 3072]


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices for one axis. pos [B, L] → [B, L, dim/2, 2, 2].

    Channel pair i turns by the angle pos · theta^(-2i/dim): low pairs turn fast (fine position),
    high pairs slowly (coarse position). Computed in float64, as the official code does, so that large
    positions keep their precision; the result is float32.
    """
    assert dim % 2 == 0, f"rope: axis dim {dim} must be even"
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    angles = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)  # [B, L, dim/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)  # [B, L, dim/2, 4]
    return rearrange(rot, "b n d (i j) -> b n d i j", i=2, j=2).float()  # [B, L, dim/2, 2, 2]


def embed_ids(ids: torch.Tensor, axes_dim: list[int], theta: int) -> torch.Tensor:
    """RoPE for 3-axis ids. ids [B, L, 3] → pe [B, 1, L, sum(axes_dim)/2, 2, 2] (1: broadcast over heads)."""
    pe = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)  # [B, L, 64, 2, 2]
    return pe.unsqueeze(1)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys that share positions (self-attention)."""
    return rotate(xq, pe), rotate(xk, pe)


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive channel pair (x0, x1) of x [B, H, L, D] by its 2×2 matrix from pe."""
    x_ = rearrange(x.float(), "... (d two) -> ... d 1 two", two=2)  # [B, H, L, D/2, 1, 2]
    # [[cos, -sin], [sin, cos]] @ (x0, x1), written as two broadcast products
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]  # [B, H, L, D/2, 2]
    return out.reshape(x.shape).type_as(x)
