"""RaLars rules (holocron: RAdam moments, Liu et al., 2019, with a LAMB trust ratio).

Reference: optim/ralars.py.
"""

import triton
import triton.language as tl

from ._math import bias_correction


@triton.jit
def _ralars_direction(exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, rectify_from_step,
                      force_adaptive_momentum: tl.constexpr):
    """The update before rectification and decay: adaptive m̂/(√v̂ + ε) once ρ_t > 4 (or if forced), else m̂."""
    # m/c1 as m·(1/c1), √(v/c2) as √v·(1/√c2): one division per element, not three
    exp_avg = exp_avg * (1.0 / bias_correction(log_beta1, step))
    adaptive = exp_avg / (tl.sqrt(exp_avg_sq) * (1.0 / tl.sqrt(bias_correction(log_beta2, step))) + eps)
    if force_adaptive_momentum:
        return adaptive
    return tl.where(step >= rectify_from_step, adaptive, exp_avg)


@triton.jit
def ralars_prepare(param, grad, state, step,
                   lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step,
                   force_adaptive_momentum: tl.constexpr):
    exp_avg = beta1 * state[0] + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * state[1] + (1.0 - beta2) * grad * grad
    direction = _ralars_direction(exp_avg, exp_avg_sq, step, log_beta1, log_beta2, eps, rectify_from_step,
                                  force_adaptive_momentum)
    # ‖r·a + λθ‖² = r²‖a‖² + 2rλ a·θ + λ²‖θ‖²: finalize applies the rectification r_t in fp64
    return (exp_avg, exp_avg_sq), (param * param, direction * direction, direction * param)


@triton.jit
def ralars_apply(param, grad, state, step, rectification, trust_ratio,
                 lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step,
                 force_adaptive_momentum: tl.constexpr):
    direction = _ralars_direction(state[0], state[1], step, log_beta1, log_beta2, eps, rectify_from_step,
                                  force_adaptive_momentum)
    update = rectification * direction + weight_decay * param
    return param - lr * trust_ratio * update, state


@triton.jit
def ralars_finalize(sums, step, numel, fan_in, failing_rows, tensor_states,
                    lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step,
                    force_adaptive_momentum: tl.constexpr):
    """One tensor's rectification r_t and trust ratio φ(‖θ‖)/‖r_t·a + λθ‖, in fp64 as the torch finalize (ρ_t
    loses 4 digits in fp32 at t = 5); β2^t as exp(t·log β2) in fp64 (the fp32 β2 made exact in fp64)."""
    t = step.to(tl.float64)
    b2 = beta2.to(tl.float64)
    wd = weight_decay.to(tl.float64)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    beta2_t = tl.exp(t * tl.log(b2))
    rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
    rect = tl.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
    rectification = tl.where(t >= rectify_from_step.to(tl.float64), rect, 1.0)
    param_sq, direction_sq, direction_param = (sums[0].to(tl.float64), sums[1].to(tl.float64),
                                               sums[2].to(tl.float64))
    update_norm = tl.sqrt(tl.maximum(rectification * rectification * direction_sq
                                     + 2.0 * rectification * wd * direction_param + wd * wd * param_sq, 0.0))
    phi = tl.minimum(tl.maximum(tl.sqrt(param_sq), scale_lo.to(tl.float64)), scale_hi.to(tl.float64))
    trust_ratio = tl.where((phi == 0) | (update_norm == 0), 1.0, phi / update_norm)
    return (rectification, trust_ratio), (), ()
