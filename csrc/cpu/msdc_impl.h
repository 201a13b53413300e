// Kernels of multi_scale_dwconv: BN statistics, apply, and the two backward passes. Compiled once per instruction
// set inside namespace emcad_cpu::isa_<name> (isa_target.h). Interface (MsdcArgs, MsdcKernels): cpu/msdc.h;
// torch binding: cpu/msdc.cpp; shared helpers: cpu/stencil_common.h. No torch headers.
#pragma once
#include "cpu/stencil_common.h"

// An item is (n, group of `a.group` channel blocks). Rows are the outer loop and the blocks of the group the
// inner one, so that with channels_last every input/output pixel line is used completely while it is hot.
template <typename S>
struct MsdcCtx {
  using A = typename emcad::AccType<S>::type;
  static constexpr int CB = lanes_of<A>();
  const MsdcArgs& a;
  int kmax = 1, P = 0, Wp = 0, s = 1, nblocks = 1, G = 1, ngroups = 1;
  Ring<A> ring, gring;  // one ring per block of the group: block bi uses slots [bi*slots, (bi+1)*slots)
  Scratch<A> ring_mem, gring_mem, w_mem, coef_mem, zrow, yrow, grow, gzrow;
  // per block of the group
  std::vector<int64_t> xoff, gxoff, yoff;  // [G][CB], [G][CB], [G][nb][CB]
  std::vector<char> xcontig, gxcontig, ycontig;
  std::vector<int> c0, lanes, ymap, gxmap;
  std::vector<int64_t> y0off;  // [G][CB] branch-0 output offsets (sum mode)
  int64_t n = 0;
  int nbk = 0;  // blocks in the current item
  int64_t loaded = 0;
  bool x_grouped = false, gx_grouped = false;  // unit channel stride: grouped row I/O

  int blk0 = 0;  // first channel block of the current item
  bool fold = false;

  MsdcCtx(const MsdcArgs& args, bool need_grad, bool fold_bn) : a(args), fold(fold_bn) {
    for (int b = 0; b < a.nb; ++b) kmax = std::max(kmax, a.ks[b]);
    P = kmax / 2;
    s = a.stride;
    Wp = a.W + 2 * P;
    nblocks = (a.C + CB - 1) / CB;
    G = std::max(1, std::min(a.group, nblocks));
    ngroups = (nblocks + G - 1) / G;
    ring.slots = kmax;  // rows [oh*s, oh*s + kmax) are live; a new row replaces one that is done
    ring.row_elems = (int64_t)Wp * CB;
    ring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
    ring.buf = ring_mem.get();
    // weights (times the BN scale if `fold`) and coefficients of every block, built once per call and thread
    w_mem.alloc((size_t)nblocks * std::max<int64_t>(a.taps_total, 1) * CB);
    coef_mem.alloc((size_t)nblocks * a.nb * 8 * CB);
    for (int blk = 0; blk < nblocks; ++blk) {
      const int cb0 = blk * CB, L = std::min(CB, a.C - cb0);
      for (int b = 0; b < a.nb; ++b) {
        const int k = a.ks[b], kk = k * k;
        A* wb = w_mem.get() + ((size_t)blk * a.taps_total + a.toff[b]) * CB;
        for (int t = 0; t < kk; ++t)
          for (int l = 0; l < CB; ++l) {
            double v = 0;
            if (l < L) {
              const int64_t c = cb0 + l;
              v = a.w[a.woff[b] + c * kk + t];
              if (fold) v *= a.scale[(int64_t)b * a.C + c];
            }
            wb[t * CB + l] = (A)v;
          }
        const double* src[6] = {a.scale, a.shift, a.mean, a.rstd, a.c2, a.c3};
        A* cf = coef_mem.get() + ((size_t)blk * a.nb + b) * 8 * CB;
        for (int i = 0; i < 6; ++i)
          for (int l = 0; l < CB; ++l) cf[i * CB + l] = (src[i] && l < L) ? (A)src[i][(int64_t)b * a.C + cb0 + l] : A(0);
      }
    }
    const size_t row = (size_t)std::max(a.Wo, 1) * CB;
    zrow.alloc(row);
    yrow.alloc(row * G);
    if (need_grad) {
      grow.alloc(row);
      gzrow.alloc(row);
      gring = ring;
      gring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
      gring.buf = gring_mem.get();
    }
    xoff.resize((size_t)G * CB);
    gxoff.resize((size_t)G * CB);
    yoff.resize((size_t)G * a.nb * CB);
    xcontig.resize(G);
    gxcontig.resize(G);
    ycontig.resize((size_t)G * a.nb);
    c0.resize(G);
    lanes.resize(G);
    ymap.resize(G);
    gxmap.resize(G);
    y0off.resize((size_t)G * CB);
  }

