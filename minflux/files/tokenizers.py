"""The tokenizers FLUX uses, read from their official folders, and small vocabularies built from a text.

    CLIPTokenizer   tokenizer/   (vocab.json + merges.txt): byte-level BPE, 77 ids, <|startoftext|> … <|endoftext|>
    T5Tokenizer     tokenizer_2/ (tokenizer.json or spiece.model): sentencepiece pieces, </s>, <pad> up to 512
    ChatTokenizer   FLUX.2's tokenizer/ (tokenizer.json): the prompt in Qwen3's or Mistral's chat template, 512
                    ids and an attention mask

The embedded default has no official vocabulary, so `write_clip_tokenizer`, `write_t5_tokenizer` and
`write_qwen3_tokenizer` learn one from its captions and write it in the official formats, which these classes then
read like the official files.

References: openai/CLIP (clip/simple_tokenizer.py); transformers (tokenization_clip.py, tokenization_t5.py);
diffusers FluxPipeline (padding="max_length" to 77 and to 512, truncation); for FLUX.2, Qwen3's and
Mistral-Small-3.1's chat templates (their tokenizer_config.json / chat_template.json), black-forest-labs/flux2
(text_encoder.py), diffusers Flux2KleinPipeline._get_qwen3_prompt_embeds and Flux2Pipeline.format_input.
"""

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import tokenizers
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from torch import Tensor

from minflux.files import warn_caller
from minflux.files.weights import WeightsError
from minflux.hooks import stage

