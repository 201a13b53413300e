// Kernels of the mscam op (EMCAD CAB then SAB applied as y = x * ca * sa), compiled once per instruction set
// inside namespace emcad_cpu::isa_<name> (isa_target.h). Interface (MscamArgs,
// MscamKernels): cpu/mscam.h; torch binding: cpu/mscam.cpp. No torch headers: raw pointers into dense tensors,
// either channels_last (NHWC in memory) or NCHW. Storage S (float, double, bf16) is computed in A (float for
// fp32/bf16, double for fp64).
//
// Items: (n, band of rows), item = n * nbands + band; the split depends on the shape only. Every item writes its
// own rows of the outputs / scratch maps and its own slots of the partial buffers, which the binding reduces in
// item order: bitwise reproducible for any thread count. Reductions that the compiler would not vectorise
// (float sums / maxima need reassociation) are written as explicit lane arrays.
//
// Tie rules (the reference backend's aten ops):
// * global max (adaptive_max_pool2d with indices): the first pixel in row-major order whose value is > all
//   earlier ones, i.e. the first occurrence of the maximum; a NaN replaces the current maximum (the last NaN
//   wins); all -inf: pixel 0.
// * channel max (torch.max(dim=1)): the first channel holding the maximum; the first NaN wins; all -inf:
//   channel 0.
#pragma once

namespace mscam {

using emcad::bf16;
using emcad::load_val;
using emcad::store_val;

template <typename A>
constexpr int mlanes() {
  return static_cast<int>(64 / sizeof(A));
}

constexpr int64_t kNoIdx = INT64_MAX;

template <typename A>
EMCAD_INLINE bool is_nan(A v) {
  return v != v;
}

template <typename A>
inline A sigmoid_a(A q) {
  return A(1) / (A(1) + std::exp(-q));
}


// NaN-propagating maximum (a NaN, once seen, stays)
template <typename A>
EMCAD_INLINE A max_nan(A m, A v) {
  return ((v > m) | is_nan(v)) ? v : m;
}

// the maximum as one vector instruction (maxps: v > m ? v : m, NaN-blind). The fast paths use it and detect NaN
// inputs by their sum (NaN iff the sum is NaN, or +inf and -inf met), then redo the rare such case exactly.
template <typename A>
EMCAD_INLINE A max_fast(A m, A v) {
  return v > m ? v : m;
}

// fixed-order tree reductions of L lanes (vectorisable: each level is one vector operation)
template <typename A, int L>
EMCAD_INLINE A tree_sum(A* acc) {
  for (int w = L / 2; w > 0; w >>= 1)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}
template <typename A, int L>
EMCAD_INLINE A tree_max(A* lm) {
  for (int w = L / 2; w > 0; w >>= 1)
    for (int l = 0; l < w; ++l) lm[l] = max_fast(lm[l], lm[l + w]);
  return lm[0];
}

// sum (in A per lane, then a fixed tree) and NaN-propagating maximum of a contiguous span. Kept out of line:
// inlined into the item loop, GCC 12 leaves the lane loop scalar.
template <typename S, typename A>
__attribute__((noinline)) void span_stats(const S* span, int64_t len, double& sum, A& max) {
  constexpr int L = mlanes<A>();
  A acc[L], lm[L];
  for (int l = 0; l < L; ++l) {
    acc[l] = 0;
    lm[l] = -std::numeric_limits<A>::infinity();
  }
  int64_t i = 0;
  for (; i + L <= len; i += L)
    for (int l = 0; l < L; ++l) {
      const A v = load_val(span + i + l);
      acc[l] += v;
      lm[l] = max_fast(lm[l], v);
    }
  for (int l = 0; i + l < len; ++l) {
    const A v = load_val(span + i + l);
    acc[l] += v;
    lm[l] = max_fast(lm[l], v);
  }
  sum = (double)tree_sum<A, L>(acc);
  max = tree_max<A, L>(lm);
  if (is_nan(sum)) {  // NaN inputs possible: the NaN-propagating maximum
    A m = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < len; ++j) m = max_nan(m, load_val(span + j));
    max = m;
  }
}

