// Kernels compiled for baseline x86-64 (SSE2): runs on any x86-64 CPU.
#include "cpu/kernels_prelude.h"
#include "cpu/multidilation.h"

namespace emcad_cpu {
namespace isa_default {
constexpr int kPixelBlock = 2;
#include "cpu/kernels_impl.h"
#include "cpu/multidilation_impl.h"
const KernelTable& table() { return make_table("default"); }
const MdTable& md_table() { return make_md_table("default"); }
}  // namespace isa_default
}  // namespace emcad_cpu
