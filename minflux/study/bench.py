"""The benchmark: minflux against the reference libraries, in time and memory, and against the machine's peak.

    python -m minflux.study.bench                               # "mid" on CPU (a few minutes); on CUDA also "full"
    python -m minflux.study.bench --config tiny --runs 2        # seconds: what the CI smoke test runs
    python -m minflux.study.bench --cases forward-bf16,lora-step --json bench.json

Each case builds minflux and the reference with the same random weights, warms both up, then times them
alternately in one process (so a background load hits both alike) and reports the medians, and the median of
the per-round ratios with its 90% bootstrap interval (`paired_ratio`): a target counts as met, or missed, only
where the whole interval says so.

    matmul         one large matrix product in fp32 and bf16: the machine's peak FLOP/s, the yardstick for MFU
    forward-fp32   the transformer forward                                      vs diffusers FluxTransformer2DModel
    forward-fp32-compiled  the same, minflux's blocks compiled as sample.py --compile does (`compile_blocks`,
                   on the CPU with frozen weights) against diffusers as it is called without torch.compile;
                   the time the compiling took
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
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from minflux.study.bench_cases import ALL_CASES, CONFIGS, BenchConfig, build, missing_libs

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


# --- the cases ---------------------------------------------------------------------------------------------


def paired_ratio(minflux: list[float], reference: list[float], level: float = 0.9) -> tuple[float, list[float]]:
    """The median of the per-round ratios minflux / reference, and its bootstrap confidence interval.

    The two libraries run alternately, so a round's ratio cancels a slow spell of the machine that hits both; its
    median moves far less than the ratio of the two medians on a noisy VM. The interval (2000 resamples of the
    rounds, a fixed seed) says whether a target is met beyond that noise.
    """
    ratios = [m / r for m, r in zip(minflux, reference)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    tail = int(len(medians) * (1 - level) / 2)
    return statistics.median(ratios), [medians[tail], medians[-1 - tail]]


def matmul_peak(shape, dtype, device, runs: int, budget: float = 10.0) -> tuple[float, tuple[int, int, int]]:
    """(FLOP/s, (m, k, n)) of an [m, k] × [k, n] matrix product (an int: a square one): the most this machine
    does in `dtype` at that shape.

    From the fastest of the runs: a peak is what the machine can do, and other processes only slow it down. The
    measurement stays within about `budget` seconds: the shape is halved while one product takes more than a tenth
    of it (bf16 emulated on a CPU without AVX512-BF16 or AMX runs a 2048³ product in tens of seconds).
    """
    m, k, n = (shape,) * 3 if isinstance(shape, int) else shape
    while True:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        start = time.perf_counter()
        a @ b
        sync(device)
        once = time.perf_counter() - start
        if once <= budget / 10 or min(m, k, n) <= 128:
            break
        m, k, n = m // 2, k // 2, n // 2
    runs = max(2, min(max(runs, 10), int(budget / max(once, 1e-9))))
    times = time_alternating({"mm": lambda: a @ b}, warmup=1, runs=runs, device=device)["mm"]
    return 2 * m * k * n / min(times), (m, k, n)


def peak_flops(cfg: BenchConfig, dtype, device, runs: int, budget: float = 10.0) -> tuple[float, tuple[int, int, int]]:
    """The best of matmul_peak over a square product and the model's own largest products (a single block's linear1
    and linear2 over the config's tokens): a library's GEMMs can run faster at the model's shapes than at one square
    size, and a peak below what the model reaches would put the MFU above 100 %."""
    p, tokens = cfg.flux, (cfg.latent // 2) ** 2 + cfg.txt_tokens
    h, mlp = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    shapes = [cfg.matmul_size, (tokens, h, 3 * h + mlp), (tokens, h + mlp, h)]
    return max(matmul_peak(s, dtype, device, runs, budget / len(shapes)) for s in shapes)


def memory_in_subprocess(cfg_name: str, case: str, impl: str, gradient_checkpointing: bool) -> dict:
    command = [sys.executable, "-m", "minflux.study.bench", "--config", cfg_name, "--memory-of", f"{case}:{impl}"]
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
            peaks[name], shape = peak_flops(cfg, dtype, device, args.runs)
            result[f"{name}_shape"] = list(shape)
            result[f"{name}_tflops"] = peaks[name] / 1e12
        # bf16 slower than fp32: emulated (converted to fp32 inside), so its peak is the fp32 one
        result["bf16_emulated"] = peaks["emulated"] = peaks["bf16"] < peaks["fp32"]
        return result

    missing = missing_libs(case)
    impls = ["minflux"] if missing or args.no_reference else ["minflux", "reference"]
    result = {}
    if missing:
        result["note"] = f"reference skipped: {', '.join(missing)} not installed"
    built = build(case, cfg, impls, device)
    fns = built["fns"]
    if args.compile:  # (the compiled case's minflux is compiled already, as the scripts compile it)
        fns = {
            name: fn if case == "forward-fp32-compiled" and name == "minflux" else torch.compile(fn)
            for name, fn in fns.items()
        }
    times = time_alternating(fns, args.warmup, args.runs, device, min_seconds=args.min_seconds)
    for name, ts in times.items():
        result[f"{name}_s"] = statistics.median(ts)
        result[f"{name}_best_s"] = min(ts)  # other processes only ever add time: the least disturbed run
        result[f"{name}_runs_s"] = ts
    if "reference_s" in result and "minflux_s" in result:
        result["ratio"] = result["minflux_s"] / result["reference_s"]
        result["ratio_best"] = result["minflux_best_s"] / result["reference_best_s"]
        result["ratio_paired"], result["ratio_paired_ci"] = paired_ratio(times["minflux"], times["reference"])
        if case in cfg.targets:
            result["target"] = target = cfg.targets[case]
            low, high = result["ratio_paired_ci"]  # met or missed where the whole interval says so; else None
            result["meets_target"] = True if high <= target else False if low > target else None
    info = built["info"]
    result.update({k: v for k, v in info.items() if k != "flops"})
    if "flops" in info:
        dtype = "bf16" if case == "forward-bf16" else "fp32"
        result["model_tflop"] = info["flops"] / 1e12
        for name in times:
            result[f"{name}_tflops"] = info["flops"] / result[f"{name}_s"] / 1e12
            if dtype in peaks:  # against the peak of the dtype used; an emulated bf16 computes at the fp32 peak
                peak = max(peaks["bf16"], peaks["fp32"]) if dtype == "bf16" else peaks["fp32"]
                result[f"{name}_mfu"] = info["flops"] / result[f"{name}_s"] / peak
        if dtype == "bf16" and peaks.get("emulated"):
            result["bf16_emulated"] = True
    del built, fns
    gc.collect()

    if not args.no_memory and case != "forward-fp32-compiled":  # its memory: forward-fp32's (same ops, fused)
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
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
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


MET = {True: "✓", False: "✗", None: "~"}  # ~: the interval holds the target, the noise decides


def table(report: dict) -> str:
    columns = [
        "config",
        "case",
        "minflux ms",
        "reference ms",
        "ratio [90% CI] (target)",
        "peak MB minflux / ref",
        "work MB minflux / ref",
        "notes",
    ]
    rows = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for config, cases in report["results"].items():
        for case, r in cases.items():
            if case == "matmul":
                shape = lambda d: "×".join(map(str, r[f"{d}_shape"]))  # noqa: E731
                note = (
                    f"peak {r['fp32_tflops']:.3f} TFLOP/s fp32 (at {shape('fp32')}), "
                    f"{r['bf16_tflops']:.3f} bf16 (at {shape('bf16')})"
                )
                if r.get("bf16_emulated"):
                    note += " (emulated: slower than fp32)"
                rows.append(f"| {config} | matmul | | | | | | {note} |")
                continue
            ratio = ""
            if "ratio" in r:
                low, high = r["ratio_paired_ci"]
                ratio = f"{r['ratio_paired']:.2f} [{low:.2f}, {high:.2f}]"
            if "target" in r:
                ratio += f" (≤ {r['target']} {MET[r['meets_target']]})"
            notes = [r["note"]] if "note" in r else []
            if "dtype" in r:
                notes.append(r["dtype"])
            if "ratio_best" in r:
                best = f"{_ms(r['minflux_best_s'])} / {_ms(r['reference_best_s'])} ms"
                notes.append(f"best runs {best} = {r['ratio_best']:.2f}")
            if "minflux_mfu" in r:
                mfu = f"MFU {100 * r['minflux_mfu']:.0f}%"
                if "reference_mfu" in r:
                    mfu += f" (ref {100 * r['reference_mfu']:.0f}%)"
                if r.get("bf16_emulated"):
                    mfu += " of the fp32 peak (bf16 emulated)"
                notes.append(mfu)
            if "compile_s" in r:
                frozen = ", weights frozen" if r.get("frozen") else ""
                notes.append(
                    f"compiling took {r['compile_s']:.1f} s (the first call{frozen}); output vs eager "
                    f"{r['compiled_error']:.1e} of its std"
                )
            if "minflux_bf16_error" in r:
                notes.append(f"bf16 error vs fp32 {r['minflux_bf16_error']:.3f} (ref {r['reference_bf16_error']:.3f})")
            if "gc_memory_ratio" in r:
                notes.append(f"checkpointing: peak ×{r['gc_memory_ratio']:.2f}, work ×{r['gc_work_ratio']:.2f}")
            peak = work = ""  # the compiled case has no memory of its own
            if "minflux_peak_mb" in r:
                peak = f"{_mb(r.get('minflux_peak_mb'))} / {_mb(r.get('reference_peak_mb'))}"
                work = f"{_mb(r.get('minflux_work_mb'))} / {_mb(r.get('reference_work_mb'))}"
            rows.append(
                f"| {config} | {case} | {_ms(r.get('minflux_s'))} | {_ms(r.get('reference_s'))} | {ratio} "
                f"| {peak} | {work} | {'; '.join(notes)} |"
            )
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minflux.study.bench", description=__doc__.split("\n\n")[0])
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
    print(
        f"\nminflux vs reference on {where}, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}, peft {m['peft']}\n"
    )
    print(table(report))
    return report


if __name__ == "__main__":
    main()
