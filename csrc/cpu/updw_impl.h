// Kernels of upsample_dwconv: BN statistics, apply, and the two backward passes. Compiled once per instruction
// set inside namespace emcad_cpu::isa_<name> (isa_target.h). Interface (UpdwArgs, UpdwKernels): cpu/updw.h;
// torch binding: cpu/updw.cpp; shared helpers: cpu/stencil_common.h. No torch headers.
#pragma once
#include "cpu/stencil_common.h"

// Nearest (any integer scale S): polyphase stencils on the low-resolution rows (EMCAD.md §11.3).
// Bilinear x2: upsampled rows are produced on the fly into a small ring (never the whole tensor), then the
// k x k stencil runs on them; the backward applies the transposed interpolation row by row.
// Items are (n, group of channel blocks), rows outer and blocks inner, as for MSDC.
template <typename S>
struct UpdwCtx {
  using A = typename emcad::AccType<S>::type;
  static constexpr int CB = lanes_of<A>();
  const UpdwArgs& a;
  emcad::Polyphase poly{2, 3, 1};
  int T = 1, PL = 0, PH = 0, Wp = 0, nblocks = 1, p = 0, G = 1, ngroups = 1, nk = 1;
  Scratch<A> ring_mem, xr_mem, tmp, k_mem, kraw_mem, coef_mem, zrow, grow, gzrow, gring_mem, gx_mem;
  Ring<A> ring, gring, xring, gxring;  // per block bi: slots [bi*slots, (bi+1)*slots)
  std::vector<int64_t> xoff, gxoff, yoff, goff;  // [G][CB]
  std::vector<char> xcontig, gxcontig, ycontig, gcontig;
  std::vector<int> c0, lanes;
  int64_t n = 0;
  int nbk = 0;
  int64_t loaded = 0, xloaded = 0;

  UpdwCtx(const UpdwArgs& args, bool need_grad) : a(args) {
    nblocks = (a.C + CB - 1) / CB;
    G = std::max(1, std::min(a.group, nblocks));
    ngroups = (nblocks + G - 1) / G;
    p = a.k / 2;
    const size_t row = (size_t)std::max(a.Wo, 1) * CB;
    zrow.alloc(row);
    if (need_grad) {
      grow.alloc(row);
      gzrow.alloc(row);
    }
    if (!a.bilinear) {
      poly = emcad::Polyphase{a.S, a.k, p};
      T = poly.taps();
      PL = poly.pad_lo();
      PH = poly.pad_hi();
      Wp = a.W + PL + PH;
      ring.slots = PL + PH + 2;
      ring.row_elems = (int64_t)Wp * CB;
      nk = a.S * a.S * T * T;
    } else {
      ring.slots = a.k + 1;  // upsampled rows, padded by p on both sides
      ring.row_elems = (int64_t)(2 * a.W + 2 * p) * CB;
      xring.slots = 4;
      xring.row_elems = (int64_t)std::max(a.W, 1) * CB;
      xr_mem.alloc((size_t)G * xring.slots * xring.row_elems);
      xring.buf = xr_mem.get();
      tmp.alloc((size_t)std::max(a.W, 1) * CB);
      nk = a.k * a.k;
      if (need_grad) {
        gxring = xring;
        gx_mem.alloc((size_t)G * xring.slots * xring.row_elems);
        gxring.buf = gx_mem.get();
      }
    }
    ring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
    ring.buf = ring_mem.get();
    if (need_grad) {
      gring = ring;
      gring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
      gring.buf = gring_mem.get();
    }
    // (polyphase) kernels, folded and raw, and coefficients of every block: built once per call and thread
    k_mem.alloc((size_t)nblocks * nk * CB);
    kraw_mem.alloc((size_t)nblocks * nk * CB);
    coef_mem.alloc((size_t)nblocks * 8 * CB);
    for (int blk = 0; blk < nblocks; ++blk) build_block(blk);
    for (auto* v : {&xoff, &gxoff, &yoff, &goff}) v->resize((size_t)G * CB);
    for (auto* v : {&xcontig, &gxcontig, &ycontig, &gcontig}) v->resize(G);
    c0.resize(G);
    lanes.resize(G);
  }

