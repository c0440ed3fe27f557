"""AdEMAMix (Pagliardini et al., 2024, https://arxiv.org/abs/2409.03137), the official algorithm (apple/ml-ademamix)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import bias_correction, fp32, log_fp32, one_minus_exp
from ._rule import Rule
from ._validation import check_adam, check_non_negative, check_warmup


def ademamix_update(param, grad, state, step,
                    lr, beta1, beta2, log_beta1, log_beta2, log_beta3, alpha, eps, weight_decay,
                    alpha_warmup, beta3_warmup):
    """Reference rule, line for line the Triton rule in kernels/ademamix.py (fp32 tensors in and out)."""
    exp_avg, exp_avg_sq, exp_avg_slow = state[0], state[1], state[2]
    # Warm-ups (paper): α rises linearly from 0, β3 moves from β1 to β3 linearly in half-life.
    # A warm-up of 1 step is no warm-up: t/T >= 1 from the first step on.
    alpha_t = alpha * torch.clamp(step / alpha_warmup, max=1.0)
    a = step / beta3_warmup
    log_beta3_t = torch.where(a < 1.0, log_beta1 * log_beta3 / ((1.0 - a) * log_beta3 + a * log_beta1), log_beta3)
    one_minus_beta3_t = one_minus_exp(log_beta3_t)
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    exp_avg_slow = (1.0 - one_minus_beta3_t) * exp_avg_slow + one_minus_beta3_t * grad
    denom = torch.sqrt(exp_avg_sq) / torch.sqrt(bias_correction(log_beta2, step)) + eps
    update = (exp_avg / bias_correction(log_beta1, step) + alpha_t * exp_avg_slow) / denom
    param = param - lr * (update + weight_decay * param)
    return param, (exp_avg, exp_avg_sq, exp_avg_slow)


class AdEMAMix(FusedOptimizer):
    r"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA.

    From `The AdEMAMix Optimizer: Better, Faster, Older <https://arxiv.org/abs/2409.03137>`_
    (Pagliardini et al., 2024), as in the official apple/ml-ademamix code. For each tensor, at its step t:

    .. math::
        m^{(1)}_t &\leftarrow \beta_1 m^{(1)}_{t-1} + (1 - \beta_1) g_t \\
        m^{(2)}_t &\leftarrow \beta_3(t) m^{(2)}_{t-1} + (1 - \beta_3(t)) g_t \\
        \nu_t &\leftarrow \beta_2 \nu_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma \Big(
            \frac{m^{(1)}_t / (1 - \beta_1^t) + \alpha(t) m^{(2)}_t}{\sqrt{\nu_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda \theta_{t-1}\Big)

    :math:`m^{(2)}` is not bias-corrected. With ``alpha_warmup`` = T_α, :math:`\alpha(t) = \alpha\min(t/T_α, 1)`;
    with ``beta3_warmup`` = T, :math:`\beta_3(t)` moves from β1 to β3 linearly in half-life:
    :math:`\beta_3(t) = \exp\big(\ln\beta_1 \ln\beta_3 / ((1 - t/T)\ln\beta_3 + (t/T)\ln\beta_1)\big)` for t < T.
    Weight decay is decoupled (official code); holocron adds it to the gradient instead. With α = 0 this is
    AdamW.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: (β1, β2, β3) of the fast EMA, the second moment and the slow EMA (default: (0.9, 0.999, 0.9999)).
        alpha: weight α of the slow EMA (default: 5.0).
        eps: ε added to the denominator (default: 1e-8).
        weight_decay: λ, decoupled (default: 0).
        alpha_warmup: steps of the linear α warm-up, or None (default: None).
        beta3_warmup: steps of the β3 warm-up, or None (default: None). Needs β1 > 0.
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg`` (m1), ``exp_avg_sq`` (ν), ``exp_avg_slow`` (m2).
    """

    rule = Rule(cpu="ademamix", states=("exp_avg", "exp_avg_sq", "exp_avg_slow"), reference=(ademamix_update,),
                triton=None if kernels is None else (kernels.ademamix.ademamix_update,))

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, alpha_warmup: int | None = None, beta3_warmup: int | None = None,
                 maximize: bool = False, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 3, eps, weight_decay)
        check_non_negative("alpha", alpha)
        check_warmup("alpha_warmup", alpha_warmup)
        check_warmup("beta3_warmup", beta3_warmup)
        if beta3_warmup is not None and betas[0] == 0.0:
            raise ValueError("beta3_warmup starts β3 at β1, so it needs betas[0] > 0")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, eps=eps, weight_decay=weight_decay,
                        alpha_warmup=alpha_warmup, beta3_warmup=beta3_warmup, maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2, beta3 = group["betas"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), log_fp32(beta1), log_fp32(beta2), log_fp32(beta3),
                fp32(group["alpha"]), fp32(group["eps"]), fp32(group["weight_decay"]),
                float(group["alpha_warmup"] or 1), float(group["beta3_warmup"] or 1))