# --- CLIP ------------------------------------------------------------------------------------------------

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
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()  # only for the truncation warning
        # A special token written in a prompt is that one token: "<|endoftext|>" is id 49407, not 13 characters.
        # As in transformers this holds for the pad token too, so with SD 2's pad "!", "wow!!" ends in two pad ids.
        tok.add_special_tokens([AddedToken(token, special=True) for token in dict.fromkeys(special.values())])
        self.tokenizer = tok

    @stage
    def __call__(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2  # 75 prompt tokens between the start and end tokens
        rows = []
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            ids = encoding.ids
            if len(ids) > room:
                dropped = self.tokenizer.decode(ids[room:]).replace("</w>", " ").strip()
                warn_caller(
                    f"CLIP prompt {i} is {len(ids)} tokens long, the context holds {room}: "
                    f"{len(ids) - room} tokens dropped: {dropped!r}"
                )
                ids = ids[:room]
            ids = [self.bos_id, *ids, self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)  # [B, 77]


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


def write_clip_tokenizer(folder, text: str, num_merges: int = 300, pad_token: str = EOS, configs: bool = True) -> Path:
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


# --- T5 ------------------------------------------------------------------------------------------------

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

    @stage
    def __call__(self, prompts: str | list[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > self.max_length - 1:
                dropped = len(ids) - (self.max_length - 1)
                warn_caller(f"T5 prompt of {len(ids) + 1} tokens truncated to {self.max_length}: {dropped} dropped")
                ids = ids[: self.max_length - 1]
            ids = ids + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # [B, 512]


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


# --- FLUX.2: the language models' chat templates ---------------------------------------------------------

# FLUX.2 [dev]'s system message (black-forest-labs/flux2 src/flux2/system_messages.py; the same in diffusers'
# pipelines/flux2/system_messages.py). The line break inside it is part of the text the model was trained on.
FLUX2_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)


def qwen3_chat(prompt: str) -> str:
    """The text Qwen3's chat template makes of one user message with the generation prompt and thinking off
    (apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)): the user's turn, then the
    assistant's turn opened with an empty thinking block."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def mistral_chat(prompt: str, system: str = FLUX2_SYSTEM_MESSAGE) -> str:
    """The text Mistral-Small-3.x's chat template makes of FLUX.2 [dev]'s conversation, a system message and a
    user message: <s>, the system prompt, the instruction; no generation prompt. "[IMG]" is first taken out of the
    prompt, as FLUX.2's format_input does (an image placeholder with no image)."""
    return f"<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt.replace('[IMG]', '')}[/INST]"


@dataclass(frozen=True)
class ChatFamily:
    chat: Callable[[str], str]  # prompt → the chat template's text
    add_special_tokens: bool  # let tokenizer.json's post-processor add its tokens (Qwen's adds none)
    pad_token: str  # unless tokenizer_config.json names another
    padding_side: str  # unless tokenizer_config.json says otherwise
    markers: tuple[str, ...]  # tokens the template needs as single ids: missing ones mean another tokenizer


CHAT_FAMILIES = {
    # klein: Qwen2TokenizerFast on apply_chat_template's text; it pads on the right (the transformers default)
    "qwen3": ChatFamily(qwen3_chat, True, "<|endoftext|>", "right", ("<|im_start|>", "<|im_end|>", "<think>")),
    # dev: the processor's apply_chat_template; Mistral's (Llama) tokenizer class pads on the left, and the template
    # writes <s> itself, so the tokenizer adds nothing
    "mistral": ChatFamily(mistral_chat, False, "<pad>", "left", ("<s>", "[INST]", "[SYSTEM_PROMPT]")),
}


# Qwen2's pre-tokenizer pattern (transformers' tokenization_qwen2.py, and Qwen3's tokenizer.json): contractions,
# a run of letters with one character before it (the space), single digits, punctuation, line breaks, spaces.
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The parts of Qwen3's chat template (Qwen/Qwen3-4B tokenizer_config.json) that system and user messages and the
# generation prompt go through; the assistant, tool-call and tool-response branches are left out. qwen3_chat is
# its result for FLUX.2's one user message; the template is written into tokenizer_config.json for transformers.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def write_qwen3_tokenizer(folder, text: str, vocab_size: int = 600) -> Path:
    """A tokenizer/ folder as FLUX.2 [klein]'s (Qwen3's) has it, with a byte-level BPE learned on the lines of `text`:
    tokenizer.json (NFC, Qwen's split, at most `vocab_size` tokens; then <|endoftext|>, <|im_start|>, <|im_end|>
    as special tokens and <think>, </think> as added ones, as in Qwen3's) and a tokenizer_config.json as Qwen3's,
    with the chat template. Read by ChatTokenizer, and by transformers' Qwen2TokenizerFast, like the official one.
    Every byte is a token, so no text is unknown; an empty `text` gives the 256 bytes alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>")])
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(folder / "tokenizer.json"))
    added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    config = {
        "added_tokens_decoder": {str(t.pop("id")): t for t in added},
        "bos_token": None,
        "chat_template": QWEN3_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json as a dict, {} if the folder has none."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{file}: not valid json: {e}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{file}: expected a json object, found {type(config).__name__}")
    return config


class ChatTokenizer:
    """Prompts → (ids, mask), each [B, max_length]: every prompt in its language model's chat template, tokenized,
    cut to max_length and padded, as FLUX.2's pipelines do before the text encoder. mask: 1 = a token, 0 = padding.

    family "qwen3" (klein: Qwen3-4B / 8B, right padding with <|endoftext|>) or "mistral" (dev: Mistral-Small-3.2,
    left padding with <pad>). Reads `tokenizer.json` from the `tokenizer/` folder with the `tokenizers` package,
    and the pad token and side from its tokenizer_config.json when it names them. A text longer than max_length
    loses its end, the closing template tokens included (a warning says how much), as in the pipelines.
    """

    def __init__(self, folder, family: str = "qwen3", max_length: int = 512):
        folder = Path(folder)
        if family not in CHAT_FAMILIES:
            raise ValueError(f"family {family!r}: expected one of {', '.join(CHAT_FAMILIES)}")
        file = folder / "tokenizer.json"
        if not file.is_file():
            where = "no such folder" if not folder.is_dir() else "no tokenizer.json in it"
            raise WeightsError(f"{folder}: {where} (expected a {family} tokenizer/ folder with tokenizer.json)")
        try:
            self.backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise WeightsError(f"{file}: not a tokenizers file: {e}") from None
        self.backend.no_truncation()  # cut and padded below, in plain sight
        self.backend.no_padding()
        self.family, self.max_length = family, max_length
        spec = CHAT_FAMILIES[family]
        self.chat, self.add_special_tokens = spec.chat, spec.add_special_tokens
        missing = [t for t in spec.markers if self.backend.token_to_id(t) is None]
        if missing:
            raise WeightsError(f"{file}: no {', '.join(missing)} token: not a {family} tokenizer")

        config = read_tokenizer_config(folder)
        pad_token = config.get("pad_token") or spec.pad_token
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
        self.pad_id = self.backend.token_to_id(pad_token) if isinstance(pad_token, str) else None
        if self.pad_id is None:
            raise WeightsError(f"{file}: the pad token {pad_token!r} is not in the vocabulary")
        self.padding_side = config.get("padding_side", spec.padding_side)
        if self.padding_side not in ("left", "right"):
            raise WeightsError(f"{folder / 'tokenizer_config.json'}: padding_side {self.padding_side!r}")

    @stage
    def __call__(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [self.chat(prompt) for prompt in prompts]
        encodings = self.backend.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)  # [B, 512]
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for i, encoding in enumerate(encodings):
            row = encoding.ids
            if len(row) > self.max_length:
                warn_caller(
                    f"{self.family} prompt {i} is {len(row)} tokens long in its chat template, the context holds "
                    f"{self.max_length}: the last {len(row) - self.max_length} dropped"
                )
                row = row[: self.max_length]
            start = self.max_length - len(row) if self.padding_side == "left" else 0
            ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, start : start + len(row)] = 1
        return ids, mask
