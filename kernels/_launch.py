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
    sizes: tuple[int, int, int],
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
    slow: torch.Tensor | None = None,
    sync_rate: torch.Tensor | None = None,
) -> None:
    """One launch of the multi-tensor template over a bucket.

    ``tables`` is one int64 tensor packing the address tables and the chunk table (see ``split_tables``), built
    on the host and copied to the device in a single transfer; ``sizes`` = (tensors, segments, chunks). With
    ``partials`` ([C, K]) this is pass A of a rule with per-tensor statistics, with ``factors`` ([S, F]) pass B;
    with ``slow`` and ``sync_rate`` (fp32[1] on the device) it also performs Lookahead's sync.
    """
    (param_ptrs, grad_ptrs, state_offsets, _, _, chunk_tensor, chunk_start, chunk_end,
     chunk_segment) = split_tables(tables, *sizes)
    # Triton launches on the *current* CUDA device, which need not be the bucket's.
    guard = torch.cuda.device(steps.device) if steps.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        multi_tensor_step_kernel[(sizes[2],)](
            param_ptrs, grad_ptrs, state_offsets, steps, chunk_tensor, chunk_start, chunk_end, chunk_segment,
            tuple(states), tuple(hyper), steps if partials is None else partials, steps if factors is None else factors,
            steps if slow is None else slow, steps if sync_rate is None else sync_rate,
            RULE=rule, FLAGS=tuple(flags), PARAM_DTYPE=_TL_DTYPES[param_dtype], MAXIMIZE=maximize,
            ALIGNED=aligned, BLOCK=block_size(),
            NUM_SUMS=0 if partials is None else partials.shape[1],
            NUM_FACTORS=0 if factors is None else factors.shape[1],
            STORE_PARAM=store_param, STORE_STATE=store_state, SYNC=slow is not None, num_warps=NUM_WARPS,
        )
    LAUNCH_COUNTS["multi_tensor_step_kernel"] += 1


def launch_segment_sum(partials: torch.Tensor, tables: torch.Tensor, sizes: tuple[int, int, int],
                       sums: torch.Tensor) -> None:
    """sums[s, k] = the partials of segment s's chunks, added in a fixed order (one program per segment)."""
    segment_begin, segment_end = split_tables(tables, *sizes)[3:5]
    num_sums = partials.shape[1]
    guard = torch.cuda.device(sums.device) if sums.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        segment_sum_kernel[(sizes[1],)](
            partials, segment_begin, segment_end, sums, NUM_SUMS=num_sums,
            SUMS_POW2=triton.next_power_of_2(num_sums), CHUNKS=64 if INTERPRETED else 16, num_warps=1)
    LAUNCH_COUNTS["segment_sum_kernel"] += 1


def split_tables(tables: torch.Tensor, t: int, s: int, c: int) -> tuple[torch.Tensor, ...]:
    """Views of the packed table: param_ptrs, grad_ptrs, state_offsets (T each), segment_begin, segment_end
    (S each), chunk_tensor, chunk_start, chunk_end, chunk_segment (C each)."""
    sizes = [t, t, t, s, s, c, c, c, c]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return tuple(tables[a:b] for a, b in zip(bounds, bounds[1:], strict=False))
