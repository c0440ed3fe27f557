// Python bindings of the fused CPU kernels (fusedoptim/_cpu.py calls them). Built just in time by
// torch.utils.cpp_extension.load. Every function takes the same bucket arguments:
//   <elementwise rule>_step(params, grads, states, offsets, steps, index, hyper, flags, maximize, slow, sync_rate)
//   <two-pass rule>_prepare(..., maximize, row_lengths, first_row, sums, slow, sync_rate)     pass A: fills sums
//   <two-pass rule>_apply(..., maximize, row_lengths, first_row, factors, slow, sync_rate)    pass B
// slow / sync_rate (None: no sync) fuse Lookahead's sync into the last pass; keep_step with the params as grads
// is the sync on its own. Only pybind11 and the Tensor caster, not <torch/extension.h>: that pulls in all of
// libtorch's C++ frontend.
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "multi_tensor.h"
#include "rules.h"

namespace fusedoptim {

using Optional = std::optional<at::Tensor>;

template <void (*Rule)(const BucketArgs&, Pass)>
void step_entry(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> states,
                std::vector<int64_t> offsets, at::Tensor steps, std::vector<int64_t> index, std::vector<double> hyper,
                std::vector<bool> flags, bool maximize, Optional slow, Optional sync_rate) {
  Rule(BucketArgs{std::move(params), std::move(grads), std::move(states), std::move(offsets), std::move(steps),
                  std::move(index), std::move(hyper), std::move(flags), maximize, {}, {}, {},
                  slow.value_or(at::Tensor()), sync_rate.value_or(at::Tensor())},
       Pass::step);
}

template <void (*Rule)(const BucketArgs&, Pass), Pass pass>
void pass_entry(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> states,
                std::vector<int64_t> offsets, at::Tensor steps, std::vector<int64_t> index, std::vector<double> hyper,
                std::vector<bool> flags, bool maximize, std::vector<int64_t> row_lengths,
                std::vector<int64_t> first_row, at::Tensor table, Optional slow, Optional sync_rate) {
  Rule(BucketArgs{std::move(params), std::move(grads), std::move(states), std::move(offsets), std::move(steps),
                  std::move(index), std::move(hyper), std::move(flags), maximize, std::move(row_lengths),
                  std::move(first_row), std::move(table), slow.value_or(at::Tensor()),
                  sync_rate.value_or(at::Tensor())},
       pass);
}

namespace py = pybind11;

// The Python signatures. The GIL is released: a step touches only tensor memory, and other Python threads may
// run meanwhile.
template <void (*Rule)(const BucketArgs&, Pass)>
void def_step(py::module_& m, const std::string& name) {
  m.def((name + "_step").c_str(), &step_entry<Rule>, "one bucket's step; slow, sync_rate: Lookahead's sync fused in",
        py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("offsets"), py::arg("steps"),
        py::arg("index"), py::arg("hyper"), py::arg("flags"), py::arg("maximize"), py::arg("slow") = py::none(),
        py::arg("sync_rate") = py::none(), py::call_guard<py::gil_scoped_release>());
}

template <void (*Rule)(const BucketArgs&, Pass)>
void def_two_pass(py::module_& m, const std::string& name) {
  const auto def = [&](const std::string& suffix, auto entry, const char* doc) {
    m.def((name + suffix).c_str(), entry, doc, py::arg("params"), py::arg("grads"), py::arg("states"),
          py::arg("offsets"), py::arg("steps"), py::arg("index"), py::arg("hyper"), py::arg("flags"),
          py::arg("maximize"), py::arg("row_lengths"), py::arg("first_row"), py::arg("table"),
          py::arg("slow") = py::none(), py::arg("sync_rate") = py::none(), py::call_guard<py::gil_scoped_release>());
  };
  def("_prepare", &pass_entry<Rule, Pass::prepare>, "pass A: fills table (fp32[segments, num_sums]) with the sums");
  def("_apply", &pass_entry<Rule, Pass::apply>, "pass B, with table = finalize's factors (fp32[segments, F])");
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
}
