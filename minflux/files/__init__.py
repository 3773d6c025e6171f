"""Reading and writing files: weights and their key tables, LoRA files, tokenizer folders, images and PNGs.

    weights.py      safetensors and sharded folders, lazy reads, atomic writes, WeightsError
    keys.py         the other tools' key names (diffusers, ComfyUI, kohya, PEFT, BFL, XLabs), as data
    load.py         load_flux, load_ae, load_clip, load_t5; find_weights (a repo or run folder → the parts)
    lora_files.py   read_lora, load_lora, save_lora in every common layout
    tokenizers.py   CLIPTokenizer, T5Tokenizer, and small vocabularies written in their formats
    images.py       images as tensors, PNGs with their settings, grids and plots
"""
