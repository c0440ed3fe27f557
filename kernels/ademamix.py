"""AdEMAMix rule (Pagliardini et al., 2024, https://arxiv.org/abs/2409.03137). Reference: optim/ademamix.py."""

import triton
import triton.language as tl

from ._math import bias_correction, one_minus_exp


@triton.jit
def ademamix_update(param, grad, state, step,
                    lr, beta1, beta2, log_beta1, log_beta2, log_beta3, alpha, eps, weight_decay,
                    alpha_warmup, beta3_warmup):
    exp_avg, exp_avg_sq, exp_avg_slow = state[0], state[1], state[2]
    # Warm-ups (paper): α rises linearly from 0, β3 moves from β1 to β3 linearly in half-life.
    # A warm-up of 1 step is no warm-up: t/T >= 1 from the first step on.
    alpha_t = alpha * tl.minimum(step / alpha_warmup, 1.0)
    a = step / beta3_warmup
    log_beta3_t = tl.where(a < 1.0, log_beta1 * log_beta3 / ((1.0 - a) * log_beta3 + a * log_beta1), log_beta3)
    one_minus_beta3_t = one_minus_exp(log_beta3_t)
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    exp_avg_slow = (1.0 - one_minus_beta3_t) * exp_avg_slow + one_minus_beta3_t * grad
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction(log_beta2, step)) + eps
    update = (exp_avg / bias_correction(log_beta1, step) + alpha_t * exp_avg_slow) / denom
    param = param - lr * (update + weight_decay * param)
    return param, (exp_avg, exp_avg_sq, exp_avg_slow)
