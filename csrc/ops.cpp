// The CPU extension's module entry and its utility ops. The fused ops' schemas are defined from Python, by their
// descriptors (emcad_kernels/ops/<op>.py); the C++ files only register kernels for them (TORCH_LIBRARY_IMPL in
// csrc/cpu/<op>.cpp and csrc/cuda/torch_binding.cpp).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

namespace {

std::string cpu_isa() { return emcad_cpu::active_table().name; }

bool cpu_set_isa(c10::string_view name) { return emcad_cpu::set_active_isa(std::string(name).c_str()); }

}  // namespace

// which kernel build (instruction set) runs; selectable for tests and benchmarks
TORCH_LIBRARY_FRAGMENT(emcad_kernels, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_set_isa(str name) -> bool", &cpu_set_isa);
}

// `import emcad_kernels._C` only needs a module object: loading the library runs the registrations.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "emcad_kernels C++ kernels (CPU)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
