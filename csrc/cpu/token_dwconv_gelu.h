// Interface between the torch binding of token_dwconv_gelu (token_dwconv_gelu.cpp) and its kernels
// (token_dwconv_gelu_impl.h, compiled once per instruction set by isa_<name>.cpp). Torch-free: raw pointers into
// dense tensors.
//
// Layout: x, y, g, gx are contiguous tokens (N, H*W, C): element (n, c) of pixel (h, w) at ((n*H + h)*W + w)*C + c,
// i.e. an NHWC map. Weights and partials use the accumulation type A (float; double for fp64 storage).
#pragma once
#include <cstdint>

namespace emcad_cpu {

struct TdgArgs {
  const void* x = nullptr;
  void* y = nullptr;          // forward output
  const void* g = nullptr;    // upstream gradient
  void* gx = nullptr;
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t band = 1;           // rows per item
  int64_t nbands = 1;         // items per image: item = n * nbands + band index
  const void* w = nullptr;    // A [9][C]: tap-major (tap = 3 * i + j), channels contiguous
  const void* bias = nullptr; // A [C]
  double* part = nullptr;     // [items][10][C]: per item sum of dz * x(q + o_tap) for the 9 taps, then sum of dz
};

using TdgFn = void (*)(const TdgArgs&, int64_t, int64_t);

// the kernels of one storage dtype
struct TdgKernels {
  TdgFn fwd;  // items (n, band): y
  TdgFn bwd;  // items (n, band): gx and the partial rows
};

}  // namespace emcad_cpu
