"""CLIP-L's text tower and its tokenizer: the pooled prompt vector `y` [B, 768] that FLUX adds to its time embedding.

A prompt becomes 77 token ids, then 77 hidden states, and FLUX keeps one of them:

    "a photo of a cat"  --CLIPTokenizer-->  ids [B, 77]  <|startoftext|> a photo of a cat <|endoftext|> pad ...
    token + position embeddings                    [B, 77, 768]
    12 × pre-LN transformer layer, causal attention, quick-GELU MLP
    final LayerNorm                                hidden [B, 77, 768]
    the state at the first <|endoftext|> token     pooled [B, 768]

The attention is causal, so the state at the end token has read the whole prompt and nothing after it: that
is why it serves as the summary. FLUX uses only `pooled` (T5 supplies the per-token context).

Module and parameter names are the keys of the official files (`text_model.*`), so FLUX.1's `text_encoder/`
folder and the common single file `clip_l.safetensors` load with no mapping table. The prefixes other tools add
(or, for transformers >= 5, take away) are listed in one place, `KEY_PREFIXES`.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
openai/CLIP (clip/model.py, clip/simple_tokenizer.py); transformers (models/clip/modeling_clip.py,
tokenization_clip.py); diffusers FluxPipeline (_get_clip_prompt_embeds: padding to 77, pooler_output).
"""

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor, nn

from minflux.weights import WeightsError, load_into, read_shapes, read_state_dict


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


# --- the tokenizer -----------------------------------------------------------------------------------

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py): the special tokens, English contractions,
# runs of letters, single digits, and runs of anything else that is not a space. Spaces are dropped.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings: CLIP's defaults, then tokenizer_config.json, then special_tokens_map.json."""
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the later file wins, as in transformers
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise WeightsError(f"{file}: not valid json: {e}") from None
        for key in special:
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
    return special


class CLIPTokenizer:
    """CLIP's byte-level BPE, from the official `tokenizer/` folder (vocab.json + merges.txt).

    tok(["a prompt", ...]) → LongTensor [B, 77]: <|startoftext|>, at most 75 prompt tokens, <|endoftext|>, then
    padding up to 77, as FLUX's pipeline asks (padding="max_length", max_length=77, truncation=True). The pad
    token is the folder's: <|endoftext|> for FLUX.1 (and SD 1.x); SD 2.x's folders say "!".

    Like transformers' CLIPTokenizer (the tokenizers-backed one), it skips OpenAI's ftfy / HTML-unescape
    clean-up: "&amp;" stays five characters.
    """

    def __init__(self, folder, max_length: int = 77):
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for file in (vocab_file, merges_file):
            if not file.is_file():
                raise WeightsError(f"{file}: missing; a CLIP tokenizer folder needs vocab.json and merges.txt")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))  # {"a</w>": 320, ...}
        except json.JSONDecodeError as e:
            raise WeightsError(f"{vocab_file}: not valid json: {e}") from None
        # merges.txt: a "#version" line, then one merge per line, "t h" means: join t and h into th.
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if bad is not None:
            raise WeightsError(f"{merges_file}: merge {bad} is {' '.join(merges[bad])!r}, expected two symbols")

        special = _special_tokens(folder)
        for key in ("bos_token", "eos_token", "pad_token"):
            if special[key] not in vocab:
                raise WeightsError(f"{vocab_file}: the {key} {special[key]!r} is not in the vocabulary")
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = (vocab[special[k]] for k in ("bos_token", "eos_token", "pad_token"))

        # The last piece of every word carries "</w>", so "cat" at the end of a word ("cat</w>") and inside one
        # ("cat" in "cats") are different tokens. Every byte has a symbol, so no text is ever unknown.
        bpe = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=special["unk_token"])
        tok = Tokenizer(bpe)
        # Compose accents (NFC), squeeze every run of whitespace to one space, lower-case.
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        # Keep the pattern's matches, drop what lies between them (the spaces); then map each UTF-8 byte to a
        # printable character (GPT-2's byte-to-unicode table), the alphabet that vocab.json is written in.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()  # only for the truncation warning
        # A special token written in a prompt is that one token: "<|endoftext|>" is id 49407, not 13 characters.
        # As in transformers this holds for the pad token too, so with SD 2's pad "!", "wow!!" ends in two pad ids.
        tok.add_special_tokens([AddedToken(token, special=True) for token in dict.fromkeys(special.values())])
        self.tokenizer = tok

    def __call__(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2  # 75 prompt tokens between the start and end tokens
        rows = []
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            ids = encoding.ids
            if len(ids) > room:
                dropped = self.tokenizer.decode(ids[room:]).replace("</w>", " ").strip()
                warnings.warn(f"CLIP prompt {i} is {len(ids)} tokens long, the context holds {room}: "
                              f"{len(ids) - room} tokens dropped: {dropped!r}", stacklevel=2)
                ids = ids[:room]
            ids = [self.bos_id, *ids, self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)  # [B, 77]


# --- loading -----------------------------------------------------------------------------------------

# What stands in front of the text tower's own names (embeddings.*, encoder.*, final_layer_norm.*) in the files
# other tools write, tried in this order. Data, in one place; every key is renamed to "text_model." + own name.
KEY_PREFIXES = (
    "text_model.",  # the official layout: FLUX.1 text_encoder/, clip_l.safetensors, a full CLIP model
    "",  # transformers >= 5 drops "text_model." when it saves a CLIPTextModel
    "cond_stage_model.transformer.text_model.",  # Stable Diffusion 1.x full checkpoints
    "text_encoders.clip_l.transformer.text_model.",  # ComfyUI all-in-one checkpoints (SD3.5, FLUX)
    "conditioner.embedders.0.transformer.text_model.",  # SDXL full checkpoints (CLIP-L is embedder 0)
)
TOWER = ("embeddings.", "encoder.", "final_layer_norm.")
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"

# config.json name → CLIPParams field, where they differ.
CONFIG_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}


