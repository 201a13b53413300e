// Kernels of grouped_attention_gate (row items: psi and the output; block items: BN statistics and gradients).
// Compiled once per instruction set inside namespace emcad_cpu::isa_<name> (isa_target.h). Interface (LgagArgs,
// LgagKernels): cpu/lgag.h; torch binding: cpu/lgag.cpp; shared helpers: cpu/stencil_common.h. No torch headers.
#pragma once
#include "cpu/stencil_common.h"

// Lanes are output channels o of the grouped convs; slot j of lane o holds input channel (o / og) * J + j.
// Row items (n, band of rows) see every channel (the psi reduction over F_int); block items (n, block of
// whole groups) see one block over the whole image (BN statistics and gradients of the grouped convs).

// Loads row `row` of image n into a padded row with pixel stride J*CB for the lanes of a block whose first
// lane is output channel o0.
template <typename S, typename A>
void load_group_row(const View4& v, int64_t n, int64_t row, int o0, int og, int J, int lanes, A* dst, int wp,
                    int padl) {
  constexpr int CB = lanes_of<A>();
  const int64_t ps = (int64_t)J * CB;
  if (og == 1 && v.sc == 1 && lanes == CB && row >= 0 && row < v.h) {
    for (int q = 0; q < padl; ++q)
      for (int i = 0; i < ps; ++i) dst[q * ps + i] = A(0);
    for (int64_t q = padl + v.w; q < wp; ++q)
      for (int i = 0; i < ps; ++i) dst[q * ps + i] = A(0);
    const S* base = static_cast<const S*>(v.data) + n * v.sn + row * v.sh + (int64_t)o0 * J;
    A* d0 = dst + (int64_t)padl * ps;
    if (J == 2) {
      for (int64_t w = 0; w < v.w; ++w) {
        const S* s = base + w * v.sw;
        A* d = d0 + w * ps;
#pragma omp simd
        for (int l = 0; l < CB; ++l) {
          d[l] = load_val(s + 2 * l);
          d[CB + l] = load_val(s + 2 * l + 1);
        }
      }
    } else {
      for (int64_t w = 0; w < v.w; ++w) {
        const S* s = base + w * v.sw;
        A* d = d0 + w * ps;
        for (int j = 0; j < J; ++j)
          for (int l = 0; l < CB; ++l) d[j * CB + l] = load_val(s + (int64_t)l * J + j);
      }
    }
    return;
  }
  int64_t off[CB];
  for (int j = 0; j < J; ++j) {
    for (int l = 0; l < CB; ++l) off[l] = ((int64_t)((o0 + std::min(l, lanes - 1)) / og) * J + j) * v.sc;
    load_row<S, A>(v, n, row, off, lanes, v.sc == 1 && lanes_contiguous(off, lanes), dst + j * CB, wp, (int)ps,
                   padl);
  }
}

template <typename A>
EMCAD_INLINE A sigmoid_val(A v) {
  return A(1) / (A(1) + std::exp(-v));
}

enum LgagCoef {
  kSg = 0, kTgF, kSx, kTxF, kBg, kBx, kMg, kRg, kMx, kRx, kC2g, kC3g, kC2x, kC3x, kWpsi, kTg, kTx, kNumCoef
};

template <typename S>
struct LgagCtx {
  using A = typename emcad::AccType<S>::type;
  static constexpr int CB = lanes_of<A>();
  const LgagArgs& a;
  int K = 3, P = 1, Wp = 0, nblk = 1, bl = CB, kk = 9, nbands = 1;
  int G = 1, ngroups = 1;  // block items: blocks per item
  int nrings = 1;  // blocks with rings (row items: all, block items: the item's group)
  Scratch<A> wg_mem, wx_mem, wgr_mem, wxr_mem, coef_mem, ring_mem, gring_mem, zg, zx, pacc, prow, u, tmp, tmp2;
  Scratch<double> dprow_mem;
  int64_t ring_g_elems = 0, ring_x_elems = 0;
  int slots = 4;
  int64_t loaded = 0;
  int64_t n = 0;

