"""The flat layout: aligned, non-overlapping segments; chunks cover every element exactly once."""

from __future__ import annotations

import pytest

from fusedoptim._layout import SEGMENT_ALIGN, chunk_table, padded_offsets

SIZES = [[1], [0, 5, 16, 17], [1, 7, 1023, 1025, 4097], list(range(40))]


@pytest.mark.parametrize("numels", SIZES)
def test_segments_are_aligned_and_disjoint(numels):
    offsets, total = padded_offsets(numels)
    assert all(o % SEGMENT_ALIGN == 0 for o in offsets)
    ends = [o + n for o, n in zip(offsets, numels, strict=True)]
    assert all(end <= nxt for end, nxt in zip(ends, offsets[1:] + [total], strict=True))
    assert total % SEGMENT_ALIGN == 0 and total < sum(numels) + SEGMENT_ALIGN * len(numels)


@pytest.mark.parametrize("block", [16, 1024, 4096])
@pytest.mark.parametrize("numels", SIZES)
def test_chunks_cover_each_element_once(numels, block):
    active = [t for t in range(len(numels)) if t % 3 != 1]
    chunk_tensor, chunk_start = chunk_table(numels, active, block)
    covered = {(t, i) for t, s in zip(chunk_tensor, chunk_start, strict=True)
               for i in range(s, min(s + block, numels[t]))}
    expected = {(t, i) for t in active for i in range(numels[t])}
    assert covered == expected
    assert len(chunk_tensor) == sum(-(-numels[t] // block) for t in active)
    assert all(s % block == 0 for s in chunk_start)


def test_bytes_model_matches_design_minimums():
    """DESIGN §5: AdaBelief 28, AdEMAMix 36, Adan 44 B/param in fp32; bf16 params with fp32 state save 6 B."""
    import torch

    from fusedoptim import AdaBelief, Adan, AdEMAMix

    p = [torch.zeros(1)]
    for cls, fp32_bytes in ((AdaBelief, 28), (AdEMAMix, 36), (Adan, 44)):
        opt = cls(p)
        assert opt.bytes_per_param(opt.param_groups[0], torch.float32) == fp32_bytes
        assert opt.bytes_per_param(opt.param_groups[0], torch.bfloat16) == fp32_bytes - 6
    amsgrad = AdaBelief(p, amsgrad=True)
    assert amsgrad.bytes_per_param(amsgrad.param_groups[0], torch.float32) == 36
