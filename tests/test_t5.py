"""Tests for minflux/t5.py: the T5 v1.1 encoder and tokenizer against transformers, and load_t5's file handling.

Everything runs on small random models (d_model 64, 3 layers) and a sentencepiece model trained in the
test, so nothing is downloaded. transformers is the oracle: T5EncoderModel for the encoder,
T5TokenizerFast for the tokenizer.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5TokenizerFast
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from minflux.files.load import load_t5
from minflux.files.tokenizers import T5Tokenizer, write_t5_tokenizer
from minflux.t5 import T5_XXL, T5Encoder, clamp_fp16, relative_position_bucket
from minflux.files.weights import WeightsError

VOCAB = 256  # covers the trained sentencepiece pieces and the 100 <extra_id_N>
SMALL = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4)
L = 300  # longer than max_distance 128, so the far buckets are used


def small_config(**overrides) -> T5Config:
    """A T5 v1.1 config (gated-gelu, i.e. gelu_new gating, eps 1e-6), small, without dropout."""
    config = dict(SMALL, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    return T5Config(**(config | overrides))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every part matters (T5's own init makes attention almost uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2 and "relative_attention_bias" not in name and "shared" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:  # embedding and position bias table
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ| / std(ref)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().std()).item()


@pytest.fixture(scope="module")
def reference():
    return randomize(T5EncoderModel(small_config()))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory, reference):
    """A FLUX-like folder: text_encoder_2/ saved sharded (with an index json), tokenizer_2/ with spiece.model."""
    root = tmp_path_factory.mktemp("flux")
    reference.save_pretrained(root / "text_encoder_2", max_shard_size="40KB")
    train_sentencepiece(root / "tokenizer_2")
    return root


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, L), generator=torch.Generator().manual_seed(1))


def save_single_file(model: torch.nn.Module, path, prefix: str = "", dtype=None, extra=None):
    """A state dict as one safetensors file, as other tools ship T5 (tied tensors stored separately)."""
    sd = {prefix + k: v.detach().clone().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd | (extra or {}), str(path))
    return path


# --- 1. encoder parity ---------------------------------------------------------------------------


def test_relative_position_bucket_matches_transformers():
    distance = torch.arange(-600, 601)[None, :]
    for num_buckets, max_distance in [(32, 128), (32, 20), (16, 64)]:
        ours = relative_position_bucket(distance, num_buckets, max_distance)
        ref = HFT5Attention._relative_position_bucket(distance, True, num_buckets, max_distance)
        assert torch.equal(ours, ref), (num_buckets, max_distance)


def test_sharded_folder_matches_transformers_fp32(flux_folder, reference, ids):
    index = json.loads((flux_folder / "text_encoder_2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the test folder should be sharded"
    t5 = load_t5(flux_folder / "text_encoder_2")
    with torch.no_grad():
        ours, ref = t5.model(ids), reference(ids).last_hidden_state  # [2, 300, 64]
    err = rel_err(ours, ref)
    print(f"fp32 parity, L={L}: max|Δ|/std = {err:.2e}")
    assert ours.shape == (2, L, 64) and err <= 1e-4


def test_padding_mask_matches_transformers(flux_folder, reference, ids):
    mask = torch.ones_like(ids)
    mask[1, 180:] = 0  # the second prompt has 180 real tokens
    t5 = load_t5(flux_folder / "text_encoder_2")
    with torch.no_grad():
        err = rel_err(t5.model(ids, mask), reference(ids, attention_mask=mask).last_hidden_state)
    print(f"fp32 parity with a padding mask: max|Δ|/std = {err:.2e}")
    assert err <= 1e-4


def test_config_json_is_read(tmp_path, ids):
    """Sizes could come from the shapes, but max_distance and eps only from config.json."""
    ref = randomize(T5EncoderModel(small_config(relative_attention_max_distance=20, layer_norm_epsilon=1e-3)))
    ref.save_pretrained(tmp_path / "text_encoder_2")
    t5 = load_t5(tmp_path / "text_encoder_2")
    assert t5.model.params.relative_attention_max_distance == 20 and t5.model.params.layer_norm_epsilon == 1e-3
    with torch.no_grad():
        assert rel_err(t5.model(ids), ref(ids).last_hidden_state) <= 1e-4


def test_position_bias_matters_beyond_max_distance(flux_folder, ids):
    """The parity tests have teeth: the far buckets change the output."""
    t5 = load_t5(flux_folder / "text_encoder_2")
    table = t5.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    with torch.no_grad():
        before = t5.model(ids)
        table[[15, 31]] += 1.0  # the buckets of distance ≥ 128 to the left and to the right
        assert rel_err(t5.model(ids), before) > 1e-2


def test_fp16_load_matches_transformers_fp16(flux_folder, reference, ids):
    """In float16 both keep the MLP's wo in float32 (transformers' _keep_in_fp32_modules) and clamp.

    float16 rounding makes both drift from the float32 output by about 2e-2 (max|Δ|/std); ours may
    differ from transformers' by that much, but must be no further from float32 than transformers is.
    """
    ref16 = T5EncoderModel.from_pretrained(flux_folder / "text_encoder_2", dtype=torch.float16).eval()
    t5 = load_t5(flux_folder / "text_encoder_2", dtype=torch.float16)
    wo = t5.model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and t5.model.shared.weight.dtype == torch.float16
    with torch.no_grad():
        ours, theirs, fp32 = t5.model(ids), ref16(ids).last_hidden_state, reference(ids).last_hidden_state
    err, ours_drift, their_drift = rel_err(ours, theirs), rel_err(ours, fp32), rel_err(theirs, fp32)
    print(f"fp16 vs transformers fp16: {err:.2e}; drift from fp32: ours {ours_drift:.2e}, theirs {their_drift:.2e}")
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert err <= 3e-2 and ours_drift <= 1.25 * their_drift


def test_clamp_fp16_follows_transformers_rule():
    big = torch.finfo(torch.float16).max  # 65504
    x = torch.tensor([1.0, -big, big], dtype=torch.float16)
    assert torch.equal(clamp_fp16(x), x)  # nothing overflowed: unchanged
    y = torch.tensor([1.0, float("inf"), -float("inf"), big], dtype=torch.float16)
    limit = torch.tensor(big - 1000, dtype=torch.float16).item()  # 64512 once rounded to float16
    assert clamp_fp16(y).tolist() == [1.0, limit, -limit, limit]  # an inf somewhere: clamp 1000 lower
    z = torch.tensor([float("inf")])
    assert torch.equal(clamp_fp16(z), z)  # float32 is left alone


def test_fp16_overflowing_mlp_stays_finite(flux_folder, ids):
    model = load_t5(flux_folder / "text_encoder_2").model.half()  # all float16, wo included
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)  # every MLP now overflows float16
        x = model.shared(ids)
        overflow = model.encoder.block[0].layer[1](x)
        out = model(ids)
    assert torch.isinf(overflow).any(), "the test should overflow float16"
    assert torch.isfinite(out).all()


# --- 2. tokenizer parity ---------------------------------------------------------------------------

TRAINING_TEXT = [
    "A photo of a cat sitting on a red sofa.",
    "The quick brown fox jumps over the lazy dog!",
    "Transform the input photo of a person into a professional flat lay product shot.",
    "Background must be pure white (#FFFFFF) or transparent PNG (preferred).",
    "Café, naïve, résumé, déjà vu: accents everywhere.",
    "A painting of mountains at sunset, oil on canvas, highly detailed.",
    "HELLO WORLD, hello world, Hello World.",
    "Numbers: 1, 22, 333, 4444 and 3.14159; dates like 2024-08-01.",
    "東京の夜景、ネオンの光。",
    "Ein Hund läuft über die Straße.",
    "Symbols © ® ™ ½ and quotes “like this” and ‘this’.",
    "Extract only the clothing (top + pants set, or a single dress).",
    "Virtually flatten the garment: remove perspective distortion, keep contours.",
    "Soft studio lighting, sharp details, correct colors.",
] * 3

CORPUS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT!!!",
    "  leading and trailing spaces  ",
    "multiple     spaces\tand a tab\nand a newline",
    "Café NAÏVE résumé",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",  # NFKC turns these into ASCII
    "東京の夜景 and 🙂 emoji",
    "qzxj unseen ßpieces ø",
    "don't stop, won't stop; (parentheses) [brackets] {braces}",
    "literal special tokens: a </s> b <pad> c <extra_id_0> d <extra_id_99>",
    "\u3000ideographic space and a\u00a0no-break space",
    "The quick brown fox jumps over the lazy dog! " * 12,  # longer than max_length
]
MAX_LENGTH = 64


def train_sentencepiece(folder):
    """A tiny unigram model with T5's special ids: <pad> 0, </s> 1, <unk> 2, no <s>."""
    return write_t5_tokenizer(folder, "\n".join(TRAINING_TEXT), vocab_size=150)