  LgagCtx(const LgagArgs& args, bool row_items, bool need_grad) : a(args) {
    K = a.k;
    P = K / 2;
    kk = K * K;
    Wp = a.W + 2 * P;
    bl = a.block_lanes;
    nblk = (a.Fi + bl - 1) / bl;
    nbands = (a.H + a.band - 1) / std::max(a.band, 1);
    G = std::max(1, std::min(a.group, nblk));
    ngroups = (nblk + G - 1) / G;
    nrings = row_items ? nblk : G;
    slots = K + 1;
    const size_t wsz = (size_t)nblk * kk * CB;
    wg_mem.alloc(wsz * a.jg);
    wx_mem.alloc(wsz * a.jx);
    wgr_mem.alloc(wsz * a.jg);
    wxr_mem.alloc(wsz * a.jx);
    coef_mem.alloc((size_t)nblk * kNumCoef * CB);
    ring_g_elems = (int64_t)Wp * a.jg * CB;
    ring_x_elems = (int64_t)Wp * a.jx * CB;
    ring_mem.alloc((size_t)nrings * slots * (ring_g_elems + ring_x_elems));
    if (need_grad) gring_mem.alloc((size_t)G * slots * (ring_g_elems + ring_x_elems));
    const size_t row = (size_t)std::max(a.W, 1) * CB;
    zg.alloc(row);
    zx.alloc(row);
    pacc.alloc(row);
    u.alloc(row);
    tmp.alloc(row);
    tmp2.alloc(row);
    prow.alloc((size_t)std::max(a.W, 1));
    dprow_mem.alloc((size_t)std::max(a.W, 1));
    // per-block weights and coefficients
    for (int b = 0; b < nblk; ++b) {
      const int o0 = b * bl, lanes = std::min(bl, a.Fi - o0);
      for (int t = 0; t < kk; ++t)
        for (int l = 0; l < CB; ++l) {
          for (int j = 0; j < a.jg; ++j) {
            const double w = l < lanes ? a.wg[((int64_t)(o0 + l) * a.jg + j) * kk + t] : 0.0;
            const double f = (l < lanes && a.sg) ? a.sg[o0 + l] : 0.0;
            wgr(b)[(t * a.jg + j) * CB + l] = (A)w;
            wgf(b)[(t * a.jg + j) * CB + l] = (A)(w * f);
          }
          for (int j = 0; j < a.jx; ++j) {
            const double w = l < lanes ? a.wx[((int64_t)(o0 + l) * a.jx + j) * kk + t] : 0.0;
            const double f = (l < lanes && a.sx) ? a.sx[o0 + l] : 0.0;
            wxr(b)[(t * a.jx + j) * CB + l] = (A)w;
            wxf(b)[(t * a.jx + j) * CB + l] = (A)(w * f);
          }
        }
      auto at = [&](const double* p, int l) -> double { return (p && l < lanes) ? p[o0 + l] : 0.0; };
      for (int l = 0; l < CB; ++l) {
        const double sg = at(a.sg, l), tg = at(a.tg, l), sx = at(a.sx, l), tx = at(a.tx, l);
        const double bg = at(a.bg, l), bx = at(a.bx, l);
        coef(b, kSg)[l] = (A)sg;
        coef(b, kTgF)[l] = (A)(bg * sg + tg);
        coef(b, kSx)[l] = (A)sx;
        coef(b, kTxF)[l] = (A)(bx * sx + tx);
        coef(b, kBg)[l] = (A)bg;
        coef(b, kBx)[l] = (A)bx;
        coef(b, kMg)[l] = (A)at(a.mg, l);
        coef(b, kRg)[l] = (A)at(a.rg, l);
        coef(b, kMx)[l] = (A)at(a.mx, l);
        coef(b, kRx)[l] = (A)at(a.rx, l);
        coef(b, kC2g)[l] = (A)at(a.c2g, l);
        coef(b, kC3g)[l] = (A)at(a.c3g, l);
        coef(b, kC2x)[l] = (A)at(a.c2x, l);
        coef(b, kC3x)[l] = (A)at(a.c3x, l);
        coef(b, kWpsi)[l] = (A)at(a.wpsi, l);
        coef(b, kTg)[l] = (A)tg;
        coef(b, kTx)[l] = (A)tx;
      }
    }
  }

