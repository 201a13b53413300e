// grouped_attention_gate (LGAG, EMCAD.md 2.8 / 11.9): kernels and host-side launch sequences.
//
// Supported: k = 3, one output channel per group (f_int == groups), at most 4 input channels per group (EMCAD: 2).
// Per pixel: zg_j = bg_j + gconv(g)_j, zx_j = bx_j + gconv(x)_j, s_j = BN_g(zg_j) + BN_x(zx_j), h_j = act(s_j),
// zp = bpsi + sum_j wpsi_j h_j, psi = sigmoid(BN_psi(zp)), out = x * psi (+ g).
//
// Forward, eval:      bn_fold(g, x, psi) -> zp (per-pixel gate logit, scratch) -> out (elementwise)
// Forward, training:  stats(zg, zx) -> welford_reduce -> zp (+ psi statistics) -> welford_reduce -> out
// Backward:           bn_fold(saved) -> B1 (zp, g_psi = sum_c grad*x, gap; sums for BN_psi) -> sum_reduce
//                     -> B2 (per group: sums for BN_g/BN_x, wpsi, bpsi) -> sum_reduce
//                     -> B3 (grad_g, grad_x, conv weight/bias partials) -> sum_reduce
// The channel reduction for psi runs over channel lanes of a block in a fixed tree; all cross-block reductions are
// per-block partials combined by reduce.cu.
#pragma once

#include "common.cuh"
#include "reduce.cuh"
#include "tile.cuh"

