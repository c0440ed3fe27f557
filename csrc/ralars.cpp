// ralars: its flags -> the template arguments of its rule (ralars.h), then the pass. One translation unit
// per optimizer, so that ninja compiles them in parallel (see rules.h).
#include "ralars.h"
#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

void ralars(const BucketArgs& a) {
  dispatch_flags<1>(a.flags, [&](auto force) { run<ralars_update<decltype(force)::value>>(a); });
}

}  // namespace fusedoptim