  static A* rrow(const Ring<A>& r, int bi, int64_t row) {
    return r.buf + ((size_t)bi * r.slots + (size_t)(row % r.slots)) * r.row_elems;
  }
  int blk0 = 0;  // first channel block of the current item
  A* coef(int bi, int i) const { return coef_mem.get() + ((size_t)(blk0 + bi) * 8 + i) * CB; }
  A* kern(int bi, bool fold) const {
    return (fold ? k_mem.get() : kraw_mem.get()) + (size_t)(blk0 + bi) * nk * CB;
  }

  void build_block(int blk) {
    const int cb0 = blk * CB, L = std::min(CB, a.C - cb0), kk = a.k * a.k;
    const double* src[6] = {a.scale, a.shift, a.mean, a.rstd, a.c2, a.c3};
    A* cf = coef_mem.get() + (size_t)blk * 8 * CB;
    for (int i = 0; i < 6; ++i)
      for (int l = 0; l < CB; ++l) cf[i * CB + l] = (src[i] && l < L) ? (A)src[i][cb0 + l] : A(0);
    auto wval = [&](int l, int t, bool f) -> double {
      if (l >= L) return 0.0;
      double v = a.w[(int64_t)(cb0 + l) * kk + t];
      if (f) v *= a.scale[cb0 + l];
      return v;
    };
    A* kf = k_mem.get() + (size_t)blk * nk * CB;
    A* kr = kraw_mem.get() + (size_t)blk * nk * CB;
    if (!a.bilinear) {
      std::vector<double> kd((size_t)nk * CB, 0.0), kdr((size_t)nk * CB, 0.0);
      for (int ph = 0; ph < a.S; ++ph)
        for (int q = 0; q < a.S; ++q)
          for (int dy = 0; dy < a.k; ++dy)
            for (int dx = 0; dx < a.k; ++dx) {
              const int r = poly.tap(ph, dy), sidx = poly.tap(q, dx);
              const size_t base = (((size_t)(ph * a.S + q) * T + r) * T + sidx) * CB;
              for (int l = 0; l < CB; ++l) {
                kd[base + l] += wval(l, dy * a.k + dx, a.scale != nullptr);
                kdr[base + l] += wval(l, dy * a.k + dx, false);
              }
            }
      for (size_t i = 0; i < (size_t)nk * CB; ++i) {
        kf[i] = (A)kd[i];
        kr[i] = (A)kdr[i];
      }
    } else {
      for (int t = 0; t < kk; ++t)
        for (int l = 0; l < CB; ++l) {
          kf[t * CB + l] = (A)wval(l, t, a.scale != nullptr);
          kr[t * CB + l] = (A)wval(l, t, false);
        }
    }
  }
  A* pk(int bi, int ph, int q, bool fold) const { return kern(bi, fold) + ((size_t)(ph * a.S + q) * T * T) * CB; }

  void begin_item(int64_t item) {
    n = item / ngroups;
    const int b0 = (int)(item % ngroups) * G;
    blk0 = b0;
    nbk = std::min(G, nblocks - b0);
    for (int bi = 0; bi < nbk; ++bi) {
      c0[bi] = (b0 + bi) * CB;
      lanes[bi] = std::min(CB, a.C - c0[bi]);
      const int L = lanes[bi];
      int64_t *xo = &xoff[(size_t)bi * CB], *gxo = &gxoff[(size_t)bi * CB], *yo = &yoff[(size_t)bi * CB],
              *go = &goff[(size_t)bi * CB];
      for (int l = 0; l < CB; ++l) {
        const int64_t c = c0[bi] + std::min(l, L - 1);
        xo[l] = c * a.x.sc;
        gxo[l] = c * a.gx.sc;
        yo[l] = c * a.y.sc;
        go[l] = c * a.g.sc;
      }
      xcontig[bi] = a.x.sc == 1 && lanes_contiguous(xo, L);
      gxcontig[bi] = a.gx.sc == 1 && lanes_contiguous(gxo, L);
      ycontig[bi] = a.y.sc == 1 && lanes_contiguous(yo, L);
      gcontig[bi] = a.g.sc == 1 && lanes_contiguous(go, L);
    }
    loaded = 0;
    xloaded = 0;
  }

