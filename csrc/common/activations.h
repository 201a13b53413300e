// The CPU kernels' activations by code (common/codes.h; gelu is not among them), forward and backward, with
// PyTorch's conventions at the kinks:
//   relu'(a) = [a > 0], relu6'(a) = [0 < a < 6] (hardtanh_backward), leakyrelu slope EMCAD_LEAKY_SLOPE,
//   hardswish'(a) = 0 for a < -3, a/3 + 1/2 for -3 <= a <= 3, 1 above (aten hardswish_backward).
// NaN propagates through the forward like in PyTorch.
#pragma once
#include "common/codes.h"
#include "common/macros.h"

namespace emcad {

template <int ACT, typename T>
EMCAD_INLINE T act_fwd(T v) {
  if (ACT == EMCAD_ACT_RELU) return v < T(0) ? T(0) : v;
  if (ACT == EMCAD_ACT_RELU6) return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
  if (ACT == EMCAD_ACT_LEAKYRELU) return v > T(0) ? v : v * T(EMCAD_LEAKY_SLOPE);
  if (ACT == EMCAD_ACT_HSWISH) {
    T r = v + T(3);
    r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r);
    return v * r / T(6);
  }
  return v;
}

// gradient w.r.t. the activation input a, given the upstream gradient g
template <int ACT, typename T>
EMCAD_INLINE T act_bwd(T a, T g) {
  if (ACT == EMCAD_ACT_RELU) return a > T(0) ? g : T(0);
  if (ACT == EMCAD_ACT_RELU6) return (a > T(0) && a < T(6)) ? g : T(0);
  if (ACT == EMCAD_ACT_LEAKYRELU) return a > T(0) ? g : g * T(EMCAD_LEAKY_SLOPE);
  if (ACT == EMCAD_ACT_HSWISH) return a < T(-3) ? T(0) : (a <= T(3) ? g * (a / T(3) + T(0.5)) : g);
  return g;
}

}  // namespace emcad