  A* wgf(int b) const { return wg_mem.get() + (size_t)b * kk * a.jg * CB; }
  A* wxf(int b) const { return wx_mem.get() + (size_t)b * kk * a.jx * CB; }
  A* wgr(int b) const { return wgr_mem.get() + (size_t)b * kk * a.jg * CB; }
  A* wxr(int b) const { return wxr_mem.get() + (size_t)b * kk * a.jx * CB; }
  A* coef(int b, int i) const { return coef_mem.get() + ((size_t)b * kNumCoef + i) * CB; }
  int o0(int b) const { return b * bl; }
  int lanes(int b) const { return std::min(bl, a.Fi - b * bl); }

  // ring slot r of ring set `ri` (block index for row items, 0 for block items)
  A* ring_g(int ri, int64_t r) const {
    return ring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + (r % slots) * ring_g_elems;
  }
  A* ring_x(int ri, int64_t r) const {
    return ring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + slots * ring_g_elems +
           (r % slots) * ring_x_elems;
  }
  A* gring_g(int ri, int64_t r) const {
    return gring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + (r % slots) * ring_g_elems;
  }
  A* gring_x(int ri, int64_t r) const {
    return gring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + slots * ring_g_elems +
           (r % slots) * ring_x_elems;
  }
  // block items: the item's first block and block count
  int b0 = 0, nbk = 1;
  void begin_block_item(int64_t item) {
    n = item / ngroups;
    b0 = (int)(item % ngroups) * G;
    nbk = std::min(G, nblk - b0);
  }
  void load_group_rows(int64_t h) {  // padded rows needed for output row h, for every block of the item
    for (int bi = 0; bi < nbk; ++bi) load_block_rows(bi, b0 + bi, h == 0 ? 0 : h + K - 1, h + K);
  }

  // loads padded rows [loaded, upto) of block b into ring set ri
  void load_block_rows(int ri, int b, int64_t from, int64_t upto) {
    for (int64_t r = from; r < upto; ++r) {
      load_group_row<S, A>(a.g, n, r - P, o0(b), a.og, a.jg, lanes(b), ring_g(ri, r), Wp, P);
      load_group_row<S, A>(a.x, n, r - P, o0(b), a.og, a.jx, lanes(b), ring_x(ri, r), Wp, P);
    }
  }

  void rows_of(int ri, int64_t h, bool x_ring, A** rows) const {
    for (int dy = 0; dy < K; ++dy) rows[dy] = x_ring ? ring_x(ri, h + dy) : ring_g(ri, h + dy);
  }

  // z rows of block b for output row h (folded: BN-applied a_g, a_x; raw: conv + bias)
  void z_rows(int ri, int b, int64_t h, bool fold) {
    A* rows[kMaxKernel];
    rows_of(ri, h, false, rows);
    conv_row_k<A>(K, a.jg, rows, fold ? wgf(b) : wgr(b), coef(b, fold ? kTgF : kBg), a.W, 1, zg.get(), 1);
    rows_of(ri, h, true, rows);
    conv_row_k<A>(K, a.jx, rows, fold ? wxf(b) : wxr(b), coef(b, fold ? kTxF : kBx), a.W, 1, zx.get(), 1);
  }

  // row items: p (psi logit before BN, incl. bias) for row h into prow; rings of all blocks advance together
  template <int ACT>
  void psi_row(int64_t h) {
    for (int b = 0; b < nblk; ++b) load_block_rows(b, b, std::max(loaded, h), h + K);
    loaded = std::max(loaded, h + K);
    A* pa = pacc.get();
    std::memset(pa, 0, sizeof(A) * (size_t)a.W * CB);
    for (int b = 0; b < nblk; ++b) {
      z_rows(b, b, h, true);
      const A* wp = coef(b, kWpsi);
      const A* g = zg.get();
      const A* x = zx.get();
      for (int64_t w = 0; w < a.W; ++w)
#pragma omp simd
        for (int l = 0; l < CB; ++l) pa[w * CB + l] += wp[l] * emcad::act_fwd<ACT>(g[w * CB + l] + x[w * CB + l]);
    }
    const A bp = (A)a.bpsi;
    for (int64_t w = 0; w < a.W; ++w) {
      A s = A(0);
      for (int l = 0; l < CB; ++l) s += pa[w * CB + l];
      prow.get()[w] = s + bp;
    }
  }

