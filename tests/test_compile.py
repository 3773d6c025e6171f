"""torch.compile of the transformer's blocks (model.compile_blocks, --compile): the same model, compiled.

The compiled graph fuses the small ops between the matrix products, which reorders float32 sums: outputs and
gradients agree with eager to float32 rounding, not bit for bit.
"""

import copy
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

import sample
import train
from minflux.model import compile_blocks
from minflux.study import bench_cases
from tests.test_train import run_train


# inductor builds its CPU kernels with a C++ compiler (CXX, else g++ or clang++); without one, torch.compile fails
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for torch.compile's CPU kernels")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.slow
@needs_cxx
def test_compiled_blocks_compute_the_eager_forward_and_gradients():
    cfg = bench_cases.CONFIGS["tiny"]
    eager = bench_cases.random_flux(cfg.flux, "cpu", torch.float32)
    compiled = compile_blocks(copy.deepcopy(eager))
    inputs = bench_cases.flux_inputs(cfg.flux, cfg.latent, cfg.txt_tokens, torch.float32, "cpu")
    torch._dynamo.reset()
    outs = []
    for model in (eager, compiled):
        out = model(**inputs)
        out.square().mean().backward()
        outs.append(out.detach())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # a double and a single block were compiled
    assert relative(outs[1], outs[0]) < 1e-5
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert relative(p.grad, grads[name].grad) < 1e-4, name
    with torch.no_grad():  # weights are inputs of the graphs, not constants: a changed weight is seen
        for model in (eager, compiled):
            for p in model.parameters():
                p.mul_(0.5)
    assert relative(compiled(**inputs), eager(**inputs)) < 1e-5


@pytest.mark.slow
@needs_cxx
def test_frozen_blocks_compute_the_eager_forward_with_one_graph_each():
    """frozen=True (sample.py --compile on the CPU): one graph per block, even past dynamo's 8 graphs per function."""
    cfg = bench_cases.CONFIGS["tiny"]
    params = dataclasses.replace(cfg.flux, depth=1, depth_single_blocks=9)
    eager = bench_cases.random_flux(params, "cpu", torch.float32)
    frozen = compile_blocks(copy.deepcopy(eager), frozen=True)
    inputs = bench_cases.flux_inputs(params, cfg.latent, cfg.txt_tokens, torch.float32, "cpu")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limit = torch._dynamo.config.recompile_limit
    with torch.no_grad():
        out = frozen(**inputs)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 10  # every block compiled, none left eager
        assert relative(out, eager(**inputs)) < 1e-5
        assert not torch._inductor.config.freezing  # the settings are back as they were outside the calls
        assert torch._dynamo.config.recompile_limit == limit
        assert torch.equal(frozen(**inputs), out)  # the second call runs the same graphs, compiling none
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 10


@pytest.mark.slow
@needs_cxx
def test_train_and_sample_with_compile(tmp_path, capsys):
    """--compile trains the same model (the first step's loss is the eager one's) and samples it."""
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        assert run_train(tmp_path, "--steps", "2", "--batch-size", "2", "--name", name, *flags) == 0  # held-out: 2 too
    first = {}
    for name in ("eager", "compiled"):
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        first[name] = json.loads(lines[0])["loss"]
    assert first["compiled"] == pytest.approx(first["eager"], rel=1e-4)
    assert "compile = true" in (tmp_path / "compiled" / "config.toml").read_text()
    capsys.readouterr()
    psnr = {}
    for flags in ([], ["--compile"]):
        assert sample.main(["--run", str(tmp_path / "compiled"), "--num", "2", "--steps", "2", *flags]) == 0
        psnr[bool(flags)] = float(re.search(r"psnr ([\d.]+) dB", capsys.readouterr().out)[1])
    assert psnr[True] == pytest.approx(psnr[False], abs=0.05)


def test_compile_with_fsdp_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse(["--compile", "--parallel", "fsdp"])
    assert exit_.value.code == 2 and "--compile" in capsys.readouterr().err