def _find_prefix(path, keys) -> str:
    for prefix in KEY_PREFIXES:
        if prefix + "embeddings.token_embedding.weight" in keys:
            return prefix
    raise WeightsError(
        f"{path}: no CLIP text model in these weights: no key {TOKEN_EMBEDDING!r}, with or without the prefixes "
        f"{', '.join(repr(p[: -len('text_model.')]) for p in KEY_PREFIXES[2:])}; found e.g. {', '.join(list(keys)[:3])}"
    )


def _official_name(key: str, prefix: str) -> str | None:
    """The official name of a file's key ("text_model.encoder.…"), or None for what is not the text tower: a
    vision tower, the projections, logit_scale, the position_ids buffer of older files, other models' weights."""
    rest = key[len(prefix):]
    if key.startswith(prefix) and rest.startswith(TOWER) and not rest.endswith("position_ids"):
        return "text_model." + rest
    return None


def _params_from_shapes(shapes: dict) -> CLIPParams:
    """The sizes a checkpoint fixes; the rest (activation, eps, eos rule) from CLIP_L. Head dim is 64 in every CLIP."""
    vocab_size, hidden_size = shapes[TOKEN_EMBEDDING][0]
    layers = [int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers.")]
    fc1 = [shape[0] for k, (shape, _) in shapes.items() if k.endswith("mlp.fc1.weight")]
    positions = shapes.get("text_model.embeddings.position_embedding.weight")
    return CLIPParams(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=fc1[0] if fc1 else CLIP_L.intermediate_size,
        num_layers=max(layers) + 1 if layers else 0,
        num_heads=max(1, hidden_size // 64),
        max_position_embeddings=positions[0][0] if positions else CLIP_L.max_position_embeddings,
        layer_norm_eps=CLIP_L.layer_norm_eps,
        hidden_act=CLIP_L.hidden_act,
        eos_token_id=CLIP_L.eos_token_id,
    )


def _params_from_config(file: Path, params: CLIPParams) -> CLIPParams:
    """`params` with the fields that config.json (or its "text_config", for a full CLIP) sets."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{file}: not valid json: {e}") from None
    config = config.get("text_config") or config
    values = {f.name: config.get(CONFIG_NAMES.get(f.name, f.name)) for f in fields(CLIPParams)}
    return CLIPParams(**{name: getattr(params, name) if v is None else v for name, v in values.items()})


def _find_tokenizer(path: Path) -> "CLIPTokenizer | None":
    """The tokenizer folder that ships with these weights: the same folder, a tokenizer/ inside it, or, for the
    diffusers layout, the tokenizer/ next to text_encoder/. None if there is none."""
    home = path if path.is_dir() else path.parent
    candidates = [home, home / "tokenizer"]
    if home.name == "text_encoder":
        candidates.append(home.parent / "tokenizer")
    for folder in candidates:
        if (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
            return CLIPTokenizer(folder)  # a half-present folder raises here, naming the missing file
    return None


class CLIPEmbedder:
    """The loaded CLIP: `.model` (CLIPTextModel), `.tokenizer` (CLIPTokenizer or None); called on prompts it gives
    the pooled vector FLUX conditions on. The encoder is frozen in FLUX, so the call runs without gradients."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer | None, source=None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        if self.tokenizer is None:
            raise WeightsError(
                f"{self.source}: no CLIP tokenizer was found next to these weights (vocab.json + merges.txt in the "
                "same folder, or a tokenizer/ folder); set .tokenizer = CLIPTokenizer(folder), or call .model(ids)"
            )
        ids = self.tokenizer(prompts).to(self.model.text_model.embeddings.token_embedding.weight.device)
        _, pooled = self.model(ids)
        return pooled  # [B, 768]


def load_clip(path, device="cpu", dtype: torch.dtype | None = None) -> CLIPEmbedder:
    """CLIP's text tower from a `text_encoder/` folder (config.json + safetensors, one file or shards) or one file.

    Only the `text_model.*` keys are kept: a full CLIP's vision tower, projections and logit scale are left in
    the file, as are the `position_ids` buffers of older files. With dtype None the file's dtype is kept
    (fp8 storage becomes bf16).
    """
    path = Path(path)
    shapes = read_shapes(path)
    prefix = _find_prefix(path, shapes)
    shapes = {name: shape for key, shape in shapes.items() if (name := _official_name(key, prefix))}
    params = _params_from_shapes(shapes)
    if path.is_dir() and (path / "config.json").is_file():
        params = _params_from_config(path / "config.json", params)

    sd = read_state_dict(path, dtype, select=lambda key: _official_name(key, prefix) is not None)
    sd = {_official_name(key, prefix): t for key, t in sd.items()}
    dtype = dtype or sd[TOKEN_EMBEDDING].dtype
    sd = {k: t.to(dtype) for k, t in sd.items()}  # one dtype for all, should a file mix them

    with torch.device("meta"):
        model = CLIPTextModel(params)
    load_into(model, sd, path, what="CLIP text model")
    return CLIPEmbedder(model.to(device).eval(), _find_tokenizer(path), source=path)


# --- building a small vocabulary (for models trained from scratch, and for tests) ------------------------
# The official vocabulary (49408 entries) is: the 256 byte symbols, the same 256 with "</w>" (end of word), one
# entry per BPE merge, then <|startoftext|> and <|endoftext|>. These functions write a folder in that format
# with merges learned on a given text, read by CLIPTokenizer exactly like the official one.

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's table: byte → a printable character, in vocabulary order. The printable bytes come first and
    stand for themselves ("!" is id 0); the others (control characters, space, ...) get U+0100, U+0101, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def train_clip_bpe(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's layout, the merges learned greedily (most frequent pair first) on `text`."""
    byte_symbol = bytes_to_unicode()
    symbols = list(byte_symbol.values())
    words = Counter()
    for word in re.findall(r"\w+|[^\w\s]+", text.lower()):
        pieces = [byte_symbol[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        words[tuple(pieces)] += 1

    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties broken by the pair, deterministic
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged

    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_clip_tokenizer(
    folder, text: str, num_merges: int = 300, pad_token: str = EOS, configs: bool = True
) -> Path:
    """A CLIP tokenizer folder as FLUX.1's tokenizer/ has it, with merges learned on `text`: vocab.json,
    merges.txt, and (with `configs`) tokenizer_config.json + special_tokens_map.json naming the special tokens.

    The embedded default builds its tokenizer this way from the dataset's captions; the tests, from a corpus."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_clip_bpe(text, num_merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if configs:
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
        config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return folder