  // ---- nearest: low-res padded rows [0, upto) of every block ----
  void load_lowres_until(int64_t upto) {
    for (; loaded < upto; ++loaded)
      for (int bi = 0; bi < nbk; ++bi)
        load_row<S, A>(a.x, n, loaded - PL, &xoff[(size_t)bi * CB], lanes[bi], xcontig[bi], rrow(ring, bi, loaded),
                       Wp, CB, PL);
  }

  void nearest_row(int bi, int64_t y, bool fold) {
    const int64_t i = y / a.S;
    const int ph = (int)(y % a.S);
    for (int q = 0; q < a.S; ++q) {
      A* rows[kMaxKernel];
      const int64_t coff = (int64_t)(poly.rb(q) + PL) * CB;
      for (int r = 0; r < T; ++r) rows[r] = rrow(ring, bi, i + poly.rb(ph) + PL + r) + coff;
      conv_row_k<A>(T, 1, rows, pk(bi, ph, q, fold), fold ? coef(bi, 1) : nullptr, a.W, 1,
                    zrow.get() + (int64_t)q * CB, a.S);
    }
  }

  // ---- bilinear x2: upsampled padded rows [0, upto) of every block ----
  void lowres_until(int64_t i) {  // low-res rows are needed in increasing order, window of at most 3
    for (; xloaded <= i; ++xloaded)
      for (int bi = 0; bi < nbk; ++bi)
        load_row<S, A>(a.x, n, xloaded, &xoff[(size_t)bi * CB], lanes[bi], xcontig[bi], rrow(xring, bi, xloaded),
                       a.W, CB, 0);
  }

  void make_up_row(int bi, int64_t r) {
    A* dst = rrow(ring, bi, r);
    const int64_t u = r - p;
    std::memset(dst, 0, sizeof(A) * ring.row_elems);
    if (u < 0 || u >= 2LL * a.H) return;
    const emcad::Lerp2 v = emcad::bilinear2_src((int)u, a.H);
    const A* x0 = rrow(xring, bi, v.i0);
    const A* x1 = rrow(xring, bi, v.i1);
    A* t = tmp.get();
    const A l0 = (A)v.l0, l1 = (A)v.l1;
#pragma omp simd
    for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) t[i] = l0 * x0[i] + l1 * x1[i];
    A* d = dst + (int64_t)p * CB;
    for (int xo = 0; xo < 2 * a.W; ++xo) {
      const emcad::Lerp2 hz = emcad::bilinear2_src(xo, a.W);
      const A m0 = (A)hz.l0, m1 = (A)hz.l1;
      const A* s0 = t + (int64_t)hz.i0 * CB;
      const A* s1 = t + (int64_t)hz.i1 * CB;
#pragma omp simd
      for (int l = 0; l < CB; ++l) d[(int64_t)xo * CB + l] = m0 * s0[l] + m1 * s1[l];
    }
  }

  void up_until(int64_t upto) {
    for (; loaded < upto; ++loaded) {
      const int64_t u = loaded - p;
      if (u >= 0 && u < 2LL * a.H) lowres_until(emcad::bilinear2_src((int)u, a.H).i1);
      for (int bi = 0; bi < nbk; ++bi) make_up_row(bi, loaded);
    }
  }

  void bilinear_row(int bi, int64_t y, bool fold) {
    A* rows[kMaxKernel];
    for (int dy = 0; dy < a.k; ++dy) rows[dy] = rrow(ring, bi, y + dy);
    conv_row_k<A>(a.k, 1, rows, kern(bi, fold), fold ? coef(bi, 1) : nullptr, a.Wo, 1, zrow.get(), 1);
  }

  // rows needed for output row y, for every block
  void prepare(int64_t y) {
    if (a.bilinear) up_until(y + a.k);
    else load_lowres_until(y / a.S + PL + PH + 1);
  }

  void out_row(int bi, int64_t y, bool fold) {
    if (a.bilinear) bilinear_row(bi, y, fold);
    else nearest_row(bi, y, fold);
  }
};

