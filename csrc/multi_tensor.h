// The multi-tensor loop, written once (the C++ counterpart of kernels/_template.py): applies a rule to every
// element of every tensor of a bucket that has a gradient. Parametrised by the rule (csrc/<name>.h), which
// gives its per-tensor scalars (constructor: step, *hyper) and its elementwise update (operator()).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "finalize.h"

namespace fusedoptim {

// One bucket's step, as Python passes it: the tensors that have a gradient, in bucket order.
struct BucketArgs {
  std::vector<at::Tensor> params;  // updated in place: contiguous, fp32 / bf16 / fp16, one dtype
  std::vector<at::Tensor> grads;   // read only: contiguous, the param's dtype and numel
  std::vector<at::Tensor> states;  // the bucket's flat fp32 buffers, one per state name
  std::vector<int64_t> offsets;    // start of each tensor's segment in every state buffer
  at::Tensor steps;                // fp32[bucket size]: per-tensor step counts, already advanced
  std::vector<int64_t> index;      // position of each tensor in the bucket (its entry in `steps`)
  std::vector<double> hyper;       // the rule's runtime scalars, in its argument order
  std::vector<bool> flags;         // the rule's structural options (template arguments)
  bool maximize;
  float inv_grad_scale = 1.0f;  // GradScaler's inverse scale: grads are multiplied by it as they are read
  // Rules with per-tensor statistics (two passes; empty / undefined for the elementwise rules):
  std::vector<int64_t> row_lengths;  // per tensor: 0, or the length of the rows that have sums of their own (AdamP)
  std::vector<int64_t> first_row;    // per tensor with rows: the row of the tables that holds its first row
  at::Tensor sums;                   // fp32[segments, num_sums]: written, pass A's sums (as finalize saw them)
  at::Tensor factors;                // fp32[segments, num_factors]: written, finalize's factors (as pass B used them)
  std::vector<at::Tensor> tensor_states;  // fp32[bucket size] each: per-tensor scalar states finalize updates (TAdam)
  int64_t cache_group = 0;           // elements per cache group (see step_two_pass); 0: the whole bucket at once
  // kWholeStep: pass A, finalize, pass B. Sharded params (optim/_distributed.py) sum pass A's partial sums over
  // the ranks before the finalize, so they run kPassA (fills sums), then kPassB (reads the factors, in Python).
  int64_t phase = 0;
  // Lookahead's sync in the last pass (undefined, or a negative rate: no sync): slow <- slow + rate * (fast - slow);
  // fast <- slow.
  at::Tensor slow;                   // flat fp32, laid out like the state buffers
  at::Tensor sync_rate;              // fp32[1]
};

// Elements per thread task at least: a bucket below this runs on one thread, since waking the OpenMP team
// costs more than the update of a few thousand elements.
constexpr int64_t kGrain = 1 << 15;

// Everything that can fail is checked here, before any param or state is written. States are fp32 but for the
// ones in `param_dtype_states` (a bit per state), which are kept in the params' dtype (Adan's prev_grad).
inline void validate(const BucketArgs& a, int num_states, int num_hyper, uint32_t param_dtype_states = 0) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.grads.size() == n && a.offsets.size() == n && a.index.size() == n,
              "fusedoptim cpu: params, grads, offsets and index must have one entry per tensor");
  TORCH_CHECK(static_cast<int>(a.states.size()) == num_states, "fusedoptim cpu: expected ", num_states,
              " state buffers, got ", a.states.size());
  TORCH_CHECK(static_cast<int>(a.hyper.size()) == num_hyper, "fusedoptim cpu: expected ", num_hyper,
              " hyperparameters, got ", a.hyper.size());
  TORCH_CHECK(a.steps.device().is_cpu() && a.steps.scalar_type() == at::kFloat && a.steps.is_contiguous(),
              "fusedoptim cpu: steps must be a contiguous fp32 CPU tensor");
  for (size_t j = 0; j < a.states.size(); ++j) {
    const at::Tensor& s = a.states[j];
    const bool param_dtype = (param_dtype_states >> j) & 1u;
    const at::ScalarType expected = param_dtype && !a.params.empty() ? a.params[0].scalar_type() : at::kFloat;
    TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.dim() == 1 &&
                    (s.scalar_type() == expected || (param_dtype && a.params.empty())),
                "fusedoptim cpu: state buffer ", j, " must be a flat contiguous ", expected, " CPU tensor, got ",
                s.scalar_type());
  }
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor& p = a.params[k];
    const at::Tensor& g = a.grads[k];
    TORCH_CHECK(p.device().is_cpu() && g.device().is_cpu(), "fusedoptim cpu: params and grads must be on the CPU");
    TORCH_CHECK(p.scalar_type() == a.params[0].scalar_type(), "fusedoptim cpu: one dtype per bucket");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "fusedoptim cpu: grad dtype ", g.scalar_type(),
                " differs from its param's ", p.scalar_type());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "fusedoptim cpu: params and grads must be contiguous");
    TORCH_CHECK(g.numel() == p.numel(), "fusedoptim cpu: grad has ", g.numel(), " elements, its param ", p.numel());
    TORCH_CHECK(a.index[k] >= 0 && a.index[k] < a.steps.numel(), "fusedoptim cpu: tensor index out of range");
    for (const auto& s : a.states) {
      TORCH_CHECK(a.offsets[k] >= 0 && a.offsets[k] + p.numel() <= s.numel(),
                  "fusedoptim cpu: a state segment lies outside its flat buffer");
    }
    if (a.slow.defined()) {
      TORCH_CHECK(a.offsets[k] >= 0 && a.offsets[k] + p.numel() <= a.slow.numel(),
                  "fusedoptim cpu: a slow-weight segment lies outside its flat buffer");
    }
  }
  if (a.slow.defined()) {
    TORCH_CHECK(a.slow.device().is_cpu() && a.slow.scalar_type() == at::kFloat && a.slow.is_contiguous() &&
                    a.slow.dim() == 1,
                "fusedoptim cpu: the slow weights must be a flat contiguous fp32 CPU tensor");
    TORCH_CHECK(a.sync_rate.defined() && a.sync_rate.device().is_cpu() &&
                    a.sync_rate.scalar_type() == at::kFloat && a.sync_rate.numel() == 1,
                "fusedoptim cpu: a sync needs its rate as an fp32 CPU tensor of one element");
  }
}

