"""LARS rules (You et al., 2017, https://arxiv.org/abs/1708.03888, Alg. 1). Reference: optim/lars.py."""

import triton
import triton.language as tl


@triton.jit
def lars_prepare(param, grad, state, step,
                 lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi,
                 use_momentum: tl.constexpr, nesterov: tl.constexpr):
    return state, (param * param, grad * grad)


@triton.jit
def lars_apply(param, grad, state, step, trust_ratio,
               lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi,
               use_momentum: tl.constexpr, nesterov: tl.constexpr):
    update = trust_ratio * (grad + weight_decay * param)  # the local LR scales what enters the momentum
    if use_momentum:
        momentum_buffer = tl.where(step == 1.0, update, momentum * state[0] + (1.0 - dampening) * update)
        if nesterov:
            update = update + momentum * momentum_buffer
        else:
            update = momentum_buffer
        state = (momentum_buffer,)
    return param - lr * update, state


@triton.jit
def lars_finalize(sums, step, numel, fan_in, failing_rows, tensor_states,
                  lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi,
                  use_momentum: tl.constexpr, nesterov: tl.constexpr):
    """One tensor's local LR η·φ(‖θ‖)/(‖g‖ + λ‖θ‖), 1 where ‖θ‖ or ‖g‖ is 0 (the segment sum's epilogue)."""
    param_norm, grad_norm = tl.sqrt(sums[0]), tl.sqrt(sums[1])
    phi = tl.minimum(tl.maximum(param_norm, scale_lo), scale_hi)
    trust_ratio = tl.where((param_norm == 0) | (grad_norm == 0), 1.0,
                           trust_coefficient * phi / (grad_norm + weight_decay * param_norm))
    return (trust_ratio,), (), ()
