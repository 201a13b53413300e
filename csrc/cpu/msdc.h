// Interface between the torch binding of multi_scale_dwconv (msdc.cpp) and its kernels (msdc_impl.h, compiled once
// per instruction set by isa_<name>.cpp). Torch-free: raw pointers and strides.
#pragma once
#include <cstdint>

#include "cpu/kernel_args.h"

namespace emcad_cpu {

// Items: (n, group of `group` channel blocks), item = n * ngroups + group index.
struct MsdcArgs {
  View4 x, y, g, gx;  // input, output, upstream gradient (shape of y), input gradient
  int C = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int group = 1;  // channel blocks per item (a function of the shape only)
  int nb = 0;
  int ks[kMaxBranches] = {};
  int stride = 1;
  int concat = 0;
  int64_t shuffle_groups = 0;  // 0: no shuffle
  int act = 0;
  const double* w = nullptr;  // weights of branch b at w + woff[b], layout [C][k*k]
  int64_t woff[kMaxBranches] = {};
  // per [nb][C]: the BN affine a = z*scale + shift; backward also zhat = (z - mean)*rstd and the training
  // coefficients dz = scale*ga + c2*zhat + c3 (c2, c3 null in eval mode)
  const double* scale = nullptr;
  const double* shift = nullptr;
  const double* mean = nullptr;
  const double* rstd = nullptr;
  const double* c2 = nullptr;
  const double* c3 = nullptr;
  double* p0 = nullptr;  // [N][nb][C] partials: stats pass mean, backward sum(ga)
  double* p1 = nullptr;  // stats pass M2, backward sum(ga*zhat)
  double* wpart = nullptr;  // [N][C][taps_total] weight-gradient partials; branch b taps at toff[b]
  int64_t toff[kMaxBranches] = {};
  int64_t taps_total = 0;
  int bn_partials = 0;  // backward gradient pass also produces p0/p1 (eval mode: one pass)
};

using MsdcFn = void (*)(const MsdcArgs&, int64_t, int64_t);

// the kernels of one storage dtype
struct MsdcKernels {
  MsdcFn stats;       // training forward: BN statistics partials (p0, p1)
  MsdcFn apply;       // y
  MsdcFn bwd_reduce;  // training backward: BN-backward sums (p0, p1)
  MsdcFn bwd_grad;    // gx and weight-gradient partials (eval: also p0, p1 when bn_partials)
};

}  // namespace emcad_cpu