// What a two-pass rule's step needs on top of validate(), checked before pass A writes anything.
inline void validate_two_pass(const BucketArgs& a, int num_sums, int num_factors, int num_tensor_states,
                              bool row_statistics) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.row_lengths.size() == n && a.first_row.size() == n,
              "fusedoptim cpu: row_lengths and first_row must have one entry per tensor");
  const auto check_table = [](const at::Tensor& t, int columns, const char* what) {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.dim() == 2 && t.size(1) == columns,
                "fusedoptim cpu: expected a contiguous fp32 CPU ", what, " table of ", columns, " columns");
  };
  check_table(a.sums, num_sums, "sums");
  check_table(a.factors, num_factors, "factors");
  const int64_t segments = a.sums.size(0);
  TORCH_CHECK(a.factors.size(0) == segments, "fusedoptim cpu: the sums and factors tables differ in rows");
  TORCH_CHECK(static_cast<int>(a.tensor_states.size()) == num_tensor_states, "fusedoptim cpu: expected ",
              num_tensor_states, " per-tensor states, got ", a.tensor_states.size());
  for (const at::Tensor& s : a.tensor_states) {
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                    s.numel() == a.steps.numel(),
                "fusedoptim cpu: a per-tensor state must be a contiguous fp32 CPU tensor with one entry per tensor");
  }
  TORCH_CHECK(a.cache_group >= 0, "fusedoptim cpu: cache_group must be >= 0");
  TORCH_CHECK(a.phase >= 0 && a.phase <= 2, "fusedoptim cpu: phase must be 0 (whole step), 1 (pass A) or 2 (pass B)");
  for (size_t k = 0; k < n; ++k) {
    TORCH_CHECK(a.index[k] < segments, "fusedoptim cpu: tensor index outside the sums/factors table");
    const int64_t row = a.row_lengths[k], numel = a.params[k].numel();
    if (row == 0) continue;
    TORCH_CHECK(row_statistics, "fusedoptim cpu: this rule has no per-row statistics, got rows of ", row, " elements");
    TORCH_CHECK(row > 0 && numel % row == 0, "fusedoptim cpu: rows of ", row, " elements do not tile a tensor of ",
                numel);
    TORCH_CHECK(a.first_row[k] >= 0 && a.first_row[k] + numel / row <= segments,
                "fusedoptim cpu: a tensor's rows lie outside the sums/factors table");
  }
}

// The rule of tensor k, built from its step and the runtime scalars: Rule(step, hyper[0], ..., hyper[H-1]).
template <typename Rule, size_t... I>
Rule make_rule(float step, const std::vector<double>& hyper, std::index_sequence<I...>) {
  return Rule(step, hyper[I]...);
}

