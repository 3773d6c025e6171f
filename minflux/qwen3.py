"""Qwen3 and Mistral, the language models FLUX.2 reads its prompt with: decoder-only transformers, used as encoders.

FLUX.2 [klein] 4B reads the prompt with Qwen3-4B, [klein] 9B with Qwen3-8B, FLUX.2 [dev] with the language model of
Mistral-Small-3.2-24B. No text is generated: the prompt, wrapped in the model's chat template and padded to 512
tokens, goes through the first layers once, and the hidden states after three of them are put side by side:

    ids, mask      [B, 512]              ChatTokenizer (minflux.files.tokenizers): chat template, padding
    embed_tokens   [B, 512, 2560]        hidden state 0 (klein 4B sizes)
    27 × layer:                          pre-norm grouped-query self-attention, pre-norm SwiGLU MLP
      after layers 9, 18, 27             hidden states 9, 18, 27 (transformers' `output_hidden_states` numbering)
    concatenated   [B, 512, 3 · 2560]    = [B, 512, 7680], the `txt` input of the FLUX.2 transformer

Each layer:
- RMSNorm (no mean, no bias; the mean of squares in float32), as T5's layer norm.
- Grouped-query attention: 32 query heads share 8 key/value heads (4 queries per key/value head), head dim 128.
  Causal: a token sees itself and the tokens before it, and no padding token.
- Qwen3 only: one RMSNorm over each head's 128 channels of q and of k ("q/k norm"), before RoPE.
- RoPE in the rotate-half layout: channel i is paired with channel i + 64 (FLUX's own RoPE pairs neighbours 2i,
  2i + 1), base 1e6 (Qwen3) or 1e9 (Mistral).
- SwiGLU MLP: down_proj(silu(gate_proj x) · up_proj x). No biases anywhere.

Mistral is the same network without the q/k norm (`qk_norm=False`), with other sizes and RoPE base; the FLUX.2
[dev] pipeline pads on the left and puts a system message in the chat template.

Module and parameter names are the keys of transformers' Qwen3ForCausalLM (`model.embed_tokens.weight`,
`model.layers.0.self_attn.q_proj.weight`, ...), the layout of the `text_encoder/` folder of the FLUX.2 [klein] repos;
the loader (minflux.files.load_llm) renames the other layouts' prefixes (Mistral3's `model.language_model.`) to it.
The LM head is left out: only hidden states are read.

References: Qwen3 Technical Report (2025); Su et al. 2021, "RoFormer" (RoPE); Ainslie et al. 2023, "GQA";
Shazeer 2020, "GLU Variants Improve Transformer"; transformers' models/qwen3/modeling_qwen3.py and
models/mistral/modeling_mistral.py; diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds and
Flux2Pipeline._get_mistral_3_small_prompt_embeds.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


@dataclass
class Qwen3Params:
    vocab_size: int  # 151936 (Qwen3), 131072 (Mistral's tekken)
    hidden_size: int  # 2560 (Qwen3-4B)
    intermediate_size: int  # 9728: the SwiGLU width
    num_layers: int  # 36: the depth of the full model (hidden state `num_layers` is the normed output)
    num_heads: int  # 32 query heads
    num_kv_heads: int  # 8 key/value heads, each shared by num_heads / num_kv_heads query heads
    head_dim: int  # 128 (not hidden_size / num_heads in Qwen3-4B: 32 × 128 = 4096 ≠ 2560)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    qk_norm: bool = True  # Qwen3: RMSNorm on each head of q and k; Mistral: none
    sliding_window: int | None = None  # attend only to the last `sliding_window` keys (None: all); unused by FLUX.2


# Qwen/Qwen3-4B: the text encoder of FLUX.2 [klein] 4B (tie_word_embeddings: the LM head is the embedding).
QWEN3_4B = Qwen3Params(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
)  # fmt: skip
# Qwen/Qwen3-8B: the text encoder of FLUX.2 [klein] 9B.
QWEN3_8B = Qwen3Params(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
)  # fmt: skip
# mistralai/Mistral-Small-3.2-24B-Instruct-2506, its language model (text_config): the text encoder of FLUX.2 [dev].
MISTRAL_SMALL_3_2 = Qwen3Params(
    vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_layers=40, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=1e9, qk_norm=False,
)  # fmt: skip


class RMSNorm(nn.Module):
    """x / rms(x) · weight over the last dim; the mean of squares in float32, the result cast back before the
    weight multiplies it (the same order of roundings as transformers, so bf16 results agree bit for bit)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(length: int, head_dim: int, theta: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of position · frequency, [L, head_dim], the 64 frequencies written twice (rotate-half layout).

    Frequencies theta^(-2i/d) for i < d/2; computed in float32 on the CPU, as transformers does at init."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [64]
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [L, 64]
    angles = torch.cat([angles, angles], dim=-1).to(device)  # [L, 128]: channel i and i + 64 share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) → (−x2, x1) on the two halves of the last dim: a 90° turn of each pair (x[i], x[i + d/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn each pair (x[i], x[i + d/2]) at position p by the angle p · theta^(-2i/d). x: [B, H, L, D]."""
    return x * cos + rotate_half(x) * sin


def causal_padding_mask(padding: Tensor | None, length: int, sliding_window: int | None, device) -> Tensor:
    """Which keys each query may attend to, [B or 1, 1, L, L] bool: causal, no padding key, within the window.

    A padding query sees the real tokens before it (right padding) or nothing at all (left padding: the row is
    all False and torch's attention returns 0 there, as in transformers' default "sdpa" attention)."""
    position = torch.arange(length, device=device)
    allowed = position[None, :] <= position[:, None]  # [L, L]: key ≤ query
    if sliding_window is not None:
        allowed = allowed & (position[:, None] - position[None, :] < sliding_window)
    allowed = allowed[None, None]  # [1, 1, L, L]
    if padding is not None:  # [B, L]: 1 = a token of the prompt, 0 = padding
        allowed = allowed & padding.bool()[:, None, None, :]  # [B, 1, L, L]
    return allowed


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE; with `qk_norm`, per-head RMSNorm on q and k first."""

    def __init__(self, p: Qwen3Params):
        super().__init__()
        self.num_heads, self.num_kv_heads = p.num_heads, p.num_kv_heads
        self.q_proj = nn.Linear(p.hidden_size, p.num_heads * p.head_dim, bias=False)  # 2560 → 4096
        self.k_proj = nn.Linear(p.hidden_size, p.num_kv_heads * p.head_dim, bias=False)  # 2560 → 1024
        self.v_proj = nn.Linear(p.hidden_size, p.num_kv_heads * p.head_dim, bias=False)  # 2560 → 1024
        self.o_proj = nn.Linear(p.num_heads * p.head_dim, p.hidden_size, bias=False)  # 4096 → 2560
        if p.qk_norm:
            self.q_norm = RMSNorm(p.head_dim, p.rms_norm_eps)  # over each head's 128 channels
            self.k_norm = RMSNorm(p.head_dim, p.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        q = rearrange(self.q_proj(x), "B L (H D) -> B L H D", H=self.num_heads)  # [B, 512, 32, 128]
        k = rearrange(self.k_proj(x), "B L (H D) -> B L H D", H=self.num_kv_heads)  # [B, 512, 8, 128]
        v = rearrange(self.v_proj(x), "B L (H D) -> B H L D", H=self.num_kv_heads)  # [B, 8, 512, 128]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(rearrange(q, "B L H D -> B H L D"), cos, sin)
        k = apply_rope(rearrange(k, "B L H D -> B H L D"), cos, sin)
        # each key/value head serves `group` consecutive query heads: query head h reads key/value head h // group
        group = self.num_heads // self.num_kv_heads  # 4
        k, v = (repeat(t, "B H L D -> B (H g) L D", g=group) for t in (k, v))  # [B, 32, 512, 128]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q kᵀ / √128) v, [B, 32, 512, 128]
        return self.o_proj(rearrange(x, "B H L D -> B L (H D)"))  # [B, 512, 2560]


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj x) · up_proj x), 2560 → 9728 → 2560."""

    def __init__(self, p: Qwen3Params):
        super().__init__()
        self.gate_proj = nn.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.up_proj = nn.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.down_proj = nn.Linear(p.intermediate_size, p.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, p: Qwen3Params):
        super().__init__()
        self.input_layernorm = RMSNorm(p.hidden_size, p.rms_norm_eps)
        self.self_attn = Attention(p)
        self.post_attention_layernorm = RMSNorm(p.hidden_size, p.rms_norm_eps)
        self.mlp = MLP(p)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    """The language model as a text encoder: ids [B, L] and mask → the chosen hidden states side by side.

    depth: build only the first `depth` layers (the loader passes the deepest layer FLUX.2 reads, 27 of Qwen3's 36:
    the other 9 are never run, so they are neither built nor loaded). The final norm is always there: hidden state
    `num_layers` is the normed output of the full model, as in transformers.
    """

    def __init__(self, params: Qwen3Params, depth: int | None = None):
        super().__init__()
        self.params = params
        self.depth = params.num_layers if depth is None else depth
        if not 0 <= self.depth <= params.num_layers:
            raise ValueError(f"depth {self.depth}: the model has {params.num_layers} layers")
        # under `model.`, as in the checkpoints: model.embed_tokens.weight, model.layers.0..., model.norm.weight
        self.model = nn.ModuleDict(
            {
                "embed_tokens": nn.Embedding(params.vocab_size, params.hidden_size),  # [151936, 2560]
                "layers": nn.ModuleList([DecoderLayer(params) for _ in range(self.depth)]),
                "norm": RMSNorm(params.hidden_size, params.rms_norm_eps),
            }
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, layers=(9, 18, 27)) -> Tensor:
        """input_ids, attention_mask [B, L] (1 = a prompt token, 0 = padding; None: no padding)
        → [B, L, len(layers) · hidden], the hidden states `layers` side by side.

        Hidden state 0 is the embedding, k the output of layer k (counted from 1), `num_layers` the normed output.
        Positions count from the first column, padding included (transformers with no position_ids)."""
        layers = list(layers)
        bad = [k for k in layers if not 0 <= k <= self.depth]
        if not layers or bad:
            raise ValueError(
                f"hidden states {layers}: this model holds {self.depth} of {self.params.num_layers} layers"
            )
        length = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)  # [B, 512, 2560]
        cos, sin = rope_cos_sin(length, self.params.head_dim, self.params.rope_theta, x.device, x.dtype)
        keep = causal_padding_mask(attention_mask, length, self.params.sliding_window, x.device)  # [B, 1, 512, 512]
        hidden = {0: x}  # the hidden states asked for, by number
        for i, layer in enumerate(self.model.layers[: max(layers)], start=1):  # only up to the deepest one asked
            x = layer(x, cos, sin, keep)
            if i in layers:
                hidden[i] = x
        if self.params.num_layers in layers:
            hidden[self.params.num_layers] = self.model.norm(x)
        return torch.cat([hidden[k] for k in layers], dim=-1)  # [B, 512, 3 · 2560]: "b c l d -> b l (c d)"
