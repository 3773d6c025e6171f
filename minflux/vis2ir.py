"""vis2ir: visible → infrared translation as FLUX.1-Fill in-context inpainting, guided by a semantic map.

The training step of seeds 000/001, with the seeds' shapes (512-pixel panels, batch 4):

    triptych [B, 3, 512, 1536] = [visible | infrared target | semantic]
    diptych  [B, 3, 512, 1024] = [visible | target];  mask [B, 1, 512, 1024] = 1 on the target half
    x_0      [B, 2048, 64]   packed latent of the diptych (the clean image the flow ends at)
    x_cond   [B, 2048, 320]  Fill condition: packed latent of the diptych with the target erased (64)
                             + the packed 8×8 mask (256)
    semantic [B, 1024, 64]   packed latent of the semantic panel (frozen VAE, no gradient)
    x_t = (1 − t) x_0 + t ε;  x_t' = injection(x_t, semantic)  → cat(x_t', x_cond) [B, 2048, 384]
    v = FLUX-Fill(...) [B, 2048, 64];  loss = MSE(v, ε − x_0) over the whole diptych (the sampler denoises
    both halves), or with target_only over the target half alone

Design choice (the seeds write [B, 2048, 64] for the semantic tokens, but a 512×512 panel packs to
[B, 1024, 64]): the semantic panel is encoded alone, 1024 tokens, and its tokens get the position ids of
the *target* half of the diptych. The 2048 image queries attend to those 1024 keys; with positions on
(semantic="xattn_rope") a target token and the semantic token of the same place share (row, col).

Semantic injection modes, for the seeds' ablations:
    none        no semantic map
    pixel       the seeds' baseline: the semantic map blended into the visible panel before encoding
    zeroconv    seed 002 plan A: a zero-initialised linear map of the semantic tokens added to x_cond
    xattn       seed 001 exactly: SemanticConditioningAdapter on x_t, no positions
    xattn_rope  the same with RoPE on Q and K from the tokens' 2D ids
    blocks      seed 002 plan B: inside every double and single block, the image tokens attend to the
                semantic tokens (projected to the transformer's width), zero-gated, with positions
"""

import math
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.data import split_triptych
from minflux.flow import fill_condition, interpolate, latent_ids, pack, prepare_img_ids, velocity_target
from minflux.semantic import SemanticConditioningAdapter, SemanticCrossAttention

SEMANTIC_MODES = ("none", "pixel", "zeroconv", "xattn", "xattn_rope", "blocks")


