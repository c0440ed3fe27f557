// AdEMAMix rule (Pagliardini et al., 2024, https://arxiv.org/abs/2409.03137): kernels/ademamix.py in C++.
// Reference: optim/ademamix.py. The constructor takes (step, *hyper) and computes the per-tensor scalars
// (bias corrections and both warm-ups) once; operator() is the elementwise part, line for line the Triton rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "_math.h"

namespace fusedoptim {

struct ademamix_update {
  static constexpr int num_hyper = 11;
  static constexpr int num_states = 3;
  float lr, beta1, beta2, eps, weight_decay, alpha_t, one_minus_beta3_t, bias_correction1, bias_correction2;

  ademamix_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2,
                  double log_beta3, float alpha, float eps, float weight_decay, float alpha_warmup,
                  float beta3_warmup)
      : lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay),
        bias_correction1(bias_correction(log_beta1, step)), bias_correction2(bias_correction(log_beta2, step)) {
    // Warm-ups (paper): α rises linearly from 0, β3 moves from β1 to β3 linearly in half-life.
    // A warm-up of 1 step is no warm-up: t/T >= 1 from the first step on (and log β1 = -inf is never divided).
    alpha_t = alpha * std::min(step / alpha_warmup, 1.0f);
    const float a = step / beta3_warmup;
    const float log_beta3_t = a < 1.0f ? static_cast<float>(log_beta1 * log_beta3) /
                                             ((1.0f - a) * static_cast<float>(log_beta3) + a * static_cast<float>(log_beta1))
                                       : static_cast<float>(log_beta3);
    one_minus_beta3_t = one_minus_exp(log_beta3_t);
  }

  float operator()(float param, float grad, float* const* state, int64_t i) const {
    float exp_avg = state[0][i], exp_avg_sq = state[1][i], exp_avg_slow = state[2][i];
    exp_avg = beta1 * exp_avg + (1.0f - beta1) * grad;
    exp_avg_sq = beta2 * exp_avg_sq + (1.0f - beta2) * grad * grad;
    exp_avg_slow = (1.0f - one_minus_beta3_t) * exp_avg_slow + one_minus_beta3_t * grad;
    state[0][i] = exp_avg, state[1][i] = exp_avg_sq, state[2][i] = exp_avg_slow;
    const float denom = std::sqrt(exp_avg_sq) / std::sqrt(bias_correction2) + eps;
    const float update = (exp_avg / bias_correction1 + alpha_t * exp_avg_slow) / denom;
    return param - lr * (update + weight_decay * param);
  }
};

}  // namespace fusedoptim
