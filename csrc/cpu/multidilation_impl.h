// CPU kernels of the two multi-dilation ops: layernorm_dilated_dwconv (EGE-UNet GAB, GHPA norm2 + ldw.0) and
// dilated_dwconv_groupnorm (MALUNet DGA, GAU). Compiled once per instruction set inside namespace
// emcad_cpu::isa_<name> (isa_target.h). Interface and item partition: cpu/multidilation.h; torch bindings:
// cpu/lndw.cpp, cpu/dwgn.cpp. No torch headers.
//
// Design:
// * An item (n, group, output rows [h0, h1)) loads its rows plus the dilation halo into thread-local *planar*
//   buffers [channel][row][column] with zero padding columns, so every stencil tap is a unit-stride,
//   branch-free loop along W. Planar (vectorised along W) rather than the channel-block layout of
//   stencil_common.h because these groups are thin (5 to 25 channels, often not a multiple of 8) while rows are
//   8 to 256 pixels wide. Any input layout/strides (NCHW, channels_last, ...) is converted on load and store.
// * lndw: the LayerNorm runs on the item's rows (halo included) just before the conv, so the normalised map
//   is never written to memory; halo rows are normalised twice (by two neighbouring items), which is cheaper
//   than a separate pass. Backward recomputes it from x.
// * dwgn: GroupNorm needs statistics over the whole (n, group) before anything can be written. The statistics
//   pass computes the conv once and keeps it in a planar scratch tensor of the accumulation type ([N][C][H][W]
//   fp32, fp64 for fp64; allocated per call, so bf16 loses nothing), which the apply pass and both backward
//   passes read instead of recomputing the conv: on a CPU a read of one float is cheaper than the 9 (3x3) or
//   25 (GAU's 5x5) FMAs plus the halo loads of a recomputation, and the scratch of these small maps stays in
//   L2. Backward: statistics pass, a pass for the two GN-backward sums, then one pass for grad x / weights.
// * Sums (weight gradients, norm statistics) accumulate per row in the accumulation type, then per item in
//   double, into the item's own partial slots; the bindings reduce them in item order (no atomics).
#pragma once
#include "cpu/stencil_common.h"  // Scratch, load_val / store_val

namespace md {

template <typename T>
inline T* ensure(Scratch<T>& s, size_t count) {
  if (s.n < count) s.alloc(count);
  return s.get();
}

// Loads channels [c0, c0 + gc) of image rows [r0, r0 + R) of image n into buf[(c*R + r)*Wp + pad + w];
// rows outside the image and the pad columns on either side are zero.
template <typename S, typename A>
void load_tile(const View4& v, int64_t n, int64_t c0, int gc, int64_t r0, int R, int pad, int Wp, A* buf) {
  const int64_t H = v.h, W = v.w;
  for (int c = 0; c < gc; ++c)
    for (int r = 0; r < R; ++r) {
      A* d = buf + ((int64_t)c * R + r) * Wp;
      const int64_t h = r0 + r;
      if (h < 0 || h >= H) {
        std::memset(d, 0, sizeof(A) * Wp);
      } else {
        std::memset(d, 0, sizeof(A) * pad);
        std::memset(d + pad + W, 0, sizeof(A) * (Wp - pad - W));
      }
    }
  const int rlo = (int)std::max<int64_t>(0, -r0), rhi = (int)std::min<int64_t>(R, H - r0);
  if (rlo >= rhi || W == 0) return;
  const S* base = static_cast<const S*>(v.data) + n * v.sn + c0 * v.sc;
  if (v.sw == 1) {  // NCHW-like: rows are contiguous
    for (int c = 0; c < gc; ++c)
      for (int r = rlo; r < rhi; ++r) {
        const S* s = base + c * v.sc + (r0 + r) * v.sh;
        A* d = buf + ((int64_t)c * R + r) * Wp + pad;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) d[w] = load_val(s + w);
      }
  } else {  // channels_last-like (or other strides): pixel-major for locality
    for (int r = rlo; r < rhi; ++r) {
      const S* s = base + (r0 + r) * v.sh;
      A* d = buf + (int64_t)r * Wp + pad;
      const int64_t cs = (int64_t)R * Wp;
      for (int64_t w = 0; w < W; ++w)
        for (int c = 0; c < gc; ++c) d[c * cs + w] = load_val(s + w * v.sw + c * v.sc);
    }
  }
}