  void begin_row_item(int64_t item) {
    n = item / nbands;
    loaded = (item % nbands) * (int64_t)a.band;
  }
  void band_of(int64_t item, int64_t& h0, int64_t& h1) const {
    h0 = (item % nbands) * (int64_t)a.band;
    h1 = std::min<int64_t>(a.H, h0 + a.band);
  }
};

template <typename S>
void lgag_stats(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, false, false);
  std::vector<emcad::Welford> accg((size_t)ctx.G * CB), accx((size_t)ctx.G * CB);
  for (int64_t item = i0; item < i1; ++item) {
    ctx.begin_block_item(item);
    std::fill(accg.begin(), accg.end(), emcad::Welford());
    std::fill(accx.begin(), accx.end(), emcad::Welford());
    for (int64_t h = 0; h < a.H; ++h) {
      ctx.load_group_rows(h);
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        ctx.z_rows(bi, ctx.b0 + bi, h, false);
        row_stats<A>(ctx.zg.get(), a.W, &accg[(size_t)bi * CB]);
        row_stats<A>(ctx.zx.get(), a.W, &accx[(size_t)bi * CB]);
      }
    }
    for (int bi = 0; bi < ctx.nbk; ++bi)
      for (int l = 0; l < ctx.lanes(ctx.b0 + bi); ++l) {
        const int64_t idx = ctx.n * a.Fi + ctx.o0(ctx.b0 + bi) + l;
        a.sg0[idx] = accg[(size_t)bi * CB + l].mean;
        a.sg1[idx] = accg[(size_t)bi * CB + l].m2;
        a.sx0[idx] = accx[(size_t)bi * CB + l].mean;
        a.sx1[idx] = accx[(size_t)bi * CB + l].m2;
      }
  }
}

template <typename S>
void lgag_psi(const LgagArgs& a, int64_t i0, int64_t i1) {
  LgagCtx<S> ctx(a, true, false);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_row_item(item);
      int64_t h0, h1;
      ctx.band_of(item, h0, h1);
      emcad::Welford acc;
      for (int64_t h = h0; h < h1; ++h) {
        ctx.template psi_row<ACT>(h);
        double* dst = a.pbuf + (ctx.n * a.H + h) * a.W;
        double s = 0;
        for (int64_t w = 0; w < a.W; ++w) {
          dst[w] = (double)ctx.prow.get()[w];
          s += dst[w];
        }
        const double mean = s / a.W;
        double m2 = 0;
        for (int64_t w = 0; w < a.W; ++w) m2 += (dst[w] - mean) * (dst[w] - mean);
        acc.merge((double)a.W, mean, m2);
      }
      a.sp0[item] = acc.n;
      a.sp1[item] = acc.mean;
      a.sp2[item] = acc.m2;
    }
  });
}

// out = x * sigmoid(p*sp + tp) (+ g) for row h, psi row given in ctx.prow as ap (already BN-applied sigmoid)
template <typename S, typename A>
void lgag_out_row(LgagCtx<S>& ctx, const LgagArgs& a, int64_t h, const A* psi) {
  constexpr int CB = lanes_of<A>();
  int64_t off[CB], goff[CB], ooff[CB];
  for (int c0 = 0; c0 < a.Fl; c0 += CB) {
    const int lanes = std::min(CB, a.Fl - c0);
    for (int l = 0; l < CB; ++l) {
      const int64_t c = c0 + std::min(l, lanes - 1);
      off[l] = c * a.x.sc;
      goff[l] = c * a.g.sc;
      ooff[l] = c * a.out.sc;
    }
    A* xb = ctx.tmp.get();
    A* gb = ctx.tmp2.get();
    load_row<S, A>(a.x, ctx.n, h, off, lanes, a.x.sc == 1, xb, a.W, CB, 0);
    if (a.add_gate) {
      load_row<S, A>(a.g, ctx.n, h, goff, lanes, a.g.sc == 1, gb, a.W, CB, 0);
      for (int64_t w = 0; w < a.W; ++w) {
        const A ps = psi[w];
#pragma omp simd
        for (int l = 0; l < CB; ++l) xb[w * CB + l] = xb[w * CB + l] * ps + gb[w * CB + l];
      }
    } else {
      for (int64_t w = 0; w < a.W; ++w) {
        const A ps = psi[w];
#pragma omp simd
        for (int l = 0; l < CB; ++l) xb[w * CB + l] *= ps;
      }
    }
    store_row<S, A>(a.out, ctx.n, h, ooff, lanes, a.out.sc == 1, xb, a.W, CB);
  }
}

