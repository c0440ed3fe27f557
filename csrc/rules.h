// The optimizers' entry points, one translation unit each (<name>.cpp; keep: lookahead.cpp): every rule is
// instantiated for 3 param dtypes x (sync or not) x its flag combinations x 3 ISA clones, and in one file the
// build took 2 min on 2 cores. fusedoptim_cpu.cpp binds them.
#pragma once

#include "multi_tensor.h"

namespace fusedoptim {

void adabelief(const BucketArgs& a, Pass pass);
void adan(const BucketArgs& a, Pass pass);
void ademamix(const BucketArgs& a, Pass pass);
void keep(const BucketArgs& a, Pass pass);
void lars(const BucketArgs& a, Pass pass);
void lamb(const BucketArgs& a, Pass pass);
void ralars(const BucketArgs& a, Pass pass);
void tadam(const BucketArgs& a, Pass pass);
void adamp(const BucketArgs& a, Pass pass);

}  // namespace fusedoptim
