"""The memory tables (minflux/study/memory.py): BENCH.md's rows are the tool's; what they count, counted by hand."""

import re
from pathlib import Path

import pytest
import torch

from minflux.flux2 import Flux2Params
from minflux.presets import configs
from minflux.study.memory import PRESETS, budget, main, memory_table, training_model
from minflux.tasks.parallel import GB, memory_estimate

BENCH = Path(__file__).resolve().parents[1] / "minflux" / "study" / "BENCH.md"


@pytest.mark.parametrize("preset", PRESETS)
def test_the_tables_in_bench_md_are_the_tools_output(preset):
    table = memory_table(preset)
    assert len(table.splitlines()) == 4  # the header, its rule, LoRA, full fine-tune
    assert table in BENCH.read_text(), f"BENCH.md's {preset} table is not `python -m minflux.study.memory {preset}`"


def lora_by_hand(p) -> int:
    """rank · (in + out) over the default targets, from the widths alone. FLUX.2: per stream of a double block qkv
    h → 3h, proj h → h, SwiGLU's h → 2m and m → h; a single block's linear1 h → 3h + 2m and linear2 h + m → h.
    FLUX.1: a GELU MLP (h → m → h), and each block's own modulation (h → 6h per stream, h → 3h in a single block)."""
    h, m = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    if isinstance(p, Flux2Params):
        stream = (h + 3 * h) + (h + h) + (h + 2 * m) + (m + h)
        single = (h + 3 * h + 2 * m) + (h + m + h)
    else:
        stream = (h + 3 * h) + (h + h) + (h + m) + (m + h) + (h + 6 * h)
        single = (h + 3 * h + m) + (h + m + h) + (h + 3 * h)
    return 16 * (p.depth * 2 * stream + p.depth_single_blocks * single)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_lora_trains_rank_times_in_plus_out_of_each_targeted_layer_in_fp32(preset):
    lora, full = training_model(preset, full=False), training_model(preset, full=True)
    trained = [t for t in lora.parameters() if t.requires_grad]
    assert sum(t.numel() for t in trained) == lora_by_hand(configs[preset].params)  # FLUX.2 klein 4B: 23,101,440
    assert {t.dtype for t in trained} == {torch.float32}
    assert {t.dtype for t in lora.parameters() if not t.requires_grad} == {torch.bfloat16}
    assert all(t.requires_grad and t.dtype == torch.float32 for t in full.parameters())
    m, w = budget(full), sum(t.numel() for t in full.parameters())
    assert m.weights == 4 * w and m.trained == 12 * w  # fp32 weights; an fp32 gradient and AdamW's two moments
    assert m.fsdp(8) < m.fsdp(2) < m.ddp and m.host(8) == m.host(1) / 8


def test_the_printed_estimate_of_a_flux2_model_is_its_budget(capsys):
    """train.py prints memory_estimate: on FLUX.2 it reads the same blocks and widths as on FLUX.1."""
    model = training_model("flux2-klein-4b", full=False)
    line = memory_estimate(model, 1, 4608, True, torch.bfloat16, 4)
    m = budget(model)
    got = re.search(r"DDP ([\d.]+) GB, FSDP over 4 process\(es\) ([\d.]+) GB", line).groups()
    assert got == (f"{m.ddp / GB:.2f}", f"{m.fsdp(4) / GB:.2f}")
    assert main(["flux2-klein-4b"]) == 0
    assert memory_table("flux2-klein-4b") in capsys.readouterr().out