template <typename S>
void lgag_apply(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  LgagCtx<S> ctx(a, a.pbuf == nullptr, false);
  std::vector<A> psi((size_t)std::max(a.W, 1));
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_row_item(item);
      int64_t h0, h1;
      ctx.band_of(item, h0, h1);
      for (int64_t h = h0; h < h1; ++h) {
        if (a.pbuf) {
          const double* p = a.pbuf + (ctx.n * a.H + h) * a.W;
          for (int64_t w = 0; w < a.W; ++w) psi[w] = (A)sigmoid_val<double>(p[w] * a.sp + a.tp);
        } else {
          ctx.template psi_row<ACT>(h);
          for (int64_t w = 0; w < a.W; ++w) psi[w] = sigmoid_val<A>(ctx.prow.get()[w] * (A)a.sp + (A)a.tp);
        }
        lgag_out_row<S, A>(ctx, a, h, psi.data());
      }
    }
  });
}

template <typename S>
void lgag_bwd_psi(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, true, false);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    int64_t off[CB], goff[CB];
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_row_item(item);
      int64_t h0, h1;
      ctx.band_of(item, h0, h1);
      double s1 = 0, s2 = 0;
      for (int64_t h = h0; h < h1; ++h) {
        ctx.template psi_row<ACT>(h);
        // ds = sum_c grad[c] * x[c]
        A* acc = ctx.pacc.get();
        std::memset(acc, 0, sizeof(A) * (size_t)a.W * CB);
        for (int c0 = 0; c0 < a.Fl; c0 += CB) {
          const int lanes = std::min(CB, a.Fl - c0);
          for (int l = 0; l < CB; ++l) {
            const int64_t c = c0 + std::min(l, lanes - 1);
            off[l] = c * a.x.sc;
            goff[l] = c * a.grad.sc;
          }
          A* xb = ctx.tmp.get();
          A* gb = ctx.tmp2.get();
          load_row<S, A>(a.x, ctx.n, h, off, lanes, a.x.sc == 1, xb, a.W, CB, 0);
          load_row<S, A>(a.grad, ctx.n, h, goff, lanes, a.grad.sc == 1, gb, a.W, CB, 0);
#pragma omp simd
          for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) acc[i] += xb[i] * gb[i];
        }
        double* pd = a.pbuf + (ctx.n * a.H + h) * a.W;
        double* dd = a.dbuf + (ctx.n * a.H + h) * a.W;
        double r1 = 0, r2 = 0;
        for (int64_t w = 0; w < a.W; ++w) {
          A ds = A(0);
          for (int l = 0; l < CB; ++l) ds += acc[w * CB + l];
          const double p = (double)ctx.prow.get()[w];
          const double psi = sigmoid_val<double>(p * a.sp + a.tp);
          const double dap = (double)ds * psi * (1.0 - psi);
          pd[w] = p;
          dd[w] = dap;
          r1 += dap;
          r2 += dap * ((p - a.mp) * a.rp);
        }
        s1 += r1;
        s2 += r2;
      }
      a.sp0[item] = s1;
      a.sp1[item] = s2;
    }
  });
}

