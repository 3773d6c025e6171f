"""FLUX.2 test helpers: tiny configs, random inputs with reference images, and diffusers as a reference oracle."""

from dataclasses import replace

import torch

from minflux.flux2 import Flux2, Flux2Params
from tests.flux_helpers import randomize_

TINY2 = Flux2Params(
    in_channels=32,
    context_in_dim=24,
    hidden_size=64,
    num_heads=4,  # head dim 16 = 4 axes × 4
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 4, 4, 4],
    theta=2000,
    mlp_ratio=3.0,
    guidance_embed=True,
)
TINY2_VARIANTS = {"dev": TINY2, "klein": replace(TINY2, guidance_embed=False)}


def tiny_flux2(params: Flux2Params = TINY2, seed: int = 0) -> Flux2:
    return randomize_(Flux2(params), seed).eval()


def image_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(t, row, col, 0) for an h×w grid of tokens, row-major: [h·w, 4]."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(h * w, 4).float()


def text_ids(length: int) -> torch.Tensor:
    """(0, 0, 0, i) for i < length: [length, 4]."""
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids


def flux2_inputs(
    params: Flux2Params, batch: int = 2, grid=(4, 6), refs=((4, 4), (2, 6)), txt_len: int = 7, seed: int = 1
) -> dict:
    """Random inputs: a target of grid tokens, then the references', at t = 10, 20, ... (ids shared by the batch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([image_ids(*grid)] + [image_ids(h, w, t=10 * (k + 1)) for k, (h, w) in enumerate(refs)])
    return dict(
        img=torch.randn(batch, ids.shape[0], params.in_channels, generator=g),
        img_ids=ids.expand(batch, -1, -1),
        txt=torch.randn(batch, txt_len, params.context_in_dim, generator=g),
        txt_ids=text_ids(txt_len).expand(batch, -1, -1),
        timesteps=torch.rand(batch, generator=g),
        guidance=torch.tensor([4.0, 2.5])[:batch] if params.guidance_embed else None,
    )


def diffusers_config(params: Flux2Params) -> dict:
    """diffusers Flux2Transformer2DModel's config for a model of these params."""
    return dict(
        in_channels=params.in_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.hidden_size // params.num_heads,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        mlp_ratio=params.mlp_ratio,
        axes_dims_rope=tuple(params.axes_dim),
        rope_theta=params.theta,
        guidance_embeds=params.guidance_embed,
    )


def to_diffusers(state_dict: dict) -> dict:
    """Official keys -> diffusers keys, by diffusers' own converter (which empties the dict it is given)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(dict(state_dict))


def diffusers_flux2(params: Flux2Params, state_dict: dict):
    """diffusers' Flux2Transformer2DModel of the same shape, holding `state_dict` converted to its layout."""
    from diffusers import Flux2Transformer2DModel

    ref = Flux2Transformer2DModel(**diffusers_config(params))
    ref.load_state_dict(to_diffusers(state_dict), strict=True)
    return ref.eval()


def diffusers_forward(ref, inputs: dict) -> torch.Tensor:
    """diffusers' call for the same inputs. It scales t and guidance by 1000 itself, as minflux's embedding does, and
    reads the ids of the first sequence only ([L, 4]): the batch must share them."""
    return ref(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"][0],
        txt_ids=inputs["txt_ids"][0],
        guidance=inputs["guidance"],
        return_dict=False,
    )[0]


def write_klein_repo(folder):
    """A tiny FLUX.2 [klein] repo in the diffusers layout: transformer/, vae/, text_encoder/, tokenizer/ (the text
    encoder a Qwen3 of 28 layers, 3 × 64 = 192 channels for txt_in). Returns the folder."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.test_qwen3 import SMALL, randomize, write_qwen_tokenizer

    torch.manual_seed(0)
    params = TINY2_VARIANTS["klein"]
    transformer = Flux2Transformer2DModel(**dict(diffusers_config(params), joint_attention_dim=3 * 64))
    randomize_(transformer, seed=1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=4
    )  # 8 × 2×2 = 32 channels, the transformer's; 8× down and the 2×2 patch: 16 pixels a token, as FLUX.2's
    randomize_(vae, seed=2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(32))
        vae.bn.running_var.copy_(0.5 + torch.rand(32))
    text_encoder = randomize(Qwen3ForCausalLM(Qwen3Config(**dict(SMALL, num_hidden_layers=28))))
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    write_qwen_tokenizer(folder / "tokenizer")
    return folder