  A* yrow_of(int bi) const { return yrow.get() + (size_t)bi * std::max(a.Wo, 1) * CB; }
  A* wts(int bi, int b) const { return w_mem.get() + ((size_t)(blk0 + bi) * a.taps_total + a.toff[b]) * CB; }
  // coefficient vectors per branch: 0 scale, 1 shift, 2 mean, 3 rstd, 4 c2, 5 c3
  A* coef(int bi, int b, int i) const { return coef_mem.get() + (((size_t)(blk0 + bi) * a.nb + b) * 8 + i) * CB; }
  int64_t* yo(int bi, int b) { return &yoff[((size_t)bi * a.nb + b) * CB]; }
  A* ring_row(const Ring<A>& r, int bi, int64_t row) const {
    return r.buf + ((size_t)bi * r.slots + (size_t)(row % r.slots)) * r.row_elems;
  }

  int64_t out_channel(int b, int64_t c) const {
    const int64_t oc = a.concat ? (int64_t)b * a.C + c : c;
    const int64_t cout = a.concat ? (int64_t)a.nb * a.C : a.C;
    return emcad::shuffle_dst(oc, cout, a.shuffle_groups);
  }

  // sets up the item's blocks: lanes and offsets
  void begin_item(int64_t item, bool grads) {
    n = item / ngroups;
    const int b0 = (int)(item % ngroups) * G;
    blk0 = b0;
    nbk = std::min(G, nblocks - b0);
    const View4& ov = grads ? a.g : a.y;
    for (int bi = 0; bi < nbk; ++bi) {
      c0[bi] = (b0 + bi) * CB;
      lanes[bi] = std::min(CB, a.C - c0[bi]);
      int64_t* xo = &xoff[(size_t)bi * CB];
      int64_t* gxo = &gxoff[(size_t)bi * CB];
      for (int l = 0; l < CB; ++l) {
        const int64_t c = c0[bi] + std::min(l, lanes[bi] - 1);
        xo[l] = c * a.x.sc;
        gxo[l] = c * a.gx.sc;
      }
      xcontig[bi] = a.x.sc == 1 && lanes_contiguous(xo, lanes[bi]);
      gxcontig[bi] = a.gx.sc == 1 && lanes_contiguous(gxo, lanes[bi]);
      for (int b = 0; b < a.nb; ++b) {
        int64_t* o = yo(bi, b);
        for (int l = 0; l < CB; ++l) o[l] = out_channel(b, c0[bi] + std::min(l, lanes[bi] - 1)) * ov.sc;
        ycontig[(size_t)bi * a.nb + b] = ov.sc == 1 && lanes_contiguous(o, lanes[bi]);
      }
      ymap[bi] = lane_map(yo(bi, 0), lanes[bi], CB, ov.sc);
      gxmap[bi] = lane_map(gxo, lanes[bi], CB, a.gx.sc);
      std::copy(yo(bi, 0), yo(bi, 0) + CB, &y0off[(size_t)bi * CB]);
    }
    x_grouped = a.x.sc == 1 && nbk > 1;
    gx_grouped = a.gx.data != nullptr && a.gx.sc == 1 && nbk > 1;
    loaded = 0;
  }

  // makes padded input rows [0, upto) available in the rings of all blocks of the item
  void load_until(int64_t upto) {
    for (; loaded < upto; ++loaded) {
      if (x_grouped) {
        A* dst[64];
        for (int bi = 0; bi < nbk; ++bi) dst[bi] = ring_row(ring, bi, loaded);
        load_row_blocks<S, A>(a.x, n, loaded - P, c0[0], nbk, lanes[nbk - 1], dst, Wp, P);
        continue;
      }
      for (int bi = 0; bi < nbk; ++bi)
        load_row<S, A>(a.x, n, loaded - P, &xoff[(size_t)bi * CB], lanes[bi], xcontig[bi],
                       ring_row(ring, bi, loaded), Wp, CB, P);
    }
  }

  // stores the y rows of all blocks (sum mode) with one sweep
  void store_y(int64_t oh) {
    A* src[64];
    for (int bi = 0; bi < nbk; ++bi) src[bi] = yrow_of(bi);
    store_row_blocks<S, A>(a.y, n, oh, nbk, src, y0off.data(), lanes.data(), ymap.data(), a.Wo);
  }

  // row pointers of branch b of block bi for output row oh
  void branch_rows(const Ring<A>& r, int bi, int b, int64_t oh, A** rows) const {
    const int pb = a.ks[b] / 2;
    const int64_t r0 = oh * s + (P - pb);
    for (int dy = 0; dy < a.ks[b]; ++dy) rows[dy] = ring_row(r, bi, r0 + dy) + (int64_t)(P - pb) * CB;
  }

