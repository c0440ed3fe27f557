// TAdam rules (Ilboudo et al., 2020, https://arxiv.org/abs/2003.00179): kernels/tadam.py in C++.
// Reference: fusedoptim/tadam.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// prepare() is pass A (the terms of Σ(g − m)²/(v + ε), state untouched), apply() pass B (takes the weights of m).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "_math.h"

namespace fusedoptim {

template <bool amsgrad, bool l2>
struct tadam_update {
  static constexpr int num_hyper = 8, num_sums = 1, num_factors = 2;
  static constexpr int num_states = amsgrad ? 3 : 2;
  float lr, beta1, beta2, eps, weight_decay, bias_correction1, inv_sqrt_correction2;  // dof: finalize's

  tadam_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2, float eps,
               float weight_decay, float dof)
      : lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay),
        bias_correction1(bias_correction(log_beta1, step)),
        inv_sqrt_correction2(1.0f / std::sqrt(bias_correction(log_beta2, step))) {}

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    if (l2) grad = grad + weight_decay * param;  // a flag: without weight decay pass A never reads θ (40 B, not 44)
    const float residual = grad - state[0][i];   // m and v of the previous step
    return {residual * residual / (state[1][i] + eps)};
  }

  float apply(float param, float grad, float* const* state, int64_t i, float old_weight, float new_weight) const {
    if (l2) grad = grad + weight_decay * param;
    const float exp_avg = old_weight * state[0][i] + new_weight * grad;  // W/(W + w) m + w/(W + w) g
    const float exp_avg_sq = beta2 * state[1][i] + (1.0f - beta2) * grad * grad;
    float second_moment = exp_avg_sq;
    if (amsgrad) {
      const float max_exp_avg_sq = std::max(state[2][i], exp_avg_sq);
      second_moment = max_exp_avg_sq;
      state[2][i] = max_exp_avg_sq;
    }
    state[0][i] = exp_avg, state[1][i] = exp_avg_sq;
    const float denom = std::sqrt(second_moment) * inv_sqrt_correction2 + eps;  // 1 division, not 2
    return param - lr / bias_correction1 * exp_avg / denom;
  }
};

}  // namespace fusedoptim