// Stores buf[(c*rows + r)*W + w] to channels [c0, c0 + gc), rows [h0, h0 + rows) of image n.
template <typename S, typename A>
void store_tile(const View4& v, int64_t n, int64_t c0, int gc, int64_t h0, int rows, const A* buf) {
  const int64_t W = v.w;
  if (W == 0) return;
  S* base = static_cast<S*>(v.data) + n * v.sn + c0 * v.sc;
  if (v.sw == 1) {
    for (int c = 0; c < gc; ++c)
      for (int r = 0; r < rows; ++r) {
        S* d = base + c * v.sc + (h0 + r) * v.sh;
        const A* s = buf + ((int64_t)c * rows + r) * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) store_val(d + w, s[w]);
      }
  } else {
    const int64_t cs = (int64_t)rows * W;
    for (int r = 0; r < rows; ++r) {
      S* d = base + (h0 + r) * v.sh;
      const A* s = buf + (int64_t)r * W;
      for (int64_t w = 0; w < W; ++w)
        for (int c = 0; c < gc; ++c) store_val(d + w * v.sw + c * v.sc, s[c * cs + w]);
    }
  }
}

// out[w] = bias + sum_{i,j} wt[i*k + j] * src[i*d*Wp + j*d + w], w in [0, W): one output row of a dilated
// k x k conv whose window for w = 0 starts at src. Three taps per sweep keep the loads/stores of `out` low.
// K = 3, 5 (all the models use): every tap in one sweep, accumulated in registers.
template <int K, typename A>
inline void conv_row_k(const A* src, int64_t Wp, const A* wt, int d, int W, A bias, A* __restrict__ out) {
  A wr[K * K];
  const A* sr[K * K];
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) {
      wr[i * K + j] = wt[i * K + j];
      sr[i * K + j] = src + (int64_t)i * d * Wp + j * d;
    }
#pragma omp simd
  for (int w = 0; w < W; ++w) {
    A acc = bias;
#pragma GCC unroll 25
    for (int t = 0; t < K * K; ++t) acc += wr[t] * sr[t][w];
    out[w] = acc;
  }
}

template <typename A>
inline void conv_row(const A* src, int64_t Wp, const A* wt, int k, int d, int W, A bias, A* __restrict__ out) {
  if (k == 3) return conv_row_k<3>(src, Wp, wt, d, W, bias, out);
  if (k == 5) return conv_row_k<5>(src, Wp, wt, d, W, bias, out);
#pragma omp simd
  for (int w = 0; w < W; ++w) out[w] = bias;
  for (int i = 0; i < k; ++i) {
    const A* s = src + (int64_t)i * d * Wp;
    int j = 0;
    for (; j + 3 <= k; j += 3) {
      const A w0 = wt[i * k + j], w1 = wt[i * k + j + 1], w2 = wt[i * k + j + 2];
      const A* s0 = s + j * d;
      const A* s1 = s0 + d;
      const A* s2 = s1 + d;
#pragma omp simd
      for (int w = 0; w < W; ++w) out[w] += w0 * s0[w] + w1 * s1[w] + w2 * s2[w];
    }
    for (; j < k; ++j) {
      const A w0 = wt[i * k + j];
      const A* s0 = s + j * d;
#pragma omp simd
      for (int w = 0; w < W; ++w) out[w] += w0 * s0[w];
    }
  }
}

// acc[i*k + j] += sum_w g[w] * src[i*d*Wp + j*d + w]: weight-gradient taps of one output row (row sum in A).
template <typename A>
inline void wgrad_row(const A* src, int64_t Wp, const A* __restrict__ g, int k, int d, int W, double* acc) {
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      const A* s = src + (int64_t)i * d * Wp + j * d;
      A t = A(0);
#pragma omp simd reduction(+ : t)
      for (int w = 0; w < W; ++w) t += g[w] * s[w];
      acc[i * k + j] += (double)t;
    }
}

template <typename A>
inline A row_sum(const A* p, int W) {
  A t = A(0);
#pragma omp simd reduction(+ : t)
  for (int w = 0; w < W; ++w) t += p[w];
  return t;
}

