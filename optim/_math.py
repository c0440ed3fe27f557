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


def fp32(x: float | torch.Tensor) -> float | torch.Tensor:
    """``x`` rounded to fp32, as a Python float: the value a kernel receives for a runtime fp32 scalar. A tensor
    hyperparameter (a 1-element tensor: betas) gives a 0-d fp32 tensor on its device, never read on the host.

    (struct, not torch.tensor: this runs for every scalar of every group on every step.)
    """
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(()).to(torch.float32)
    return _FP32.unpack(_FP32.pack(float(x)))[0]


def log_fp32(beta: float | torch.Tensor) -> float | torch.Tensor:
    """log of ``beta`` as the kernels see it (rounded to fp32 first), taken in fp64 then rounded (a tensor: on its
    device, -inf at 0 as for a float).

    Passing log(β) rather than letting the kernel take it keeps bias corrections accurate: fp32 log
    near 1 on a GPU (lg2.approx) has ~2e-7 absolute error, i.e. 2e-4 relative on log(0.999).
    """
    beta = fp32(beta)
    if isinstance(beta, torch.Tensor):
        return beta.double().log().float()
    return fp32(math.log(beta)) if beta > 0 else -math.inf
