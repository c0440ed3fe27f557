"""Flat multi-tensor layout: padded segment offsets and the chunk table, as plain host-side lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Every tensor's segment in a flat state buffer starts at a multiple of this many elements (64 bytes
#: of fp32), so segment starts are 16-byte aligned and the compiled kernel keeps 128-bit accesses.
SEGMENT_ALIGN = 16


def padded_offsets(numels: Sequence[int], align: int = SEGMENT_ALIGN) -> tuple[list[int], int]:
    """Start of each segment in a flat buffer, each a multiple of ``align``, and the buffer's total length."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-n // align) * align
    return offsets, total


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