// Short rows (fewer than kFlatBelow pixels, e.g. the 8x8 and 16x16 maps of the deep stages): the conv of all
// `rows` output rows of a channel runs as one flat sweep over (rows - 1) * Wp + W positions of the padded tile;
// the outputs at pad columns are junk and dropped. That pays the per-call / loop-setup cost once per channel
// instead of once per row.
constexpr int kFlatBelow = 32;

// out[r*W + w] for r < rows: the conv of the tile whose output row 0 window starts at src (row stride Wp).
// tmp: scratch of (rows - 1) * Wp + W elements, used for short rows.
template <typename A>
inline void conv_rows(const A* src, int64_t Wp, const A* wt, int k, int d, int W, int rows, A bias, A* out, A* tmp) {
  if (W >= kFlatBelow || rows <= 1) {
    for (int r = 0; r < rows; ++r) conv_row(src + (int64_t)r * Wp, Wp, wt, k, d, W, bias, out + (int64_t)r * W);
    return;
  }
  conv_row(src, Wp, wt, k, d, (int)((rows - 1) * Wp + W), bias, tmp);
  for (int r = 0; r < rows; ++r) std::memcpy(out + (int64_t)r * W, tmp + (int64_t)r * Wp, sizeof(A) * W);
}

// Weight-gradient taps (and the sum of g in acc[k*k]) of `rows` output rows; g has row stride Wp and *zero pad
// columns*, so short rows can be swept flat (the pad positions contribute nothing).
template <typename A>
inline void wgrad_rows(const A* src, int64_t Wp, const A* g, int k, int d, int W, int rows, double* acc) {
  const int kk = k * k;
  if (W >= kFlatBelow || rows <= 1) {
    for (int r = 0; r < rows; ++r) {
      wgrad_row(src + (int64_t)r * Wp, Wp, g + (int64_t)r * Wp, k, d, W, acc);
      acc[kk] += (double)row_sum(g + (int64_t)r * Wp, W);
    }
    return;
  }
  const int L = (int)((rows - 1) * Wp + W);
  wgrad_row(src, Wp, g, k, d, L, acc);
  acc[kk] += (double)row_sum(g, L);
}


// The group's weights of channel c in A, as is (wt) and flipped (wf, for the transposed conv).
template <typename A>
inline void group_weights(const MdArgs& a, int gi, int c, A* wt, A* wf) {
  const int k = a.ks[gi], kk = k * k;
  const double* src = a.w + a.woff[gi] + (int64_t)c * kk;
  for (int t = 0; t < kk; ++t) {
    wt[t] = (A)src[t];
    if (wf) wf[kk - 1 - t] = (A)src[t];
  }
}

// Channels-first LayerNorm statistics of one row: x points at channel 0 (channel stride cs); biased variance.
template <typename A>
inline void ln_row_stats(const A* x, int64_t cs, int gc, int W, A eps, A* __restrict__ mu, A* __restrict__ rs) {
  const A inv = A(1) / A(gc);
#pragma omp simd
  for (int w = 0; w < W; ++w) mu[w] = rs[w] = A(0);
  for (int c = 0; c < gc; ++c) {
    const A* xc = x + c * cs;
#pragma omp simd
    for (int w = 0; w < W; ++w) mu[w] += xc[w];
  }
#pragma omp simd
  for (int w = 0; w < W; ++w) mu[w] *= inv;
  for (int c = 0; c < gc; ++c) {
    const A* xc = x + c * cs;
#pragma omp simd
    for (int w = 0; w < W; ++w) {
      const A t = xc[w] - mu[w];
      rs[w] += t * t;
    }
  }
#pragma omp simd
  for (int w = 0; w < W; ++w) rs[w] = A(1) / std::sqrt(rs[w] * inv + eps);
}

struct Item {
  int64_t n, c0;
  int gi, gc, k, d, hal, h0, rows;
};

inline Item item_of(const MdArgs& a, int64_t it) {
  const int32_t* p = a.items + 4 * it;
  Item m;
  m.n = p[0];
  m.gi = p[1];
  m.h0 = p[2];
  m.rows = p[3] - p[2];
  m.c0 = a.c0[m.gi];
  m.gc = (int)(a.c0[m.gi + 1] - m.c0);
  m.k = a.ks[m.gi];
  m.d = a.dil[m.gi];
  m.hal = m.d * (m.k / 2);
  return m;
}

