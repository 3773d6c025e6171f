"""SemanticCrossAttention: let a semantic map guide the noisy latent before it enters FLUX (seeds 000-002).

In the vis2ir setup the Fill transformer sees [x_t | x_cond]. The adapter rewrites x_t first:

    x_t  [B, 2048, 64]  ── LayerNorm ── to_q ─┐
                                               ├─ softmax(Q Kᵀ / √d) V ── to_out ── × scale ──(+)── x_t'
    sem  [B, 1024, 64]  ── LayerNorm ── to_k ─┤                                           │
                                    └── to_v ─┘                               x_t ────────┘

Q comes from the image tokens, K and V from the semantic tokens (the VAE latent of the semantic map,
packed like the image), 8 heads of 8 channels. `scale` starts at 0, so at initialisation the adapter is
the identity and the pretrained model is undisturbed; training grows it (the seeds expect 0.00x → 0.x).

The seeds' design has no positions in Q or K: attention then treats the semantic tokens as an unordered
set, and a query cannot tell *where* a semantic token lies — only what it looks like. `positions` adds
RoPE on Q and K from the tokens' (axis0, row, col) ids, as FLUX does for its own attention, so that a
query can find the semantic token at its own place.

Parameters per layer (dim 64): four 64×64 projections with bias, 4 × (4096 + 64) = 16,640; two LayerNorms,
2 × 128 = 256; the scale, 1: 16,897 in all. (Seed 001 counts 16,385 — it forgets the biases — and then
reports 33,088 for one layer.)

References: Vaswani et al. 2017 (attention); seed 004 (cross-attention by hand); Zhang et al. 2023
(ControlNet: zero-initialised injection).
"""

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.attention import embed_ids, rotate, scaled_dot_product


class SemanticCrossAttention(nn.Module):
    """One cross-attention from image tokens (queries) to semantic tokens (keys, values), zero-gated."""

    def __init__(self, dim: int = 64, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"SemanticCrossAttention: dim {dim} must split into {num_heads} heads of a multiple of 4")
        self.num_heads = num_heads
        self.norm_image = nn.LayerNorm(dim)
        self.norm_semantic = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = nn.Parameter(torch.zeros(1))  # 0: the identity at initialisation

    def forward(self, image_feat: Tensor, semantic_feat: Tensor, positions: tuple[Tensor, Tensor] | None = None):
        # image_feat [B, 2048, 64] (x_t), semantic_feat [B, 1024, 64]; positions: their ids [B, L, 3]
        q = rearrange(self.to_q(self.norm_image(image_feat)), "B L (H D) -> B H L D", H=self.num_heads)
        k = rearrange(self.to_k(self.norm_semantic(semantic_feat)), "B L (H D) -> B H L D", H=self.num_heads)
        v = rearrange(self.to_v(self.norm_semantic(semantic_feat)), "B L (H D) -> B H L D", H=self.num_heads)
        # q [B, 8, 2048, 8], k and v [B, 8, 1024, 8]
        if positions is not None:
            # RoPE on rows and columns only: head dim 8 = 0 (axis0) + 4 (row) + 4 (col)
            head_dim = q.shape[-1]
            axes = [0, head_dim // 2, head_dim // 2]
            q = rotate(q, embed_ids(positions[0], axes, theta=10_000))
            k = rotate(k, embed_ids(positions[1], axes, theta=10_000))
        out = scaled_dot_product(q, k, v)  # [B, 8, 2048, 8]
        out = self.to_out(rearrange(out, "B H L D -> B L (H D)"))  # [B, 2048, 64]
        return image_feat + self.scale * self.dropout(out)


class SemanticConditioningAdapter(nn.Module):
    """`num_layers` SemanticCrossAttention layers applied one after another to the image tokens."""

    def __init__(self, dim: int = 64, num_layers: int = 1, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(SemanticCrossAttention(dim, num_heads, dropout) for _ in range(num_layers))

    def forward(self, image_feat: Tensor, semantic_feat: Tensor, positions: tuple[Tensor, Tensor] | None = None):
        x = image_feat  # [B, 2048, 64]
        for layer in self.layers:
            x = layer(x, semantic_feat, positions)
        return x  # [B, 2048, 64], x_t'

    @property
    def scales(self) -> list[float]:
        """The learnable residual scales, one per layer (printed in the training progress line)."""
        return [layer.scale.item() for layer in self.layers]
