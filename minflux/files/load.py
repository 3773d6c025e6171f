"""Loading the official weights into minflux's models: the transformer, the VAE, CLIP-L and T5-XXL.

    load_flux   flux1-*.safetensors (BFL), a diffusers transformer/ folder or a repo root; any stored dtype
    load_ae     ae.safetensors or a diffusers vae/ folder, FLUX.1's or FLUX.2's
    load_clip   a text_encoder/ folder or a single file (clip_l.safetensors); the tokenizer beside it
    load_t5     a text_encoder_2/ folder (sharded) or a single file (t5xxl_fp16.safetensors); its tokenizer_2/
    find_weights  one repo or run folder → the four parts' paths

Each model is built on the meta device and the loaded tensors are assigned into it, so the weights are held in
memory once. The variant and sizes are read off the tensor shapes. Every failure raises WeightsError naming the
file, the key and what was expected. The other layouts' key names are tables in keys.py.
"""

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from minflux.autoencoder import AE_PARAMS_FLUX, AE_PARAMS_FLUX2, AutoEncoder, AutoEncoderParams, Flux2AutoEncoder
from minflux.clip import CLIP_L, CLIPParams, CLIPTextModel
from minflux.files.keys import ATTENTION_WEIGHTS, CLIP_CONFIG_NAMES, CLIP_PREFIXES, CLIP_TOKEN_EMBEDDING, CLIP_TOWER
from minflux.files.keys import FLUX_MARKERS, FLUX_PREFIXES, T5_ANCHOR, block_count, diffusers_to_flux
from minflux.files.keys import is_diffusers_layout, official_key, official_state_dict
from minflux.files.load_flux2 import is_flux2, load_flux2
from minflux.files.tokenizers import CLIPTokenizer, T5Tokenizer
from minflux.files.weights import WeightsError, is_finite_number, is_sizes, layers_agree, load_into, metadata_json
from minflux.files.weights import numbered, read_metadata, read_shapes, read_state_dict, save_atomic, sizes_of
from minflux.files.weights import read_json, weight_files
from minflux.model import Flux, FluxParams
from minflux.presets import configs
from minflux.t5 import T5_XXL, T5Encoder, T5Params


# --- the transformer -----------------------------------------------------------------------------------------


def infer_params(sd: dict[str, torch.Tensor], axes_dim: list[int] | None, source) -> FluxParams:
    """FluxParams from the tensor shapes: width, depths, channels, guidance embedding, qkv bias."""
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        params = FluxParams(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0],
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
            num_heads=hidden // head_dim,
            depth=block_count(sd, "double_blocks."),
            depth_single_blocks=block_count(sd, "single_blocks."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )
    except KeyError as e:
        raise WeightsError(f"{source}: not a FLUX transformer: key {e.args[0]!r} is missing") from None
    if axes_dim is None:
        if head_dim != 128:
            raise WeightsError(
                f"{source}: head dim {head_dim} is not the official 128 and the file does not say how RoPE "
                "splits it (no 'minflux.params' metadata): pass name= a preset of this shape"
            )
        axes_dim = [16, 56, 56]
    params.axes_dim = list(axes_dim)
    return params


def _find_prefix(shapes: dict, source) -> str:
    """The prefix under which the file holds a FLUX transformer (official or diffusers keys)."""
    for prefix in FLUX_PREFIXES:
        if any(prefix + marker in shapes for marker in FLUX_MARKERS):
            return prefix
    raise WeightsError(
        f"{source}: not a FLUX transformer: none of {', '.join(FLUX_MARKERS)} found "
        f"(first keys: {', '.join(list(shapes)[:5]) or 'none'})"
    )


