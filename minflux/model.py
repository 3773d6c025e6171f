"""The FLUX.1 transformer: a rectified-flow model over packed image tokens, conditioned on text.

The shapes in the comments are those of one running example, the one `python -m minflux.study.trace
flux-dev-kontext` prints and minflux/study/WALKTHROUGH.md reads: FLUX.1 Kontext [dev] at 1024×1024, batch 1 (B),
a 512-token prompt. The image tokens are the target's 4096 followed by the reference's 4096: 8192 image tokens,
and 512 + 8192 = 8704 in the joint sequence [txt | img]. (Text-to-image has no reference: 4096 and 4608.)

    img    [B, 8192, 64]   packed latent tokens  --img_in-->  [B, 8192, 3072]
    txt    [B, 512, 4096]  T5 hidden states      --txt_in-->  [B, 512, 3072]
    vec    [B, 3072]       time + guidance + pooled CLIP, the conditioning of every block
    19 × DoubleStreamBlock: img and txt keep separate weights, attend jointly over [txt | img]
    concatenate            [B, 8704, 3072]
    38 × SingleStreamBlock: one stream, attention and MLP in parallel
    drop the text tokens, final adaptive norm + linear  -->  v [B, 8192, 64]
    (then sampling.velocity keeps the target's 4096 tokens: v [B, 4096, 64])

Module and parameter names are the keys of the official flux1-*.safetensors files, so those files load
with `load_state_dict` and no mapping table.

References: black-forest-labs/flux (src/flux/model.py, src/flux/modules/layers.py); Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (the MM-DiT double block).
"""

import math
import warnings
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from minflux.attention import attention, embed_ids
from minflux.hooks import stage


@dataclass
class FluxParams:
    in_channels: int  # 64 = 16 latent channels × 2×2 patch; 384 for Fill (64 + 64 masked image + 256 mask)
    out_channels: int  # 64
    vec_in_dim: int  # 768, the pooled CLIP-L vector
    context_in_dim: int  # 4096, the T5-XXL hidden size
    hidden_size: int  # 3072
    mlp_ratio: float  # 4.0
    num_heads: int  # 24 heads × 128 = 3072
    depth: int  # 19 double-stream blocks
    depth_single_blocks: int  # 38 single-stream blocks
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])  # RoPE channels per id axis, sum = head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: guidance distilled into an embedding; schnell: none


