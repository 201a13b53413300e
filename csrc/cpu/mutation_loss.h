// Interface between the torch binding of the fused MUTATION loss statistics (mutation_loss.cpp) and its row
// kernels (mutation_loss_impl.h, compiled once per instruction set by isa_<name>.cpp). Torch-free: raw pointers
// and strides. T below is the compute type: float (double for float64 logits).
#pragma once
#include <cstdint>

#include "cpu/kernel_args.h"

namespace emcad_cpu {

constexpr int kMlMaxHeads = 4;

// one head's logits (B, K, h, w) and its bilinear tables to the target size (H, W)
struct MlHead {
  const void* data = nullptr;
  int64_t h = 0, w = 0, sn = 0, sc = 0, sh = 0, sw = 0;
  const int64_t* y0 = nullptr;
  const int64_t* y1 = nullptr;
  const void* ly = nullptr;  // T[H]
  const int64_t* x0 = nullptr;
  const int64_t* x1 = nullptr;
  const void* lx = nullptr;  // T[W]
  // backward
  void* hbuf = nullptr;  // T[B*H][K][w]
  const int64_t* inv_start = nullptr;  // [h + 1]
  const int64_t* inv_y = nullptr;
  const void* inv_w = nullptr;  // T
  void* grad = nullptr;
  int64_t g_sn = 0, g_sc = 0, g_sh = 0, g_sw = 0;
};

struct MlArgs {
  int n = 0;
  int64_t K = 0, B = 0, H = 0, W = 0, nsub = 0;
  int masks[15] = {};
  MlHead head[kMlMaxHeads];
  const int64_t* target = nullptr;
  int64_t t_sn = 0, t_sh = 0, t_sw = 0;
  const void* g_ce = nullptr;
  const void* g_inter = nullptr;
  const void* g_psq = nullptr;
};

// the kernels of one logits dtype; the row kernels return false if a target value is out of range
struct MlKernels {
  bool (*fwd)(const MlArgs&, int64_t r0, int64_t r1, double* partial);  // rows [r0, r1): partial sums
  bool (*bwd)(const MlArgs&, int64_t r0, int64_t r1);                   // rows [r0, r1): hbuf of every head
  void (*gather)(const MlArgs&, int head, int64_t q0, int64_t q1);      // source rows [q0, q1) of one head
};

}  // namespace emcad_cpu
