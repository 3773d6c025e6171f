"""Parameter tables (minflux/study/params.py): a folded row says what its blocks hold, each one."""

import re

import pytest

from minflux.study.params import meta_components, parameter_table


@pytest.fixture(scope="module")
def flux_dev():
    parts = meta_components("flux-dev")  # on the meta device: no memory, no time
    return parts, parameter_table(parts)


def row(table: str, label: str) -> list[str]:
    """The row whose label (indent stripped) is `label`: [label, parameters, trainable, frozen, note]."""
    return next(re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.strip().startswith(label))


def per_block(note: str) -> list[int]:
    """A ModuleList row's note as one count per block: "X each" is left to the caller; "a + 3 × b" → [a, b, b, b]."""
    counts = []
    for term in note.split(" + "):
        n, _, count = term.rpartition(" × ")
        counts += [int(count.replace(",", ""))] * int(n or 1)
    return counts


def own_counts(blocks) -> list[int]:
    return [sum(p.numel() for p in b.parameters()) for b in blocks]


def test_vae_levels_of_different_sizes_are_each_given_their_own_count(flux_dev):
    parts, table = flux_dev
    for label, levels in [("down (4 × Module)", parts["ae"].encoder.down), ("up (4 × Module)", parts["ae"].decoder.up)]:
        cells = row(table, label)
        assert "each" not in cells[-1], cells
        assert per_block(cells[-1]) == own_counts(levels), cells  # 738,944 + 2,690,304 + 10,754,560 + 9,443,328
        assert sum(per_block(cells[-1])) == int(cells[1].replace(",", ""))
    assert per_block(row(table, "down (4 × Module)")[-1]) == [738_944, 2_690_304, 10_754_560, 9_443_328]


def test_t5_first_block_with_its_position_bias_is_not_folded_with_the_others(flux_dev):
    parts, table = flux_dev
    note = row(table, "block (24 × T5Block)")[-1]
    assert note == "192,948,224 + 23 × 192,946,176"  # block 0 holds the relative position bias, 32 × 64
    assert per_block(note) == own_counts(parts["t5"].encoder.block)


def test_identical_blocks_still_fold_into_one_row_and_the_parts_of_one_block(flux_dev):
    parts, table = flux_dev
    for label, blocks in [
        ("double_blocks (19 × DoubleStreamBlock)", parts["transformer"].double_blocks),
        ("single_blocks (38 × SingleStreamBlock)", parts["transformer"].single_blocks),
        ("layers (12 × CLIPEncoderLayer)", parts["clip"].text_model.encoder.layers),
    ]:
        assert row(table, label)[-1] == f"{own_counts(blocks)[0]:,} each"
        assert len(set(own_counts(blocks))) == 1
    assert "img_attn (SelfAttention)" in table and "in one block" in row(table, "img_attn (SelfAttention)")[-1]