// Param and grad elements as the loop sees them, with branch-free conversions (selects, no branches or calls)
// that GCC vectorises (the fp16 ones need -fno-trapping-math, see _cpu.py); c10's float -> bf16 branches on
// NaN and its fp16 conversions did not vectorise either, so no bf16 / fp16 loop vectorised with them. Same bits
// as c10 (checked, vectorised, on all 2^32 floats and 2^16 halves): exact upcasts, round to nearest even,
// overflow to inf; a NaN stays a NaN (its fp16 payload is dropped, as c10 does without F16C).
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return c10::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(fp16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16, exponent = x.bits & 0x7C00u,
                 magnitude = x.bits & 0x7FFFu;
  const float subnormal = c10::bit_cast<float>(0x3F000000u | magnitude) - 0.5f;  // exact: magnitude * 2^-24
  const uint32_t normal = (magnitude << 13) + 0x38000000u;                        // rebias 15 -> 127
  const uint32_t mantissa = x.bits & 0x3FFu;  // inf, or NaN: payload kept and quieted, as the hardware does
  const uint32_t special = 0x7F800000u | (mantissa << 13) | (mantissa != 0 ? 0x00400000u : 0u);
  uint32_t bits = exponent == 0 ? c10::bit_cast<uint32_t>(subnormal) : normal;
  bits = exponent == 0x7C00u ? special : bits;
  return c10::bit_cast<float>(sign | bits);
}

inline void from_float(float& out, float v) { out = v; }
inline void from_float(bf16_t& out, float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  out.bits = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
inline void from_float(fp16_t& out, float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v), a = u & 0x7FFFFFFFu, sign = (u >> 16) & 0x8000u;
  const uint32_t r = a - 0x38000000u;                                   // rebias 127 -> 15 (normal results)
  const uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;        // round to nearest even, may carry
  // below 2^-14: adding 0.5 (ulp 2^-24) rounds |v| to a multiple of 2^-24, the fp16 subnormal step
  const uint32_t subnormal = c10::bit_cast<uint32_t>(c10::bit_cast<float>(a) + 0.5f) - 0x3F000000u;
  uint32_t magnitude = a >= 0x38800000u ? normal : subnormal;
  magnitude = a >= 0x477FF000u ? 0x7C00u : magnitude;  // rounds to >= 65520: inf
  magnitude = a > 0x7F800000u ? 0x7E00u : magnitude;   // NaN
  out.bits = static_cast<uint16_t>(sign | magnitude);
}

// x86-64 builds default to SSE2 (4 floats per instruction); sqrt and the divisions of these rules run wider
// with AVX2 / AVX-512, so GCC compiles one clone of the loop per ISA and picks at load time: the cached library
// runs on any x86-64 CPU, where -march=native would bake in this machine's. Measured per ResNet-50 step,
// 1 thread: AdaBelief 41 -> 36 ms, Adan 68 -> 52 ms, AdEMAMix 49 -> 44 ms (SSE2 -> clones; -march=native the
// same as the clones).
#if defined(FUSEDOPTIM_LOOP_ATTRIBUTES)
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDOPTIM_LOOP_ATTRIBUTES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSEDOPTIM_LOOP_ATTRIBUTES
#endif

// The states a rule keeps in the param dtype (Rule::param_dtype_states, a bit per state; none by default). Such
// a rule is a template on the param type and reads and writes those states through it (adan.h).
template <typename Rule, typename = void>
struct param_dtype_states_of : std::integral_constant<uint32_t, 0> {};
template <typename Rule>
struct param_dtype_states_of<Rule, std::void_t<decltype(Rule::param_dtype_states)>>
    : std::integral_constant<uint32_t, Rule::param_dtype_states> {};

// A rule with per-row statistics (Rule::row_statistics: AdamP's channel view) takes tensors with rows; no other
// rule is compiled for them.
template <typename Rule, typename = void>
struct row_statistics_of : std::false_type {};
template <typename Rule>
struct row_statistics_of<Rule, std::void_t<decltype(Rule::row_statistics)>>
    : std::integral_constant<bool, Rule::row_statistics> {};

// The state pointers moved on by n elements of each state's own dtype.
template <typename Rule, typename param_t>
inline void advance(std::array<float*, Rule::num_states>& state, int64_t n) {
  for (int j = 0; j < Rule::num_states; ++j) {
    const int64_t size = ((param_dtype_states_of<Rule>::value >> j) & 1u) ? sizeof(param_t) : sizeof(float);
    state[j] = reinterpret_cast<float*>(reinterpret_cast<char*>(state[j]) + n * size);
  }
}

// A rule with per-tensor statistics has num_sums (pass A's terms) and num_factors (pass B's inputs); an
// elementwise rule has neither and one operator().
template <typename Rule, typename = void>
struct two_pass : std::false_type {
  static constexpr int num_factors = 0;
};
template <typename Rule>
struct two_pass<Rule, std::void_t<decltype(Rule::num_sums)>> : std::true_type {
  static constexpr int num_factors = Rule::num_factors;
};
// The per-tensor scalar states a two-pass rule's finalize updates (Rule::num_tensor_states: TAdam's W_t; none by
// default).
template <typename Rule, typename = void>
struct num_tensor_states_of : std::integral_constant<int, 0> {};
template <typename Rule>
struct num_tensor_states_of<Rule, std::void_t<decltype(Rule::num_tensor_states)>>
    : std::integral_constant<int, Rule::num_tensor_states> {};