// Block pass per row: recomputes z_g, z_x (conv + bias), u, h and du; optionally the BN-backward sums,
// the psi weight-gradient sums and dz_g, dz_x.
template <int ACT, typename S>
void lgag_block_row(LgagCtx<S>& ctx, const LgagArgs& a, int ri, int b, int64_t h, double* su, double* sug, double* sux,
                    double* sph, double* dpsum, typename LgagCtx<S>::A* dzg, typename LgagCtx<S>::A* dzx,
                    double* bgs, double* bxs) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  ctx.z_rows(ri, b, h, false);
  // dp per pixel
  double* dp = ctx.dprow_mem.get();
  const double* pd = a.pbuf + (ctx.n * a.H + h) * a.W;
  const double* dd = a.dbuf + (ctx.n * a.H + h) * a.W;
  double dps = 0;
  for (int64_t w = 0; w < a.W; ++w) {
    dp[w] = a.cp1 * dd[w] + a.cp2 * ((pd[w] - a.mp) * a.rp) + a.cp3;
    dps += dp[w];
  }
  if (dpsum) *dpsum += dps;
  const A *sg = ctx.coef(b, kSg), *tg = ctx.coef(b, kTg), *sx = ctx.coef(b, kSx), *tx = ctx.coef(b, kTx);
  const A *mg = ctx.coef(b, kMg), *rg = ctx.coef(b, kRg), *mx = ctx.coef(b, kMx), *rx = ctx.coef(b, kRx);
  const A *c2g = ctx.coef(b, kC2g), *c3g = ctx.coef(b, kC3g), *c2x = ctx.coef(b, kC2x), *c3x = ctx.coef(b, kC3x);
  const A* wp = ctx.coef(b, kWpsi);
  A t_u[CB], t_ug[CB], t_ux[CB], t_ph[CB], t_bg[CB], t_bx[CB];
  for (int l = 0; l < CB; ++l) t_u[l] = t_ug[l] = t_ux[l] = t_ph[l] = t_bg[l] = t_bx[l] = A(0);
  const A* zgp = ctx.zg.get();
  const A* zxp = ctx.zx.get();
  for (int64_t w = 0; w < a.W; ++w) {
    const A dpw = (A)dp[w];
#pragma omp simd
    for (int l = 0; l < CB; ++l) {
      const A zg = zgp[w * CB + l], zx = zxp[w * CB + l];
      const A uu = zg * sg[l] + tg[l] + zx * sx[l] + tx[l];
      const A du = emcad::act_bwd<ACT>(uu, dpw * wp[l]);
      const A zhg = (zg - mg[l]) * rg[l];
      const A zhx = (zx - mx[l]) * rx[l];
      t_u[l] += du;
      t_ug[l] += du * zhg;
      t_ux[l] += du * zhx;
      t_ph[l] += dpw * emcad::act_fwd<ACT>(uu);
      const A gzg = sg[l] * du + c2g[l] * zhg + c3g[l];
      const A gzx = sx[l] * du + c2x[l] * zhx + c3x[l];
      t_bg[l] += gzg;
      t_bx[l] += gzx;
      if (dzg) {
        dzg[w * CB + l] = gzg;
        dzx[w * CB + l] = gzx;
      }
    }
  }
  for (int l = 0; l < CB; ++l) {
    if (su) {
      su[l] += (double)t_u[l];
      sug[l] += (double)t_ug[l];
      sux[l] += (double)t_ux[l];
      sph[l] += (double)t_ph[l];
    }
    if (bgs) {
      bgs[l] += (double)t_bg[l];
      bxs[l] += (double)t_bx[l];
    }
  }
}

template <typename S>
void lgag_bwd_reduce(const LgagArgs& a, int64_t i0, int64_t i1) {
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, false, false);
  const size_t gl = (size_t)ctx.G * CB;
  std::vector<double> su(gl), sug(gl), sux(gl), sph(gl);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_block_item(item);
      for (auto* v : {&su, &sug, &sux, &sph}) std::fill(v->begin(), v->end(), 0.0);
      double dps = 0;
      for (int64_t h = 0; h < a.H; ++h) {
        ctx.load_group_rows(h);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          const int b = ctx.b0 + bi;
          const size_t o = (size_t)bi * CB;
          lgag_block_row<ACT, S>(ctx, a, bi, b, h, &su[o], &sug[o], &sux[o], &sph[o], b == 0 ? &dps : nullptr,
                                 nullptr, nullptr, nullptr, nullptr);
        }
      }
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int l = 0; l < ctx.lanes(ctx.b0 + bi); ++l) {
          const int64_t idx = ctx.n * a.Fi + ctx.o0(ctx.b0 + bi) + l;
          const size_t o = (size_t)bi * CB + l;
          a.su[idx] = su[o];
          a.sug[idx] = sug[o];
          a.sux[idx] = sux[o];
          a.sph[idx] = sph[o];
        }
      if (ctx.b0 == 0) a.dpsum[ctx.n] = dps;
    }
  });
}

