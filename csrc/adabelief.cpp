// adabelief: its flags -> the template arguments of its rule (adabelief.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "adabelief.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void adabelief(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto amsgrad, auto decoupled_weight_decay) {
    run<adabelief_update<decltype(amsgrad)::value, decltype(decoupled_weight_decay)::value>>(a);
  });
}

}  // namespace fusedoptim