// A rule that only carries Lookahead's sync (lookahead.h: keep_update, Rule::sync_only): without a sync it does
// nothing.
template <typename Rule, typename = void>
struct sync_only_of : std::false_type {};
template <typename Rule>
struct sync_only_of<Rule, std::void_t<decltype(Rule::sync_only)>> : std::integral_constant<bool, Rule::sync_only> {};

template <typename Rule>
using factors_t = std::array<float, two_pass<Rule>::num_factors>;

// The last pass's update of one element: the elementwise rule, or pass B's apply(..., *factors).
template <typename Rule, size_t... F>
inline float update(const Rule& rule, float param, float grad, float* const* state, int64_t i,
                    const factors_t<Rule>& factors, std::index_sequence<F...>) {
  if constexpr (two_pass<Rule>::value) {
    return rule.apply(param, grad, state, i, factors[F]...);
  } else {
    return rule(param, grad, state, i);
  }
}

// Lookahead's interpolation slow + rate·(fast − slow) in torch.lerp's two forms: exact at rate 0 (slow) and at
// rate 1 (fast: "sync_rate = 1 is the base", tested), where slow + 1·(fast − slow) is not.
inline float lerp(float slow, float fast, float rate) {
  return rate < 0.5f ? slow + rate * (fast - slow) : fast - (fast - slow) * (1.0f - rate);
}

// The last pass's update of element i: the rule, then, with sync (Lookahead), the fast weight as stored (rounded
// to the param dtype, as a separate sync would read it) moves the slow weight, which then becomes the param:
// +8 B/param.
template <typename Rule, typename param_t, bool sync>
inline void apply_element(const Rule& rule, param_t* param, const param_t* grad, float* const* state, int64_t i,
                          float grad_sign, const factors_t<Rule>& factors, float* slow, float sync_rate) {
  constexpr auto F = std::make_index_sequence<two_pass<Rule>::num_factors>{};
  const float fast = update(rule, to_float(param[i]), grad_sign * to_float(grad[i]), state, i, factors, F);
  if constexpr (sync) {
    param_t stored;
    from_float(stored, fast);
    const float slow_param = lerp(slow[i], to_float(stored), sync_rate);
    slow[i] = slow_param;
    from_float(param[i], slow_param);
  } else {
    from_float(param[i], fast);
  }
}

// The last pass over one contiguous range of one tensor with one set of factors; `omp simd` vectorises it
// despite the pointers the compiler cannot prove distinct.
template <typename Rule, typename param_t, bool sync>
FUSEDOPTIM_LOOP_ATTRIBUTES void apply_range(const Rule rule, param_t* param, const param_t* grad,
                                             std::array<float*, Rule::num_states> state, int64_t n,
                                             float grad_sign, const factors_t<Rule> factors, float* slow,
                                             float sync_rate) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    apply_element<Rule, param_t, sync>(rule, param, grad, state.data(), i, grad_sign, factors, slow, sync_rate);
  }
}

// Pass B over elements [lo, hi) of a tensor with rows of `row` elements, row r with the factors at
// row_factors[r * F]: one call per thread's range, the rows looped over inside. With a call per row (ResNet-50's
// AdamP: 27,560 rows of 64-4608 elements) pass B took 0.8-1.7 ms more than without rows; this saved 0.7 ms of it
// (mean of 7 runs in turns with the per-row build, -1.9 to +0.3 ms).
template <typename Rule, typename param_t, bool sync>
FUSEDOPTIM_LOOP_ATTRIBUTES void apply_rows(const Rule rule, param_t* param, const param_t* grad,
                                            std::array<float*, Rule::num_states> state, int64_t lo, int64_t hi,
                                            int64_t row, const float* row_factors, float grad_sign, float* slow,
                                            float sync_rate) {
  constexpr int F = two_pass<Rule>::num_factors;
  for (int64_t piece = lo; piece < hi;) {
    const int64_t r = piece / row, piece_end = std::min(hi, (r + 1) * row);
    factors_t<Rule> factors;
    for (int f = 0; f < F; ++f) factors[f] = row_factors[r * F + f];
#pragma omp simd
    for (int64_t i = piece; i < piece_end; ++i) {
      apply_element<Rule, param_t, sync>(rule, param, grad, state.data(), i, grad_sign, factors, slow, sync_rate);
    }
    piece = piece_end;
  }
}