@pytest.fixture(scope="module")
def tokenizer_folders(flux_folder, tmp_path_factory):
    """tokenizer_2/ with spiece.model only, and a copy converted by transformers to tokenizer.json only."""
    spm_folder = flux_folder / "tokenizer_2"
    json_folder = tmp_path_factory.mktemp("tokenizer_json") / "tokenizer_2"
    T5TokenizerFast.from_pretrained(spm_folder).save_pretrained(json_folder)
    assert (json_folder / "tokenizer.json").exists() and not (json_folder / "spiece.model").exists()
    return spm_folder, json_folder


@pytest.mark.parametrize("backend", ["spiece.model", "tokenizer.json"])
def test_tokenizer_matches_transformers(tokenizer_folders, backend):
    folder = tokenizer_folders[0] if backend == "spiece.model" else tokenizer_folders[1]
    ref = T5TokenizerFast.from_pretrained(tokenizer_folders[0])
    expected = ref(CORPUS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match=r"dropped"):
        ours = T5Tokenizer(folder, max_length=MAX_LENGTH)(CORPUS)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), MAX_LENGTH)
    for prompt, a, b in zip(CORPUS, ours, expected):
        assert a.tolist() == b.tolist(), f"{backend}: {prompt!r}"
    assert ours[0].tolist() == [1] + [0] * (MAX_LENGTH - 1)  # the empty prompt is </s> then <pad>
    assert ours[-1, -1].item() == 1  # a truncated prompt still ends with </s>