namespace emcad {
namespace cuda {
namespace lgag {

constexpr int kMaxCpg = 4;  // input channels per group

template <class T>
struct Params {
    using A = acc_t<T>;
    const T* g;
    const T* x;
    const T* wg;
    const T* bg;
    const T* wx;
    const T* bx;
    const T* wpsi;
    const T* bpsi;
    const T* gout;  // grad of out
    T* out;
    T* gg;          // grad_g
    T* gx;          // grad_x
    const A* gam_g;
    const A* bet_g;
    const A* gam_x;
    const A* bet_x;
    const A* coef;  // [2F + 1][COEF_N]: BN_g channels, BN_x channels, BN_psi
    A* zp;          // [N][H][W] gate logits (scratch)
    A* gap;         // [N][H][W] dL/d(BN_psi output) (scratch, backward)
    const A* res1;  // [2]: sum gap, sum gap * zphat
    const A* res2;  // [4F + 1]: sum g_s, sum g_s zhat_g, sum g_s zhat_x, sum g_zp h, sum g_zp
    A* partial;
    Strides gs, xs, os;
    int64_t N, H, W, Cg, Cx, F;
    int cpg_g, cpg_x;
    A count;
    int act, training, add;
    TileGeom geo;
    bool vec_g, vec_x, vec_gg, vec_gx;
    int parts;
};

// ---- shared-memory sizes (A elements) ----
inline size_t tiles_elems(int th, int tw, int cb, int cpg_sum, int halo) {
    return size_t(th + 2 * halo) * (tw + 2 * halo) * cb * cpg_sum;
}
inline size_t weights_elems(int cb, int cpg_sum) { return size_t(9) * cb * cpg_sum + 2 * size_t(cb); }
inline size_t stats_smem(int th, int tw, int cb, int threads, int cpg_sum) {
    return tiles_elems(th, tw, cb, cpg_sum, 1) + weights_elems(cb, cpg_sum) + size_t(threads) * 6;
}
inline size_t zp_smem(int th, int tw, int cb, int threads, int cpg_sum) {
    return tiles_elems(th, tw, cb, cpg_sum, 1) + weights_elems(cb, cpg_sum) + 5 * size_t(cb) + size_t(threads) * kV +
           size_t(threads) * 3;
}
inline size_t sums_smem(int th, int tw, int cb, int threads, int cpg_sum) {
    return tiles_elems(th, tw, cb, cpg_sum, 1) + weights_elems(cb, cpg_sum) + 9 * size_t(cb) + size_t(threads) * 5;
}
inline size_t grad_smem(int th, int tw, int cb, int threads, int cpg_sum) {
    return tiles_elems(th, tw, cb, cpg_sum, 2) + 2 * size_t(th + 2) * (tw + 2) * cb + weights_elems(cb, cpg_sum) +
           12 * size_t(cb) + size_t(threads);
}

// ---- device pieces ----
// tiles of chunk k (groups k*cb .. k*cb+cb-1) with a `halo`, and their weights/biases:
// gsm[(r * cols + col) * (cb * cpg_g) + jl * cpg_g + i], wgs[(i * 9 + tap) * cb + jl], bgs[jl] (same for x)
template <class T>
EMCAD_CU_D void load_chunk(const Params<T>& p, int64_t n, int64_t k, int cb, int64_t h0, int64_t w0, int halo, int rows,
                        int cols, acc_t<T>* gsm, acc_t<T>* xsm, acc_t<T>* wgs, acc_t<T>* wxs, acc_t<T>* bgs,
                        acc_t<T>* bxs, int tid, int nthreads) {
    using A = acc_t<T>;
    const int ng = cb * p.cpg_g, nx = cb * p.cpg_x;
    load_tile<T, A>(p.g, p.gs, n, k * ng, ng, p.Cg, p.H, p.W, h0 - halo, w0 - halo, rows, cols, p.vec_g, gsm, tid,
                    nthreads);
    load_tile<T, A>(p.x, p.xs, n, k * nx, nx, p.Cx, p.H, p.W, h0 - halo, w0 - halo, rows, cols, p.vec_x, xsm, tid,
                    nthreads);
    const int64_t j0 = k * cb;
    for (int it = tid; it < 9 * ng; it += nthreads) {
        const int jl = it % cb, r = it / cb;  // r = i * 9 + tap
        const int64_t j = j0 + jl;
        wgs[it] = j < p.F ? to_acc(p.wg[j * p.cpg_g * 9 + r]) : A(0);
    }
    for (int it = tid; it < 9 * nx; it += nthreads) {
        const int jl = it % cb, r = it / cb;
        const int64_t j = j0 + jl;
        wxs[it] = j < p.F ? to_acc(p.wx[j * p.cpg_x * 9 + r]) : A(0);
    }
    for (int jl = tid; jl < cb; jl += nthreads) {
        const int64_t j = j0 + jl;
        bgs[jl] = j < p.F ? to_acc(p.bg[j]) : A(0);
        bxs[jl] = j < p.F ? to_acc(p.bx[j]) : A(0);
    }
}

// z[v] = bias + sum_i sum_{u,v'} w[i][u][v'] * tile[row + u][col0 + v + v'][jl * cpg + i]  (tile origin = -1 halo)
template <class A>
EMCAD_CU_D void gconv3(const A* __restrict__ tile, int cols, int ncs, int cpg, const A* __restrict__ wsm, int cb, int jl,
                    int row, int col0, A bias, A (&z)[kV]) {
#pragma unroll
    for (int v = 0; v < kV; ++v) z[v] = bias;
    for (int i = 0; i < cpg; ++i) {
#pragma unroll
        for (int u = 0; u < 3; ++u) {
            A rb[kV + 2];
            const A* src = tile + ((row + u) * cols + col0) * ncs + jl * cpg + i;
#pragma unroll
            for (int j = 0; j < kV + 2; ++j) rb[j] = src[j * ncs];
#pragma unroll
            for (int vv = 0; vv < 3; ++vv) {
                const A wt = wsm[(i * 9 + u * 3 + vv) * cb + jl];
#pragma unroll
                for (int v = 0; v < kV; ++v) z[v] += wt * rb[v + vv];
            }
        }
    }
}

template <class A>
EMCAD_CU_D A gconv3_one(const A* __restrict__ tile, int cols, int ncs, int cpg, const A* __restrict__ wsm, int cb, int jl,
                     int er, int ec, A bias) {
    A z = bias;
    for (int i = 0; i < cpg; ++i)
#pragma unroll
        for (int u = 0; u < 3; ++u)
#pragma unroll
            for (int v = 0; v < 3; ++v)
                z += wsm[(i * 9 + u * 3 + v) * cb + jl] * tile[((er + u) * cols + ec + v) * ncs + jl * cpg + i];
    return z;
}

template <class T>
EMCAD_CU_D acc_t<T> psi_coef(const Params<T>& p, int k) {
    return p.coef[2 * p.F * COEF_N + k];
}

// dL/dzp at pixel idx (backward): BN_psi backward from gap and the B1 sums
template <class T>
EMCAD_CU_D acc_t<T> grad_zp(const Params<T>& p, int64_t idx) {
    using A = acc_t<T>;
    const A scale = psi_coef(p, COEF_SCALE);
    const A zhat = (p.zp[idx] - psi_coef(p, COEF_MEAN)) * psi_coef(p, COEF_RSTD);
    const A gap = p.gap[idx];
    if (!p.training) return scale * gap;
    const A inv = A(1) / p.count;
    return scale * (gap - p.res1[0] * inv - zhat * (p.res1[1] * inv));
}

struct Tile {
    int64_t ty, tx, n, h0, w0, slot;
};

EMCAD_CU_D Tile tile_of(const TileGeom& g) {
    Tile t;
    const int64_t tile = blockIdx.x;
    t.ty = tile / g.tiles_w;
    t.tx = tile - t.ty * g.tiles_w;
    t.n = blockIdx.z;
    t.h0 = t.ty * g.th;
    t.w0 = t.tx * g.tw;
    t.slot = (t.n * g.tiles_h + t.ty) * g.tiles_w + t.tx;
    return t;
}

// ---- L1: Welford partials of zg and zx per group ----
template <class T>
__global__ void __launch_bounds__(kMaxThreads) stats_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const Tile t = tile_of(g);
    const int tid = threadIdx.x, cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2, cols = tw + 2, ng = cb * p.cpg_g, nx = cb * p.cpg_x;
    A* gsm = smem;
    A* xsm = gsm + rows * cols * ng;
    A* wgs = xsm + rows * cols * nx;
    A* wxs = wgs + 9 * ng;
    A* bgs = wxs + 9 * nx;
    A* bxs = bgs + cb;
    A* red = bxs + cb;  // [2][threads][3]
    const int64_t k = blockIdx.y;
    load_chunk<T>(p, t.n, k, cb, t.h0, t.w0, 1, rows, cols, gsm, xsm, wgs, wxs, bgs, bxs, tid, g.threads);
    __syncthreads();
    const int jl = tid % cb, sg = tid / cb, row = sg / g.gw, col0 = (sg % g.gw) * kV;
    const int64_t j = k * cb + jl, h = t.h0 + row;
    A zg[kV], zx[kV];
    gconv3<A>(gsm, cols, ng, p.cpg_g, wgs, cb, jl, row, col0, bgs[jl], zg);
    gconv3<A>(xsm, cols, nx, p.cpg_x, wxs, cb, jl, row, col0, bxs[jl], zx);
    int valid = 0;
    if (j < p.F && h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (t.w0 + col0), 0), kV));
    const Welford<A> wg = local_welford<A, kV>(zg, valid), wx = local_welford<A, kV>(zx, valid);
    A* r0 = red + tid * 3;
    A* r1 = red + (g.threads + tid) * 3;
    r0[0] = wg.n;
    r0[1] = wg.mean;
    r0[2] = wg.m2;
    r1[0] = wx.n;
    r1[1] = wx.mean;
    r1[2] = wx.m2;
    const int groups = g.gh * g.gw;
    tree_welford_groups<A>(red, groups, cb, sg, jl);
    tree_welford_groups<A>(red + g.threads * 3, groups, cb, sg, jl);
    if (sg == 0 && j < p.F) {
        A* dst = p.partial + t.slot * 2 * p.F * 3;
        for (int q = 0; q < 2; ++q)
            for (int e = 0; e < 3; ++e) dst[(q * p.F + j) * 3 + e] = red[(q * g.threads + jl) * 3 + e];
    }
}

// ---- L2 (forward) / B1 (backward): the per-pixel gate logit zp over all groups ----
template <class T, bool BWD>
__global__ void __launch_bounds__(kMaxThreads) zp_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const Tile t = tile_of(g);
    const int tid = threadIdx.x, cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2, cols = tw + 2, ng = cb * p.cpg_g, nx = cb * p.cpg_x;
    A* gsm = smem;
    A* xsm = gsm + rows * cols * ng;
    A* wgs = xsm + rows * cols * nx;
    A* wxs = wgs + 9 * ng;
    A* bgs = wxs + 9 * nx;
    A* bxs = bgs + cb;
    A* cfs = bxs + cb;              // [5][cb]: scale_g, shift_g, scale_x, shift_x, wpsi
    A* lred = cfs + 5 * cb;         // [groups][kV][cb]
    A* sred = lred + g.threads * kV;  // [threads][3]
    const int jl = tid % cb, sg = tid / cb, row = sg / g.gw, col0 = (sg % g.gw) * kV;
    const int64_t h = t.h0 + row;
    A zacc[kV];
