"""LARS (You et al., 2017, https://arxiv.org/abs/1708.03888): the paper's trust ratio, inside the momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import fp32
from ._rule import TwoPassRule
from ._validation import check_lr, check_non_negative, check_scale_clip


def lars_prepare(param, grad, state, step,
                 lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi,
                 use_momentum, nesterov):
    """Reference of pass A (kernels/lars.py): the terms of ‖θ‖² and ‖g‖²."""
    return state, (param * param, grad * grad)


def lars_finalize(sums, steps, segments, tensor_states,
                  lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi,
                  use_momentum, nesterov):
    """Per-tensor local LR η·φ(‖θ‖)/(‖g‖ + λ‖θ‖), 1 where ‖θ‖ or ‖g‖ is 0. Shared by both paths."""
    param_norm, grad_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
    phi = param_norm.clamp(scale_lo, scale_hi)
    trust_ratio = torch.where((param_norm == 0) | (grad_norm == 0), 1.0,
                              trust_coefficient * phi / (grad_norm + weight_decay * param_norm))
    return trust_ratio[:, None], ()


def lars_apply(param, grad, state, step, trust_ratio,
               lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi,
               use_momentum, nesterov):
    """Reference of pass B (kernels/lars.py)."""
    update = trust_ratio * (grad + weight_decay * param)  # the local LR scales what enters the momentum
    if use_momentum:
        momentum_buffer = torch.where(step == 1.0, update, momentum * state[0] + (1.0 - dampening) * update)
        if nesterov:
            update = update + momentum * momentum_buffer
        else:
            update = momentum_buffer
        state = (momentum_buffer,)
    return param - lr * update, state


class LARS(FusedOptimizer):
    r"""LARS: layer-wise adaptive rate scaling.

    From `Large Batch Training of Convolutional Networks <https://arxiv.org/abs/1708.03888>`_ (You et al.,
    2017), Algorithm 1, with torch's SGD momentum, dampening and Nesterov. For each tensor, at its step t:

    .. math::
        \gamma_t &= \eta \frac{\phi(\lVert\theta\rVert)}{\lVert g_t\rVert + \lambda\lVert\theta\rVert}
            \quad (1 \text{ if } \lVert\theta\rVert = 0 \text{ or } \lVert g_t\rVert = 0),
            \quad \phi(x) = \min(\max(x, c_{lo}), c_{hi}) \\
        d_t &= \gamma_t (g_t + \lambda\theta_{t-1}) \\
        b_t &\leftarrow \mu b_{t-1} + (1 - \tau) d_t \quad (b_1 = d_1) \\
        \theta_t &\leftarrow \theta_{t-1} - \text{lr}\cdot(d_t + \mu b_t \text{ if nesterov else } b_t)

    The trust ratio enters the momentum buffer (paper, timm); holocron applies it to the whole buffer instead
    and has no η and no clamp. Without momentum, :math:`\theta_t \leftarrow \theta_{t-1} - \text{lr}\cdot d_t`.
    A polynomial LR decay (the paper's) is an LR scheduler, not part of the step.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (default: 1e-3).
        momentum: μ (default: 0).
        dampening: τ (default: 0).
        weight_decay: λ (default: 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening = 0 (default: False).
        scale_clip: (c_lo, c_hi) clamp of the weight norm, None for (0, 10) (default: None).
        trust_coefficient: η (default: 1.0).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, and ``momentum_buffer`` when momentum ≠ 0. Factors: ``trust_ratio``.
    """

    rule = TwoPassRule(cpu="lars", optional_states=(("momentum_buffer", "momentum"),), num_sums=2,
                       finalize=lars_finalize, factor_names=("trust_ratio",), prepare_writes_state=False,
                       apply_writes_state=True, reference=(lars_prepare, lars_apply),
                       triton=None if kernels is None else (kernels.lars.lars_prepare, kernels.lars.lars_apply),
                       triton_finalize=None if kernels is None else (kernels.lars.lars_finalize,))

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, scale_clip: tuple[float, float] | None = None,
                 *, trust_coefficient: float = 1.0, maximize: bool = False, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_lr(lr)
        check_non_negative("momentum", momentum)
        check_non_negative("dampening", dampening)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("trust_coefficient", trust_coefficient)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), scale_clip=check_scale_clip(scale_clip),
                        trust_coefficient=trust_coefficient, maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        lo, hi = group["scale_clip"]
        return (fp32(group["lr"]), fp32(group["momentum"]), fp32(group["dampening"]), fp32(group["weight_decay"]),
                fp32(group["trust_coefficient"]), fp32(lo), fp32(hi))

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["momentum"] != 0, group["nesterov"])

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Pass A reads θ, g; pass B reads θ, g, b and writes θ, b: 28 B in fp32 (20 without momentum)."""
        p = torch.empty(0, dtype=param_dtype).element_size()
        return 2 * p + 3 * p + (8 if group["momentum"] != 0 else 0)