  void write_partials(int bi, int b, const double* v0, const double* v1) const {
    for (int l = 0; l < lanes[bi]; ++l) {
      const int64_t idx = (n * a.nb + b) * a.C + c0[bi] + l;
      a.p0[idx] = v0[l];
      a.p1[idx] = v1[l];
    }
  }
};

template <typename S>
void msdc_stats(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, false, false);
  std::vector<emcad::Welford> acc((size_t)ctx.G * a.nb * CB);
  for (int64_t item = i0; item < i1; ++item) {
    ctx.begin_item(item, false);
    std::fill(acc.begin(), acc.end(), emcad::Welford());
    for (int64_t oh = 0; oh < a.Ho; ++oh) {
      ctx.load_until(oh * ctx.s + ctx.kmax);
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int b = 0; b < a.nb; ++b) {
          A* rows[kMaxKernel];
          ctx.branch_rows(ctx.ring, bi, b, oh, rows);
          conv_row_k<A>(a.ks[b], 1, rows, ctx.wts(bi, b), nullptr, a.Wo, ctx.s, ctx.zrow.get(), 1);
          row_stats<A>(ctx.zrow.get(), a.Wo, &acc[((size_t)bi * a.nb + b) * CB]);
        }
    }
    for (int bi = 0; bi < ctx.nbk; ++bi)
      for (int b = 0; b < a.nb; ++b) {
        double m[CB], q[CB];
        for (int l = 0; l < CB; ++l) {
          m[l] = acc[((size_t)bi * a.nb + b) * CB + l].mean;
          q[l] = acc[((size_t)bi * a.nb + b) * CB + l].m2;
        }
        ctx.write_partials(bi, b, m, q);
      }
  }
}

template <typename S>
void msdc_apply(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, false, true);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item, false);
      for (int64_t oh = 0; oh < a.Ho; ++oh) {
        ctx.load_until(oh * ctx.s + ctx.kmax);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          for (int b = 0; b < a.nb; ++b) {
            A* rows[kMaxKernel];
            ctx.branch_rows(ctx.ring, bi, b, oh, rows);
            conv_row_k<A>(a.ks[b], 1, rows, ctx.wts(bi, b), ctx.coef(bi, b, 1), a.Wo, ctx.s, ctx.zrow.get(), 1);
            if (a.concat) {
              act_row<ACT, A>(ctx.zrow.get(), ctx.zrow.get(), a.Wo, false);
              store_row<S, A>(a.y, ctx.n, oh, ctx.yo(bi, b), ctx.lanes[bi], ctx.ycontig[(size_t)bi * a.nb + b],
                              ctx.zrow.get(), a.Wo, CB);
            } else {
              act_row<ACT, A>(ctx.yrow_of(bi), ctx.zrow.get(), a.Wo, b > 0);
            }
          }
        }
        if (!a.concat) ctx.store_y(oh);
      }
    }
  });
}

template <typename S>
void msdc_bwd_reduce(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, true, false);
  std::vector<double> s1((size_t)ctx.G * a.nb * CB), s2((size_t)ctx.G * a.nb * CB);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item, true);
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t oh = 0; oh < a.Ho; ++oh) {
        ctx.load_until(oh * ctx.s + ctx.kmax);
        for (int bi = 0; bi < ctx.nbk; ++bi)
          for (int b = 0; b < a.nb; ++b) {
            A* rows[kMaxKernel];
            ctx.branch_rows(ctx.ring, bi, b, oh, rows);
            conv_row_k<A>(a.ks[b], 1, rows, ctx.wts(bi, b), nullptr, a.Wo, ctx.s, ctx.zrow.get(), 1);
            load_row<S, A>(a.g, ctx.n, oh, ctx.yo(bi, b), ctx.lanes[bi], ctx.ycontig[(size_t)bi * a.nb + b],
                           ctx.grow.get(), a.Wo, CB, 0);
            const size_t o = ((size_t)bi * a.nb + b) * CB;
            bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, b, 0), ctx.coef(bi, b, 1),
                                ctx.coef(bi, b, 2), ctx.coef(bi, b, 3), ctx.coef(bi, b, 4), ctx.coef(bi, b, 5),
                                &s1[o], &s2[o], nullptr);
          }
      }
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int b = 0; b < a.nb; ++b)
          ctx.write_partials(bi, b, &s1[((size_t)bi * a.nb + b) * CB], &s2[((size_t)bi * a.nb + b) * CB]);
    }
  });
}

