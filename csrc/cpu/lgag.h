// Interface between the torch binding of grouped_attention_gate (lgag.cpp) and its kernels (lgag_impl.h, compiled once
// per instruction set by isa_<name>.cpp). Torch-free: raw pointers and strides.
#pragma once
#include <cstdint>

#include "cpu/kernel_args.h"

namespace emcad_cpu {

// Lanes are the F_int output channels of the grouped convs; lane o reads slot j of
// its group, input channel (o / og) * J + j (og = F_int / groups outputs per group, J = inputs per group).
// Two item kinds: "row items" (n, band of rows; all channels, needed for the psi reduction) and
// "block items" (n, lane block; whole image). Blocks hold whole groups (lanes_per_block = (CB / og) * og).
struct LgagArgs {
  View4 g, x, out, grad, gg, gx;
  int Fg = 0, Fl = 0, Fi = 0, groups = 1, k = 3, H = 0, W = 0;
  int og = 1, jg = 1, jx = 1;
  int act = 0;
  int add_gate = 0;
  int band = 8;          // rows per row item
  int block_lanes = 16;  // lanes per block (whole groups)
  int group = 1;         // blocks per block item
  const double* wg = nullptr;  // [Fi][jg][k*k]
  const double* wx = nullptr;  // [Fi][jx][k*k]
  const double* bg = nullptr;  // [Fi] conv biases
  const double* bx = nullptr;
  const double* wpsi = nullptr;  // [Fi]
  double bpsi = 0;
  // BN of the two grouped convs on z = conv + bias: a = z*s + t; backward zhat = (z - mean)*rstd and
  // dz = s*du + c2*zhat + c3 (c2/c3 null in eval mode)
  const double *sg = nullptr, *tg = nullptr, *mg = nullptr, *rg = nullptr, *c2g = nullptr, *c3g = nullptr;
  const double *sx = nullptr, *tx = nullptr, *mx = nullptr, *rx = nullptr, *c2x = nullptr, *c3x = nullptr;
  // BN(1) of psi on p = wpsi . h + bpsi: ap = p*sp + tp; backward phat = (p - mp)*rp
  double sp = 1, tp = 0, mp = 0, rp = 1;
  // psi backward coefficients: dp = cp1*dap + cp2*phat + cp3
  double cp1 = 1, cp2 = 0, cp3 = 0;
  // per-pixel scratch [N][H][W] (double): p (psi logits before BN) and dap (dL/d ap)
  double* pbuf = nullptr;
  double* dbuf = nullptr;
  // partials
  double* sg0 = nullptr;  // block items: [N][Fi] stats of z_g (mean, M2) / backward sums
  double* sg1 = nullptr;
  double* sx0 = nullptr;
  double* sx1 = nullptr;
  double* su = nullptr;    // backward: [N][Fi] sum(du), sum(du*zhat_g), sum(du*zhat_x), sum(dp*h)
  double* sug = nullptr;
  double* sux = nullptr;
  double* sph = nullptr;
  double* sp0 = nullptr;   // row items: [N][nbands] psi stats (count, mean, M2) or backward sums
  double* sp1 = nullptr;
  double* sp2 = nullptr;
  double* wgpart = nullptr;  // block items: [N][Fi][jg][k*k]
  double* wxpart = nullptr;  // [N][Fi][jx][k*k]
  double* bgpart = nullptr;  // [N][Fi] sum(dz_g)
  double* bxpart = nullptr;
  double* dpsum = nullptr;   // [N] sum(dp) (bias grad of psi), from block 0
};

using LgagFn = void (*)(const LgagArgs&, int64_t, int64_t);

// the kernels of one storage dtype
struct LgagKernels {
  LgagFn stats;       // block items: batch statistics of z_g, z_x
  LgagFn psi;         // row items: p into pbuf (+ psi statistics)
  LgagFn apply;       // row items: out (eval: everything from scratch in one pass; train: from pbuf)
  LgagFn bwd_psi;     // row items: dap, p into dbuf/pbuf and their sums
  LgagFn bwd_reduce;  // block items: sums for the grouped-conv BN backward and the psi weights
  LgagFn bwd_grad;    // block items: input and weight gradients
};

}  // namespace emcad_cpu