#pragma unroll
    for (int v = 0; v < kV; ++v) zacc[v] = A(0);
    for (int64_t k = 0; k < g.chunks; ++k) {
        __syncthreads();  // the previous chunk's tiles are no longer read
        load_chunk<T>(p, t.n, k, cb, t.h0, t.w0, 1, rows, cols, gsm, xsm, wgs, wxs, bgs, bxs, tid, g.threads);
        for (int l = tid; l < cb; l += g.threads) {
            const int64_t j = k * cb + l;
            const bool ok = j < p.F;
            cfs[0 * cb + l] = ok ? p.coef[j * COEF_N + COEF_SCALE] : A(0);
            cfs[1 * cb + l] = ok ? p.coef[j * COEF_N + COEF_SHIFT] : A(0);
            cfs[2 * cb + l] = ok ? p.coef[(p.F + j) * COEF_N + COEF_SCALE] : A(0);
            cfs[3 * cb + l] = ok ? p.coef[(p.F + j) * COEF_N + COEF_SHIFT] : A(0);
            cfs[4 * cb + l] = ok ? to_acc(p.wpsi[j]) : A(0);
        }
        __syncthreads();
        A zg[kV], zx[kV];
        gconv3<A>(gsm, cols, ng, p.cpg_g, wgs, cb, jl, row, col0, bgs[jl], zg);
        gconv3<A>(xsm, cols, nx, p.cpg_x, wxs, cb, jl, row, col0, bxs[jl], zx);
        const A sgc = cfs[jl], shg = cfs[cb + jl], sxc = cfs[2 * cb + jl], shx = cfs[3 * cb + jl];
        const A wp = cfs[4 * cb + jl];
#pragma unroll
        for (int v = 0; v < kV; ++v) zacc[v] += wp * activate<A>(zg[v] * sgc + shg + zx[v] * sxc + shx, p.act);
    }
    // fixed-order tree over the channel lanes, per position
#pragma unroll
    for (int v = 0; v < kV; ++v) lred[(sg * kV + v) * cb + jl] = zacc[v];
    for (int s = cb / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (jl < s)
#pragma unroll
            for (int v = 0; v < kV; ++v) lred[(sg * kV + v) * cb + jl] += lred[(sg * kV + v) * cb + jl + s];
    }
    __syncthreads();
    const A bpsi = to_acc(p.bpsi[0]);
    A zp[kV];
#pragma unroll
    for (int v = 0; v < kV; ++v) zp[v] = lred[(sg * kV + v) * cb] + bpsi;
    int valid = 0;
    if (h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (t.w0 + col0), 0), kV));
    const int64_t base = (t.n * p.H + h) * p.W + t.w0 + col0;
    const int groups = g.gh * g.gw;
    if (!BWD) {
        if (jl == 0)
#pragma unroll
            for (int v = 0; v < kV; ++v)
                if (v < valid) p.zp[base + v] = zp[v];
        if (p.training) {
            const Welford<A> wf = local_welford<A, kV>(zp, jl == 0 ? valid : 0);
            sred[tid * 3 + 0] = wf.n;
            sred[tid * 3 + 1] = wf.mean;
            sred[tid * 3 + 2] = wf.m2;
            tree_welford_groups<A>(sred, groups, cb, sg, jl);
            if (tid == 0)
                for (int e = 0; e < 3; ++e) p.partial[t.slot * 3 + e] = sred[e];
        }
    } else {
        // g_psi = sum_c grad_out * x over x's channels, fixed lane tree again
        A gacc[kV];
#pragma unroll
        for (int v = 0; v < kV; ++v) gacc[v] = A(0);
        for (int64_t c = jl; c < p.Cx; c += cb)
#pragma unroll
            for (int v = 0; v < kV; ++v) {
                if (v >= valid) continue;
                const int64_t w = t.w0 + col0 + v;
                gacc[v] += to_acc(p.gout[offset4(p.os, t.n, c, h, w)]) * to_acc(p.x[offset4(p.xs, t.n, c, h, w)]);
            }
        __syncthreads();  // everyone has read zp from lred
#pragma unroll
        for (int v = 0; v < kV; ++v) lred[(sg * kV + v) * cb + jl] = gacc[v];
        for (int s = cb / 2; s > 0; s >>= 1) {
            __syncthreads();
            if (jl < s)
#pragma unroll
                for (int v = 0; v < kV; ++v) lred[(sg * kV + v) * cb + jl] += lred[(sg * kV + v) * cb + jl + s];
        }
        __syncthreads();
        const A scale = psi_coef(p, COEF_SCALE), shift = psi_coef(p, COEF_SHIFT);
        const A mean = psi_coef(p, COEF_MEAN), rstd = psi_coef(p, COEF_RSTD);
        A s1 = A(0), s2 = A(0);
        if (jl == 0) {
#pragma unroll
            for (int v = 0; v < kV; ++v) {
                if (v >= valid) continue;
                const A gpsi = lred[(sg * kV + v) * cb];
                const A psi = sigmoid<A>(zp[v] * scale + shift);
                const A gap = gpsi * psi * (A(1) - psi);
                p.zp[base + v] = zp[v];
                p.gap[base + v] = gap;
                s1 += gap;
                s2 += gap * (zp[v] - mean) * rstd;
            }
        }
        sred[tid * 2 + 0] = s1;
        sred[tid * 2 + 1] = s2;
        tree_sum_groups<A, 2>(sred, groups, cb, sg, jl);
        if (tid == 0) {
            p.partial[t.slot * 2 + 0] = sred[0];
            p.partial[t.slot * 2 + 1] = sred[1];
        }
    }
}