// Nearest x2 + 3x3 (EMCAD's EUCB) in eval/apply form: one output row of phase ph, both column phases per
// low-res column (6 input vectors feed 8 FMAs and 2 outputs), bias, activation and the store fused; `out` is
// pixel 0 of the output row, `osw` its pixel stride (lanes contiguous). r0/r1: padded low-res rows.
template <int ACT, typename SO, typename A>
__attribute__((noinline)) void updw2x3_row(const A* __restrict__ r0, const A* __restrict__ r1,
                                           const A* __restrict__ k0, const A* __restrict__ k1,
                                           const A* __restrict__ init, int W, SO* __restrict__ out, int64_t osw) {
  constexpr int CB = lanes_of<A>();
  for (int j = 0; j < W; ++j) {
    const A* a0 = r0 + (int64_t)j * CB;
    const A* a1 = r1 + (int64_t)j * CB;
    SO* o0 = out + (int64_t)(2 * j) * osw;
    SO* o1 = o0 + osw;
#pragma omp simd
    for (int l = 0; l < CB; ++l) {
      const A x00 = a0[l], x01 = a0[CB + l], x02 = a0[2 * CB + l];
      const A x10 = a1[l], x11 = a1[CB + l], x12 = a1[2 * CB + l];
      A v0 = init[l] + k0[l] * x00 + k0[CB + l] * x01 + k0[2 * CB + l] * x10 + k0[3 * CB + l] * x11;
      A v1 = init[l] + k1[l] * x01 + k1[CB + l] * x02 + k1[2 * CB + l] * x11 + k1[3 * CB + l] * x12;
      store_val(o0 + l, emcad::act_fwd<ACT>(v0));
      store_val(o1 + l, emcad::act_fwd<ACT>(v1));
    }
  }
}

template <typename S>
void updw_stats(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, false);
  std::vector<emcad::Welford> acc((size_t)ctx.G * CB);
  for (int64_t item = i0; item < i1; ++item) {
    ctx.begin_item(item);
    std::fill(acc.begin(), acc.end(), emcad::Welford());
    for (int64_t y = 0; y < a.Ho; ++y) {
      ctx.prepare(y);
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        ctx.out_row(bi, y, false);
        row_stats<A>(ctx.zrow.get(), a.Wo, &acc[(size_t)bi * CB]);
      }
    }
    for (int bi = 0; bi < ctx.nbk; ++bi)
      for (int l = 0; l < ctx.lanes[bi]; ++l) {
        a.p0[ctx.n * a.C + ctx.c0[bi] + l] = acc[(size_t)bi * CB + l].mean;
        a.p1[ctx.n * a.C + ctx.c0[bi] + l] = acc[(size_t)bi * CB + l].m2;
      }
  }
}

