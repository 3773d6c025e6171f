"""Loading FLUX.2's text encoders, language models read as encoders, with the tokenizer beside them.

    load_qwen3    FLUX.2 [klein]: a text_encoder/ folder (Qwen3ForCausalLM: config.json + shards + index)
    load_mistral  FLUX.2 [dev]: a text_encoder/ folder (Mistral3ForConditionalGeneration: its language model;
                  the vision tower, the projector and the LM head stay in the files)

Both return an LLMEmbedder: `.model` is a minflux.qwen3.Qwen3, `.tokenizer` the ChatTokenizer of the sibling
tokenizer/ folder, and `embedder(prompts)` gives FLUX.2's text input, the chosen hidden states side by side
([B, 512, 7680] for klein 4B). Only the layers up to the deepest one read are built and loaded: 27 of Qwen3's 36,
30 of Mistral's 40. The sizes come from config.json (a Mistral3 config's text_config), or, for a single file without
one, from the preset whose shapes the file has. Every failure raises WeightsError naming the file and what was
expected.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minflux.files.weights import read_json
from minflux.files.tokenizers import ChatTokenizer
from minflux.files.weights import WeightsError, layers_agree, load_into, numbered, read_shapes, read_state_dict
from minflux.files.weights import sizes_of
from minflux.qwen3 import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, Qwen3, Qwen3Params

QWEN3_LAYERS = (9, 18, 27)  # klein: diffusers' text_encoder_out_layers
MISTRAL_LAYERS = (10, 20, 30)  # dev: the official OUTPUT_LAYERS

# Where a file holds the language model: Qwen3ForCausalLM / MistralForCausalLM ("model."), Mistral3 as transformers
# saves it since 4.52 ("model.language_model.") and before ("language_model.model."), a bare Qwen3Model ("").
LLM_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
ANCHOR = "embed_tokens.weight"

FAMILIES = {  # family → model_type in config.json, the presets, the name in messages
    "qwen3": (("qwen3",), (QWEN3_4B, QWEN3_8B), "Qwen3 text encoder"),
    "mistral": (("mistral",), (MISTRAL_SMALL_3_2,), "Mistral text encoder"),
}

# the sizes config.json must give: Qwen3Params' field → config.json's name
CONFIG_SIZES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def find_prefix(shapes: dict, source, family: str) -> str:
    for prefix in LLM_PREFIXES:
        if prefix + ANCHOR in shapes:
            return prefix
    raise WeightsError(
        f"{source}: not a {FAMILIES[family][2]}: no key {ANCHOR!r} under any of the prefixes "
        f"{', '.join(repr(p) for p in LLM_PREFIXES)} (first keys: {', '.join(list(shapes)[:3]) or 'none'})"
    )


def params_from_config(file: Path, family: str) -> Qwen3Params:
    """Qwen3Params from a config.json: Qwen3's / Mistral's own, or the text_config of a Mistral3 (VLM) config."""
    config = read_json(file)
    text = config.get("text_config") or config
    model_types, _, what = FAMILIES[family]
    if text.get("model_type") not in model_types:
        found = config.get("model_type"), text.get("model_type")
        raise WeightsError(f"{file}: model_type {found[1] or found[0]!r}, expected {' or '.join(model_types)} ({what})")
    # transformers 5 writes rope_parameters {rope_type, rope_theta}; earlier versions rope_theta and rope_scaling
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    unsupported = {
        "rope_type": rope.get("rope_type", rope.get("type", "default")) != "default",
        "hidden_act": text.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(text.get("attention_bias")),
        "use_sliding_window": bool(text.get("use_sliding_window")),  # Qwen3's, on only some layers
    }
    if any(unsupported.values()):
        shown = ", ".join(f"{k}={text.get(k, rope.get(k))!r}" for k, bad in unsupported.items() if bad)
        raise WeightsError(f"{file}: {shown}: not the {what} FLUX.2 uses (default RoPE, silu, no bias)")
    try:
        values = {field: text[name] for field, name in CONFIG_SIZES.items()}
    except KeyError as e:
        raise WeightsError(f"{file}: no {e.args[0]!r}, needed to build the {what}") from None
    # the defaults of transformers' config classes where a file leaves a value out
    default_head_dim = 128 if family == "qwen3" else values["hidden_size"] // values["num_heads"]
    return Qwen3Params(
        **values,
        head_dim=text.get("head_dim") or default_head_dim,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
        qk_norm=family == "qwen3",
        sliding_window=text.get("sliding_window") if family == "mistral" else None,  # Mistral's: all layers
    )


def params_from_shapes(shapes: dict, source, family: str) -> Qwen3Params:
    """The preset with these shapes (a single file comes without config.json)."""
    _, presets, what = FAMILIES[family]
    vocab_size, hidden_size = shapes[ANCHOR]
    num_layers = numbered(shapes, "layers.", source)
    for preset in presets:
        if (preset.vocab_size, preset.hidden_size, preset.num_layers) == (vocab_size, hidden_size, num_layers):
            return preset
    raise WeightsError(
        f"{source}: no config.json beside it, and its shapes (vocab {vocab_size}, hidden {hidden_size}, "
        f"{num_layers} layers) are those of no {what} preset; put the model's config.json beside it"
    )


def find_tokenizer(path: Path, family: str, max_length: int) -> ChatTokenizer | None:
    """The tokenizer that ships with the weights: in the same folder, a tokenizer/ inside it, or, for the FLUX.2 repo
    layout, the tokenizer/ beside text_encoder/. None if there is none."""
    home = path if path.is_dir() else path.parent
    candidates = [home, home / "tokenizer"] + ([home.parent / "tokenizer"] if home.name == "text_encoder" else [])
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return ChatTokenizer(folder, family, max_length)
    return None


@dataclass
class LLMEmbedder:
    """What load_qwen3 / load_mistral return: the model, its tokenizer (None when none was found), the hidden states
    read, and prompts → FLUX.2's text input. The encoder is frozen in FLUX.2, so the call runs without gradients."""

    model: Qwen3
    tokenizer: ChatTokenizer | None
    layers: tuple[int, ...]
    source: str = ""

    @torch.no_grad()
    def __call__(self, prompts: str | list[str]) -> Tensor:
        if self.tokenizer is None:
            raise WeightsError(
                f"{self.source}: no tokenizer was found next to these weights (a tokenizer/ folder with "
                "tokenizer.json); set .tokenizer = ChatTokenizer(folder, family), or call .model(ids, mask, layers)"
            )
        ids, mask = self.tokenizer(prompts)  # [B, 512] each
        device = self.model.model.embed_tokens.weight.device
        return self.model(ids.to(device), mask.to(device), self.layers)  # [B, 512, 3 · hidden]


