// lars: its flags -> the template arguments of its rule (lars.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "lars.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void lars(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto use_momentum, auto nesterov) {
    run<lars_update<decltype(use_momentum)::value, decltype(nesterov)::value>>(a);
  });
}

}  // namespace fusedoptim
