// adan: its flags -> the template arguments of its rule (adan.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "adan.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void adan(const BucketArgs& a, Pass pass) {
  dispatch_flags<2>(a.flags, [&](auto no_prox, auto amsgrad) {
    run<adan_update<decltype(no_prox)::value, decltype(amsgrad)::value>>(a, pass);
  });
}

}  // namespace fusedoptim
