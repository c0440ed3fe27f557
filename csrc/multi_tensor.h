// The multi-tensor loop, written once (the C++ counterpart of kernels/_template.py): applies a rule to every
// element of every tensor of a bucket that has a gradient. Parametrised by the rule (csrc/<name>.h), which
// gives its per-tensor scalars (constructor: step, *hyper) and its elementwise update (operator()).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

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

// x86-64 builds default to SSE2 (4 floats per instruction); sqrt and the divisions of these rules run 2x wider
// with AVX2 and the memory traffic then hides them. GCC compiles one clone per ISA and picks at load time, so
// the cached library runs on any x86-64 CPU (-march=native would bake in this machine's).
#if !defined(FUSEDOPTIM_TARGET_CLONES) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDOPTIM_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#elif !defined(FUSEDOPTIM_TARGET_CLONES)
#define FUSEDOPTIM_TARGET_CLONES
#endif

// The elementwise loop over one contiguous range of one tensor. `rule` is taken by value so that its
// scalars are locals the compiler keeps in registers (a member read through `this` could alias the float
// state stores); `omp simd` vectorises despite the pointers the compiler cannot prove distinct.
template <typename Rule, typename param_t>
FUSEDOPTIM_TARGET_CLONES void apply_range(const Rule rule, param_t* param, const param_t* grad,
                        std::array<float*, Rule::num_states> state, int64_t n, float grad_sign) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // bf16/fp16: upcast exactly, rule in fp32, store rounds to nearest even (c10's conversions).
    param[i] = static_cast<param_t>(rule(static_cast<float>(param[i]), grad_sign * static_cast<float>(grad[i]),
                                         state.data(), i));
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
      apply_range(rules[k], a.params[k].data_ptr<param_t>() + lo, a.grads[k].const_data_ptr<param_t>() + lo,
                  state, hi - lo, grad_sign);
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
    case at::kBFloat16: return apply<Rule, c10::BFloat16>(a);
    case at::kHalf: return apply<Rule, c10::Half>(a);
    default: TORCH_CHECK(false, "fusedoptim cpu: params must be fp32, bf16 or fp16, got ", a.params[0].scalar_type());
  }
}

}  // namespace fusedoptim
