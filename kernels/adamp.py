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


@triton.jit
def _adamp_cosine(sums, eps):
    """|cos(θ, g)|, ‖θ‖ and θ·perturb from the sums (fp64, as the torch finalize); scalars or blocks of rows."""
    dot, param_sq, grad_sq, param_perturb = (sums[0].to(tl.float64), sums[1].to(tl.float64),
                                             sums[2].to(tl.float64), sums[3].to(tl.float64))
    param_norm = tl.sqrt(param_sq)
    eps64 = eps.to(tl.float64)
    cosine = tl.abs(dot) / (tl.maximum(param_norm, eps64) * tl.maximum(tl.sqrt(grad_sq), eps64))
    return cosine, param_norm, param_perturb


@triton.jit
def adamp_row_fails(sums, fan_in,
                    lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                    nesterov: tl.constexpr, amsgrad: tl.constexpr):
    """1 when a row fails the channel test |cos(θ_c, g_c)| < δ/√fan_in (NaN fails), else 0: counted per tensor."""
    cosine = _adamp_cosine(sums, eps)[0]
    threshold = delta.to(tl.float64) / tl.sqrt(tl.maximum(fan_in.to(tl.float64), 1.0))
    return tl.where(cosine < threshold, 0, 1)


@triton.jit
def adamp_finalize(sums, step, numel, fan_in, failing_rows, tensor_states,
                   lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                   nesterov: tl.constexpr, amsgrad: tl.constexpr):
    """One tensor's projection decision (the segment sum's epilogue): channel-wise if no row fails, else
    layer-wise if |cos(θ, g)| < δ/√numel, for params with rows. Its factors (no projection of its own segment, the
    decay 1 − lr·λ·ratio) and what its rows need: (channel-wise, the layer-wise coefficient or 0, the decay)."""
    cosine, param_norm, param_perturb = _adamp_cosine(sums, eps)
    coefficient = param_perturb / ((param_norm + eps.to(tl.float64)) * (param_norm + eps.to(tl.float64)))
    has_rows = fan_in > 0
    channel = has_rows & (failing_rows == 0)
    layer = has_rows & (failing_rows != 0) & (cosine < delta.to(tl.float64) / tl.sqrt(numel.to(tl.float64)))
    ratio = tl.where(channel | layer, wd_ratio.to(tl.float64), 1.0)
    decay = 1.0 - lr.to(tl.float64) * weight_decay.to(tl.float64) * ratio
    return (tl.zeros_like(ratio), decay), (channel, tl.where(layer, coefficient, 0.0), decay), ()


@triton.jit
def adamp_row_factors(sums, row_terms,
                      lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, delta, wd_ratio,
                      nesterov: tl.constexpr, amsgrad: tl.constexpr):
    """A block of one tensor's rows: the row's own coefficient when its tensor projects channel-wise, else the
    tensor's (layer-wise, or 0), and the tensor's decay."""
    channel, layer_coefficient, decay = row_terms
    _, param_norm, param_perturb = _adamp_cosine(sums, eps)
    coefficient = param_perturb / ((param_norm + eps.to(tl.float64)) * (param_norm + eps.to(tl.float64)))
    return tl.where(channel, coefficient, layer_coefficient), tl.zeros_like(coefficient) + decay
