// Scout's ring of snapshots and its coherence sums over one bucket, in one call (optim/scout.py: the reference).
// The first k - 1 steps of a period write the params into row `slot` of the ring (fp32 [k - 1, total], laid out like
// the state buffers); the sync step reads the ring and the params (its k-th snapshot, never stored) and sums, per
// tensor, the coherence of scout.h over chunks of kSumChunk elements that restart at every tensor: each chunk into
// its own double lanes, added pairwise, then the chunks of a tensor in order, so the sums do not depend on the
// thread count (bitwise).
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "multi_tensor.h"
#include "scout.h"

namespace fusedoptim {

namespace {

template <typename param_t>
FUSEDOPTIM_LOOP_ATTRIBUTES void store_snapshot(const param_t* param, float* row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] = to_float(param[i]);
}

// The same with streaming (non-temporal) stores, for a ring that outgrows the cache: a row is read back k - 1 steps
// later at the earliest, evicted by then, so a plain store's read of each line before writing it is 4 B per element
// for nothing. Measured in a standalone copy (25.6 M fp32 elements, 2 threads, 11 rounds in turns): 8.1 ms against
// 10.4 ms with plain stores. x86-64 only (SSE2, which every x86-64 CPU has); plain stores elsewhere.
template <typename param_t>
void stream_snapshot(const param_t* param, float* row, int64_t n) {
#if defined(__x86_64__)
  int64_t i = 0;  // segments start at multiples of 16 elements, so the head is empty unless the layout changes
  for (; i < n && (reinterpret_cast<uintptr_t>(row + i) & 15u) != 0; ++i) row[i] = to_float(param[i]);
  for (; i + 4 <= n; i += 4) {
    if constexpr (std::is_same_v<param_t, float>) {
      _mm_stream_ps(row + i, _mm_loadu_ps(param + i));
    } else {
      _mm_stream_ps(row + i, _mm_setr_ps(to_float(param[i]), to_float(param[i + 1]), to_float(param[i + 2]),
                                         to_float(param[i + 3])));
    }
  }
  for (; i < n; ++i) row[i] = to_float(param[i]);
  _mm_sfence();  // streaming stores are weakly ordered: drained before anyone reads the row
#else
  store_snapshot(param, row, n);
#endif
}

struct ScoutChunk {
  size_t k;        // tensor
  int64_t lo, hi;  // its elements [lo, hi)
};

template <typename param_t>
void snapshot_bucket(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, const float* slow,
                     float* ring, int64_t stride, int64_t period, int64_t slot, bool coherence, float inv_period,
                     float inv_period_minus_one, double* table, bool streaming) {
  std::vector<ScoutChunk> chunks;
  for (size_t k = 0; k < params.size(); ++k) {
    for (int64_t lo = 0; lo < params[k].numel(); lo += kSumChunk) {
      chunks.push_back({k, lo, std::min(lo + kSumChunk, params[k].numel())});
    }
  }
  std::vector<double> partials(2 * chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrain / kSumChunk, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const ScoutChunk& chunk = chunks[c];
      const int64_t at = offsets[chunk.k] + chunk.lo, n = chunk.hi - chunk.lo;
      const auto* param = static_cast<const param_t*>(params[chunk.k].const_data_ptr()) + chunk.lo;
      if (slot >= 0) {
        if (streaming) {
          stream_snapshot(param, ring + slot * stride + at, n);
        } else {
          store_snapshot(param, ring + slot * stride + at, n);
        }
      }
      if (!coherence) continue;
      double ratio_lanes[kLanes] = {};
      float count_lanes[kLanes] = {};
      coherence_chunk(slow + at, ring + at, param, stride, period, n, inv_period, inv_period_minus_one, ratio_lanes,
                      count_lanes);
      for (int64_t width = kLanes / 2; width > 0; width /= 2) {  // the lanes pairwise
        for (int64_t j = 0; j < width; ++j) {
          ratio_lanes[j] += ratio_lanes[j + width];
          count_lanes[j] += count_lanes[j + width];
        }
      }
      partials[2 * c] = ratio_lanes[0], partials[2 * c + 1] = static_cast<double>(count_lanes[0]);
    }
  });
  if (!coherence) return;
  for (size_t c = 0; c < chunks.size(); ++c) {  // each tensor's chunks, in order
    table[2 * chunks[c].k] += partials[2 * c];
    table[2 * chunks[c].k + 1] += partials[2 * c + 1];
  }
}

}  // namespace