// ---- L3: out = x * sigmoid(BN_psi(zp)) (+ g), elementwise ----
template <class T>
__global__ void __launch_bounds__(kMaxThreads) out_kernel(Params<T> p) {
    using A = acc_t<T>;
    const A scale = psi_coef(p, COEF_SCALE), shift = psi_coef(p, COEF_SHIFT);
    const int64_t total = p.N * p.Cx * p.H * p.W;
    const bool cl = p.os.c == 1;
    const int64_t step = int64_t(gridDim.x) * blockDim.x;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
        int64_t n, c, h, w;
        if (cl) {
            c = e % p.Cx;
            int64_t r = e / p.Cx;
            w = r % p.W;
            r /= p.W;
            h = r % p.H;
            n = r / p.H;
        } else {
            w = e % p.W;
            int64_t r = e / p.W;
            h = r % p.H;
            r /= p.H;
            c = r % p.Cx;
            n = r / p.Cx;
        }
        const A psi = sigmoid<A>(p.zp[(n * p.H + h) * p.W + w] * scale + shift);
        A o = to_acc(p.x[offset4(p.xs, n, c, h, w)]) * psi;
        if (p.add) o += to_acc(p.g[offset4(p.gs, n, c, h, w)]);
        p.out[offset4(p.os, n, c, h, w)] = from_acc<T>(o);
    }
}

// ---- B2: per-group sums for BN_g / BN_x / wpsi / bpsi gradients ----
template <class T>
__global__ void __launch_bounds__(kMaxThreads) bwd_sums_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const Tile t = tile_of(g);
    const int tid = threadIdx.x, cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2, cols = tw + 2, ng = cb * p.cpg_g, nx = cb * p.cpg_x;
    A* gsm = smem;
    A* xsm = gsm + rows * cols * ng;
    A* wgs = xsm + rows * cols * nx;
    A* wxs = wgs + 9 * ng;
    A* bgs = wxs + 9 * nx;
    A* bxs = bgs + cb;
    A* cfs = bxs + cb;        // [9][cb]: gamma_g, beta_g, mean_g, rstd_g, gamma_x, beta_x, mean_x, rstd_x, wpsi
    A* red = cfs + 9 * cb;    // [threads][5]
    const int64_t k = blockIdx.y;
    load_chunk<T>(p, t.n, k, cb, t.h0, t.w0, 1, rows, cols, gsm, xsm, wgs, wxs, bgs, bxs, tid, g.threads);
    for (int l = tid; l < cb; l += g.threads) {
        const int64_t j = k * cb + l;
        const bool ok = j < p.F;
        cfs[0 * cb + l] = ok ? p.gam_g[j] : A(0);
        cfs[1 * cb + l] = ok ? p.bet_g[j] : A(0);
        cfs[2 * cb + l] = ok ? p.coef[j * COEF_N + COEF_MEAN] : A(0);
        cfs[3 * cb + l] = ok ? p.coef[j * COEF_N + COEF_RSTD] : A(0);
        cfs[4 * cb + l] = ok ? p.gam_x[j] : A(0);
        cfs[5 * cb + l] = ok ? p.bet_x[j] : A(0);
        cfs[6 * cb + l] = ok ? p.coef[(p.F + j) * COEF_N + COEF_MEAN] : A(0);
        cfs[7 * cb + l] = ok ? p.coef[(p.F + j) * COEF_N + COEF_RSTD] : A(0);
        cfs[8 * cb + l] = ok ? to_acc(p.wpsi[j]) : A(0);
    }
    __syncthreads();
    const int jl = tid % cb, sg = tid / cb, row = sg / g.gw, col0 = (sg % g.gw) * kV;
    const int64_t j = k * cb + jl, h = t.h0 + row;
    A zg[kV], zx[kV];
    gconv3<A>(gsm, cols, ng, p.cpg_g, wgs, cb, jl, row, col0, bgs[jl], zg);
    gconv3<A>(xsm, cols, nx, p.cpg_x, wxs, cb, jl, row, col0, bxs[jl], zx);
    int valid = 0;
    if (h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (t.w0 + col0), 0), kV));
    A q[5] = {A(0), A(0), A(0), A(0), A(0)};
    const int64_t base = (t.n * p.H + h) * p.W + t.w0 + col0;
#pragma unroll
    for (int v = 0; v < kV; ++v) {
        if (v >= valid) continue;
        const A gzp = grad_zp(p, base + v);
        q[4] += gzp;
        if (j < p.F) {
            const A zhg = (zg[v] - cfs[2 * cb + jl]) * cfs[3 * cb + jl];
            const A zhx = (zx[v] - cfs[6 * cb + jl]) * cfs[7 * cb + jl];
            const A s = zhg * cfs[jl] + cfs[cb + jl] + zhx * cfs[4 * cb + jl] + cfs[5 * cb + jl];
            const A hh = activate<A>(s, p.act);
            const A gs = activate_backward<A>(gzp * cfs[8 * cb + jl], s, p.act);
            q[0] += gs;
            q[1] += gs * zhg;
            q[2] += gs * zhx;
            q[3] += gzp * hh;
        }
    }
#pragma unroll
    for (int e = 0; e < 5; ++e) red[tid * 5 + e] = q[e];
    tree_sum_groups<A, 5>(red, g.gh * g.gw, cb, sg, jl);
    if (sg == 0) {
        const int64_t m = 4 * p.F + 1;
        if (j < p.F)
            for (int e = 0; e < 4; ++e) p.partial[t.slot * m + e * p.F + j] = red[jl * 5 + e];
        if (k == 0 && jl == 0) p.partial[t.slot * m + 4 * p.F] = red[4];
    }
}

