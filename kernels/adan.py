"""Adan rule (Xie et al., 2022, https://arxiv.org/abs/2208.06677; official sail-sg/Adan).

Reference: optim/adan.py.
"""

import triton
import triton.language as tl

from ._math import bias_correction


@triton.jit
def adan_update(param, grad, state, step,
                lr, beta1, beta2, beta3, log_beta1, log_beta2, log_beta3, eps, weight_decay,
                no_prox: tl.constexpr, amsgrad: tl.constexpr):
    exp_avg, exp_avg_diff, exp_avg_sq, prev_grad = state[0], state[1], state[2], state[3]
    prev_grad = tl.where(step == 1.0, grad, prev_grad)  # the first step has no previous gradient: Δ₁ = 0
    grad_diff = grad - prev_grad
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_diff = beta2 * exp_avg_diff + (1.0 - beta2) * grad_diff
    nesterov_grad = grad + beta2 * grad_diff
    exp_avg_sq = beta3 * exp_avg_sq + (1.0 - beta3) * nesterov_grad * nesterov_grad
    new_state = (exp_avg, exp_avg_diff, exp_avg_sq, grad)
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = tl.maximum(state[4], exp_avg_sq)
        second_moment = max_exp_avg_sq
        new_state = new_state + (max_exp_avg_sq,)
    # Per-tensor scalars, so that each element pays one division, not four (the compiled bf16 kernel: 80 -> 64
    # registers at sm_90).
    exp_avg_scale = 1.0 / bias_correction(log_beta1, step)
    exp_avg_diff_scale = beta2 / bias_correction(log_beta2, step)
    exp_avg_sq_scale = 1.0 / tl.sqrt(bias_correction(log_beta3, step))
    denom = tl.sqrt(second_moment) * exp_avg_sq_scale + eps
    update = (exp_avg * exp_avg_scale + exp_avg_diff_scale * exp_avg_diff) / denom
    if no_prox:
        param = param * (1.0 - lr * weight_decay) - lr * update
    else:
        param = (param - lr * update) / (1.0 + lr * weight_decay)
    return param, new_state
