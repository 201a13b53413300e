// Kernels of token_dwconv_gelu (PVTv2's Mix-FFN middle: GELU(dwconv3x3(x) + bias) on (N, H*W, C) tokens),
// compiled once per instruction set inside namespace emcad_cpu::isa_<name> (isa_target.h), whose kVecBytes is the
// vector width of that build. Interface: TdgArgs, TdgKernels (token_dwconv_gelu.h). No torch headers: raw pointers
// into contiguous tokens (an NHWC map).
//
// Vectorisation: one vector holds consecutive channels of one pixel (GCC vector types of kVecBytes). Two
// traversal orders (see tdg_pixel_major): pixel-major, the nine taps of a pixel's channel block loaded from L1; or
// strips, each channel vector sliding the 3x3 window along a few pixels in registers (three loads per pixel, the
// weights and the weight-gradient sums in registers). Channels past the last full vector take a scalar path. GELU
// and its derivative are branch-free vector code (erf as a rational function, exp by range reduction); fp64
// storage uses std::erf / std::exp per lane (the gradcheck path).
//
// Items: (n, band of rows), item = n * nbands + band; the split depends on the shape only. The backward streams
// over the rows of its band plus one halo row on each side: dz = g * GELU'(z) of three consecutive rows lives in a
// ring buffer, and dx of a row is gathered from it as soon as the row below is ready (halo rows are recomputed by
// both neighbouring items; nothing image-sized is written but dx). Each item adds its own rows' weight- and
// bias-gradient terms to its own partial row; the binding reduces the rows in item order: bitwise the same for
// any thread count.