// ======================================================================================================
// layernorm_dilated_dwconv
// ======================================================================================================
template <typename S>
void lndw_fwd(const MdArgs& a, int64_t i0, int64_t i1) {
  using A = typename emcad::AccType<S>::type;
  Scratch<A> xs, ys, st, ts;
  A wt[kMaxKernel * kMaxKernel];
  const int W = a.W;
  for (int64_t it = i0; it < i1; ++it) {
    const Item m = item_of(a, it);
    const int R = m.rows + 2 * m.hal, Wp = W + 2 * m.hal;
    const int64_t cs = (int64_t)R * Wp;
    A* X = ensure(xs, (size_t)m.gc * cs);
    A* Y = ensure(ys, (size_t)m.gc * m.rows * W);
    A* mu = ensure(st, (size_t)2 * W);
    A* rs = mu + W;
    load_tile<S, A>(a.x, m.n, m.c0, m.gc, m.h0 - m.hal, R, m.hal, Wp, X);
    // normalise the rows inside the image in place (the zero padding stands for the normalised map)
    const int rlo = std::max(0, m.hal - m.h0), rhi = std::min(R, a.H - m.h0 + m.hal);
    for (int r = rlo; r < rhi; ++r) {
      A* xr = X + (int64_t)r * Wp + m.hal;
      ln_row_stats(xr, cs, m.gc, W, (A)a.eps, mu, rs);
      for (int c = 0; c < m.gc; ++c) {
        const A lw = (A)a.nw[m.c0 + c], lb = (A)a.nb[m.c0 + c];
        A* xc = xr + c * cs;
#pragma omp simd
        for (int w = 0; w < W; ++w) xc[w] = (xc[w] - mu[w]) * rs[w] * lw + lb;
      }
    }
    A* T = ensure(ts, (size_t)m.rows * Wp);
    for (int c = 0; c < m.gc; ++c) {
      group_weights<A>(a, m.gi, c, wt, nullptr);
      conv_rows(X + c * cs, Wp, wt, m.k, m.d, W, m.rows, (A)a.b[m.c0 + c], Y + (int64_t)c * m.rows * W, T);
    }
    store_tile<S, A>(a.y, m.n, m.c0, m.gc, m.h0, m.rows, Y);
  }
}

