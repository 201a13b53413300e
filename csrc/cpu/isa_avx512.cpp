// Kernels compiled for AVX-512 (F/BW/VL/DQ) with 512-bit vectors (selected at run time).
#include "cpu/kernels_prelude.h"
#include "cpu/multidilation.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace emcad_cpu {
namespace isa_avx512 {
constexpr int kPixelBlock = 8;
#define EMCAD_ISA_AVX512 1  // the target pragma does not define __AVX2__ / __AVX512F__
#include "cpu/kernels_impl.h"
#include "cpu/multidilation_impl.h"
#undef EMCAD_ISA_AVX512
const KernelTable& table() { return make_table("avx512"); }
const MdTable& md_table() { return make_md_table("avx512"); }
}  // namespace isa_avx512
}  // namespace emcad_cpu
#pragma GCC pop_options
#else
namespace emcad_cpu {
namespace isa_avx512 {
const KernelTable& table() { return isa_default::table(); }
const MdTable& md_table() { return isa_default::md_table(); }
}  // namespace isa_avx512
}  // namespace emcad_cpu
#endif