// ------------------------------------------------------------------------------------------------------
// pass 1: global sum and max (+ arg-max) per channel; partials per item
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A, bool IDX>
void pool_items(const MscamArgs& a, int64_t b, int64_t e) {
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* x = static_cast<const S*>(a.x);
  std::vector<A> rs(a.cl ? C : 0), cmax;
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, y0 = (it % a.nbands) * a.band, y1 = std::min(H, y0 + a.band);
    double* ps = a.psum + it * C;
    A* pm = static_cast<A*>(a.pmax) + it * C;
    int64_t* pi = a.pidx + it * C;
    if (a.cl) {
      for (int64_t c = 0; c < C; ++c) {
        ps[c] = 0;
        pm[c] = -std::numeric_limits<A>::infinity();
        pi[c] = kNoIdx;
      }
      for (int64_t y = y0; y < y1; ++y) {
        std::fill(rs.begin(), rs.end(), A(0));
        A* r = rs.data();
        for (int64_t xw = 0; xw < W; ++xw) {
          const S* px = x + ((n * H + y) * W + xw) * C;
          const int64_t p = y * W + xw;
          for (int64_t c = 0; c < C; ++c) {
            const A v = load_val(px + c);
            r[c] += v;
            const bool up = (v > pm[c]) | is_nan(v);
            pm[c] = up ? v : pm[c];
            if (IDX) pi[c] = up ? p : pi[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) ps[c] += (double)r[c];
      }
    } else {
      // NCHW: item (n, b) takes channel chunk b over the whole plane (long contiguous streams) and leaves the
      // other channels' slots neutral (sum 0, no maximum), so the binding's band merge applies unchanged. With
      // IDX a rescan finds the index the reference picks: the first maximum, or the last NaN.
      const int64_t cb = (C + a.nbands - 1) / a.nbands, c0 = std::min(C, (it % a.nbands) * cb),
                    c1 = std::min(C, c0 + cb), len = H * W;
      constexpr int64_t kChunk = 256;
      cmax.resize((size_t)((len + kChunk - 1) / kChunk));
      for (int64_t c = 0; c < C; ++c) {
        ps[c] = 0;
        pm[c] = -std::numeric_limits<A>::infinity();
        pi[c] = kNoIdx;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const S* span = x + (n * C + c) * H * W;
        double s = 0;
        A m = -std::numeric_limits<A>::infinity();
        for (int64_t i = 0, q = 0; i < len; i += kChunk, ++q) {  // lanes in A over <= kChunk elements, then double
          double cs;
          A cm;
          span_stats<S, A>(span + i, std::min<int64_t>(kChunk, len - i), cs, cm);
          s += cs;
          m = max_nan(m, cm);
          cmax[q] = cm;
        }
        int64_t id = kNoIdx;
        if (IDX) {
          if (is_nan(m)) {
            for (int64_t j = len - 1; j >= 0; --j)
              if (is_nan(load_val(span + j))) {
                id = j;
                break;
              }
          } else if (m > -std::numeric_limits<A>::infinity()) {
            // the first chunk holding the maximum, then the first element equal to it there
            int64_t q = 0;
            while (!(cmax[q] == m)) ++q;
            const int64_t end = std::min(len, (q + 1) * kChunk);
            for (int64_t j = q * kChunk; j < end; ++j)
              if (load_val(span + j) == m) {
                id = j;
                break;
              }
          }
        }
        ps[c] = s;
        pm[c] = m;
        pi[c] = id;
      }
    }
  }
}

// 64-byte GCC vectors of the accumulation type (lane count L = mlanes<A>()) and their comparison masks
template <typename A>
struct VT;
template <>
struct VT<float> {
  typedef float v __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};
template <>
struct VT<double> {
  typedef double v __attribute__((vector_size(64)));
  typedef int64_t i __attribute__((vector_size(64)));
};

// (out-parameters: returning a 64-byte vector by value changes the ABI between the ISA builds)
EMCAD_INLINE void vload(VT<float>::v& r, const float* p) { std::memcpy(&r, p, sizeof(r)); }
EMCAD_INLINE void vload(VT<double>::v& r, const double* p) { std::memcpy(&r, p, sizeof(r)); }
EMCAD_INLINE void vload(VT<float>::v& r, const bf16* p) {
  typedef uint16_t h16 __attribute__((vector_size(32)));
  h16 h;
  std::memcpy(&h, p, sizeof(h));
  const VT<float>::i w = __builtin_convertvector(h, VT<float>::i) << 16;
  std::memcpy(&r, &w, sizeof(r));
}

// channels_last pixel: sum_c and max_c of x * ca (lanes over channels, fixed-order trees), and with IDX the
// channel torch.max(dim=1) picks: each lane keeps the first channel of its maximum, then the smallest such
// channel among the lanes holding the maximum. NaN inputs (seen as a NaN sum) take an exact scalar scan: the
// NaN-propagating maximum and the first NaN.
template <typename S, typename A, bool IDX>
inline void map_pixel_cl(const S* px, const A* ca, int64_t C, A& sum, A& max, int32_t& ix) {
  constexpr int L = mlanes<A>();
  typedef typename VT<A>::v V;
  typedef typename VT<A>::i I;
  V acc = V{} + A(0), lm = V{} - std::numeric_limits<A>::infinity();
  I li, cur;
  typedef typename std::remove_reference<decltype(li[0])>::type E;
  for (int l = 0; l < L; ++l) {
    li[l] = l;
    cur[l] = l;
  }
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    V xv, cv;
    vload(xv, px + c);
    vload(cv, ca + c);
    const V v = xv * cv;
    acc += v;
    const I up = v > lm;
    if (IDX) li = up ? cur : li;
    lm = up ? v : lm;
    cur += L;
  }
  A ta[L], tm[L];
  std::memcpy(ta, &acc, sizeof(ta));
  std::memcpy(tm, &lm, sizeof(tm));
  E ti[L];
  std::memcpy(ti, &li, sizeof(ti));
  for (int l = 0; c + l < C; ++l) {
    const A v = load_val(px + c + l) * ca[c + l];
    ta[l] += v;
    if (v > tm[l]) {
      tm[l] = v;
      ti[l] = c + l;
    }
  }
  A lt[L];
  for (int l = 0; l < L; ++l) lt[l] = tm[l];
  sum = tree_sum<A, L>(ta);
  max = tree_max<A, L>(lt);
  ix = 0;
  if (is_nan(sum)) {
    A m = -std::numeric_limits<A>::infinity();
    bool found = false;
    for (int64_t j = 0; j < C; ++j) {
      const A v = load_val(px + j) * ca[j];
      if (!found && is_nan(v)) {
        found = true;
        ix = (int32_t)j;
      }
      if (!found && v > m) ix = (int32_t)j;
      m = max_nan(m, v);
    }
    max = m;
  } else if (IDX) {
    std::memcpy(&lm, tm, sizeof(tm));
    std::memcpy(&li, ti, sizeof(ti));
    const I big = I{} + (E)(C + L);
    const I cand = (lm == (V{} + max)) ? li : big;
    std::memcpy(ti, &cand, sizeof(ti));
    for (int w = L / 2; w > 0; w >>= 1)
      for (int l = 0; l < w; ++l) ti[l] = ti[l + w] < ti[l] ? ti[l + w] : ti[l];
    ix = ti[0] < C ? (int32_t)ti[0] : 0;
  }
}

