"""The semantic map's ways into a FLUX Fill transformer, for vis2ir (visible → infrared, guided by a class map).

SemanticCrossAttention rewrites the noisy latent before it enters FLUX; in the vis2ir setup the Fill
transformer then sees [x_t' | x_cond]:

    x_t  [B, 2048, 64]  ── LayerNorm ── to_q ─┐
                                               ├─ softmax(Q Kᵀ / √d) V ── to_out ── × scale ──(+)── x_t'
    sem  [B, 1024, 64]  ── LayerNorm ── to_k ─┤                                           │
                                    └── to_v ─┘                               x_t ────────┘

Q comes from the image tokens, K and V from the semantic tokens (the VAE latent of the semantic map,
packed like the image), 8 heads of 8 channels. `scale` starts at 0, so at initialisation the adapter is
the identity and the pretrained model is undisturbed; training grows it (the vis2ir notes expect 0.00x → 0.x).

The notes' design has no positions in Q or K: attention then treats the semantic tokens as an unordered
set, and a query cannot tell *where* a semantic token lies — only what it looks like. `positions` adds
RoPE on Q and K from the tokens' (axis0, row, col) ids, as FLUX does for its own attention, so that a
query can find the semantic token at its own place.

Parameters per layer (dim 64): four 64×64 projections with bias, 4 × (4096 + 64) = 16,640; two LayerNorms,
2 × 128 = 256; the scale, 1: 16,897 in all. (The vis2ir notes count 16,385 — they forget the biases — and then
report 33,088 for one layer.)

`Vis2IR` wraps the Fill transformer with one injection design (SEMANTIC_MODES): none; pixel (the map blended
into the visible panel before encoding, done by the task); zeroconv (plan A: a zero-initialised linear map of
the semantic tokens added to the Fill channels of the target half); xattn and xattn_rope (SemanticCrossAttention
on x_t, without and with positions); blocks (plan B: a zero-gated cross-attention after every transformer block);
reference (Kontext only: the semantic map as a second reference image in the sequence, no module at all).

References: Vaswani et al. 2017 (attention); Zhang et al. 2023 (ControlNet: zero-initialised injection).
"""

import math
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.attention import embed_ids, rotate, scaled_dot_product
from minflux.hooks import stage

SEMANTIC_MODES = ("none", "pixel", "zeroconv", "xattn", "xattn_rope", "blocks", "reference")


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


# --- the injection designs, around a FLUX Fill transformer --------------------------------------------------


class BlockInjection(nn.Module):
    """Plan B of the vis2ir notes: a zero-gated cross-attention to the semantic tokens after every transformer block.

    The transformer's own code is left as it is: each block gets a forward hook that, while Vis2IR runs it,
    lets the block's image tokens attend to the semantic tokens. Each SemanticCrossAttention's zero-initialised
    scale is its gate, so at initialisation the blocks compute exactly what they computed before.
    """

    def __init__(self, flux: nn.Module, heads: int):
        super().__init__()
        p = flux.params
        self.proj = nn.Linear(64, p.hidden_size)  # semantic tokens to the transformer's width: [B, 1024, 3072]
        self.double_attn = nn.ModuleList(SemanticCrossAttention(p.hidden_size, heads) for _ in range(p.depth))
        self.single_attn = nn.ModuleList(SemanticCrossAttention(p.hidden_size, heads) for _ in range(p.depth_single_blocks))
        self.context = None  # (semantic [B, 1024, 3072], positions, text length) while Vis2IR runs the blocks
        for block, attn in zip(flux.double_blocks, self.double_attn):
            block.register_forward_hook(partial(self._after_double, attn))
        for block, attn in zip(flux.single_blocks, self.single_attn):
            block.register_forward_hook(partial(self._after_single, attn))

    def _after_double(self, attn, block, args, output):
        if self.context is None:
            return output
        img, txt = output  # [B, 2048, 3072], [B, 512, 3072]
        semantic, positions, _ = self.context
        return attn(img, semantic, positions), txt

    def _after_single(self, attn, block, args, output):
        if self.context is None:
            return output
        semantic, positions, n_txt = self.context
        txt, img = output[:, :n_txt], output[:, n_txt:]  # [B, 512, 3072], [B, 2048, 3072]
        return torch.cat((txt, attn(img, semantic, positions)), dim=1)


