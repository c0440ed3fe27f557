// TAdam rules (Ilboudo et al., 2020, https://arxiv.org/abs/2003.00179): kernels/tadam.py in C++.
// Reference: optim/tadam.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// prepare() is pass A (the terms of Σ(g − m)²/(v + ε), state untouched), finalize() tadam_finalize (the weights
// of m, and W_t), apply() pass B (takes the weights of m).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "_math.h"
#include "finalize.h"

namespace fusedoptim {

template <bool amsgrad, bool l2>
struct tadam_update {
  static constexpr int num_hyper = 8, num_sums = 1, num_factors = 2, num_tensor_states = 1;  // W_t
  static constexpr int num_states = amsgrad ? 3 : 2;
  float step, lr, beta1, beta2, eps, weight_decay, dof, bias_correction1, inv_sqrt_correction2;

  tadam_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2, float eps,
               float weight_decay, float dof)
      : step(step), lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay), dof(dof),
        bias_correction1(bias_correction(log_beta1, step)),
        inv_sqrt_correction2(1.0f / std::sqrt(bias_correction(log_beta2, step))) {}

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    if (l2) grad = grad + weight_decay * param;  // a flag: without weight decay pass A never reads θ (40 B, not 44)
    const float residual = grad - state[0][i];   // m and v of the previous step
    return {residual * residual / (state[1][i] + eps)};
  }

  // The weight w = (ν + d)/(ν + Σ(g−m)²/(v+ε)) and the mixing weights W/(W + w), w/(W + w); W_t ← W·(2β1 − 1)/β1
  // + w, W = β1/(1 − β1) at step 1 (tadam_finalize, in fp64 like it). ν = dof, or d when dof is 0 (None).
  void finalize(const TensorSums& t) const {
    const double d = fp32_count(t.numel), b1 = beta1;
    const double nu = dof == 0.0f ? d : static_cast<double>(dof);
    const double weight = std::isinf(nu) ? 1.0 : (nu + d) / (nu + static_cast<double>(t.sums[0]));
    float& state = t.tensor_states[0][t.index];
    const double total_weight = step == 1.0f ? b1 / (1.0 - b1) : static_cast<double>(state);
    t.factors[0] = static_cast<float>(total_weight / (total_weight + weight));
    t.factors[1] = static_cast<float>(weight / (total_weight + weight));
    state = static_cast<float>(total_weight * (2 * b1 - 1) / b1 + weight);
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
