// keep: its flags -> the template arguments of its rule (lookahead.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "lookahead.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void keep(const BucketArgs& a) {
  dispatch_flags<0>(a.flags, [&]() { run<keep_update>(a); });
}

}  // namespace fusedoptim
