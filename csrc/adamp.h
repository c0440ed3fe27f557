// AdamP rules (Heo et al., 2021, https://arxiv.org/abs/2006.08217; official clovaai/AdamP): kernels/adamp.py in
// C++. Reference: optim/adamp.py. The constructor takes (step, *hyper) and computes the per-tensor scalars
// once; prepare() is pass A (writes the moments, returns the terms of the per-tensor and per-row sums), finalize()
// adamp_finalize (the projection decision), apply() pass B (takes the projection coefficient and the decay of the
// tensor, or of the row for params with ndim > 1).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "_math.h"
#include "finalize.h"

namespace fusedoptim {

template <bool nesterov, bool amsgrad>
struct adamp_update {
  static constexpr int num_hyper = 9, num_sums = 4, num_factors = 2;
  static constexpr bool row_statistics = true;  // params with ndim > 1 also sum per row (channel)
  static constexpr int num_states = amsgrad ? 3 : 2;
  float lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, bias_correction1, inv_sqrt_correction2;

  adamp_update(float step, float lr, float beta1, float beta2, double log_beta1, double log_beta2, float eps,
               float weight_decay, float delta, float wd_ratio)
      : lr(lr), beta1(beta1), beta2(beta2), eps(eps), weight_decay(weight_decay), delta(delta), wd_ratio(wd_ratio),
        bias_correction1(bias_correction(log_beta1, step)),
        inv_sqrt_correction2(1.0f / std::sqrt(bias_correction(log_beta2, step))) {}

  float adamp_perturb(float grad, float exp_avg, float second_moment) const {
    const float denom = std::sqrt(second_moment) * inv_sqrt_correction2 + eps;  // 1 division, not 2
    if (nesterov) return (beta1 * exp_avg + (1.0f - beta1) * grad) / denom;
    return exp_avg / denom;
  }

  std::array<float, num_sums> prepare(float param, float grad, float* const* state, int64_t i) const {
    const float exp_avg = beta1 * state[0][i] + (1.0f - beta1) * grad;
    const float exp_avg_sq = beta2 * state[1][i] + (1.0f - beta2) * grad * grad;
    float second_moment = exp_avg_sq;
    if (amsgrad) {
      second_moment = std::max(state[2][i], exp_avg_sq);
      state[2][i] = second_moment;
    }
    state[0][i] = exp_avg, state[1][i] = exp_avg_sq;
    const float perturb = adamp_perturb(grad, exp_avg, second_moment);
    // per tensor and per row (channel): θ·g, ‖θ‖², ‖g‖² for the cosines, θ·perturb for the projection
    return {param * grad, param * param, grad * grad, param * perturb};
  }

  // A segment's (tensor's or row's) |cos(θ, g)| and projection coefficient (θ·perturb)/(‖θ‖ + ε)², in fp64.
  double cosine(const float* sums) const {
    const double e = eps, param_norm = std::sqrt(static_cast<double>(sums[1]));
    return std::abs(static_cast<double>(sums[0])) /
           (std::max(param_norm, e) * std::max(std::sqrt(static_cast<double>(sums[2])), e));  // NaN stays NaN
  }
  double coefficient(const float* sums) const {
    const double e = eps, param_norm = std::sqrt(static_cast<double>(sums[1]));
    return sums[3] / ((param_norm + e) * (param_norm + e));
  }

  // The projection decision and the factors (projection c, decay 1 − lr·λ·ratio) of the tensor and its rows
  // (adamp_finalize, in fp64 like it): channel-wise if max_c |cos(θ_c, g_c)| < δ/√fan_in, else layer-wise if
  // |cos(θ, g)| < δ/√numel; only tensors with rows (ndim > 1) project.
  void finalize(const TensorSums& t) const {
    const double lr_wd = static_cast<double>(lr) * weight_decay;
    bool channel = false, layer = false;
    if (t.rows > 0) {
      double channel_max = 0;
      for (int64_t r = 0; r < t.rows; ++r) {  // amax, NaN-propagating like torch's scatter_reduce
        const double row_cosine = cosine(t.row_sums + r * num_sums);
        channel_max = r == 0 || row_cosine > channel_max || row_cosine != row_cosine ? row_cosine : channel_max;
        if (channel_max != channel_max) break;
      }
      channel = channel_max < delta / std::sqrt(std::max(fp32_count(t.row_length), 1.0));
      layer = !channel && cosine(t.sums) < delta / std::sqrt(fp32_count(t.numel));
    }
    const float decay = static_cast<float>(1.0 - lr_wd * (channel || layer ? static_cast<double>(wd_ratio) : 1.0));
    t.factors[0] = 0.0f, t.factors[1] = decay;
    const float layer_projection = layer ? static_cast<float>(coefficient(t.sums)) : 0.0f;
    for (int64_t r = 0; r < t.rows; ++r) {
      t.row_factors[r * num_factors] =
          channel ? static_cast<float>(coefficient(t.row_sums + r * num_sums)) : layer_projection;
      t.row_factors[r * num_factors + 1] = decay;
    }
  }

  float apply(float param, float grad, float* const* state, int64_t i, float projection, float decay) const {
    const float second_moment = amsgrad ? state[2][i] : state[1][i];
    float perturb = adamp_perturb(grad, state[0][i], second_moment);
    perturb = perturb - projection * param;  // the radial part, 0 when the projection does not fire
    return param * decay - lr / bias_correction1 * perturb;
  }
};

}  // namespace fusedoptim