// ------------------------------------------------------------------------------------------------------
// pass 2: the SAB input map [mean_c, max_c] of d1 = x * ca (zero-padded by k/2), and the channel arg-max
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A, bool IDX>
void map_items(const MscamArgs& a, int64_t b, int64_t e) {
  const int64_t C = a.C, H = a.H, W = a.W, p = a.k / 2, Hp = H + 2 * p, Wp = W + 2 * p;
  const S* x = static_cast<const S*>(a.x);
  std::vector<A> sum(W), mx(W);
  std::vector<int64_t> id(W);
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, y0 = (it % a.nbands) * a.band, y1 = std::min(H, y0 + a.band);
    const A* ca = static_cast<const A*>(a.ca) + n * C;
    A* m0 = static_cast<A*>(a.map) + (n * 2 * Hp + p) * Wp + p;
    A* m1 = m0 + Hp * Wp;
    int32_t* am = a.camax + n * H * W;
    for (int64_t y = y0; y < y1; ++y) {
      if (a.cl) {
        for (int64_t xw = 0; xw < W; ++xw) {
          A s, m;
          int32_t ix;
          map_pixel_cl<S, A, IDX>(x + ((n * H + y) * W + xw) * C, ca, C, s, m, ix);
          m0[y * Wp + xw] = s / A(C);
          m1[y * Wp + xw] = m;
          if (IDX) am[y * W + xw] = ix;
        }
      } else {
        A* su = sum.data();
        A* mm = mx.data();
        int64_t* ii = id.data();
        for (int64_t xw = 0; xw < W; ++xw) {
          su[xw] = 0;
          mm[xw] = -std::numeric_limits<A>::infinity();
          ii[xw] = kNoIdx;
        }
        for (int64_t c = 0; c < C; ++c) {
          const S* row = x + ((n * C + c) * H + y) * W;
          const A cc = ca[c];
          for (int64_t xw = 0; xw < W; ++xw) {
            const A v = load_val(row + xw) * cc;
            su[xw] += v;
            if (IDX) {
              const bool up = (v > mm[xw]) | (is_nan(v) & !is_nan(mm[xw]));
              mm[xw] = up ? v : mm[xw];
              ii[xw] = up ? c : ii[xw];
            } else {
              mm[xw] = max_nan(mm[xw], v);
            }
          }
        }
        for (int64_t xw = 0; xw < W; ++xw) {
          m0[y * Wp + xw] = su[xw] / A(C);
          m1[y * Wp + xw] = mm[xw];
          if (IDX) am[y * W + xw] = ii[xw] == kNoIdx ? 0 : (int32_t)ii[xw];
        }
      }
    }
  }
}

