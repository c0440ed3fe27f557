// Python bindings of the fused CPU kernels (optim/_cpu.py calls them). Built just in time by
// torch.utils.cpp_extension.load. Every function takes the same bucket arguments:
//   <elementwise rule>_step(params, grads, states, offsets, steps, index, hyper, flags, maximize, slow, sync_rate,
//                           inv_grad_scale)
//   <two-pass rule>_step(..., maximize, row_lengths, first_row, sums, factors, tensor_states, cache_group, slow,
//                        sync_rate, phase, inv_grad_scale)  both passes with the rule's finalize between them;
//                        fills sums and factors (phase 1: pass A only, fills sums; phase 2: pass B only, reads
//                        factors)
// inv_grad_scale: torch.amp.GradScaler's inverse scale, by which the grads are multiplied as they are read
// lr (None: hyper[0]): a tensor learning rate, fp32[1] on the CPU, read here in place of hyper[0] (every rule's lr);
// or fp32[len(hyper)], every runtime scalar (tensor betas)
// slow / sync_rate (None: no sync) fuse Lookahead's sync into the last pass; keep_step with the params as grads
// is the sync on its own. scout_snapshot: Scout's ring and coherence sums (scout.cpp). Only pybind11 and the
// Tensor caster, not <torch/extension.h>: that pulls in all of
// libtorch's C++ frontend.
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

using Optional = std::optional<at::Tensor>;
using Tensors = std::vector<at::Tensor>;
using Ints = std::vector<int64_t>;

// The runtime scalars with a tensor lr's value in place of hyper[0], or all of them from the tensor: read in C++, so
// that Python never calls .item() on it (a graph break under torch.compile; with a CUDA lr it would be a host sync).
inline std::vector<double> read_lr(std::vector<double> hyper, const Optional& lr) {
  if (lr.has_value()) {
    const int64_t n = lr->numel();
    TORCH_CHECK(lr->device().is_cpu() && lr->scalar_type() == at::kFloat && lr->is_contiguous() &&
                    (n == 1 || n == static_cast<int64_t>(hyper.size())),
                "fusedoptim cpu: a tensor lr must be an fp32 CPU tensor of 1 element, or of one per runtime scalar");
    TORCH_CHECK(!hyper.empty(), "fusedoptim cpu: a tensor lr needs hyper[0], the rule's lr");
    const float* values = lr->const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) hyper[i] = static_cast<double>(values[i]);
  }
  return hyper;
}

template <void (*Rule)(const BucketArgs&)>
void step_entry(Tensors params, Tensors grads, Tensors states, Ints offsets, at::Tensor steps, Ints index,
                std::vector<double> hyper, std::vector<bool> flags, bool maximize, Optional slow, Optional sync_rate,
                double inv_grad_scale, Optional lr) {
  BucketArgs a{std::move(params), std::move(grads), std::move(states), std::move(offsets), std::move(steps),
               std::move(index), read_lr(std::move(hyper), lr), std::move(flags), maximize};
  a.slow = slow.value_or(at::Tensor()), a.sync_rate = sync_rate.value_or(at::Tensor());
  a.inv_grad_scale = static_cast<float>(inv_grad_scale);
  Rule(a);
}

template <void (*Rule)(const BucketArgs&)>
void two_pass_entry(Tensors params, Tensors grads, Tensors states, Ints offsets, at::Tensor steps, Ints index,
                    std::vector<double> hyper, std::vector<bool> flags, bool maximize, Ints row_lengths,
                    Ints first_row, at::Tensor sums, at::Tensor factors, Tensors tensor_states, int64_t cache_group,
                    Optional slow, Optional sync_rate, int64_t phase, double inv_grad_scale, Optional lr) {
  BucketArgs a{std::move(params), std::move(grads), std::move(states), std::move(offsets), std::move(steps),
               std::move(index), read_lr(std::move(hyper), lr), std::move(flags), maximize};
  a.row_lengths = std::move(row_lengths), a.first_row = std::move(first_row);
  a.sums = std::move(sums), a.factors = std::move(factors), a.tensor_states = std::move(tensor_states);
  a.cache_group = cache_group, a.phase = phase, a.inv_grad_scale = static_cast<float>(inv_grad_scale);
  a.slow = slow.value_or(at::Tensor()), a.sync_rate = sync_rate.value_or(at::Tensor());
  Rule(a);
}

namespace py = pybind11;

// The Python signatures. The GIL is released: a step touches only tensor memory, and other Python threads may
// run meanwhile.
template <void (*Rule)(const BucketArgs&)>
void def_step(py::module_& m, const std::string& name) {
  m.def((name + "_step").c_str(), &step_entry<Rule>, "one bucket's step; slow, sync_rate: Lookahead's sync fused in",
        py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("offsets"), py::arg("steps"),
        py::arg("index"), py::arg("hyper"), py::arg("flags"), py::arg("maximize"), py::arg("slow") = py::none(),
        py::arg("sync_rate") = py::none(), py::arg("inv_grad_scale") = 1.0, py::arg("lr") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}

template <void (*Rule)(const BucketArgs&)>
void def_two_pass(py::module_& m, const std::string& name) {
  m.def((name + "_step").c_str(), &two_pass_entry<Rule>,
        "one bucket's step: pass A, the rule's finalize and pass B by cache groups; fills sums (fp32[segments, "
        "num_sums]) and factors (fp32[segments, num_factors]); slow, sync_rate: Lookahead's sync fused in",
        py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("offsets"), py::arg("steps"),
        py::arg("index"), py::arg("hyper"), py::arg("flags"), py::arg("maximize"), py::arg("row_lengths"),
        py::arg("first_row"), py::arg("sums"), py::arg("factors"), py::arg("tensor_states"),
        py::arg("cache_group"), py::arg("slow") = py::none(), py::arg("sync_rate") = py::none(),
        py::arg("phase") = 0, py::arg("inv_grad_scale") = 1.0, py::arg("lr") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace fusedoptim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fusedoptim;
  def_step<adabelief>(m, "adabelief");
  def_step<adan>(m, "adan");
  def_step<ademamix>(m, "ademamix");
  def_step<keep>(m, "keep");  // with the params as grads, and slow, sync_rate: Lookahead's sync on its own
  def_two_pass<lars>(m, "lars");
  def_two_pass<lamb>(m, "lamb");
  def_two_pass<ralars>(m, "ralars");
  def_two_pass<tadam>(m, "tadam");
  def_two_pass<adamp>(m, "adamp");
  m.def("scout_snapshot", &scout_snapshot,
        "Scout: the params into row slot of the ring (-1: none); with coherence, fp64 [tensors, 2] coherence sums; "
        "position (int64[1], in place of slot and coherence): the step's place in its period",
        py::arg("params"), py::arg("offsets"), py::arg("slow"), py::arg("ring"), py::arg("slot"),
        py::arg("coherence"), py::arg("inv_period"), py::arg("inv_period_minus_one"),
        py::arg("position") = py::none(), py::arg("streaming") = false,
        py::call_guard<py::gil_scoped_release>());
}
