// ademamix: its flags -> the template arguments of its rule (ademamix.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "ademamix.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void ademamix(const BucketArgs& a) {
  dispatch_flags<0>(a.flags, [&]() { run<ademamix_update>(a); });
}

}  // namespace fusedoptim
