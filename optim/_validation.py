"""Argument checks shared by every optimizer: each raises ValueError naming the bad argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

FP32_MAX = float(torch.finfo(torch.float32).max)


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a 1-element tensor, got a tensor of shape {tuple(lr.shape)}")
        if not lr.is_floating_point():  # the kernels read it as fp32 on the params' device
            raise ValueError(f"a tensor lr must be floating-point, got {lr.dtype}")
        lr = lr.item()  # once, at construction: a step never reads it on the host
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr} (must be finite and >= 0)")
    if lr > FP32_MAX:  # the kernels take it as fp32: it would be inf there
        raise ValueError(f"Invalid learning rate: {lr} overflows fp32 (the kernels' type; max {FP32_MAX:.4g})")


def check_betas(betas: Sequence[float | torch.Tensor], count: int, tensors: bool = True) -> None:
    """``count`` betas in [0, 1): numbers, or (``tensors``) 1-element floating-point tensors as torch's Adam takes
    them (the kernels read those on the device; their value is read here, once, never at a step)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"betas must be a tuple of {count} floats, got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if not tensors:
                raise ValueError(f"betas[{i}] must be a number, not a tensor: this optimizer derives host-side "
                                 "constants from its betas")
            if beta.numel() != 1 or not beta.is_floating_point():
                raise ValueError(f"Invalid beta parameter at index {i}: a tensor beta must be a 1-element "
                                 f"floating-point tensor, got {beta.dtype} of shape {tuple(beta.shape)}")
            beta = beta.item()  # once, at construction or when the group's betas are replaced
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")


def check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0)")


def check_adam(lr: Any, betas: Sequence[float | torch.Tensor], count: int, eps: Any, weight_decay: Any,
               tensor_betas: bool = True) -> None:
    """The arguments every Adam-family optimizer here takes: lr, ``count`` betas, eps and weight_decay."""
    check_lr(lr)
    check_betas(betas, count, tensor_betas)
    check_non_negative("epsilon", eps)
    check_non_negative("weight_decay", weight_decay)


def check_warmup(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be None or an int >= 1)")


def check_scale_clip(scale_clip: Any) -> tuple[float, float]:
    """(lo, hi) bounds of the weight-norm clamp of the trust ratio; None means (0, 10)."""
    if scale_clip is None:
        return (0.0, 10.0)
    if not isinstance(scale_clip, (tuple, list)) or len(scale_clip) != 2:
        raise ValueError(f"scale_clip must be None or a (lo, hi) pair, got {scale_clip!r}")
    lo, hi = scale_clip
    check_non_negative("scale_clip lower bound", lo)
    if not (isinstance(hi, (int, float)) and not isinstance(hi, bool) and hi == math.inf):  # inf: no clamp (timm's)
        check_non_negative("scale_clip upper bound", hi)
    if lo > hi:
        raise ValueError(f"Invalid scale_clip: lower bound {lo} > upper bound {hi}")
    return (float(lo), float(hi))
