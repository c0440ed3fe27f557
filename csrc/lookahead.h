// The rule of a standalone Lookahead sync (kernels/lookahead.py): the last pass's sync does the work
// (multi_tensor.h, apply_range with sync), this rule keeps the param as it is. Called with the params as grads
// (never read), like the Triton sync.
#pragma once

#include <cstdint>

namespace fusedoptim {

struct keep_update {
  static constexpr int num_hyper = 0, num_states = 0;
  static constexpr bool sync_only = true;  // multi_tensor.h: a call with a negative rate returns at once

  explicit keep_update(float step) {}

  float operator()(float param, float grad, float* const* state, int64_t i) const { return param; }
};

}  // namespace fusedoptim