template <typename S>
void msdc_bwd_grad(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, true, false);
  const int64_t taps = std::max<int64_t>(a.taps_total, 1);
  Scratch<double> dacc((size_t)ctx.G * taps * CB);
  std::vector<double> s1((size_t)ctx.G * a.nb * CB), s2((size_t)ctx.G * a.nb * CB);
  const int64_t Hp = (int64_t)a.H + 2 * ctx.P;
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item, true);
      dacc.zero();
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      int64_t inited = 0, flushed = 0;
      auto init_row = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi)
          std::memset(ctx.ring_row(ctx.gring, bi, r), 0, sizeof(A) * ctx.gring.row_elems);
      };
      auto flush_row = [&](int64_t r) {
        const int64_t h = r - ctx.P;
        if (h < 0 || h >= a.H) return;
        if (ctx.gx_grouped) {
          A* src[64];
          for (int bi = 0; bi < ctx.nbk; ++bi) src[bi] = ctx.ring_row(ctx.gring, bi, r) + (int64_t)ctx.P * CB;
          store_row_blocks<S, A>(a.gx, ctx.n, h, ctx.nbk, src, ctx.gxoff.data(), ctx.lanes.data(),
                                 ctx.gxmap.data(), a.W);
          return;
        }
        for (int bi = 0; bi < ctx.nbk; ++bi)
          store_row<S, A>(a.gx, ctx.n, h, &ctx.gxoff[(size_t)bi * CB], ctx.lanes[bi], ctx.gxcontig[bi],
                          ctx.ring_row(ctx.gring, bi, r) + (int64_t)ctx.P * CB, a.W, CB);
      };
      for (int64_t oh = 0; oh < a.Ho; ++oh) {
        ctx.load_until(oh * ctx.s + ctx.kmax);
        for (; flushed < oh * ctx.s; ++flushed) {
          if (flushed >= inited) init_row(inited++);
          flush_row(flushed);
        }
        for (; inited < oh * ctx.s + ctx.kmax; ++inited) init_row(inited);
        for (int bi = 0; bi < ctx.nbk; ++bi)
          for (int b = 0; b < a.nb; ++b) {
            A* rows[kMaxKernel];
            A* grows[kMaxKernel];
            ctx.branch_rows(ctx.ring, bi, b, oh, rows);
            ctx.branch_rows(ctx.gring, bi, b, oh, grows);
            const int k = a.ks[b];
            const size_t o = ((size_t)bi * a.nb + b) * CB;
            conv_row_k<A>(k, 1, rows, ctx.wts(bi, b), nullptr, a.Wo, ctx.s, ctx.zrow.get(), 1);
            load_row<S, A>(a.g, ctx.n, oh, ctx.yo(bi, b), ctx.lanes[bi], ctx.ycontig[(size_t)bi * a.nb + b],
                           ctx.grow.get(), a.Wo, CB, 0);
            bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, b, 0), ctx.coef(bi, b, 1),
                                ctx.coef(bi, b, 2), ctx.coef(bi, b, 3), ctx.coef(bi, b, 4), ctx.coef(bi, b, 5),
                                a.bn_partials ? &s1[o] : nullptr, a.bn_partials ? &s2[o] : nullptr,
                                ctx.gzrow.get());
            wgrad_row_k<A>(k, 1, rows, ctx.gzrow.get(), 1, a.Wo, ctx.s,
                           dacc.get() + ((size_t)bi * taps + a.toff[b]) * CB);
            scatter_row_k<A>(k, 1, grows, ctx.wts(bi, b), ctx.gzrow.get(), 1, a.Wo, ctx.s);
          }
      }
      for (; flushed < Hp; ++flushed) {
        if (flushed >= inited) init_row(inited++);
        flush_row(flushed);
      }
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        for (int l = 0; l < ctx.lanes[bi]; ++l)
          for (int64_t t = 0; t < a.taps_total; ++t)
            a.wpart[(ctx.n * a.C + ctx.c0[bi] + l) * a.taps_total + t] = dacc.get()[((size_t)bi * taps + t) * CB + l];
        if (a.bn_partials)
          for (int b = 0; b < a.nb; ++b)
            ctx.write_partials(bi, b, &s1[((size_t)bi * a.nb + b) * CB], &s2[((size_t)bi * a.nb + b) * CB]);
      }
    }
  });
}

// the kernels of storage type S (MsdcKernels, msdc.h)
template <typename S>
MsdcKernels msdc_kernels() {
  MsdcKernels k;
  k.stats = msdc_stats<S>;
  k.apply = msdc_apply<S>;
  k.bwd_reduce = msdc_bwd_reduce<S>;
  k.bwd_grad = msdc_bwd_grad<S>;
  return k;
}
