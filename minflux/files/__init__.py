"""Reading and writing files: weights and their key tables, LoRA files, tokenizer folders, images and PNGs.

weights.py      safetensors and sharded folders, lazy reads, atomic writes, WeightsError
keys.py         the other tools' key names (diffusers, ComfyUI, kohya, PEFT, BFL, XLabs), as data
load.py         load_flux, load_ae, load_clip, load_t5; find_weights (a repo or run folder → the parts)
load_flux2.py   load_flux2 (FLUX.2's transformer, which load_flux hands on) and its diffusers key table
load_llm.py     load_qwen3, load_mistral: FLUX.2's text encoders from their HF folders, with the tokenizer
lora_files.py   read_lora, load_lora, save_lora in every common layout
tokenizers.py   CLIPTokenizer, T5Tokenizer, ChatTokenizer (Qwen3's, Mistral's chat templates), small vocabularies
images.py       images as tensors, PNGs with their settings, grids and plots
"""

import sys
import warnings
from pathlib import Path

import torch

# minflux's frames, and torch's (its no_grad decorator wraps minflux's pipelines), are not the user's
_PACKAGES = (str(Path(__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parent))


def warn_caller(message: str) -> None:
    """warnings.warn, pointing at the first line outside minflux (and torch) that led here: the user's call, not a
    @stage wrapper (hooks.py), a torch.no_grad wrapper or another minflux frame in between."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is the frame that called this function
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
