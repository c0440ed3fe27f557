"""AdamP rules (Heo et al., 2021, https://arxiv.org/abs/2006.08217; official clovaai/AdamP).

Reference: optim/adamp.py.
"""

import triton
import triton.language as tl

from ._math import bias_correction


@triton.jit
def _adamp_perturb(grad, exp_avg, second_moment, step, beta1, log_beta2, eps, nesterov: tl.constexpr):
    denom = tl.sqrt(second_moment) * (1.0 / tl.sqrt(bias_correction(log_beta2, step))) + eps  # 1 division, not 2
    if nesterov:
        return (beta1 * exp_avg + (1.0 - beta1) * grad) / denom
    return exp_avg / denom


@triton.jit
def adamp_prepare(param, grad, state, step,
                  lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                  nesterov: tl.constexpr, amsgrad: tl.constexpr):
    exp_avg = beta1 * state[0] + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    new_state = (exp_avg, exp_avg_sq)
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = tl.maximum(state[2], exp_avg_sq)
        new_state = new_state + (second_moment,)
    perturb = _adamp_perturb(grad, exp_avg, second_moment, step, beta1, log_beta2, eps, nesterov)
    # per tensor and per row (channel): θ·g, ‖θ‖², ‖g‖² for the cosines, θ·perturb for the projection
    return new_state, (param * grad, param * param, grad * grad, param * perturb)


@triton.jit
def adamp_apply(param, grad, state, step, projection, decay,
                lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                nesterov: tl.constexpr, amsgrad: tl.constexpr):
    second_moment = state[1]
    if amsgrad:
        second_moment = state[2]
    perturb = _adamp_perturb(grad, state[0], second_moment, step, beta1, log_beta2, eps, nesterov)
    perturb = perturb - projection * param  # the radial part, 0 when the projection does not fire
    param = param * decay - lr / bias_correction(log_beta1, step) * perturb
    return param, state
