"""Launcher: grid, block size per backend, alignment variant, device guard, launch counting."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._template import multi_tensor_step_kernel

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
) -> None:
    """One launch of the multi-tensor template over a bucket.

    ``tables`` is one int64 tensor laid out as [param_ptrs | grad_ptrs | state_offsets | numels |
    chunk_tensor | chunk_start] (T, T, T, T, C, C entries), built on the host and copied to the device
    in a single transfer.
    """
    t, c = num_tensors, num_chunks
    param_ptrs, grad_ptrs, state_offsets, numels = (tables[i * t:(i + 1) * t] for i in range(4))
    chunk_tensor, chunk_start = tables[4 * t:4 * t + c], tables[4 * t + c:4 * t + 2 * c]
    block = block_size()
    # Triton launches on the *current* CUDA device, which need not be the bucket's.
    guard = torch.cuda.device(steps.device) if steps.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        multi_tensor_step_kernel[(c,)](
            param_ptrs, grad_ptrs, state_offsets, numels, steps, chunk_tensor, chunk_start,
            tuple(states), tuple(hyper),
            RULE=rule, FLAGS=tuple(flags), PARAM_DTYPE=_TL_DTYPES[param_dtype], MAXIMIZE=maximize,
            ALIGNED=aligned, BLOCK=block, num_warps=NUM_WARPS,
        )
    LAUNCH_COUNTS["multi_tensor_step_kernel"] += 1