@stage
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to [0, 1000]). t [B] → [B, dim], as [cos | sin]."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, 128]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 256]
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear: maps a time embedding or the pooled text vector to the hidden size.
    bias=False: FLUX.2's, which has no biases anywhere."""

    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) · scale, rms(x) = sqrt(mean(x²) + 1e-6). Used on queries and keys (QK-norm) to keep logits tame.

    The official code writes it out in float32: `x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
    + 1e-6)`, then casts and multiplies by the scale. F.rms_norm computes the same in one pass (in float32 inside
    for bf16 inputs); in float32 the two are bit-identical.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.rms_norm(x, self.scale.shape, self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The weights of one stream's attention: fused qkv, QK-norm, output projection.

    The double block calls the pieces itself, because the two streams attend jointly. FLUX.2: no biases
    (qkv_bias=False, proj_bias=False).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    @stage
    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, dim] → q, k, v, each [B, H, L, head_dim], with q and k RMS-normed."""
        qkv = self.qkv(x)  # [B, L, 9216]
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)  # [B, 24, L, 128] each
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor  # [B, 1, dim]
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """adaLN: from vec [B, dim], predict (shift, scale, gate) once (single block) or twice (double block).
    FLUX.2 computes three of them once per forward, for all blocks, without bias."""

    def __init__(self, dim: int, double: bool, bias: bool = True):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(nn.functional.silu(vec))[:, None, :]  # [B, 1, 6 * 3072]
        chunks = out.chunk(self.multiplier, dim=-1)  # 6 × [B, 1, 3072]
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    """(1 + scale) · x + shift, in one pass over x (torch.addcmul: shift + x · (1 + scale))."""
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The gated residual x + gate · y, in one pass (torch.addcmul)."""
    return torch.addcmul(x, gate, y)


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    """The feed-forward of a double block; keys .0 and .2 as in the official files."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: image and text tokens have their own weights but one attention over [txt | img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = feed_forward(hidden_size, mlp_hidden)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = feed_forward(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        # img [B, 8192, 3072], txt [B, 512, 3072], vec [B, 3072], pe [B, 1, 8704, 64] (complex)
        return double_stream(self, img, txt, pe, self.img_mod(vec), self.txt_mod(vec))


def double_stream(block, img: Tensor, txt: Tensor, pe: Tensor, img_mods, txt_mods) -> tuple[Tensor, Tensor]:
    """A double block's work once its (attention, MLP) modulations are known, FLUX.1's and FLUX.2's alike: each
    stream's q, k, v, one joint attention over [txt | img], then each stream's gated residuals."""
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = img_mods, txt_mods
    img_q, img_k, img_v = block.img_attn.split_heads(modulate(block.img_norm1(img), img_mod1))  # [B, 24, 8192, 128]
    txt_q, txt_k, txt_v = block.txt_attn.split_heads(modulate(block.txt_norm1(txt), txt_mod1))  # [B, 24, 512, 128]

    q = torch.cat((txt_q, img_q), dim=2)  # [B, 24, 8704, 128]
    k = torch.cat((txt_k, img_k), dim=2)
    v = torch.cat((txt_v, img_v), dim=2)
    attn = attention(q, k, v, pe=pe)  # [B, 8704, 3072]
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

    img = gated(img, img_mod1.gate, block.img_attn.proj(img_attn))  # img + gate · proj(attn)
    img = gated(img, img_mod2.gate, block.img_mlp(modulate(block.img_norm2(img), img_mod2)))
    txt = gated(txt, txt_mod1.gate, block.txt_attn.proj(txt_attn))
    txt = gated(txt, txt_mod2.gate, block.txt_mlp(modulate(block.txt_norm2(txt), txt_mod2)))
    return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt | img]: attention and MLP run in parallel from one fused input projection.

    linear1 produces q, k, v and the MLP's hidden layer at once; linear2 takes [attention | GELU(mlp)]
    back to the hidden size (Dehghani et al. 2023, "Scaling Vision Transformers to 22B parameters").
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        (mod,) = self.modulation(vec)
        return single_stream(self, x, pe, mod)


def single_stream(block, x: Tensor, pe: Tensor, mod: ModulationOut) -> Tensor:
    """A single block's work once its modulation is known, FLUX.1's and FLUX.2's alike: linear1 gives q, k, v and
    the MLP's input (FLUX.1: 12288 channels for GELU; FLUX.2: both halves of a SwiGLU), linear2 takes
    [attention | MLP] back to the hidden size."""
    # x [B, 8704, 3072]
    h = block.linear1(modulate(block.pre_norm(x), mod))  # [B, 8704, 21504]
    qkv, mlp = h[..., : 3 * block.hidden_size], h[..., 3 * block.hidden_size :]  # [B, 8704, 9216], [B, 8704, 12288]
    q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=block.num_heads)  # [B, 24, 8704, 128] each
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe)  # [B, 8704, 3072]
    out = block.linear2(torch.cat((attn, block.mlp_act(mlp)), dim=2))  # [B, 8704, 15360] -> [B, 8704, 3072]
    return gated(x, mod.gate, out)  # x + gate · out


class LastLayer(nn.Module):
    """Adaptive LayerNorm from vec, then a linear map back to the packed latent channels (FLUX.2: bias=False)."""

    def __init__(self, hidden_size: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # 2 × [B, 3072]
        x = torch.addcmul(shift[:, None, :], self.norm_final(x), 1 + scale[:, None, :])  # (1 + scale) · x + shift
        return self.linear(x)  # [B, 8192, 64]


def check_heads(params) -> None:
    """hidden_size must split into num_heads heads whose dim is RoPE's sum(axes_dim) (FLUX.1 and FLUX.2 alike)."""
    if params.hidden_size % params.num_heads or sum(params.axes_dim) != params.hidden_size // params.num_heads:
        raise ValueError(
            f"{type(params).__name__}: hidden_size {params.hidden_size} must split into {params.num_heads} heads "
            f"whose dim equals sum(axes_dim) = {sum(params.axes_dim)}"
        )


