"""The benchmark: minflux against the reference libraries, in time and memory, and against the machine's peak.

    python -m minflux.bench                               # "mid" on CPU (a few minutes); on CUDA also "full"
    python -m minflux.bench --config tiny --runs 2        # seconds: what the CI smoke test runs
    python -m minflux.bench --cases forward-bf16,lora-step --json bench.json

Each case builds minflux and the reference with the same random weights, warms both up, then times them
alternately in one process (so a background load hits both alike) and reports the medians and their ratio:

    matmul         one large matrix product in fp32 and bf16: the machine's peak FLOP/s, the yardstick for MFU
    forward-fp32   the transformer forward                                      vs diffusers FluxTransformer2DModel
    forward-bf16   the same in bfloat16; also its error against the fp32 output, for both libraries
    lora-step      forward + backward + AdamW step of a LoRA, bf16, same targets and rank    vs diffusers + peft
    vae-decode     AutoEncoder.decode                                           vs diffusers AutoencoderKL
    t5-encode      the T5 v1.1 encoder                                          vs transformers T5EncoderModel
    clip-encode    the CLIP-L text tower                                        vs transformers CLIPTextModel

The forward cases also print the model FLOPs utilisation (MFU): the model's FLOPs, counted analytically
(`flux_flops`), per second, as a fraction of the matmul peak measured in the same run and dtype.

Memory: on CUDA the allocator's peak (torch.cuda.max_memory_allocated). On the CPU each case runs again in a
subprocess per library, so that one library's allocations do not hide the other's, and reads the process's
peak resident memory (VmHWM, reset just before the measured call). Two figures: `peak_mb`, the process at its
peak, and `work_mb`, the peak minus what was resident before the call (weights, inputs, optimizer state):
the memory the call itself needs. The lora-step case is measured with and without gradient checkpointing.

diffusers, transformers and peft are optional: without them the reference columns stay empty, with a note.
"""

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from minflux.autoencoder import AE_PARAMS_FLUX, AutoEncoder, AutoEncoderParams
from minflux.clip import CLIP_L, CLIPParams, CLIPTextModel
from minflux.flow import latent_ids, pack, prepare_txt_ids
from minflux.model import Flux, FluxParams
from minflux.presets import FLUX_DEV
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


ALL_CASES = ["matmul", "forward-fp32", "forward-bf16", "lora-step", "vae-decode", "t5-encode", "clip-encode"]
# The targets of the performance issue: minflux time / reference time at most this (on CUDA, full size: 0.9).
TARGETS = {"forward-fp32": 1.0, "forward-bf16": 0.8, "lora-step": 0.9, "vae-decode": 1.0, "t5-encode": 1.0}

