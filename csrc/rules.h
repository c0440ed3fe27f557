// The optimizers' entry points, one translation unit each (<name>.cpp; keep: lookahead.cpp): every rule is
// instantiated for 3 param dtypes x (sync or not) x its flag combinations x 3 ISA clones, and in one file the
// build took 2 min on 2 cores. fusedoptim_cpu.cpp binds them.
#pragma once

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

}  // namespace fusedoptim
