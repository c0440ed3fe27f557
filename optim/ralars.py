"""RaLars (holocron): RAdam's rectified moments (Liu et al., 2019, https://arxiv.org/abs/1908.03265) with a
LAMB/LARS trust ratio. There is no paper for the combination: the spec is holocron's algorithm."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import bias_correction, fp32, log_fp32
from ._rule import TwoPassRule
from ._validation import check_adam, check_scale_clip


def _ralars_direction(exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, rectify_from_step,
                      force_adaptive_momentum):
    """The update before rectification and decay: adaptive m̂/(√v̂ + ε) once ρ_t > 4 (or if forced), else m̂."""
    # m/c1 as m·(1/c1), √(v/c2) as √v·(1/√c2): one division per element, not three
    exp_avg = exp_avg * (1.0 / bias_correction(log_beta1, step))
    adaptive = exp_avg / (torch.sqrt(exp_avg_sq) * (1.0 / torch.sqrt(bias_correction(log_beta2, step))) + eps)
    if force_adaptive_momentum:
        return adaptive
    return torch.where(step >= rectify_from_step, adaptive, exp_avg)


def ralars_prepare(param, grad, state, step,
                   lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step,
                   force_adaptive_momentum):
    """Reference of pass A (kernels/ralars.py): moments, and the terms of ‖θ‖², ‖a‖², a·θ."""
    exp_avg = beta1 * state[0] + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    direction = _ralars_direction(exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, rectify_from_step,
                                  force_adaptive_momentum)
    return (exp_avg, exp_avg_sq), (param * param, direction * direction, direction * param)


def ralars_finalize(sums, steps, segments, tensor_states,
                    lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step,
                    force_adaptive_momentum):
    """Per-tensor rectification r_t (fp64: ρ_t is a difference of numbers near 2/(1-β2) that loses 4 digits in
    fp32 at t = 5) and trust ratio φ(‖θ‖)/‖r_t·a + λθ‖. Shared by both paths."""
    t = steps.double()
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**t
    rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
    rect = torch.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    rectification = torch.where(t >= rectify_from_step, rect, 1.0)
    param_sq, direction_sq, direction_param = sums.double().unbind(1)
    update_norm = (rectification**2 * direction_sq + 2 * rectification * weight_decay * direction_param
                   + weight_decay**2 * param_sq).clamp(min=0).sqrt()
    phi = param_sq.sqrt().clamp(scale_lo, scale_hi)
    trust_ratio = torch.where((phi == 0) | (update_norm == 0), 1.0, phi / update_norm)
    return torch.stack([rectification, trust_ratio], 1).to(sums.dtype), ()


def ralars_apply(param, grad, state, step, rectification, trust_ratio,
                 lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step,
                 force_adaptive_momentum):
    """Reference of pass B (kernels/ralars.py)."""
    direction = _ralars_direction(state[0], state[1], step, log_beta1, log_beta2, eps, rectify_from_step,
                                  force_adaptive_momentum)
    update = rectification * direction + weight_decay * param
    return param - lr * trust_ratio * update, state


@functools.lru_cache(maxsize=64)
def rectify_from_step(beta2: float) -> float:
    """The first step whose ρ_t exceeds 4 (RAdam's threshold as in the paper and holocron), inf if none."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    if rho_inf <= 4.0:
        return math.inf
    for t in range(1, 1_000_000):
        beta2_t = beta2**t
        if rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t) > 4.0:
            return float(t)
    return math.inf


class RaLars(FusedOptimizer):
    r"""RaLars: rectified Adam moments with a layer-wise trust ratio (holocron's algorithm).

    For each tensor, at its step t, with :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`:

    .. math::
        a_t &= \begin{cases} \hat m_t / (\sqrt{\hat v_t} + \epsilon) & \rho_t > 4 \text{ or force\_adaptive\_momentum}
               \\ \hat m_t & \text{otherwise} \end{cases} \\
        u_t &= r_t a_t + \lambda\theta_{t-1}, \quad
        r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
            \ (1 \text{ while } \rho_t \le 4) \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma \frac{\phi(\lVert\theta_{t-1}\rVert)}{\lVert u_t\rVert} u_t

    with bias-corrected :math:`\hat m, \hat v`, φ the clamp to ``scale_clip`` and the ratio 1 when φ or ‖u‖ is 0.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: (β1, β2) of the moments (default: (0.9, 0.999)).
        eps: ε added to the denominator (default: 1e-8).
        weight_decay: λ, added to the update inside the trust ratio (default: 0).
        force_adaptive_momentum: use the adaptive step before ρ_t > 4 too (default: False).
        scale_clip: (c_lo, c_hi) clamp of the weight norm, None for (0, 10) (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg``, ``exp_avg_sq``. Factors: ``rectification``, ``trust_ratio``.
    """

    rule = TwoPassRule(cpu="ralars", states=("exp_avg", "exp_avg_sq"), num_sums=3, finalize=ralars_finalize,
                       factor_names=("rectification", "trust_ratio"), reference=(ralars_prepare, ralars_apply),
                       triton=None if kernels is None else (kernels.ralars.ralars_prepare, kernels.ralars.ralars_apply),
                       triton_finalize=None if kernels is None else (kernels.ralars.ralars_finalize,))

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, force_adaptive_momentum: bool = False,
                 scale_clip: tuple[float, float] | None = None, *, maximize: bool = False,
                 backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 2, eps, weight_decay, tensor_betas=False)  # rectify_from_step: a host search
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        force_adaptive_momentum=bool(force_adaptive_momentum), scale_clip=check_scale_clip(scale_clip),
                        maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2 = group["betas"]
        lo, hi = group["scale_clip"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), log_fp32(beta1), log_fp32(beta2), fp32(group["eps"]),
                fp32(group["weight_decay"]), fp32(lo), fp32(hi), rectify_from_step(fp32(beta2)))

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["force_adaptive_momentum"],)

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """As LAMB: pass A reads θ, g, m, v, writes m, v; pass B reads θ, m, v, writes θ: 40 B in fp32."""
        p = torch.empty(0, dtype=param_dtype).element_size()
        return (2 * p + 4 * 4) + (p + 2 * 4 + p)