def load_flux(path, name: str | None = None, device="cpu", dtype: torch.dtype | None = None) -> Flux:
    """A Flux transformer (Flux2 for FLUX.2's weights) from an official file, a diffusers transformer/ or a repo root.

    name: a preset of minflux.configs to check the weights against; None reads the variant from the weights.
    dtype: None keeps the stored dtype (fp8, a storage format, becomes bf16); else every tensor is cast.
    The model is built on the meta device and the loaded tensors are assigned into it, so the weights are
    held in memory once.
    """
    path = Path(path)
    if path.is_dir():
        path = find_weights(path).flux or path  # a repo or run folder: the transformer in it
    if name is not None and name not in configs:
        raise WeightsError(f"{path}: unknown variant {name!r}; known presets: {', '.join(configs)}")
    files = weight_files(path)
    shapes = read_shapes(path)
    if is_flux2(shapes):  # FLUX.2 weights: a model class of its own
        return load_flux2(path, device=device, dtype=dtype, name=name)
    metadata = read_metadata(path)
    prefix = _find_prefix(shapes, path)
    sd = read_state_dict(path, dtype=dtype, select=lambda k: k.startswith(prefix))
    sd = {k[len(prefix) :]: v for k, v in sd.items()}

    axes_dim = None
    config_file = files[0].parent / "config.json"
    if FLUX_MARKERS[0] not in sd:  # the diffusers layout
        sd = diffusers_to_flux(sd, source=path)
        if config_file.exists():
            axes_dim = read_json(config_file).get("axes_dims_rope")
    stored = metadata_json(metadata, "minflux.params", {"axes_dim": is_sizes(3)}, path)
    if stored is not None:
        axes_dim = stored["axes_dim"]

    if name is not None:
        params = configs[name].params
    else:
        with sizes_of(path, "FLUX transformer"):
            params = infer_params(sd, axes_dim, path)
        name = metadata.get("minflux.variant") or variant_name(params, path)
    with torch.device("meta"), sizes_of(path, "FLUX transformer"):
        model = Flux(params)
    load_into(model, sd, path, what=f"FLUX transformer ({name or 'custom'})")
    model.variant = name
    return model.to(device)


def variant_name(params: FluxParams, path: Path) -> str | None:
    """The preset whose params these are; Kontext has dev's shapes, so only the file name tells them apart."""
    matches = [n for n, spec in configs.items() if spec.params == params]
    if "flux-dev" in matches and "kontext" in path.name.lower():
        return "flux-dev-kontext"
    return matches[0] if matches else None


def save_flux(model: Flux, path, variant: str | None = None) -> Path:
    """Write the official single-file layout, with the params in the header so small models reload exactly."""
    metadata = {"minflux.params": json.dumps(asdict(model.params))}
    if variant or getattr(model, "variant", None):
        metadata["minflux.variant"] = variant or model.variant
    return save_atomic(model.state_dict(), path, metadata=metadata)


# --- the VAE --------------------------------------------------------------------------------------------------

# FLUX.2's VAE normalises its latents by batch-norm statistics (official file and diffusers folder alike); FLUX.1's
# has none: the key tells the two generations apart from the headers.
FLUX2_AE_MARKER = "bn.running_mean"


def ae_params_from_shapes(shapes: dict[str, tuple], source) -> AutoEncoderParams:
    """Read ch, ch_mult, num_res_blocks, z_channels and the in/out channels off the official-key shapes; the
    other fields from AE_PARAMS_FLUX2 where the weights hold FLUX.2's batch norm (`bn.*`), else AE_PARAMS_FLUX."""

    def shape(key):
        if key not in shapes:
            raise WeightsError(f"{source}: missing key {key!r}, needed to read the autoencoder's size")
        return shapes[key]

    ch, in_channels = shape("encoder.conv_in.weight")[:2]  # [128, 3, 3, 3]
    num_levels = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down.")})
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    ch_mult = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(num_levels)]
    preset = AE_PARAMS_FLUX2 if FLUX2_AE_MARKER in shapes else AE_PARAMS_FLUX
    return AutoEncoderParams(
        resolution=preset.resolution,  # not stored in the weights, and used by no layer
        in_channels=in_channels,
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],  # [3, 128, 3, 3]
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=shape("decoder.conv_in.weight")[1],  # [512, 16, 3, 3]
        scale_factor=preset.scale_factor,
        shift_factor=preset.shift_factor,
    )


