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


@triton.jit
def tadam_finalize(sums, step, numel, fan_in, failing_rows, tensor_states,
                   lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, dof,
                   amsgrad: tl.constexpr, l2: tl.constexpr):
    """One tensor's weight w = (ν + d)/(ν + Σ(g−m)²/(v+ε)), its mixing weights W/(W + w), w/(W + w), and
    W_t ← W·(2β1 − 1)/β1 + w (W_0 = β1/(1 − β1)), in fp64 as the torch finalize."""
    b1 = beta1.to(tl.float64)
    d = numel.to(tl.float64)
    nu = tl.where(dof == 0, d, dof.to(tl.float64))
    weight = tl.where(nu == float("inf"), 1.0, (nu + d) / (nu + sums[0].to(tl.float64)))
    total_weight = tl.where(step == 1, b1 / (1.0 - b1), tensor_states[0].to(tl.float64))
    return ((total_weight / (total_weight + weight), weight / (total_weight + weight)), (),
            (total_weight * (2.0 * b1 - 1.0) / b1 + weight,))
