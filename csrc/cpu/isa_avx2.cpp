// Kernels compiled for AVX2 + FMA (selected at run time on CPUs that have them).
#include "cpu/kernels_prelude.h"
#include "cpu/multidilation.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace emcad_cpu {
namespace isa_avx2 {
constexpr int kPixelBlock = 4;
#define EMCAD_ISA_AVX2 1  // the target pragma does not define __AVX2__ / __AVX512F__
#include "cpu/kernels_impl.h"
#include "cpu/multidilation_impl.h"
#undef EMCAD_ISA_AVX2
const KernelTable& table() { return make_table("avx2"); }
const MdTable& md_table() { return make_md_table("avx2"); }
}  // namespace isa_avx2
}  // namespace emcad_cpu
#pragma GCC pop_options
#else
namespace emcad_cpu {
namespace isa_avx2 {
const KernelTable& table() { return isa_default::table(); }
const MdTable& md_table() { return isa_default::md_table(); }
}  // namespace isa_avx2
}  // namespace emcad_cpu
#endif
