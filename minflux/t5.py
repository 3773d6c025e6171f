"""The T5 v1.1 encoder: FLUX's second text encoder (google/t5-v1_1-xxl, encoder only).

The prompt becomes 512 token ids (256 for schnell), ending with </s> and padded with <pad>; 24 encoder
blocks turn them into one 4096-d vector per token, the `txt` input of the FLUX transformer:

    ids     [B, 512]          T5Tokenizer: sentencepiece pieces, </s> = 1, <pad> = 0
    shared  [B, 512, 4096]    token embedding (no position embedding: positions enter as attention biases)
    24 × T5Block:             pre-norm self-attention with a relative position bias, pre-norm gated-GELU MLP
    final_layer_norm          [B, 512, 4096]

What makes T5 different from a textbook transformer encoder:
- LayerNorm is RMS-style: no mean subtraction, no bias, the variance computed in float32.
- Attention logits are not divided by √d (T5 folds that factor into the init of q), and positions are a
  learned bias per head for each bucket of the distance key − query; the buckets are exact for small
  distances and logarithmic up to `relative_attention_max_distance`. Block 0 owns the bias table; the
  bias is computed once and added in all 24 blocks.
- The MLP is gated: gelu_tanh(x W0) * (x W1), then Wo (v1.1; the original T5 used ReLU and no gate).
- FLUX calls T5 with no attention mask, so the padding tokens are attended to; we do the same by default.

Module and parameter names are the keys of transformers' T5EncoderModel (`encoder.block.N.layer.0.
SelfAttention.q.weight`, ...), the layout of the official `text_encoder_2/` folder, so it loads with no
mapping table (minflux.files.load.load_t5, which also reads the single files other tools ship, fp16 or fp8).
The tokenizer is minflux.files.tokenizers.T5Tokenizer.

References: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"; the T5 v1.1 release notes (gated GELU, no dropout in pre-training); transformers'
models/t5/modeling_t5.py and tokenization_t5.py; diffusers FluxPipeline._get_t5_prompt_embeds.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class T5Params:
    vocab_size: int  # 32128: 32000 sentencepiece pieces + 100 <extra_id_N> sentinels, rounded up to 128
    d_model: int  # 4096
    d_kv: int  # 64 per head
    d_ff: int  # 10240
    num_layers: int  # 24
    num_heads: int  # 64 heads × 64 = 4096
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


# google/t5-v1_1-xxl, the encoder FLUX uses (feed_forward_proj "gated-gelu", activation "gelu_new").
T5_XXL = T5Params(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def clamp_fp16(x: Tensor) -> Tensor:
    """Keep float16 activations finite, as transformers does after each T5 sub-layer.

    T5 v1.1 activations can exceed the float16 range (65504). Values are clamped to the largest float16,
    or 1000 below it once some value has already overflowed to inf. Other dtypes pass through.
    """
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), largest - 1000, largest)
    return x.clamp(min=-limit, max=limit)


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """The bucket (0 .. num_buckets-1) of each distance key − query, for a bidirectional encoder.

    Half the buckets are for keys on the left (distance ≤ 0), half for keys on the right. Within a half,
    the first `exact` distances get a bucket each; the rest share the other buckets on a log scale up to
    max_distance, and everything further falls into the last bucket.
    """
    half = num_buckets // 2  # 16
    bucket = (relative_position > 0).long() * half  # right-hand keys use buckets 16..31
    distance = relative_position.abs()
    exact = half // 2  # distances 0..7 map to buckets 0..7
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)  # 8..15
    return bucket + torch.where(distance < exact, distance, far)


class T5LayerNorm(nn.Module):
    """x / rms(x) · weight: no mean subtraction and no bias; the mean of squares is taken in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # float32 from here
        return self.weight * x.to(self.weight.dtype)