def llm_params(path, family: str) -> tuple[Qwen3Params, str]:
    """The sizes of the language model of `family` behind `path` and the prefix of its keys, from config.json (or
    the preset of its shapes) and the file headers: nothing is loaded. WeightsError if it is another family's."""
    path = Path(path)
    what = FAMILIES[family][2]
    shapes = read_shapes(path)
    prefix = find_prefix(shapes, path, family)
    shapes = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    with sizes_of(path, what):
        if config_file.is_file():
            params = params_from_config(config_file, family)
        else:
            params = params_from_shapes({k: s for k, (s, _) in shapes.items()}, path, family)
    layers_agree(params.num_layers, numbered(shapes, "layers.", path), config_file if config_file.is_file() else path)
    return params, prefix


def load_llm(path, family: str, device="cpu", dtype=None, layers=QWEN3_LAYERS, max_length=512) -> LLMEmbedder:
    """The language model of `family` ("qwen3" or "mistral") from a text_encoder/ folder or a single file, built
    and loaded up to the deepest of `layers`; see load_qwen3. dtype None keeps the stored dtype (fp8 becomes bf16)."""
    path = Path(path)
    what = FAMILIES[family][2]
    params, prefix = llm_params(path, family)
    layers = tuple(layers)
    if not layers or not all(isinstance(k, int) and 0 <= k <= params.num_layers for k in layers):
        raise ValueError(f"layers {layers}: hidden states 0 … {params.num_layers} of the {what} ({path})")
    depth = max(layers)

    def wanted(key: str) -> bool:  # the embedding, the final norm, the layers up to `depth`; nothing else
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is None or not name.startswith("layers."):
            return name in (ANCHOR, "norm.weight")
        index = name.split(".")[1]
        return index.isdigit() and int(index) < depth

    sd = {"model." + k[len(prefix) :]: t for k, t in read_state_dict(path, dtype, select=wanted).items()}
    model_dtype = dtype or sd["model." + ANCHOR].dtype
    sd = {k: t.to(model_dtype) for k, t in sd.items()}  # one dtype for all, should a file mix them
    with torch.device("meta"), sizes_of(path, what):
        model = Qwen3(params, depth=depth)
    load_into(model, sd, path, what=f"{what} (layers 1 … {depth} of {params.num_layers})")
    return LLMEmbedder(model.to(device).eval(), find_tokenizer(path, family, max_length), layers, str(path))


def load_qwen3(path, device="cpu", dtype=None, layers=QWEN3_LAYERS, max_length=512) -> LLMEmbedder:
    """FLUX.2 [klein]'s text encoder (Qwen3-4B or Qwen3-8B) from its text_encoder/ folder, the tokenizer from the
    tokenizer/ folder beside it: embedder(prompts) → [B, 512, 3 · hidden] (7680 for 4B, 12288 for 9B)."""
    return load_llm(path, "qwen3", device, dtype, layers, max_length)


def load_mistral(path, device="cpu", dtype=None, layers=MISTRAL_LAYERS, max_length=512) -> LLMEmbedder:
    """FLUX.2 [dev]'s text encoder (Mistral-Small-3.2-24B's language model) from its text_encoder/ folder, the
    tokenizer from tokenizer/ beside it: embedder(prompts) → [B, 512, 15360]."""
    return load_llm(path, "mistral", device, dtype, layers, max_length)
