// tadam: its flags -> the template arguments of its rule (tadam.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "tadam.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void tadam(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto amsgrad, auto l2) {
    run<tadam_update<decltype(amsgrad)::value, decltype(l2)::value>>(a);
  });
}

}  // namespace fusedoptim