// Pass A over one contiguous range (a chunk, see prepare_chunks): the rule writes its new state and returns its
// num_sums terms, which are added up here, in one loop: Lanes (kLanes) consecutive elements at a time, each term
// into an fp32 pre-sum lane (kPreSum terms per lane), every lane then into its own double, and the doubles pairwise
// at the end. The loop is auto-vectorised (`GCC ivdep`: param, grad and state do not overlap; no omp lowering, so the
// rule's std::array becomes registers: in one `omp simd` loop GCC 12 made it a per-lane array of structs and every
// rule with 2+ sums ran scalar, LAMB's pass A 83 ms per ResNet-50 step). What was measured (ResNet-50, 2 threads,
// Zen 4, ms of pass A per step): the rule into an L1 block of terms, then one `omp simd` double reduction per sum
// (a dependent vaddpd chain per sum; the loads stop while it runs): LARS 8.2, LAMB 15.5, RaLars 17, AdamP 20;
// fp32 pre-sums of 8 in that second loop: LAMB 14.7-16.9, AdamP 19-20.5; in the rule loop as here: LARS 7.6,
// LAMB 14.3, RaLars 14.8, AdamP 15.4 (AdamP's short rows gained most once the lanes were added pairwise: one
// chain of 64 double adds per chunk had cost it 5 ms). An fp32 pre-sum of 8 terms errs by at most 7 fp32 ulps of
// the sum of their magnitudes and the double sums add nothing measurable (n * 2^-53), so a chunk's sum is within
// a few fp32 ulps of exact: tighter than the reference's own fp32 sum. The order depends on the chunk alone
// (chunks never depend on the thread count): the sums are bitwise the same for any number of threads.
constexpr int64_t kLanes = 64;  // pre-sums: 4 AVX-512 vectors per sum
constexpr int kPreSum = 8;     // fp32 terms per pre-sum before it goes into its double lane
// A row's chunk (AdamP: 4 sums, rows of 64-4608 elements) sums into 16 lanes: its pre-sums and double lanes fit in
// registers, and each row zeroes and adds up 4x fewer of them. AdamP's pass A (ResNet-50, 2 threads) took
// 0.98-1.20x the time of LAMB's (same bytes) with 64 lanes, 1.01-1.03x with 16 (4 runs each), and 1.0-2.0 ms less
// than with 64 in 7 of 7 runs in turns with that build.
constexpr int64_t kRowLanes = 16;

template <typename Rule, typename param_t, int64_t Lanes = kLanes>
FUSEDOPTIM_LOOP_ATTRIBUTES void prepare_range(const Rule rule, const param_t* param, const param_t* grad,
                                               std::array<float*, Rule::num_states> state, int64_t n,
                                               float grad_sign, double* partial) {
  constexpr int K = Rule::num_sums;
  float pre[K][Lanes];
  double lanes[K][Lanes] = {};
  float* const* states = state.data();
  int64_t i = 0;
  while (i + Lanes <= n) {
    const int64_t rows = std::min<int64_t>(kPreSum, (n - i) / Lanes);
    for (int k = 0; k < K; ++k) {
      for (int64_t j = 0; j < Lanes; ++j) pre[k][j] = 0.0f;
    }
    for (int64_t r = 0; r < rows; ++r, i += Lanes) {
#pragma GCC ivdep
      for (int64_t j = 0; j < Lanes; ++j) {
        const auto t = rule.prepare(to_float(param[i + j]), grad_sign * to_float(grad[i + j]), states, i + j);
        for (int k = 0; k < K; ++k) pre[k][j] += t[k];
      }
    }
    for (int k = 0; k < K; ++k) {
      for (int64_t j = 0; j < Lanes; ++j) lanes[k][j] += pre[k][j];
    }
  }
  double tail[K] = {};  // the last n % Lanes elements
  for (; i < n; ++i) {
    const auto t = rule.prepare(to_float(param[i]), grad_sign * to_float(grad[i]), states, i);
    for (int k = 0; k < K; ++k) tail[k] += t[k];
  }
  for (int k = 0; k < K; ++k) {  // the lanes pairwise (vectorised; one dependent chain of 64 adds was not)
    for (int64_t width = Lanes / 2; width > 0; width /= 2) {
      for (int64_t j = 0; j < width; ++j) lanes[k][j] += lanes[k][j + width];
    }
    partial[k] = lanes[k][0] + tail[k];
  }
}

// Per tensor: the rule (its per-tensor scalars) and its state pointers.
template <typename Rule>
struct Prepared {
  std::vector<int64_t> start;  // tensor k owns elements [start[k], start[k + 1]) of the concatenation
  std::vector<Rule> rules;
  std::vector<std::array<float*, Rule::num_states>> states;
};