def load_ae(path, device="cpu", dtype: torch.dtype | None = None) -> AutoEncoder | Flux2AutoEncoder:
    """An AutoEncoder from an official ae.safetensors, a diffusers vae/ folder, or a file with diffusers keys; a
    Flux2AutoEncoder where the weights hold FLUX.2's batch norm (`bn.running_mean`: its ae.safetensors, or vae/).

    The size is read off the weights' shapes; scale and shift come from the folder's config.json when it has
    them, else the official values. dtype None keeps the stored dtype (fp8, a storage format, becomes bf16).
    Any problem with the file or its keys raises WeightsError naming the file, the key and what was expected.
    """
    path = Path(path)
    shapes = {k: s for k, (s, _) in read_shapes(path).items()}
    diffusers = is_diffusers_layout(shapes)
    if diffusers:
        num_levels = len({k.split(".")[2] for k in shapes if k.startswith("decoder.up_blocks.")})
        shapes = {official_key(k, num_levels): s for k, s in shapes.items()}
        shapes = {k: s + (1, 1) if k.endswith(ATTENTION_WEIGHTS) and len(s) == 2 else s for k, s in shapes.items()}
    with sizes_of(path, "autoencoder"):
        params = ae_params_from_shapes(shapes, path)

    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.exists():
        config = read_json(config_file)
        if config.get("scaling_factor") is not None:
            params.scale_factor = config["scaling_factor"]
        if config.get("shift_factor") is not None:
            params.shift_factor = config["shift_factor"]
        params.norm_groups = config.get("norm_num_groups", params.norm_groups)  # 32 in the official VAEs

    stored = metadata_json(
        read_metadata(path),
        "minflux.ae_params",  # a VAE trained by minflux: its scale/shift
        {"scale_factor": is_finite_number, "shift_factor": is_finite_number},
        path,
    )
    if stored is not None:
        params.scale_factor, params.shift_factor = stored["scale_factor"], stored["shift_factor"]
        params.norm_groups = stored.get("norm_groups", params.norm_groups)

    with torch.device("meta"), sizes_of(path, "autoencoder"):  # no memory: the loaded tensors are assigned here
        ae = (Flux2AutoEncoder if FLUX2_AE_MARKER in shapes else AutoEncoder)(params)
    sd = read_state_dict(path, dtype)
    if diffusers:
        sd = official_state_dict(sd, num_levels)
    source = f"{path} (diffusers keys, named here as the official keys)" if diffusers else path
    load_into(ae, sd, source, what="autoencoder")
    return ae.to(device).eval()


# --- CLIP-L --------------------------------------------------------------------------------------------------


def _clip_prefix(path, keys) -> str:
    for prefix in CLIP_PREFIXES:
        if prefix + "embeddings.token_embedding.weight" in keys:
            return prefix
    raise WeightsError(
        f"{path}: no CLIP text model in these weights: no key {CLIP_TOKEN_EMBEDDING!r}, with or without the prefixes "
        f"{', '.join(repr(p[: -len('text_model.')]) for p in CLIP_PREFIXES[2:])}; "
        f"found e.g. {', '.join(list(keys)[:3])}"
    )


def _official_name(key: str, prefix: str) -> str | None:
    """The official name of a file's key ("text_model.encoder.…"), or None for what is not the text tower: a
    vision tower, the projections, logit_scale, the position_ids buffer of older files, other models' weights."""
    rest = key[len(prefix) :]
    if key.startswith(prefix) and rest.startswith(CLIP_TOWER) and not rest.endswith("position_ids"):
        return "text_model." + rest
    return None