// ---- B3: grad_g, grad_x and conv weight/bias partials ----
template <class T>
__global__ void __launch_bounds__(kMaxThreads) bwd_grad_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const Tile t = tile_of(g);
    const int tid = threadIdx.x, cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 4, cols = tw + 4;  // input tiles, origin (h0 - 2, w0 - 2)
    const int rg = th + 2, cg = tw + 2;      // gz tiles, origin (h0 - 1, w0 - 1)
    const int ng = cb * p.cpg_g, nx = cb * p.cpg_x;
    A* gsm = smem;
    A* xsm = gsm + rows * cols * ng;
    A* gzg = xsm + rows * cols * nx;  // [rg][cg][cb]
    A* gzx = gzg + rg * cg * cb;
    A* wgs = gzx + rg * cg * cb;
    A* wxs = wgs + 9 * ng;
    A* bgs = wxs + 9 * nx;
    A* bxs = bgs + cb;
    A* cfs = bxs + cb;  // [12][cb]
    A* red = cfs + 12 * cb;
    const int64_t k = blockIdx.y;
    load_chunk<T>(p, t.n, k, cb, t.h0, t.w0, 2, rows, cols, gsm, xsm, wgs, wxs, bgs, bxs, tid, g.threads);
    const A inv = A(1) / p.count;
    for (int l = tid; l < cb; l += g.threads) {
        const int64_t j = k * cb + l;
        const bool ok = j < p.F;
        const A gam_g = ok ? p.gam_g[j] : A(0), gam_x = ok ? p.gam_x[j] : A(0);
        const A rstd_g = ok ? p.coef[j * COEF_N + COEF_RSTD] : A(0);
        const A rstd_x = ok ? p.coef[(p.F + j) * COEF_N + COEF_RSTD] : A(0);
        cfs[0 * cb + l] = gam_g;
        cfs[1 * cb + l] = ok ? p.bet_g[j] : A(0);
        cfs[2 * cb + l] = ok ? p.coef[j * COEF_N + COEF_MEAN] : A(0);
        cfs[3 * cb + l] = rstd_g;
        cfs[4 * cb + l] = gam_x;
        cfs[5 * cb + l] = ok ? p.bet_x[j] : A(0);
        cfs[6 * cb + l] = ok ? p.coef[(p.F + j) * COEF_N + COEF_MEAN] : A(0);
        cfs[7 * cb + l] = rstd_x;
        cfs[8 * cb + l] = ok ? to_acc(p.wpsi[j]) : A(0);
        cfs[9 * cb + l] = ok ? p.res2[j] * inv : A(0);              // sum g_s / M
        cfs[10 * cb + l] = ok ? p.res2[p.F + j] * inv : A(0);       // sum g_s zhat_g / M
        cfs[11 * cb + l] = ok ? p.res2[2 * p.F + j] * inv : A(0);   // sum g_s zhat_x / M
    }
    __syncthreads();

    // dL/dzg, dL/dzx on the tile plus a 1-pixel halo
    for (int i = tid; i < rg * cg * cb; i += g.threads) {
        const int jl = i % cb, pix = i / cb;
        const int er = pix / cg, ec = pix - (pix / cg) * cg;
        const int64_t h = t.h0 - 1 + er, w = t.w0 - 1 + ec, j = k * cb + jl;
        A vg = A(0), vx = A(0);
        if (j < p.F && h >= 0 && h < p.H && w >= 0 && w < p.W) {
            const A zg = gconv3_one<A>(gsm, cols, ng, p.cpg_g, wgs, cb, jl, er, ec, bgs[jl]);
            const A zx = gconv3_one<A>(xsm, cols, nx, p.cpg_x, wxs, cb, jl, er, ec, bxs[jl]);
            const A zhg = (zg - cfs[2 * cb + jl]) * cfs[3 * cb + jl];
            const A zhx = (zx - cfs[6 * cb + jl]) * cfs[7 * cb + jl];
            const A s = zhg * cfs[jl] + cfs[cb + jl] + zhx * cfs[4 * cb + jl] + cfs[5 * cb + jl];
            const A gzp = grad_zp(p, (t.n * p.H + h) * p.W + w);
            const A gs = activate_backward<A>(gzp * cfs[8 * cb + jl], s, p.act);
            const A sc_g = cfs[jl] * cfs[3 * cb + jl], sc_x = cfs[4 * cb + jl] * cfs[7 * cb + jl];
            if (p.training) {
                vg = sc_g * (gs - cfs[9 * cb + jl] - zhg * cfs[10 * cb + jl]);
                vx = sc_x * (gs - cfs[9 * cb + jl] - zhx * cfs[11 * cb + jl]);
            } else {
                vg = sc_g * gs;
                vx = sc_x * gs;
            }
        }
        gzg[i] = vg;
        gzx[i] = vx;
    }
    __syncthreads();

    // transposed grouped conv for the block's input channels (register-blocked)
    const int jl = tid % cb, sg = tid / cb, row = sg / g.gw, col0 = (sg % g.gw) * kV;
    A dg[kMaxCpg][kV], dx[kMaxCpg][kV];
#pragma unroll
    for (int i = 0; i < kMaxCpg; ++i)
#pragma unroll
        for (int v = 0; v < kV; ++v) {
            dg[i][v] = A(0);
            dx[i][v] = A(0);
        }