template <typename Rule>
Prepared<Rule> prepare_tensors(const BucketArgs& a) {
  const size_t n = a.params.size();
  Prepared<Rule> out{std::vector<int64_t>(n + 1, 0), {}, std::vector<std::array<float*, Rule::num_states>>(n)};
  out.rules.reserve(n);
  const float* steps = a.steps.data_ptr<float>();
  for (size_t k = 0; k < n; ++k) {
    out.start[k + 1] = out.start[k] + a.params[k].numel();
    out.rules.push_back(make_rule<Rule>(steps[a.index[k]], a.hyper, std::make_index_sequence<Rule::num_hyper>{}));
    for (int j = 0; j < Rule::num_states; ++j) {  // fp32, or a param-dtype state (param_dtype_states_of)
      out.states[k][j] = reinterpret_cast<float*>(static_cast<char*>(a.states[j].data_ptr()) +
                                                  a.offsets[k] * a.states[j].element_size());
    }
  }
  return out;
}

// The last pass (the elementwise rules' only pass, pass B of the others) over tensors [k0, k1): applies Rule to
// every element. Threads split the concatenation of the tensors by elements, not by tensors: ResNet-50 has 161
// tensors, 107 of them under 4096 elements, and 2 threads given whole tensors would be as unbalanced as its
// largest tensor (2.4 M of 25.6 M elements). A tensor with rows takes each row's factors (row first_row + r of
// `factors`); any other tensor its own (row index[k]).
template <typename Rule, typename param_t, bool sync>
void apply_tensors(const BucketArgs& a, const Prepared<Rule>& t, size_t k0, size_t k1, const float* factors_table) {
  const std::vector<int64_t>& start = t.start;
  constexpr int F = two_pass<Rule>::num_factors;
  float* slow = sync ? a.slow.data_ptr<float>() : nullptr;
  const float sync_rate = sync ? a.sync_rate.data_ptr<float>()[0] : 0.0f;
  // exact: maximize negates the gradient; GradScaler's unscale is the same product as its own (fp32 by fp32)
  const float grad_sign = (a.maximize ? -1.0f : 1.0f) * a.inv_grad_scale;
  at::parallel_for(start[k0], start[k1], kGrain, [&](int64_t begin, int64_t end) {
    size_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; begin < end; ++k) {
      const int64_t lo = begin - start[k], hi = std::min(end, start[k + 1]) - start[k];
      auto* param = static_cast<param_t*>(a.params[k].data_ptr());
      const auto* grad = static_cast<const param_t*>(a.grads[k].const_data_ptr());
      float* slow_k = sync ? slow + a.offsets[k] : nullptr;
      if constexpr (row_statistics_of<Rule>::value) {
        if (a.row_lengths[k] > 0) {  // each row its own factors: rows first_row + r
          apply_rows<Rule, param_t, sync>(t.rules[k], param, grad, t.states[k], lo, hi, a.row_lengths[k],
                                          factors_table + a.first_row[k] * F, grad_sign, slow_k, sync_rate);
          begin = start[k] + hi;
          continue;
        }
      }
      factors_t<Rule> factors{};
      if constexpr (F > 0) {
        for (int f = 0; f < F; ++f) factors[f] = factors_table[a.index[k] * F + f];
      }
      std::array<float*, Rule::num_states> state = t.states[k];
      advance<Rule, param_t>(state, lo);
      apply_range<Rule, param_t, sync>(t.rules[k], param + lo, grad + lo, state, hi - lo, grad_sign, factors,
                                       sync ? slow_k + lo : nullptr, sync_rate);
      begin = start[k] + hi;
    }
  });
}

// The elementwise rules' step.
template <typename Rule, typename param_t, bool sync>
void apply(const BucketArgs& a) {
  const Prepared<Rule> t = prepare_tensors<Rule>(a);
  apply_tensors<Rule, param_t, sync>(a, t, 0, a.params.size(), nullptr);
}

// Elements per pass-A chunk: the unit whose terms are summed together. Chunks restart at every tensor and every
// row and never depend on the thread count, so neither do the sums (bitwise; tested).
constexpr int64_t kSumChunk = 4096;

struct Chunk {
  int64_t begin;    // first element in the concatenation
  size_t k;         // tensor
  int64_t lo, hi;   // elements [lo, hi) of tensor k
  int64_t row;      // table row of its row segment, -1 for none
};

// Every tensor's chunks, in tensor order.
template <typename Rule>
std::vector<Chunk> sum_chunks(const BucketArgs& a, const Prepared<Rule>& t) {
  const size_t n = a.params.size();
  std::vector<Chunk> chunks;
  chunks.reserve(t.start[n] / kSumChunk + n);
  for (size_t k = 0; k < n; ++k) {
    const int64_t numel = t.start[k + 1] - t.start[k], row = a.row_lengths[k];
    const int64_t length = row > 0 ? row : numel;
    for (int64_t r = 0; r * length < numel; ++r) {
      for (int64_t lo = r * length; lo < (r + 1) * length; lo += kSumChunk) {
        chunks.push_back({t.start[k] + lo, k, lo, std::min(lo + kSumChunk, (r + 1) * length),
                          row > 0 ? a.first_row[k] + r : -1});
      }
    }
  }
  return chunks;
}

