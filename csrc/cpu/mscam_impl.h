// Kernels of the mscam op (EMCAD CAB then SAB applied as y = x * ca * sa), compiled once per instruction set:
// mscam.cpp includes this file inside namespace emcad_cpu::mscam_<isa> (under `#pragma GCC target(...)` for
// avx2 / avx512). No torch headers: raw pointers into dense tensors, either channels_last (NHWC in memory) or
// NCHW. Storage S (float, double, bf16) is computed in A (float for fp32/bf16, double for fp64).
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

// (value, index) of lanes that each scanned ascending indices with "v > m || isnan(v)" (last NaN per lane),
// merged: a NaN with the largest index, else the maximum with the smallest index
template <typename A, int L>
inline void combine_pool_lanes(const A* lm, const int64_t* li, A& m, int64_t& id) {
  m = -std::numeric_limits<A>::infinity();
  id = kNoIdx;
  bool nan = false;
  for (int l = 0; l < L; ++l) {
    if (li[l] == kNoIdx) continue;
    if (is_nan(lm[l])) {
      if (!nan || li[l] > id) {
        nan = true;
        m = lm[l];
        id = li[l];
      }
    } else if (!nan && (lm[l] > m || (lm[l] == m && li[l] < id))) {
      m = lm[l];
      id = li[l];
    }
  }
}

// (value, index) of lanes that each scanned ascending channels with "v > m || (isnan(v) && !isnan(m))" (first
// NaN per lane), merged: a NaN with the smallest index, else the maximum with the smallest index
template <typename A, int L>
inline void combine_chan_lanes(const A* lm, const int64_t* li, A& m, int64_t& id) {
  m = -std::numeric_limits<A>::infinity();
  id = kNoIdx;
  bool nan = false;
  for (int l = 0; l < L; ++l) {
    if (li[l] == kNoIdx) continue;
    if (is_nan(lm[l])) {
      if (!nan || li[l] < id) {
        nan = true;
        m = lm[l];
        id = li[l];
      }
    } else if (!nan && (lm[l] > m || (lm[l] == m && li[l] < id))) {
      m = lm[l];
      id = li[l];
    }
  }
}

// later candidate (mb, ib) after (m, id) in scan order, with the pool rule
template <typename A>
EMCAD_INLINE void merge_pool(A mb, int64_t ib, A& m, int64_t& id) {
  if (ib == kNoIdx) return;
  if (mb > m || is_nan(mb) || id == kNoIdx) {
    m = mb;
    id = ib;
  }
}

