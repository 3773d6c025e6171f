"""minflux: FLUX.1 by hand in PyTorch. See README.md for a map of the files.

The model (this folder's top level) imports only torch, einops and math; files/ reads and writes files, tasks/
holds what training needs, study/ the tools for reading and measuring, pipeline.py joins them for sampling.
"""

# the transformers: FLUX.1 and, beside it, FLUX.2
from minflux.model import Flux, FluxParams, compile_blocks
from minflux.flux2 import Flux2, Flux2Params
from minflux.presets import ModelSpec, configs
from minflux.attention import AttentionMaps, attention_backend

# flow matching: one recipe for sampling, one loss for training
from minflux.sampling import (
    Inputs,
    denoise,
    empirical_mu,
    fill_condition,
    flow_matching_loss,
    generate,
    get_noise,
    get_noise_flux2,
    get_schedule,
    get_schedule_flux2,
    interpolate,
    latent_ids,
    latent_ids_flux2,
    pack,
    pack_flux2,
    pack_mask,
    prepare,
    prepare_fill,
    prepare_flux2,
    prepare_img_ids,
    prepare_kontext,
    prepare_txt_ids,
    reference_condition,
    sample_t,
    txt_ids_flux2,
    unpack,
    unpack_flux2,
    velocity_target,
)

# autoencoder and text encoders
from minflux.autoencoder import AE_PARAMS_FLUX, AE_PARAMS_FLUX2, AutoEncoder, AutoEncoderParams, Flux2AutoEncoder
from minflux.clip import CLIP_L, CLIPParams, CLIPTextModel
from minflux.t5 import T5_XXL, T5Encoder, T5Params
from minflux.qwen3 import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, Qwen3, Qwen3Params

# LoRA and the semantic injection
from minflux.lora import (
    DEFAULT_TARGETS,
    DEFAULT_TARGETS_FLUX2,
    TARGET_GROUPS,
    LoRALinear,
    apply_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    unload_lora,
)
from minflux.semantic import SEMANTIC_MODES, SemanticConditioningAdapter, SemanticCrossAttention, Vis2IR

# Reading and writing files, the tasks and the pipelines: the same names, imported when first used, so that
# `import minflux.model` (or any model file) loads the model files alone.
_ELSEWHERE = {
    "minflux.files.weights": ["WeightsError"],
    "minflux.files.load": ["CLIPEmbedder", "T5Embedder", "find_weights", "load_ae", "load_clip", "load_flux", "load_t5",
                           "save_flux"],
    "minflux.files.lora_files": ["load_lora", "read_lora", "save_lora"],
    "minflux.files.tokenizers": ["CLIPTokenizer", "ChatTokenizer", "T5Tokenizer"],
    "minflux.files.images": ["DataError"],
    "minflux.tasks.scenes": ["CLASSES", "SyntheticTriptychs", "make_scene", "split_triptych"],
    "minflux.tasks.data": ["CaptionFolder", "TriptychFolder"],
    "minflux.tasks.vis2ir": ["encode_triptych", "generate_infrared", "prepare_vis2ir"],
    "minflux.files.load_flux2": ["load_flux2"],
    "minflux.files.load_llm": ["LLMEmbedder", "load_mistral", "load_qwen3"],
    "minflux.pipeline": ["FluxPipeline", "Vis2IRPipeline"],
    "minflux.pipeline_flux2": ["Flux2Pipeline"],
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _ELSEWHERE.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'minflux' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted([*globals(), *_MODULE_OF])