// Pass A over chunks [c0, c1) (whole tensors): runs Rule::prepare on every element and sums each chunk's terms
// into its own double partial (threads split the elements; a chunk belongs to the thread where it starts), then
// adds the partials in chunk order on one thread into `sums` (double[segments, K]: tensor index[k]; rows
// first_row[k] + r of a tensor with rows): a fixed order, whatever the threads did.
template <typename Rule, typename param_t>
void prepare_chunks(const BucketArgs& a, const Prepared<Rule>& t, const std::vector<Chunk>& chunks, size_t c0,
                    size_t c1, double* partials, double* sums) {
  constexpr int K = Rule::num_sums;
  if (c0 == c1) return;
  const float grad_sign = (a.maximize ? -1.0f : 1.0f) * a.inv_grad_scale;
  at::parallel_for(chunks[c0].begin, t.start[chunks[c1 - 1].k + 1], kGrain, [&](int64_t begin, int64_t end) {
    size_t c = std::lower_bound(chunks.begin() + c0, chunks.begin() + c1, begin,
                                [](const Chunk& chunk, int64_t at) { return chunk.begin < at; }) -
               chunks.begin();
    for (; c < c1 && chunks[c].begin < end; ++c) {
      const Chunk& chunk = chunks[c];
      std::array<float*, Rule::num_states> state = t.states[chunk.k];
      advance<Rule, param_t>(state, chunk.lo);
      const auto* param = static_cast<const param_t*>(a.params[chunk.k].const_data_ptr()) + chunk.lo;
      const auto* grad = static_cast<const param_t*>(a.grads[chunk.k].const_data_ptr()) + chunk.lo;
      if constexpr (row_statistics_of<Rule>::value) {
        if (chunk.row >= 0) {  // a row's chunk: 16 lanes, see kRowLanes
          prepare_range<Rule, param_t, kRowLanes>(t.rules[chunk.k], param, grad, state, chunk.hi - chunk.lo,
                                                  grad_sign, partials + c * K);
          continue;
        }
      }
      prepare_range<Rule, param_t>(t.rules[chunk.k], param, grad, state, chunk.hi - chunk.lo, grad_sign,
                                   partials + c * K);
    }
  });
  for (size_t c = c0; c < c1; ++c) {
    for (int j = 0; j < K; ++j) {
      sums[a.index[chunks[c].k] * K + j] += partials[c * K + j];
      if (chunks[c].row >= 0) sums[chunks[c].row * K + j] += partials[c * K + j];
    }
  }
}

// The step of a rule with per-tensor statistics, by cache groups: runs of consecutive tensors of at most
// a.cache_group elements (a larger tensor is a group of its own) take pass A, then each tensor's finalize, then
// pass B, group after group, so that pass B reads from the cache what pass A has just read. The sums do not depend
// on the groups (nor on the threads: bitwise, tested); the fp32 sums go into a.sums (0 for tensors without a
// gradient) and the factors of the tensors stepped into a.factors.
//
// Why groups, and why the finalize is C++ (csrc/<name>.h, the same computation as optim/<name>.py's):
// measured in one run (ResNet-50, 2 threads, Zen 4, in turns in one process), LARS's step took 18.9 ms as pass A
// over all tensors, the torch finalize, then pass B, against 15.5 ms for torch's fused AdamW (same 28 B/param):
// 0.82x its GB/s. Pass A streams 200-400 MB through a 32 MB L3, so pass B reads everything from DRAM again; in
// groups of <= 1 M elements it took 14.3 ms (1.09x). With the torch finalize per group (two tries), each group cost
// about 100 us of torch ops and whole steps came out slower (csrc/README.md; more runs in docs/notes/cpu-kernels.md).
enum Phase : int64_t { kWholeStep = 0, kPassA = 1, kPassB = 2 };

