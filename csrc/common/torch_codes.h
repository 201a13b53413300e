// Torch-side names -> the codes of common/codes.h, for the CPU and the CUDA bindings (the only C++ files that
// include torch). Both return -1 for a name without a code; each binding checks what its kernels support and
// says so in its own error message.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

// relative: the CUDA binding is also compiled without csrc/ on the include path (tests/test_cuda_backend.py)
#include "codes.h"

namespace emcad {

// an activation name of emcad_kernels.ACTIVATIONS
inline int activation_code(c10::string_view name) {
  if (name == "identity") return EMCAD_ACT_IDENTITY;
  if (name == "relu") return EMCAD_ACT_RELU;
  if (name == "relu6") return EMCAD_ACT_RELU6;
  if (name == "leakyrelu") return EMCAD_ACT_LEAKYRELU;
  if (name == "hswish") return EMCAD_ACT_HSWISH;
  if (name == "gelu") return EMCAD_ACT_GELU;
  return -1;
}

inline int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return EMCAD_DTYPE_F32;
    case c10::ScalarType::Double: return EMCAD_DTYPE_F64;
    case c10::ScalarType::BFloat16: return EMCAD_DTYPE_BF16;
    case c10::ScalarType::Half: return EMCAD_DTYPE_F16;
    default: return -1;
  }
}

}  // namespace emcad
