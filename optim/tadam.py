"""TAdam (Ilboudo et al., 2020, https://arxiv.org/abs/2003.00179): Adam with a Student-t weighted first moment."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import bias_correction, fp32, log_fp32
from ._rule import TwoPassRule
from ._validation import check_adam


def tadam_prepare(param, grad, state, step,
                  lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, dof,
                  amsgrad, l2):
    """Reference of pass A (kernels/tadam.py): the terms of Σ (g − m)²/(v + ε), with m, v of the last step."""
    if l2:
        grad = grad + weight_decay * param
    residual = grad - state[0]
    return state, (residual * residual / (state[1] + eps),)


def tadam_finalize(sums, steps, segments, tensor_states,
                   lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, dof,
                   amsgrad, l2):
    """Per-tensor weight w = (ν + d)/(ν + Σ(g−m)²/(v+ε)) and the mixing weights W/(W + w), w/(W + w) of the
    first moment; W_t ← W·(2β1 − 1)/β1 + w (W_0 = β1/(1 − β1)). ν = dof, or d = numel when dof is None
    (passed as 0); ν = inf gives w = 1, i.e. Adam. Shared by both paths."""
    (total_weight,) = tensor_states
    d = segments.numels.double()
    nu = d if dof == 0 else torch.full_like(d, dof)
    weight = torch.where(torch.isinf(nu), 1.0, (nu + d) / (nu + sums[:, 0].double()))
    total_weight = torch.where(steps == 1, beta1 / (1.0 - beta1), total_weight.double())
    factors = torch.stack([total_weight / (total_weight + weight), weight / (total_weight + weight)], 1)
    return factors.to(sums.dtype), ((total_weight * (2 * beta1 - 1) / beta1 + weight).to(sums.dtype),)


def tadam_apply(param, grad, state, step, old_weight, new_weight,
                lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, dof,
                amsgrad, l2):
    """Reference of pass B (kernels/tadam.py)."""
    if l2:
        grad = grad + weight_decay * param
    exp_avg = old_weight * state[0] + new_weight * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    new_state = (exp_avg, exp_avg_sq)
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = torch.maximum(state[2], exp_avg_sq)
        second_moment = max_exp_avg_sq
        new_state = new_state + (max_exp_avg_sq,)
    denom = torch.sqrt(second_moment) * (1.0 / torch.sqrt(bias_correction(log_beta2, step))) + eps  # 1 division, not 2
    param = param - lr / bias_correction(log_beta1, step) * exp_avg / denom
    return param, new_state


class TAdam(FusedOptimizer):
    r"""TAdam: Adam whose first moment is a robust, Student-t weighted average.

    From `TAdam: A Robust Stochastic Gradient Optimizer <https://arxiv.org/abs/2003.00179>`_ (Ilboudo et al.,
    2020), as in holocron and the official Mahoumaru/TAdam code. For each tensor of d elements, at step t:

    .. math::
        w_t &= \frac{\nu + d}{\nu + \sum_j (g_{t,j} - m_{t-1,j})^2 / (v_{t-1,j} + \epsilon)} \\
        m_t &\leftarrow \frac{W_{t-1}}{W_{t-1} + w_t} m_{t-1} + \frac{w_t}{W_{t-1} + w_t} g_t, \quad
        W_t \leftarrow \frac{2\beta_1 - 1}{\beta_1} W_{t-1} + w_t, \quad W_0 = \frac{\beta_1}{1 - \beta_1} \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        \theta_t &\leftarrow \theta_{t-1}
            - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\sqrt{v_t/(1 - \beta_2^t)} + \epsilon}

    with L2 weight decay (g ← g + λθ) and :math:`v_t` replaced by its running maximum when ``amsgrad``.
    ``dof=None`` takes ν = d; ``dof=math.inf`` is Adam. 0-d params work (holocron's crash on them is fixed).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: (β1, β2); β1 must be > 0 (default: (0.9, 0.999)).
        eps: ε (default: 1e-8).
        weight_decay: λ, L2 (default: 0).
        amsgrad: use the maximum of past v in the denominator (default: False).
        dof: degrees of freedom ν, None for the tensor's element count (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``W_t`` (a 0-d tensor), and ``max_exp_avg_sq`` with
    ``amsgrad``. Factors: ``old_weight`` W/(W + w), ``new_weight`` w/(W + w).
    """

    rule = TwoPassRule(cpu="tadam", states=("exp_avg", "exp_avg_sq"), optional_states=(("max_exp_avg_sq", "amsgrad"),),
                       num_sums=1, finalize=tadam_finalize, factor_names=("old_weight", "new_weight"),
                       tensor_states=("W_t",), prepare_writes_state=False, apply_writes_state=True,
                       reference=(tadam_prepare, tadam_apply),
                       triton=None if kernels is None else (kernels.tadam.tadam_prepare, kernels.tadam.tadam_apply),
                       triton_finalize=None if kernels is None else (kernels.tadam.tadam_finalize,))

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, dof: float | None = None, *,
                 maximize: bool = False, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 2, eps, weight_decay)
        if betas[0] == 0:
            raise ValueError("TAdam needs betas[0] > 0 (its weight W_t divides by β1)")
        if dof is not None and (isinstance(dof, bool) or not isinstance(dof, (int, float)) or not dof > 0):
            raise ValueError(f"Invalid dof: {dof!r} (must be None or a number > 0, math.inf allowed)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        dof=dof, maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2 = group["betas"]
        dof = group["dof"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), log_fp32(beta1), log_fp32(beta2), fp32(group["eps"]),
                fp32(group["weight_decay"]), 0.0 if dof is None else fp32(dof))  # 0: ν = numel

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["amsgrad"], group["weight_decay"] != 0)

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Pass A reads g, m, v (and θ with weight decay); pass B reads θ, g, m, v and writes θ, m, v:
        40 B in fp32 without weight decay, + 8 with amsgrad."""
        p = torch.empty(0, dtype=param_dtype).element_size()
        amsgrad = 8 if group["amsgrad"] else 0
        return (p + 8 + (p if group["weight_decay"] != 0 else 0)) + (3 * p + 16 + amsgrad)
