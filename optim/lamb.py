"""LAMB (You et al., 2019, https://arxiv.org/abs/1904.00962), the paper's algorithm (bias-corrected moments)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import bias_correction as correction  # `bias_correction` is LAMB's flag
from ._math import fp32, log_fp32
from ._rule import TwoPassRule
from ._validation import check_adam, check_scale_clip


def _lamb_direction(param, exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, weight_decay, bias_correction):
    # √(v/c2) as √v·(1/√c2), m/c1 as m·(1/c1): one division and one sqrt per element, not three and one
    denom = torch.sqrt(exp_avg_sq)
    if bias_correction:
        exp_avg = exp_avg * (1.0 / correction(log_beta1, step))
        denom = denom * (1.0 / torch.sqrt(correction(log_beta2, step)))
    return exp_avg / (denom + eps) + weight_decay * param


def lamb_prepare(param, grad, state, step,
                 lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi,
                 bias_correction):
    """Reference of pass A (kernels/lamb.py): moments, and the terms of ‖θ‖² and ‖u‖²."""
    exp_avg = beta1 * state[0] + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    update = _lamb_direction(param, exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, weight_decay,
                             bias_correction)
    return (exp_avg, exp_avg_sq), (param * param, update * update)


def lamb_finalize(sums, steps, segments, tensor_states,
                  lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi,
                  bias_correction):
    """Per-tensor trust ratio φ(‖θ‖)/‖u‖, 1 where φ(‖θ‖) or ‖u‖ is 0. Shared by both paths."""
    param_norm, update_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
    phi = param_norm.clamp(scale_lo, scale_hi)
    trust_ratio = torch.where((phi == 0) | (update_norm == 0), 1.0, phi / update_norm)
    return trust_ratio[:, None], ()


def lamb_apply(param, grad, state, step, trust_ratio,
               lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi,
               bias_correction):
    """Reference of pass B (kernels/lamb.py)."""
    update = _lamb_direction(param, state[0], state[1], step, log_beta1, log_beta2, eps, weight_decay,
                             bias_correction)
    return param - lr * trust_ratio * update, state


class LAMB(FusedOptimizer):
    r"""LAMB: layer-wise adaptive moments for large-batch training.

    From `Large Batch Optimization for Deep Learning: Training BERT in 76 minutes
    <https://arxiv.org/abs/1904.00962>`_ (You et al., ICLR 2020), Algorithm 2. For each tensor, at its step t:

    .. math::
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        u_t &= \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda \theta_{t-1} \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma \frac{\phi(\lVert\theta_{t-1}\rVert)}{\lVert u_t\rVert} u_t,
        \quad \phi(x) = \min(\max(x, c_{lo}), c_{hi})

    with the ratio taken as 1 when φ(‖θ‖) or ‖u‖ is 0. ``bias_correction=False`` drops the bias corrections,
    which reproduces holocron's code (its docs show them). The norms are per tensor, computed in a fused
    deterministic two-pass step; ``last_factors()`` gives each tensor's trust ratio of the last step.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: (β1, β2) of the moments (default: (0.9, 0.999)).
        eps: ε added to the denominator (default: 1e-8).
        weight_decay: λ, added to the update inside the trust ratio (default: 0).
        scale_clip: (c_lo, c_hi) clamp of the weight norm, None for (0, 10) (default: None).
        bias_correction: bias-correct the moments (default: True).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg``, ``exp_avg_sq``. Factors: ``trust_ratio``.
    """

    rule = TwoPassRule(cpu="lamb", states=("exp_avg", "exp_avg_sq"), num_sums=2, finalize=lamb_finalize,
                       factor_names=("trust_ratio",), reference=(lamb_prepare, lamb_apply),
                       triton=None if kernels is None else (kernels.lamb.lamb_prepare, kernels.lamb.lamb_apply),
                       triton_finalize=None if kernels is None else (kernels.lamb.lamb_finalize,))

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, scale_clip: tuple[float, float] | None = None, *,
                 bias_correction: bool = True, maximize: bool = False, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 2, eps, weight_decay)
        scale_clip = check_scale_clip(scale_clip)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, scale_clip=scale_clip,
                        bias_correction=bool(bias_correction), maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2 = group["betas"]
        lo, hi = group["scale_clip"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), log_fp32(beta1), log_fp32(beta2), fp32(group["eps"]),
                fp32(group["weight_decay"]), fp32(lo), fp32(hi))

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["bias_correction"],)

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Pass A reads θ, g, m, v and writes m, v; pass B reads θ, m, v and writes θ: 40 B in fp32."""
        p = torch.empty(0, dtype=param_dtype).element_size()
        return (2 * p + 4 * 4) + (p + 2 * 4 + p)