def target_mask(batch: int, height: int, width: int, device=None) -> Tensor:
    """The Fill mask of a diptych height × width: 1 on the right (target) half, where the model generates."""
    mask = torch.zeros(batch, 1, height, width, device=device)
    mask[..., width // 2 :] = 1.0
    return mask  # [B, 1, 512, 1024]


def right_half_ids(batch: int, h: int, w: int, device=None) -> Tensor:
    """Ids of the target half of an h × 2w token grid, for the semantic panel's h × w tokens."""
    ids = prepare_img_ids(batch, h, w, device=device).clone()  # an h × w grid: rows, cols 0..w-1
    ids[..., 2] += w  # shifted to the right half's columns
    return ids  # [B, 1024, 3]


@torch.no_grad()
def encode_triptych(ae, triptych: Tensor, semantic: str = "xattn_rope", pixel_alpha: float = 0.5) -> dict:
    """The frozen-VAE part of the step: everything the trainable part needs, from a batch of triptychs."""
    visible, infrared, sem_img = split_triptych(triptych)  # [B, 3, 512, 512] each
    if semantic == "pixel":
        visible = (1 - pixel_alpha) * visible + pixel_alpha * sem_img
    diptych = torch.cat((visible, infrared), dim=-1)  # [B, 3, 512, 1024]
    B, _, H, W = diptych.shape
    mask = target_mask(B, H, W, device=diptych.device)  # [B, 1, 512, 1024]
    z = ae.encode(diptych, sample=False)  # [B, 16, 64, 128]
    out = {
        "x0": pack(z),  # [B, 2048, 64]
        "x_cond": fill_condition(ae, diptych, mask, sample=False),  # [B, 2048, 320]
        "img_ids": latent_ids(z),  # [B, 2048, 3]
        "target_tokens": pack(mask[:, :, ::8, ::8].expand(-1, 4, -1, -1))[..., 0] > 0.5,  # [B, 2048] bool
    }
    if semantic in ("zeroconv", "xattn", "xattn_rope", "blocks"):
        s = ae.encode(sem_img, sample=False)  # [B, 16, 64, 64]
        out["semantic"] = pack(s)  # [B, 1024, 64]
        out["semantic_ids"] = right_half_ids(B, s.shape[2] // 2, s.shape[3] // 2, device=s.device)  # [B, 1024, 3]
    return out


class BlockInjection(nn.Module):
    """Seed 002 plan B: a zero-gated cross-attention to the semantic tokens after every transformer block.

    The transformer's own code is left as it is: each block gets a forward hook that, while Vis2IR runs it,
    lets the block's image tokens attend to the semantic tokens. Each SemanticCrossAttention's zero-initialised
    scale is its gate, so at initialisation the blocks compute exactly what they computed before.
    """

    def __init__(self, flux: nn.Module, heads: int):
        super().__init__()
        p = flux.params
        self.proj = nn.Linear(64, p.hidden_size)  # semantic tokens to the transformer's width: [B, 1024, 3072]
        self.double_attn = nn.ModuleList(SemanticCrossAttention(p.hidden_size, heads) for _ in range(p.depth))
        self.single_attn = nn.ModuleList(SemanticCrossAttention(p.hidden_size, heads) for _ in range(p.depth_single_blocks))
        self.context = None  # (semantic [B, 1024, 3072], positions, text length) while Vis2IR runs the blocks
        for block, attn in zip(flux.double_blocks, self.double_attn):
            block.register_forward_hook(partial(self._after_double, attn))
        for block, attn in zip(flux.single_blocks, self.single_attn):
            block.register_forward_hook(partial(self._after_single, attn))

    def _after_double(self, attn, block, args, output):
        if self.context is None:
            return output
        img, txt = output  # [B, 2048, 3072], [B, 512, 3072]
        semantic, positions, _ = self.context
        return attn(img, semantic, positions), txt

    def _after_single(self, attn, block, args, output):
        if self.context is None:
            return output
        semantic, positions, n_txt = self.context
        txt, img = output[:, :n_txt], output[:, n_txt:]  # [B, 512, 3072], [B, 2048, 3072]
        return torch.cat((txt, attn(img, semantic, positions)), dim=1)


class Vis2IR(nn.Module):
    """The trainable whole: a FLUX Fill transformer and the semantic injection in front of it.

    Called like the transformer, plus `semantic` and `semantic_ids`, so the plain `denoise` loop samples it.
    """

    def __init__(self, flux: nn.Module, semantic: str = "xattn_rope", layers: int = 1, heads: int = 8):
        super().__init__()
        if semantic not in SEMANTIC_MODES:
            raise ValueError(f"semantic mode {semantic!r}: expected one of {', '.join(SEMANTIC_MODES)}")
        if flux.params.in_channels != 384:
            raise ValueError(f"vis2ir needs a Fill transformer (384 input channels), got {flux.params.in_channels}")
        self.flux = flux
        self.semantic = semantic
        if semantic in ("xattn", "xattn_rope"):
            self.adapter = SemanticConditioningAdapter(dim=64, num_layers=layers, num_heads=heads)
        if semantic == "zeroconv":
            self.zero_conv = nn.Linear(64, 320)  # a 1×1 convolution on the packed tokens
            nn.init.zeros_(self.zero_conv.weight)
            nn.init.zeros_(self.zero_conv.bias)
        if semantic == "blocks":
            self.blocks = BlockInjection(flux, heads)

    def injection_state_dict(self) -> dict[str, Tensor]:
        """The semantic injection's tensors alone (adapter.safetensors): every key outside the transformer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("flux.")}

    def inject(self, x_t: Tensor, x_cond: Tensor, semantic: Tensor | None, semantic_ids: Tensor | None, img_ids):
        """(x_t, x_cond) → (x_t', x_cond'), the semantic map injected as the mode says."""
        if self.semantic in ("xattn", "xattn_rope"):
            positions = (img_ids, semantic_ids) if self.semantic == "xattn_rope" else None
            x_t = self.adapter(x_t, semantic, positions)  # [B, 2048, 64]
        elif self.semantic == "zeroconv":
            h = math.isqrt(semantic.shape[1])  # the panels are square: the semantic grid is h × h, the diptych's h × 2h
            added = rearrange(self.zero_conv(semantic), "b (h w) c -> b h w c", h=h)  # [B, 32, 32, 320]
            added = torch.cat((torch.zeros_like(added), added), dim=2)  # nothing on the visible half
            x_cond = x_cond + rearrange(added, "b h w c -> b (h w) c")  # [B, 2048, 320]
        return x_t, x_cond

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, semantic=None, semantic_ids=None):
        x_t, x_cond = img[..., :64], img[..., 64:]  # [B, 2048, 64], [B, 2048, 320]
        x_t, x_cond = self.inject(x_t, x_cond, semantic, semantic_ids, img_ids)
        img = torch.cat((x_t, x_cond), dim=-1)  # [B, 2048, 384]
        if self.semantic != "blocks":
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance)  # [B, 2048, 64]
        self.blocks.context = (self.blocks.proj(semantic), (img_ids, semantic_ids), txt.shape[1])
        try:
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        finally:
            self.blocks.context = None


def vis2ir_loss(
    model: Vis2IR, batch: dict, txt: Tensor, txt_ids: Tensor, y: Tensor, t: Tensor, noise: Tensor,
    guidance: Tensor | None = None, target_only: bool = False,
) -> Tensor:  # fmt: skip
    """Flow-matching loss of one batch (the output of encode_triptych plus text embeddings)."""
    x0 = batch["x0"]  # [B, 2048, 64]
    x_t = interpolate(x0, noise, t)
    v = model(
        torch.cat((x_t, batch["x_cond"]), dim=-1), batch["img_ids"], txt, txt_ids, t, y, guidance,
        semantic=batch.get("semantic"), semantic_ids=batch.get("semantic_ids"),
    )  # fmt: skip
    err = (v.float() - velocity_target(x0, noise).float()).pow(2).mean(-1)  # [B, 2048]
    if target_only:
        weights = batch["target_tokens"].float()
        return (err * weights).sum() / weights.sum()
    return err.mean()


@torch.no_grad()
def generate_infrared(
    model: Vis2IR, ae, batch: dict, txt: Tensor, txt_ids: Tensor, y: Tensor, num_steps: int,
    guidance: float = 1.0, seed: int = 0,
) -> Tensor:  # fmt: skip
    """Sample the target half of each diptych and decode it: the generated infrared panels [B, 3, H, W].

    `batch` is encode_triptych's output. The semantic tokens are bound to the model for the whole loop, so the
    plain `denoise` drives it like any FLUX model.
    """
    from functools import partial

    from minflux.flow import denoise, get_schedule, unpack

    x0 = batch["x0"]  # only its shape and dtype: the clean latent is what we generate
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0)  # [B, 2048, 64]
    step_model = partial(model, semantic=batch.get("semantic"), semantic_ids=batch.get("semantic_ids"))
    timesteps = get_schedule(num_steps, x0.shape[1], shift=True)
    latent = denoise(
        step_model, noise, batch["img_ids"], txt, txt_ids, y, timesteps, guidance=guidance, img_cond=batch["x_cond"]
    )  # [B, 2048, 64]
    h = int(batch["img_ids"][0, :, 1].max()) + 1  # token rows
    w = int(batch["img_ids"][0, :, 2].max()) + 1  # token columns
    ae_dtype = next(ae.parameters()).dtype  # bf16 on CUDA: the latent meets the decoder in its dtype
    diptych = ae.decode(unpack(latent.to(ae_dtype), 16 * h, 16 * w))  # [B, 3, 512, 1024]
    return diptych[..., diptych.shape[-1] // 2 :]  # the target half: [B, 3, 512, 512]


def load_run(run, device="cpu", dtype=None) -> dict:
    """A finished `python train.py` run folder, loaded: model (Vis2IR), ae, clip, t5 and the run's config.

    A from-scratch run holds transformer.safetensors; a LoRA run holds lora.safetensors and names its base
    weights in config.toml. The semantic adapter, if the run has one, is in adapter.safetensors.
    """
    import tomllib
    from pathlib import Path

    from minflux.autoencoder import load_ae
    from minflux.clip import load_clip
    from minflux.loaders import load_flux
    from minflux.lora import load_lora
    from minflux.t5 import load_t5
    from minflux.weights import WeightsError, read_state_dict

    run = Path(run)
    if not (run / "config.toml").is_file():
        raise WeightsError(f"{run}: not a train.py run folder (no config.toml)")
    cfg = tomllib.loads((run / "config.toml").read_text())
    base = run / "transformer.safetensors" if (run / "transformer.safetensors").exists() else cfg.get("flux")
    if base is None:
        raise WeightsError(f"{run}: holds no transformer.safetensors and its config.toml names no --flux")
    flux = load_flux(base, device=device, dtype=dtype)
    if (run / "lora.safetensors").exists():
        load_lora(flux, run / "lora.safetensors")
    model = Vis2IR(flux, cfg.get("semantic", "xattn_rope"), cfg.get("adapter_layers", 1), cfg.get("adapter_heads", 8))
    adapter = model.injection_state_dict()
    if adapter:
        sd = read_state_dict(run / "adapter.safetensors", dtype=dtype)
        missing = set(adapter) - set(sd)
        if missing:
            raise WeightsError(f"{run / 'adapter.safetensors'}: missing key(s) {sorted(missing)[:3]}")
        model.load_state_dict({**model.state_dict(), **sd})
    model = model.to(device).eval()
    ae_path = run / "ae.safetensors" if (run / "ae.safetensors").exists() else cfg["ae"]
    clip_path = run / "text_encoder" if (run / "text_encoder").is_dir() else cfg["clip"]
    t5_path = run / "text_encoder_2" if (run / "text_encoder_2").is_dir() else cfg["t5"]
    return {
        "model": model,
        "ae": load_ae(ae_path, device=device, dtype=dtype),
        "clip": load_clip(clip_path, device=device, dtype=dtype),
        "t5": load_t5(t5_path, max_length=cfg.get("t5_max_length", 512), device=device, dtype=dtype),
        "config": cfg,
    }
