"""The benchmark's cases: its configurations, and each case built with the same random weights in minflux and in
the reference library (diffusers, transformers, peft), as functions to time. minflux/study/bench.py runs them.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from minflux.attention import cpu_bf16_native
from minflux.autoencoder import AE_PARAMS_FLUX, AutoEncoder, AutoEncoderParams
from minflux.clip import CLIP_L, CLIPParams, CLIPTextModel
from minflux.model import Flux, FluxParams, compile_blocks
from minflux.presets import FLUX_DEV
from minflux.sampling import latent_ids, pack, prepare_txt_ids
from minflux.t5 import T5_XXL, T5Encoder, T5Params

# --- configurations ------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    name: str
    flux: FluxParams
    latent: int  # the latent is latent × latent, so (latent / 2)² image tokens
    txt_tokens: int
    lora_rank: int
    ae: AutoEncoderParams
    ae_latent: int  # VAE decode of a [1, 16, ae_latent, ae_latent] latent
    t5: T5Params
    t5_tokens: int
    clip: CLIPParams
    matmul_size: int
    cases: list[str] = field(default_factory=list)  # the default cases of this config
    targets: dict = field(default_factory=dict)  # case -> the most minflux time / reference time may be


ALL_CASES = [
    "matmul",
    "forward-fp32",
    "forward-fp32-compiled",
    "forward-bf16",
    "lora-step",
    "vae-decode",
    "t5-encode",
    "clip-encode",
]
# The targets of the performance issue: minflux time / reference time at most this (on CUDA, full size: 0.9).
TARGETS = {
    "forward-fp32": 1.0,
    "forward-fp32-compiled": 0.95,
    "forward-bf16": 0.8,
    "lora-step": 0.9,
    "vae-decode": 1.0,
    "t5-encode": 1.0,
}

CONFIGS = {
    # Seconds on a laptop: the smoke test's configuration. Every part of the architecture, tiny widths.
    "tiny": BenchConfig(
        "tiny",
        FluxParams(
            in_channels=64,
            out_channels=64,
            vec_in_dim=32,
            context_in_dim=48,
            hidden_size=128,
            mlp_ratio=4.0,
            num_heads=4,
            depth=1,
            depth_single_blocks=1,
            axes_dim=[8, 12, 12],
            theta=10_000,
            qkv_bias=True,
            guidance_embed=True,
        ),
        latent=8,
        txt_tokens=8,
        lora_rank=4,
        ae=AutoEncoderParams(
            resolution=64,
            in_channels=3,
            ch=32,
            out_ch=3,
            ch_mult=[1, 2],
            num_res_blocks=1,
            z_channels=16,
            scale_factor=0.3611,
            shift_factor=0.1159,
        ),
        ae_latent=8,
        t5=T5Params(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),
        t5_tokens=32,
        clip=CLIPParams(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
        matmul_size=256,
        cases=ALL_CASES,
        targets=TARGETS,
    ),
    # A few minutes on a 2-core CPU: FLUX's head size and RoPE axes, 6 heads, 2 double + 4 single blocks,
    # 1024 image + 128 text tokens; the official VAE at 256×256, a T5 of t5-base's width, CLIP-L itself.
    "mid": BenchConfig(
        "mid",
        replace(FLUX_DEV, hidden_size=768, num_heads=6, depth=2, depth_single_blocks=4),
        latent=64,
        txt_tokens=128,
        lora_rank=16,
        ae=AE_PARAMS_FLUX,
        ae_latent=32,
        t5=T5Params(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=6, num_heads=12),
        t5_tokens=512,
        clip=CLIP_L,
        matmul_size=2048,
        cases=ALL_CASES,
        targets=TARGETS,
    ),
    # FLUX.1-dev at 1024×1024 with a 512-token prompt, random weights: CUDA only (24 GB per bf16 copy).
    "full": BenchConfig(
        "full",
        FLUX_DEV,
        latent=128,
        txt_tokens=512,
        lora_rank=16,
        ae=AE_PARAMS_FLUX,
        ae_latent=128,
        t5=T5_XXL,
        t5_tokens=512,
        clip=CLIP_L,
        matmul_size=8192,
        cases=["matmul", "forward-bf16", "vae-decode", "t5-encode", "clip-encode"],
        targets={"forward-bf16": 0.9, "vae-decode": 1.0, "t5-encode": 1.0},
    ),
}
REFERENCE_LIBS = {
    "forward-fp32": ["diffusers"], "forward-fp32-compiled": ["diffusers"], "forward-bf16": ["diffusers"],
    "lora-step": ["diffusers", "peft"], "vae-decode": ["diffusers"], "t5-encode": ["transformers"],
    "clip-encode": ["transformers"],
}  # fmt: skip


def missing_libs(case: str) -> list[str]:
    """The reference libraries of `case` that cannot be imported (they are optional for minflux)."""
    missing = []
    for lib in REFERENCE_LIBS.get(case, []):
        try:
            __import__(lib)
        except ImportError:
            missing.append(lib)
    return missing


# --- FLOPs -----------------------------------------------------------------------------------------------


def flux_flops(p: FluxParams, img_tokens: int, txt_tokens: int, batch: int = 1) -> float:
    """Floating-point operations of one transformer forward (a multiply-add counts 2), counted from the shapes.

    Per token, a double block runs qkv (3h²), proj (h²) and the MLP (2·h·mlp) for its own stream; a single
    block runs linear1 (h·(3h + mlp)) and linear2 ((h + mlp)·h). Attention over N = txt + img tokens costs
    Q Kᵀ and P V, 2·N²·h each. Embedders, modulation and the final layer are counted too (small).
    """
    h, mlp, n = p.hidden_size, int(p.hidden_size * p.mlp_ratio), img_tokens + txt_tokens
    macs = 4 * n * n * h / 2 * (p.depth + p.depth_single_blocks)  # attention: 2 products of N·N·h multiply-adds
    macs += p.depth * n * (4 * h * h + 2 * h * mlp)  # double blocks, each token through its stream's weights
    macs += p.depth_single_blocks * n * (h * (3 * h + mlp) + (h + mlp) * h)  # single blocks
    macs += img_tokens * p.in_channels * h + txt_tokens * p.context_in_dim * h + img_tokens * h * p.out_channels
    macs += (p.depth * 2 * 6 + p.depth_single_blocks * 3 + 2) * h * h  # modulation and final adaLN, once per batch
    macs += (256 * h + h * h) * (1 + p.guidance_embed) + (p.vec_in_dim * h + h * h)  # time, guidance, vector embedders
    return 2 * macs * batch


# --- building the models -------------------------------------------------------------------------------------


def flux_inputs(p: FluxParams, latent: int, txt_tokens: int, dtype, device, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, p.in_channels // 4, latent, latent, generator=g)
    inputs = dict(
        img=pack(z),  # [B, latent²/4, 64]
        img_ids=latent_ids(z),
        txt=torch.randn(batch, txt_tokens, p.context_in_dim, generator=g),
        txt_ids=prepare_txt_ids(batch, txt_tokens),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, p.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if p.guidance_embed else None,
    )
    floats = ("img", "txt", "y")
    return {k: None if v is None else v.to(device, dtype if k in floats else v.dtype) for k, v in inputs.items()}


def diffusers_flux(p: FluxParams, state_dict: dict):
    """diffusers' FluxTransformer2DModel of the same shape holding the same weights (converted to its names)."""
    from diffusers import FluxTransformer2DModel

    from minflux.files.keys import flux_to_diffusers

    with torch.device("meta"):
        ref = FluxTransformer2DModel(
            patch_size=1,
            in_channels=p.in_channels,
            out_channels=p.out_channels,
            num_layers=p.depth,
            num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.hidden_size // p.num_heads,
            num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim,
            pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed,
            axes_dims_rope=tuple(p.axes_dim),
        )
    ref.load_state_dict(flux_to_diffusers(state_dict), strict=True, assign=True)
    return ref.eval()


