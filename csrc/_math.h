// Scalar helpers shared by the C++ rules: the mirror of kernels/_math.py and optim/_math.py.
#pragma once

#include <cmath>

namespace fusedoptim {

// 1 - exp(x) in double, returned as float: bit for bit what the reference computes ((-expm1(x.double())).float()).
// Plain 1 - exp(x) in fp32 is 1.3e-5 off for 1 - 0.999**1, more than the whole fp32 parity budget (1e-5).
inline float one_minus_exp(double x) { return static_cast<float>(-std::expm1(x)); }

// 1 - beta**step from log(beta) (taken on the host in fp64) and the tensor's step count.
inline float bias_correction(double log_beta, float step) { return one_minus_exp(static_cast<double>(step) * log_beta); }

}  // namespace fusedoptim
