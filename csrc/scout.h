// Scout's coherence, per element (optim/scout.py is the reference: the same operations in the same order, fp32, no
// contraction into FMAs; csrc/scout.cpp runs it over a bucket). One block of n <= kLanes consecutive elements: the
// slow weights, the ring's k - 1 snapshots ring[s * stride + j] and the params (the k-th, converted into `last`)
// give k updates U_s; each element's ratio std(U) / max |U - mean| (0 where the updates did not vary) goes into its
// double lane, and 1 into its count lane where they varied.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "multi_tensor.h"

namespace fusedoptim {

// One element's update rule, with its k + 1 history values h[0] = slow, ..., h[k] = params in registers.
template <int K>
inline void coherence_element(const float* h, float inv_period, float inv_period_minus_one, double& ratio_lane,
                              float& count_lane) {
  const float mean = (h[K] - h[0]) * inv_period;  // the updates' sum telescopes
  const float first = (h[1] - h[0]) - mean;
  float deviation = std::fabs(first), squares = first * first;
  for (int s = 1; s < K; ++s) {
    const float d = (h[s + 1] - h[s]) - mean;
    deviation = std::fabs(d) > deviation ? std::fabs(d) : deviation;
    squares = squares + d * d;
  }
  const bool varies = deviation > 0.0f;
  const float ratio = std::sqrt(squares * inv_period_minus_one) / (varies ? deviation : 1.0f);
  // selected in fp32, then widened: the same sum as selecting in fp64 (0.0f widens to 0.0), but GCC blended the
  // two fp64 halves of each vector (14 instructions per 8 elements, 7 once selected first)
  ratio_lane += static_cast<double>(varies ? ratio : 0.0f);
  count_lane += varies ? 1.0f : 0.0f;  // exact: at most kSumChunk / kLanes per lane
}

// A period known at compile time (2 .. 8): the loop runs over the elements with the k + 1 rows in registers.
// Measured in cache (k = 6, 1 thread, in turns in one process): 1.31 ns per element, against 1.47 for the generic
// loop below, which keeps its running statistics in memory between rows. Over ResNet-50's 25.6 M elements with 2
// threads the call takes 25-36 ms: it reads 28 B per element and writes none, and this VM reads 26-28 GB/s (seven
// fp32 streams merely added up take 26-30 ms; mixed read/write streams reach 34-43 GB/s), so the loop waits on its
// loads, not its arithmetic. Measured in one process, in turns (standalone copies of this loop, 11-15 rounds):
// software prefetch 1-32 blocks ahead 0.99-1.10x the time, a chunk-major ring (the k - 1 rows of a chunk
// contiguous) 1.06x, and the whole sync's coherence run chunk by chunk right after the base step's last pass over
// that chunk (the params read from cache: 24 B) 0.95-0.97x of the two passes apart; a hand-written AVX2 loop 1.00x.
template <int K, typename param_t>
FUSEDOPTIM_LOOP_ATTRIBUTES void coherence_fixed(const float* slow, const float* ring, const param_t* param,
                                                int64_t stride, int64_t n, float inv_period, float inv_period_minus_one,
                                                double* ratio_lanes, float* count_lanes) {
  for (int64_t i = 0; i < n; i += kLanes) {  // blocks of kLanes elements, each element into its lane
    const int64_t m = std::min(kLanes, n - i);
    const float* rows[K + 1];
    float last[kLanes];  // 16-bit params, the period's last snapshot, as fp32 (fp32 ones are read in place)
    if constexpr (std::is_same_v<param_t, float>) {
      rows[K] = param + i;
    } else {
      for (int64_t j = 0; j < m; ++j) last[j] = to_float(param[i + j]);
      rows[K] = last;
    }
    rows[0] = slow + i;
    for (int s = 1; s < K; ++s) rows[s] = ring + (s - 1) * stride + i;
#pragma GCC ivdep
    for (int64_t j = 0; j < m; ++j) {
      float h[K + 1];
      for (int s = 0; s <= K; ++s) h[s] = rows[s][j];
      coherence_element<K>(h, inv_period, inv_period_minus_one, ratio_lanes[j], count_lanes[j]);
    }
  }
}

// Any period: the same operations in the same order, row by row over the block. The rule is written twice on
// purpose: one coherence_element over a run-time period read through row pointers took 2.0-2.6 ns per element
// at k = 6 and 12-15 ns above 8 (in cache, 1 thread), against 1.3-1.5 and 1.5-1.8 for these two loops.
FUSEDOPTIM_LOOP_ATTRIBUTES inline void coherence_block_any(const float* slow, const float* ring, const float* last,
                                                           int64_t stride, int64_t period, int64_t n,
                                                           float inv_period, float inv_period_minus_one,
                                                           double* ratio_lanes, float* count_lanes) {
  float mean[kLanes], deviation[kLanes], squares[kLanes];
  const auto row = [&](int64_t s) { return s == period - 1 ? last : ring + s * stride; };
  const float* first = row(0);
  for (int64_t j = 0; j < n; ++j) {  // the loops run over j, vectorised
    mean[j] = (last[j] - slow[j]) * inv_period;  // the updates' sum telescopes
    const float d = (first[j] - slow[j]) - mean[j];
    deviation[j] = std::fabs(d);
    squares[j] = d * d;
  }
  for (int64_t s = 1; s < period; ++s) {
    const float* now = row(s);
    const float* before = row(s - 1);
    for (int64_t j = 0; j < n; ++j) {
      const float d = (now[j] - before[j]) - mean[j];
      deviation[j] = std::fabs(d) > deviation[j] ? std::fabs(d) : deviation[j];
      squares[j] = squares[j] + d * d;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const bool varies = deviation[j] > 0.0f;
    const float ratio = std::sqrt(squares[j] * inv_period_minus_one) / (varies ? deviation[j] : 1.0f);
    ratio_lanes[j] += static_cast<double>(varies ? ratio : 0.0f);
    count_lanes[j] += varies ? 1.0f : 0.0f;  // exact: at most kSumChunk / kLanes per lane
  }
}

// A chunk of n elements (blocks of kLanes into the lanes): through the fixed-period loop when there is one. One call
// per chunk, not per block: a call per 64 elements cost ResNet-50's sync 400 k dispatches.
template <typename param_t>
void coherence_chunk(const float* slow, const float* ring, const param_t* param, int64_t stride, int64_t period,
                     int64_t n, float inv_period, float inv_period_minus_one, double* ratio_lanes, float* count_lanes) {
  switch (period) {
#define FUSEDOPTIM_SCOUT_PERIOD(K)                                                                                  \
  case K:                                                                                                           \
    return coherence_fixed<K>(slow, ring, param, stride, n, inv_period, inv_period_minus_one, ratio_lanes,           \
                              count_lanes);
    FUSEDOPTIM_SCOUT_PERIOD(2) FUSEDOPTIM_SCOUT_PERIOD(3) FUSEDOPTIM_SCOUT_PERIOD(4) FUSEDOPTIM_SCOUT_PERIOD(5)
    FUSEDOPTIM_SCOUT_PERIOD(6) FUSEDOPTIM_SCOUT_PERIOD(7) FUSEDOPTIM_SCOUT_PERIOD(8)
#undef FUSEDOPTIM_SCOUT_PERIOD
    default:
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t m = std::min(kLanes, n - i);
        float last[kLanes];
        for (int64_t j = 0; j < m; ++j) last[j] = to_float(param[i + j]);
        coherence_block_any(slow + i, ring + i, last, stride, period, m, inv_period, inv_period_minus_one,
                            ratio_lanes, count_lanes);
      }
  }
}

}  // namespace fusedoptim
