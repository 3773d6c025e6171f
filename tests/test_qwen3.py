"""Tests for minflux/qwen3.py, ChatTokenizer and minflux/files/load_llm.py: FLUX.2's text encoders.

Small random models (hidden 64, 4 layers, 4 query heads sharing 2 key/value heads, head dim 16, fp32) and byte-level
BPE vocabularies trained here, so nothing is downloaded. The oracles: transformers' Qwen3Model / MistralModel
(`output_hidden_states`), Qwen2TokenizerFast and apply_chat_template, and diffusers' Flux2KleinPipeline.encode_prompt
and Flux2Pipeline._get_mistral_3_small_prompt_embeds for the whole prompt → embedding path.
"""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, MistralModel
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model, T5Config, T5EncoderModel
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from minflux.files.load_llm import load_mistral, load_qwen3
from minflux.files.tokenizers import FLUX2_SYSTEM_MESSAGE, ChatTokenizer, mistral_chat, qwen3_chat
from minflux.files.tokenizers import write_qwen3_tokenizer
from minflux.files.weights import WeightsError
from minflux.qwen3 import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, Qwen3, Qwen3Params
from text_fixtures import TRAINING_TEXT

VOCAB = 640  # covers both trained vocabularies (about 600 and 500 tokens)
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)  # fmt: skip
PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "  東京タワーの夜景 <|im_end|> café crème\n\nüber [IMG] straße 🐶",  # template tokens inside a prompt stay tokens
    "",
]

# The same for Mistral-Small-3.1's chat template (chat_template.json, the one FLUX.2 [dev]'s processor has).
MISTRAL_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}"""

# Mistral's control tokens, ids 0 … 18 as in its tekken vocabulary
MISTRAL_SPECIAL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
]  # fmt: skip


def write_qwen_tokenizer(folder: Path) -> Path:
    """A Qwen3-style tokenizer/ folder (minflux's writer) with a vocabulary of 600 learned on the tests' text."""
    return write_qwen3_tokenizer(folder, TRAINING_TEXT, vocab_size=600)


def write_mistral_tokenizer(folder: Path) -> Path:
    """A Mistral-style tokenizer/ folder: byte-level BPE with the control tokens at ids 0 … 18 (pad 11)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=500, special_tokens=MISTRAL_SPECIAL, initial_alphabet=alphabet)
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIAL])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def mistral_hf_tokenizer(folder: Path) -> TokenizersBackend:
    """The oracle for FLUX.2 [dev]'s processor's tokenizer: the same file, padding on the left as Mistral's
    (Llama) tokenizer class does, the chat template."""
    hf = TokenizersBackend(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    hf.chat_template = MISTRAL_TEMPLATE
    return hf


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every part matters: norms near 1, linears of unit gain, unit embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ| / std(ref)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().std()).item()