def test_tokenizer_warns_with_the_number_of_dropped_tokens(tokenizer_folders):
    tok = T5Tokenizer(tokenizer_folders[1], max_length=MAX_LENGTH)
    n = len(tok.encode(CORPUS[-1]))
    with pytest.warns(UserWarning, match=f"{n - (MAX_LENGTH - 1)} dropped") as caught:
        tok([CORPUS[-1]])
    assert [w.filename for w in caught] == [__file__]  # the caller's line, not the @stage wrapper's


def test_tokenizer_without_files_names_the_folder(tmp_path):
    with pytest.raises(WeightsError, match=r"spiece\.model") as e:
        T5Tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(WeightsError, match="no such folder"):
        T5Tokenizer(tmp_path / "missing")


# --- 3. the official T5-XXL encoder, on the meta device -------------------------------------------


def test_t5_xxl_has_the_official_keys_shapes_and_parameter_count():
    """4,762,310,656 parameters, counting the tied embedding (shared == encoder.embed_tokens) once.

    24 × (4 · 4096² attention + 3 · 4096 · 10240 MLP + 2 · 4096 norms) + 32128 · 4096 embedding
    + 32 · 64 position buckets + 4096 final norm.
    """
    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )  # google/t5-v1_1-xxl
    with torch.device("meta"):
        ours, ref = T5Encoder(T5_XXL), T5EncoderModel(config)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    count = sum(p.numel() for p in ours.parameters())
    expected = 24 * (4 * 4096**2 + 3 * 4096 * 10240 + 2 * 4096) + 32128 * 4096 + 32 * 64 + 4096
    assert count == sum(p.numel() for p in ref.parameters()) == expected == 4_762_310_656
    assert ours.shared.weight is ours.encoder.embed_tokens.weight


# --- 4. load_t5: single files, dtypes, tokenizer discovery, errors --------------------------------


def test_single_file_with_prefix_and_other_models_keys(tmp_path, reference, ids):
    prefix = "text_encoders.t5xxl.transformer."
    clip_key = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    path = save_single_file(reference, tmp_path / "all_in_one.safetensors", prefix=prefix, extra=clip_key)
    t5 = load_t5(path)
    with torch.no_grad():
        assert rel_err(t5.model(ids), reference(ids).last_hidden_state) <= 1e-4


def test_single_file_with_decoder_keeps_the_encoder(tmp_path, ids):
    full = randomize(T5ForConditionalGeneration(small_config()), seed=3)
    path = save_single_file(full, tmp_path / "t5_full.safetensors")
    t5 = load_t5(path)
    assert t5.model.params.num_layers == 3 and t5.model.params.vocab_size == VOCAB
    with torch.no_grad():
        assert rel_err(t5.model(ids), full.encoder(ids).last_hidden_state) <= 1e-4


def test_single_file_with_only_embed_tokens(tmp_path, reference, ids):
    sd = {k: v.clone() for k, v in reference.state_dict().items() if k != "shared.weight"}
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with torch.no_grad():
        assert rel_err(load_t5(tmp_path / "t5.safetensors").model(ids), reference(ids).last_hidden_state) <= 1e-4