template <typename S>
void updw_apply(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, false);
  const bool x2k3 = !a.bilinear && a.S == 2 && a.k == 3;  // EMCAD's EUCB: fused row kernel
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item);
      for (int64_t y = 0; y < a.Ho; ++y) {
        ctx.prepare(y);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          if (x2k3) {
            const int64_t i = y / 2;
            const int ph = (int)(y % 2);
            const A* r0 = UpdwCtx<S>::rrow(ctx.ring, bi, i + ctx.poly.rb(ph) + ctx.PL);
            const A* r1 = UpdwCtx<S>::rrow(ctx.ring, bi, i + ctx.poly.rb(ph) + ctx.PL + 1);
            const A* k0 = ctx.pk(bi, ph, 0, true);
            const A* k1 = ctx.pk(bi, ph, 1, true);
            if (ctx.ycontig[bi] && ctx.lanes[bi] == CB) {  // straight into the output tensor
              S* out = static_cast<S*>(a.y.data) + ctx.n * a.y.sn + y * a.y.sh + ctx.c0[bi];
              updw2x3_row<ACT, S, A>(r0, r1, k0, k1, ctx.coef(bi, 1), a.W, out, a.y.sw);
            } else {
              updw2x3_row<ACT, A, A>(r0, r1, k0, k1, ctx.coef(bi, 1), a.W, ctx.zrow.get(), CB);
              store_row<S, A>(a.y, ctx.n, y, &ctx.yoff[(size_t)bi * CB], ctx.lanes[bi], ctx.ycontig[bi],
                              ctx.zrow.get(), a.Wo, CB);
            }
            continue;
          }
          ctx.out_row(bi, y, true);
          act_row<ACT, A>(ctx.zrow.get(), ctx.zrow.get(), a.Wo, false);
          store_row<S, A>(a.y, ctx.n, y, &ctx.yoff[(size_t)bi * CB], ctx.lanes[bi], ctx.ycontig[bi], ctx.zrow.get(),
                          a.Wo, CB);
        }
      }
    }
  });
}

template <typename S>
void updw_bwd_reduce(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, true);
  std::vector<double> s1((size_t)ctx.G * CB), s2((size_t)ctx.G * CB);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item);
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t y = 0; y < a.Ho; ++y) {
        ctx.prepare(y);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          ctx.out_row(bi, y, false);
          load_row<S, A>(a.g, ctx.n, y, &ctx.goff[(size_t)bi * CB], ctx.lanes[bi], ctx.gcontig[bi], ctx.grow.get(),
                         a.Wo, CB, 0);
          bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, 0), ctx.coef(bi, 1),
                              ctx.coef(bi, 2), ctx.coef(bi, 3), ctx.coef(bi, 4), ctx.coef(bi, 5), &s1[(size_t)bi * CB],
                              &s2[(size_t)bi * CB], nullptr);
        }
      }
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int l = 0; l < ctx.lanes[bi]; ++l) {
          a.p0[ctx.n * a.C + ctx.c0[bi] + l] = s1[(size_t)bi * CB + l];
          a.p1[ctx.n * a.C + ctx.c0[bi] + l] = s2[(size_t)bi * CB + l];
        }
    }
  });
}