#pragma unroll
    for (int u = 0; u < 3; ++u) {
        A rg_[kV + 2], rx_[kV + 2];
        const int er = row + 2 - u;
#pragma unroll
        for (int jj = 0; jj < kV + 2; ++jj) {
            rg_[jj] = gzg[(er * cg + col0 + jj) * cb + jl];
            rx_[jj] = gzx[(er * cg + col0 + jj) * cb + jl];
        }
#pragma unroll
        for (int vv = 0; vv < 3; ++vv) {
#pragma unroll
            for (int i = 0; i < kMaxCpg; ++i) {
                if (i < p.cpg_g) {
                    const A wt = wgs[(i * 9 + u * 3 + vv) * cb + jl];
#pragma unroll
                    for (int v = 0; v < kV; ++v) dg[i][v] += wt * rg_[v + 2 - vv];
                }
                if (i < p.cpg_x) {
                    const A wt = wxs[(i * 9 + u * 3 + vv) * cb + jl];
#pragma unroll
                    for (int v = 0; v < kV; ++v) dx[i][v] += wt * rx_[v + 2 - vv];
                }
            }
        }
    }

    // conv weight / bias partials: task = (kind, lane); kinds: g taps, g bias, x taps, x bias
    const int kg = p.cpg_g * 9, kx = p.cpg_x * 9;
    const int kinds = kg + 1 + kx + 1;
    const int tasks = kinds * cb, parts = p.parts, npos = th * tw;
    const int64_t m3 = p.F * int64_t(kinds);
    for (int it = tid; it < tasks * parts; it += g.threads) {
        const int task = it % tasks, part = it / tasks;
        const int tl = task % cb, kind = task / cb;
        A s = A(0);
        for (int q = part; q < npos; q += parts) {
            const int r = q / tw, cc = q - (q / tw) * tw;
            if (kind < kg) {
                const int i = kind / 9, tap = kind % 9, u = tap / 3, v = tap % 3;
                s += gzg[((r + 1) * cg + cc + 1) * cb + tl] * gsm[((r + 1 + u) * cols + cc + 1 + v) * ng + tl * p.cpg_g + i];
            } else if (kind == kg) {
                s += gzg[((r + 1) * cg + cc + 1) * cb + tl];
            } else if (kind < kg + 1 + kx) {
                const int kk = kind - kg - 1, i = kk / 9, tap = kk % 9, u = tap / 3, v = tap % 3;
                s += gzx[((r + 1) * cg + cc + 1) * cb + tl] * xsm[((r + 1 + u) * cols + cc + 1 + v) * nx + tl * p.cpg_x + i];
            } else {
                s += gzx[((r + 1) * cg + cc + 1) * cb + tl];
            }
        }
        if (parts == 1) {
            const int64_t j = k * cb + tl;
            if (j < p.F) {
                int64_t m;
                if (kind < kg) m = (j * p.cpg_g) * 9 + kind;
                else if (kind == kg) m = p.F * kg + j;
                else if (kind < kg + 1 + kx) m = p.F * (kg + 1) + j * p.cpg_x * 9 + (kind - kg - 1);
                else m = p.F * (kg + 1 + kx) + j;
                p.partial[t.slot * m3 + m] = s;
            }
        } else {
            red[it] = s;
        }
    }
    __syncthreads();
    if (parts > 1) {
        for (int task = tid; task < tasks; task += g.threads) {
            const int tl = task % cb, kind = task / cb;
            A s = A(0);
            for (int part = 0; part < parts; ++part) s += red[part * tasks + task];
            const int64_t j = k * cb + tl;
            if (j < p.F) {
                int64_t m;
                if (kind < kg) m = (j * p.cpg_g) * 9 + kind;
                else if (kind == kg) m = p.F * kg + j;
                else if (kind < kg + 1 + kx) m = p.F * (kg + 1) + j * p.cpg_x * 9 + (kind - kg - 1);
                else m = p.F * (kg + 1 + kx) + j;
                p.partial[t.slot * m3 + m] = s;
            }
        }
    }

    // add the direct terms, stage both gradients in the (no longer needed) input tiles and store them
    const int64_t h = t.h0 + row;
    const int64_t j = k * cb + jl;
    A* sg_stage = gsm;  // [th][tw][ng]
    A* sx_stage = xsm;  // [th][tw][nx]
    const A scale_p = psi_coef(p, COEF_SCALE), shift_p = psi_coef(p, COEF_SHIFT);
#pragma unroll
    for (int v = 0; v < kV; ++v) {
        const int64_t w = t.w0 + col0 + v;
        const bool inside = h < p.H && w < p.W && j < p.F;
        const A psi = inside ? sigmoid<A>(p.zp[(t.n * p.H + h) * p.W + w] * scale_p + shift_p) : A(0);
        const int pix = row * tw + col0 + v;
#pragma unroll
        for (int i = 0; i < kMaxCpg; ++i) {
            if (i < p.cpg_g) {
                A val = dg[i][v];
                if (p.add && inside) val += to_acc(p.gout[offset4(p.os, t.n, j * p.cpg_g + i, h, w)]);
                sg_stage[pix * ng + jl * p.cpg_g + i] = val;
            }
            if (i < p.cpg_x) {
                A val = dx[i][v];
                if (inside) val += to_acc(p.gout[offset4(p.os, t.n, j * p.cpg_x + i, h, w)]) * psi;
                sx_stage[pix * nx + jl * p.cpg_x + i] = val;
            }
        }
    }
    __syncthreads();
    const ChannelMap identity = make_channel_map(0, 0, 0);
    store_tile<T, A>(p.gg, p.gs, t.n, k * ng, ng, p.Cg, identity, p.H, p.W, t.h0, t.w0, th, tw, p.vec_gg, sg_stage,
                     tid, g.threads);
    store_tile<T, A>(p.gx, p.xs, t.n, k * nx, nx, p.Cx, identity, p.H, p.W, t.h0, t.w0, th, tw, p.vec_gx, sx_stage,
                     tid, g.threads);
}

// ------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------
struct Plan {
    TileGeom stats, zp, sums, grad;
    int cpg_g, cpg_x, parts;
    size_t f_coef, f_partial1, f_partial2, f_zp, f_bytes;
    size_t b_coef, b_zp, b_gap, b_partial1, b_res1, b_partial2, b_res2, b_partial3, b_res3, b_bytes;
};

inline const char* check_args(const EmcadLgagArgs& a) {
    if (a.ksize != 3) return "grouped_attention_gate: the cuda backend supports kernel size 3 only";
    if (a.groups <= 0 || a.f_int != a.groups)
        return "grouped_attention_gate: the cuda backend needs one gate channel per group (F_int == groups)";
    if (a.cg % a.groups != 0 || a.cx % a.groups != 0 || a.cg / a.groups > kMaxCpg || a.cx / a.groups > kMaxCpg)
        return "grouped_attention_gate: the cuda backend supports at most 4 input channels per group";
    if (a.add_gate_input && a.cg != a.cx) return "grouped_attention_gate: add_gate_input needs equal channels";
    if (a.dtype < 0 || a.dtype >= EMCAD_DTYPE_COUNT) return "grouped_attention_gate: unsupported dtype";
    if (a.act < 0 || a.act >= EMCAD_ACT_COUNT) return "grouped_attention_gate: unsupported activation";
    if (a.n <= 0 || a.h <= 0 || a.w <= 0 || a.cg <= 0 || a.cx <= 0) return "grouped_attention_gate: empty input";
    if (a.n > 65535) return "grouped_attention_gate: batch larger than 65535";
    return nullptr;
}