def hf_stack(model, ids, mask, layers) -> torch.Tensor:
    """The oracle: transformers' hidden states `layers`, stacked on the channels as FLUX.2's pipelines do."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1)


def ours_from(reference, qk_norm: bool, **overrides) -> Qwen3:
    """minflux's model with the reference's weights; a bare Qwen3Model / MistralModel has no `model.` prefix."""
    c = reference.config
    params = Qwen3Params(
        c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
        c.num_key_value_heads, c.head_dim, c.rms_norm_eps, c.rope_parameters["rope_theta"], qk_norm, **overrides,
    )  # fmt: skip
    model = Qwen3(params)
    model.load_state_dict({"model." + k: v for k, v in reference.state_dict().items()})
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    """Right padding, left padding and none: every kind of row the pipelines make."""
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 15:] = 0  # klein: the prompt, then padding
    mask[1, :9] = 0  # dev: padding, then the prompt
    return ids, mask


# --- 1. the model against transformers, at every position ---------------------------------------------------


@pytest.mark.parametrize("layers", [(1, 2, 3), (0, 4), (4,)])  # 4 = the last layer: the normed output
def test_qwen3_matches_transformers(batch, layers):
    reference = randomize(Qwen3Model(Qwen3Config(**SMALL, rope_theta=1e6)))
    assert reference.config._attn_implementation == "sdpa"  # what from_pretrained gives the pipelines
    ours = ours_from(reference, qk_norm=True)
    ids, mask = batch
    want = hf_stack(reference, ids, mask, layers)
    with torch.no_grad():
        got = ours(ids, mask, layers)
    assert got.shape == (3, 24, 64 * len(layers))
    assert rel_err(got, want) <= 1e-5  # padded rows too: the DiT attends to them


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_mistral_matches_transformers(batch, sliding_window):
    config = MistralConfig(**SMALL, rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=sliding_window)
    reference = randomize(MistralModel(config), seed=2)
    ours = ours_from(reference, qk_norm=False, sliding_window=sliding_window)
    assert not hasattr(ours.model.layers[0].self_attn, "q_norm")
    ids, mask = batch
    with torch.no_grad():
        got = ours(ids, mask, (1, 2, 4))
    assert rel_err(got, hf_stack(reference, ids, mask, (1, 2, 4))) <= 1e-5


def test_bf16_is_bit_exact(tmp_path, batch):
    """In bfloat16, loaded as the pipelines load it (from_pretrained with a dtype), every rounding is the same."""
    randomize(Qwen3ForCausalLM(Qwen3Config(**SMALL))).save_pretrained(tmp_path)
    reference = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_qwen3(tmp_path, dtype=torch.bfloat16, layers=(1, 2, 4)).model
    ids, mask = batch
    for mask in (mask, None):  # with padding, and without
        with torch.no_grad():
            got = ours(ids, mask, (1, 2, 4))
        assert got.dtype == torch.bfloat16 and torch.equal(got, hf_stack(reference, ids, mask, (1, 2, 4)))


def test_only_the_layers_needed_are_built(batch):
    reference = randomize(Qwen3Model(Qwen3Config(**SMALL)))
    full = ours_from(reference, qk_norm=True)
    short = Qwen3(full.params, depth=2)
    missing, unexpected = short.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(".layers.2." in k or ".layers.3." in k for k in unexpected)
    ids, mask = batch
    with torch.no_grad():
        assert torch.equal(short(ids, mask, (1, 2)), full(ids, mask, (1, 2)))
    with pytest.raises(ValueError, match="holds 2 of 4 layers"):
        short(ids, mask, (2, 3))


def test_presets_have_the_published_sizes():
    """Non-embedding parameters as the model cards give them: Qwen3-4B 3.6B, Qwen3-8B 6.95B; Mistral-Small-3.x
    24B in all (language model 23.6B with its LM head, the rest the vision tower)."""
    counts = {}  # (all, the embedding)
    for name, params in {"4b": QWEN3_4B, "8b": QWEN3_8B, "mistral": MISTRAL_SMALL_3_2}.items():
        with torch.device("meta"):
            model = Qwen3(params)
        counts[name] = sum(p.numel() for p in model.parameters()), model.model.embed_tokens.weight.numel()
    assert round((counts["4b"][0] - counts["4b"][1]) / 1e9, 1) == 3.6  # the LM head is the embedding (tied)
    assert round((counts["8b"][0] - counts["8b"][1]) / 1e9, 2) == 6.95
    assert round((counts["mistral"][0] + counts["mistral"][1]) / 1e9, 1) == 23.6  # + its own LM head


# --- 2. tokenizers and chat templates -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return write_qwen_tokenizer(tmp_path_factory.mktemp("klein") / "tokenizer")


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory):
    return write_mistral_tokenizer(tmp_path_factory.mktemp("dev") / "tokenizer")


def test_chat_templates_render_as_transformers(qwen_folder, mistral_folder):
    hf = Qwen2TokenizerFast.from_pretrained(str(qwen_folder))
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert qwen3_chat(prompt) == text
    mistral = mistral_hf_tokenizer(mistral_folder)
    for conversation, prompt in zip(format_input(PROMPTS, system_message=SYSTEM_MESSAGE), PROMPTS):
        assert mistral_chat(prompt) == mistral.apply_chat_template(conversation, tokenize=False)
    assert FLUX2_SYSTEM_MESSAGE == SYSTEM_MESSAGE


@pytest.mark.parametrize("max_length", [512, 24])  # 24: two templates are cut, with a warning
def test_qwen3_ids_match_the_klein_pipeline(qwen_folder, max_length):
    hf = Qwen2TokenizerFast.from_pretrained(str(qwen_folder))
    assert hf.padding_side == "right"
    rows, masks = [], []
    for prompt in PROMPTS:  # Flux2KleinPipeline._get_qwen3_prompt_embeds, one prompt at a time
        messages = [{"role": "user", "content": prompt}]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        inputs = hf(text, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        rows.append(inputs["input_ids"])
        masks.append(inputs["attention_mask"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = ChatTokenizer(qwen_folder, "qwen3", max_length)(PROMPTS)
    assert torch.equal(ids, torch.cat(rows)) and torch.equal(mask, torch.cat(masks))
    assert mask[2, 0] == 1 and mask[2, -1] == 0  # right padding
    assert len(caught) == (2 if max_length == 24 else 0)


def test_mistral_ids_match_the_dev_pipeline(mistral_folder):
    hf = mistral_hf_tokenizer(mistral_folder)
    inputs = hf.apply_chat_template(  # Flux2Pipeline._get_mistral_3_small_prompt_embeds
        format_input(PROMPTS, system_message=SYSTEM_MESSAGE),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    ids, mask = ChatTokenizer(mistral_folder, "mistral")(PROMPTS)
    assert torch.equal(ids, inputs["input_ids"]) and torch.equal(mask, inputs["attention_mask"])
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and ids[0, 0] == 11  # left padding with <pad>


def test_tokenizer_errors(tmp_path, qwen_folder, mistral_folder):
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        ChatTokenizer(tmp_path)
    with pytest.raises(WeightsError, match=r"no <s>, \[INST\], \[SYSTEM_PROMPT\] token: not a mistral tokenizer"):
        ChatTokenizer(qwen_folder, "mistral")
    with pytest.raises(WeightsError, match="not a qwen3 tokenizer"):
        ChatTokenizer(mistral_folder, "qwen3")
    with pytest.raises(ValueError, match="family 'gemma'"):
        ChatTokenizer(qwen_folder, "gemma")


# --- 3. the loaders on the FLUX.2 folder layouts, against diffusers' prompt encoding ---------------------------


def test_load_qwen3_matches_the_klein_pipeline(tmp_path, qwen_folder):
    torch.manual_seed(0)
    reference = randomize(Qwen3ForCausalLM(Qwen3Config(**SMALL, tie_word_embeddings=True)))
    reference.save_pretrained(tmp_path / "text_encoder", max_shard_size="100KB")  # sharded, with an index json
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    write_qwen_tokenizer(tmp_path / "tokenizer")

    embedder = load_qwen3(tmp_path / "text_encoder", layers=(1, 2, 3))
    assert len(embedder.model.model.layers) == 3  # layer 4 is neither built nor loaded
    got = embedder(PROMPTS)

    pipe = Flux2KleinPipeline(
        scheduler=None,
        vae=None,
        text_encoder=reference,
        tokenizer=Qwen2TokenizerFast.from_pretrained(str(tmp_path / "tokenizer")),
        transformer=None,
    )
    want, _ = pipe.encode_prompt(PROMPTS, device="cpu", text_encoder_out_layers=(1, 2, 3))
    assert got.shape == want.shape == (3, 512, 3 * 64)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("layout", ["folder", "legacy single file"])
def test_load_mistral_matches_the_dev_pipeline(tmp_path, mistral_folder, layout):
    text = dict(SMALL, model_type="mistral", rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None)
    vision = dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    torch.manual_seed(0)
    reference = randomize(Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision)))
    folder = tmp_path / "text_encoder"
    reference.save_pretrained(folder)  # keys model.language_model.*, model.vision_tower.*, lm_head.weight
    if layout == "legacy single file":  # as transformers < 4.52 saved it: language_model.model.*
        sd = {k.replace("model.language_model.", "language_model.model."): v for k, v in reference.state_dict().items()}
        (folder / "model.safetensors").unlink()
        save_file({k: v.clone() for k, v in sd.items()}, str(folder / "text_encoder.safetensors"))
    write_mistral_tokenizer(tmp_path / "tokenizer")

    embedder = load_mistral(folder, layers=(1, 2, 4))
    got = embedder(PROMPTS)
    want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        reference, mistral_hf_tokenizer(mistral_folder), PROMPTS, hidden_states_layers=(1, 2, 4)
    )
    assert got.shape == want.shape == (3, 512, 3 * 64)
    assert rel_err(got, want) <= 1e-5


def test_loader_errors(tmp_path):
    t5 = tmp_path / "t5"
    T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)).save_pretrained(t5)
    with pytest.raises(WeightsError, match=r"t5.*not a Qwen3 text encoder: no key 'embed_tokens.weight'"):
        load_qwen3(t5)
    qwen = tmp_path / "qwen"
    Qwen3ForCausalLM(Qwen3Config(**SMALL)).save_pretrained(qwen)
    with pytest.raises(WeightsError, match=r"config.json: model_type 'qwen3', expected mistral"):
        load_mistral(qwen)
    with pytest.raises(ValueError, match="hidden states 0 … 4"):
        load_qwen3(qwen)  # (9, 18, 27) of a 4-layer model
    with pytest.raises(WeightsError, match="no tokenizer was found"):
        load_qwen3(qwen, layers=(1,))(["a cat"])
    (qwen / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json beside it"):
        load_qwen3(qwen, layers=(1,))
    with pytest.raises(WeightsError, match="no such file"):
        load_qwen3(tmp_path / "missing")


def test_fp8_and_bf16_files_load_as_stored(tmp_path):
    """A text encoder stored in bf16 stays bf16; one stored in fp8 (a storage format) becomes bf16, every value
    kept exactly (bf16 holds every e4m3 value)."""
    from safetensors.torch import load_file

    folder = tmp_path / "hf"
    randomize(Qwen3ForCausalLM(Qwen3Config(**SMALL))).save_pretrained(folder)
    stored = load_file(folder / "model.safetensors")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        low = {k: t.to(dtype) for k, t in stored.items()}
        save_file(low, folder / "model.safetensors")
        model = load_qwen3(folder, layers=(1, 4)).model
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        for key, t in model.state_dict().items():
            assert torch.equal(t, low[key].to(torch.bfloat16)), key