class Vis2IR(nn.Module):
    """The trainable whole: a FLUX transformer and the semantic injection around it.

    in_context="fill": a Fill transformer, the visible panel in the Fill channels of a diptych (the default);
    "kontext": a plain transformer, the visible panel (and with semantic="reference" the semantic map, a second
    reference) appended to the sequence, as FLUX.1-Kontext takes its reference. Called like the transformer, plus
    `semantic` and `semantic_ids`, so the plain `denoise` loop samples it.
    """

    def __init__(self, flux: nn.Module, semantic: str = "xattn_rope", layers: int = 1, heads: int = 8,
                 in_context: str = "fill"):  # fmt: skip
        super().__init__()
        if semantic not in SEMANTIC_MODES:
            raise ValueError(f"semantic mode {semantic!r}: expected one of {', '.join(SEMANTIC_MODES)}")
        if in_context == "fill" and flux.params.in_channels != 384:
            raise ValueError(f"vis2ir needs a Fill transformer (384 input channels), got {flux.params.in_channels}")
        if in_context == "fill" and semantic == "reference":
            raise ValueError("semantic mode 'reference' (a second reference in the sequence) is for Kontext")
        if in_context == "kontext" and (flux.params.in_channels != 64 or semantic == "zeroconv"):
            raise ValueError(f"Kontext in-context needs a plain transformer (64 input channels, got "
                             f"{flux.params.in_channels}) and no Fill channels to inject into (semantic {semantic!r})")
        if in_context not in ("fill", "kontext"):
            raise ValueError(f"in_context {in_context!r}: expected 'fill' or 'kontext'")
        self.flux = flux
        self.semantic = semantic
        self.in_context = in_context
        if semantic in ("xattn", "xattn_rope"):
            self.adapter = SemanticConditioningAdapter(dim=64, num_layers=layers, num_heads=heads)
        if semantic == "zeroconv":
            self.zero_conv = nn.Linear(64, 320)  # a 1×1 convolution on the packed tokens
            nn.init.zeros_(self.zero_conv.weight)
            nn.init.zeros_(self.zero_conv.bias)
        if semantic == "blocks":
            self.blocks = BlockInjection(flux, heads)

    @property
    def scales(self) -> list[float]:
        """The adapter's learnable scales, one per layer (xattn, xattn_rope; none for the other modes)."""
        return self.adapter.scales if hasattr(self, "adapter") else []

    def injection_state_dict(self) -> dict[str, Tensor]:
        """The semantic injection's tensors alone (adapter.safetensors): every key outside the transformer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("flux.")}

    @stage
    def inject(self, x_t: Tensor, x_cond: Tensor, semantic: Tensor | None, semantic_ids: Tensor | None, img_ids):
        """(x_t, x_cond) → (x_t', x_cond'), the semantic map injected as the mode says."""
        if self.semantic in ("xattn", "xattn_rope"):
            positions = (img_ids, semantic_ids) if self.semantic == "xattn_rope" else None
            x_t = self.adapter(x_t, semantic, positions)  # [B, 2048, 64]
        elif self.semantic == "zeroconv":
            h = math.isqrt(semantic.shape[1])  # the panels are square: the semantic grid is h × h, the diptych's h × 2h
            added = rearrange(self.zero_conv(semantic), "b (h w) c -> b h w c", h=h)  # [B, 32, 32, 320]
            added = torch.cat((torch.zeros_like(added), added), dim=2)  # nothing on the visible half
            x_cond = x_cond + rearrange(added, "b h w c -> b (h w) c")  # [B, 2048, 320]
        return x_t, x_cond

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, semantic=None, semantic_ids=None):
        if self.in_context == "fill":
            x_t, x_cond = img[..., :64], img[..., 64:]  # [B, 2048, 64], [B, 2048, 320]
            x_t, x_cond = self.inject(x_t, x_cond, semantic, semantic_ids, img_ids)
            img = torch.cat((x_t, x_cond), dim=-1)  # [B, 2048, 384]
        else:  # Kontext: [x_t | references] in the sequence, [B, 2048, 64]; the adapter sees both
            img, _ = self.inject(img, None, semantic, semantic_ids, img_ids)
        if self.semantic != "blocks":
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance)  # [B, 2048, 64]
        self.blocks.context = (self.blocks.proj(semantic), (img_ids, semantic_ids), txt.shape[1])
        try:
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        finally:
            self.blocks.context = None