template <typename S>
void updw_bwd_grad(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, true);
  const int kk = a.k * a.k;
  const int nk = ctx.nk;
  Scratch<double> dacc((size_t)ctx.G * nk * CB);
  std::vector<double> s1((size_t)ctx.G * CB), s2((size_t)ctx.G * CB);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item);
      dacc.zero();
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      auto grad_row = [&](int bi, int64_t y) {
        ctx.out_row(bi, y, false);
        load_row<S, A>(a.g, ctx.n, y, &ctx.goff[(size_t)bi * CB], ctx.lanes[bi], ctx.gcontig[bi], ctx.grow.get(),
                       a.Wo, CB, 0);
        bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, 0), ctx.coef(bi, 1),
                            ctx.coef(bi, 2), ctx.coef(bi, 3), ctx.coef(bi, 4), ctx.coef(bi, 5),
                            a.bn_partials ? &s1[(size_t)bi * CB] : nullptr,
                            a.bn_partials ? &s2[(size_t)bi * CB] : nullptr, ctx.gzrow.get());
      };
      auto init_g = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi)
          std::memset(UpdwCtx<S>::rrow(ctx.gring, bi, r), 0, sizeof(A) * ctx.gring.row_elems);
      };
      if (!a.bilinear) {
        // gx lives in a ring of padded low-res rows
        const int64_t Hp = (int64_t)a.H + ctx.PL + ctx.PH;
        int64_t inited = 0, flushed = 0;
        auto flush_row = [&](int64_t r) {
          const int64_t h = r - ctx.PL;
          if (h < 0 || h >= a.H) return;
          for (int bi = 0; bi < ctx.nbk; ++bi)
            store_row<S, A>(a.gx, ctx.n, h, &ctx.gxoff[(size_t)bi * CB], ctx.lanes[bi], ctx.gxcontig[bi],
                            UpdwCtx<S>::rrow(ctx.gring, bi, r) + (int64_t)ctx.PL * CB, a.W, CB);
        };
        for (int64_t y = 0; y < a.Ho; ++y) {
          const int64_t i = y / a.S;
          const int ph = (int)(y % a.S);
          for (; flushed < i; ++flushed) {
            if (flushed >= inited) init_g(inited++);
            flush_row(flushed);
          }
          for (; inited < i + ctx.PL + ctx.PH + 1; ++inited) init_g(inited);
          ctx.prepare(y);
          for (int bi = 0; bi < ctx.nbk; ++bi) {
            grad_row(bi, y);
            for (int q = 0; q < a.S; ++q) {
              A* rows[kMaxKernel];
              A* grows[kMaxKernel];
              const int64_t coff = (int64_t)(ctx.poly.rb(q) + ctx.PL) * CB;
              for (int r = 0; r < ctx.T; ++r) {
                rows[r] = UpdwCtx<S>::rrow(ctx.ring, bi, i + ctx.poly.rb(ph) + ctx.PL + r) + coff;
                grows[r] = UpdwCtx<S>::rrow(ctx.gring, bi, i + ctx.poly.rb(ph) + ctx.PL + r) + coff;
              }
              const A* gz = ctx.gzrow.get() + (int64_t)q * CB;
              wgrad_row_k<A>(ctx.T, 1, rows, gz, a.S, a.W, 1,
                             dacc.get() + ((size_t)bi * nk + (size_t)(ph * a.S + q) * ctx.T * ctx.T) * CB);
              scatter_row_k<A>(ctx.T, 1, grows, ctx.pk(bi, ph, q, false), gz, a.S, a.W, 1);
            }
          }
        }
        for (; flushed < Hp; ++flushed) {
          if (flushed >= inited) init_g(inited++);
          flush_row(flushed);
        }
      } else {
        // gU lives in a ring of padded upsampled rows; each finished gU row is interpolated back (transposed)
        // into a ring of low-res gx rows
        const int p = ctx.p;
        const int64_t Hu = 2LL * a.H, Hup = Hu + 2 * p;
        int64_t inited = 0, flushed = 0, xinited = 0, xflushed = 0;
        auto xinit_until = [&](int64_t i) {
          for (; xinited <= i; ++xinited)
            for (int bi = 0; bi < ctx.nbk; ++bi)
              std::memset(UpdwCtx<S>::rrow(ctx.gxring, bi, xinited), 0, sizeof(A) * ctx.gxring.row_elems);
        };
        auto xflush_until = [&](int64_t i) {  // low-res rows < i are final
          for (; xflushed < i && xflushed < a.H; ++xflushed) {
            xinit_until(xflushed);
            for (int bi = 0; bi < ctx.nbk; ++bi)
              store_row<S, A>(a.gx, ctx.n, xflushed, &ctx.gxoff[(size_t)bi * CB], ctx.lanes[bi], ctx.gxcontig[bi],
                              UpdwCtx<S>::rrow(ctx.gxring, bi, xflushed), a.W, CB);
          }
        };
        auto flush_row = [&](int64_t r) {
          const int64_t u = r - p;
          if (u < 0 || u >= Hu) return;
          const emcad::Lerp2 v = emcad::bilinear2_src((int)u, a.H);
          xinit_until(v.i1);
          for (int bi = 0; bi < ctx.nbk; ++bi) {
            const A* gu = UpdwCtx<S>::rrow(ctx.gring, bi, r) + (int64_t)p * CB;
            A* t = ctx.tmp.get();
            std::memset(t, 0, sizeof(A) * (size_t)a.W * CB);
            for (int xo = 0; xo < 2 * a.W; ++xo) {
              const emcad::Lerp2 hz = emcad::bilinear2_src(xo, a.W);
              const A m0 = (A)hz.l0, m1 = (A)hz.l1;
              A* t0 = t + (int64_t)hz.i0 * CB;
              A* t1 = t + (int64_t)hz.i1 * CB;
              const A* g = gu + (int64_t)xo * CB;
#pragma omp simd
              for (int l = 0; l < CB; ++l) t0[l] += m0 * g[l];
#pragma omp simd
              for (int l = 0; l < CB; ++l) t1[l] += m1 * g[l];
            }
            A* x0 = UpdwCtx<S>::rrow(ctx.gxring, bi, v.i0);
            A* x1 = UpdwCtx<S>::rrow(ctx.gxring, bi, v.i1);
            const A l0 = (A)v.l0, l1 = (A)v.l1;
#pragma omp simd
            for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) x0[i] += l0 * t[i];
#pragma omp simd
            for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) x1[i] += l1 * t[i];
          }
          // low-res row i receives from upsampled rows u <= 2i + 2: rows < u/2 are final
          xflush_until(u / 2);
        };
        for (int64_t y = 0; y < a.Ho; ++y) {
          for (; flushed < y; ++flushed) {
            if (flushed >= inited) init_g(inited++);
            flush_row(flushed);
          }
          for (; inited < y + a.k; ++inited) init_g(inited);
          ctx.prepare(y);
          for (int bi = 0; bi < ctx.nbk; ++bi) {
            grad_row(bi, y);
            A* rows[kMaxKernel];
            A* grows[kMaxKernel];
            for (int dy = 0; dy < a.k; ++dy) {
              rows[dy] = UpdwCtx<S>::rrow(ctx.ring, bi, y + dy);
              grows[dy] = UpdwCtx<S>::rrow(ctx.gring, bi, y + dy);
            }
            wgrad_row_k<A>(a.k, 1, rows, ctx.gzrow.get(), 1, a.Wo, 1, dacc.get() + (size_t)bi * nk * CB);
            scatter_row_k<A>(a.k, 1, grows, ctx.kern(bi, false), ctx.gzrow.get(), 1, a.Wo, 1);
          }
        }
        for (; flushed < Hup; ++flushed) {
          if (flushed >= inited) init_g(inited++);
          flush_row(flushed);
        }
        xflush_until(a.H);
      }
      // weight gradient of the item: polyphase taps fold back onto the original taps
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        const double* dk = dacc.get() + (size_t)bi * nk * CB;
        for (int l = 0; l < ctx.lanes[bi]; ++l) {
          double* dst = a.wpart + (ctx.n * a.C + ctx.c0[bi] + l) * kk;
          if (a.bilinear) {
            for (int t = 0; t < kk; ++t) dst[t] = dk[(size_t)t * CB + l];
          } else {
            for (int t = 0; t < kk; ++t) dst[t] = 0;
            for (int ph = 0; ph < a.S; ++ph)
              for (int q = 0; q < a.S; ++q)
                for (int dy = 0; dy < a.k; ++dy)
                  for (int dx = 0; dx < a.k; ++dx) {
                    const int r = ctx.poly.tap(ph, dy), sidx = ctx.poly.tap(q, dx);
                    dst[dy * a.k + dx] += dk[((((size_t)(ph * a.S + q) * ctx.T + r) * ctx.T + sidx) * CB) + l];
                  }
          }
        }
        if (a.bn_partials)
          for (int l = 0; l < ctx.lanes[bi]; ++l) {
            a.p0[ctx.n * a.C + ctx.c0[bi] + l] = s1[(size_t)bi * CB + l];
            a.p1[ctx.n * a.C + ctx.c0[bi] + l] = s2[(size_t)bi * CB + l];
          }
      }
    }
  });
}

// the kernels of storage type S (UpdwKernels, updw.h)
template <typename S>
UpdwKernels updw_kernels() {
  UpdwKernels k;
  k.stats = updw_stats<S>;
  k.apply = updw_apply<S>;
  k.bwd_reduce = updw_bwd_reduce<S>;
  k.bwd_grad = updw_bwd_grad<S>;
  return k;
}
