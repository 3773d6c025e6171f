"""How two tools that are not test dependencies read minflux's files, written out from their code.

ComfyUI, LoRA files (comfy/lora.py: model_lora_keys_unet builds the names a LoRA may give each weight, load_lora
takes the pairs it finds under those names and warns "lora key not loaded" for every other key;
comfy/weight_adapter/lora.py: LoRAAdapter.load and calculate_weight):

    names of weight K = "diffusion_model.<official key>.weight":
        "lora_unet_" + <official key with "." → "_">          kohya / sd-scripts
        "diffusion_model.<official key>"                      the generic format
    parts found under a name x (first match wins):
        x.lora_up.weight / x.lora_down.weight, x_lora.up.weight / x_lora.down.weight, x.lora_B.weight / x.lora_A.weight,
        x.lora.up.weight / x.lora.down.weight,  x.lora_linear_layer.up.weight / ....down.weight;  x.alpha if present
    W += strength · (alpha / rank, or 1 without an alpha) · up @ down

  (Its FLUX branch also maps diffusers' module names, "transformer.<diffusers name>", onto row ranges of the fused
  official weights; that table is comfy.utils.flux_to_diffusers and is not written out here.)

ComfyUI, a dropped PNG (its frontend's app.ts, handleFile): JSON.parse the "workflow" text chunk if there is one,
else JSON.parse the "prompt" chunk, else give the "parameters" chunk to importA1111.

AUTOMATIC1111 / Forge, the PNG "parameters" text chunk (modules/infotext_utils.py: parse_generation_parameters,
unquote): the last line holds "Key: value" pairs (the regex below; at least 3 of them, or it is prompt text); a
value in double quotes is JSON; "WxH" values become Key-1 and Key-2; the lines before it are the prompt, and from
a line starting "Negative prompt:" on, the negative prompt.
"""

import json
import re

COMFYUI_LORA_PARTS = [  # (up, down), in the order LoRAAdapter.load tries them
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
]


def comfyui_key_map(official_keys) -> dict[str, str]:
    """model_lora_keys_unet for a FLUX model: {name a LoRA may use: the model weight it patches}."""
    key_map = {}
    for key in official_keys:
        k = "diffusion_model." + key
        if k.endswith(".weight"):
            key_map["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = k
            key_map[k.removesuffix(".weight")] = k
        else:
            key_map[k] = k
    return key_map


def comfyui_load_lora(lora: dict, key_map: dict) -> tuple[dict, list[str]]:
    """load_lora: ({model weight: (up, down, alpha or None)}, [the keys it warns "lora key not loaded" for])."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in COMFYUI_LORA_PARTS:
            if x + up in lora:
                patches[target] = (lora[x + up], lora[x + down], alpha)
                loaded |= {x + up, x + down}
                break
    return patches, [k for k in lora if k not in loaded]


def comfyui_apply(state_dict: dict, patches: dict, strength: float = 1.0) -> dict:
    """The official-key state dict with every patch applied (ComfyUI's weights carry "diffusion_model.")."""
    out = dict(state_dict)
    for target, (up, down, alpha) in patches.items():
        key = target.removeprefix("diffusion_model.")
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = up.flatten(1).float() @ down.flatten(1).float()
        out[key] = state_dict[key] + strength * scale * diff.reshape(state_dict[key].shape)
    return out


A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse_parameters(text: str) -> dict[str, str]:
    """parse_generation_parameters without the UI's defaults: {"Prompt", "Negative prompt", each key of the last
    line}."""
    res, prompt, negative, done_with_prompt = {}, "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(A1111_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in A1111_PARAM.findall(lastline):
        if v[:1] == '"' and v[-1:] == '"':
            try:
                v = json.loads(v)
            except Exception:  # A1111's unquote keeps the text as it is
                pass
        m = A1111_SIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def comfyui_png_drop(text_chunks: dict[str, str]) -> str:
    """What ComfyUI's frontend does with a dropped PNG (app.ts handleFile): JSON.parse the "workflow" chunk, else
    JSON.parse the "prompt" chunk, else hand "parameters" to importA1111. Returns the chunk used, or "none";
    raises ValueError where ComfyUI's JSON.parse would throw."""
    for key in ("workflow", "prompt"):
        if key in text_chunks:
            json.loads(text_chunks[key])
            return key
    return "parameters" if "parameters" in text_chunks else "none"