def run_block(model: nn.Module, block: nn.Module, *args):
    """block(*args), its activations recomputed in backward when model.gradient_checkpointing is on."""
    if model.gradient_checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class Flux(nn.Module):
    """The FLUX.1 transformer. forward(...) predicts the flow velocity v = ε − x₀ for each image token."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        check_heads(params)
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, params.out_channels)
        self.gradient_checkpointing = False  # recompute each block's activations in backward to save memory

    def forward(
        self,
        img: Tensor,  # [B, L, in_channels]  packed latent tokens (plus Fill's condition channels)
        img_ids: Tensor,  # [B, L, 3]
        txt: Tensor,  # [B, T, 4096]  T5 hidden states
        txt_ids: Tensor,  # [B, T, 3]  zeros
        timesteps: Tensor,  # [B]  t in [0, 1], 1 = pure noise
        y: Tensor,  # [B, 768]  pooled CLIP
        guidance: Tensor | None = None,  # [B]  guidance strength, for guidance-distilled models (dev)
    ) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"Flux: img and txt must be [B, L, C], got {list(img.shape)} and {list(txt.shape)}")
        img = self.img_in(img)  # [B, 8192, 64] -> [B, 8192, 3072]
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))  # [B, 3072]
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Flux: this model has a guidance embedding (dev/fill/kontext); pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)  # [B, 512, 4096] -> [B, 512, 3072]

        ids = torch.cat((txt_ids, img_ids), dim=1)  # [B, 8704, 3]
        pe = embed_ids(ids, self.params.axes_dim, self.params.theta)  # [B, 1, 8704, 64] complex, for all blocks

        for block in self.double_blocks:
            img, txt = run_block(self, block, img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)  # [B, 8704, 3072]
        for block in self.single_blocks:
            x = run_block(self, block, x, vec, pe)
        img = x[:, txt.shape[1] :, ...]  # [B, 8192, 3072]
        return self.final_layer(img, vec)  # [B, 8192, 64]


def compile_blocks(model: nn.Module, frozen: bool = False) -> nn.Module:
    """torch.compile every double and single block of `model` (a Flux, or a model holding one as `.flux`), in place.

    Regional compilation: all blocks of one kind run the same code, so the compiler traces and builds one graph per
    kind and reuses it for every block, seconds instead of the minutes a whole-model graph takes. The graph fuses
    the small ops between the matrix products (norms, modulation, GELU, the residual adds). The first call
    compiles; weights may change afterwards (training, LoRA scales), as they are inputs of the graph, not constants.

    frozen=True is for sampling with fixed weights, on the CPU (sample.py --compile): each block's weights become
    constants of its own graph (inductor's freezing), laid out once for the CPU's matrix library instead of at every
    product. One graph per block (compile time grows with the depth), the weights held twice, a weight changed
    afterwards is not (or only partly) seen, and it applies only where gradients are off (torch.no_grad), as in
    sampling.
    """
    # inductor writes no code for complex numbers: RoPE's complex product (attention.rotate) runs as it does in eager
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    flux = getattr(model, "flux", model)
    blocks = [*flux.double_blocks, *flux.single_blocks]
    for block in blocks:
        if frozen:
            block.forward = frozen_call(torch.compile(block.forward), graphs=8 * len(blocks))
        else:
            block.compile()
    return model


def frozen_call(compiled, graphs: int):
    """`compiled` called with inductor's freezing on while it traces, and room for `graphs` graphs of its code (one
    per block and input shape; dynamo's default, 8, would leave the blocks after the eighth uncompiled)."""

    def forward(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=graphs):
            return compiled(*args, **kwargs)

    return forward
