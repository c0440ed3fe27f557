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
# costs ~1 ms per program plus ~0.15 µs per element, so it wants few large programs instead
# (1e6 elements: 1.08 s at 1024, 0.16 s at 16384).
BLOCK_COMPILED = 1024
NUM_WARPS = 4
BLOCK_INTERPRETED = 16384

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

