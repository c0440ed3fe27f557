"""LAMB rules (You et al., 2019, https://arxiv.org/abs/1904.00962, Alg. 2). Reference: optim/lamb.py."""

import triton
import triton.language as tl

from ._math import bias_correction as correction  # `bias_correction` is LAMB's flag


@triton.jit
def _lamb_direction(param, exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, weight_decay,
                    bias_correction: tl.constexpr):
    # √(v/c2) as √v·(1/√c2), m/c1 as m·(1/c1): one division and one sqrt per element, not three and one
    denom = tl.sqrt(exp_avg_sq)
    if bias_correction:
        exp_avg = exp_avg * (1.0 / correction(log_beta1, step))
        denom = denom * (1.0 / tl.sqrt(correction(log_beta2, step)))
    return exp_avg / (denom + eps) + weight_decay * param


@triton.jit
def lamb_prepare(param, grad, state, step,
                 lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi,
                 bias_correction: tl.constexpr):
    exp_avg = beta1 * state[0] + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    update = _lamb_direction(param, exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, weight_decay,
                             bias_correction)
    return (exp_avg, exp_avg_sq), (param * param, update * update)


@triton.jit
def lamb_apply(param, grad, state, step, trust_ratio,
               lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi,
               bias_correction: tl.constexpr):
    # The update is recomputed from θ, m, v, not stored by pass A: the same 40 B/param in fp32 (storing u adds a
    # write to pass A and trades pass B's reads of m, v for one of u) without a 4 B/param buffer for it.
    update = _lamb_direction(param, state[0], state[1], step, log_beta1, log_beta2, eps, weight_decay,
                             bias_correction)
    return param - lr * trust_ratio * update, state


@triton.jit
def lamb_finalize(sums, step, numel, fan_in, failing_rows, tensor_states,
                  lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi,
                  bias_correction: tl.constexpr):
    """One tensor's trust ratio φ(‖θ‖)/‖u‖, 1 where φ(‖θ‖) or ‖u‖ is 0 (the segment sum's epilogue)."""
    param_norm, update_norm = tl.sqrt(sums[0]), tl.sqrt(sums[1])
    phi = tl.minimum(tl.maximum(param_norm, scale_lo), scale_hi)
    trust_ratio = tl.where((phi == 0) | (update_norm == 0), 1.0, phi / update_norm)
    return (trust_ratio,), (), ()
