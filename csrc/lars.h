// LARS rules (You et al., 2017, https://arxiv.org/abs/1708.03888, Alg. 1): kernels/lars.py in C++.
// Reference: optim/lars.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// prepare() is pass A (returns the sum terms), finalize() lars_finalize (the trust ratio from the sums), apply()
// pass B (takes the trust ratio), line for line the Triton rules and the Python finalize.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "finalize.h"

namespace fusedoptim {

template <bool use_momentum, bool nesterov>
struct lars_update {
  static constexpr int num_hyper = 7, num_sums = 2, num_factors = 1;
  static constexpr int num_states = use_momentum ? 1 : 0;
  float step, lr, momentum, dampening, weight_decay, trust_coefficient, scale_lo, scale_hi;

  lars_update(float step, float lr, float momentum, float dampening, float weight_decay, float trust_coefficient,
              float scale_lo, float scale_hi)
      : step(step), lr(lr), momentum(momentum), dampening(dampening), weight_decay(weight_decay),
        trust_coefficient(trust_coefficient), scale_lo(scale_lo), scale_hi(scale_hi) {}

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    return {param * param, grad * grad};
  }

  // The local LR η·φ(‖θ‖)/(‖g‖ + λ‖θ‖), 1 where ‖θ‖ or ‖g‖ is 0 (lars_finalize, in fp32 like it).
  void finalize(const TensorSums& t) const {
    const float param_norm = std::sqrt(t.sums[0]), grad_norm = std::sqrt(t.sums[1]);
    const float phi = std::min(std::max(param_norm, scale_lo), scale_hi);
    t.factors[0] = param_norm == 0.0f || grad_norm == 0.0f
                       ? 1.0f
                       : trust_coefficient * phi / (grad_norm + weight_decay * param_norm);
  }

  float apply(float param, float grad, float* const* state, int64_t i, float trust_ratio) const {
    float update = trust_ratio * (grad + weight_decay * param);  // the local LR scales what enters the momentum
    if (use_momentum) {
      // a float compare, not a bool member: GCC keeps a select on it inside the vector loop (see adan.h)
      const float momentum_buffer = step == 1.0f ? update : momentum * state[0][i] + (1.0f - dampening) * update;
      if (nesterov) {
        update = update + momentum * momentum_buffer;
      } else {
        update = momentum_buffer;
      }
      state[0][i] = momentum_buffer;
    }
    return param - lr * update;
  }
};

}  // namespace fusedoptim
