"""The flat layout: aligned, non-overlapping segments; chunks cover every element exactly once."""

from __future__ import annotations

import pytest

from fusedoptim._layout import SEGMENT_ALIGN, chunk_table, chunk_table_tensors, padded_offsets

SIZES = [[1], [0, 5, 16, 17], [1, 7, 1023, 1025, 4097], list(range(40))]


@pytest.mark.parametrize("numels", SIZES)
def test_segments_are_aligned_and_disjoint(numels):
    offsets, total = padded_offsets(numels)
    assert all(o % SEGMENT_ALIGN == 0 for o in offsets)
    ends = [o + n for o, n in zip(offsets, numels, strict=True)]
    assert all(end <= nxt for end, nxt in zip(ends, offsets[1:] + [total], strict=True))
    assert total % SEGMENT_ALIGN == 0 and total < sum(numels) + SEGMENT_ALIGN * len(numels)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("block", [16, 1024, 4096])
@pytest.mark.parametrize("numels", SIZES)
def test_chunks_cover_each_element_once(numels, block, rows):
    active = [t for t in range(len(numels)) if t % 3 != 1]
    row_lengths = [n // 4 if rows and n % 4 == 0 and n else None for n in numels] if rows else None
    table = chunk_table(numels, active, block, row_lengths)
    spans = list(zip(table.chunk_tensor, table.chunk_start, table.chunk_end, strict=True))
    covered = [(t, i) for t, start, end in spans for i in range(start, end)]
    assert sorted(covered) == sorted((t, i) for t in active for i in range(numels[t]))  # each element once
    assert all(0 < end - start <= block for _, start, end in spans)
    # segments: tensor t is its chunks in order; each row segment is the chunks inside that row
    for t in range(len(numels)):
        chunks = range(table.segment_begin[t], table.segment_end[t])
        assert [table.chunk_tensor[c] for c in chunks] == ([t] * len(chunks))
        assert len(chunks) == (sum(1 for c in table.chunk_tensor if c == t))
    if rows:
        for c, (t, start, end) in enumerate(spans):
            length = row_lengths[t]
            if length is not None:
                assert start // length == (end - 1) // length  # never crosses a row
                segment = table.chunk_segment[c]
                assert table.segment_begin[segment] <= c < table.segment_end[segment]
            else:
                assert table.chunk_segment[c] == t
    # the Triton path's vectorised build (a fixed number of torch ops) gives the same table
    vectorised = chunk_table_tensors(numels, active, block, row_lengths)
    for name, values in vectorised.items():
        assert values.tolist() == getattr(table, name), name


def test_bytes_model_matches_design_minimums():
    """docs/design.md#bytes-model: AdaBelief 28, AdEMAMix 36, Adan 44 B/param in fp32; bf16 params with fp32 state
    save 6 B, and Adan 4 B more with its previous-gradient copy in bf16 (34 B)."""
    import torch

    from fusedoptim import LAMB, LARS, AdaBelief, AdamP, Adan, AdEMAMix, RaLars, TAdam

    p = [torch.zeros(1)]
    for cls, fp32_bytes, bf16_bytes in ((AdaBelief, 28, 22), (AdEMAMix, 36, 30), (Adan, 44, 34)):
        opt = cls(p)
        assert opt.bytes_per_param(opt.param_groups[0], torch.float32) == fp32_bytes
        assert opt.bytes_per_param(opt.param_groups[0], torch.bfloat16) == bf16_bytes
    amsgrad = AdaBelief(p, amsgrad=True)
    assert amsgrad.bytes_per_param(amsgrad.param_groups[0], torch.float32) == 36
    # two-pass rules: LARS 28 (with momentum), LAMB / RaLars / AdamP / TAdam 40 (docs/design.md#bytes-model)
    for opt, fp32_bytes in ((LARS(p, momentum=0.9), 28), (LAMB(p), 40), (RaLars(p), 40), (AdamP(p), 40),
                            (TAdam(p), 40)):
        assert opt.bytes_per_param(opt.param_groups[0], torch.float32) == fp32_bytes, type(opt).__name__
