"""AdaBelief (Zhuang et al., 2020, https://arxiv.org/abs/2010.07468), the algorithm of the paper and docs."""

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


def adabelief_update(param, grad, state, step,
                     lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay,
                     amsgrad, decoupled_weight_decay):
    """Reference rule, line for line the Triton rule in kernels/adabelief.py (fp32 tensors in and out)."""
    exp_avg, exp_avg_sq = state[0], state[1]
    if decoupled_weight_decay:
        param = param * (1.0 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    residual = grad - exp_avg
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * residual * residual + eps
    new_state = (exp_avg, exp_avg_sq)
    belief = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = torch.maximum(state[2], exp_avg_sq)
        belief = max_exp_avg_sq
        new_state = new_state + (max_exp_avg_sq,)
    denom = torch.sqrt(belief) / torch.sqrt(bias_correction(log_beta2, step)) + eps
    param = param - lr / bias_correction(log_beta1, step) * exp_avg / denom
    return param, new_state


class AdaBelief(FusedOptimizer):
    r"""AdaBelief: Adam that adapts the step to the "belief" in the observed gradient.

    From `AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients
    <https://arxiv.org/abs/2010.07468>`_ (Zhuang et al., NeurIPS 2020). For each tensor, at its step t:

    .. math::
        g_t &\leftarrow \nabla_\theta f_t(\theta_{t-1}) + \lambda \theta_{t-1}
            \quad (\text{L2; or } \theta_{t-1} \leftarrow (1 - \gamma\lambda)\theta_{t-1}
            \text{ if decoupled\_weight\_decay}) \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        s_t &\leftarrow \beta_2 s_{t-1} + (1 - \beta_2) (g_t - m_t)^2 + \epsilon \\
        \theta_t &\leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{s_t / (1 - \beta_2^t)} + \epsilon}

    with :math:`s_t` replaced by :math:`\max(s_{\max}, s_t)` in the denominator when ``amsgrad``.
    ε is added inside :math:`s_t` as in the paper and official code (holocron's code omits it).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: coefficients (β1, β2) of the running averages (default: (0.9, 0.999)).
        eps: ε, added inside s and to the denominator (default: 1e-8).
        weight_decay: λ (default: 0).
        amsgrad: use the maximum of past s in the denominator (default: False).
        decoupled_weight_decay: decay the weights directly (AdamW-style) instead of L2 (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (s), and ``max_exp_avg_sq`` with ``amsgrad``.
    """

    rule = Rule(cpu="adabelief", states=("exp_avg", "exp_avg_sq"), optional_states=(("max_exp_avg_sq", "amsgrad"),),
                reference=(adabelief_update,),
                triton=None if kernels is None else (kernels.adabelief.adabelief_update,))

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 decoupled_weight_decay: bool = False, maximize: bool = False, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 2, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        decoupled_weight_decay=bool(decoupled_weight_decay), maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2 = group["betas"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), log_fp32(beta1), log_fp32(beta2),
                fp32(group["eps"]), fp32(group["weight_decay"]))

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["amsgrad"], group["decoupled_weight_decay"])
