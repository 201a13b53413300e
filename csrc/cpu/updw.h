// Interface between the torch binding of upsample_dwconv (updw.cpp) and its kernels (updw_impl.h, compiled once
// per instruction set by isa_<name>.cpp). Torch-free: raw pointers and strides.
#pragma once
#include <cstdint>

#include "cpu/kernel_args.h"

namespace emcad_cpu {

// Items: (n, group of `group` channel blocks).
struct UpdwArgs {
  View4 x, y, g, gx;
  int C = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int group = 1;
  int k = 3, S = 2;
  int bilinear = 0;
  int act = 0;
  const double* w = nullptr;  // [C][k*k]
  const double* scale = nullptr;  // [C], as for MSDC
  const double* shift = nullptr;
  const double* mean = nullptr;
  const double* rstd = nullptr;
  const double* c2 = nullptr;
  const double* c3 = nullptr;
  double* p0 = nullptr;  // [N][C]
  double* p1 = nullptr;
  double* wpart = nullptr;  // [N][C][k*k]
  int bn_partials = 0;
};

using UpdwFn = void (*)(const UpdwArgs&, int64_t, int64_t);

// the kernels of one storage dtype (the passes of MsdcKernels, msdc.h)
struct UpdwKernels {
  UpdwFn stats, apply, bwd_reduce, bwd_grad;
};

}  // namespace emcad_cpu
