"""TAdam rules (Ilboudo et al., 2020, https://arxiv.org/abs/2003.00179). Reference: optim/tadam.py."""

import triton
import triton.language as tl

from ._math import bias_correction


@triton.jit
def tadam_prepare(param, grad, state, step,
                  lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, dof,
                  amsgrad: tl.constexpr, l2: tl.constexpr):
    if l2:  # a flag, so that without weight decay pass A never reads θ (40 B/param instead of 44)
        grad = grad + weight_decay * param
    residual = grad - state[0]  # m and v of the previous step
    return state, (residual * residual / (state[1] + eps),)


@triton.jit
def tadam_apply(param, grad, state, step, old_weight, new_weight,
                lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, dof,
                amsgrad: tl.constexpr, l2: tl.constexpr):
    if l2:
        grad = grad + weight_decay * param
    exp_avg = old_weight * state[0] + new_weight * grad  # W/(W + w) m + w/(W + w) g
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    new_state = (exp_avg, exp_avg_sq)
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = tl.maximum(state[2], exp_avg_sq)
        second_moment = max_exp_avg_sq
        new_state = new_state + (max_exp_avg_sq,)
    denom = tl.sqrt(second_moment) * (1.0 / tl.sqrt(bias_correction(log_beta2, step))) + eps  # 1 division, not 2
    param = param - lr / bias_correction(log_beta1, step) * exp_avg / denom
    return param, new_state
