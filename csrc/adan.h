// Adan rule (Xie et al., 2022, https://arxiv.org/abs/2208.06677; official sail-sg/Adan): kernels/adan.py in C++.
// Reference: optim/adan.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// operator() is the elementwise part on fp32 values, line for line the Triton rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "_math.h"
#include "multi_tensor.h"  // to_float / from_float of the param types (prev_grad)

namespace fusedoptim {

template <bool no_prox, bool amsgrad, typename prev_grad_t>
struct adan_update {
  static constexpr int num_hyper = 9;
  static constexpr int num_states = amsgrad ? 5 : 4;
  // prev_grad (state 3) is a copy of the gradient, kept in its dtype (prev_grad_t, the param's): exact, and
  // 34 B/param instead of 38 for bf16 params (Adan.param_dtype_states)
  static constexpr uint32_t param_dtype_states = 1u << 3;
  // the per-tensor scalars of the rule (kernels/adan.py): one division per element instead of four
  float step, lr, beta1, beta2, beta3, eps, weight_decay, exp_avg_scale, exp_avg_diff_scale, exp_avg_sq_scale;

  adan_update(float step, float lr, float beta1, float beta2, float beta3, double log_beta1, double log_beta2,
              double log_beta3, float eps, float weight_decay)
      : step(step), lr(lr), beta1(beta1), beta2(beta2), beta3(beta3), eps(eps),
        weight_decay(weight_decay), exp_avg_scale(1.0f / bias_correction(log_beta1, step)),
        exp_avg_diff_scale(beta2 / bias_correction(log_beta2, step)),
        exp_avg_sq_scale(1.0f / std::sqrt(bias_correction(log_beta3, step))) {}

  float operator()(float param, float grad, float* const* state, int64_t i) const {
    prev_grad_t* const prev_grads = reinterpret_cast<prev_grad_t*>(state[3]);
    float exp_avg = state[0][i], exp_avg_diff = state[1][i], exp_avg_sq = state[2][i];
    float prev_grad = to_float(prev_grads[i]);
    // The first step has no previous gradient: Δ₁ = 0. A float compare, as in the Triton rule: with a bool
    // member GCC branched on it inside the loop and left the loop scalar (4x slower).
    prev_grad = step == 1.0f ? grad : prev_grad;
    const float grad_diff = grad - prev_grad;
    exp_avg = beta1 * exp_avg + (1.0f - beta1) * grad;
    exp_avg_diff = beta2 * exp_avg_diff + (1.0f - beta2) * grad_diff;
    const float nesterov_grad = grad + beta2 * grad_diff;
    exp_avg_sq = beta3 * exp_avg_sq + (1.0f - beta3) * nesterov_grad * nesterov_grad;
    state[0][i] = exp_avg, state[1][i] = exp_avg_diff, state[2][i] = exp_avg_sq;
    from_float(prev_grads[i], grad);
    float second_moment = exp_avg_sq;
    if (amsgrad) {
      const float max_exp_avg_sq = std::max(state[4][i], exp_avg_sq);
      second_moment = max_exp_avg_sq;
      state[4][i] = max_exp_avg_sq;
    }
    const float denom = std::sqrt(second_moment) * exp_avg_sq_scale + eps;
    const float update = (exp_avg * exp_avg_scale + exp_avg_diff_scale * exp_avg_diff) / denom;
    if (no_prox) return param * (1.0f - lr * weight_decay) - lr * update;
    return (param - lr * update) / (1.0f + lr * weight_decay);
  }
};

}  // namespace fusedoptim