// q = conv_k(map) on output row y (no bias), into q[0..W)
template <typename A>
inline void conv_row(const MscamArgs& a, const A* wts, int64_t n, int64_t y, A* q) {
  const int k = a.k;
  const int64_t H = a.H, W = a.W, Hp = H + k - 1, Wp = W + k - 1;
  const A* mp = static_cast<const A*>(a.map) + n * 2 * Hp * Wp;
  for (int64_t xw = 0; xw < W; ++xw) q[xw] = 0;
  for (int ch = 0; ch < 2; ++ch)
    for (int i = 0; i < k; ++i) {
      const A* row = mp + (ch * Hp + y + i) * Wp;
      for (int j = 0; j < k; ++j) {
        const A wv = wts[(ch * k + i) * k + j];
        const A* r = row + j;
        for (int64_t xw = 0; xw < W; ++xw) q[xw] += wv * r[xw];
      }
    }
}

template <typename A>
inline void sab_weights(const MscamArgs& a, A* wts) {
  for (int t = 0; t < 2 * a.k * a.k; ++t) wts[t] = (A)a.wsab[t];
}

// ------------------------------------------------------------------------------------------------------
// forward pass 3: y = (x * ca) * sa, sa = sigmoid(conv(map)) computed per row
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A>
void apply_items(const MscamArgs& a, int64_t b, int64_t e) {
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* x = static_cast<const S*>(a.x);
  S* yo = static_cast<S*>(a.y);
  A wts[2 * 9 * 9];
  sab_weights(a, wts);
  std::vector<A> sab((size_t)a.band * W);
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, y0 = (it % a.nbands) * a.band, y1 = std::min(H, y0 + a.band);
    const A* ca = static_cast<const A*>(a.ca) + n * C;
    for (int64_t y = y0; y < y1; ++y) {
      A* s = sab.data() + (y - y0) * W;
      conv_row(a, wts, n, y, s);
      for (int64_t xw = 0; xw < W; ++xw) s[xw] = sigmoid_a(s[xw]);
    }
    if (a.cl) {
      for (int64_t y = y0; y < y1; ++y) {
        const A* s = sab.data() + (y - y0) * W;
        for (int64_t xw = 0; xw < W; ++xw) {
          const int64_t off = ((n * H + y) * W + xw) * C;
          const S* px = x + off;
          S* py = yo + off;
          const A sv = s[xw];
          for (int64_t c = 0; c < C; ++c) store_val(py + c, (load_val(px + c) * ca[c]) * sv);
        }
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const A cc = ca[c];
        for (int64_t y = y0; y < y1; ++y) {
          const A* s = sab.data() + (y - y0) * W;
          const int64_t off = ((n * C + c) * H + y) * W;
          const S* px = x + off;
          S* py = yo + off;
          for (int64_t xw = 0; xw < W; ++xw) store_val(py + xw, (load_val(px + xw) * cc) * s[xw]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// backward pass 3: sa (stored) and g_q = sum_c(g * d1) * sa * (1 - sa) into the zero-padded gq map
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A>
void bwd_gq_items(const MscamArgs& a, int64_t b, int64_t e) {
  constexpr int L = mlanes<A>();
  const int64_t C = a.C, H = a.H, W = a.W, p = a.k / 2, Wp = W + 2 * p, Hp = H + 2 * p;
  const S* x = static_cast<const S*>(a.x);
  const S* g = static_cast<const S*>(a.g);
  A wts[2 * 9 * 9];
  sab_weights(a, wts);
  std::vector<A> dot(W);
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, y0 = (it % a.nbands) * a.band, y1 = std::min(H, y0 + a.band);
    const A* ca = static_cast<const A*>(a.ca) + n * C;
    for (int64_t y = y0; y < y1; ++y) {
      A* s = static_cast<A*>(a.sa) + (n * H + y) * W;
      conv_row(a, wts, n, y, s);
      for (int64_t xw = 0; xw < W; ++xw) s[xw] = sigmoid_a(s[xw]);
      A* d = dot.data();
      if (a.cl) {
        for (int64_t xw = 0; xw < W; ++xw) {
          const int64_t off = ((n * H + y) * W + xw) * C;
          const S* px = x + off;
          const S* pg = g + off;
          A acc[L];
          for (int l = 0; l < L; ++l) acc[l] = 0;
          int64_t c = 0;
          for (; c + L <= C; c += L)
            for (int l = 0; l < L; ++l) acc[l] += load_val(pg + c + l) * (load_val(px + c + l) * ca[c + l]);
          for (int l = 0; c + l < C; ++l) acc[l] += load_val(pg + c + l) * (load_val(px + c + l) * ca[c + l]);
          A t = 0;
          for (int l = 0; l < L; ++l) t += acc[l];
          d[xw] = t;
        }
      } else {
        for (int64_t xw = 0; xw < W; ++xw) d[xw] = 0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = ((n * C + c) * H + y) * W;
          const S* px = x + off;
          const S* pg = g + off;
          const A cc = ca[c];
          for (int64_t xw = 0; xw < W; ++xw) d[xw] += load_val(pg + xw) * (load_val(px + xw) * cc);
        }
      }
      A* gq = static_cast<A*>(a.gq) + (n * Hp + y + p) * Wp + p;
      for (int64_t xw = 0; xw < W; ++xw) gq[xw] = d[xw] * s[xw] * (A(1) - s[xw]);
    }
  }
}

// g_d1 at one element: g * sa + g_s0 / C, plus g_s1 on the channel arg-max
template <typename A>
EMCAD_INLINE A gd1_of(A gv, A sv, A gs0c, A gs1, bool is_max) {
  const A t = gv * sv + gs0c;
  return is_max ? t + gs1 : t;
}

// ------------------------------------------------------------------------------------------------------
// backward pass 4: conv backward (g_s rows of the band, stored; SAB weight-gradient partials) and the CAB
// logit-gradient partials sum_p g_d1 * x per channel
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A>
void bwd_gs_items(const MscamArgs& a, int64_t b, int64_t e) {
  constexpr int L = mlanes<A>();
  const int k = a.k;
  const int64_t C = a.C, H = a.H, W = a.W, p = k / 2, Wp = W + 2 * p, Hp = H + 2 * p, kk = (int64_t)k * k;
  const S* x = static_cast<const S*>(a.x);
  const S* g = static_cast<const S*>(a.g);
  A wts[2 * 9 * 9];
  sab_weights(a, wts);
  std::vector<A> tw((size_t)(2 * kk * W)), rz(a.cl ? C : 0);
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, y0 = (it % a.nbands) * a.band, y1 = std::min(H, y0 + a.band);
    const A* gqp = static_cast<const A*>(a.gq) + n * Hp * Wp;
    const A* mp = static_cast<const A*>(a.map) + n * 2 * Hp * Wp;
    std::fill(tw.begin(), tw.end(), A(0));
    double* pz = a.pz + it * C;
    for (int64_t c = 0; c < C; ++c) pz[c] = 0;
    for (int64_t y = y0; y < y1; ++y) {
      A* gs0 = static_cast<A*>(a.gs) + (n * 2 * H + y) * W;
      A* gs1 = gs0 + H * W;
      // g_s[ch][y][x] = sum_ij w[ch][i][j] * gq_pad[y + 2p - i][x + 2p - j]
      for (int ch = 0; ch < 2; ++ch) {
        A* o = ch == 0 ? gs0 : gs1;
        for (int64_t xw = 0; xw < W; ++xw) o[xw] = 0;
        for (int i = 0; i < k; ++i) {
          const A* row = gqp + (y + 2 * p - i) * Wp + 2 * p;
          for (int j = 0; j < k; ++j) {
            const A wv = wts[(ch * k + i) * k + j];
            const A* r = row - j;
            for (int64_t xw = 0; xw < W; ++xw) o[xw] += wv * r[xw];
          }
        }
      }
      // weight taps: sum_x gq[y][x] * map_pad[ch][y + i][x + j], accumulated per column over the band
      const A* gq = gqp + (y + p) * Wp + p;
      for (int ch = 0; ch < 2; ++ch)
        for (int i = 0; i < k; ++i) {
          const A* row = mp + (ch * Hp + y + i) * Wp;
          for (int j = 0; j < k; ++j) {
            A* t = tw.data() + ((ch * k + i) * k + j) * W;
            const A* r = row + j;
            for (int64_t xw = 0; xw < W; ++xw) t[xw] += gq[xw] * r[xw];
          }
        }
      const A* s = static_cast<const A*>(a.sa) + (n * H + y) * W;
      const int32_t* am = a.camax + (n * H + y) * W;
      if (a.cl) {
        A* r = rz.data();
        for (int64_t c = 0; c < C; ++c) r[c] = 0;
        for (int64_t xw = 0; xw < W; ++xw) {
          const int64_t off = ((n * H + y) * W + xw) * C;
          const S* px = x + off;
          const S* pg = g + off;
          const A sv = s[xw], a0 = gs0[xw] / A(C), a1 = gs1[xw];
          const int64_t mc = am[xw];
          for (int64_t c = 0; c < C; ++c) r[c] += gd1_of(load_val(pg + c), sv, a0, a1, c == mc) * load_val(px + c);
        }
        for (int64_t c = 0; c < C; ++c) pz[c] += (double)r[c];
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = ((n * C + c) * H + y) * W;
          const S* px = x + off;
          const S* pg = g + off;
          A acc[L];
          for (int l = 0; l < L; ++l) acc[l] = 0;
          int64_t xw = 0;
          for (; xw + L <= W; xw += L)
            for (int l = 0; l < L; ++l)
              acc[l] += gd1_of(load_val(pg + xw + l), s[xw + l], gs0[xw + l] / A(C), gs1[xw + l], am[xw + l] == c) *
                        load_val(px + xw + l);
          for (int l = 0; xw + l < W; ++l)
            acc[l] += gd1_of(load_val(pg + xw + l), s[xw + l], gs0[xw + l] / A(C), gs1[xw + l], am[xw + l] == c) *
                      load_val(px + xw + l);
          A t = 0;
          for (int l = 0; l < L; ++l) t += acc[l];
          pz[c] += (double)t;
        }
      }
    }
    double* pw = a.pw + it * 2 * kk;
    for (int64_t t = 0; t < 2 * kk; ++t) {
      double sacc = 0;
      const A* tt = tw.data() + t * W;
      for (int64_t xw = 0; xw < W; ++xw) sacc += (double)tt[xw];
      pw[t] = sacc;
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// backward pass 5: gx = g_d1 * ca + g_avg / HW (the global-max gradient is added by fixup_items)
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A>
void bwd_gx_items(const MscamArgs& a, int64_t b, int64_t e) {
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* x = static_cast<const S*>(a.x);
  const S* g = static_cast<const S*>(a.g);
  S* gx = static_cast<S*>(a.gx);
  (void)x;
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / a.nbands, y0 = (it % a.nbands) * a.band, y1 = std::min(H, y0 + a.band);
    const A* ca = static_cast<const A*>(a.ca) + n * C;
    const A* ga = static_cast<const A*>(a.gavg) + n * C;
    for (int64_t y = y0; y < y1; ++y) {
      const A* gs0 = static_cast<const A*>(a.gs) + (n * 2 * H + y) * W;
      const A* gs1 = gs0 + H * W;
      const A* s = static_cast<const A*>(a.sa) + (n * H + y) * W;
      const int32_t* am = a.camax + (n * H + y) * W;
      if (a.cl) {
        for (int64_t xw = 0; xw < W; ++xw) {
          const int64_t off = ((n * H + y) * W + xw) * C;
          const S* pg = g + off;
          S* po = gx + off;
          const A sv = s[xw], a0 = gs0[xw] / A(C), a1 = gs1[xw];
          const int64_t mc = am[xw];
          for (int64_t c = 0; c < C; ++c)
            store_val(po + c, gd1_of(load_val(pg + c), sv, a0, a1, c == mc) * ca[c] + ga[c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = ((n * C + c) * H + y) * W;
          const S* pg = g + off;
          S* po = gx + off;
          const A cc = ca[c], gc = ga[c];
          for (int64_t xw = 0; xw < W; ++xw)
            store_val(po + xw, gd1_of(load_val(pg + xw), s[xw], gs0[xw] / A(C), gs1[xw], am[xw] == c) * cc + gc);
        }
      }
    }
  }
}

// items n: gx at each channel's global arg-max, recomputed with the max-pool gradient added
template <typename S, typename A>
void fixup_items(const MscamArgs& a, int64_t b, int64_t e) {
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* g = static_cast<const S*>(a.g);
  S* gx = static_cast<S*>(a.gx);
  for (int64_t n = b; n < e; ++n) {
    const A* ca = static_cast<const A*>(a.ca) + n * C;
    const A* ga = static_cast<const A*>(a.gavg) + n * C;
    const A* gm = static_cast<const A*>(a.gmax) + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t pix = a.gidx[n * C + c];
      const int64_t y = pix / W, xw = pix % W;
      const A* gs0 = static_cast<const A*>(a.gs) + (n * 2 * H + y) * W;
      const A* gs1 = gs0 + H * W;
      const A sv = static_cast<const A*>(a.sa)[(n * H + y) * W + xw];
      const int64_t mc = a.camax[(n * H + y) * W + xw];
      const int64_t off = a.cl ? ((n * H + y) * W + xw) * C + c : ((n * C + c) * H + y) * W + xw;
      const A v = gd1_of(load_val(g + off), sv, gs0[xw] / A(C), gs1[xw], c == mc) * ca[c] + ga[c];
      store_val(gx + off, v + gm[c]);
    }
  }
}

// the kernels of storage type S (MscamKernels, mscam.h), computed in float (double for double)
template <typename S>
MscamKernels mscam_kernels() {
  using A = typename emcad::AccType<S>::type;
  MscamKernels k;
  k.pool = pool_items<S, A, false>;
  k.pool_idx = pool_items<S, A, true>;
  k.map = map_items<S, A, false>;
  k.map_idx = map_items<S, A, true>;
  k.apply = apply_items<S, A>;
  k.bwd_gq = bwd_gq_items<S, A>;
  k.bwd_gs = bwd_gs_items<S, A>;
  k.bwd_gx = bwd_gx_items<S, A>;
  k.fixup = fixup_items<S, A>;
  return k;
}

}  // namespace mscam