namespace tdg {

using emcad::bf16;

typedef float TdgVF __attribute__((vector_size(kVecBytes)));
typedef double TdgVD __attribute__((vector_size(kVecBytes)));
typedef int32_t TdgVI __attribute__((vector_size(kVecBytes)));
typedef uint32_t TdgVU __attribute__((vector_size(kVecBytes)));
typedef uint16_t TdgVH __attribute__((vector_size(kVecBytes / 2)));

// ---- exact GELU ---------------------------------------------------------------------------------------
constexpr double kTdgSqrtHalf = 0.70710678118654752440;
constexpr double kTdgInvSqrt2Pi = 0.39894228040143267794;

// erf on [-4, 4] (+-1 beyond, exactly so in float) as an odd/even rational function of degree 13/8 (the
// coefficients of Eigen's generic_fast_erf_float): max abs error 5e-7 against math.erf in float arithmetic
template <typename V>
EMCAD_INLINE V tdg_erf(V x) {
  x = x < -4.f ? -4.f : x;
  x = x > 4.f ? 4.f : x;
  const V x2 = x * x;
  V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  V q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// exp of x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial, 2^n from exponent bits);
// inputs below -87 give exp(-87) rather than a denormal
template <typename V, typename VI>
EMCAD_INLINE V tdg_exp_neg(V x) {
  x = x < -87.f ? -87.f : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename V>
EMCAD_INLINE V tdg_gelu_v(V z) {
  return 0.5f * z * (1.f + tdg_erf(z * (float)kTdgSqrtHalf));
}

template <typename V, typename VI>
EMCAD_INLINE V tdg_gelu_grad_v(V z) {  // d GELU / dz = Phi(z) + z phi(z)
  const V cdf = 0.5f * (1.f + tdg_erf(z * (float)kTdgSqrtHalf));
  return cdf + z * ((float)kTdgInvSqrt2Pi * tdg_exp_neg<V, VI>(-0.5f * z * z));
}

EMCAD_INLINE float tdg_gelu(float z) {
  typedef float V1 __attribute__((vector_size(4)));
  return tdg_gelu_v(V1{z})[0];
}
EMCAD_INLINE double tdg_gelu(double z) { return 0.5 * z * (1.0 + std::erf(z * kTdgSqrtHalf)); }
EMCAD_INLINE float tdg_gelu_grad(float z) {
  typedef float V1 __attribute__((vector_size(4)));
  typedef int32_t I1 __attribute__((vector_size(4)));
  return tdg_gelu_grad_v<V1, I1>(V1{z})[0];
}
EMCAD_INLINE double tdg_gelu_grad(double z) {
  return 0.5 * (1.0 + std::erf(z * kTdgSqrtHalf)) + z * (kTdgInvSqrt2Pi * std::exp(-0.5 * z * z));
}

// ---- storage types: vector loads / stores in the accumulation type A --------------------------------------
template <typename S>
struct TdgT;

template <>
struct TdgT<float> {
  using A = float;
  using V = TdgVF;
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V gelu(V z) { return tdg_gelu_v(z); }
  static V gelu_grad(V z) { return tdg_gelu_grad_v<V, TdgVI>(z); }
};

template <>
struct TdgT<bf16> {
  using A = float;
  using V = TdgVF;
  static V load(const bf16* p) {
    TdgVH h;
    std::memcpy(&h, p, sizeof(h));
    const TdgVU u = __builtin_convertvector(h, TdgVU) << 16;
    V v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
  static void store(bf16* p, V v) {  // round to nearest even, NaN -> 0x7FC0 (emcad::float_to_bf16)
    TdgVU u;
    std::memcpy(&u, &v, sizeof(u));
    TdgVU r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    r = v != v ? 0x7FC0u : r;
    const TdgVH h = __builtin_convertvector(r, TdgVH);
    std::memcpy(p, &h, sizeof(h));
  }
  static V gelu(V z) { return tdg_gelu_v(z); }
  static V gelu_grad(V z) { return tdg_gelu_grad_v<V, TdgVI>(z); }
};

template <>
struct TdgT<double> {
  using A = double;
  using V = TdgVD;
  static constexpr int kLanes = kVecBytes / 8;
  static V load(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(double* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V gelu(V z) {
    for (int l = 0; l < kLanes; ++l) z[l] = tdg_gelu(z[l]);
    return z;
  }
  static V gelu_grad(V z) {
    for (int l = 0; l < kLanes; ++l) z[l] = tdg_gelu_grad(z[l]);
    return z;
  }
};

template <typename S>
constexpr int64_t tdg_lanes() {
  return kVecBytes / static_cast<int64_t>(sizeof(typename TdgT<S>::A));
}

// the nine weights (tap-major [9][C]) of the channel vector at c0
template <typename S>
struct TdgW {
  typename TdgT<S>::V t[9];
};

template <typename S>
EMCAD_INLINE TdgW<S> tdg_weights(const typename TdgT<S>::A* w, int64_t C, int64_t c0) {
  using T = TdgT<typename TdgT<S>::A>;
  TdgW<S> r;
  for (int t = 0; t < 9; ++t) r.t[t] = T::load(w + t * C + c0);
  return r;
}

// ------------------------------------------------------------------------------------------------------
// traversal orders
// ------------------------------------------------------------------------------------------------------
// Pixel-major: for each pixel, all its channel vectors in blocks of kTdgBlock, the nine taps and weights loaded
// from L1 (a pixel's 3x3 window and the weights stay there while the row is swept). Strips: for kTdgStrip pixels
// at a time, each channel vector slides the window along the strip in registers (three loads per pixel), the
// weights and the weight-gradient sums in registers too. Pixel-major is faster while the window and the weights
// fit in L1 (measured: up to C = 512 fp32 at PVTv2's shapes), strips beyond that; the choice depends on the
// shape only, so results stay bitwise reproducible.
constexpr int kTdgBlock = 4;
constexpr int64_t kTdgStrip = 8;
constexpr int64_t kTdgL1Budget = 40 * 1024;

template <typename S>
EMCAD_INLINE bool tdg_pixel_major(int64_t C) {
  return 9 * C * static_cast<int64_t>(sizeof(S) + sizeof(typename TdgT<S>::A)) <= kTdgL1Budget;
}

// the window column at pixel xx of the three rows up / mid / dn (nullptr: a padding row), zero outside the image
template <typename T, typename P>
EMCAD_INLINE void tdg_column(const P* up, const P* mid, const P* dn, int64_t xx, int64_t W, int64_t C, int64_t c0,
                             typename T::V& v0, typename T::V& v1, typename T::V& v2) {
  const typename T::V zero = {};
  if (xx < 0 || xx >= W) {
    v0 = v1 = v2 = zero;
    return;
  }
  const int64_t o = xx * C + c0;
  v0 = up ? T::load(up + o) : zero;
  v1 = T::load(mid + o);
  v2 = dn ? T::load(dn + o) : zero;
}

// tap t = 3 * i + j of pixel xw reads pixel (row i of up / mid / dn, xw + j - 1); nullptr in the zero padding
template <typename P>
EMCAD_INLINE void tdg_window(const P* const rows[3], int64_t xw, int64_t W, int64_t C, const P* src[9]) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const int64_t ww = xw + j - 1;
      src[3 * i + j] = (rows[i] && ww >= 0 && ww < W) ? rows[i] + ww * C : nullptr;
    }
}

template <typename S, typename A>
EMCAD_INLINE A tdg_conv_scalar(const S* const src[9], const A* w, const A* bias, int64_t C, int64_t c) {
  A z = bias[c];
  for (int t = 0; t < 9; ++t)
    if (src[t]) z += emcad::load_val(src[t] + c) * w[t * C + c];
  return z;
}

// ------------------------------------------------------------------------------------------------------
// forward: y = GELU(z) of one image row; rows = x rows h - 1, h, h + 1 (nullptr: padding)
// ------------------------------------------------------------------------------------------------------
template <typename S, int NB>
EMCAD_INLINE void tdg_fwd_block(const S* const src[9], const typename TdgT<S>::A* w, const typename TdgT<S>::A* bias,
                                int64_t C, int64_t c0, S* out) {
  using T = TdgT<S>;
  using TA = TdgT<typename T::A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  V z[NB];
  for (int v = 0; v < NB; ++v) z[v] = TA::load(bias + c0 + v * L);
  for (int t = 0; t < 9; ++t) {
    if (!src[t]) continue;
    for (int v = 0; v < NB; ++v) z[v] += T::load(src[t] + c0 + v * L) * TA::load(w + t * C + c0 + v * L);
  }
  for (int v = 0; v < NB; ++v) T::store(out + c0 + v * L, T::gelu(z[v]));
}

template <typename S>
void tdg_fwd_row(const S* const rows[3], int64_t W, int64_t C, const typename TdgT<S>::A* w,
                 const typename TdgT<S>::A* bias, S* out) {
  using T = TdgT<S>;
  using TA = TdgT<typename T::A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  const int64_t Cv = C - C % L;
  if (tdg_pixel_major<S>(C)) {
    for (int64_t xw = 0; xw < W; ++xw) {
      const S* src[9];
      tdg_window(rows, xw, W, C, src);
      int64_t c0 = 0;
      for (; c0 + kTdgBlock * L <= Cv; c0 += kTdgBlock * L) tdg_fwd_block<S, kTdgBlock>(src, w, bias, C, c0, out + xw * C);
      for (; c0 < Cv; c0 += L) tdg_fwd_block<S, 1>(src, w, bias, C, c0, out + xw * C);
    }
  } else {
    for (int64_t x0 = 0; x0 < W; x0 += kTdgStrip) {
      const int64_t x1 = std::min(W, x0 + kTdgStrip);
      for (int64_t c0 = 0; c0 < Cv; c0 += L) {
        const TdgW<S> k = tdg_weights<S>(w, C, c0);
        const V b = TA::load(bias + c0);
        V l0, l1, l2, m0, m1, m2, r0, r1, r2;  // window columns left / middle / right of the rows up / mid / dn
        tdg_column<T>(rows[0], rows[1], rows[2], x0 - 1, W, C, c0, l0, l1, l2);
        tdg_column<T>(rows[0], rows[1], rows[2], x0, W, C, c0, m0, m1, m2);
        for (int64_t xw = x0; xw < x1; ++xw) {
          tdg_column<T>(rows[0], rows[1], rows[2], xw + 1, W, C, c0, r0, r1, r2);
          const V z = b + k.t[0] * l0 + k.t[1] * m0 + k.t[2] * r0 + k.t[3] * l1 + k.t[4] * m1 + k.t[5] * r1 +
                      k.t[6] * l2 + k.t[7] * m2 + k.t[8] * r2;
          T::store(out + xw * C + c0, T::gelu(z));
          l0 = m0, l1 = m1, l2 = m2;
          m0 = r0, m1 = r1, m2 = r2;
        }
      }
    }
  }
  if (Cv < C)  // channels past the last full vector
    for (int64_t xw = 0; xw < W; ++xw) {
      const S* src[9];
      tdg_window(rows, xw, W, C, src);
      for (int64_t c = Cv; c < C; ++c) emcad::store_val(out + xw * C + c, tdg_gelu(tdg_conv_scalar(src, w, bias, C, c)));
    }
}

template <typename S>
void tdg_fwd_items(const TdgArgs& a, int64_t b, int64_t e) {
  using A = typename TdgT<S>::A;
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* x = static_cast<const S*>(a.x);
  S* y = static_cast<S*>(a.y);
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, h0 = (it % a.nbands) * a.band, h1 = std::min(H, h0 + a.band);
    const S* img = x + n * H * W * C;
    for (int64_t h = h0; h < h1; ++h) {
      const S* rows[3] = {h > 0 ? img + (h - 1) * W * C : nullptr, img + h * W * C,
                          h + 1 < H ? img + (h + 1) * W * C : nullptr};
      tdg_fwd_row<S>(rows, W, C, static_cast<const A*>(a.w), static_cast<const A*>(a.bias),
                     y + (n * H + h) * W * C);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------------
// dz = g * GELU'(z) of NB channel vectors of one pixel into d
template <typename S, int NB>
EMCAD_INLINE void tdg_dz_block(const S* const src[9], const typename TdgT<S>::A* w,
                               const typename TdgT<S>::A* bias, int64_t C, int64_t c0, const S* g,
                               typename TdgT<S>::A* d) {
  using T = TdgT<S>;
  using TA = TdgT<typename T::A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  V z[NB];
  for (int v = 0; v < NB; ++v) z[v] = TA::load(bias + c0 + v * L);
  for (int t = 0; t < 9; ++t) {
    if (!src[t]) continue;
    for (int v = 0; v < NB; ++v) z[v] += T::load(src[t] + c0 + v * L) * TA::load(w + t * C + c0 + v * L);
  }
  for (int v = 0; v < NB; ++v) TA::store(d + c0 + v * L, T::load(g + c0 + v * L) * T::gelu_grad(z[v]));
}

// The ten weight- and bias-gradient sums of one channel vector along a strip, kept in registers: add() takes a dz
// vector and the 3x3 x window it multiplies (columns l, m, r of rows 0, 1, 2); flush() adds them to the partial rows.
template <typename V>
struct TdgGradSums {
  V sw[9] = {}, sb = {};
  EMCAD_INLINE void add(V d, V l0, V m0, V r0, V l1, V m1, V r1, V l2, V m2, V r2) {
    sb += d;
    sw[0] += d * l0, sw[1] += d * m0, sw[2] += d * r0;
    sw[3] += d * l1, sw[4] += d * m1, sw[5] += d * r1;
    sw[6] += d * l2, sw[7] += d * m2, sw[8] += d * r2;
  }
  template <typename TA, typename A>
  EMCAD_INLINE void flush(A* gw, A* gb, int64_t C, int64_t c0) const {
    TA::store(gb + c0, TA::load(gb + c0) + sb);
    for (int t = 0; t < 9; ++t) TA::store(gw + t * C + c0, TA::load(gw + t * C + c0) + sw[t]);
  }
};

// the weight- and bias-gradient terms of one image row (vector channels) from its dz (drow) and the x rows
// h - 1, h, h + 1: per channel vector the x window slides along a strip with the ten sums in registers
template <typename S>
void tdg_gw_row(const S* const rows[3], const typename TdgT<S>::A* drow, int64_t W, int64_t C,
                typename TdgT<S>::A* gw, typename TdgT<S>::A* gb) {
  using T = TdgT<S>;
  using TA = TdgT<typename T::A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  const int64_t Cv = C - C % L;
  for (int64_t x0 = 0; x0 < W; x0 += kTdgStrip) {
    const int64_t x1 = std::min(W, x0 + kTdgStrip);
    for (int64_t c0 = 0; c0 < Cv; c0 += L) {
      TdgGradSums<V> sums;
      V l0, l1, l2, m0, m1, m2, r0, r1, r2;
      tdg_column<T>(rows[0], rows[1], rows[2], x0 - 1, W, C, c0, l0, l1, l2);
      tdg_column<T>(rows[0], rows[1], rows[2], x0, W, C, c0, m0, m1, m2);
      for (int64_t xw = x0; xw < x1; ++xw) {
        tdg_column<T>(rows[0], rows[1], rows[2], xw + 1, W, C, c0, r0, r1, r2);
        sums.add(TA::load(drow + xw * C + c0), l0, m0, r0, l1, m1, r1, l2, m2, r2);
        l0 = m0, l1 = m1, l2 = m2;
        m0 = r0, m1 = r1, m2 = r2;
      }
      sums.template flush<TA>(gw, gb, C, c0);
    }
  }
}

// dz of one image row (rows = x rows h - 1, h, h + 1; grow = g of row h) into drow
template <typename S, bool OWN>
void tdg_dz_row(const S* const rows[3], const S* grow, int64_t W, int64_t C, const typename TdgT<S>::A* w,
                const typename TdgT<S>::A* bias, typename TdgT<S>::A* drow, typename TdgT<S>::A* gw,
                typename TdgT<S>::A* gb) {
  using A = typename TdgT<S>::A;
  using T = TdgT<S>;
  using TA = TdgT<A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  const int64_t Cv = C - C % L;
  if (tdg_pixel_major<S>(C)) {
    for (int64_t xw = 0; xw < W; ++xw) {
      const S* src[9];
      tdg_window(rows, xw, W, C, src);
      const S* g = grow + xw * C;
      A* d = drow + xw * C;
      int64_t c0 = 0;
      for (; c0 + kTdgBlock * L <= Cv; c0 += kTdgBlock * L) tdg_dz_block<S, kTdgBlock>(src, w, bias, C, c0, g, d);
      for (; c0 < Cv; c0 += L) tdg_dz_block<S, 1>(src, w, bias, C, c0, g, d);
    }
    if (OWN) tdg_gw_row<S>(rows, drow, W, C, gw, gb);  // a second sweep: measured faster than sums in memory
  } else {
    for (int64_t x0 = 0; x0 < W; x0 += kTdgStrip) {
      const int64_t x1 = std::min(W, x0 + kTdgStrip);
      for (int64_t c0 = 0; c0 < Cv; c0 += L) {
        const TdgW<S> k = tdg_weights<S>(w, C, c0);
        const V b = TA::load(bias + c0);
        TdgGradSums<V> sums;
        V l0, l1, l2, m0, m1, m2, r0, r1, r2;
        tdg_column<T>(rows[0], rows[1], rows[2], x0 - 1, W, C, c0, l0, l1, l2);
        tdg_column<T>(rows[0], rows[1], rows[2], x0, W, C, c0, m0, m1, m2);
        for (int64_t xw = x0; xw < x1; ++xw) {
          tdg_column<T>(rows[0], rows[1], rows[2], xw + 1, W, C, c0, r0, r1, r2);
          const V z = b + k.t[0] * l0 + k.t[1] * m0 + k.t[2] * r0 + k.t[3] * l1 + k.t[4] * m1 + k.t[5] * r1 +
                      k.t[6] * l2 + k.t[7] * m2 + k.t[8] * r2;
          const V d = T::load(grow + xw * C + c0) * T::gelu_grad(z);
          TA::store(drow + xw * C + c0, d);
          if (OWN) sums.add(d, l0, m0, r0, l1, m1, r1, l2, m2, r2);
          l0 = m0, l1 = m1, l2 = m2;
          m0 = r0, m1 = r1, m2 = r2;
        }
        if (OWN) sums.template flush<TA>(gw, gb, C, c0);
      }
    }
  }
  if (Cv < C)
    for (int64_t xw = 0; xw < W; ++xw) {
      const S* src[9];
      tdg_window(rows, xw, W, C, src);
      for (int64_t c = Cv; c < C; ++c) {
        const A d = emcad::load_val(grow + xw * C + c) * tdg_gelu_grad(tdg_conv_scalar(src, w, bias, C, c));
        drow[xw * C + c] = d;
        if (OWN) {
          gb[c] += d;
          for (int t = 0; t < 9; ++t)
            if (src[t]) gw[t * C + c] += d * emcad::load_val(src[t] + c);
        }
      }
    }
}

// dx of one image row: sum over taps t = 3 i + j of w[t] * dz(h - i + 1, x - j + 1), i.e. the window of the dz
// rows (h - 1, h, h + 1) read in reverse tap order; rows = dz rows h - 1, h, h + 1 (nullptr: padding)
template <typename S, int NB>
EMCAD_INLINE void tdg_dx_block(const typename TdgT<S>::A* const src[9], const typename TdgT<S>::A* w, int64_t C,
                               int64_t c0, S* out) {
  using T = TdgT<S>;
  using TA = TdgT<typename T::A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  V acc[NB];
  for (int v = 0; v < NB; ++v) acc[v] = V{};
  for (int t = 0; t < 9; ++t) {
    if (!src[8 - t]) continue;
    for (int v = 0; v < NB; ++v) acc[v] += TA::load(w + t * C + c0 + v * L) * TA::load(src[8 - t] + c0 + v * L);
  }
  for (int v = 0; v < NB; ++v) T::store(out + c0 + v * L, acc[v]);
}

template <typename S>
void tdg_dx_row(const typename TdgT<S>::A* const rows[3], int64_t W, int64_t C, const typename TdgT<S>::A* w,
                S* out) {
  using A = typename TdgT<S>::A;
  using T = TdgT<S>;
  using TA = TdgT<A>;
  using V = typename T::V;
  constexpr int64_t L = tdg_lanes<S>();
  const int64_t Cv = C - C % L;
  if (tdg_pixel_major<S>(C)) {
    for (int64_t xw = 0; xw < W; ++xw) {
      const A* src[9];
      tdg_window(rows, xw, W, C, src);
      int64_t c0 = 0;
      for (; c0 + kTdgBlock * L <= Cv; c0 += kTdgBlock * L) tdg_dx_block<S, kTdgBlock>(src, w, C, c0, out + xw * C);
      for (; c0 < Cv; c0 += L) tdg_dx_block<S, 1>(src, w, C, c0, out + xw * C);
    }
  } else {
    for (int64_t x0 = 0; x0 < W; x0 += kTdgStrip) {
      const int64_t x1 = std::min(W, x0 + kTdgStrip);
      for (int64_t c0 = 0; c0 < Cv; c0 += L) {
        const TdgW<S> k = tdg_weights<S>(w, C, c0);
        V l0, l1, l2, m0, m1, m2, r0, r1, r2;
        tdg_column<TA>(rows[0], rows[1], rows[2], x0 - 1, W, C, c0, l0, l1, l2);
        tdg_column<TA>(rows[0], rows[1], rows[2], x0, W, C, c0, m0, m1, m2);
        for (int64_t xw = x0; xw < x1; ++xw) {
          tdg_column<TA>(rows[0], rows[1], rows[2], xw + 1, W, C, c0, r0, r1, r2);
          const V g = k.t[0] * r2 + k.t[1] * m2 + k.t[2] * l2 + k.t[3] * r1 + k.t[4] * m1 + k.t[5] * l1 +
                      k.t[6] * r0 + k.t[7] * m0 + k.t[8] * l0;
          T::store(out + xw * C + c0, g);
          l0 = m0, l1 = m1, l2 = m2;
          m0 = r0, m1 = r1, m2 = r2;
        }
      }
    }
  }
  if (Cv < C)
    for (int64_t xw = 0; xw < W; ++xw) {
      const A* src[9];
      tdg_window(rows, xw, W, C, src);
      for (int64_t c = Cv; c < C; ++c) {
        A g = 0;
        for (int t = 0; t < 9; ++t)
          if (src[8 - t]) g += w[t * C + c] * src[8 - t][c];
        emcad::store_val(out + xw * C + c, g);
      }
    }
}

template <typename S>
void tdg_bwd_items(const TdgArgs& a, int64_t b, int64_t e) {
  using A = typename TdgT<S>::A;
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* x = static_cast<const S*>(a.x);
  const S* g = static_cast<const S*>(a.g);
  S* gx = static_cast<S*>(a.gx);
  const A* w = static_cast<const A*>(a.w);
  const A* bias = static_cast<const A*>(a.bias);
  std::vector<A> ring((size_t)(3 * W * C)), gw((size_t)(9 * C)), gb((size_t)C);
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, h0 = (it % a.nbands) * a.band, h1 = std::min(H, h0 + a.band);
    const S* img = x + n * H * W * C;
    const S* gimg = g + n * H * W * C;
    S* out = gx + n * H * W * C;
    std::fill(gw.begin(), gw.end(), A(0));
    std::fill(gb.begin(), gb.end(), A(0));
    auto slot = [&](int64_t h) { return ring.data() + (h % 3) * W * C; };
    auto dx_row = [&](int64_t h) {
      const A* rows[3] = {h > 0 ? slot(h - 1) : nullptr, slot(h), h + 1 < H ? slot(h + 1) : nullptr};
      tdg_dx_row<S>(rows, W, C, w, out + h * W * C);
    };
    // rows h0 - 1 .. h1 (the halo rows: dz only); dx of row h - 1 as soon as dz of row h is there
    for (int64_t h = std::max<int64_t>(0, h0 - 1); h < std::min(H, h1 + 1); ++h) {
      const S* rows[3] = {h > 0 ? img + (h - 1) * W * C : nullptr, img + h * W * C,
                          h + 1 < H ? img + (h + 1) * W * C : nullptr};
      if (h >= h0 && h < h1)
        tdg_dz_row<S, true>(rows, gimg + h * W * C, W, C, w, bias, slot(h), gw.data(), gb.data());
      else
        tdg_dz_row<S, false>(rows, gimg + h * W * C, W, C, w, bias, slot(h), nullptr, nullptr);
      if (h - 1 >= h0) dx_row(h - 1);
    }
    if (h1 == H) dx_row(H - 1);  // the last image row has no row below
    double* part = a.part + it * 10 * C;
    for (int64_t i = 0; i < 9 * C; ++i) part[i] = (double)gw[i];
    for (int64_t c = 0; c < C; ++c) part[9 * C + c] = (double)gb[c];
  }
}

// the kernels of storage type S (TdgKernels, token_dwconv_gelu.h)
template <typename S>
TdgKernels tdg_kernels() {
  TdgKernels k;
  k.fwd = tdg_fwd_items<S>;
  k.bwd = tdg_bwd_items<S>;
  return k;
}

}  // namespace tdg
