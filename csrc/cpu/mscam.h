// Interface between the torch binding of the mscam op (mscam.cpp) and its kernels (mscam_impl.h, compiled once
// per instruction set by isa_<name>.cpp). Torch-free: raw pointers into dense tensors.
//
// Layout: x, y, g, gx are dense, either channels_last (cl = 1: element (n, c, h, w) at ((n*H + h)*W + w)*C + c)
// or NCHW (cl = 0). Scratch maps use the accumulation type A (float; double for fp64 storage).
#pragma once
#include <cstdint>

namespace emcad_cpu {

struct MscamArgs {
  const void* x = nullptr;
  void* y = nullptr;
  const void* g = nullptr;  // upstream gradient (layout of x)
  void* gx = nullptr;
  int64_t N = 0, C = 0, H = 0, W = 0;
  int cl = 0;
  int k = 7;                  // SAB kernel size (odd, <= 9)
  int64_t band = 1;           // rows per item
  int64_t nbands = 1;         // items per image: item = n * nbands + band index
  const double* wsab = nullptr;  // [2][k][k]
  const void* ca = nullptr;   // A [N][C] channel attention
  void* map = nullptr;        // A [N][2][H + k - 1][W + k - 1]: [mean_c, max_c] of x * ca, zero border k/2
  int32_t* camax = nullptr;   // [N][H][W] channel arg-max of x * ca (backward)
  void* sa = nullptr;         // A [N][H][W] spatial attention (backward)
  void* gq = nullptr;         // A [N][H + k - 1][W + k - 1] grad of the SAB logits, zero border k/2
  void* gs = nullptr;         // A [N][2][H][W] grad of the map
  double* psum = nullptr;     // [items][C] partial sums of x
  void* pmax = nullptr;       // A [items][C] partial maxima of x
  int64_t* pidx = nullptr;    // [items][C] their pixel indices (h * W + w; INT64_MAX: none)
  double* pz = nullptr;       // [items][C] partial sum_p g_d1 * x
  double* pw = nullptr;       // [items][2 * k * k] partial SAB weight gradients
  const void* gavg = nullptr;  // A [N][C] grad of the average pool / (H * W)
  const void* gmax = nullptr;  // A [N][C] grad of the max pool
  const int64_t* gidx = nullptr;  // [N][C] global arg-max pixel
};

using MscamFn = void (*)(const MscamArgs&, int64_t, int64_t);

// the kernels of one storage dtype
struct MscamKernels {
  MscamFn pool, pool_idx;  // items (n, band): psum / pmax (/ pidx)
  MscamFn map, map_idx;    // items (n, band): map (/ camax)
  MscamFn apply;           // items (n, band): y
  MscamFn bwd_gq;          // items (n, band): sa, gq
  MscamFn bwd_gs;          // items (n, band): gs, pz, pw
  MscamFn bwd_gx;          // items (n, band): gx without the max-pool gradient
  MscamFn fixup;           // items n: gx at the global arg-max pixels
};

}  // namespace emcad_cpu
