// What a two-pass rule's finalize sees of one tensor. Rule::finalize (csrc/<name>.h) is the C++ counterpart of
// <name>_finalize in optim/<name>.py, line for line (the same ops, in the same precision and order), run for
// each tensor between its pass A and its pass B (multi_tensor.h: step_two_pass).
#pragma once

#include <cstdint>

namespace fusedoptim {

struct TensorSums {
  const float* sums;            // [num_sums]: the tensor's fp32 sums, as the Python finalize sees them
  float* factors;               // [num_factors]: written
  int64_t numel;
  int64_t rows, row_length;     // AdamP's channel view of a tensor with ndim > 1; 0, 0 for the others
  const float* row_sums;        // [rows][num_sums]
  float* row_factors;           // [rows][num_factors]: written
  float* const* tensor_states;  // per-tensor scalar states (TAdam's W_t), entry `index` of each: read and written
  int64_t index;                // the tensor's position in its bucket
};

// The fp32 value of a segment's size, as fusedoptim's SegmentLayout holds it (numels, fan_in: fp32).
inline double fp32_count(int64_t n) { return static_cast<double>(static_cast<float>(n)); }

}  // namespace fusedoptim