inline bool make_plan(const EmcadLgagArgs& a, Plan* plan) {
    if (check_args(a) != nullptr) return false;
    plan->cpg_g = int(a.cg / a.groups);
    plan->cpg_x = int(a.cx / a.groups);
    const int cs = plan->cpg_g + plan->cpg_x;
    const bool cl = a.x_stride[1] == 1 && a.cx > 1;
    const size_t ab = a.dtype == EMCAD_DTYPE_F64 ? 8 : 4;
    const int64_t F = a.f_int;
    bool ok = choose_geometry(
        a.h, a.w, F, cl, 16,
        [&](int th, int tw, int cb, int threads) { return ab * stats_smem(th, tw, cb, threads, cs); }, &plan->stats);
    ok = ok && choose_geometry(
                   a.h, a.w, F, cl, 16,
                   [&](int th, int tw, int cb, int threads) { return ab * zp_smem(th, tw, cb, threads, cs); },
                   &plan->zp);
    ok = ok && choose_geometry(
                   a.h, a.w, F, cl, 16,
                   [&](int th, int tw, int cb, int threads) { return ab * sums_smem(th, tw, cb, threads, cs); },
                   &plan->sums);
    ok = ok && choose_geometry(
                   a.h, a.w, F, cl, 16,
                   [&](int th, int tw, int cb, int threads) { return ab * grad_smem(th, tw, cb, threads, cs); },
                   &plan->grad);
    if (!ok || !grid_ok(plan->stats, a.n) || !grid_ok(plan->zp, a.n) || !grid_ok(plan->sums, a.n) ||
        !grid_ok(plan->grad, a.n))
        return false;
    plan->parts = choose_parts((cs * 9 + 2) * plan->grad.cb, plan->grad.threads);
    const size_t pixels = size_t(a.n) * a.h * a.w;
    const size_t m3 = size_t(F) * (cs * 9 + 2);
    ScratchLayout f;
    plan->f_coef = f.add(size_t(2 * F + 1) * COEF_N * ab);
    plan->f_partial1 = a.training ? f.add(size_t(plan->stats.slots(a.n)) * 2 * F * 3 * ab) : 0;
    plan->f_partial2 = a.training ? f.add(size_t(plan->zp.slots(a.n)) * 3 * ab) : 0;
    plan->f_zp = f.add(pixels * ab);
    plan->f_bytes = f.bytes;
    ScratchLayout b;
    plan->b_coef = b.add(size_t(2 * F + 1) * COEF_N * ab);
    plan->b_zp = b.add(pixels * ab);
    plan->b_gap = b.add(pixels * ab);
    plan->b_partial1 = b.add(size_t(plan->zp.slots(a.n)) * 2 * ab);
    plan->b_res1 = b.add(2 * ab);
    plan->b_partial2 = b.add(size_t(plan->sums.slots(a.n)) * (4 * F + 1) * ab);
    plan->b_res2 = b.add(size_t(4 * F + 1) * ab);
    plan->b_partial3 = b.add(size_t(plan->grad.slots(a.n)) * m3 * ab);
    plan->b_res3 = b.add(m3 * ab);
    plan->b_bytes = b.bytes;
    return true;
}

template <class T>
inline Params<T> make_params(const EmcadLgagArgs& a, const Plan& plan) {
    using A = acc_t<T>;
    Params<T> p;
    p.g = static_cast<const T*>(a.g);
    p.x = static_cast<const T*>(a.x);
    p.wg = static_cast<const T*>(a.wg);
    p.bg = static_cast<const T*>(a.bg);
    p.wx = static_cast<const T*>(a.wx);
    p.bx = static_cast<const T*>(a.bx);
    p.wpsi = static_cast<const T*>(a.wpsi);
    p.bpsi = static_cast<const T*>(a.bpsi);
    p.gout = static_cast<const T*>(a.grad_out);
    p.out = static_cast<T*>(a.out);
    p.gg = static_cast<T*>(a.grad_g);
    p.gx = static_cast<T*>(a.grad_x);
    p.gam_g = static_cast<const A*>(a.bn_g[0]);
    p.bet_g = static_cast<const A*>(a.bn_g[1]);
    p.gam_x = static_cast<const A*>(a.bn_x[0]);
    p.bet_x = static_cast<const A*>(a.bn_x[1]);
    p.coef = nullptr;
    p.zp = nullptr;
    p.gap = nullptr;
    p.res1 = nullptr;
    p.res2 = nullptr;
    p.partial = nullptr;
    p.gs = make_strides(a.g_stride);
    p.xs = make_strides(a.x_stride);
    p.os = make_strides(a.out_stride);
    p.N = a.n;
    p.H = a.h;
    p.W = a.w;
    p.Cg = a.cg;
    p.Cx = a.cx;
    p.F = a.f_int;
    p.cpg_g = plan.cpg_g;
    p.cpg_x = plan.cpg_x;
    p.count = A(double(a.n) * double(a.h) * double(a.w));
    p.act = a.act;
    p.training = a.training;
    p.add = a.add_gate_input;
    p.parts = plan.parts;
    p.vec_g = p.vec_x = p.vec_gg = p.vec_gx = false;
    return p;
}

template <class T>
inline void set_geometry(Params<T>& p, const TileGeom& g, const EmcadLgagArgs& a, bool grads) {
    constexpr int V = Vec<T>::size;
    p.geo = g;
    p.vec_g = vector_ok<T>(a.g, p.gs, a.cg) && (g.cb * p.cpg_g) % V == 0;
    p.vec_x = vector_ok<T>(a.x, p.xs, a.cx) && (g.cb * p.cpg_x) % V == 0;
    p.vec_gg = grads && p.vec_g && vector_ok<T>(a.grad_g, p.gs, a.cg);
    p.vec_gx = grads && p.vec_x && vector_ok<T>(a.grad_x, p.xs, a.cx);
}

inline dim3 grid_of(const TileGeom& g, int64_t n, bool chunks) {
    return dim3(unsigned(g.tiles_h * g.tiles_w), chunks ? unsigned(g.chunks) : 1u, unsigned(n));
}

template <class A>
inline BnGroups<A> bn_groups(const EmcadLgagArgs& a, bool with_psi, bool outputs) {
    BnGroups<A> groups;
    const void* const* src[3] = {a.bn_g, a.bn_x, a.bn_psi};
    groups.count = with_psi ? 3 : 2;
    for (int k = 0; k < 3; ++k) {
        groups.g[k].gamma = static_cast<const A*>(src[k][0]);
        groups.g[k].beta = static_cast<const A*>(src[k][1]);
        groups.g[k].mean = static_cast<const A*>(src[k][2]);
        groups.g[k].var = static_cast<const A*>(src[k][3]);
        groups.g[k].out_mean = outputs ? static_cast<A*>(a.save_stats[2 * k]) : nullptr;
        groups.g[k].out_var = outputs ? static_cast<A*>(a.save_stats[2 * k + 1]) : nullptr;
        groups.g[k].size = k < 2 ? a.f_int : 1;
    }
    return groups;
}