// writes the finished padded gradient row r of one input (g or x) of block b
template <typename S, typename A>
void lgag_flush_row(LgagCtx<S>& ctx, const LgagArgs& a, int ri, int b, int64_t r, bool is_x) {
  constexpr int CB = lanes_of<A>();
  const int64_t h = r - ctx.P;
  if (h < 0 || h >= a.H) return;
  const int J = is_x ? a.jx : a.jg;
  const View4& dst = is_x ? a.gx : a.gg;
  const A* src = (is_x ? ctx.gring_x(ri, r) : ctx.gring_g(ri, r)) + (int64_t)ctx.P * J * CB;
  const int og = a.og, lanes = ctx.lanes(b), nl = (lanes + og - 1) / og;
  const int g0 = ctx.o0(b) / og;  // first group of the block
  A* t = ctx.tmp.get();
  A* e = ctx.tmp2.get();
  std::vector<A> psi;
  const bool add_grad = is_x || a.add_gate;
  if (is_x) {
    psi.resize((size_t)std::max(a.W, 1));
    const double* p = a.pbuf + (ctx.n * a.H + h) * a.W;
    for (int64_t w = 0; w < a.W; ++w) psi[w] = (A)sigmoid_val<double>(p[w] * a.sp + a.tp);
  }
  int64_t off[CB], goff[CB];
  for (int j = 0; j < J; ++j) {
    for (int i = 0; i < CB; ++i) {
      const int64_t c = (int64_t)(g0 + std::min(i, nl - 1)) * J + j;
      off[i] = c * dst.sc;
      goff[i] = c * a.grad.sc;
    }
    for (int64_t w = 0; w < a.W; ++w) {
      const A* s = src + w * J * CB + j * CB;
      for (int i = 0; i < CB; ++i) {
        A v = A(0);
        if (i < nl)
          for (int q = 0; q < og; ++q) v += s[i * og + q];
        t[w * CB + i] = v;
      }
    }
    if (add_grad) {
      load_row<S, A>(a.grad, ctx.n, h, goff, nl, a.grad.sc == 1 && lanes_contiguous(goff, nl), e, a.W, CB, 0);
      for (int64_t w = 0; w < a.W; ++w) {
        const A m = is_x ? psi[w] : A(1);
#pragma omp simd
        for (int i = 0; i < CB; ++i) t[w * CB + i] += e[w * CB + i] * m;
      }
    }
    store_row<S, A>(dst, ctx.n, h, off, nl, dst.sc == 1 && lanes_contiguous(off, nl), t, a.W, CB);
  }
}

