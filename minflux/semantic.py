"""The semantic map's ways into a FLUX Fill transformer, for vis2ir (visible → infrared, guided by a class map).

SemanticCrossAttention rewrites the noisy latent before it enters FLUX; in the vis2ir setup the Fill
transformer then sees [x_t' | x_cond]:

    x_t  [B, 2048, 64]  ── LayerNorm ── to_q ─┐
                                               ├─ softmax(Q Kᵀ / √d) V ── to_out ── × scale ──(+)── x_t'
    sem  [B, 1024, 64]  ── LayerNorm ── to_k ─┤                                           │
                                    └── to_v ─┘                               x_t ────────┘

Q comes from the image tokens, K and V from the semantic tokens (the VAE latent of the semantic map,
packed like the image), 8 heads of 8 channels. `scale` starts at 0, so at initialisation the adapter is
the identity and the pretrained model is undisturbed; training grows it (the vis2ir design expects 0.00x → 0.x).

The vis2ir design has no positions in Q or K: attention then treats the semantic tokens as an unordered
set, and a query cannot tell *where* a semantic token lies — only what it looks like. `positions` adds
RoPE on Q and K from the tokens' (axis0, row, col) ids, as FLUX does for its own attention, so that a
query can find the semantic token at its own place.

Parameters per layer (dim 64): four 64×64 projections with bias, 4 × (4096 + 64) = 16,640; two LayerNorms,
2 × 128 = 256; the scale, 1: 16,897 in all. (The vis2ir design counts 16,385 — it leaves out the biases and the
LayerNorms — and then reports 33,088 for one layer.)

`Vis2IR` wraps the Fill transformer with one injection design (SEMANTIC_MODES): none; pixel (the map blended
into the visible panel before encoding, done by the task); zeroconv (plan A: a zero-initialised linear map of
the semantic tokens added to the Fill channels of the target half); xattn and xattn_rope (SemanticCrossAttention
on x_t, without and with positions); blocks (plan B: a zero-gated cross-attention after every transformer block);
adapters (plan C: a gated adapter, semantic self-attention + cross-attention + feed-forward, between the blocks);
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

SEMANTIC_MODES = ("none", "pixel", "zeroconv", "xattn", "xattn_rope", "blocks", "adapters", "reference")


def multihead(q: Tensor, k: Tensor, v: Tensor, heads: int, positions: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(Q Kᵀ / √d) V over `heads` heads: q [B, Lq, C], k and v [B, Lk, C] → [B, Lq, C]. With positions (the
    queries' and the keys' ids [B, L, 3]), RoPE on rows and columns: head dim d = 0 (axis0) + d/2 (row) + d/2 (col)."""
    q, k, v = (rearrange(x, "B L (H D) -> B H L D", H=heads) for x in (q, k, v))  # q [B, 8, 2048, 8], k [B, 8, 1024, 8]
    if positions is not None:
        axes = [0, q.shape[-1] // 2, q.shape[-1] // 2]
        q = rotate(q, embed_ids(positions[0], axes, theta=10_000))
        k = rotate(k, embed_ids(positions[1], axes, theta=10_000))
    return rearrange(scaled_dot_product(q, k, v), "B H L D -> B L (H D)")  # [B, 2048, 64]


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
        image, semantic = self.norm_image(image_feat), self.norm_semantic(semantic_feat)
        out = multihead(self.to_q(image), self.to_k(semantic), self.to_v(semantic), self.num_heads, positions)
        out = self.to_out(out)  # [B, 2048, 64]
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


class AfterBlocks(nn.Module):
    """Modules run after transformer blocks on the blocks' image tokens, with the semantic tokens at hand (plans B
    and C). The transformer's own code is left as it is: each chosen block gets a forward hook that, while Vis2IR
    runs the transformer (`context` set), replaces the block's image tokens by module(image, semantic, positions)."""

    context = None  # (semantic tokens [B, 1024, W], positions, text length) while Vis2IR runs the blocks

    def attach(self, flux: nn.Module, chosen: list[int], modules) -> None:
        """A hook on each chosen block (double and single blocks counted in the order they run)."""
        n_double = len(flux.double_blocks)
        blocks = [*flux.double_blocks, *flux.single_blocks]
        for i, module in zip(chosen, modules):
            blocks[i].register_forward_hook(partial(self._after_double if i < n_double else self._after_single, module))

    def _after_double(self, module, block, args, output):
        if self.context is None:
            return output
        img, txt = output  # [B, 2048, 3072], [B, 512, 3072]
        semantic, positions, _ = self.context
        return module(img, semantic, positions), txt

    def _after_single(self, module, block, args, output):
        if self.context is None:
            return output
        semantic, positions, n_txt = self.context
        txt, img = output[:, :n_txt], output[:, n_txt:]  # [B, 512, 3072], [B, 2048, 3072]
        return torch.cat((txt, module(img, semantic, positions)), dim=1)


class BlockInjection(AfterBlocks):
    """Plan B of the vis2ir design: a zero-gated cross-attention to the semantic tokens after every transformer block.
    Each SemanticCrossAttention's zero-initialised scale is its gate, so at initialisation the blocks compute exactly
    what they computed before."""

    def __init__(self, flux: nn.Module, heads: int):
        super().__init__()
        p = flux.params
        self.proj = nn.Linear(64, p.hidden_size)  # semantic tokens to the transformer's width: [B, 1024, 3072]
        self.double_attn = nn.ModuleList(SemanticCrossAttention(p.hidden_size, heads) for _ in range(p.depth))
        self.single_attn = nn.ModuleList(
            SemanticCrossAttention(p.hidden_size, heads) for _ in range(p.depth_single_blocks)
        )
        self.attach(flux, list(range(p.depth + p.depth_single_blocks)), [*self.double_attn, *self.single_attn])


class AdapterLayer(nn.Module):
    """One layer of a plan C adapter: the semantic tokens attend to each other, the image tokens to them, then a
    feed-forward on the image tokens. Pre-norm residuals throughout, at the adapter's width."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(width)
        self.self_qkv = nn.Linear(width, 3 * width)
        self.self_out = nn.Linear(width, width)
        self.norm_image = nn.LayerNorm(width)
        self.norm_semantic = nn.LayerNorm(width)
        self.cross_q = nn.Linear(width, width)
        self.cross_kv = nn.Linear(width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, image: Tensor, semantic: Tensor, positions: tuple[Tensor, Tensor] | None):
        # image [B, 2048, W], semantic [B, 1024, W]; positions: (image ids, semantic ids)
        q, k, v = self.self_qkv(self.norm_self(semantic)).chunk(3, dim=-1)
        own = None if positions is None else (positions[1], positions[1])
        semantic = semantic + self.self_out(multihead(q, k, v, self.heads, own))  # [B, 1024, W]
        k, v = self.cross_kv(self.norm_semantic(semantic)).chunk(2, dim=-1)
        image = image + self.cross_out(multihead(self.cross_q(self.norm_image(image)), k, v, self.heads, positions))
        return image + self.ff(self.norm_ff(image)), semantic  # [B, 2048, W], [B, 1024, W]


class SemanticAdapter(nn.Module):
    """Plan C of the vis2ir design: an adapter between two transformer blocks, image = image + gate · adapter(image,
    semantic). The image tokens are brought down to the adapter's width, pass its layers, and go back up; the gate
    starts at 0, so at initialisation the block's output passes unchanged."""

    def __init__(self, hidden: int, width: int, heads: int, depth: int):
        super().__init__()
        if width % heads or (width // heads) % 4:
            raise ValueError(f"SemanticAdapter: width {width} must split into {heads} heads of a multiple of 4")
        self.down = nn.Linear(hidden, width)
        self.layers = nn.ModuleList(AdapterLayer(width, heads) for _ in range(depth))
        self.up = nn.Linear(width, hidden)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, image: Tensor, semantic: Tensor, positions: tuple[Tensor, Tensor] | None) -> Tensor:
        h = self.down(image)  # [B, 2048, 3072] -> [B, 2048, W]
        for layer in self.layers:
            h, semantic = layer(h, semantic, positions)
        return image + self.gate * self.up(h)  # [B, 2048, 3072]


class AdapterInjection(AfterBlocks):
    """Plan C around the transformer: a SemanticAdapter after every `every`-th block, the semantic tokens projected
    once to the adapters' width."""

    def __init__(self, flux: nn.Module, width: int, heads: int, depth: int, every: int = 1):
        super().__init__()
        p = flux.params
        self.proj = nn.Linear(64, width)  # semantic tokens [B, 1024, 64] -> [B, 1024, W]
        chosen = [i for i in range(p.depth + p.depth_single_blocks) if (i + 1) % every == 0]
        self.adapters = nn.ModuleList(SemanticAdapter(p.hidden_size, width, heads, depth) for _ in chosen)
        self.attach(flux, chosen, self.adapters)


class Vis2IR(nn.Module):
    """The trainable whole: a FLUX transformer and the semantic injection around it.

    in_context="fill": a Fill transformer, the visible panel in the Fill channels of a diptych (the default);
    "kontext": a plain transformer (FLUX.1's or FLUX.2's), the visible panel (and with semantic="reference" the
    semantic map, a second reference) appended to the sequence, as FLUX.1-Kontext and FLUX.2 take references.
    Called like the transformer, plus `semantic` and `semantic_ids`, so the plain `denoise` loop samples it.
    """

    def __init__(
        self,
        flux: nn.Module,
        semantic: str = "xattn_rope",
        layers: int = 1,
        heads: int = 8,
        in_context: str = "fill",
        width: int = 64,
        every: int = 1,
        scale_init: float = 0.0,
    ):
        super().__init__()
        if semantic not in SEMANTIC_MODES:
            raise ValueError(f"semantic mode {semantic!r}: expected one of {', '.join(SEMANTIC_MODES)}")
        if in_context == "fill" and flux.params.in_channels != 384:
            raise ValueError(f"vis2ir needs a Fill transformer (384 input channels), got {flux.params.in_channels}")
        if in_context == "fill" and semantic == "reference":
            raise ValueError("semantic mode 'reference' (a second reference in the sequence) is for Kontext")
        if in_context == "kontext" and (flux.params.in_channels not in (64, 128) or semantic == "zeroconv"):
            raise ValueError(
                f"Kontext in-context needs a plain transformer (64 input channels, FLUX.2's 128; got "
                f"{flux.params.in_channels}) and no Fill channels to inject into (semantic {semantic!r})"
            )
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
        if semantic == "adapters":  # plan C: `layers` layers per adapter, `width` wide, after every `every`-th block
            self.blocks = AdapterInjection(flux, width, heads, layers, every)
        with (
            torch.no_grad()
        ):  # scale_init ≠ 0 (the vis2ir design's "scale initialisation strategy"): no identity at the start
            for gate in self.gates():
                gate.fill_(scale_init)

    def gates(self) -> list[nn.Parameter]:
        """The injection's residual scales and gates (0 at initialisation by default): one per layer (xattn,
        xattn_rope), per block (blocks), per adapter (adapters); none for the other modes."""
        if hasattr(self, "adapter"):
            return [layer.scale for layer in self.adapter.layers]
        if self.semantic == "blocks":
            return [a.scale for a in (*self.blocks.double_attn, *self.blocks.single_attn)]
        return [a.gate for a in self.blocks.adapters] if self.semantic == "adapters" else []

    @property
    def scales(self) -> list[float]:
        """The gates' values now (the training progress line, log.jsonl and scales.png). A gate sharded by FSDP is
        gathered first (full_tensor: every process asks)."""
        return [(g.full_tensor() if hasattr(g, "full_tensor") else g).item() for g in self.gates()]

    def injection_state_dict(self) -> dict[str, Tensor]:
        """The semantic injection's tensors alone (adapter.safetensors): every key outside the transformer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("flux.")}

    @stage
    def inject(self, x_t: Tensor, x_cond: Tensor, semantic: Tensor | None, semantic_ids: Tensor | None, img_ids):
        """(x_t, x_cond) → (x_t', x_cond'), the semantic map injected as the mode says."""
        if self.semantic in ("xattn", "xattn_rope"):
            positions = (img_ids, semantic_ids) if self.semantic == "xattn_rope" else None
            x_t = self.adapter(x_t, semantic, positions)  # [B, 2048, 64]
        elif self.semantic == "zeroconv" and semantic.shape[1] == x_cond.shape[1]:  # one semantic token per token
            x_cond = x_cond + self.zero_conv(semantic)  # [B, 2048, 320]
        elif self.semantic == "zeroconv":  # the panel's tokens, onto the target half
            h = math.isqrt(semantic.shape[1])  # the panels are square: the semantic grid is h × h, the diptych's h × 2h
            added = rearrange(self.zero_conv(semantic), "b (h w) c -> b h w c", h=h)  # [B, 32, 32, 320]
            added = torch.cat((torch.zeros_like(added), added), dim=2)  # nothing on the visible half
            x_cond = x_cond + rearrange(added, "b h w c -> b (h w) c")  # [B, 2048, 320]
        return x_t, x_cond

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None, semantic=None, semantic_ids=None):
        if self.in_context == "fill":
            x_t, x_cond = img[..., :64], img[..., 64:]  # [B, 2048, 64], [B, 2048, 320]
            x_t, x_cond = self.inject(x_t, x_cond, semantic, semantic_ids, img_ids)
            img = torch.cat((x_t, x_cond), dim=-1)  # [B, 2048, 384]
        else:  # Kontext: [x_t | references] in the sequence, [B, 2048, 64]; the adapter sees both
            img, _ = self.inject(img, None, semantic, semantic_ids, img_ids)
        pooled = {} if y is None else {"y": y}  # FLUX.2 has no pooled text vector
        if self.semantic not in ("blocks", "adapters"):
            return self.flux(img, img_ids, txt, txt_ids, timesteps, guidance=guidance, **pooled)  # [B, 2048, 64]
        self.blocks.context = (self.blocks.proj(semantic), (img_ids, semantic_ids), txt.shape[1])
        try:
            return self.flux(img, img_ids, txt, txt_ids, timesteps, guidance=guidance, **pooled)
        finally:
            self.blocks.context = None
