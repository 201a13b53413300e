// Kernels compiled for baseline x86-64 (SSE2): runs on any x86-64 CPU.
#include "cpu/kernels_prelude.h"

namespace emcad_cpu {
namespace isa_default {
constexpr int kPixelBlock = 2;
#include "cpu/kernels_impl.h"
const KernelTable& table() { return make_table("default"); }
}  // namespace isa_default
}  // namespace emcad_cpu
