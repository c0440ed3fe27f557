// LARS rules (You et al., 2017, https://arxiv.org/abs/1708.03888, Alg. 1): kernels/lars.py in C++.
// Reference: fusedoptim/lars.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// prepare() is pass A (returns the sum terms), apply() pass B (takes the factors of finalize), line for line the
// Triton rules.
#pragma once

#include <array>
#include <cstdint>

namespace fusedoptim {

template <bool use_momentum, bool nesterov>
struct lars_update {
  static constexpr int num_hyper = 7, num_sums = 2, num_factors = 1;
  static constexpr int num_states = use_momentum ? 1 : 0;
  float step, lr, momentum, dampening, weight_decay;  // trust_coefficient and the clip: finalize's

  lars_update(float step, float lr, float momentum, float dampening, float weight_decay, float trust_coefficient,
              float scale_lo, float scale_hi)
      : step(step), lr(lr), momentum(momentum), dampening(dampening), weight_decay(weight_decay) {}

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    return {param * param, grad * grad};
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