template <typename Rule, typename param_t, bool sync>
void step_two_pass(const BucketArgs& a) {
  constexpr int K = Rule::num_sums, F = Rule::num_factors;
  const size_t n = a.params.size();
  const Prepared<Rule> t = prepare_tensors<Rule>(a);
  if (a.phase == kPassB) {  // a.factors holds every segment's factors
    apply_tensors<Rule, param_t, sync>(a, t, 0, n, a.factors.data_ptr<float>());
    return;
  }
  const std::vector<Chunk> chunks = sum_chunks<Rule>(a, t);
  std::vector<double> partials(chunks.size() * K);
  std::vector<double> sums(a.sums.numel(), 0.0);  // tensors without a gradient (and their rows) sum to 0
  float* table = a.sums.data_ptr<float>();
  float* factors = a.factors.data_ptr<float>();
  std::vector<float*> tensor_states;
  for (const at::Tensor& s : a.tensor_states) tensor_states.push_back(s.data_ptr<float>());
  const int64_t limit = a.cache_group > 0 ? a.cache_group : t.start[n];
  const auto to_float = [&](int64_t s, int64_t count) {  // sums rows [s, s + count) as finalize sees them
    for (int64_t e = s * K; e < (s + count) * K; ++e) table[e] = static_cast<float>(sums[e]);
  };
  if (a.phase == kPassA) {
    prepare_chunks<Rule, param_t>(a, t, chunks, 0, chunks.size(), partials.data(), sums.data());
    to_float(0, a.sums.size(0));
    return;
  }
  for (size_t k0 = 0, c0 = 0; k0 < n;) {
    size_t k1 = k0 + 1, c1 = c0;
    while (k1 < n && t.start[k1 + 1] - t.start[k0] <= limit) ++k1;
    while (c1 < chunks.size() && chunks[c1].k < k1) ++c1;
    prepare_chunks<Rule, param_t>(a, t, chunks, c0, c1, partials.data(), sums.data());
    for (size_t k = k0; k < k1; ++k) {
      const int64_t s = a.index[k], row = a.row_lengths[k], rows = row > 0 ? a.params[k].numel() / row : 0;
      to_float(s, 1);
      if (rows > 0) to_float(a.first_row[k], rows);
      t.rules[k].finalize(TensorSums{table + s * K, factors + s * F, a.params[k].numel(), rows, row,
                                     rows > 0 ? table + a.first_row[k] * K : nullptr,
                                     rows > 0 ? factors + a.first_row[k] * F : nullptr, tensor_states.data(), s});
    }
    apply_tensors<Rule, param_t, sync>(a, t, k0, k1, factors);
    k0 = k1, c0 = c1;
  }
  to_float(0, a.sums.size(0));
}

// Runtime bools -> template arguments: calls f(std::bool_constant<flags[0]>{}, ..., <flags[N-1]>{}).
template <size_t N, typename F, typename... Done>
void dispatch_flags(const std::vector<bool>& flags, const F& f, Done... done) {
  if constexpr (sizeof...(Done) == 0) {
    TORCH_CHECK(flags.size() == N, "fusedoptim cpu: expected ", N, " flags, got ", flags.size());
  }
  if constexpr (sizeof...(Done) == N) {
    f(done...);
  } else if (flags[sizeof...(Done)]) {
    dispatch_flags<N>(flags, f, done..., std::true_type{});
  } else {
    dispatch_flags<N>(flags, f, done..., std::false_type{});
  }
}

// Calls f(param_t{}) for the bucket's param dtype.
template <typename F>
void dispatch_dtype(const BucketArgs& a, const F& f) {
  switch (a.params[0].scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(bf16_t{});
    case at::kHalf: return f(fp16_t{});
    default: TORCH_CHECK(false, "fusedoptim cpu: params must be fp32, bf16 or fp16, got ", a.params[0].scalar_type());
  }
}

// A rule's step, as the bindings call it: it validates everything first (a failed call writes nothing).
// param_t: a rule that is a template on the param type (param_dtype_states_of) runs for that dtype only; its
// translation unit dispatches on the dtype itself (adan.cpp).
template <typename Rule, typename param_t = void>
void run(const BucketArgs& a) {
  validate(a, Rule::num_states, Rule::num_hyper, param_dtype_states_of<Rule>::value);
  if constexpr (two_pass<Rule>::value) {
    validate_two_pass(a, Rule::num_sums, Rule::num_factors, num_tensor_states_of<Rule>::value,
                      row_statistics_of<Rule>::value);
    if (a.params.empty()) {
      if (a.phase != kPassB) std::fill_n(a.sums.data_ptr<float>(), a.sums.numel(), 0.0f);
      return;
    }
  } else if (a.params.empty()) {
    return;
  }
  const auto dispatch = [&](const auto& f) {
    if constexpr (std::is_void_v<param_t>) {
      dispatch_dtype(a, f);
    } else {
      f(param_t{});
    }
  };
  // A negative rate is no sync: a wrapper counting its steps on the device (GradScaler may skip a step, a captured
  // graph replays every step alike) calls the sync on its own (keep) every step, negative between syncs. Read once
  // per call, so any rule's fused sync takes it too.
  const bool sync = a.slow.defined() && a.sync_rate.const_data_ptr<float>()[0] >= 0.0f;
  if constexpr (sync_only_of<Rule>::value) {
    if (!sync) return;  // the sync on its own: nothing to do
  }
  dispatch([&](auto p) {
    using param_type = decltype(p);
    if constexpr (two_pass<Rule>::value) {
      if (sync) {
        step_two_pass<Rule, param_type, true>(a);
      } else {
        step_two_pass<Rule, param_type, false>(a);
      }
    } else if (sync) {
      apply<Rule, param_type, true>(a);
    } else {
      apply<Rule, param_type, false>(a);
    }
  });
}

}  // namespace fusedoptim
