"""CLIP-L text tower and tokenizer: parity with transformers, the official sizes and keys, every file layout."""

import json
import warnings

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import Tensor

from minflux.clip import CLIP_L, CLIPParams, CLIPTextModel
from minflux.files.load import CLIPEmbedder, load_clip
from minflux.files.tokenizers import CLIPTokenizer
from minflux.clip import pooled_positions
from minflux.files.load import _clip_params_from_shapes as _params_from_shapes
from minflux.files.weights import WeightsError, save_atomic
from tests.text_fixtures import write_clip_tokenizer

# A small text tower with CLIP's layout; head dim 64 as in every CLIP, so a single file's config can be inferred.
SMALL = CLIPParams(vocab_size=300, hidden_size=128, intermediate_size=200, num_layers=2, num_heads=2)
EOS = SMALL.vocab_size - 1  # like CLIP-L's 49407: the largest id


def hf_config(params: CLIPParams, **overrides) -> transformers.CLIPTextConfig:
    config = dict(
        vocab_size=params.vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        max_position_embeddings=params.max_position_embeddings,
        layer_norm_eps=params.layer_norm_eps,
        hidden_act=params.hidden_act,
        eos_token_id=params.eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
    )
    return transformers.CLIPTextConfig(**{**config, **overrides})


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorm scales around 1), so no term of the maths is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embedding" in name:
                p.copy_(noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module


def batch_ids(vocab_size: int, eos: int, pad: int, lengths=(77, 40, 5, 1), low: int = 1, seed: int = 0) -> Tensor:
    """A batch of [start, words..., end, pad...] rows with the end token at different positions; words are ids
    in [low, vocab_size - 2), the start token is vocab_size - 2."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(low, vocab_size - 2, (n - 2,), generator=g).tolist() if n >= 2 else []
        row = ([vocab_size - 2] + words + [eos])[:77] if n > 1 else [eos]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


def small_model(params: CLIPParams = SMALL, seed: int = 0) -> CLIPTextModel:
    return randomize_(CLIPTextModel(params), seed).eval()


# --- 1. parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "eos_token_id, eos, pad",
    [
        (2, EOS, EOS),  # the official config: legacy eos_token_id = 2, pooled at argmax(ids); padded with <|endoftext|>
        (2, EOS, 0),  # SD 2.x style padding with "!" (id 0)
        (7, 7, 0),  # a config with the real eos id, smaller than the other ids: pooled at the first 7, not argmax
    ],
)
def test_load_clip_folder_matches_transformers(tmp_path, eos_token_id, eos, pad):
    config = hf_config(SMALL, hidden_size=32, num_attention_heads=4, intermediate_size=37, eos_token_id=eos_token_id)
    config._attn_implementation = "eager"  # the reference writes attention out, with an additive causal mask
    reference = randomize_(transformers.CLIPTextModel(config)).eval()
    reference.save_pretrained(tmp_path / "text_encoder")  # config.json + model.safetensors, the official layout

    clip = load_clip(tmp_path / "text_encoder")
    # 4 heads of 8 channels: read from config.json (the shapes alone would say 1 head of 64).
    assert clip.model.params.num_heads == 4 and clip.model.params.eos_token_id == eos_token_id
    ids = batch_ids(SMALL.vocab_size, eos, pad, low=8)
    if eos_token_id != 2:  # here the two rules point at different tokens, so the test tells them apart
        assert not torch.equal(pooled_positions(ids, 2), pooled_positions(ids, eos_token_id))
    with torch.no_grad():
        hidden, pooled = clip.model(ids)
        expected = reference(input_ids=ids)

    assert hidden.shape == (4, 77, 32) and pooled.shape == (4, 32)
    pairs = [("hidden", hidden, expected.last_hidden_state), ("pooled", pooled, expected.pooler_output)]
    for name, ours, theirs in pairs:
        ratio = ((ours - theirs).abs().max() / theirs.std()).item()
        print(f"eos_token_id={eos_token_id} pad={pad} {name}: max|Δ| / std = {ratio:.2e}")
        assert ratio <= 1e-4, (name, ratio)


# --- 2. tokenizer parity -----------------------------------------------------------------------------

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo Of A CAT",
    "Café CRÈME   brûlée\t\tnaïve\n\nfaçade",
    "e\u0301te\u0301 in Paris (NFD accents)",
    "東京タワーの夜景 and 北京烤鸭",
    "a happy dog 🐶 playing ⚽ under the sun ☀️ 🎉🎉👍🏽",
    "it's a DOG'S life, we're here, they've gone, I'm sure, you'll see, he'd say",
    "Hello, world!!! (yes) -- #1: 200x300 @ 3.14159 ... $$$ 'quoted' \"double\"",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ and ﬁ ligature",
    "hello <|endoftext|> world <|startoftext|>",
    "\nTransform the input photo of a person wearing clothes into a professional flat lay product shot.\n",
]
LONG = "a painting of the eiffel tower at night in the style of van gogh, starry sky, " * 8


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(tmp_path, pad_token):
    folder = write_clip_tokenizer(tmp_path / "tokenizer", pad_token=pad_token)
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer(folder)

    prompts = PROMPTS + [LONG]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = ours(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    assert torch.equal(ids, expected.input_ids)
    assert ids[0, 0] == ours.bos_id and (ids == ours.eos_id).any(1).all()
    assert ours.pad_id == reference.pad_token_id

    # Only the long prompt warns, and says how many tokens were dropped.
    n = len(reference(LONG).input_ids) - 2  # prompt tokens without start and end
    assert n > 75
    messages = [str(w.message) for w in caught if "CLIP prompt" in str(w.message)]
    assert len(messages) == 1
    # the warning points at the line that called the tokenizer, not at the @stage wrapper around it
    assert [w.filename for w in caught if "CLIP prompt" in str(w.message)] == [__file__]
    assert f"prompt {len(PROMPTS)} is {n} tokens long" in messages[0] and f"{n - 75} tokens dropped" in messages[0]


def test_tokenizer_without_config_files_defaults_to_clip_special_tokens(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "tokenizer", configs=False)
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(CLIPTokenizer(folder)(PROMPTS), expected.input_ids)


# --- 3. the official CLIP-L sizes and keys -----------------------------------------------------------


def test_clip_l_on_meta_has_official_parameter_count_and_keys():
    with torch.device("meta"):
        ours = CLIPTextModel(CLIP_L)
        # The openai/clip-vit-large-patch14 text config, as FLUX.1-dev's text_encoder/config.json has it.
        reference = transformers.CLIPTextModel(hf_config(CLIP_L, projection_dim=768))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 123_060_480
    # transformers >= 5 names the keys without "text_model." (and adds it back when saving for old versions);
    # the files FLUX.1 ships use "text_model.*". position_ids is a non-persistent buffer, not in files.
    official = {"text_model." + k for k in reference.state_dict() if not k.endswith("position_ids")}
    assert set(ours.state_dict()) == official
    assert len(official) == 196
    # A clip_l.safetensors without config.json: its shapes alone give back the CLIP_L preset.
    assert _params_from_shapes({k: (tuple(v.shape), "F16") for k, v in ours.state_dict().items()}) == CLIP_L


# --- 4. file layouts, dtypes, tokenizer discovery, errors --------------------------------------------


def vision_and_extras(prefix: str) -> dict[str, torch.Tensor]:
    """What a full CLIP checkpoint holds besides the text tower."""
    return {
        f"{prefix}vision_model.embeddings.patch_embedding.weight": torch.randn(16, 3, 14, 14),
        f"{prefix}vision_model.post_layernorm.weight": torch.ones(16),
        f"{prefix}visual_projection.weight": torch.randn(8, 16),
        f"{prefix}text_projection.weight": torch.randn(8, SMALL.hidden_size),
        f"{prefix}logit_scale": torch.tensor(4.6),
        f"{prefix}text_model.embeddings.position_ids": torch.arange(77)[None],
    }


@pytest.mark.parametrize(
    "prefix", ["", "cond_stage_model.transformer.", "text_encoders.clip_l.transformer.", "transformers5"]
)
def test_load_clip_single_file_with_prefix_and_vision_tower(tmp_path, prefix):
    source = small_model()
    if prefix == "transformers5":  # no "text_model." at all, as transformers >= 5 saves a CLIPTextModel
        tensors = {k.removeprefix("text_model."): v for k, v in source.state_dict().items()}
    else:
        tensors = {prefix + k: v for k, v in source.state_dict().items()} | vision_and_extras(prefix)
    save_file(tensors, tmp_path / "clip_l.safetensors")

    clip = load_clip(tmp_path / "clip_l.safetensors")
    assert clip.model.params == SMALL  # inferred from the shapes, the rest from CLIP_L
    assert clip.tokenizer is None
    ids = batch_ids(SMALL.vocab_size, EOS, EOS)
    with torch.no_grad():
        for ours, theirs in zip(clip.model(ids), source(ids)):
            assert torch.equal(ours, theirs)


def test_load_clip_sharded_folder_with_index(tmp_path):
    source = small_model()
    sd = source.state_dict()
    keys = list(sd)
    folder = tmp_path / "text_encoder"
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, part in shards.items():
        save_atomic({k: sd[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(hf_config(SMALL).to_json_string())

    clip = load_clip(folder)
    assert clip.model.params == SMALL
    ids = batch_ids(SMALL.vocab_size, EOS, EOS)
    with torch.no_grad():
        assert torch.equal(clip.model(ids)[1], source(ids)[1])


@pytest.mark.parametrize(
    "stored, loaded",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float8_e4m3fn, torch.bfloat16)],
)
def test_load_clip_low_precision_files(tmp_path, stored, loaded):
    source = small_model()
    save_file({k: v.to(stored) for k, v in source.state_dict().items()}, tmp_path / "clip_l.safetensors")

    clip = load_clip(tmp_path / "clip_l.safetensors")
    assert {p.dtype for p in clip.model.parameters()} == {loaded}
    for name, p in clip.model.state_dict().items():
        assert torch.equal(p, source.state_dict()[name].to(stored).to(loaded)), name

    # The same weights in fp32 give nearly the same output: the low-precision forward is the same maths.
    upcast = load_clip(tmp_path / "clip_l.safetensors", dtype=torch.float32)
    assert {p.dtype for p in upcast.model.parameters()} == {torch.float32}
    ids = batch_ids(SMALL.vocab_size, EOS, EOS)
    with torch.no_grad():
        low, exact = clip.model(ids)[1].float(), upcast.model(ids)[1]
    assert torch.isfinite(low).all()
    assert (low - exact).abs().max() < 0.1 * exact.std()


def test_load_clip_finds_sibling_tokenizer(tmp_path):
    tokenizer_folder = write_clip_tokenizer(tmp_path / "repo" / "tokenizer")
    tok = CLIPTokenizer(tokenizer_folder)
    vocab_size = max(tok.bos_id, tok.eos_id) + 1
    params = CLIPParams(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=1)
    source = small_model(params)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "repo" / "text_encoder").mkdir()
    save_file(source.state_dict(), tmp_path / "repo" / "text_encoder" / "model.safetensors")

    # <repo>/text_encoder next to <repo>/tokenizer (the diffusers layout), as a folder or as its file.
    for path in [tmp_path / "repo" / "text_encoder", tmp_path / "repo" / "text_encoder" / "model.safetensors"]:
        clip = load_clip(path)
        assert isinstance(clip, CLIPEmbedder) and clip.tokenizer is not None
        prompts = ["a photo of a cat", "東京タワー 🐶"]
        with torch.no_grad():
            assert torch.equal(clip(prompts), clip.model(tok(prompts))[1])
        assert clip(prompts).shape == (2, 64)

    # A single file with no tokenizer around it: the model loads, prompts need a tokenizer.
    clip = load_clip(tmp_path / "model.safetensors")
    assert clip.tokenizer is None
    with pytest.raises(WeightsError, match="no CLIP tokenizer"):
        clip(["a prompt"])


def test_load_clip_errors_name_the_file_and_key(tmp_path):
    sd = small_model().state_dict()

    missing = tmp_path / "missing_key.safetensors"
    save_file({k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.mlp.fc1.weight"}, missing)
    with pytest.raises(WeightsError, match=r"missing_key\.safetensors.*\n.*missing 1 key.*layers\.1\.mlp\.fc1\.weight"):
        load_clip(missing)

    wrong = tmp_path / "wrong_shape.safetensors"
    save_file(sd | {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(128, 64)}, wrong)
    with pytest.raises(WeightsError, match=r"wrong_shape\.safetensors.*q_proj\.weight.*\[128, 64\].*\[128, 128\]"):
        load_clip(wrong)

    garbage = tmp_path / "clip_l.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsError, match=r"clip_l\.safetensors: not a readable \.safetensors file"):
        load_clip(garbage)

    not_clip = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, not_clip)
    with pytest.raises(WeightsError, match=r"ae\.safetensors: no CLIP text model"):
        load_clip(not_clip)

    with pytest.raises(WeightsError, match="no such file"):
        load_clip(tmp_path / "nowhere")

    # A tokenizer folder with merges.txt missing, found by itself or next to the weights.
    folder = write_clip_tokenizer(tmp_path / "repo" / "tokenizer")
    (folder / "merges.txt").unlink()
    with pytest.raises(WeightsError, match=r"tokenizer/merges\.txt: missing"):
        CLIPTokenizer(folder)
    (tmp_path / "repo" / "text_encoder").mkdir()
    save_file(sd, tmp_path / "repo" / "text_encoder" / "model.safetensors")
    with pytest.raises(WeightsError, match=r"merges\.txt: missing"):
        load_clip(tmp_path / "repo" / "text_encoder")