// ------------------------------------------------------------------------------------------------------
// pass 1: global sum and max (+ arg-max) per channel; partials per item
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A, bool IDX>
void pool_items(const MscamArgs& a, int64_t b, int64_t e) {
  constexpr int L = mlanes<A>();
  const int64_t C = a.C, H = a.H, W = a.W;
  const S* x = static_cast<const S*>(a.x);
  std::vector<A> rs(a.cl ? C : 0);
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
            const bool up = v > pm[c] || is_nan(v);
            pm[c] = up ? v : pm[c];
            if (IDX) pi[c] = up ? p : pi[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) ps[c] += (double)r[c];
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const S* pc = x + (n * C + c) * H * W;
        double s = 0;
        A m = -std::numeric_limits<A>::infinity();
        int64_t id = kNoIdx;
        for (int64_t y = y0; y < y1; ++y) {
          const S* row = pc + y * W;
          A acc[L], lm[L];
          int64_t li[L];
          for (int l = 0; l < L; ++l) {
            acc[l] = 0;
            lm[l] = -std::numeric_limits<A>::infinity();
            li[l] = kNoIdx;
          }
          int64_t xw = 0;
          for (; xw + L <= W; xw += L) {
            for (int l = 0; l < L; ++l) {
              const A v = load_val(row + xw + l);
              acc[l] += v;
              const bool up = v > lm[l] || is_nan(v);
              lm[l] = up ? v : lm[l];
              if (IDX) li[l] = up ? y * W + xw + l : li[l];
            }
          }
          for (int l = 0; xw + l < W; ++l) {
            const A v = load_val(row + xw + l);
            acc[l] += v;
            const bool up = v > lm[l] || is_nan(v);
            lm[l] = up ? v : lm[l];
            li[l] = up ? y * W + xw + l : li[l];
          }
          A rsum = 0;
          for (int l = 0; l < L; ++l) rsum += acc[l];
          s += (double)rsum;
          A rm;
          int64_t ri;
          if (IDX) {
            combine_pool_lanes<A, L>(lm, li, rm, ri);
            merge_pool(rm, ri, m, id);
          } else {
            for (int l = 0; l < L; ++l) m = (lm[l] > m || is_nan(lm[l])) ? lm[l] : m;
          }
        }
        ps[c] = s;
        pm[c] = m;
        pi[c] = id;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// pass 2: the SAB input map [mean_c, max_c] of d1 = x * ca (zero-padded by k/2), and the channel arg-max
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A, bool IDX>
void map_items(const MscamArgs& a, int64_t b, int64_t e) {
  constexpr int L = mlanes<A>();
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
          const S* px = x + ((n * H + y) * W + xw) * C;
          A acc[L], lm[L];
          int64_t li[L];
          for (int l = 0; l < L; ++l) {
            acc[l] = 0;
            lm[l] = -std::numeric_limits<A>::infinity();
            li[l] = kNoIdx;
          }
          int64_t c = 0;
          for (; c + L <= C; c += L) {
            for (int l = 0; l < L; ++l) {
              const A v = load_val(px + c + l) * ca[c + l];
              acc[l] += v;
              if (IDX) {
                const bool up = v > lm[l] || (is_nan(v) && !is_nan(lm[l]));
                lm[l] = up ? v : lm[l];
                li[l] = up ? c + l : li[l];
              } else {
                lm[l] = (v > lm[l] || is_nan(v)) ? v : lm[l];
              }
            }
          }
          for (int l = 0; c + l < C; ++l) {
            const A v = load_val(px + c + l) * ca[c + l];
            acc[l] += v;
            const bool up = v > lm[l] || (is_nan(v) && !is_nan(lm[l]));
            lm[l] = up ? v : lm[l];
            li[l] = up ? c + l : li[l];
          }
          A s = 0;
          for (int l = 0; l < L; ++l) s += acc[l];
          A m = -std::numeric_limits<A>::infinity();
          int64_t ix = kNoIdx;
          if (IDX) {
            combine_chan_lanes<A, L>(lm, li, m, ix);
          } else {
            for (int l = 0; l < L; ++l) m = (lm[l] > m || is_nan(lm[l])) ? lm[l] : m;
          }
          m0[y * Wp + xw] = s / A(C);
          m1[y * Wp + xw] = m;
          if (IDX) am[y * W + xw] = ix == kNoIdx ? 0 : (int32_t)ix;
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
              const bool up = v > mm[xw] || (is_nan(v) && !is_nan(mm[xw]));
              mm[xw] = up ? v : mm[xw];
              ii[xw] = up ? c : ii[xw];
            } else {
              mm[xw] = (v > mm[xw] || is_nan(v)) ? v : mm[xw];
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
    const A* ca = static_cast<const A*>(a.ca) + n * C;
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

template <typename S, typename A>
MscamFns mscam_fns() {
  MscamFns f;
  f.pool = pool_items<S, A, false>;
  f.pool_idx = pool_items<S, A, true>;
  f.map = map_items<S, A, false>;
  f.map_idx = map_items<S, A, true>;
  f.apply = apply_items<S, A>;
  f.bwd_gq = bwd_gq_items<S, A>;
  f.bwd_gs = bwd_gs_items<S, A>;
  f.bwd_gx = bwd_gx_items<S, A>;
  f.fixup = fixup_items<S, A>;
  return f;
}

inline const MscamTable& mscam_table_impl(const char* name) {
  static const MscamTable t = {name, {mscam_fns<float, float>(), mscam_fns<double, double>(),
                                      mscam_fns<bf16, float>()}};
  return t;
}
