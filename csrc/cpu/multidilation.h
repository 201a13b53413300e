// Interface between the torch bindings of the two multi-dilation ops (lndw.cpp, dwgn.cpp) and their kernels
// (multidilation_impl.h, compiled once per instruction set by isa_<name>.cpp). Torch-free: raw pointers and
// strides.
//
// Both ops split the channels into G groups; group i has its own k_i x k_i depthwise kernel with dilation d_i
// and "same" zero padding d_i * (k_i / 2). Work is split into items (n, group, band of output rows) by the
// bindings from the shape alone; every item writes only its own output rows and its own slots of the partial
// buffers, which the bindings reduce in item order, so results are bitwise reproducible for any thread count.
#pragma once
#include <cstdint>

#include "cpu/kernel_args.h"

namespace emcad_cpu {

struct MdArgs {
  View4 x, y, g, gx;  // input, output, upstream gradient (shape of x), input gradient
  int N = 0, C = 0, H = 0, W = 0, G = 0;
  const int64_t* c0 = nullptr;    // [G + 1] first channel of each group
  const int* ks = nullptr;        // [G] kernel sizes (odd)
  const int* dil = nullptr;       // [G] dilations
  const int64_t* woff = nullptr;  // [G] offset of the group's weights in w (layout [channel][k*k])
  const double* w = nullptr;      // depthwise weights, all groups
  const double* b = nullptr;      // [C] conv biases
  const double* nw = nullptr;     // [C] norm affine weight (LayerNorm of lndw, GroupNorm of dwgn)
  const double* nb = nullptr;     // [C] norm affine bias
  double eps = 0;
  const int32_t* items = nullptr;  // [items][4]: n, group, first row, end row
  const int64_t* poff = nullptr;   // [items] offset of each item's partials in part
  double* part = nullptr;          // per-item partials (layout per kernel, see multidilation_impl.h)
  // dwgn: conv-output scratch [N][C][H][W] of the accumulation type (float; double for fp64), written by the
  // statistics pass and read by the other passes; per (n, group) statistics [N][G] and backward coefficients
  // dz = rstd*gamma*g - ca - cb*zhat
  void* zbuf = nullptr;
  const double* gmean = nullptr;
  const double* grstd = nullptr;
  const double* ca = nullptr;
  const double* cb = nullptr;
};

using MdFn = void (*)(const MdArgs&, int64_t, int64_t);

// the kernels of one storage dtype
struct LndwKernels {
  MdFn fwd;  // y
  MdFn bwd;  // gx; partials [gc][k*k + 3]: weight taps, conv bias, LN weight, LN bias
};

struct DwgnKernels {
  MdFn stats;     // conv outputs into zbuf; partials [3]: count, mean, M2 of the item's conv outputs
  MdFn apply;     // y from zbuf
  MdFn bwd_sums;  // partials [gc][2]: sum(g), sum(g*zhat)
  MdFn bwd_grad;  // gx; partials [gc][k*k + 1]: weight taps, conv bias
};

}  // namespace emcad_cpu
