// Index maps shared by the kernels: channel shuffle, nearest-upsample polyphase taps, bilinear x2 sources.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace emcad {

// floor division for possibly negative numerators (d > 0)
EMCAD_INLINE int floordiv(int a, int d) { return (a >= 0) ? a / d : -((-a + d - 1) / d); }

// ShuffleNet shuffle with g groups over c channels: output o takes input src(o) = (o % g) * (c/g) + o / g.
// A kernel that computes input channel i stores it at dst(i) = (i % n) * g + i / n with n = c / g.
EMCAD_INLINE int64_t shuffle_dst(int64_t i, int64_t c, int64_t g) {
  if (g <= 0) return i;
  const int64_t n = c / g;
  return (i % n) * g + i / n;
}

// Nearest upsampling by an integer factor S followed by a k x k conv (padding p = k/2) equals, for output
// row phase ph (y = S*i + ph), a conv over low-resolution rows i + rb(ph) + r, r in [0, T), whose taps are
// sums of the original taps: original tap dy lands on r = floor((ph + dy - p) / S) - rb(ph).
struct Polyphase {
  int S, k, p;
  EMCAD_HD int rb(int ph) const { return floordiv(ph - p, S); }
  EMCAD_HD int re(int ph) const { return floordiv(ph + k - 1 - p, S); }
  EMCAD_HD int tap(int ph, int d) const { return floordiv(ph + d - p, S) - rb(ph); }
  EMCAD_HD int taps() const {  // T: the largest per-phase tap count
    int t = 0;
    for (int ph = 0; ph < S; ++ph) {
      const int n = re(ph) - rb(ph) + 1;
      t = n > t ? n : t;
    }
    return t;
  }
  EMCAD_HD int pad_lo() const { return -rb(0); }  // rb is non-decreasing in ph
  EMCAD_HD int pad_hi() const {                   // largest low-res offset touched (incl. zero taps up to T)
    const int t = taps();
    int m = 0;
    for (int ph = 0; ph < S; ++ph) {
      const int e = rb(ph) + t - 1;
      m = e > m ? e : m;
    }
    return m;
  }
};

// Bilinear x2, align_corners=False (PyTorch): output o reads inputs i0, i1 with weights l0, l1.
//   o = 2i   -> (max(i-1, 0), i), weights (0.25, 0.75)  [o = 0: (0, 0) with weights (1, 0)]
//   o = 2i+1 -> (i, min(i+1, n-1)), weights (0.75, 0.25)
struct Lerp2 {
  int i0, i1;
  float l0, l1;
};

EMCAD_INLINE Lerp2 bilinear2_src(int o, int n) {
  const int i = o >> 1;
  if ((o & 1) == 0) {
    if (i == 0) return {0, 0, 1.0f, 0.0f};
    return {i - 1, i, 0.25f, 0.75f};
  }
  return {i, i + 1 < n ? i + 1 : n - 1, 0.75f, 0.25f};
}

}  // namespace emcad
