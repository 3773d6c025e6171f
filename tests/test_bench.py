"""The benchmark runs end to end on a tiny configuration, with and without the reference libraries.

No timing is asserted: only that every case ran, timed both libraries, and wrote the fields the table of
minflux/study/BENCH.md is made from.
"""

import json
import subprocess
import sys
import time

import pytest
import torch

from minflux.study import bench, bench_cases
from tests.test_compile import HAS_CXX

CASES = [c for c in bench.ALL_CASES if c != "matmul"]


def run(tmp_path, *flags) -> dict:
    path = tmp_path / "bench.json"
    flags = ["--runs", "1", "--warmup", "1", "--min-seconds", "0", "--threads", "1", "--no-memory", *flags]
    bench.main(["--config", "tiny", "--json", str(path), *flags])
    return json.loads(path.read_text())


def test_bench_tiny_times_every_case_against_the_reference(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    report = run(tmp_path)
    results = report["results"]["tiny"]
    assert set(results) == set(bench.ALL_CASES)
    assert results["matmul"]["fp32_tflops"] > 0 and results["matmul"]["bf16_tflops"] > 0
    if not HAS_CXX:  # torch.compile cannot build kernels here: the case says so instead of timing minflux
        assert "torch.compile failed" in results.pop("forward-fp32-compiled")["note"]
    for case in (c for c in CASES if c in results):
        r = results[case]
        assert r["minflux_s"] > 0 and r["reference_s"] > 0, case
        assert r["ratio"] == pytest.approx(r["minflux_s"] / r["reference_s"]), case
        low, high = r["ratio_paired_ci"]
        assert low <= r["ratio_paired"] <= high, case
        if case in bench_cases.TARGETS:
            assert r["target"] == bench_cases.TARGETS[case]
            assert r["meets_target"] == (True if high <= r["target"] else False if low > r["target"] else None)
    for case in ("forward-fp32", "forward-fp32-compiled", "forward-bf16"):
        if case in results:
            assert 0 < results[case]["minflux_mfu"] and 0 < results[case]["reference_mfu"]
    if HAS_CXX:  # compiled blocks compute the eager model's output
        compiled = results["forward-fp32-compiled"]
        assert compiled["compile_s"] > 0 and compiled["compiled_error"] < 1e-4
        assert compiled["frozen"]  # on the CPU, as sample.py --compile compiles
    # bf16 is compared with the fp32 output of the same weights; both libraries stay close to it
    assert results["forward-bf16"]["minflux_bf16_error"] < 0.1
    assert report["machine"]["diffusers"] is not None


def test_bench_without_the_reference_libraries_times_minflux_alone(tmp_path, monkeypatch):
    for lib in ("diffusers", "transformers", "peft"):
        monkeypatch.setitem(sys.modules, lib, None)  # `import diffusers` now raises ImportError
    cases = [c for c in CASES if c != "forward-fp32-compiled"]  # (its compiling is timed in the test above)
    report = run(tmp_path, "--cases", ",".join(cases))
    assert report["machine"]["diffusers"] is None
    results = report["results"]["tiny"]
    assert set(results) == {"matmul", *cases}  # matmul is added for the forward cases' MFU
    for case in cases:
        r = results[case]
        assert r["minflux_s"] > 0 and "reference_s" not in r and "ratio" not in r, case
        assert "not installed" in r["note"], case
    assert "not installed" in bench.table(report)


def test_paired_ratio_is_the_median_of_the_rounds_with_an_interval_around_it():
    """Rounds where a slow spell of the machine hits both libraries alike keep their ratio: the paired median sees
    through what moves the ratio of the two medians."""
    minflux = [1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0]  # the machine slow in rounds 3 to 5
    reference = [1.25, 1.25, 2.5, 2.5, 2.5, 1.25, 1.0]  # minflux 0.8× in every round but the last
    median, (low, high) = bench.paired_ratio(minflux, reference)
    assert median == 0.8 and low == 0.8 and high in (0.8, 1.0)
    assert bench.paired_ratio([1.0], [2.0]) == (0.5, [0.5, 0.5])


def test_bench_measures_peak_memory_in_a_subprocess():
    memory = bench.memory_in_subprocess("tiny", "forward-fp32", "minflux", gradient_checkpointing=False)
    assert memory["peak_mb"] > 0 and memory["work_mb"] >= 0


def test_flux_flops_matches_pytorchs_flop_counter():
    """The analytic count (used for the MFU) against torch.utils.flop_counter on a real forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from minflux.attention import attention_backend

    cfg = bench_cases.CONFIGS["tiny"]
    model = bench_cases.random_flux(cfg.flux, "cpu", torch.float32)
    inputs = bench_cases.flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, torch.float32, "cpu")
    with torch.no_grad(), attention_backend("explicit"), FlopCounterMode(display=False) as counter:
        model(**inputs)  # explicit: the counter sees the attention's two matrix products (not the CPU SDPA kernel)
    expected = bench_cases.flux_flops(cfg.flux, img_tokens=inputs["img"].shape[1], txt_tokens=cfg.txt_tokens)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)


def test_cpu_bf16_attention_path_is_as_close_to_float32_as_sdpa():
    """On the CPU, "auto" computes bf16 attention by the explicit formula (faster there); its error against
    float32 must stay of the order of SDPA's own bf16 error. Measured here: mean and max |Δ| 1.4× SDPA's."""
    import torch
    import torch.nn.functional as F

    from minflux.attention import attention_backend, scaled_dot_product

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 64, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    with attention_backend("sdpa"):
        fused = scaled_dot_product(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    ours = scaled_dot_product(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()  # "auto": the explicit path
    mean_ours, mean_fused = (ours - exact).abs().mean(), (fused - exact).abs().mean()
    assert mean_ours < 2 * mean_fused and (ours - exact).abs().max() < 2 * (fused - exact).abs().max()


def test_cpu_bf16_attention_path_follows_what_the_cpu_can_do(monkeypatch):
    """ "auto" takes the explicit bf16 path only where bf16 matrix multiplies are native, SDPA where they are
    emulated; and a script asking for bf16 on such a CPU gets a note saying fp32 is faster there."""
    import torch

    from minflux import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g).bfloat16() for _ in range(3))
    with attention.attention_backend("sdpa"):
        fused = attention.scaled_dot_product(q, k, v)
    with attention.attention_backend("explicit"):
        explicit = attention.scaled_dot_product(q, k, v)
    assert not torch.equal(fused, explicit)  # the two paths round differently, so the choice shows
    monkeypatch.setattr(attention, "_CPU_BF16_NATIVE", False)
    assert torch.equal(attention.scaled_dot_product(q, k, v), fused)
    assert "emulated" in attention.cpu_bf16_note("cpu", torch.bfloat16)
    assert attention.cpu_bf16_note("cpu", torch.float32) is None
    monkeypatch.setattr(attention, "_CPU_BF16_NATIVE", True)
    assert torch.equal(attention.scaled_dot_product(q, k, v), explicit)
    assert attention.cpu_bf16_note("cpu", torch.bfloat16) is None
    monkeypatch.setattr(attention, "_CPU_BF16_NATIVE", None)
    assert attention.cpu_bf16_native() in (True, False)  # what this CPU reports, whichever it is


def test_the_bf16_attention_path_is_what_the_cpu_reports_busy_or_idle(monkeypatch):
    """The choice is read from the CPU's features, never timed: the same on a loaded machine as on an idle one."""
    from minflux import attention

    reported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    expected = reported and "AVX512" in torch.backends.cpu.get_cpu_capability()
    idle = attention.cpu_bf16_native()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the other core... and this one, shared
    try:
        monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("the bf16 path was decided by a timing"))
        loaded = [attention.cpu_bf16_native() for _ in range(20)]
    finally:
        busy.kill()
    assert idle == expected and loaded == [expected] * 20


