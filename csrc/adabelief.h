// AdaBelief rule (Zhuang et al., 2020, https://arxiv.org/abs/2010.07468): kernels/adabelief.py in C++.
// Reference: optim/adabelief.py. The constructor takes (step, *hyper) and computes the per-tensor scalars
// once; operator() is the elementwise part on fp32 values, line for line the Triton rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "_math.h"

namespace fusedoptim {

template <bool amsgrad, bool decoupled_weight_decay>
struct adabelief_update {
  static constexpr int num_hyper = 7;
  static constexpr int num_states = amsgrad ? 3 : 2;
  float lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2;

  adabelief_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2, float eps,
                   float weight_decay)
      : lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay),
        bias_correction1(bias_correction(log_beta1, step)), bias_correction2(bias_correction(log_beta2, step)) {}

  float operator()(float param, float grad, float* const* state, int64_t i) const {
    float exp_avg = state[0][i], exp_avg_sq = state[1][i];
    if (decoupled_weight_decay) param = param * (1.0f - lr * weight_decay);
    else grad = grad + weight_decay * param;
    exp_avg = beta1 * exp_avg + (1.0f - beta1) * grad;
    const float residual = grad - exp_avg;
    exp_avg_sq = beta2 * exp_avg_sq + (1.0f - beta2) * residual * residual + eps;
    state[0][i] = exp_avg, state[1][i] = exp_avg_sq;
    float belief = exp_avg_sq;
    if (amsgrad) {
      const float max_exp_avg_sq = std::max(state[2][i], exp_avg_sq);
      belief = max_exp_avg_sq;
      state[2][i] = max_exp_avg_sq;
    }
    const float denom = std::sqrt(belief) / std::sqrt(bias_correction2) + eps;
    return param - lr / bias_correction1 * exp_avg / denom;
  }
};

}  // namespace fusedoptim
