"""minflux: FLUX.1 by hand in PyTorch. See README.md for a map of the files."""

# the transformer
from minflux.model import Flux, FluxParams
from minflux.presets import ModelSpec, configs
from minflux.loaders import load_flux, save_flux
from minflux.attention import AttentionMaps, attention_backend

# flow matching
from minflux.flow import (
    denoise,
    fill_condition,
    get_schedule,
    interpolate,
    latent_ids,
    pack,
    pack_mask,
    prepare_img_ids,
    prepare_txt_ids,
    sample_t,
    unpack,
    velocity_target,
)

# autoencoder
from minflux.autoencoder import AE_PARAMS_FLUX, AutoEncoder, AutoEncoderParams, load_ae

# text encoders
from minflux.clip import CLIP_L, CLIPEmbedder, CLIPParams, CLIPTextModel, CLIPTokenizer, load_clip
from minflux.t5 import T5_XXL, T5Embedder, T5Encoder, T5Params, T5Tokenizer, load_t5

# LoRA
from minflux.lora import (
    DEFAULT_TARGETS,
    TARGET_GROUPS,
    LoRALinear,
    inject_lora,
    load_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    read_lora,
    save_lora,
    unload_lora,
)

# data and the vis2ir task
from minflux.data import CLASSES, DataError, SyntheticTriptychs, TriptychFolder, make_scene, split_triptych
from minflux.vis2ir import SEMANTIC_MODES, Vis2IR, encode_triptych, generate_infrared, vis2ir_loss

# sampling pipelines
from minflux.pipeline import FluxPipeline, Vis2IRPipeline

# semantic conditioning
from minflux.semantic import SemanticConditioningAdapter, SemanticCrossAttention

# weights I/O
from minflux.weights import WeightsError
