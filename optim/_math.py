"""Torch mirrors of ``kernels/_math.py``, used by the reference rules (exact, in fp64)."""

from __future__ import annotations

import math
import struct

import torch

_FP32 = struct.Struct("f")


def one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """1 - exp(x) in fp64, returned as fp32."""
    return (-torch.expm1(x.double())).float()


def bias_correction(log_beta: float, step: torch.Tensor) -> torch.Tensor:
    """1 - beta**step from log(beta) and the per-tensor step (a 0-d fp32 tensor)."""
    return one_minus_exp(step.double() * log_beta)


def fp32(x: float) -> float:
    """``x`` rounded to fp32, as a Python float: the value a kernel receives for a runtime fp32 scalar.

    (struct, not torch.tensor: this runs for every scalar of every group on every step.)
    """
    return _FP32.unpack(_FP32.pack(float(x)))[0]


def log_fp32(beta: float) -> float:
    """log of ``beta`` as the kernels see it (rounded to fp32 first), taken in fp64 then rounded.

    Passing log(β) rather than letting the kernel take it keeps bias corrections accurate: fp32 log
    near 1 on a GPU (lg2.approx) has ~2e-7 absolute error, i.e. 2e-4 relative on log(0.999).
    """
    beta = fp32(beta)
    return fp32(math.log(beta)) if beta > 0 else -math.inf
