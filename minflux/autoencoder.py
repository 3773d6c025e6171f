"""The FLUX autoencoders (VAE): images [B, 3, H, W] <-> latents [B, 16, H/8, W/8] (FLUX.1), [B, 128, H/16, W/16]
(FLUX.2).

What this file implements, top to bottom:
  ResnetBlock, AttnBlock, Downsample, Upsample   the four building blocks
  Encoder, Decoder                               the two halves, a stack of resolution levels and a middle
  diagonal_gaussian                              mean / log-variance -> latent (the mean, or a draw when asked)
  AutoEncoder                                    encode / decode with the latent scale and shift, optionally tiled
  Flux2AutoEncoder                               FLUX.2's: 32 channels, 1x1 quant convs, 2x2 patches, batch-norm stats
  tiled                                          run a conv net on overlapping tiles, blended with linear ramps

References:
  - black-forest-labs/flux, src/flux/modules/autoencoder.py: the architecture, and the module names, which are
    the keys of the official ae.safetensors (244 tensors, 83,819,683 parameters).
  - black-forest-labs/flux, src/flux/util.py: the AutoEncoderParams of every FLUX.1 variant (AE_PARAMS_FLUX).
  - Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022): the architecture,
    widened here to 16 latent channels. minflux.files.load.load_ae reads ae.safetensors and diffusers' vae/.
  - black-forest-labs/flux2, src/flux2/autoencoder.py: the FLUX.2 VAE (84,046,115 parameters).

Shapes in comments are those of the FLUX.1 preset on a 512x512 image ([B, 3, 512, 512] -> [B, 16, 64, 64]), except
in Flux2AutoEncoder (a 1024x1024 image).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minflux.hooks import stage


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: list[int]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    norm_groups: int = 32  # GroupNorm groups; not stored in the weights (a minflux-trained VAE records it)


# The one autoencoder every FLUX.1 variant (dev, schnell, fill, kontext) uses: ae.safetensors.
# `resolution` is the training resolution; it is recorded but changes no layer.
AE_PARAMS_FLUX = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """Every norm in the VAE: GroupNorm, 32 groups in FLUX (4 or more channels each, as ch = 128).

    A group of one channel would erase that channel's mean over the image, and with it the image's colour:
    a small VAE (ch = 32) keeps FLUX's 4 channels per group with 8 groups (AutoEncoderParams.norm_groups).
    """
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


# --- the building blocks ------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """norm -> SiLU -> 3x3 conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Only blocks that change the width have a shortcut conv: the key exists only there.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out, H, W]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all pixels, one head as wide as the channels. q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]  # x: [B, 512, 64, 64]
        x_norm = self.norm(x)
        # Each pixel is a token; the "1" is the head axis scaled_dot_product_attention expects.
        q, k, v = (rearrange(proj(x_norm), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, 4096, 512], softmax(q k^T / sqrt(512)) v
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)  # [B, 512, 64, 64]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. The official model pads only right and bottom (0, 1, 0, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # nn.Conv2d pads symmetrically, so the asymmetric zero padding is done by hand: [B, C, H+1, W+1]
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour copy, then a 3x3 conv to smooth it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


def middle(channels: int, groups: int = 32) -> nn.Module:
    """The middle of encoder and decoder, at the lowest resolution: ResNet, attention, ResNet."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


# --- encoder and decoder ------------------------------------------------------------------------------


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, 2 * z_channels, H/8, W/8]: the mean and log-variance of each latent value.

    One level per entry of ch_mult, each with num_res_blocks ResNet blocks at width ch * ch_mult[i]; every
    level but the last ends with a Downsample. Modules sit at down.{level}.block.{i} and down.{level}.downsample.
    quant_conv: end with a 1x1 conv over the moments (FLUX.2; FLUX.1 has none).
    """

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int = 32,
        quant_conv: bool = False,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()  # a plain container, so the keys read down.{i}.block.{j}
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(width, ch * mult, groups))
                width = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = middle(width, groups)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, kernel_size=3, padding=1)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, kernel_size=1) if quant_conv else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # [B, 128, 512, 512]
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        # after the levels: [B, 128, 256, 256] -> [B, 256, 128, 128] -> [B, 512, 64, 64] -> [B, 512, 64, 64]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # [B, 512, 64, 64]
        h = self.conv_out(F.silu(self.norm_out(h)))  # [B, 32, 64, 64]
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, 3, 8h, 8w], the encoder run backwards.

    up.{level} holds the level at the resolution of encoder level `level`, so up.0 is the full-resolution one,
    which runs last. Each has num_res_blocks + 1 ResNet blocks; every level but 0 ends with an Upsample.
    quant_conv: start with a 1x1 conv over the latent, `post_quant_conv` (FLUX.2; FLUX.1 has none).
    """

    def __init__(
        self,
        out_ch: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int = 32,
        quant_conv: bool = False,
    ):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=1) if quant_conv else None
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, kernel_size=3, padding=1)
        self.mid = middle(width, groups)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built in the order they run: lowest resolution first
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(width, ch * ch_mult[i], groups))
                width = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # stored by resolution level, as in the checkpoint
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.conv_in(z)  # [B, 512, 64, 64]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # [B, 512, 64, 64]
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        # after the levels: [B, 512, 128, 128] -> [B, 512, 256, 256] -> [B, 256, 512, 512] -> [B, 128, 512, 512]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, 512, 512]


def diagonal_gaussian(moments: Tensor, sample: bool) -> Tensor:
    """The encoder's output read as a Gaussian per latent value: a sample of it, or its mean."""
    mean, logvar = torch.chunk(moments, 2, dim=1)  # [B, 16, 64, 64] each
    if not sample:
        return mean
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