template <typename S>
void lgag_bwd_grad(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, false, true);
  const int kk = ctx.kk;
  const size_t ng = (size_t)kk * a.jg * CB, nx = (size_t)kk * a.jx * CB;
  Scratch<double> dg(ctx.G * ng), dx(ctx.G * nx);
  Scratch<A> dzg((size_t)std::max(a.W, 1) * CB), dzx((size_t)std::max(a.W, 1) * CB);
  const int64_t Hp = (int64_t)a.H + 2 * ctx.P;
  const bool sums = a.su != nullptr;  // eval mode: BN-backward sums come from this pass
  const size_t gl = (size_t)ctx.G * CB;
  std::vector<double> su(gl), sug(gl), sux(gl), sph(gl), bgs(gl), bxs(gl);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_block_item(item);
      dg.zero();
      dx.zero();
      for (auto* v : {&su, &sug, &sux, &sph, &bgs, &bxs}) std::fill(v->begin(), v->end(), 0.0);
      double dps = 0;
      int64_t inited = 0, flushed = 0;
      auto init_row = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          std::memset(ctx.gring_g(bi, r), 0, sizeof(A) * ctx.ring_g_elems);
          std::memset(ctx.gring_x(bi, r), 0, sizeof(A) * ctx.ring_x_elems);
        }
      };
      auto flush = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          lgag_flush_row<S, A>(ctx, a, bi, ctx.b0 + bi, r, false);
          lgag_flush_row<S, A>(ctx, a, bi, ctx.b0 + bi, r, true);
        }
      };
      for (int64_t h = 0; h < a.H; ++h) {
        ctx.load_group_rows(h);
        for (; flushed < h; ++flushed) {
          if (flushed >= inited) init_row(inited++);
          flush(flushed);
        }
        for (; inited < h + ctx.K; ++inited) init_row(inited);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          const int b = ctx.b0 + bi;
          const size_t o = (size_t)bi * CB;
          lgag_block_row<ACT, S>(ctx, a, bi, b, h, sums ? &su[o] : nullptr, &sug[o], &sux[o], &sph[o],
                                 (sums && b == 0) ? &dps : nullptr, dzg.get(), dzx.get(), &bgs[o], &bxs[o]);
          A* rows[kMaxKernel];
          A* grows[kMaxKernel];
          ctx.rows_of(bi, h, false, rows);
          for (int dy = 0; dy < ctx.K; ++dy) grows[dy] = ctx.gring_g(bi, h + dy);
          wgrad_row_k<A>(ctx.K, a.jg, rows, dzg.get(), 1, a.W, 1, dg.get() + bi * ng);
          scatter_row_k<A>(ctx.K, a.jg, grows, ctx.wgr(b), dzg.get(), 1, a.W, 1);
          ctx.rows_of(bi, h, true, rows);
          for (int dy = 0; dy < ctx.K; ++dy) grows[dy] = ctx.gring_x(bi, h + dy);
          wgrad_row_k<A>(ctx.K, a.jx, rows, dzx.get(), 1, a.W, 1, dx.get() + bi * nx);
          scatter_row_k<A>(ctx.K, a.jx, grows, ctx.wxr(b), dzx.get(), 1, a.W, 1);
        }
      }
      for (; flushed < Hp; ++flushed) {
        if (flushed >= inited) init_row(inited++);
        flush(flushed);
      }
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        const int b = ctx.b0 + bi;
        for (int l = 0; l < ctx.lanes(b); ++l) {
          const int64_t o = ctx.o0(b) + l;
          const int64_t idx = ctx.n * a.Fi + o;
          const size_t q = (size_t)bi * CB + l;
          for (int j = 0; j < a.jg; ++j)
            for (int t = 0; t < kk; ++t)
              a.wgpart[((ctx.n * a.Fi + o) * a.jg + j) * kk + t] = dg.get()[bi * ng + ((size_t)t * a.jg + j) * CB + l];
          for (int j = 0; j < a.jx; ++j)
            for (int t = 0; t < kk; ++t)
              a.wxpart[((ctx.n * a.Fi + o) * a.jx + j) * kk + t] = dx.get()[bi * nx + ((size_t)t * a.jx + j) * CB + l];
          a.bgpart[idx] = bgs[q];
          a.bxpart[idx] = bxs[q];
          if (sums) {
            a.su[idx] = su[q];
            a.sug[idx] = sug[q];
            a.sux[idx] = sux[q];
            a.sph[idx] = sph[q];
          }
        }
      }
      if (sums && ctx.b0 == 0) a.dpsum[ctx.n] = dps;
    }
  });
}

// the kernels of storage type S (LgagKernels, lgag.h)
template <typename S>
LgagKernels lgag_kernels() {
  LgagKernels k;
  k.stats = lgag_stats<S>;
  k.psi = lgag_psi<S>;
  k.apply = lgag_apply<S>;
  k.bwd_psi = lgag_bwd_psi<S>;
  k.bwd_reduce = lgag_bwd_reduce<S>;
  k.bwd_grad = lgag_bwd_grad<S>;
  return k;
}