// Partials per item: [gc][k*k + 3] = weight taps, conv bias, LN weight, LN bias.
template <typename S>
void lndw_bwd(const MdArgs& a, int64_t i0, int64_t i1) {
  using A = typename emcad::AccType<S>::type;
  Scratch<A> xs, zs, gys, gzs, gxs, st, wfs;
  const int W = a.W;
  for (int64_t it = i0; it < i1; ++it) {
    const Item m = item_of(a, it);
    const int R = m.rows + 2 * m.hal, Wp = W + 2 * m.hal, kk = m.k * m.k, pw = kk + 3;
    const int64_t cs = (int64_t)R * Wp;
    A* X = ensure(xs, (size_t)m.gc * cs);   // x, then xhat (normalised, before the affine)
    A* Z = ensure(zs, (size_t)m.gc * cs);   // LN output (conv input), zero padded
    A* GY = ensure(gys, (size_t)m.gc * cs);  // upstream gradient, zero padded
    A* GZ = ensure(gzs, (size_t)m.gc * W);   // grad of the LN output, one row
    A* GX = ensure(gxs, (size_t)m.gc * m.rows * W);
    A* RS = ensure(st, (size_t)(R + 3) * W);  // per-pixel rstd of every tile row, then mu, a1, a2 scratch
    A* mu = RS + (size_t)R * W;
    A* a1 = mu + W;
    A* a2 = a1 + W;
    double* P = a.part + a.poff[it];
    load_tile<S, A>(a.x, m.n, m.c0, m.gc, m.h0 - m.hal, R, m.hal, Wp, X);
    load_tile<S, A>(a.g, m.n, m.c0, m.gc, m.h0 - m.hal, R, m.hal, Wp, GY);
    std::memset(Z, 0, sizeof(A) * m.gc * cs);
    const int rlo = std::max(0, m.hal - m.h0), rhi = std::min(R, a.H - m.h0 + m.hal);
    for (int r = rlo; r < rhi; ++r) {
      A* xr = X + (int64_t)r * Wp + m.hal;
      A* rs = RS + (int64_t)r * W;
      ln_row_stats(xr, cs, m.gc, W, (A)a.eps, mu, rs);
      for (int c = 0; c < m.gc; ++c) {
        const A lw = (A)a.nw[m.c0 + c], lb = (A)a.nb[m.c0 + c];
        A* xc = xr + c * cs;
        A* zc = Z + c * cs + (int64_t)r * Wp + m.hal;
#pragma omp simd
        for (int w = 0; w < W; ++w) {
          const A xh = (xc[w] - mu[w]) * rs[w];
          xc[w] = xh;
          zc[w] = xh * lw + lb;
        }
      }
    }
    // conv weight / bias gradients of the item's output rows
    for (int c = 0; c < m.gc; ++c)
      wgrad_rows(Z + c * cs, Wp, GY + c * cs + (int64_t)m.hal * Wp + m.hal, m.k, m.d, W, m.rows, P + (int64_t)c * pw);
    // grad of the LN output (transposed conv = conv with the flipped kernel), then the LN backward per pixel
    A* WF = ensure(wfs, (size_t)m.gc * kk);
    for (int c = 0; c < m.gc; ++c) {
      A unused[kMaxKernel * kMaxKernel];
      group_weights<A>(a, m.gi, c, unused, WF + (int64_t)c * kk);
    }
    const A inv = A(1) / A(m.gc);
    for (int r = 0; r < m.rows; ++r) {
      for (int c = 0; c < m.gc; ++c)
        conv_row(GY + c * cs + (int64_t)r * Wp, Wp, WF + (int64_t)c * kk, m.k, m.d, W, A(0), GZ + (int64_t)c * W);
#pragma omp simd
      for (int w = 0; w < W; ++w) a1[w] = a2[w] = A(0);
      for (int c = 0; c < m.gc; ++c) {
        const A lw = (A)a.nw[m.c0 + c];
        const A* gz = GZ + (int64_t)c * W;
        const A* xh = X + c * cs + (int64_t)(r + m.hal) * Wp + m.hal;
        A sb = A(0), sw = A(0);
#pragma omp simd reduction(+ : sb, sw)
        for (int w = 0; w < W; ++w) {
          const A gzh = gz[w] * lw;
          sb += gz[w];
          sw += gz[w] * xh[w];
          a1[w] += gzh;
          a2[w] += gzh * xh[w];
        }
        P[(int64_t)c * pw + kk + 1] += (double)sw;
        P[(int64_t)c * pw + kk + 2] += (double)sb;
      }
      const A* rs = RS + (int64_t)(r + m.hal) * W;
      for (int c = 0; c < m.gc; ++c) {
        const A lw = (A)a.nw[m.c0 + c];
        const A* gz = GZ + (int64_t)c * W;
        const A* xh = X + c * cs + (int64_t)(r + m.hal) * Wp + m.hal;
        A* gx = GX + ((int64_t)c * m.rows + r) * W;
#pragma omp simd
        for (int w = 0; w < W; ++w) gx[w] = rs[w] * (gz[w] * lw - a1[w] * inv - xh[w] * (a2[w] * inv));
      }
    }
    store_tile<S, A>(a.gx, m.n, m.c0, m.gc, m.h0, m.rows, GX);
  }
}

// ======================================================================================================
// dilated_dwconv_groupnorm
// ======================================================================================================
// The item's rows of channel c in the conv-output scratch (planar [N][C][H][W], accumulation type).
template <typename A>
inline A* zrows(const MdArgs& a, int64_t n, int64_t c, int64_t h) {
  return static_cast<A*>(a.zbuf) + ((n * a.C + c) * a.H + h) * a.W;
}

