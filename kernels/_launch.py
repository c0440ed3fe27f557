"""Launcher: grid, block size per backend, alignment variant, device guard, launch counting."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._template import multi_tensor_step_kernel, segment_sum_kernel

#: True when this process runs Triton kernels through the CPU interpreter (TRITON_INTERPRET=1 was set
#: before triton was imported). Decided once, at decoration time, by Triton itself.
INTERPRETED: bool = not isinstance(multi_tensor_step_kernel, triton.runtime.JITFunction)

# Elements per program. Compiled: 1024 elements per 4 warps keeps an Adam-like rule at 48 registers
# with 128-bit accesses (2048 → 64 regs, 4096 → 123 regs and 25% occupancy; sm_90). The interpreter
# pays ~10 ms of Python per program for this template and ~0.15 µs per element, so it wants larger
# blocks, but not so large that tiny tensors pay for a mostly masked block. Measured on the Adan parity
# test (6 steps): 200 tensors of <= 40 elements 13.8 / 16.5 / 21.1 s and 7 ragged tensors up to 4097
# elements 3.0 / 2.2 / 3.4 s at BLOCK 1024 / 4096 / 16384.
BLOCK_COMPILED = 1024
NUM_WARPS = 4
BLOCK_INTERPRETED = 4096

#: Kernel launches by kernel name; tests read it to check launches per step.
LAUNCH_COUNTS: Counter[str] = Counter()

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def block_size() -> int:
    return BLOCK_INTERPRETED if INTERPRETED else BLOCK_COMPILED


def device_ok(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    if INTERPRETED:
        return None if device.type == "cpu" else f"the Triton interpreter runs on CPU tensors, not {device}"
    if device.type != "cuda":
        return (f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
                "triton to run them on CPU through the interpreter")
    return None


def launch_step(
    rule: triton.JITFunction,
    flags: tuple,
    tables: torch.Tensor,
    num_tensors: int,
    num_chunks: int,
    steps: torch.Tensor,
    states: Sequence[torch.Tensor],
    hyper: tuple[float, ...],
    param_dtype: torch.dtype,
    maximize: bool,
    aligned: bool,
    *,
    partials: torch.Tensor | None = None,
    factors: torch.Tensor | None = None,
    store_param: bool = True,
    store_state: bool = True,
) -> None:
    """One launch of the multi-tensor template over a bucket.

    ``tables`` is one int64 tensor laid out as [param_ptrs | grad_ptrs | state_offsets | numels |
    first_chunk (T + 1) | chunk_tensor | chunk_start] (T, T, T, T, T + 1, C, C entries), built on the host
    and copied to the device in a single transfer. With ``partials`` ([C, K]) this is pass A of a reduction
    rule, with ``factors`` ([T, F]) pass B.
    """
    param_ptrs, grad_ptrs, state_offsets, numels, _, chunk_tensor, chunk_start = split_tables(
        tables, num_tensors, num_chunks)
    # Triton launches on the *current* CUDA device, which need not be the bucket's.
    guard = torch.cuda.device(steps.device) if steps.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        multi_tensor_step_kernel[(num_chunks,)](
            param_ptrs, grad_ptrs, state_offsets, numels, steps, chunk_tensor, chunk_start,
            tuple(states), tuple(hyper), steps if partials is None else partials, steps if factors is None else factors,
            RULE=rule, FLAGS=tuple(flags), PARAM_DTYPE=_TL_DTYPES[param_dtype], MAXIMIZE=maximize,
            ALIGNED=aligned, BLOCK=block_size(),
            NUM_SUMS=0 if partials is None else partials.shape[1],
            NUM_FACTORS=0 if factors is None else factors.shape[1],
            STORE_PARAM=store_param, STORE_STATE=store_state, num_warps=NUM_WARPS,
        )
    LAUNCH_COUNTS["multi_tensor_step_kernel"] += 1


def launch_segment_sum(partials: torch.Tensor, tables: torch.Tensor, num_tensors: int, num_chunks: int,
                       sums: torch.Tensor) -> None:
    """sums[t, k] = the partials of tensor t's chunks, added in a fixed order (one program per tensor)."""
    first_chunk = split_tables(tables, num_tensors, num_chunks)[4]
    num_sums = partials.shape[1]
    guard = torch.cuda.device(sums.device) if sums.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        segment_sum_kernel[(num_tensors,)](
            partials, first_chunk, sums, NUM_SUMS=num_sums, SUMS_POW2=triton.next_power_of_2(num_sums),
            CHUNKS=64 if INTERPRETED else 16, num_warps=1)
    LAUNCH_COUNTS["segment_sum_kernel"] += 1


def split_tables(tables: torch.Tensor, t: int, c: int) -> tuple[torch.Tensor, ...]:
    """The views of the packed table: param_ptrs, grad_ptrs, state_offsets, numels, first_chunk,
    chunk_tensor, chunk_start."""
    bounds = [0, t, 2 * t, 3 * t, 4 * t, 5 * t + 1, 5 * t + 1 + c, 5 * t + 1 + 2 * c]
    return tuple(tables[a:b] for a, b in zip(bounds, bounds[1:], strict=False))
