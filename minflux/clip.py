"""CLIP-L's text tower: the pooled prompt vector `y` [B, 768] that FLUX adds to its time embedding.

A prompt becomes 77 token ids, then 77 hidden states, and FLUX keeps one of them:

    "a photo of a cat"  --CLIPTokenizer-->  ids [B, 77]  <|startoftext|> a photo of a cat <|endoftext|> pad ...
    token + position embeddings                    [B, 77, 768]
    12 × pre-LN transformer layer, causal attention, quick-GELU MLP
    final LayerNorm                                hidden [B, 77, 768]
    the state at the first <|endoftext|> token     pooled [B, 768]

The attention is causal, so the state at the end token has read the whole prompt and nothing after it: that
is why it serves as the summary. FLUX uses only `pooled` (T5 supplies the per-token context).

Module and parameter names are the keys of the official files (`text_model.*`), so FLUX.1's `text_encoder/`
folder and the common single file `clip_l.safetensors` load with no mapping table (minflux.files.load.load_clip;
the prefixes other tools add are in minflux/files/keys.py). The tokenizer is minflux.files.tokenizers.CLIPTokenizer.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
openai/CLIP (clip/model.py, clip/simple_tokenizer.py); transformers (models/clip/modeling_clip.py,
tokenization_clip.py); diffusers FluxPipeline (_get_clip_prompt_embeds: padding to 77, pooler_output).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class CLIPParams:
    vocab_size: int  # 49408 = 256 bytes + 256 bytes with </w> + 48894 merges + 2 special tokens
    hidden_size: int  # 768
    intermediate_size: int  # 3072 = 4 × 768
    num_layers: int  # 12
    num_heads: int  # 12 heads × 64 = 768
    max_position_embeddings: int = 77  # the context: every prompt is padded or cut to 77 tokens
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # x · sigmoid(1.702 x), the activation OpenAI trained with; "gelu" for others
    eos_token_id: int = 2  # 2 in the official config (a legacy value): see `pooled_positions`


# The openai/clip-vit-large-patch14 text config, as FLUX.1's text_encoder/config.json has it.
CLIP_L = CLIPParams(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    eos_token_id=2,
)


# --- the model ---------------------------------------------------------------------------------------


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI's sigmoid approximation of GELU. CLIP was trained with it, so exact GELU would be a different model."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPEmbeddings(nn.Module):
    """Token embedding plus a learned position embedding (no RoPE, no sinusoids)."""

    def __init__(self, params: CLIPParams):
        super().__init__()
        self.token_embedding = nn.Embedding(params.vocab_size, params.hidden_size)
        self.position_embedding = nn.Embedding(params.max_position_embeddings, params.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        L = ids.shape[1]
        return self.token_embedding(ids) + self.position_embedding.weight[:L]  # [B, 77, 768]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the checkpoint keeps them apart)."""

    def __init__(self, params: CLIPParams):
        super().__init__()
        self.num_heads = params.num_heads
        dim = params.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q = rearrange(self.q_proj(x), "B L (H D) -> B H L D", H=self.num_heads)  # [B, 12, 77, 64]
        k = rearrange(self.k_proj(x), "B L (H D) -> B H L D", H=self.num_heads)
        v = rearrange(self.v_proj(x), "B L (H D) -> B H L D", H=self.num_heads)
        # Causal: token i attends to tokens 0..i only, as in GPT. Scale 1/√64, the default.
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, 12, 77, 64]
        return self.out_proj(rearrange(x, "B H L D -> B L (H D)"))  # [B, 77, 768]


class CLIPMLP(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        if params.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {params.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[params.hidden_act]
        self.fc1 = nn.Linear(params.hidden_size, params.intermediate_size)
        self.fc2 = nn.Linear(params.intermediate_size, params.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, 77, 3072] inside, [B, 77, 768] out


class CLIPEncoderLayer(nn.Module):
    """A pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, params: CLIPParams):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)
        self.self_attn = CLIPAttention(params)
        self.layer_norm2 = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)
        self.mlp = CLIPMLP(params)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))  # [B, 77, 768]


class CLIPEncoder(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(params) for _ in range(params.num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def pooled_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """Where each row's first end-of-text token is: ids [B, L] → [B], the rule transformers applies.

    Configs written before transformers PR #24773 (the official CLIP-L one included) say eos_token_id = 2,
    which is wrong; for them the position is argmax(ids): <|endoftext|> = 49407 is the largest id in the
    vocabulary, and argmax returns the first of equal maxima, so this is the first end token even when the
    padding is <|endoftext|> too. Configs with the real id look for that id. Both agree on CLIP-L's tokens.
    """
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextTransformer(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.eos_token_id = params.eos_token_id
        self.embeddings = CLIPEmbeddings(params)
        self.encoder = CLIPEncoder(params)
        self.final_layer_norm = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embeddings(ids)  # [B, 77, 768]
        hidden = self.final_layer_norm(self.encoder(x))  # [B, 77, 768]
        rows = torch.arange(ids.shape[0], device=ids.device)
        pooled = hidden[rows, pooled_positions(ids, self.eos_token_id)]  # [B, 768]
        return hidden, pooled


class CLIPTextModel(nn.Module):
    """CLIP's text tower. forward(ids [B, 77]) → (hidden [B, 77, 768], pooled [B, 768]).

    The one extra level, `text_model`, is there so that the parameter names are the official keys.
    """

    def __init__(self, params: CLIPParams):
        super().__init__()
        self.params = params
        self.text_model = CLIPTextTransformer(params)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.text_model(ids)
