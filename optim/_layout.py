"""Flat multi-tensor layout: padded segment offsets and the chunk table, as plain host-side lists."""

from __future__ import annotations

from collections.abc import Sequence

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


def chunk_table(numels: Sequence[int], tensors: Sequence[int], block: int) -> tuple[list[int], list[int]]:
    """(chunk_tensor, chunk_start): one chunk per ``block`` elements of each listed tensor, in order."""
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    for t in tensors:
        for start in range(0, numels[t], block):
            chunk_tensor.append(t)
            chunk_start.append(start)
    return chunk_tensor, chunk_start