def store_fp8_scaled(sd):
    """A ComfyUI "scaled fp8" layout: W ≈ fp8(W / s) · s, with s stored as `<name>.scale_weight`.

    Returns the file's tensors and the weights they stand for.
    """
    stored, meant = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if v.ndim == 2 and "block" in k:
            s = v.abs().max() / 448  # 448: the largest float8_e4m3fn
            stored[k], stored[k[: -len("weight")] + "scale_weight"] = (v / s).to(torch.float8_e4m3fn), s.reshape(1)
            meant[k] = stored[k].float() * s
        else:
            stored[k] = meant[k] = v
    return stored, meant


@pytest.mark.parametrize("stored", ["bf16", "fp16", "fp8", "fp8_scaled"])
def test_low_precision_files_load_to_the_same_model(tmp_path, reference, ids, stored):
    """The stored values, upcast to float32, are the weights; the output is transformers' on them."""
    sd = {k: v.detach().clone() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if stored == "fp8_scaled":
        file_sd, meant = store_fp8_scaled(sd)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[stored]
        file_sd = {k: v.to(dtype) for k, v in sd.items()}
        meant = {k: v.float() for k, v in file_sd.items()}
    save_file(file_sd, str(tmp_path / f"t5_{stored}.safetensors"))

    t5 = load_t5(tmp_path / f"t5_{stored}.safetensors", dtype=torch.float32)
    loaded = t5.model.state_dict()
    assert all(torch.equal(loaded[k], meant[k].float()) for k in meant)
    oracle = T5EncoderModel(small_config()).eval()
    oracle.load_state_dict({k: v.float() for k, v in meant.items()}, strict=False)  # embed_tokens is tied
    with torch.no_grad():
        assert rel_err(t5.model(ids), oracle(ids).last_hidden_state) <= 1e-4
    kept = load_t5(tmp_path / f"t5_{stored}.safetensors")  # no dtype: as stored, except fp8 → bf16
    assert kept.model.shared.weight.dtype == {"fp16": torch.float16}.get(stored, torch.bfloat16)


def test_sibling_tokenizer_and_call(flux_folder):
    t5 = load_t5(flux_folder / "text_encoder_2", max_length=MAX_LENGTH)
    assert t5.tokenizer is not None and t5.tokenizer.max_length == MAX_LENGTH
    hidden = t5(["a photo of a cat", "Hello World"])
    assert hidden.shape == (2, MAX_LENGTH, 64)
    with torch.no_grad():
        assert torch.equal(hidden, t5.model(t5.tokenizer(["a photo of a cat", "Hello World"])))


def test_tokenizer_in_the_same_folder_as_a_single_file(tmp_path, reference, flux_folder):
    save_single_file(reference, tmp_path / "t5xxl_fp16.safetensors")
    assert load_t5(tmp_path / "t5xxl_fp16.safetensors").tokenizer is None
    (tmp_path / "spiece.model").write_bytes((flux_folder / "tokenizer_2" / "spiece.model").read_bytes())
    assert load_t5(tmp_path / "t5xxl_fp16.safetensors").tokenizer is not None


def test_call_without_tokenizer_says_so(tmp_path, reference):
    t5 = load_t5(save_single_file(reference, tmp_path / "t5.safetensors"))
    with pytest.raises(WeightsError, match="no T5 tokenizer"):
        t5(["a prompt"])


def test_missing_key_is_named(tmp_path, reference):
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    del sd["encoder.block.1.layer.0.SelfAttention.k.weight"]
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(WeightsError, match=r"t5\.safetensors.*\n.*encoder\.block\.1\.layer\.0\.SelfAttention\.k\."):
        load_t5(tmp_path / "t5.safetensors")


def test_missing_key_needed_for_the_config_is_named(tmp_path, reference):
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    del sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(WeightsError, match=r"t5\.safetensors.*encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0"):
        load_t5(tmp_path / "t5.safetensors")


def test_wrong_shape_is_named(tmp_path, reference):
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sd["encoder.block.2.layer.1.DenseReluDense.wi_1.weight"] = torch.zeros(97, 64)
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(WeightsError, match=r"t5\.safetensors.*wi_1\.weight.*\[97, 64\].*\[96, 64\]"):
        load_t5(tmp_path / "t5.safetensors")


def test_wrong_files_are_named(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_t5(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsError, match=r"junk\.safetensors.*not a readable"):
        load_t5(tmp_path / "junk.safetensors")
    save_file({"text_model.final_layer_norm.weight": torch.ones(8)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(WeightsError, match=r"clip\.safetensors: not a T5 encoder"):
        load_t5(tmp_path / "clip.safetensors")


def test_config_of_another_model_is_named(tmp_path, reference):
    save_single_file(reference, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "feed_forward_proj": "relu"}))
    with pytest.raises(WeightsError, match=r"config\.json.*relu"):
        load_t5(tmp_path)
