// Interface between the torch bindings (msdc.cpp, updw.cpp, lgag.cpp) and the per-ISA kernel builds
// (isa_*.cpp, which compile kernels_impl.h once per instruction set). Torch-free: raw pointers and strides.
//
// Work is split into *items* whose partition depends only on the problem shape (never on the thread count):
// every item writes its own slots of the partial-result buffers and the bindings reduce those in a fixed
// order, so all reductions are bitwise reproducible.
#pragma once
#include <cstdint>

namespace emcad_cpu {

constexpr int kMaxBranches = 8;
constexpr int kMaxKernel = 9;

enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2 };

// lanes (channels) per vector block: 64 bytes of the accumulation type
inline int block_lanes(int dtype) { return dtype == kF64 ? 8 : 16; }

// Channel blocks per item: as many as keep at least `kMinItems` items (N times groups), so that every pixel
// line of a channels_last tensor is consumed while it is in cache. A function of the shape only.
constexpr int64_t kMinItems = 16;
constexpr int64_t kMaxGroup = 64;
inline int blocks_per_item(int64_t n, int64_t nblocks) {
  if (nblocks <= 1 || n <= 0) return 1;
  int64_t g = (n * nblocks) / kMinItems;
  if (g < 1) g = 1;
  if (g > nblocks) g = nblocks;
  if (g > kMaxGroup) g = kMaxGroup;
  return (int)g;
}

// A 4-D strided tensor (N, C, H, W); strides in elements. Any strides are accepted (also overlapping ones).
struct View4 {
  void* data = nullptr;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
};

// ---------------------------------------------------------------------------------------------------------
// multi_scale_dwconv. Items: (n, group of `group` channel blocks), item = n * ngroups + group index.
// ---------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------
// upsample_dwconv. Items: (n, group of `group` channel blocks).
// ---------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------
// grouped_attention_gate. Lanes are the F_int output channels of the grouped convs; lane o reads slot j of
// its group, input channel (o / og) * J + j (og = F_int / groups outputs per group, J = inputs per group).
// Two item kinds: "row items" (n, band of rows; all channels, needed for the psi reduction) and
// "block items" (n, lane block; whole image). Blocks hold whole groups (lanes_per_block = (CB / og) * og).
// ---------------------------------------------------------------------------------------------------------
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

using MsdcFn = void (*)(const MsdcArgs&, int64_t, int64_t);
using UpdwFn = void (*)(const UpdwArgs&, int64_t, int64_t);
using LgagFn = void (*)(const LgagArgs&, int64_t, int64_t);

// One entry per dtype (kF32, kF64, kBF16).
struct KernelTable {
  const char* name;
  MsdcFn msdc_stats[3], msdc_apply[3], msdc_bwd_reduce[3], msdc_bwd_grad[3];
  UpdwFn updw_stats[3], updw_apply[3], updw_bwd_reduce[3], updw_bwd_grad[3];
  LgagFn lgag_stats[3];     // block items: batch statistics of z_g, z_x
  LgagFn lgag_psi[3];       // row items: p into pbuf (+ psi statistics)
  LgagFn lgag_apply[3];     // row items: out (eval: everything from scratch in one pass; train: from pbuf)
  LgagFn lgag_bwd_psi[3];   // row items: dap, p into dbuf/pbuf and their sums
  LgagFn lgag_bwd_reduce[3];  // block items: sums for the grouped-conv BN backward and the psi weights
  LgagFn lgag_bwd_grad[3];  // block items: input and weight gradients
};

namespace isa_default { const KernelTable& table(); }
namespace isa_avx2 { const KernelTable& table(); }
namespace isa_avx512 { const KernelTable& table(); }

// The table for the best instruction set this CPU supports (override: EMCAD_CPU_ISA=default|avx2|avx512).
const KernelTable& active_table();
// Select by name ("auto", "default", "avx2", "avx512"); returns false if the CPU lacks it.
bool set_active_isa(const char* name);

}  // namespace emcad_cpu