def test_matmul_peak_stays_within_its_budget():
    """A product too slow for the budget is measured at a smaller size instead (emulated bf16 took 627 s)."""
    import time

    import torch

    start = time.perf_counter()
    flops, shape = bench.matmul_peak(2048, torch.float32, torch.device("cpu"), runs=10, budget=0.05)
    assert flops > 0 and max(shape) < 2048 and time.perf_counter() - start < 5


def test_the_peak_is_the_best_over_the_square_and_the_models_own_products(monkeypatch):
    """A square product alone under-measured the peak (an fp32 MFU of 110 %): the model's linear1 and linear2 shapes
    are measured too, and the fastest of them is the peak."""
    import torch

    cfg = bench_cases.CONFIGS["mid"]  # 1024 image + 128 text tokens, width 768, MLP 3072
    rates = {2048: 1.0, (1152, 768, 5376): 3.0, (1152, 3840, 768): 2.0}
    seen = []

    def fake(shape, dtype, device, runs, budget):
        seen.append(shape)
        return rates[shape], (shape,) * 3 if isinstance(shape, int) else shape

    monkeypatch.setattr(bench, "matmul_peak", fake)
    assert bench.peak_flops(cfg, torch.float32, torch.device("cpu"), runs=1) == (3.0, (1152, 768, 5376))
    assert seen == list(rates)


def test_the_lora_step_runs_in_fp32_where_bf16_is_emulated(monkeypatch):
    """A bf16 LoRA step on a CPU that emulates bf16 took minutes: the bench trains in fp32 there, and says so."""
    import torch

    monkeypatch.setattr(bench_cases, "cpu_bf16_native", lambda: False)
    built = bench_cases.build("lora-step", bench_cases.CONFIGS["tiny"], ["minflux"], torch.device("cpu"))
    assert built["info"]["dtype"].startswith("fp32")
    built["fns"]["minflux"]()  # one fp32 training step
    monkeypatch.setattr(bench_cases, "cpu_bf16_native", lambda: True)
    built = bench_cases.build("lora-step", bench_cases.CONFIGS["tiny"], ["minflux"], torch.device("cpu"))
    assert built["info"]["dtype"] == "bf16"
