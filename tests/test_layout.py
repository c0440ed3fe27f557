"""The flat layout: aligned, non-overlapping segments; chunks cover every element exactly once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from fusedoptim._layout import SEGMENT_ALIGN, chunk_table_tensors, padded_offsets


@dataclass
class ChunkTable:
    """Which elements each program works on, and how chunks group into segments for the per-tensor sums.

    Chunk c covers elements [chunk_start[c], chunk_end[c]) of tensor chunk_tensor[c]; pass B reads its
    per-tensor factors at row chunk_segment[c]. Segment s is the run of chunks segment_begin[s] ..
    segment_end[s] - 1: segments 0..T-1 are the tensors; rules with per-row statistics (AdamP's channel view)
    add one segment per row of each tensor that has rows, and their chunks never cross a row boundary.
    """

    chunk_tensor: list[int]
    chunk_start: list[int]
    chunk_end: list[int]
    chunk_segment: list[int]
    segment_begin: list[int]
    segment_end: list[int]


def chunk_table(numels: Sequence[int], tensors: Sequence[int], block: int,
                row_lengths: Sequence[int | None] | None = None) -> ChunkTable:
    """Chunks of at most ``block`` elements over the listed tensors, in order.

    ``row_lengths[t]`` (None: no rows) splits tensor t into rows of that length; chunks then restart at every
    row and each row is a segment of its own, after the T tensor segments.
    """
    num_tensors = len(numels)
    rows = [0 if row_lengths is None or row_lengths[t] is None else numels[t] // row_lengths[t]
            for t in range(num_tensors)]
    first_row = [0] * num_tensors
    for t in range(1, num_tensors):
        first_row[t] = first_row[t - 1] + rows[t - 1]
    num_segments = num_tensors + sum(rows)
    table = ChunkTable([], [], [], [], [0] * num_segments, [0] * num_segments)
    for t in tensors:
        table.segment_begin[t] = len(table.chunk_tensor)
        length = row_lengths[t] if rows[t] else max(numels[t], 1)
        for r in range(max(rows[t], 1)):
            segment = num_tensors + first_row[t] + r if rows[t] else t
            table.segment_begin[segment] = len(table.chunk_tensor)
            row_end = min((r + 1) * length, numels[t])
            for start in range(r * length, row_end, block):
                table.chunk_tensor.append(t)
                table.chunk_start.append(start)
                table.chunk_end.append(min(start + block, row_end))
                table.chunk_segment.append(segment)
            table.segment_end[segment] = len(table.chunk_tensor)
        table.segment_end[t] = len(table.chunk_tensor)
    return table


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
    # the segment sum's programs: every segment (with chunks or not) gets max(1, ceil(chunks / group)) consecutive
    # groups, which split its chunks in order
    from fusedoptim.kernels._launch import sum_groups

    for group in (1, 3, 1024):
        groups = sum_groups(vectorised["segment_begin"], vectorised["segment_end"], group)
        segment_of = groups["group_segment"].tolist()
        for s, (begin, end) in enumerate(zip(table.segment_begin, table.segment_end, strict=True)):
            mine = [g for g, owner in enumerate(segment_of) if owner == s]
            assert mine == list(range(groups["segment_group"][s], groups["segment_group"][s] + len(mine)))
            assert len(mine) == max(1, -(-(end - begin) // group))


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


@pytest.mark.parametrize(("shape", "stride", "rows_first", "expected"), [
    ((6, 3, 3, 3), (27, 1, 9, 3), False, (27, 1, 9, 3)),   # channels_last: its own strides
    ((6, 3, 3, 3), (27, 1, 9, 3), True, (27, 1, 9, 3)),    # dim 0 outermost: each row one range
    ((6, 1, 3, 3), (9, 1, 3, 1), True, (9, 9, 3, 1)),      # a channel dim of 1: contiguous, as torch says
    ((9, 7), (1, 9), False, (1, 9)),                       # transposed: dense, dim 0 innermost
    ((9, 7), (1, 9), True, (7, 1)),                        # ... whose rows are not ranges: contiguous
    ((5, 8), (12, 1), False, (8, 1)),                      # a slice of a wider matrix: gaps, contiguous
    ((4, 4), (2, 1), False, (4, 1)),                       # overlapping: contiguous
    ((3, 1, 4), (4, 99, 1), False, (4, 4, 1)),             # contiguous but for a size-1 dim
])
def test_segments_take_the_params_memory_order_when_dense(shape, stride, rows_first, expected):
    import torch

    from fusedoptim._layout import memory_strides, same_memory_order

    tensor = torch.empty(200).as_strided(shape, stride)
    assert memory_strides(tensor, rows_first) == expected
    # in place (addressed through its data pointer in its segment's order) exactly when dense in that order
    dense_in_order = expected == stride or tensor.is_contiguous() and expected == tuple(torch.empty(shape).stride())
    assert same_memory_order(tensor, expected) == dense_in_order


def test_state_of_a_channels_last_param_is_channels_last_and_loads_into_any_layout():
    """torch.optim keeps a channels_last param's states channels_last (zeros_like); so does the flat buffer, and a
    checkpoint loads into a contiguous param's optimizer (values, not strides, are the state)."""
    import torch

    from fusedoptim import LAMB

    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    opt = LAMB([weight], lr=1e-2)
    weight.grad = torch.randn_like(weight)
    opt.step()
    (bucket,) = opt.bucket_layout()
    assert bucket.in_place == [True]
    for name in ("exp_avg", "exp_avg_sq"):
        assert opt.state[weight][name].stride() == weight.stride()
    other = weight.detach().contiguous()
    opt2 = LAMB([other], lr=1e-2, backend="reference")
    opt2.load_state_dict(opt.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[other][name].is_contiguous()
        assert torch.equal(opt2.state[other][name], opt.state[weight][name])