# --- the autoencoder ------------------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    """encode: image in [-1, 1] -> scaled, shifted latent; decode: the reverse. State dict = ae.safetensors keys."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        p = params
        self.encoder = Encoder(p.in_channels, p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.norm_groups)
        self.decoder = Decoder(p.out_ch, p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.norm_groups)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor
        self.downscale = 2 ** (len(params.ch_mult) - 1)  # 8: pixels per latent value along H and W
        self.latent_channels = params.z_channels  # 16

    @stage
    def encode(self, x: Tensor, sample: bool = False, tile: int | None = None) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> z [B, 16, H/8, W/8], normalised to roughly zero mean, unit variance.

        sample: return the mean of the encoder's Gaussian (False, the official default: black-forest-labs/flux
                builds `AutoEncoder(params, sample_z=False)`, whose DiagonalGaussian returns the mean unless
                asked), or draw z from it (True; a VAE trained by hand draws its own, tasks/embedded.py).
        tile:   encode in overlapping tile x tile pixel windows (a multiple of 8) to bound memory; None: whole.
        """
        x = x.contiguous(memory_format=torch.channels_last)  # see `decode`
        if tile is None:
            moments = self.encoder(x)  # [B, 32, 64, 64]
        else:
            moments = tiled(self.encoder, x, tile, align=self.downscale)
        # Tiles are blended before sampling, so the noise is drawn once, over the whole latent (in the standard
        # layout: randn_like follows the memory order, so channels-last would place the same draws elsewhere).
        z = diagonal_gaussian(moments.contiguous(), sample)  # [B, 16, 64, 64]
        return self.scale_factor * (z - self.shift_factor)

    @stage
    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """z [B, 16, h, w] as encode returns it -> image [B, 3, 8h, 8w], roughly in [-1, 1].

        tile: decode in overlapping tile x tile latent windows (64 latents = 512 pixels); None: whole.
        """
        z = z / self.scale_factor + self.shift_factor  # undo encode's normalisation
        # Channels-last ([B, H, W, C] in memory) is the layout the CPU's oneDNN convolutions (and cuDNN's tensor
        # cores) run natively; every layer keeps it, so the tensors are not reordered at each conv. The same
        # numbers in a different memory order, computed faster (minflux/study/BENCH.md).
        z = z.contiguous(memory_format=torch.channels_last)
        if tile is None:
            return self.decoder(z).contiguous()
        return tiled(self.decoder, z, tile).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# The one autoencoder of every FLUX.2 model (dev, klein): black-forest-labs/flux2's AutoEncoderParams.
AE_PARAMS_FLUX2 = replace(AE_PARAMS_FLUX, z_channels=32, scale_factor=1.0, shift_factor=0.0)  # batch norm, not these


class Flux2AutoEncoder(nn.Module):
    """FLUX.2's VAE: image [B, 3, H, W] in [-1, 1] <-> latent [B, 128, H/16, W/16]. State dict = its ae.safetensors.

    The same Encoder and Decoder as FLUX.1's AutoEncoder; what differs:
      - 32 latent channels, not 16;
      - a 1x1 conv ends the encoder (encoder.quant_conv) and starts the decoder (decoder.post_quant_conv);
      - the latent is patchified: each 2x2 patch of 32 channels becomes one position of 128 channels (the grouping
        FLUX.1's transformer does outside the VAE, in `pack`);
      - it is normalised channel by channel with the running mean and variance of a BatchNorm (`bn`: no affine
        weights, always used as in eval mode), instead of one scale and shift.
    Shapes in comments: a 1024x1024 image.
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        p = params
        groups = p.norm_groups
        self.encoder = Encoder(p.in_channels, p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, groups, quant_conv=True)
        self.decoder = Decoder(p.out_ch, p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, groups, quant_conv=True)
        self.patch = 2  # patchify 2x2
        self.latent_channels = p.z_channels * self.patch**2  # 128
        self.downscale = 2 ** (len(p.ch_mult) - 1) * self.patch  # 16: pixels per latent value along H and W
        self.bn = nn.BatchNorm2d(self.latent_channels, eps=1e-4, momentum=0.1, affine=False, track_running_stats=True)

    def bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel mean and standard deviation of the patchified latent, [1, 128, 1, 1], as `like`."""
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps)
        return mean.to(like), std.to(like)

    @stage
    def encode(self, x: Tensor, sample: bool = False, tile: int | None = None) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] (H, W multiples of 16) -> z [B, 128, H/16, W/16], normalised per channel.

        sample: the Gaussian's mean (False, what FLUX.2 uses), or a draw from it (True), as in AutoEncoder.encode.
        tile:   encode in overlapping tile x tile pixel windows (a multiple of 16); None: whole.
        """
        x = x.contiguous(memory_format=torch.channels_last)  # see AutoEncoder.decode
        if tile is None:
            moments = self.encoder(x)  # [B, 64, 128, 128]
        else:
            moments = tiled(self.encoder, x, tile, align=self.downscale)
        z = diagonal_gaussian(moments.contiguous(), sample)  # [B, 32, 128, 128]
        z = rearrange(z, "... c (i pi) (j pj) -> ... (c pi pj) i j", pi=self.patch, pj=self.patch)  # [B, 128, 64, 64]
        mean, std = self.bn_stats(z)
        return (z - mean) / std

    @stage
    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """z [B, 128, h, w] as encode returns it -> image [B, 3, 16h, 16w], roughly in [-1, 1].

        tile: decode in overlapping tile x tile latent windows (32 latents = 512 pixels); None: whole.
        """
        mean, std = self.bn_stats(z)
        z = z * std + mean  # undo encode's normalisation
        z = rearrange(z, "... (c pi pj) i j -> ... c (i pi) (j pj)", pi=self.patch, pj=self.patch)  # [B, 32, 128, 128]
        z = z.contiguous(memory_format=torch.channels_last)
        if tile is None:
            return self.decoder(z).contiguous()  # [B, 3, 1024, 1024]
        return tiled(self.decoder, z, tile * self.patch).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# --- tiling -------------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of windows of length `tile` covering [0, size): one every `stride`, the last flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def ramp(length: int, fade: int, fade_in: bool, fade_out: bool) -> Tensor:
    """Blending weights along one axis of a tile: 1, except linear ramps over `fade` values at shared edges."""
    w = torch.ones(length)
    edge = (torch.arange(fade) + 0.5) / fade  # 1/2f, 3/2f, ... : a ramp and its mirror sum to exactly 1
    if fade_in:
        w[:fade] = edge
    if fade_out:
        w[length - fade :] = edge.flip(0)
    return w


def tiled(net: nn.Module, x: Tensor, tile: int, align: int = 1) -> Tensor:
    """net(x) computed on overlapping tile x tile windows of x [B, C, H, W] and blended: a seamless stitch.

    Neighbouring windows overlap by a quarter of the tile. In the output, each tile's weight ramps linearly
    from 0 to 1 across the overlap (see `ramp`), and the weighted tiles are divided by the summed weights,
    so no tile ends abruptly and there is no seam. Each tile is normalised by its own GroupNorm statistics
    and attends only within itself, so the result is close to net(x), not equal; a tile at least as large
    as x gives net(x) exactly. `align`: window offsets are multiples of it (the encoder's 8).
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return net(x)
    if tile % align:
        raise ValueError(f"tile={tile} must be a multiple of {align}")
    overlap = tile // 4 // align * align
    ys = tile_starts(height, tile, tile - overlap)
    xs = tile_starts(width, tile, tile - overlap)
    if ys[-1] % align or xs[-1] % align:
        raise ValueError(f"tiled input size {height}x{width} must be a multiple of {align}")

    out = weight = None
    for y0 in ys:
        for x0 in xs:
            part = net(x[..., y0 : y0 + tile, x0 : x0 + tile])  # [B, C_out, tile * s, tile * s]
            if out is None:  # the output scale s: 1/8 for the encoder, 8 for the decoder
                scale = part.shape[-1] / min(tile, width)
                out = x.new_zeros(*part.shape[:2], round(height * scale), round(width * scale), dtype=part.dtype)
                weight = x.new_zeros(round(height * scale), round(width * scale), dtype=part.dtype)
            h, w = part.shape[-2:]
            fade = round(overlap * scale)
            wy = ramp(h, fade, fade_in=y0 > 0, fade_out=y0 + tile < height)
            wx = ramp(w, fade, fade_in=x0 > 0, fade_out=x0 + tile < width)
            mask = (wy[:, None] * wx[None, :]).to(part)  # [h, w]
            oy, ox = round(y0 * scale), round(x0 * scale)
            out[..., oy : oy + h, ox : ox + w] += part * mask
            weight[oy : oy + h, ox : ox + w] += mask
    return out / weight
