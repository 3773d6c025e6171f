"""The T5 v1.1 encoder and its tokenizer: FLUX's second text encoder (google/t5-v1_1-xxl, encoder only).

The prompt becomes 512 token ids (256 for schnell), ending with </s> and padded with <pad>; 24 encoder
blocks turn them into one 4096-d vector per token, the `txt` input of the FLUX transformer (seed 003):

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
mapping table. `load_t5` also reads the single files other tools ship (t5xxl_fp16.safetensors, fp8).

References: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"; the T5 v1.1 release notes (gated GELU, no dropout in pre-training); transformers'
models/t5/modeling_t5.py and tokenization_t5.py; diffusers FluxPipeline._get_t5_prompt_embeds.
"""

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import tokenizers
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minflux.weights import WeightsError, load_into, read_shapes, read_state_dict


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


# --- tokenizer ---------------------------------------------------------------------------------------

# Text that the tokenizer maps to one special id even inside a prompt, as transformers' tokenizer does.
SPECIAL_TEXT = re.compile(r"(</s>|<pad>|<unk>|<extra_id_\d{1,2}>)")


class T5Tokenizer:
    """Prompts → ids [B, max_length]: the prompt's pieces, </s> (1), then <pad> (0) up to max_length.

    Reads the official `tokenizer_2/` folder: `tokenizer.json` with the `tokenizers` package (the same
    file and library as transformers' T5TokenizerFast, so the ids match it exactly), or else
    `spiece.model` with `sentencepiece`. A prompt too long is cut to max_length - 1 pieces, then </s>.
    """

    def __init__(self, folder, max_length: int = 512):
        folder = Path(folder)
        self.max_length = max_length
        if (folder / "tokenizer.json").is_file():
            self.backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.backend.no_truncation()  # truncation, </s> and padding are done below, in plain sight
            self.backend.no_padding()
            self.eos_id, self.pad_id = self.backend.token_to_id("</s>"), self.backend.token_to_id("<pad>")
        elif (folder / "spiece.model").is_file():
            self.backend = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            self.eos_id, self.pad_id = self.backend.eos_id(), self.backend.pad_id()
        else:
            where = f"{folder}: no such folder" if not folder.is_dir() else f"{folder}: folder"
            raise WeightsError(f"{where} holds neither tokenizer.json nor spiece.model (expected a T5 tokenizer_2/)")

    def encode(self, text: str) -> list[int]:
        """The ids of one prompt's pieces, without </s>."""
        if isinstance(self.backend, tokenizers.Tokenizer):
            return self.backend.encode(text, add_special_tokens=False).ids
        # sentencepiece would read "</s>" or "<extra_id_0>" in a prompt as plain characters; transformers
        # reads them as their special ids, so split them out first. <extra_id_N> lie after the spm
        # pieces in reverse order: <extra_id_0> = 32099, <extra_id_99> = 32000.
        ids = []
        for part in SPECIAL_TEXT.split(text):
            extra = re.fullmatch(r"<extra_id_(\d+)>", part)
            if extra:
                ids.append(self.backend.get_piece_size() + 99 - int(extra[1]))
            elif SPECIAL_TEXT.fullmatch(part):
                ids.append(self.backend.piece_to_id(part))
            elif part:
                ids.extend(self.backend.encode(part))
        return ids

    def __call__(self, prompts: str | list[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > self.max_length - 1:
                dropped = len(ids) - (self.max_length - 1)
                warnings.warn(f"T5 prompt of {len(ids) + 1} tokens truncated to {self.max_length}: {dropped} dropped")
                ids = ids[: self.max_length - 1]
            ids = ids + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # [B, 512]


# --- loading -----------------------------------------------------------------------------------------

ANCHOR = "encoder.final_layer_norm.weight"  # present in every T5 encoder file; what precedes it is the prefix


def find_prefix(keys, source) -> str:
    """The prefix before the T5 keys, e.g. "text_encoders.t5xxl.transformer." in an all-in-one checkpoint."""
    found = sorted(k[: -len(ANCHOR)] for k in keys if k == ANCHOR or k.endswith("." + ANCHOR))
    if not found:
        raise WeightsError(f"{source}: not a T5 encoder: no key {ANCHOR!r} (keys look like {sorted(keys)[:3]})")
    return found[0]


def read_params(path: Path, shapes: dict, prefix: str = "") -> T5Params:
    """The config from a config.json next to the weights, else read off the tensor shapes.

    Shapes give every size; the two numbers they cannot give (max distance, eps) are T5-XXL's.
    """
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{config_file}: not valid json: {e}") from None
        kind = (config.get("model_type", "t5"), config.get("feed_forward_proj", "gated-gelu"))
        if kind != ("t5", "gated-gelu"):
            raise WeightsError(f"{config_file}: model_type, feed_forward_proj = {kind}; T5 v1.1 has t5, gated-gelu")
        names = {f.name for f in dataclasses.fields(T5Params)}
        return dataclasses.replace(T5_XXL, **{k: v for k, v in config.items() if k in names})
    attention = "encoder.block.0.layer.0.SelfAttention."
    try:
        vocab_size, d_model = shapes["shared.weight"][0]  # [32128, 4096]
        num_buckets, num_heads = shapes[attention + "relative_attention_bias.weight"][0]  # [32, 64]
        inner = shapes[attention + "q.weight"][0][0]  # 64 heads × 64
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0][0]  # 10240
    except KeyError as e:
        raise WeightsError(f"{path}: missing key {prefix + e.args[0]!r}, needed to read the T5 sizes") from None
    return dataclasses.replace(
        T5_XXL,
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=d_ff,
        num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
    )


@dataclass
class T5Embedder:
    """What load_t5 returns: the encoder, its tokenizer (None when none was found), and prompts → hidden."""

    model: T5Encoder
    tokenizer: T5Tokenizer | None
    source: str = ""

    @torch.no_grad()
    def __call__(self, prompts: str | list[str]) -> Tensor:
        if self.tokenizer is None:
            raise WeightsError(
                f"{self.source}: no T5 tokenizer was found next to these weights (a tokenizer_2/ folder with "
                "tokenizer.json or spiece.model); set .tokenizer = T5Tokenizer(folder), or call .model(ids)"
            )
        ids = self.tokenizer(prompts).to(self.model.shared.weight.device)
        return self.model(ids)  # [B, 512, 4096]


def load_t5(path, max_length: int = 512, device="cpu", dtype: torch.dtype | None = None) -> T5Embedder:
    """Load a T5 encoder from a `text_encoder_2/` folder (config.json + shards) or a single .safetensors file.

    Single files may carry a prefix (stripped) or a decoder too (dropped: only the encoder is read). The
    weights keep their stored dtype unless `dtype` is given; fp8 files become bf16. In float16 the MLP
    output projections `wo` are kept in float32, as transformers does: T5 v1.1 overflows float16 there.
    The tokenizer comes from a sibling `tokenizer_2/` folder, or the weights' own folder.
    """
    path = Path(path)
    shapes = read_shapes(path)
    prefix = find_prefix(shapes, path)
    shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    # The embedding is tied: files hold it as shared.weight, encoder.embed_tokens.weight, or both.
    tied = ["shared.weight", "encoder.embed_tokens.weight"]
    if tied[0] not in shapes and tied[1] in shapes:
        shapes[tied[0]] = shapes[tied[1]]
    params = read_params(path, shapes, prefix)

    def is_encoder_key(key: str) -> bool:  # drops the decoder, lm_head and anything outside the prefix
        key = key[len(prefix) :] if key.startswith(prefix) else ""
        return key in tied or key.startswith("encoder.")

    sd = {k[len(prefix) :]: t for k, t in read_state_dict(path, dtype, select=is_encoder_key).items()}
    embedding = sd.get(tied[0], sd.get(tied[1]))
    if embedding is not None:  # the model lists it under both keys, as one module
        sd[tied[0]] = sd[tied[1]] = embedding
    # One dtype for the whole model: `dtype`, else the one the linear weights are stored in (files mix
    # dtypes, e.g. scaled fp8 linears, read as bf16, next to fp16 or fp32 norms).
    q = sd.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    model_dtype = dtype or (q.dtype if q is not None else None)
    sd = {k: t.to(model_dtype or t.dtype) for k, t in sd.items()}
    # T5 v1.1 overflows float16 in the MLP output; transformers keeps `wo` in float32 there, and so do we.
    if model_dtype == torch.float16:
        sd = {k: t.float() if k.endswith("DenseReluDense.wo.weight") else t for k, t in sd.items()}

    with torch.device("meta"):
        model = T5Encoder(params)
    load_into(model, sd, path, "T5 encoder")
    model = model.to(device).eval()

    tokenizer = None
    for folder in (path.parent / "tokenizer_2", path if path.is_dir() else path.parent):
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            tokenizer = T5Tokenizer(folder, max_length)
            break
    return T5Embedder(model, tokenizer, str(path))


# --- building a small vocabulary (for models trained from scratch) ------------------------------------


def write_t5_tokenizer(folder, text: str, vocab_size: int = 256, model_type: str = "unigram") -> Path:
    """A tokenizer_2/ folder with a sentencepiece model learned on `text`, with T5's special ids: <pad> 0,
    </s> 1, <unk> 2, no <s>. Read by T5Tokenizer exactly like the official spiece.model. T5's own is a
    unigram model; on a few dozen distinct sentences "bpe" learns whole words where unigram stays near letters."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_prefix=str(folder / "spiece"),
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small text may not support vocab_size pieces: take what it supports
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()  # a human-readable copy; the .model file is all T5Tokenizer reads
    return folder
