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
#include <utility>
#include <vector>

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
};

// Elements per thread task at least: a bucket below this runs on one thread, since waking the OpenMP team
// costs more than the update of a few thousand elements.
constexpr int64_t kGrain = 1 << 15;

// Everything that can fail is checked here, before any param or state is written.
inline void validate(const BucketArgs& a, int num_states, int num_hyper) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.grads.size() == n && a.offsets.size() == n && a.index.size() == n,
              "fusedoptim cpu: params, grads, offsets and index must have one entry per tensor");
  TORCH_CHECK(static_cast<int>(a.states.size()) == num_states, "fusedoptim cpu: expected ", num_states,
              " state buffers, got ", a.states.size());
  TORCH_CHECK(static_cast<int>(a.hyper.size()) == num_hyper, "fusedoptim cpu: expected ", num_hyper,
              " hyperparameters, got ", a.hyper.size());
  TORCH_CHECK(a.steps.device().is_cpu() && a.steps.scalar_type() == at::kFloat && a.steps.is_contiguous(),
              "fusedoptim cpu: steps must be a contiguous fp32 CPU tensor");
  for (const auto& s : a.states) {
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 1,
                "fusedoptim cpu: state buffers must be flat contiguous fp32 CPU tensors, got ", s.scalar_type());
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

// The elementwise loop over one contiguous range of one tensor; `omp simd` vectorises it despite the pointers
// the compiler cannot prove distinct.
template <typename Rule, typename param_t>
FUSEDOPTIM_LOOP_ATTRIBUTES void apply_range(const Rule rule, param_t* param, const param_t* grad,
                                             std::array<float*, Rule::num_states> state, int64_t n,
                                             float grad_sign) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    from_float(param[i], rule(to_float(param[i]), grad_sign * to_float(grad[i]), state.data(), i));
  }
}

// Applies Rule to every element of every tensor of `a`. Threads split the concatenation of all tensors by
// elements, not by tensors: ResNet-50 has 161 tensors, 107 of them under 4096 elements, and 2 threads given
// whole tensors would be as unbalanced as its largest tensor (2.4 M of 25.6 M elements).
template <typename Rule, typename param_t>
void apply(const BucketArgs& a) {
  const size_t n = a.params.size();
  std::vector<int64_t> start(n + 1, 0);  // tensor k owns elements [start[k], start[k + 1]) of the concatenation
  std::vector<Rule> rules;
  std::vector<std::array<float*, Rule::num_states>> states(n);
  rules.reserve(n);
  const float* steps = a.steps.data_ptr<float>();
  for (size_t k = 0; k < n; ++k) {
    start[k + 1] = start[k] + a.params[k].numel();
    rules.push_back(make_rule<Rule>(steps[a.index[k]], a.hyper, std::make_index_sequence<Rule::num_hyper>{}));
    for (int j = 0; j < Rule::num_states; ++j) states[k][j] = a.states[j].data_ptr<float>() + a.offsets[k];
  }
  const float grad_sign = a.maximize ? -1.0f : 1.0f;  // exact: maximize negates the gradient
  at::parallel_for(0, start[n], kGrain, [&](int64_t begin, int64_t end) {
    size_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; begin < end; ++k) {
      const int64_t lo = begin - start[k], hi = std::min(end, start[k + 1]) - start[k];
      std::array<float*, Rule::num_states> state = states[k];
      for (auto& s : state) s += lo;
      apply_range(rules[k], static_cast<param_t*>(a.params[k].data_ptr()) + lo,
                  static_cast<const param_t*>(a.grads[k].const_data_ptr()) + lo, state, hi - lo, grad_sign);
      begin = start[k] + hi;
    }
  });
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

// Validates, then runs Rule for the bucket's param dtype.
template <typename Rule>
void step(const BucketArgs& a) {
  validate(a, Rule::num_states, Rule::num_hyper);
  if (a.params.empty()) return;
  switch (a.params[0].scalar_type()) {
    case at::kFloat: return apply<Rule, float>(a);
    case at::kBFloat16: return apply<Rule, bf16_t>(a);
    case at::kHalf: return apply<Rule, fp16_t>(a);
    default: TORCH_CHECK(false, "fusedoptim cpu: params must be fp32, bf16 or fp16, got ", a.params[0].scalar_type());
  }
}

}  // namespace fusedoptim
