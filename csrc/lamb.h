// LAMB rules (You et al., 2019, https://arxiv.org/abs/1904.00962, Alg. 2): kernels/lamb.py in C++.
// Reference: optim/lamb.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// prepare() is pass A (writes the moments, returns the sum terms), finalize() lamb_finalize (the trust ratio),
// apply() pass B (takes the trust ratio).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "_math.h"
#include "finalize.h"

namespace fusedoptim {

template <bool bias_correction>
struct lamb_update {
  static constexpr int num_hyper = 9, num_states = 2, num_sums = 2, num_factors = 1;
  float lr, beta1, beta2, eps, weight_decay, scale_lo, scale_hi, inv_correction1, inv_sqrt_correction2;

  lamb_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2, float eps,
              float weight_decay, float scale_lo, float scale_hi)
      : lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay), scale_lo(scale_lo),
        scale_hi(scale_hi),
        inv_correction1(1.0f / fusedoptim::bias_correction(log_beta1, step)),
        inv_sqrt_correction2(1.0f / std::sqrt(fusedoptim::bias_correction(log_beta2, step))) {}

  float lamb_direction(float param, float exp_avg, float exp_avg_sq) const {
    // √(v/c2) as √v·(1/√c2), m/c1 as m·(1/c1): one division and one sqrt per element, not three and one
    float denom = std::sqrt(exp_avg_sq);
    if (bias_correction) {
      exp_avg = exp_avg * inv_correction1;
      denom = denom * inv_sqrt_correction2;
    }
    return exp_avg / (denom + eps) + weight_decay * param;
  }

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    const float exp_avg = beta1 * state[0][i] + (1.0f - beta1) * grad;
    const float exp_avg_sq = beta2 * state[1][i] + (1.0f - beta2) * grad * grad;
    state[0][i] = exp_avg, state[1][i] = exp_avg_sq;
    const float update = lamb_direction(param, exp_avg, exp_avg_sq);
    return {param * param, update * update};
  }

  // The trust ratio φ(‖θ‖)/‖u‖, 1 where φ(‖θ‖) or ‖u‖ is 0 (lamb_finalize, in fp32 like it).
  void finalize(const TensorSums& t) const {
    const float param_norm = std::sqrt(t.sums[0]), update_norm = std::sqrt(t.sums[1]);
    const float phi = std::min(std::max(param_norm, scale_lo), scale_hi);
    t.factors[0] = phi == 0.0f || update_norm == 0.0f ? 1.0f : phi / update_norm;
  }

  float apply(float param, float grad, float* const* state, int64_t i, float trust_ratio) const {
    // The update is recomputed from θ, m, v, not stored by pass A: the same 40 B/param in fp32 (storing u adds a
    // write to pass A and trades pass B's reads of m, v for one of u) without a 4 B/param buffer for it.
    const float update = lamb_direction(param, state[0][i], state[1][i]);
    return param - lr * trust_ratio * update;
  }
};

}  // namespace fusedoptim
