// adamp: its flags -> the template arguments of its rule (adamp.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "adamp.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void adamp(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto nesterov, auto amsgrad) {
    run<adamp_update<decltype(nesterov)::value, decltype(amsgrad)::value>>(a);
  });
}

}  // namespace fusedoptim
