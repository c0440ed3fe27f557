"""AdaBelief rule (Zhuang et al., 2020, https://arxiv.org/abs/2010.07468). Reference: optim/adabelief.py."""

import triton
import triton.language as tl

from ._math import bias_correction


@triton.jit
def adabelief_update(param, grad, state, step,
                     lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay,
                     amsgrad: tl.constexpr, decoupled_weight_decay: tl.constexpr):
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
        max_exp_avg_sq = tl.maximum(state[2], exp_avg_sq)
        belief = max_exp_avg_sq
        new_state = new_state + (max_exp_avg_sq,)
    denom = tl.sqrt(belief) / tl.sqrt(bias_correction(log_beta2, step)) + eps
    param = param - lr / bias_correction(log_beta1, step) * exp_avg / denom
    return param, new_state
