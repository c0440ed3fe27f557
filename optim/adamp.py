"""AdamP (Heo et al., ICLR 2021, https://arxiv.org/abs/2006.08217), the official algorithm (clovaai/AdamP)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ._backends import Backend
from ._base import FusedOptimizer
from ._kernels import kernels
from ._math import bias_correction, fp32, log_fp32
from ._rule import TwoPassRule
from ._validation import check_adam, check_non_negative


def _adamp_perturb(grad, exp_avg, second_moment, step, beta1, log_beta2, eps, nesterov):
    denom = torch.sqrt(second_moment) * (1.0 / torch.sqrt(bias_correction(log_beta2, step))) + eps  # 1 division, not 2
    if nesterov:
        return (beta1 * exp_avg + (1.0 - beta1) * grad) / denom
    return exp_avg / denom


def adamp_prepare(param, grad, state, step,
                  lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                  nesterov, amsgrad):
    """Reference of pass A (kernels/adamp.py)."""
    exp_avg = beta1 * state[0] + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    new_state = (exp_avg, exp_avg_sq)
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = torch.maximum(state[2], exp_avg_sq)
        new_state = new_state + (second_moment,)
    perturb = _adamp_perturb(grad, exp_avg, second_moment, step, beta1, log_beta2, eps, nesterov)
    return new_state, (param * grad, param * param, grad * grad, param * perturb)


def _cosine(sums, eps):
    dot, param_sq, grad_sq, param_perturb = sums.double().unbind(1)
    param_norm = param_sq.sqrt()
    return dot.abs() / (param_norm.clamp(min=eps) * grad_sq.sqrt().clamp(min=eps)), param_norm, param_perturb


def _failing_rows(row_cosine, segments, delta):
    threshold = delta / segments.fan_in.double().clamp(min=1).sqrt()
    failing = ~(row_cosine < threshold.index_select(0, segments.row_tensor))
    return torch.zeros(segments.numels.numel(), dtype=torch.float32, device=row_cosine.device).index_add_(
        0, segments.row_tensor, failing.float())


def adamp_failing_rows(sums, segments,
                       lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                       nesterov, amsgrad):
    """Per tensor, how many of its rows fail the channel test |cos(θ_c, g_c)| < δ/√fan_in (NaN fails): a count,
    so that shards holding different rows of a tensor add theirs up (``TwoPassRule.shard_terms``)."""
    return _failing_rows(_cosine(sums[segments.numels.numel():], eps)[0], segments, delta)


def adamp_finalize(sums, steps, segments, tensor_states,
                   lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                   nesterov, amsgrad, shard_terms=None):
    """Projection decision and coefficients. Shared by both paths.

    For params with ndim > 1: project channel-wise if max_c |cos(θ_c, g_c)| < δ/√fan_in, else layer-wise if
    |cos(θ, g)| < δ/√numel. Projecting removes θ's direction from the update: perturb −= c·θ with
    c = (θ·perturb)/(‖θ‖ + ε)² per row or per tensor; the weight decay is then scaled by wd_ratio.
    Returns per-segment factors (projection c, decay 1 − lr·λ·ratio): tensors first, then rows. ``shard_terms``:
    the rows failing the channel test, counted over every shard (sharded params); else counted here.
    """
    num_tensors = segments.numels.numel()
    cosine, param_norm, param_perturb = _cosine(sums, eps)
    coefficient = param_perturb / (param_norm + eps) ** 2
    row_tensor = segments.row_tensor
    has_rows = segments.fan_in > 0
    if shard_terms is None:
        shard_terms = _failing_rows(cosine[num_tensors:], segments, delta)
    channel = has_rows & (shard_terms == 0)  # max_c |cos| < δ/√fan_in: no row fails
    layer = has_rows & ~channel & (cosine[:num_tensors] < delta / segments.numels.double().sqrt())
    decay = 1.0 - lr * weight_decay * torch.where(channel | layer, wd_ratio, 1.0)
    # What each row needs of its tensor, in one gather: whether it projects channel-wise, the coefficient it takes
    # otherwise (its tensor's when layer-wise, else 0) and its decay; the factors are written in place. On
    # ResNet-50 (27,560 rows, 27,721 segments) each op over the rows costs 10-40 µs on CPU: four boolean-mask
    # gathers took 0.25 ms of a 1 ms finalize, and dropping the cats and the stack of the factors (4 ops over
    # all segments) took it from 0.80 to 0.65 ms. (The C++ step runs its C++ copy, csrc/adamp.h, instead.)
    of_row = torch.stack([channel.double(), torch.where(layer, coefficient[:num_tensors], 0.0), decay], 1)
    of_row = of_row.index_select(0, row_tensor)
    factors = torch.empty(sums.shape[0], 2, dtype=torch.float32, device=sums.device)
    factors[:num_tensors, 0] = 0.0
    factors[num_tensors:, 0] = torch.where(of_row[:, 0] > 0, coefficient[num_tensors:], of_row[:, 1])
    factors[:num_tensors, 1] = decay
    factors[num_tensors:, 1] = of_row[:, 2]
    return factors, ()


def adamp_apply(param, grad, state, step, projection, decay,
                lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                nesterov, amsgrad):
    """Reference of pass B (kernels/adamp.py); for params with rows it sees [rows, fan_in] views."""
    second_moment = state[2] if amsgrad else state[1]
    perturb = _adamp_perturb(grad, state[0], second_moment, step, beta1, log_beta2, eps, nesterov)
    perturb = perturb - projection * param
    param = param * decay - lr / bias_correction(log_beta1, step) * perturb
    return param, state


class AdamP(FusedOptimizer):
    r"""AdamP: Adam that keeps scale-invariant weights from growing.

    From `AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights
    <https://arxiv.org/abs/2006.08217>`_ (Heo et al., ICLR 2021), as in the official clovaai/AdamP code. For
    each tensor, at its step t, with Adam's moments and :math:`p_t = \hat m_t/(\sqrt{\hat v_t} + \epsilon)`
    (Nesterov: :math:`(\beta_1 m_t + (1-\beta_1) g_t)` in place of :math:`m_t`):

    .. math::
        \text{if ndim} > 1 \text{ and } \max_c |\cos(\theta_c, g_c)| < \delta/\sqrt{\text{fan\_in}}:
            \ p_t &\leftarrow p_t - \hat\theta_c (\hat\theta_c \cdot p_t) \text{ per output channel } c \\
        \text{else if ndim} > 1 \text{ and } |\cos(\theta, g)| < \delta/\sqrt{d}:
            \ p_t &\leftarrow p_t - \hat\theta (\hat\theta \cdot p_t) \\
        \theta_t &\leftarrow \theta_{t-1} (1 - \gamma\lambda r) - \gamma p_t

    with :math:`\hat\theta = \theta/(\lVert\theta\rVert + \epsilon)` and r = ``wd_ratio`` when projected,
    1 otherwise (decoupled weight decay). holocron's code differs: a signed cosine, the layer view only, all
    params, and L2 decay.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate γ (default: 1e-3).
        betas: (β1, β2) of the moments (default: (0.9, 0.999)).
        eps: ε (default: 1e-8).
        weight_decay: λ, decoupled (default: 0).
        amsgrad: use the maximum of past v in the denominator (default: False).
        delta: threshold δ of the cosine test (default: 0.1).
        wd_ratio: weight decay ratio r for projected params (default: 0.1).
        nesterov: Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.
        capturable: a step CUDA graphs can capture (docs/design.md#capturable-steps) (default: False).

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, and ``max_exp_avg_sq`` with ``amsgrad``. Factors per tensor
    and per row: ``projection`` (the coefficient of θ removed from the update), ``decay``.
    """

    rule = TwoPassRule(cpu="adamp", states=("exp_avg", "exp_avg_sq"), optional_states=(("max_exp_avg_sq", "amsgrad"),),
                       num_sums=4, finalize=adamp_finalize, factor_names=("projection", "decay"),
                       row_statistics=True, shard_terms=adamp_failing_rows, reference=(adamp_prepare, adamp_apply),
                       triton=None if kernels is None else (kernels.adamp.adamp_prepare, kernels.adamp.adamp_apply),
                       triton_finalize=None if kernels is None else (kernels.adamp.adamp_finalize,
                                                                     kernels.adamp.adamp_row_fails,
                                                                     kernels.adamp.adamp_row_factors))

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, delta: float = 0.1, *,
                 wd_ratio: float = 0.1, nesterov: bool = False, maximize: bool = False,
                 backend: Backend = "auto",
                 capturable: bool = False) -> None:
        check_adam(lr, betas, 2, eps, weight_decay)
        check_non_negative("delta", delta)
        check_non_negative("wd_ratio", wd_ratio)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        delta=delta, wd_ratio=wd_ratio, nesterov=bool(nesterov), maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, capturable=capturable)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2 = group["betas"]
        return (fp32(group["lr"]), fp32(beta1), fp32(beta2), log_fp32(beta1), log_fp32(beta2), fp32(group["eps"]),
                fp32(group["weight_decay"]), fp32(group["delta"]), fp32(group["wd_ratio"]))

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        return (group["nesterov"], group["amsgrad"])

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Pass A reads θ, g, m, v and writes m, v; pass B reads θ, m, v (and g with Nesterov) and writes θ:
        40 B in fp32, + 4 with Nesterov (fp32 grads), + 8 with amsgrad (pass B reads the max instead of v)."""
        p = torch.empty(0, dtype=param_dtype).element_size()
        return (2 * p + 16) + (2 * p + 8) + (p if group["nesterov"] else 0) + (8 if group["amsgrad"] else 0)