def _clip_params_from_shapes(shapes: dict, source="the weights") -> CLIPParams:
    """The sizes a checkpoint fixes; the rest (activation, eps, eos rule) from CLIP_L. Head dim is 64 in every CLIP."""
    vocab_size, hidden_size = shapes[CLIP_TOKEN_EMBEDDING][0]
    layers = numbered(shapes, "text_model.encoder.layers.", source)
    fc1 = [shape[0] for k, (shape, _) in shapes.items() if k.endswith("mlp.fc1.weight")]
    positions = shapes.get("text_model.embeddings.position_embedding.weight")
    return CLIPParams(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=fc1[0] if fc1 else CLIP_L.intermediate_size,
        num_layers=layers,
        num_heads=max(1, hidden_size // 64),
        max_position_embeddings=positions[0][0] if positions else CLIP_L.max_position_embeddings,
        layer_norm_eps=CLIP_L.layer_norm_eps,
        hidden_act=CLIP_L.hidden_act,
        eos_token_id=CLIP_L.eos_token_id,
    )


def _clip_params_from_config(file: Path, params: CLIPParams) -> CLIPParams:
    """`params` with the fields that config.json (or its "text_config", for a full CLIP) sets."""
    config = read_json(file)
    config = config.get("text_config") or config
    values = {f.name: config.get(CLIP_CONFIG_NAMES.get(f.name, f.name)) for f in fields(CLIPParams)}
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
    prefix = _clip_prefix(path, shapes)
    shapes = {name: shape for key, shape in shapes.items() if (name := _official_name(key, prefix))}
    with sizes_of(path, "CLIP text model"):
        params = _clip_params_from_shapes(shapes, path)
    if path.is_dir() and (path / "config.json").is_file():
        params = _clip_params_from_config(path / "config.json", params)
        layers_agree(params.num_layers, numbered(shapes, "text_model.encoder.layers.", path), path / "config.json")

    sd = read_state_dict(path, dtype, select=lambda key: _official_name(key, prefix) is not None)
    sd = {_official_name(key, prefix): t for key, t in sd.items()}
    dtype = dtype or sd[CLIP_TOKEN_EMBEDDING].dtype
    sd = {k: t.to(dtype) for k, t in sd.items()}  # one dtype for all, should a file mix them

    with torch.device("meta"), sizes_of(path, "CLIP text model"):
        model = CLIPTextModel(params)
    load_into(model, sd, path, what="CLIP text model")
    return CLIPEmbedder(model.to(device).eval(), _find_tokenizer(path), source=path)


# --- T5 ------------------------------------------------------------------------------------------------------


def _t5_prefix(keys, source) -> str:
    """The prefix before the T5 keys, e.g. "text_encoders.t5xxl.transformer." in an all-in-one checkpoint."""
    found = sorted(k[: -len(T5_ANCHOR)] for k in keys if k == T5_ANCHOR or k.endswith("." + T5_ANCHOR))
    if not found:
        raise WeightsError(f"{source}: not a T5 encoder: no key {T5_ANCHOR!r} (keys look like {sorted(keys)[:3]})")
    return found[0]


def _t5_params(path: Path, shapes: dict, prefix: str = "") -> T5Params:
    """The config from a config.json next to the weights, else read off the tensor shapes.

    Shapes give every size; the two numbers they cannot give (max distance, eps) are T5-XXL's.
    """
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        config = read_json(config_file)
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
        num_layers=numbered(shapes, "encoder.block.", path),
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
    prefix = _t5_prefix(shapes, path)
    shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    # The embedding is tied: files hold it as shared.weight, encoder.embed_tokens.weight, or both.
    tied = ["shared.weight", "encoder.embed_tokens.weight"]
    if tied[0] not in shapes and tied[1] in shapes:
        shapes[tied[0]] = shapes[tied[1]]
    with sizes_of(path, "T5 encoder"):
        params = _t5_params(path, shapes, prefix)
    layers_agree(params.num_layers, numbered(shapes, "encoder.block.", path), path)

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

    with torch.device("meta"), sizes_of(path, "T5 encoder"):
        model = T5Encoder(params)
    load_into(model, sd, path, "T5 encoder")
    model = model.to(device).eval()

    tokenizer = None
    for folder in (path.parent / "tokenizer_2", path if path.is_dir() else path.parent):
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            tokenizer = T5Tokenizer(folder, max_length)
            break
    return T5Embedder(model, tokenizer, str(path))


# --- where the parts are ---------------------------------------------------------------------------------------

# What each part is called inside a folder, tried in order: a diffusers repo, a BFL repo, a train.py run folder.
PART_NAMES = {
    "flux": ("transformer", "flux1-*.safetensors", "transformer.safetensors"),
    "ae": ("ae.safetensors", "vae"),
    "clip": ("text_encoder",),
    "t5": ("text_encoder_2",),
}


@dataclass
class WeightPaths:
    """The weights of the four parts: the transformer, the VAE, CLIP-L and T5 (None where none was found)."""

    flux: Path | None = None
    ae: Path | None = None
    clip: Path | None = None
    t5: Path | None = None

    def require(self, where) -> "WeightPaths":
        """Self, or WeightsError naming the first path that does not exist, or the first part that has none and
        what `where` should have held."""
        for part in PART_NAMES:
            path = getattr(self, part)
            if path is not None and not path.exists():
                raise WeightsError(f"{path}: no such file or folder (the {part} weights)")
        for part, names in PART_NAMES.items():
            if getattr(self, part) is None:
                raise WeightsError(
                    f"{where}: holds none of {', '.join(names)}"
                    if where
                    else f"no path for the {part}: give an official repo folder or its file"
                )
        return self


def find_weights(folder=None, flux=None, ae=None, clip=None, t5=None) -> WeightPaths:
    """The paths given, and for the others what `folder` holds: an official repo (diffusers: transformer/, vae/;
    BFL: flux1-*.safetensors, ae.safetensors; both: text_encoder/, text_encoder_2/) or a train.py run folder
    (transformer.safetensors, ae.safetensors, text_encoder/, text_encoder_2/)."""
    given = {"flux": flux, "ae": ae, "clip": clip, "t5": t5}
    paths = WeightPaths()
    for part, names in PART_NAMES.items():
        if given[part] is not None:
            setattr(paths, part, Path(given[part]))
        elif folder is not None:
            found = [p for name in names for p in sorted(Path(folder).glob(name))]
            setattr(paths, part, found[0] if found else None)
    return paths