// Conv outputs (bias included) of the item's rows into the scratch; partials per item: count, mean, M2 (two-pass
// within the item, Chan merge across items by the binding).
template <typename S>
void dwgn_stats(const MdArgs& a, int64_t i0, int64_t i1) {
  using A = typename emcad::AccType<S>::type;
  Scratch<A> xs, ts;
  A wt[kMaxKernel * kMaxKernel];
  const int W = a.W;
  for (int64_t it = i0; it < i1; ++it) {
    const Item m = item_of(a, it);
    const int R = m.rows + 2 * m.hal, Wp = W + 2 * m.hal;
    const int64_t cs = (int64_t)R * Wp, plane = (int64_t)m.rows * W;
    // sums run per row in A (then double); short rows: per channel plane, for the same reason as conv_rows
    const int64_t seg = W >= kFlatBelow ? W : plane;
    A* X = ensure(xs, (size_t)m.gc * cs);
    load_tile<S, A>(a.x, m.n, m.c0, m.gc, m.h0 - m.hal, R, m.hal, Wp, X);
    A* T = ensure(ts, (size_t)m.rows * Wp);
    double sum = 0;
    for (int c = 0; c < m.gc; ++c) {
      group_weights<A>(a, m.gi, c, wt, nullptr);
      A* z = zrows<A>(a, m.n, m.c0 + c, m.h0);
      conv_rows(X + c * cs, Wp, wt, m.k, m.d, W, m.rows, (A)a.b[m.c0 + c], z, T);
      for (int64_t q = 0; q < plane; q += seg) sum += (double)row_sum(z + q, (int)seg);
    }
    const double count = (double)m.gc * plane, mean = sum / count;
    const A mA = (A)mean;
    double m2 = 0;
    for (int c = 0; c < m.gc; ++c) {
      const A* z = zrows<A>(a, m.n, m.c0 + c, m.h0);
      for (int64_t q = 0; q < plane; q += seg) {
        const A* zr = z + q;
        A t = A(0);
#pragma omp simd reduction(+ : t)
        for (int w = 0; w < (int)seg; ++w) t += (zr[w] - mA) * (zr[w] - mA);
        m2 += (double)t;
      }
    }
    // the deviations were taken from the item mean rounded to A: sum (z - mA)^2 = M2 + count (mean - mA)^2
    const double dm = mean - (double)mA;
    m2 -= count * dm * dm;
    double* P = a.part + a.poff[it];
    P[0] = count;
    P[1] = mean;
    P[2] = m2 > 0 ? m2 : 0;
  }
}

template <typename S>
void dwgn_apply(const MdArgs& a, int64_t i0, int64_t i1) {
  using A = typename emcad::AccType<S>::type;
  Scratch<A> ys;
  const int W = a.W;
  for (int64_t it = i0; it < i1; ++it) {
    const Item m = item_of(a, it);
    const int64_t plane = (int64_t)m.rows * W;
    A* Y = ensure(ys, (size_t)m.gc * plane);
    const int64_t ng = m.n * a.G + m.gi;
    const A mean = (A)a.gmean[ng];
    for (int c = 0; c < m.gc; ++c) {
      const A sc = (A)(a.grstd[ng] * a.nw[m.c0 + c]), sh = (A)a.nb[m.c0 + c];
      const A* z = zrows<A>(a, m.n, m.c0 + c, m.h0);
      A* y = Y + c * plane;
#pragma omp simd
      for (int64_t q = 0; q < plane; ++q) y[q] = (z[q] - mean) * sc + sh;
    }
    store_tile<S, A>(a.y, m.n, m.c0, m.gc, m.h0, m.rows, Y);
  }
}

// Partials per item: [gc][2] = sum(g), sum(g*zhat) (GroupNorm weight/bias gradients and backward sums).
template <typename S>
void dwgn_bwd_sums(const MdArgs& a, int64_t i0, int64_t i1) {
  using A = typename emcad::AccType<S>::type;
  Scratch<A> gs;
  const int W = a.W;
  for (int64_t it = i0; it < i1; ++it) {
    const Item m = item_of(a, it);
    const int64_t plane = (int64_t)m.rows * W;
    A* GY = ensure(gs, (size_t)m.gc * plane);
    load_tile<S, A>(a.g, m.n, m.c0, m.gc, m.h0, m.rows, 0, W, GY);
    const int64_t ng = m.n * a.G + m.gi;
    const A mean = (A)a.gmean[ng], rstd = (A)a.grstd[ng];
    double* P = a.part + a.poff[it];
    for (int c = 0; c < m.gc; ++c)
      for (int r = 0; r < m.rows; ++r) {
        const A* z = zrows<A>(a, m.n, m.c0 + c, m.h0 + r);
        const A* g = GY + c * plane + (int64_t)r * W;
        A s0 = A(0), s1 = A(0);
#pragma omp simd reduction(+ : s0, s1)
        for (int w = 0; w < W; ++w) {
          s0 += g[w];
          s1 += g[w] * ((z[w] - mean) * rstd);
        }
        P[2 * c] += (double)s0;
        P[2 * c + 1] += (double)s1;
      }
  }
}

