// RaLars rules (holocron: RAdam moments, Liu et al., 2019, with a LAMB trust ratio): kernels/ralars.py in C++.
// Reference: optim/ralars.py. The constructor takes (step, *hyper) and computes the per-tensor scalars once;
// prepare() is pass A (writes the moments, returns the sum terms), finalize() ralars_finalize (r_t and the trust
// ratio), apply() pass B (takes them).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "_math.h"
#include "finalize.h"

namespace fusedoptim {

template <bool force_adaptive_momentum>
struct ralars_update {
  static constexpr int num_hyper = 10, num_states = 2, num_sums = 3, num_factors = 2;
  float step, lr, beta1, beta2, eps, weight_decay, scale_lo, scale_hi, rectify_from_step, inv_correction1,
      inv_sqrt_correction2;

  ralars_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2, float eps,
                float weight_decay, float scale_lo, float scale_hi, float rectify_from_step)
      : step(step), lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay),
        scale_lo(scale_lo), scale_hi(scale_hi), rectify_from_step(rectify_from_step),
        inv_correction1(1.0f / bias_correction(log_beta1, step)),
        inv_sqrt_correction2(1.0f / std::sqrt(bias_correction(log_beta2, step))) {}

  // The update before rectification and decay: adaptive m̂/(√v̂ + ε) once ρ_t > 4 (or if forced), else m̂.
  float ralars_direction(float exp_avg, float exp_avg_sq) const {
    // m/c1 as m·(1/c1), √(v/c2) as √v·(1/√c2): one division per element, not three
    exp_avg = exp_avg * inv_correction1;
    const float adaptive = exp_avg / (std::sqrt(exp_avg_sq) * inv_sqrt_correction2 + eps);
    if (force_adaptive_momentum) return adaptive;
    return step >= rectify_from_step ? adaptive : exp_avg;  // a float compare: a select in the vector loop
  }

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    const float exp_avg = beta1 * state[0][i] + (1.0f - beta1) * grad;
    const float exp_avg_sq = beta2 * state[1][i] + (1.0f - beta2) * grad * grad;
    state[0][i] = exp_avg, state[1][i] = exp_avg_sq;
    const float direction = ralars_direction(exp_avg, exp_avg_sq);
    // ‖r·a + λθ‖² = r²‖a‖² + 2rλ a·θ + λ²‖θ‖²: finalize applies the rectification r_t in fp64
    return {param * param, direction * direction, direction * param};
  }

  // The rectification r_t (fp64, see ralars_finalize) and the trust ratio φ(‖θ‖)/‖r_t·a + λθ‖, 1 where φ(‖θ‖)
  // or the norm is 0 (ralars_finalize, in fp64 like it).
  void finalize(const TensorSums& t) const {
    const double t_ = step, b2 = beta2, wd = weight_decay;
    const double rho_inf = 2.0 / (1.0 - b2) - 1.0;
    const double beta2_t = std::pow(b2, t_);
    const double rho_t = rho_inf - 2.0 * t_ * beta2_t / (1.0 - beta2_t);
    const double rectification =
        t_ >= rectify_from_step
            ? std::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            : 1.0;
    const double param_sq = t.sums[0], direction_sq = t.sums[1], direction_param = t.sums[2];
    const double norm_sq = rectification * rectification * direction_sq +
                           2 * rectification * wd * direction_param + wd * wd * param_sq;
    const double update_norm = std::sqrt(norm_sq < 0 ? 0.0 : norm_sq);  // clamp(min=0): a NaN stays a NaN
    const double phi = std::min(std::max(std::sqrt(param_sq), static_cast<double>(scale_lo)),
                                static_cast<double>(scale_hi));
    t.factors[0] = static_cast<float>(rectification);
    t.factors[1] = static_cast<float>(phi == 0 || update_norm == 0 ? 1.0 : phi / update_norm);
  }

  float apply(float param, float grad, float* const* state, int64_t i, float rectification, float trust_ratio) const {
    const float direction = ralars_direction(state[0][i], state[1][i]);
    const float update = rectification * direction + weight_decay * param;
    return param - lr * trust_ratio * update;
  }
};

}  // namespace fusedoptim
