// lamb: its flags -> the template arguments of its rule (lamb.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "lamb.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void lamb(const BucketArgs& a) {
  dispatch_flags<1>(a.flags, [&](auto bias_correction) { run<lamb_update<decltype(bias_correction)::value>>(a); });
}

}  // namespace fusedoptim
