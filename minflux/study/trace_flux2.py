"""The shape trace of FLUX.2: one 1024×1024 sampling step with two 1024×1024 reference images, on the meta device.

    python -m minflux.study.trace flux2-klein-4b                      Qwen3-4B, the VAE, the transformer
    python -m minflux.study.trace flux2-dev                           Mistral Small 3.2, the guidance embedding
    python -m minflux.study.trace flux2-klein-base-4b --references 0  text to image, true CFG against ""
    python -m minflux.study.trace flux2-klein-4b --params             parameters of each part, block types folded

FLUX.1's trace (minflux/study/trace.py: the same stages, lines and folding) run through FLUX.2's one recipe,
`prepare_flux2` then `generate`, with every part at full size on the meta device:
- the text encoder is the real language model (minflux/qwen3.py: Qwen3-4B for [klein] 4B, Qwen3-8B for 9B, Mistral
  Small 3.2 for [dev]), built up to the deepest layer read, as FLUX.2 runs it; the prompt becomes 512 token ids
  (zeros, with a full mask: no tokenizer file is read) and goes through LLMEmbedder, the loaders' encoder;
- the VAE is Flux2AutoEncoder: it encodes each reference alone, then decodes the generated latent;
- the transformer is Flux2 (minflux/flux2.py); its image tokens are the target's, then the references'.
The lines FLUX.1's trace has no rule for are annotated here: the hidden states the text encoder stacks, its
grouped-query attention, the double blocks' SwiGLU MLPs, the references' times, the VAE's patches, true CFG.
"""

import torch
from torch import Tensor

from minflux.files.load_llm import LLMEmbedder
from minflux.presets import ModelSpec, configs
from minflux.qwen3 import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, Qwen3Params
from minflux.sampling import generate, prepare_flux2
from minflux.study.params import flux2_text_encoder, meta_components
from minflux.study.trace import ShapeTrace, shape_trace

LANGUAGE_MODELS = {"Qwen3-4B": QWEN3_4B, "Qwen3-8B": QWEN3_8B, "Mistral Small 3.2": MISTRAL_SMALL_3_2}


class MetaTokenizer:
    """ChatTokenizer's stand-in on the meta device: every prompt → `length` token ids (zeros) and a full mask."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        count = 1 if isinstance(prompts, str) else len(prompts)
        ids = torch.zeros(count, self.length, dtype=torch.long, device="meta")  # [B, 512]
        return ids, torch.ones_like(ids)


def language_model_name(llm: Qwen3Params) -> str:
    return next((name for name, params in LANGUAGE_MODELS.items() if params == llm), "a small Qwen3")


def flux2_annotations(llm: Qwen3Params, layers, spec: ModelSpec, references: int) -> dict[str, str]:
    """What FLUX.2's lines add to their shapes, by the end of their label."""
    hidden, width, mlp = llm.hidden_size, spec.params.hidden_size, int(spec.params.hidden_size * spec.params.mlp_ratio)
    z, cfg = spec.ae_params.z_channels, spec.true_cfg  # 32 latent channels; true CFG 4.0 for klein Base
    read = f"{language_model_name(llm)}: hidden states {', '.join(map(str, layers))} of {llm.num_layers}"
    times = ", ".join(str(10 * (k + 1)) for k in range(references))
    return {
        "text_encoder (Qwen3)": f"{read}, side by side: {len(layers)} × {hidden} = {len(layers) * hidden}",
        "self_attn (Attention)": (
            f"grouped-query: {llm.num_heads} query heads share {llm.num_kv_heads} key/value heads of {llm.head_dim}"
        ),
        "reference_condition": f"each reference encoded alone, at t = 10 · (k + 1): {times}",
        "Flux2AutoEncoder.encode": f"the mean, {z} of the {2 * z} channels; each 2×2 patch onto the channels: {4 * z}",
        "Flux2AutoEncoder.decode": f"{4 * z} channels back to 2×2 patches of {z}, the normalisation undone first",
        "_mlp (Sequential)": f"SwiGLU: {width} → 2 · {mlp}, silu(a) · b → {mlp}, → {width}",
        "euler step": f"true CFG {cfg:g}: v = v_neg + {cfg:g} · (v − v_neg)" if cfg != 1.0 else "",
    }


def trace_flux2(
    preset: str,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    steps: int = 1,
    text_length: int = 512,
    references: int = 2,
    quiet: bool = False,
) -> ShapeTrace:
    """One sampling step of a FLUX.2 preset at full size on the meta device, through prepare_flux2 and generate,
    with `references` reference images of height × width; klein Base with true CFG against the empty prompt."""
    spec = configs[preset]
    llm, layers = flux2_text_encoder(spec.params)
    flux, ae, text_model = meta_components(preset).values()
    encoder = LLMEmbedder(text_model, MetaTokenizer(text_length), layers, source="meta")
    meta = torch.device("meta")
    with torch.no_grad(), shape_trace(True, transformer=flux, ae=ae, text_encoder=text_model) as trace:
        noise = torch.randn(batch, ae.latent_channels, height // 16, width // 16, device=meta)  # [1, 128, 64, 64]
        images = [torch.randn(batch, 3, height, width, device=meta) for _ in range(references)]  # [1, 3, 1024, 1024]
        inp = prepare_flux2(encoder, noise, ["a prompt"] * batch, ae, images)
        negative = prepare_flux2(encoder, noise, [""] * batch, ae, images) if spec.true_cfg != 1.0 else None
        guidance = spec.guidance if flux.params.guidance_embed else None
        generate(flux, ae, inp, steps, guidance, negative=negative, true_cfg_scale=spec.true_cfg)
    annotations = flux2_annotations(llm, layers, spec, references)
    for stage in trace.stages:
        note = next((text for end, text in annotations.items() if stage.label.endswith(end) and text), None)
        stage.note = "; ".join(filter(None, (stage.note, note)))
    if not quiet:
        print(
            f"{references} reference image(s) of {height}×{width}; text encoder {language_model_name(llm)}, "
            f"{len(text_model.model.layers)} of its {llm.num_layers} layers run, {text_length} tokens\n{trace.text()}",
            flush=True,
        )
    return trace
