// The optimizers' entry points, one translation unit each (<name>.cpp; keep: lookahead.cpp): every rule is
// instantiated for 3 param dtypes x (sync or not) x its flag combinations x 3 ISA clones, and in one file the
// build took 2 min on 2 cores. fusedoptim_cpu.cpp binds them.
#pragma once

#include <optional>
#include <vector>

#include "multi_tensor.h"

namespace fusedoptim {

void adabelief(const BucketArgs& a);
void adan(const BucketArgs& a);
void ademamix(const BucketArgs& a);
void keep(const BucketArgs& a);
void lars(const BucketArgs& a);
void lamb(const BucketArgs& a);
void ralars(const BucketArgs& a);
void tadam(const BucketArgs& a);
void adamp(const BucketArgs& a);

// Scout (scout.cpp): writes the params into row `slot` of the ring (-1: none); with coherence, returns fp64
// [tensors, 2]: each tensor's sum of coherence ratios and count of entries that varied, the params being the
// period's last snapshot. With position (int64[1]) the step's place in its period decides both, and the sums are
// returned at every place. streaming: the row is written with streaming stores (a ring larger than the cache).
std::optional<at::Tensor> scout_snapshot(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets,
                                         const at::Tensor& slow, const at::Tensor& ring, int64_t slot, bool coherence,
                                         double inv_period, double inv_period_minus_one,
                                         const std::optional<at::Tensor>& position, bool streaming);

}  // namespace fusedoptim