// Partials per item: [gc][k*k + 1] = weight taps, conv bias.
template <typename S>
void dwgn_bwd_grad(const MdArgs& a, int64_t i0, int64_t i1) {
  using A = typename emcad::AccType<S>::type;
  Scratch<A> xs, gys, gzs, gxs, ts;
  A wt[kMaxKernel * kMaxKernel], wf[kMaxKernel * kMaxKernel];
  const int W = a.W;
  for (int64_t it = i0; it < i1; ++it) {
    const Item m = item_of(a, it);
    const int hal = m.hal, kk = m.k * m.k, pw = kk + 1;
    // dz over rows [h0 - hal, h1 + hal) (from the conv-output scratch) -> grad x over [h0, h1); the weight
    // gradient needs x over the same rows
    const int R = m.rows + 2 * hal, Wp = W + 2 * hal;
    const int64_t cs = (int64_t)R * Wp;
    A* X = ensure(xs, (size_t)m.gc * cs);
    A* GY = ensure(gys, (size_t)m.gc * R * W);
    A* GZ = ensure(gzs, (size_t)m.gc * cs);
    A* GX = ensure(gxs, (size_t)m.gc * m.rows * W);
    A* T = ensure(ts, (size_t)m.rows * Wp);
    load_tile<S, A>(a.x, m.n, m.c0, m.gc, m.h0 - hal, R, hal, Wp, X);
    load_tile<S, A>(a.g, m.n, m.c0, m.gc, m.h0 - hal, R, 0, W, GY);
    std::memset(GZ, 0, sizeof(A) * m.gc * cs);
    const int64_t ng = m.n * a.G + m.gi;
    const A mean = (A)a.gmean[ng], rstd = (A)a.grstd[ng], ca = (A)a.ca[ng], cb = (A)a.cb[ng];
    const int rlo = std::max(0, hal - m.h0), rhi = std::min(R, a.H - m.h0 + hal);
    double* P = a.part + a.poff[it];
    for (int c = 0; c < m.gc; ++c) {
      group_weights<A>(a, m.gi, c, wt, wf);
      const A rg = (A)(a.grstd[ng] * a.nw[m.c0 + c]);
      for (int r = rlo; r < rhi; ++r) {
        const A* z = zrows<A>(a, m.n, m.c0 + c, m.h0 - hal + r);
        const A* g = GY + ((int64_t)c * R + r) * W;
        A* gz = GZ + c * cs + (int64_t)r * Wp + hal;
#pragma omp simd
        for (int w = 0; w < W; ++w) gz[w] = rg * g[w] - ca - cb * ((z[w] - mean) * rstd);
      }
      conv_rows(GZ + c * cs, Wp, wf, m.k, m.d, W, m.rows, A(0), GX + (int64_t)c * m.rows * W, T);
      wgrad_rows(X + c * cs, Wp, GZ + c * cs + (int64_t)hal * Wp + hal, m.k, m.d, W, m.rows, P + (int64_t)c * pw);
    }
    store_tile<S, A>(a.gx, m.n, m.c0, m.gc, m.h0, m.rows, GX);
  }
}

// the kernels of storage type S (LndwKernels, DwgnKernels: multidilation.h)
template <typename S>
LndwKernels lndw_kernels() {
  LndwKernels k;
  k.fwd = lndw_fwd<S>;
  k.bwd = lndw_bwd<S>;
  return k;
}

template <typename S>
DwgnKernels dwgn_kernels() {
  DwgnKernels k;
  k.stats = dwgn_stats<S>;
  k.apply = dwgn_apply<S>;
  k.bwd_sums = dwgn_bwd_sums<S>;
  k.bwd_grad = dwgn_bwd_grad<S>;
  return k;
}

}  // namespace md