template <class T>
cudaError_t forward(const EmcadLgagArgs& a, cudaStream_t stream) {
    using A = acc_t<T>;
    Plan plan;
    if (!make_plan(a, &plan)) return cudaErrorInvalidValue;
    if (a.scratch_bytes < plan.f_bytes || a.scratch == nullptr) return cudaErrorInvalidValue;
    Params<T> p = make_params<T>(a, plan);
    A* coef = scratch_at<A>(a.scratch, plan.f_coef);
    p.zp = scratch_at<A>(a.scratch, plan.f_zp);
    if (a.training) {
        set_geometry(p, plan.stats, a, false);
        p.partial = scratch_at<A>(a.scratch, plan.f_partial1);
        EMCAD_RETURN_IF_ERROR(launch_kernel(&stats_kernel<T>, grid_of(plan.stats, a.n, true),
                                            dim3(plan.stats.threads), plan.stats.smem, stream, p));
        EMCAD_RETURN_IF_ERROR(launch_welford_reduce<A>(p.partial, plan.stats.slots(a.n), bn_groups<A>(a, false, true),
                                                       a.eps, coef, stream));
    } else {
        EMCAD_RETURN_IF_ERROR(launch_bn_fold<A>(bn_groups<A>(a, true, true), a.eps, coef, stream));
    }
    p.coef = coef;
    set_geometry(p, plan.zp, a, false);
    p.partial = a.training ? scratch_at<A>(a.scratch, plan.f_partial2) : nullptr;
    EMCAD_RETURN_IF_ERROR(
        launch_kernel(&zp_kernel<T, false>, grid_of(plan.zp, a.n, false), dim3(plan.zp.threads), plan.zp.smem, stream, p));
    if (a.training) {
        BnGroups<A> psi;
        psi.count = 1;
        psi.g[0] = bn_groups<A>(a, true, true).g[2];
        EMCAD_RETURN_IF_ERROR(
            launch_welford_reduce<A>(p.partial, plan.zp.slots(a.n), psi, a.eps, coef + 2 * a.f_int * COEF_N, stream));
    }
    const int64_t total = a.n * a.cx * a.h * a.w;
    const int64_t blocks = m_min<int64_t>(ceil_div(total, kMaxThreads), int64_t(1) << 20);
    return launch_kernel(&out_kernel<T>, dim3(unsigned(blocks)), dim3(kMaxThreads), 0, stream, p);
}

template <class T>
cudaError_t backward(const EmcadLgagArgs& a, cudaStream_t stream) {
    using A = acc_t<T>;
    Plan plan;
    if (!make_plan(a, &plan)) return cudaErrorInvalidValue;
    if (a.scratch_bytes < plan.b_bytes || a.scratch == nullptr) return cudaErrorInvalidValue;
    Params<T> p = make_params<T>(a, plan);
    const int acc_dt = acc_dtype_of(a.dtype);
    const int64_t F = a.f_int;
    A* coef = scratch_at<A>(a.scratch, plan.b_coef);
    EMCAD_RETURN_IF_ERROR(launch_bn_fold<A>(bn_groups<A>(a, true, false), a.eps, coef, stream));
    p.coef = coef;
    p.zp = scratch_at<A>(a.scratch, plan.b_zp);
    p.gap = scratch_at<A>(a.scratch, plan.b_gap);

    // B1
    set_geometry(p, plan.zp, a, false);
    p.partial = scratch_at<A>(a.scratch, plan.b_partial1);
    EMCAD_RETURN_IF_ERROR(
        launch_kernel(&zp_kernel<T, true>, grid_of(plan.zp, a.n, false), dim3(plan.zp.threads), plan.zp.smem, stream, p));
    A* res1 = scratch_at<A>(a.scratch, plan.b_res1);
    SumSegments s1;
    s1.count = 0;
    s1.add(0, 1, a.grad_bn[5], acc_dt);
    s1.add(1, 1, a.grad_bn[4], acc_dt);
    EMCAD_RETURN_IF_ERROR(launch_sum_reduce<A>(p.partial, plan.zp.slots(a.n), 2, res1, s1, stream));
    p.res1 = res1;

    // B2
    set_geometry(p, plan.sums, a, false);
    p.partial = scratch_at<A>(a.scratch, plan.b_partial2);
    EMCAD_RETURN_IF_ERROR(launch_kernel(&bwd_sums_kernel<T>, grid_of(plan.sums, a.n, true), dim3(plan.sums.threads),
                                        plan.sums.smem, stream, p));
    A* res2 = scratch_at<A>(a.scratch, plan.b_res2);
    SumSegments s2;
    s2.count = 0;
    s2.add(0, F, a.grad_bn[1], acc_dt);
    s2.add(0, F, a.grad_bn[3], acc_dt);
    s2.add(F, F, a.grad_bn[0], acc_dt);
    s2.add(2 * F, F, a.grad_bn[2], acc_dt);
    s2.add(3 * F, F, a.grad_wpsi, a.dtype);
    s2.add(4 * F, 1, a.grad_bpsi, a.dtype);
    EMCAD_RETURN_IF_ERROR(launch_sum_reduce<A>(p.partial, plan.sums.slots(a.n), 4 * F + 1, res2, s2, stream));
    p.res2 = res2;

    // B3
    set_geometry(p, plan.grad, a, true);
    p.partial = scratch_at<A>(a.scratch, plan.b_partial3);
    EMCAD_RETURN_IF_ERROR(launch_kernel(&bwd_grad_kernel<T>, grid_of(plan.grad, a.n, true), dim3(plan.grad.threads),
                                        plan.grad.smem, stream, p));
    const int64_t kg = F * plan.cpg_g * 9, kx = F * plan.cpg_x * 9;
    SumSegments s3;
    s3.count = 0;
    s3.add(0, kg, a.grad_wg, a.dtype);
    s3.add(kg, F, a.grad_bg, a.dtype);
    s3.add(kg + F, kx, a.grad_wx, a.dtype);
    s3.add(kg + F + kx, F, a.grad_bx, a.dtype);
    return launch_sum_reduce<A>(p.partial, plan.grad.slots(a.n), kg + F + kx + F,
                                scratch_at<A>(a.scratch, plan.b_res3), s3, stream);
}

extern template cudaError_t forward<float>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t forward<double>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t forward<__half>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t forward<__nv_bfloat16>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t backward<float>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t backward<double>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t backward<__half>(const EmcadLgagArgs&, cudaStream_t);
extern template cudaError_t backward<__nv_bfloat16>(const EmcadLgagArgs&, cudaStream_t);

}  // namespace lgag
}  // namespace cuda
}  // namespace emcad
