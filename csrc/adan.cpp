// adan: its flags -> the template arguments of its rule (adan.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "adan.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void adan(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto no_prox, auto amsgrad) {
    constexpr bool np = decltype(no_prox)::value, ams = decltype(amsgrad)::value;
    // prev_grad is kept in the param dtype: one rule per dtype
    if (a.params.empty()) return run<adan_update<np, ams, float>, float>(a);  // checks only
    dispatch_dtype(a, [&](auto p) { run<adan_update<np, ams, decltype(p)>, decltype(p)>(a); });
  });
}

}  // namespace fusedoptim