class T5Attention(nn.Module):
    """Self-attention with no 1/√d scaling; block 0 also holds the relative position bias table."""

    def __init__(self, p: T5Params, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads = p.num_heads
        self.num_buckets = p.relative_attention_num_buckets
        self.max_distance = p.relative_attention_max_distance
        inner = p.num_heads * p.d_kv  # 4096
        self.q = nn.Linear(p.d_model, inner, bias=False)
        self.k = nn.Linear(p.d_model, inner, bias=False)
        self.v = nn.Linear(p.d_model, inner, bias=False)
        self.o = nn.Linear(inner, p.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(p.relative_attention_num_buckets, p.num_heads)  # [32, 64]

    def position_bias(self, length: int) -> Tensor:
        """The learned bias of every (query, key) pair, from the bucket of their distance. → [1, H, L, L]."""
        position = torch.arange(length, device=self.relative_attention_bias.weight.device)
        distance = position[None, :] - position[:, None]  # [L, L]: key − query
        buckets = relative_position_bucket(distance, self.num_buckets, self.max_distance)  # [L, L]
        bias = self.relative_attention_bias(buckets)  # [L, L, 64]
        # contiguous: attention reads it in every layer, and would otherwise copy the permuted view each time
        return rearrange(bias, "Lq Lk H -> 1 H Lq Lk").contiguous()  # [1, 64, 512, 512]

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = (rearrange(proj(x), "B L (H D) -> B H L D", H=self.num_heads) for proj in (self.q, self.k, self.v))
        # softmax(Q Kᵀ + bias) V: the bias goes in as an additive mask, scale=1.0 because T5 does not scale
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, 64, 512, 64]
        return self.o(rearrange(x, "B H L D -> B L (H D)"))  # [B, 512, 4096]


class T5LayerSelfAttention(nn.Module):
    """x + attention(norm(x))."""

    def __init__(self, p: T5Params, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(p, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(p.d_model, p.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU MLP: wo(gelu_tanh(wi_0 x) * wi_1 x). 4096 → 10240 → 4096."""

    def __init__(self, p: T5Params):
        super().__init__()
        self.wi_0 = nn.Linear(p.d_model, p.d_ff, bias=False)
        self.wi_1 = nn.Linear(p.d_model, p.d_ff, bias=False)
        self.wo = nn.Linear(p.d_ff, p.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # [B, 512, 10240]
        # wo may be kept in float32 when the rest is float16 (see load_t5): the product then overflows less
        return self.wo(x.to(self.wo.weight.dtype))  # [B, 512, 4096]


class T5LayerFF(nn.Module):
    """x + mlp(norm(x)). The checkpoint calls the MLP `DenseReluDense`, a name kept from the ReLU T5."""

    def __init__(self, p: T5Params):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(p)
        self.layer_norm = T5LayerNorm(p.d_model, p.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, p: T5Params, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(p, has_relative_attention_bias), T5LayerFF(p)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, p: T5Params, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens  # the very same module as T5Encoder.shared
        self.block = nn.ModuleList([T5Block(p, has_relative_attention_bias=(i == 0)) for i in range(p.num_layers)])
        self.final_layer_norm = T5LayerNorm(p.d_model, p.layer_norm_epsilon)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.embed_tokens(ids)  # [B, 512, 4096]
        bias = self.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])  # [1, 64, 512, 512], for all blocks
        if mask is not None:  # optional padding mask [B, L], True/1 = a real token; FLUX passes none
            is_pad = ~mask.bool()[:, None, None, :]  # [B, 1, 1, L]: keys no query may attend to
            bias = bias.masked_fill(is_pad, torch.finfo(bias.dtype).min)  # [B, 64, L, L]
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)  # [B, 512, 4096]


class T5Encoder(nn.Module):
    """T5 encoder: ids [B, L] → hidden [B, L, d_model]. State dict keys == transformers' T5EncoderModel.

    `shared` and `encoder.embed_tokens` are one module, so the state dict lists the embedding under both
    keys (as T5EncoderModel does) while `parameters()` counts it once.
    """

    def __init__(self, params: T5Params):
        super().__init__()
        self.params = params
        self.shared = nn.Embedding(params.vocab_size, params.d_model)  # [32128, 4096]
        self.encoder = T5Stack(params, embed_tokens=self.shared)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.encoder(ids, mask)
