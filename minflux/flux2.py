"""The FLUX.2 transformer ([dev], [klein] 4B / 9B): FLUX.1's MM-DiT with shared modulation and SwiGLU MLPs.

The shapes in the comments are those of one running example: FLUX.2 [klein] 4B at 1024×1024 with two reference
images, batch 1 (B), a 512-token prompt. Each image is 64×64 = 4096 tokens (the VAE's 8× and a 2×2 patch): the
target's 4096 followed by the references' 2 × 4096 make 12288 image tokens, and 512 + 12288 = 12800 in the joint
sequence [txt | img]. Hidden size 3072 = 24 heads × 128.

    img    [B, 12288, 128]   packed latent tokens (32 channels × 2×2)  --img_in-->  [B, 12288, 3072]
    txt    [B, 512, 7680]    Qwen3 hidden states of 3 layers, stacked  --txt_in-->  [B, 512, 3072]
    vec    [B, 3072]         time (+ guidance for [dev]); no pooled text vector
    modulations, once for all blocks: double img 6 × [B, 1, 3072], double txt 6 ×, single 3 ×
    5 × DoubleStreamBlock: img and txt keep separate weights, attend jointly over [txt | img]
    concatenate              [B, 12800, 3072]
    20 × SingleStreamBlock: one stream, attention and SwiGLU MLP in parallel
    drop the text tokens, final adaptive norm + linear  -->  v [B, 12288, 128]
    (the sampler keeps the target's 4096 tokens: v [B, 4096, 128])

What differs from FLUX.1 (minflux/model.py), whose pieces are reused here:
- no biases anywhere; no vector_in (no pooled CLIP); [klein] has no guidance embedding;
- the blocks hold no modulation: three model-level Modulations, computed from vec once per forward, are handed to
  every block (one for the double blocks' image stream, one for their text stream, one for the single blocks);
- the MLPs are SwiGLU (silu(a) · b) with mlp_ratio 3: the first linear layer makes a and b, 2 · 9216 channels;
- RoPE over 4 id axes (t, h, w, l), 32 channels each, theta 2000. Text ids are (0, 0, 0, i), image ids (t, h, w, 0)
  with t = 0 for the target and t = 10, 20, ... for the references.

Module and parameter names are the keys of the official flux2-*.safetensors files, so those files load with
`load_state_dict` and no mapping table.

References: black-forest-labs/flux2 (src/flux2/model.py); diffusers Flux2Transformer2DModel; Shazeer 2020, "GLU
Variants Improve Transformer" (SwiGLU).
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from minflux.attention import embed_ids
from minflux.model import LastLayer, MLPEmbedder, Modulation, ModulationOut, QKNorm, SelfAttention
from minflux.model import check_heads, double_stream, run_block, single_stream, timestep_embedding


@dataclass
class Flux2Params:
    """The official Flux2Params (defaults: FLUX.2 [dev]) and whether the model has a guidance embedding."""

    in_channels: int = 128  # 32 latent channels × 2×2 patch; also the output channels
    context_in_dim: int = 15360  # 3 stacked text-encoder layers: Mistral 3 × 5120; Qwen3-4B 3 × 2560 = 7680
    hidden_size: int = 6144
    num_heads: int = 48  # × 128 = 6144
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    axes_dim: list[int] = field(default_factory=lambda: [32, 32, 32, 32])  # RoPE channels per id axis (t, h, w, l)
    theta: int = 2000
    mlp_ratio: float = 3.0
    guidance_embed: bool = True  # [dev]: guidance distilled into an embedding; [klein]: none


class SwiGLU(nn.Module):
    """silu(a) · b for x = [a | b]: a gated linear unit, half the channels out. A module, so that the MLP's keys
    are .0 and .2 as in the official files."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return nn.functional.silu(a) * b


def swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    """The double block's MLP: Linear(dim, 2·hidden) → SwiGLU → Linear(hidden, dim), no biases."""
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


