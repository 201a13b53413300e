// Schemas of the C++ kernel entry points (emcad_kernels::*_cpu_kernel). They are called by the Python-level
// custom ops of the "cpu" backend (emcad_kernels/_cpu_backend.py, which registers emcad_kernels::*_cpu with
// fake, autograd and FLOP formulas via library.define_op_set), so they need no fake kernels of their own.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

namespace {

std::string cpu_isa() { return emcad_cpu::active_table().name; }

bool cpu_set_isa(c10::string_view name) { return emcad_cpu::set_active_isa(std::string(name).c_str()); }

}  // namespace

TORCH_LIBRARY(emcad_kernels, m) {
  m.def(
      "msdc_fwd_cpu_kernel(Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, Tensor mean, "
      "Tensor var, bool training, float eps, str activation, bool concat, int shuffle_groups, int stride) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "msdc_bwd_cpu_kernel(Tensor grad, Tensor x, Tensor[] weights, Tensor bn_weight, Tensor bn_bias, "
      "Tensor save_mean, Tensor save_var, bool training, float eps, str activation, bool concat, "
      "int shuffle_groups, int stride) -> Tensor[]");
  m.def(
      "updw_fwd_cpu_kernel(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, "
      "bool training, float eps, str mode, str activation, int scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "updw_bwd_cpu_kernel(Tensor grad, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor save_mean, Tensor save_var, bool training, float eps, str mode, str activation, int scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lgag_fwd_cpu_kernel(Tensor g, Tensor x, Tensor wg, Tensor bg, Tensor wx, Tensor bx, Tensor wpsi, "
      "Tensor bpsi, Tensor bn_g_weight, Tensor bn_g_bias, Tensor mean_g, Tensor var_g, Tensor bn_x_weight, "
      "Tensor bn_x_bias, Tensor mean_x, Tensor var_x, Tensor bn_psi_weight, Tensor bn_psi_bias, "
      "Tensor mean_psi, Tensor var_psi, bool training, float eps, int groups, str activation, "
      "bool add_gate_input) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lgag_bwd_cpu_kernel(Tensor grad, Tensor g, Tensor x, Tensor wg, Tensor bg, Tensor wx, Tensor bx, "
      "Tensor wpsi, Tensor bpsi, Tensor bn_g_weight, Tensor bn_g_bias, Tensor bn_x_weight, Tensor bn_x_bias, "
      "Tensor bn_psi_weight, Tensor bn_psi_bias, Tensor[] save_stats, bool training, float eps, int groups, "
      "str activation, bool add_gate_input) -> Tensor[]");
  // multi-dilation ops (EGE-UNet GAB / GHPA, MALUNet DGA / GAU); backward returns
  // lndw: [grad x, grad ln_weights..., grad ln_biases..., grad weights..., grad biases...]
  // dwgn: [grad x, grad gn_weight, grad gn_bias, grad weights..., grad biases...]
  m.def(
      "lndw_fwd_cpu_kernel(Tensor x, Tensor[] ln_weights, Tensor[] ln_biases, Tensor[] weights, Tensor[] biases, "
      "int[] dilations, float eps) -> Tensor");
  m.def(
      "lndw_bwd_cpu_kernel(Tensor grad, Tensor x, Tensor[] ln_weights, Tensor[] ln_biases, Tensor[] weights, "
      "Tensor[] biases, int[] dilations, float eps) -> Tensor[]");
  m.def(
      "dwgn_fwd_cpu_kernel(Tensor x, Tensor[] weights, Tensor[] biases, Tensor gn_weight, Tensor gn_bias, "
      "int[] dilations, float eps) -> Tensor");
  m.def(
      "dwgn_bwd_cpu_kernel(Tensor grad, Tensor x, Tensor[] weights, Tensor[] biases, Tensor gn_weight, "
      "Tensor gn_bias, int[] dilations, float eps) -> Tensor[]");
  // which kernel build (instruction set) runs; selectable for tests and benchmarks
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_set_isa(str name) -> bool", &cpu_set_isa);
}

// `import emcad_kernels._C` only needs a module object: loading the library runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "emcad_kernels C++ kernels (CPU)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
