// The CPU kernels of every op, compiled once per instruction set, and the one place that names the instruction
// sets and their compiler targets. isa_default.cpp, isa_avx2.cpp and isa_avx512.cpp each define EMCAD_ISA_<NAME>
// and include this file, which compiles every op's kernels (<op>_impl.h) inside namespace emcad_cpu::isa_<name>
// under that instruction set's `#pragma GCC target`, with kPixelBlock (output pixels per register block of the
// stencil cores) and kVecBytes (the width of that instruction set's vector registers, for kernels written with GCC
// vector types) defined, and defines isa_<name>::fill_table(). The extension is built without -march=native;
// dispatch.cpp picks the build at run time (EMCAD_CPU_ISA, emcad_kernels.cpu_set_isa).
//
// EMCAD_ISA_AVX2 / EMCAD_ISA_AVX512 also select the intrinsics paths of stencil_common.h (the target pragma does
// not define __AVX2__ / __AVX512F__). GCC contracts a * b + c into an FMA wherever both operations end up in one
// function after inlining, and its inlining depends on everything in the translation unit: moving kernels into
// other translation units can change results in the last bit.

// Standard and shared headers at the default target, before the target pragma (standard headers must not be
// compiled for a wider instruction set). The <op>_impl.h files rely on these.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/activations.h"
#include "common/bf16.h"
#include "common/bn.h"
#include "common/index_maps.h"
#include "cpu/kernels.h"

#if defined(EMCAD_ISA_DEFAULT)  // baseline x86-64 (SSE2)
#define EMCAD_ISA_NAMESPACE isa_default
#define EMCAD_PIXEL_BLOCK 2
#define EMCAD_VEC_BYTES 16
#elif defined(__x86_64__) && defined(__GNUC__)  // other CPUs have the default build only (dispatch.cpp)
#pragma GCC push_options
#define EMCAD_ISA_POP_OPTIONS 1
#if defined(EMCAD_ISA_AVX2)
#pragma GCC target("avx2,fma,f16c")
#define EMCAD_ISA_NAMESPACE isa_avx2
#define EMCAD_PIXEL_BLOCK 4
#define EMCAD_VEC_BYTES 32
#elif defined(EMCAD_ISA_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define EMCAD_ISA_NAMESPACE isa_avx512
#define EMCAD_PIXEL_BLOCK 8
#define EMCAD_VEC_BYTES 64
#endif
#endif

#ifdef EMCAD_ISA_NAMESPACE
namespace emcad_cpu {
namespace EMCAD_ISA_NAMESPACE {

constexpr int kPixelBlock = EMCAD_PIXEL_BLOCK;
constexpr int kVecBytes = EMCAD_VEC_BYTES;

#include "cpu/stencil_common.h"
#include "cpu/msdc_impl.h"
#include "cpu/updw_impl.h"
#include "cpu/lgag_impl.h"
#include "cpu/multidilation_impl.h"
#include "cpu/mscam_impl.h"
#include "cpu/mutation_loss_impl.h"
#include "cpu/token_dwconv_gelu_impl.h"

// the kernels of storage type S (float, double, bf16) into the entries of its dtype code
template <typename S>
void fill_dtype(KernelTable& t, int dt) {
  t.msdc[dt] = msdc_kernels<S>();
  t.updw[dt] = updw_kernels<S>();
  t.lgag[dt] = lgag_kernels<S>();
  t.lndw[dt] = md::lndw_kernels<S>();
  t.dwgn[dt] = md::dwgn_kernels<S>();
  t.mscam[dt] = mscam::mscam_kernels<S>();
  t.mutation_loss[dt] = ml::ml_kernels<S>();
  t.token_dwconv_gelu[dt] = tdg::tdg_kernels<S>();
}

void fill_table(KernelTable& t) {
  fill_dtype<float>(t, EMCAD_DTYPE_F32);
  fill_dtype<double>(t, EMCAD_DTYPE_F64);
  fill_dtype<emcad::bf16>(t, EMCAD_DTYPE_BF16);
}

}  // namespace EMCAD_ISA_NAMESPACE
}  // namespace emcad_cpu
#endif

#ifdef EMCAD_ISA_POP_OPTIONS
#pragma GCC pop_options
#endif