class DoubleStreamBlock(nn.Module):
    """FLUX.1's MM-DiT block with SwiGLU MLPs and no biases; its modulation is handed in, not held."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=False, proj_bias=False)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = swiglu_mlp(hidden_size, mlp_hidden)

        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=False, proj_bias=False)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = swiglu_mlp(hidden_size, mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, pe: Tensor, mod_img: list[ModulationOut], mod_txt: list[ModulationOut]
    ) -> tuple[Tensor, Tensor]:
        # img [B, 12288, 3072], txt [B, 512, 3072], pe [B, 1, 12800, 64] (complex); mods: (attention, MLP) each
        return double_stream(self, img, txt, pe, mod_img, mod_txt)  # FLUX.1's joint attention; the MLPs SwiGLU


class SingleStreamBlock(nn.Module):
    """FLUX.1's parallel block with a SwiGLU MLP and no biases; its modulation is handed in, not held.

    linear1 makes q, k, v and both halves of the SwiGLU at once (3·3072 + 2·9216 = 27648 channels); linear2 takes
    [attention | SwiGLU] (3072 + 9216) back to the hidden size.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SwiGLU()

    def forward(self, x: Tensor, pe: Tensor, mod: ModulationOut) -> Tensor:
        # x [B, 12800, 3072]; linear1 [B, 12800, 27648], SwiGLU [B, 12800, 9216]
        return single_stream(self, x, pe, mod)  # FLUX.1's parallel block; the MLP SwiGLU


class Flux2(nn.Module):
    """The FLUX.2 transformer. forward(...) predicts the flow velocity v = ε − x₀ for each image token."""

    def __init__(self, params: Flux2Params):
        super().__init__()
        self.params = params
        check_heads(params)
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden, bias=False)
        self.time_in = MLPEmbedder(256, hidden, bias=False)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, hidden, bias=False)
        self.txt_in = nn.Linear(params.context_in_dim, hidden, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(hidden, double=True, bias=False)
        self.double_stream_modulation_txt = Modulation(hidden, double=True, bias=False)
        self.single_stream_modulation = Modulation(hidden, double=False, bias=False)
        self.final_layer = LastLayer(hidden, params.in_channels, bias=False)
        self.gradient_checkpointing = False  # recompute each block's activations in backward to save memory

    def forward(
        self,
        img: Tensor,  # [B, L, 128]  packed latent tokens: the target's, then the references'
        img_ids: Tensor,  # [B, L, 4]  (t, h, w, 0)
        txt: Tensor,  # [B, T, context_in_dim]  stacked text-encoder hidden states
        txt_ids: Tensor,  # [B, T, 4]  (0, 0, 0, i)
        timesteps: Tensor,  # [B]  t in [0, 1], 1 = pure noise
        guidance: Tensor | None = None,  # [B]  guidance strength, for the guidance-distilled [dev]
    ) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"Flux2: img and txt must be [B, L, C], got {list(img.shape)} and {list(txt.shape)}")
        img = self.img_in(img)  # [B, 12288, 128] -> [B, 12288, 3072]
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))  # [B, 3072]
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Flux2: this model has a guidance embedding (FLUX.2 [dev]); pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        txt = self.txt_in(txt)  # [B, 512, 7680] -> [B, 512, 3072]

        mod_img = self.double_stream_modulation_img(vec)  # 2 × (shift, scale, gate), each [B, 1, 3072]
        mod_txt = self.double_stream_modulation_txt(vec)
        (mod_single,) = self.single_stream_modulation(vec)

        ids = torch.cat((txt_ids, img_ids), dim=1)  # [B, 12800, 4]
        pe = embed_ids(ids, self.params.axes_dim, self.params.theta)  # [B, 1, 12800, 64] complex, for all blocks

        for block in self.double_blocks:
            img, txt = run_block(self, block, img, txt, pe, mod_img, mod_txt)
        x = torch.cat((txt, img), dim=1)  # [B, 12800, 3072]
        for block in self.single_blocks:
            x = run_block(self, block, x, pe, mod_single)
        img = x[:, txt.shape[1] :, ...]  # [B, 12288, 3072]
        return self.final_layer(img, vec)  # [B, 12288, 128]