std::optional<at::Tensor> scout_snapshot(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets,
                                         const at::Tensor& slow, const at::Tensor& ring, int64_t slot, bool coherence,
                                         double inv_period, double inv_period_minus_one,
                                         const std::optional<at::Tensor>& position, bool streaming) {
  // Everything is checked before the ring is written.
  TORCH_CHECK(offsets.size() == params.size(), "fusedoptim cpu: scout_snapshot needs one offset per param");
  TORCH_CHECK(ring.device().is_cpu() && ring.scalar_type() == at::kFloat && ring.is_contiguous() && ring.dim() == 2 &&
                  ring.size(0) >= 1,
              "fusedoptim cpu: Scout's ring must be a contiguous fp32 CPU tensor [k - 1 >= 1, total]");
  TORCH_CHECK(slow.device().is_cpu() && slow.scalar_type() == at::kFloat && slow.is_contiguous() && slow.dim() == 1 &&
                  slow.numel() == ring.size(1),
              "fusedoptim cpu: the slow weights must be a flat contiguous fp32 CPU tensor of the ring's row length");
  const int64_t period = ring.size(0) + 1, stride = ring.size(1);
  bool skip = false;
  if (position.has_value()) {
    // A wrapper counting its steps on the device (here: in host memory, read here): 0 .. k - 2 snapshots into that
    // row, k - 1 is the sync (the coherence sums), anything else (a step GradScaler skipped) does nothing. The sums
    // are returned at every position (zeros but at the sync), so that the caller's rate never reads the position.
    TORCH_CHECK(position->device().is_cpu() && position->scalar_type() == at::kLong && position->numel() == 1,
                "fusedoptim cpu: Scout's position must be an int64 CPU tensor of one element");
    const int64_t place = position->const_data_ptr<int64_t>()[0];
    skip = place < 0 || place >= period;
    coherence = place == period - 1;
    slot = skip || coherence ? -1 : place;
  }
  TORCH_CHECK(slot >= -1 && slot < ring.size(0), "fusedoptim cpu: snapshot slot ", slot, " outside the ring of ",
              ring.size(0), " rows");
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& p = params[k];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == params[0].scalar_type(),
                "fusedoptim cpu: Scout's params must be contiguous CPU tensors of one dtype");
    TORCH_CHECK(offsets[k] >= 0 && offsets[k] + p.numel() <= stride,
                "fusedoptim cpu: a snapshot segment lies outside the ring");
  }
  at::Tensor table = at::zeros({static_cast<int64_t>(params.size()), 2}, at::kDouble);
  if (!params.empty() && !skip) {
    const auto run = [&](auto p) {
      snapshot_bucket<decltype(p)>(params, offsets, slow.const_data_ptr<float>(), ring.data_ptr<float>(), stride,
                                   period, slot, coherence, static_cast<float>(inv_period),
                                   static_cast<float>(inv_period_minus_one), table.data_ptr<double>(), streaming);
    };
    switch (params[0].scalar_type()) {
      case at::kFloat: run(float{}); break;
      case at::kBFloat16: run(bf16_t{}); break;
      case at::kHalf: run(fp16_t{}); break;
      default: TORCH_CHECK(false, "fusedoptim cpu: Scout's params must be fp32, bf16 or fp16, got ",
                           params[0].scalar_type());
    }
  }
  if (!coherence && !position.has_value()) return std::nullopt;
  return table;
}

}  // namespace fusedoptim