CONFIGS = {
    # Seconds on a laptop: the smoke test's configuration. Every part of the architecture, tiny widths.
    "tiny": BenchConfig(
        "tiny",
        FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=128, mlp_ratio=4.0,
                   num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10_000, qkv_bias=True,
                   guidance_embed=True),
        latent=8, txt_tokens=8, lora_rank=4,
        ae=AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
                             z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
        ae_latent=8,
        t5=T5Params(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4), t5_tokens=32,
        clip=CLIPParams(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
        matmul_size=256, cases=ALL_CASES, targets=TARGETS,
    ),  # fmt: skip
    # A few minutes on a 2-core CPU: FLUX's head size and RoPE axes, 6 heads, 2 double + 4 single blocks,
    # 1024 image + 128 text tokens; the official VAE at 256×256, a T5 of t5-base's width, CLIP-L itself.
    "mid": BenchConfig(
        "mid",
        replace(FLUX_DEV, hidden_size=768, num_heads=6, depth=2, depth_single_blocks=4),
        latent=64, txt_tokens=128, lora_rank=16,
        ae=AE_PARAMS_FLUX, ae_latent=32,
        t5=T5Params(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=6, num_heads=12), t5_tokens=512,
        clip=CLIP_L, matmul_size=2048, cases=ALL_CASES, targets=TARGETS,
    ),  # fmt: skip
    # FLUX.1-dev at 1024×1024 with a 512-token prompt, random weights: CUDA only (24 GB per bf16 copy).
    "full": BenchConfig(
        "full", FLUX_DEV, latent=128, txt_tokens=512, lora_rank=16, ae=AE_PARAMS_FLUX, ae_latent=128,
        t5=T5_XXL, t5_tokens=512, clip=CLIP_L, matmul_size=8192,
        cases=["matmul", "forward-bf16", "vae-decode", "t5-encode", "clip-encode"],
        targets={"forward-bf16": 0.9, "vae-decode": 1.0, "t5-encode": 1.0},
    ),  # fmt: skip
}
REFERENCE_LIBS = {
    "forward-fp32": ["diffusers"], "forward-bf16": ["diffusers"], "lora-step": ["diffusers", "peft"],
    "vae-decode": ["diffusers"], "t5-encode": ["transformers"], "clip-encode": ["transformers"],
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


# --- timing and memory -------------------------------------------------------------------------------------


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(
    fns: dict, warmup: int, runs: int, device: torch.device, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Call every function `warmup` times, then rounds of each in turn; seconds per call.

    At least `runs` rounds, and more for fast calls, up to 50, until the timed rounds take about `min_seconds`:
    a short call is timed often enough that a burst of load from other processes does not set its median.
    """
    slowest = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            start = time.perf_counter()
            fn()
            sync(device)
            slowest = max(slowest, time.perf_counter() - start)
    if min_seconds and slowest > 0:
        runs = max(runs, min(50, int(min_seconds / (len(fns) * slowest))))
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _proc_status_mb(key: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) / 1024


def measure_memory(fn, device: torch.device) -> dict:
    """Peak memory of one call of fn: the process (or the CUDA allocator) at its peak, and above its start."""
    fn()  # once first: lazy allocations (optimizer state, caches) are part of the resident state
    gc.collect()
    try:  # glibc keeps freed memory for reuse; hand it back, or the measured call would not need to grow
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "work_mb": (peak - before) / 2**20}
    try:  # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current resident size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_mb("VmRSS")
        fn()
        peak = _proc_status_mb("VmHWM")
    except OSError:  # elsewhere: the peak since the process started
        import resource

        before = 0.0
        fn()
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return {"peak_mb": peak, "work_mb": peak - before}


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

    from minflux.loaders import flux_to_diffusers

    with torch.device("meta"):
        ref = FluxTransformer2DModel(
            patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
            num_single_layers=p.depth_single_blocks, attention_head_dim=p.hidden_size // p.num_heads,
            num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed, axes_dims_rope=tuple(p.axes_dim),
        )  # fmt: skip
    ref.load_state_dict(flux_to_diffusers(state_dict), strict=True, assign=True)
    return ref.eval()


def diffusers_call(ref, inputs: dict) -> Tensor:
    """diffusers' call for the same inputs: its ids are per sequence ([L, 3]); it scales t and guidance itself."""
    return ref(
        hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
        timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
        guidance=inputs["guidance"], return_dict=False,
    )[0]  # fmt: skip


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

    if case in ("forward-fp32", "forward-bf16"):
        dtype = torch.float32 if case == "forward-fp32" else torch.bfloat16
        model = random_flux(cfg.flux, device, dtype)
        inputs = flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, dtype, device)
        info["flops"] = flux_flops(cfg.flux, inputs["img"].shape[1], cfg.txt_tokens)
        if "reference" in impls:
            ref = diffusers_flux(cfg.flux, model.state_dict())
            fns["reference"] = torch.no_grad()(lambda: diffusers_call(ref, inputs))
        if "minflux" in impls:
            fns["minflux"] = torch.no_grad()(lambda: model(**inputs))
        small = sum(p.numel() for p in model.parameters()) < 10**9
        if case == "forward-bf16" and len(fns) == 2 and small:  # what bf16 costs each library: error against fp32
            with torch.no_grad():  # the same (bf16-rounded) weights in fp32: the exact output of this model
                model32 = Flux(cfg.flux).to(device).eval()
                model32.load_state_dict(model.state_dict())
                exact = model32(**flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, torch.float32, device)).float()
                del model32
                for name, fn in fns.items():
                    info[f"{name}_bf16_error"] = ((fn().float() - exact).abs().max() / exact.std()).item()

    elif case == "lora-step":
        dtype = torch.bfloat16
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

        from minflux.lora import diffusers_names, inject_lora, lora_layers, lora_parameters

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
                in_channels=cfg.ae.in_channels, out_channels=cfg.ae.out_ch, latent_channels=cfg.ae.z_channels,
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[cfg.ae.ch * m for m in cfg.ae.ch_mult], layers_per_block=cfg.ae.num_res_blocks,
                norm_num_groups=32, sample_size=cfg.ae.resolution, scaling_factor=cfg.ae.scale_factor,
                shift_factor=cfg.ae.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
            )  # fmt: skip
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
                vocab_size=p.vocab_size, d_model=p.d_model, d_kv=p.d_kv, d_ff=p.d_ff, num_layers=p.num_layers,
                num_heads=p.num_heads, feed_forward_proj="gated-gelu", layer_norm_epsilon=p.layer_norm_epsilon,
                relative_attention_num_buckets=p.relative_attention_num_buckets,
                relative_attention_max_distance=p.relative_attention_max_distance, dropout_rate=0.0,
            )  # fmt: skip
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
                vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                max_position_embeddings=p.max_position_embeddings, layer_norm_eps=p.layer_norm_eps,
                hidden_act=p.hidden_act, eos_token_id=p.eos_token_id, bos_token_id=0, pad_token_id=1,
            )  # fmt: skip
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


