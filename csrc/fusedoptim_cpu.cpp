// Python bindings of the fused CPU kernels: one function per optimizer, all with the same arguments
// (fusedoptim/_cpu.py calls them). Built just in time by torch.utils.cpp_extension.load.
// Only pybind11 and the Tensor caster, not <torch/extension.h>: that pulls in all of libtorch's C++ frontend.
#include <torch/csrc/utils/pybind.h>

#include "adabelief.h"
#include "adan.h"
#include "ademamix.h"
#include "multi_tensor.h"

namespace fusedoptim {

void adabelief_step(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto amsgrad, auto decoupled_weight_decay) {
    step<adabelief_update<decltype(amsgrad)::value, decltype(decoupled_weight_decay)::value>>(a);
  });
}

void adan_step(const BucketArgs& a) {
  dispatch_flags<2>(a.flags, [&](auto no_prox, auto amsgrad) {
    step<adan_update<decltype(no_prox)::value, decltype(amsgrad)::value>>(a);
  });
}

void ademamix_step(const BucketArgs& a) {
  dispatch_flags<0>(a.flags, [&]() { step<ademamix_update>(a); });
}

// The Python signature shared by every optimizer's step function.
template <void (*Step)(const BucketArgs&)>
void entry(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> states,
           std::vector<int64_t> offsets, at::Tensor steps, std::vector<int64_t> index, std::vector<double> hyper,
           std::vector<bool> flags, bool maximize) {
  Step(BucketArgs{std::move(params), std::move(grads), std::move(states), std::move(offsets), std::move(steps),
                  std::move(index), std::move(hyper), std::move(flags), maximize});
}

}  // namespace fusedoptim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const char* doc = "(params, grads, states, offsets, steps, index, hyper, flags, maximize): one bucket's step";
  // The GIL is released: the step touches only tensor memory, and other Python threads may run meanwhile.
  m.def("adabelief_step", &fusedoptim::entry<fusedoptim::adabelief_step>, doc,
        py::call_guard<py::gil_scoped_release>());
  m.def("adan_step", &fusedoptim::entry<fusedoptim::adan_step>, doc, py::call_guard<py::gil_scoped_release>());
  m.def("ademamix_step", &fusedoptim::entry<fusedoptim::ademamix_step>, doc,
        py::call_guard<py::gil_scoped_release>());
}
