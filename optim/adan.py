"""Adan (Xie et al., 2022, https://arxiv.org/abs/2208.06677), the official algorithm (sail-sg/Adan)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import bias_correction, fp32, log_fp32
from ._rule import Rule
from ._validation import check_adam


def adan_update(param, grad, state, step,
                lr, beta1, beta2, beta3, log_beta1, log_beta2, log_beta3, eps, weight_decay,
                no_prox, amsgrad):
    """Reference rule, line for line the Triton rule in kernels/adan.py (fp32 tensors in and out)."""
    exp_avg, exp_avg_diff, exp_avg_sq, prev_grad = state[0], state[1], state[2], state[3]
    prev_grad = torch.where(step == 1.0, grad, prev_grad)  # the first step has no previous gradient: Δ₁ = 0
    grad_diff = grad - prev_grad
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_diff = beta2 * exp_avg_diff + (1.0 - beta2) * grad_diff
    nesterov_grad = grad + beta2 * grad_diff
    exp_avg_sq = beta3 * exp_avg_sq + (1.0 - beta3) * nesterov_grad * nesterov_grad
    new_state = (exp_avg, exp_avg_diff, exp_avg_sq, grad)
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = torch.maximum(state[4], exp_avg_sq)
        second_moment = max_exp_avg_sq
        new_state = new_state + (max_exp_avg_sq,)
    # Per-tensor scalars, so that each element pays one division, not four (the compiled bf16 kernel: 80 -> 64
    # registers at sm_90).
    exp_avg_scale = 1.0 / bias_correction(log_beta1, step)
    exp_avg_diff_scale = beta2 / bias_correction(log_beta2, step)
    exp_avg_sq_scale = 1.0 / torch.sqrt(bias_correction(log_beta3, step))
    denom = torch.sqrt(second_moment) * exp_avg_sq_scale + eps
    update = (exp_avg * exp_avg_scale + exp_avg_diff_scale * exp_avg_diff) / denom
    if no_prox:
        param = param * (1.0 - lr * weight_decay) - lr * update
    else:
        param = (param - lr * update) / (1.0 + lr * weight_decay)
    return param, new_state


class Adan(FusedOptimizer):
    r"""Adan: adaptive Nesterov momentum.

    From `Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models
    <https://arxiv.org/abs/2208.06677>`_ (Xie et al., 2022), as in the official sail-sg/Adan code (β here
    is 1 − β of the paper). For each tensor, at its step t, with :math:`g_0 := g_1` (so Δ₁ = 0):

    .. math::
        \Delta_t &= g_t - g_{t-1} \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) \Delta_t \\
        n_t &\leftarrow \beta_3 n_{t-1} + (1 - \beta_3) (g_t + \beta_2 \Delta_t)^2 \\
        u_t &= \Big(\frac{m_t}{1 - \beta_1^t} + \beta_2 \frac{v_t}{1 - \beta_2^t}\Big)
               \Big/ \Big(\sqrt{n_t / (1 - \beta_3^t)} + \epsilon\Big) \\
        \theta_t &\leftarrow (\theta_{t-1} - \gamma u_t) / (1 + \gamma\lambda)
            \quad (\text{no\_prox: } \theta_t \leftarrow (1 - \gamma\lambda)\theta_{t-1} - \gamma u_t)

    with :math:`n_t` replaced by :math:`\max(n_{\max}, n_t)` in the denominator when ``amsgrad``.
    Unlike holocron's code, the previous gradient is updated every step and there is no extra L2 term.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: (β1, β2, β3) of m, v and n (default: (0.98, 0.92, 0.99)).
        eps: ε added to the denominator (default: 1e-8).
        weight_decay: λ, applied as a proximal step (default: 0).
        amsgrad: use the maximum of past n in the denominator (default: False).
        no_prox: decay multiplicatively before the step instead of the proximal division (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg`` (m), ``exp_avg_diff`` (v), ``exp_avg_sq`` (n), ``prev_grad`` (in the param dtype:
    a copy of the gradient, which that dtype holds exactly), and ``max_exp_avg_sq`` with ``amsgrad``.
    """

    # the previous gradient is a copy of a gradient: its own dtype holds it exactly (bf16 params: 34 B/param, not 38)
    rule = Rule(cpu="adan", states=("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"),
                optional_states=(("max_exp_avg_sq", "amsgrad"),), param_dtype_states=("prev_grad",),
                reference=(adan_update,), triton=None if kernels is None else (kernels.adan.adan_update,))

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, no_prox: bool = False,
                 maximize: bool = False, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 3, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        no_prox=bool(no_prox), maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2, beta3 = group["betas"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), fp32(beta3), log_fp32(beta1), log_fp32(beta2),
                log_fp32(beta3), fp32(group["eps"]), fp32(group["weight_decay"]))

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["no_prox"], group["amsgrad"])