# --- the cases ---------------------------------------------------------------------------------------------


def matmul_peak(size: int, dtype, device, runs: int) -> float:
    """FLOP/s of a size × size × size matrix product: the most this machine does in `dtype`.

    From the fastest of the runs: a peak is what the machine can do, and other processes only slow it down.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = time_alternating({"mm": lambda: a @ b}, warmup=2, runs=max(runs, 10), device=device)["mm"]
    return 2 * size**3 / min(times)


def memory_in_subprocess(cfg_name: str, case: str, impl: str, gradient_checkpointing: bool) -> dict:
    command = [sys.executable, "-m", "minflux.bench", "--config", cfg_name, "--memory-of", f"{case}:{impl}"]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: str, cfg: BenchConfig, args, device: torch.device, peaks: dict) -> dict:
    if case == "matmul":
        result = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name] = matmul_peak(cfg.matmul_size, dtype, device, args.runs)
            result[f"{name}_tflops"] = peaks[name] / 1e12
        return result

    missing = missing_libs(case)
    impls = ["minflux"] if missing or args.no_reference else ["minflux", "reference"]
    result = {}
    if missing:
        result["note"] = f"reference skipped: {', '.join(missing)} not installed"
    built = build(case, cfg, impls, device)
    fns = built["fns"]
    if args.compile:
        fns = {name: torch.compile(fn) for name, fn in fns.items()}
    times = time_alternating(fns, args.warmup, args.runs, device, min_seconds=args.min_seconds)
    for name, ts in times.items():
        result[f"{name}_s"] = statistics.median(ts)
        result[f"{name}_best_s"] = min(ts)  # other processes only ever add time: the least disturbed run
        result[f"{name}_runs_s"] = ts
    if "reference_s" in result:
        result["ratio"] = result["minflux_s"] / result["reference_s"]
        result["ratio_best"] = result["minflux_best_s"] / result["reference_best_s"]
        if case in cfg.targets:
            result["target"] = cfg.targets[case]
            result["meets_target"] = result["ratio"] <= cfg.targets[case]
    info = built["info"]
    result.update({k: v for k, v in info.items() if k != "flops"})
    if "flops" in info:
        dtype = "fp32" if case == "forward-fp32" else "bf16"
        result["model_tflop"] = info["flops"] / 1e12
        for name in times:
            result[f"{name}_tflops"] = info["flops"] / result[f"{name}_s"] / 1e12
            if dtype in peaks:
                result[f"{name}_mfu"] = info["flops"] / result[f"{name}_s"] / peaks[dtype]
    del built, fns
    gc.collect()

    if not args.no_memory:
        variants = [False, True] if case == "lora-step" else [False]
        for impl in impls:
            for checkpointing in variants:
                key = impl + ("_gc" if checkpointing else "")
                if device.type == "cuda":
                    fn = build(case, cfg, [impl], device, checkpointing)["fns"][impl]
                    memory = measure_memory(fn, device)
                    del fn
                    gc.collect()
                    torch.cuda.empty_cache()
                else:
                    memory = memory_in_subprocess(cfg.name, case, impl, checkpointing)
                for k, v in memory.items():
                    result[f"{key}_{k}"] = v
        if "reference_peak_mb" in result and "minflux_peak_mb" in result:
            result["memory_ratio"] = result["minflux_peak_mb"] / result["reference_peak_mb"]
        if "minflux_gc_work_mb" in result and "minflux_work_mb" in result:
            result["gc_memory_ratio"] = result["minflux_gc_peak_mb"] / result["minflux_peak_mb"]
            result["gc_work_ratio"] = result["minflux_gc_work_mb"] / result["minflux_work_mb"]
    return result


# --- report ------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor()
        try:
            names = re.findall(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
            cpu = names[0] if names else cpu
        except OSError:
            pass
        info["cpu"] = cpu
        info["cores"] = os.cpu_count()
    for lib in ("diffusers", "transformers", "peft"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    return info


def _ms(x):
    return "" if x is None else f"{1e3 * x:.1f}"


def _mb(x):
    return "" if x is None else f"{x:.0f}"


def table(report: dict) -> str:
    columns = ["config", "case", "minflux ms", "reference ms", "ratio (target)", "peak MB minflux / ref",
               "work MB minflux / ref", "notes"]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for config, cases in report["results"].items():
        for case, r in cases.items():
            if case == "matmul":
                note = f"peak {r['fp32_tflops']:.3f} TFLOP/s fp32, {r['bf16_tflops']:.3f} bf16"
                rows.append(f"| {config} | matmul | | | | | | {note} |")
                continue
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
            if "target" in r:
                ratio += f" (≤ {r['target']}{' ✓' if r['meets_target'] else ' ✗'})"
            notes = [r["note"]] if "note" in r else []
            if "ratio_best" in r:
                best = f"{_ms(r['minflux_best_s'])} / {_ms(r['reference_best_s'])} ms"
                notes.append(f"best runs {best} = {r['ratio_best']:.2f}")
            if "minflux_mfu" in r:
                mfu = f"MFU {100 * r['minflux_mfu']:.0f}%"
                if "reference_mfu" in r:
                    mfu += f" (ref {100 * r['reference_mfu']:.0f}%)"
                notes.append(mfu)
            if "minflux_bf16_error" in r:
                notes.append(f"bf16 error vs fp32 {r['minflux_bf16_error']:.3f} (ref {r['reference_bf16_error']:.3f})")
            if "gc_memory_ratio" in r:
                notes.append(f"checkpointing: peak ×{r['gc_memory_ratio']:.2f}, work ×{r['gc_work_ratio']:.2f}")
            peak = f"{_mb(r.get('minflux_peak_mb'))} / {_mb(r.get('reference_peak_mb'))}"
            work = f"{_mb(r.get('minflux_work_mb'))} / {_mb(r.get('reference_work_mb'))}"
            rows.append(f"| {config} | {case} | {_ms(r.get('minflux_s'))} | {_ms(r.get('reference_s'))} | {ratio} "
                        f"| {peak} | {work} | {'; '.join(notes)} |")  # fmt: skip
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minflux.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="tiny, mid, full or a comma list (default: mid; CUDA: mid,full)")
    parser.add_argument("--cases", default=None, help=f"comma list of {','.join(ALL_CASES)} (default: the config's)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per library (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per library first")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="more runs for fast cases, up to this long")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-reference", action="store_true", help="time minflux alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--compile", action="store_true", help="torch.compile both libraries' calls")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    # internal: one memory measurement, in its own process
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:  # the subprocess of memory_in_subprocess: build one library, measure, print JSON
        case, impl = args.memory_of.split(":")
        fn = build(case, CONFIGS[args.config], [impl], device, args.gradient_checkpointing)["fns"][impl]
        gc.collect()
        print(json.dumps(measure_memory(fn, device)))
        return {}

    names = (args.config or ("mid,full" if device.type == "cuda" else "mid")).split(",")
    report = {"machine": machine(device), "results": {}, "configs": {}}
    for name in names:
        cfg = CONFIGS[name]
        cases = args.cases.split(",") if args.cases else cfg.cases
        if "matmul" not in cases and any(c.startswith("forward") for c in cases):
            cases = ["matmul"] + cases  # the MFU needs the peak
        report["configs"][name] = json.loads(json.dumps(asdict(cfg), default=str))
        results = report["results"][name] = {}
        peaks = {}
        for case in cases:
            start = time.perf_counter()
            print(f"[bench] {name} {case} ...", end="", flush=True)
            results[case] = run_case(case, cfg, args, device, peaks)
            print(f" {time.perf_counter() - start:.0f} s", flush=True)
            if args.json:  # written after every case, so a long run keeps what it has measured
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads"
    print(f"\nminflux vs reference on {where}, torch {m['torch']}, diffusers {m['diffusers']}, "
          f"transformers {m['transformers']}, peft {m['peft']}\n")  # fmt: skip
    print(table(report))
    return report


if __name__ == "__main__":
    main()