def diffusers_call(ref, inputs: dict) -> Tensor:
    """diffusers' call for the same inputs: its ids are per sequence ([L, 3]); it scales t and guidance itself."""
    return ref(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"][0],
        txt_ids=inputs["txt_ids"][0],
        guidance=inputs["guidance"],
        return_dict=False,
    )[0]


@contextmanager
def building_on(device, dtype):
    """Create modules directly on `device` in `dtype` (a full-size T5 or FLUX would not fit twice in fp32)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_flux(p: FluxParams, device, dtype) -> Flux:
    """A Flux with PyTorch's default random initialisation."""
    with building_on(device, dtype):
        return Flux(p).eval()


def build(case: str, cfg: BenchConfig, impls: list[str], device: torch.device, gradient_checkpointing=False) -> dict:
    """impl ("minflux" / "reference") -> a function running the case once; plus "info" with case data."""
    fns, info = {}, {}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # VAE and text encoders

    if case in ("forward-fp32", "forward-fp32-compiled", "forward-bf16"):
        dtype = torch.bfloat16 if case == "forward-bf16" else torch.float32
        model = random_flux(cfg.flux, device, dtype)
        inputs = flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, dtype, device)
        info["flops"] = flux_flops(cfg.flux, inputs["img"].shape[1], cfg.txt_tokens)
        if "reference" in impls:  # diffusers as it is called without torch.compile (`--compile` compiles it too)
            ref = diffusers_flux(cfg.flux, model.state_dict())
            fns["reference"] = torch.no_grad()(lambda: diffusers_call(ref, inputs))
        if "minflux" in impls:
            fns["minflux"] = torch.no_grad()(lambda: model(**inputs))
        if case == "forward-fp32-compiled" and "minflux" in impls:  # as sample.py --compile runs it
            info["frozen"] = device.type == "cpu"
            with torch.no_grad():
                eager = model(**inputs)
                start = time.perf_counter()
                try:
                    compiled = compile_blocks(model, frozen=info["frozen"])(**inputs)  # the first call compiles
                except Exception as e:  # no C++ compiler for inductor, say: reported, not timed
                    del fns["minflux"]
                    info["note"] = f"torch.compile failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                else:
                    info["compile_s"] = time.perf_counter() - start
                    info["compiled_error"] = ((compiled - eager).abs().max() / eager.std()).item()
        small = sum(p.numel() for p in model.parameters()) < 10**9
        if case == "forward-bf16" and len(fns) == 2 and small:  # what bf16 costs each library: error against fp32
            with torch.no_grad():  # the same (bf16-rounded) weights in fp32: the exact output of this model
                model32 = Flux(cfg.flux).to(device).eval()
                model32.load_state_dict(model.state_dict())
                exact = model32(**flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, torch.float32, device)).float()
                del model32
                for name, fn in fns.items():
                    info[f"{name}_bf16_error"] = ((fn().float() - exact).abs().max() / exact.std()).item()

    elif case == "lora-step":  # in bf16, as LoRAs are trained; in fp32 on a CPU that emulates bf16 (minutes a step)
        dtype = torch.bfloat16 if device.type != "cpu" or cpu_bf16_native() else torch.float32
        info["dtype"] = "bf16" if dtype == torch.bfloat16 else "fp32 (bf16 emulated here)"
        inputs = flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, dtype, device)
        target = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

        def train_step(model, params, call):
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def step():
                loss = (call(model, inputs).float() - target.float()).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return step

        from minflux.files.lora_files import diffusers_names
        from minflux.lora import inject_lora, lora_layers, lora_parameters

        model = random_flux(cfg.flux, device, torch.float32).requires_grad_(False)  # LoRA injected in fp32, then cast
        state_dict = {k: v.clone() for k, v in model.state_dict().items()} if "reference" in impls else None
        inject_lora(model, rank=cfg.lora_rank)  # kohya's default targets: every linear layer of every block
        layers = lora_layers(model)
        targets = sorted(name for name, t in diffusers_names(model).items() if t.module in layers)  # peft's names
        info["lora_layers"] = len(layers)
        if "reference" in impls:
            from peft import LoraConfig

            ref = diffusers_flux(cfg.flux, state_dict).requires_grad_(False)
            ref.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=targets))
            ref.to(device, dtype).train()
            if gradient_checkpointing:
                ref.enable_gradient_checkpointing()
            ref_params = [p for p in ref.parameters() if p.requires_grad]
            fns["reference"] = train_step(ref, ref_params, diffusers_call)
        if "minflux" in impls:
            model.to(device, dtype).train()
            model.gradient_checkpointing = gradient_checkpointing
            fns["minflux"] = train_step(model, lora_parameters(model), lambda m, x: m(**x))
        del model

    elif case == "vae-decode":
        with building_on(device, dtype):
            ae = AutoEncoder(cfg.ae).eval()
        z = torch.randn(1, cfg.ae.z_channels, cfg.ae_latent, cfg.ae_latent, device=device, dtype=dtype)
        if "reference" in impls:
            import diffusers
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            levels = len(cfg.ae.ch_mult)
            config = dict(
                in_channels=cfg.ae.in_channels,
                out_channels=cfg.ae.out_ch,
                latent_channels=cfg.ae.z_channels,
                down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[cfg.ae.ch * m for m in cfg.ae.ch_mult],
                layers_per_block=cfg.ae.num_res_blocks,
                norm_num_groups=32,
                sample_size=cfg.ae.resolution,
                scaling_factor=cfg.ae.scale_factor,
                shift_factor=cfg.ae.shift_factor,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
            with building_on(device, dtype):
                ref = diffusers.AutoencoderKL(**config).eval()
            ref.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), config), strict=True)
            # minflux's decode takes the scaled latent and undoes scale and shift itself; diffusers' does not
            fns["reference"] = torch.no_grad()(
                lambda: ref.decode(z / cfg.ae.scale_factor + cfg.ae.shift_factor, return_dict=False)[0]
            )
        if "minflux" in impls:
            fns["minflux"] = torch.no_grad()(lambda: ae.decode(z))

    elif case == "t5-encode":
        with building_on(device, dtype):
            t5 = T5Encoder(cfg.t5).eval()
        ids = torch.randint(0, cfg.t5.vocab_size, (1, cfg.t5_tokens), device=device)
        if "reference" in impls:
            from transformers import T5Config, T5EncoderModel

            p = cfg.t5
            config = T5Config(
                vocab_size=p.vocab_size,
                d_model=p.d_model,
                d_kv=p.d_kv,
                d_ff=p.d_ff,
                num_layers=p.num_layers,
                num_heads=p.num_heads,
                feed_forward_proj="gated-gelu",
                layer_norm_epsilon=p.layer_norm_epsilon,
                relative_attention_num_buckets=p.relative_attention_num_buckets,
                relative_attention_max_distance=p.relative_attention_max_distance,
                dropout_rate=0.0,
            )
            with building_on(device, dtype):
                ref = T5EncoderModel(config).eval()
            ref.load_state_dict(t5.state_dict(), strict=True)
            fns["reference"] = torch.no_grad()(lambda: ref(input_ids=ids).last_hidden_state)
        if "minflux" in impls:
            fns["minflux"] = torch.no_grad()(lambda: t5(ids))

    elif case == "clip-encode":
        with building_on(device, dtype):
            clip = CLIPTextModel(cfg.clip).eval()
        ids = torch.randint(0, cfg.clip.vocab_size - 1, (1, cfg.clip.max_position_embeddings), device=device)
        if "reference" in impls:
            import transformers

            p = cfg.clip
            config = transformers.CLIPTextConfig(
                vocab_size=p.vocab_size,
                hidden_size=p.hidden_size,
                intermediate_size=p.intermediate_size,
                num_hidden_layers=p.num_layers,
                num_attention_heads=p.num_heads,
                max_position_embeddings=p.max_position_embeddings,
                layer_norm_eps=p.layer_norm_eps,
                hidden_act=p.hidden_act,
                eos_token_id=p.eos_token_id,
                bos_token_id=0,
                pad_token_id=1,
            )
            with building_on(device, dtype):
                ref = transformers.CLIPTextModel(config).eval()
            ours = clip.state_dict()
            if not any(k.startswith("text_model.") for k in ref.state_dict()):  # newer transformers drop the level
                ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
            ref.load_state_dict(ours, strict=True)
            fns["reference"] = torch.no_grad()(lambda: ref(input_ids=ids).pooler_output)
        if "minflux" in impls:
            fns["minflux"] = torch.no_grad()(lambda: clip(ids))
    else:
        raise ValueError(f"unknown case {case!r}: expected one of {ALL_CASES}")
    return {"fns": fns, "info": info}
