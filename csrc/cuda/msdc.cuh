// multi_scale_dwconv (MSDC): kernels and host-side launch sequences, templated on the storage dtype.
// Instantiated once per dtype in msdc_<dtype>.cu (flash-attention style: one instantiation set per file).
//
// Forward, eval:      bn_fold -> apply
// Forward, training:  stats (per-block Welford partials, nothing written) -> welford_reduce -> apply (recompute)
// Backward:           bn_fold (saved stats) -> pass A (per-block sums of g_a and g_a*zhat) -> sum_reduce
//                     -> pass B (recompute, grad_x, per-block weight-grad partials) -> sum_reduce
// (KERNELS.md 6.2-6.3, 7). Every kernel works on a shared-memory halo tile that holds all branches' windows; each
// thread computes kV adjacent outputs along W for all branches (register blocking) from one halo.
#pragma once

#include "common.cuh"
#include "reduce.cuh"
#include "tile.cuh"

namespace emcad {
namespace cuda {
namespace msdc {

// A compile-time set of branch kernel sizes. Exact sets use each branch's own window; padded sets treat every
// branch as KMAX x KMAX with zero-padded weights (generic fallback) and gate branches on the runtime count.
template <int KMAX_, int K0, int K1, int K2, int K3>
struct KernelSet {
    static constexpr int KMAX = KMAX_;
    static constexpr int R = KMAX_ / 2;
    static constexpr int NB = (K0 > 0) + (K1 > 0) + (K2 > 0) + (K3 > 0);
    static constexpr __host__ __device__ int k(int b) { return b == 0 ? K0 : b == 1 ? K1 : b == 2 ? K2 : K3; }
    static constexpr __host__ __device__ int off(int b) { return (KMAX_ - k(b)) / 2; }
};
using KS135 = KernelSet<5, 1, 3, 5, 0>;  // EMCAD's MSDC
template <int K>
using KSPad = KernelSet<K, K, K, K, K>;

enum { MODE_STATS = 0, MODE_APPLY = 1 };

template <class T>
struct Params {
    using A = acc_t<T>;
    const T* x;
    const T* w[4];
    const T* gy;
    T* y;
    T* gx;
    const A* gamma;  // [nb][C]
    const A* beta;
    const A* coef;   // [nb][C][COEF_N]
    const A* sums;   // [2][nb][C]: sum of g_a, sum of g_a * zhat (backward pass B)
    A* partial;
    Strides xs, ys;
    int64_t N, C, H, W;
    A count;         // N * H * W
    int nb, act, concat, training;
    int ksize[4];
    ChannelMap map[4];
    TileGeom geo;
    bool vec_x, vec_y;
    int taps_total;
    int tap_base[5];
    int parts;
};

// ---- shared-memory sizes (in A elements) ----
template <class KS>
inline size_t fwd_smem_elems(int th, int tw, int cb, int threads, int nb_out) {
    const size_t xs = size_t(th + 2 * KS::R) * (tw + 2 * KS::R) * cb;
    const size_t ws = size_t(KS::NB) * KS::KMAX * KS::KMAX * cb;
    const size_t cf = size_t(KS::NB) * 2 * cb;
    const size_t red = size_t(KS::NB) * threads * 3;
    const size_t ys = size_t(nb_out) * th * tw * cb;
    return xs + ws + cf + (red > ys ? red : ys);
}
template <class KS>
inline size_t bwd_a_smem_elems(int th, int tw, int cb, int threads) {
    const size_t xs = size_t(th + 2 * KS::R) * (tw + 2 * KS::R) * cb;
    const size_t ws = size_t(KS::NB) * KS::KMAX * KS::KMAX * cb;
    const size_t pc = size_t(KS::NB) * 4 * cb;
    const size_t red = size_t(KS::NB) * threads * 2;
    return xs + ws + pc + red;
}
template <class KS>
inline size_t bwd_b_smem_elems(int th, int tw, int cb, int threads) {
    const size_t xs = size_t(th + 4 * KS::R) * (tw + 4 * KS::R) * cb;
    const size_t gz = size_t(KS::NB) * (th + 2 * KS::R) * (tw + 2 * KS::R) * cb;
    const size_t ws = size_t(KS::NB) * KS::KMAX * KS::KMAX * cb;
    const size_t pc = size_t(KS::NB) * 7 * cb;
    return xs + gz + ws + pc + size_t(threads);
}

// ---- device pieces ----
// zero-padded weights of the block's channels: ws[((b * KMAX + u) * KMAX + v) * cb + cl]
template <class T, class KS>
EMCAD_CU_D void load_weights(const Params<T>& p, int64_t c0, int cb, acc_t<T>* ws, int tid, int nthreads) {
    using A = acc_t<T>;
    const int items = KS::NB * KS::KMAX * KS::KMAX * cb;
    for (int i = tid; i < items; i += nthreads) {
        const int cl = i % cb;
        const int tap = (i / cb) % (KS::KMAX * KS::KMAX);
        const int b = i / (cb * KS::KMAX * KS::KMAX);
        const int u = tap / KS::KMAX, v = tap % KS::KMAX;
        const int64_t c = c0 + cl;
        A val = A(0);
        if (b < p.nb && c < p.C) {
            const int k = p.ksize[b];
            const int o = (KS::KMAX - k) / 2;
            if (u >= o && u < o + k && v >= o && v < o + k)
                val = to_acc(p.w[b][c * k * k + (u - o) * k + (v - o)]);
        }
        ws[i] = val;
    }
}

// acc[b][v] = conv of branch b at tile row `row`, columns col0 + v, from the halo tile xs (origin -R, -R)
template <class KS, class A>
EMCAD_CU_D void stencil(const A* __restrict__ xs, const A* __restrict__ ws, int cols, int cb, int row, int col0, int cl,
                     int nb, A (&acc)[KS::NB][kV]) {
#pragma unroll
    for (int b = 0; b < KS::NB; ++b)
#pragma unroll
        for (int v = 0; v < kV; ++v) acc[b][v] = A(0);
#pragma unroll
    for (int u = 0; u < KS::KMAX; ++u) {
        A rb[kV + KS::KMAX - 1];
        const A* src = xs + ((row + u) * cols + col0) * cb + cl;
#pragma unroll
        for (int j = 0; j < kV + KS::KMAX - 1; ++j) rb[j] = src[j * cb];
#pragma unroll
        for (int b = 0; b < KS::NB; ++b) {
            const int o = KS::off(b), k = KS::k(b);
            if (b >= nb || u < o || u >= o + k) continue;
#pragma unroll
            for (int vv = 0; vv < KS::KMAX; ++vv) {
                if (vv >= k) continue;
                const A wt = ws[((b * KS::KMAX + u) * KS::KMAX + o + vv) * cb + cl];
#pragma unroll
                for (int v = 0; v < kV; ++v) acc[b][v] += wt * rb[v + o + vv];
            }
        }
    }
}

// z of branch b at one position whose window starts at halo-tile row er, column ec (tile stride `cols`)
template <class KS, class A>
EMCAD_CU_D A stencil_one(const A* __restrict__ xs, const A* __restrict__ ws, int cols, int cb, int er, int ec, int cl,
                      int b) {
    A z = A(0);
    const int o = KS::off(b), k = KS::k(b);
#pragma unroll
    for (int u = 0; u < KS::KMAX; ++u) {
        if (u < o || u >= o + k) continue;
#pragma unroll
        for (int v = 0; v < KS::KMAX; ++v) {
            if (v < o || v >= o + k) continue;
            z += ws[((b * KS::KMAX + u) * KS::KMAX + v) * cb + cl] * xs[((er + u) * cols + ec + v) * cb + cl];
        }
    }
    return z;
}

template <class T, class KS, int MODE>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const int tid = threadIdx.x;
    const int cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2 * KS::R, cols = tw + 2 * KS::R;
    A* xs = smem;
    A* ws = xs + rows * cols * cb;
    A* cf = ws + KS::NB * KS::KMAX * KS::KMAX * cb;
    A* un = cf + KS::NB * 2 * cb;  // red (stats) or output staging (apply)
    const int64_t tile = blockIdx.x;
    const int64_t ty = tile / g.tiles_w, tx = tile - ty * g.tiles_w;
    const int64_t n = blockIdx.z;
    const int64_t c0 = int64_t(blockIdx.y) * cb;
    const int64_t h0 = ty * th, w0 = tx * tw;

    load_tile<T, A>(p.x, p.xs, n, c0, cb, p.C, p.H, p.W, h0 - KS::R, w0 - KS::R, rows, cols, p.vec_x, xs, tid,
                    g.threads);
    load_weights<T, KS>(p, c0, cb, ws, tid, g.threads);
    if (MODE == MODE_APPLY) {
        for (int i = tid; i < KS::NB * cb; i += g.threads) {
            const int b = i / cb, cl = i % cb;
            const int64_t c = c0 + cl;
            const bool ok = b < p.nb && c < p.C;
            cf[(b * 2 + 0) * cb + cl] = ok ? p.coef[(b * p.C + c) * COEF_N + COEF_SCALE] : A(0);
            cf[(b * 2 + 1) * cb + cl] = ok ? p.coef[(b * p.C + c) * COEF_N + COEF_SHIFT] : A(0);
        }
    }
    __syncthreads();

    const int cl = tid % cb;
    const int sg = tid / cb;
    const int row = sg / g.gw;
    const int col0 = (sg % g.gw) * kV;
    A acc[KS::NB][kV];
    stencil<KS, A>(xs, ws, cols, cb, row, col0, cl, p.nb, acc);
    const int64_t c = c0 + cl;
    const int64_t h = h0 + row;

    if (MODE == MODE_STATS) {
        int valid = 0;
        if (c < p.C && h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (w0 + col0), 0), kV));
        A* red = un;  // [NB][groups][cb][3]
        const int groups = g.gh * g.gw;
#pragma unroll
        for (int b = 0; b < KS::NB; ++b) {
            const Welford<A> wf = local_welford<A, kV>(acc[b], b < p.nb ? valid : 0);
            A* mine = red + ((b * groups + sg) * cb + cl) * 3;
            mine[0] = wf.n;
            mine[1] = wf.mean;
            mine[2] = wf.m2;
        }
        // one tree per branch region (all regions advance together)
        for (int s = groups / 2; s > 0; s >>= 1) {
            __syncthreads();
            if (sg < s) {
#pragma unroll
                for (int b = 0; b < KS::NB; ++b) {
                    A* a = red + ((b * groups + sg) * cb + cl) * 3;
                    const A* o = red + ((b * groups + sg + s) * cb + cl) * 3;
                    Welford<A> wa = {a[0], a[1], a[2]};
                    const Welford<A> wb = {o[0], o[1], o[2]};
                    wa = welford_merge(wa, wb);
                    a[0] = wa.n;
                    a[1] = wa.mean;
                    a[2] = wa.m2;
                }
            }
        }
        __syncthreads();
        if (sg == 0 && c < p.C) {
            const int64_t slot = (n * g.tiles_h + ty) * g.tiles_w + tx;
            for (int b = 0; b < p.nb; ++b) {
                const A* r = red + ((b * groups) * cb + cl) * 3;
                A* dst = p.partial + ((slot * p.nb + b) * p.C + c) * 3;
                dst[0] = r[0];
                dst[1] = r[1];
                dst[2] = r[2];
            }
        }
    } else {
        A* ys = un;  // [nb_out][th][tw][cb]
#pragma unroll
        for (int v = 0; v < kV; ++v) {
            A sum = A(0);
#pragma unroll
            for (int b = 0; b < KS::NB; ++b) {
                if (b >= p.nb) continue;
                const A a = activate<A>(acc[b][v] * cf[(b * 2) * cb + cl] + cf[(b * 2 + 1) * cb + cl], p.act);
                if (p.concat)
                    ys[((b * th + row) * tw + col0 + v) * cb + cl] = a;
                else
                    sum += a;
            }
            if (!p.concat) ys[(row * tw + col0 + v) * cb + cl] = sum;
        }
        __syncthreads();
        const int nb_out = p.concat ? p.nb : 1;
        for (int b = 0; b < nb_out; ++b)
            store_tile<T, A>(p.y, p.ys, n, c0, cb, p.C, p.map[b], p.H, p.W, h0, w0, th, tw, p.vec_y,
                             ys + b * th * tw * cb, tid, g.threads);
    }
}

// pass A: per-block sums of g_a = act'(a) * g and g_a * zhat per (branch, channel)
template <class T, class KS>
__global__ void __launch_bounds__(kMaxThreads) bwd_reduce_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const int tid = threadIdx.x;
    const int cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2 * KS::R, cols = tw + 2 * KS::R;
    A* xs = smem;
    A* ws = xs + rows * cols * cb;
    A* pc = ws + KS::NB * KS::KMAX * KS::KMAX * cb;  // [NB][4][cb]: gamma, beta, mean, rstd
    A* red = pc + KS::NB * 4 * cb;                   // [NB][groups][cb][2]
    const int64_t tile = blockIdx.x;
    const int64_t ty = tile / g.tiles_w, tx = tile - ty * g.tiles_w;
    const int64_t n = blockIdx.z;
    const int64_t c0 = int64_t(blockIdx.y) * cb;
    const int64_t h0 = ty * th, w0 = tx * tw;

    load_tile<T, A>(p.x, p.xs, n, c0, cb, p.C, p.H, p.W, h0 - KS::R, w0 - KS::R, rows, cols, p.vec_x, xs, tid,
                    g.threads);
    load_weights<T, KS>(p, c0, cb, ws, tid, g.threads);
    for (int i = tid; i < KS::NB * cb; i += g.threads) {
        const int b = i / cb, cl = i % cb;
        const int64_t c = c0 + cl;
        const bool ok = b < p.nb && c < p.C;
        const int64_t m = b * p.C + c;
        pc[(b * 4 + 0) * cb + cl] = ok ? p.gamma[m] : A(0);
        pc[(b * 4 + 1) * cb + cl] = ok ? p.beta[m] : A(0);
        pc[(b * 4 + 2) * cb + cl] = ok ? p.coef[m * COEF_N + COEF_MEAN] : A(0);
        pc[(b * 4 + 3) * cb + cl] = ok ? p.coef[m * COEF_N + COEF_RSTD] : A(0);
    }
    __syncthreads();

    const int cl = tid % cb;
    const int sg = tid / cb;
    const int row = sg / g.gw;
    const int col0 = (sg % g.gw) * kV;
    A acc[KS::NB][kV];
    stencil<KS, A>(xs, ws, cols, cb, row, col0, cl, p.nb, acc);
    const int64_t c = c0 + cl;
    const int64_t h = h0 + row;
    int valid = 0;
    if (c < p.C && h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (w0 + col0), 0), kV));
    const int groups = g.gh * g.gw;
#pragma unroll
    for (int b = 0; b < KS::NB; ++b) {
        A s1 = A(0), s2 = A(0);
        if (b < p.nb) {
            const A gamma = pc[(b * 4 + 0) * cb + cl], beta = pc[(b * 4 + 1) * cb + cl];
            const A mean = pc[(b * 4 + 2) * cb + cl], rstd = pc[(b * 4 + 3) * cb + cl];
            const int64_t oc = valid > 0 ? p.map[p.concat ? b : 0](c) : 0;
#pragma unroll
            for (int v = 0; v < kV; ++v) {
                if (v >= valid) continue;
                const A zhat = (acc[b][v] - mean) * rstd;
                const A a = zhat * gamma + beta;
                const A gy = to_acc(p.gy[offset4(p.ys, n, oc, h, w0 + col0 + v)]);
                const A ga = activate_backward<A>(gy, a, p.act);
                s1 += ga;
                s2 += ga * zhat;
            }
        }
        A* mine = red + ((b * groups + sg) * cb + cl) * 2;
        mine[0] = s1;
        mine[1] = s2;
    }
    for (int s = groups / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (sg < s) {
#pragma unroll
            for (int b = 0; b < KS::NB; ++b) {
                A* a = red + ((b * groups + sg) * cb + cl) * 2;
                const A* o = red + ((b * groups + sg + s) * cb + cl) * 2;
                a[0] += o[0];
                a[1] += o[1];
            }
        }
    }
    __syncthreads();
    if (sg == 0 && c < p.C) {
        const int64_t slot = (n * g.tiles_h + ty) * g.tiles_w + tx;
        const int64_t m_total = 2 * int64_t(p.nb) * p.C;
        for (int b = 0; b < p.nb; ++b) {
            const A* r = red + ((b * groups) * cb + cl) * 2;
            p.partial[slot * m_total + (0 * p.nb + b) * p.C + c] = r[0];
            p.partial[slot * m_total + (1 * int64_t(p.nb) + b) * p.C + c] = r[1];
        }
    }
}

// pass B: grad_x of the tile and per-block weight-gradient partials
template <class T, class KS>
__global__ void __launch_bounds__(kMaxThreads) bwd_grad_kernel(Params<T> p) {
    using A = acc_t<T>;
    constexpr int R = KS::R, KMAX = KS::KMAX;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const int tid = threadIdx.x;
    const int cb = g.cb, th = g.th, tw = g.tw;
    const int rx = th + 4 * R, cx = tw + 4 * R;  // x tile, origin (h0 - 2R, w0 - 2R)
    const int rg = th + 2 * R, cg = tw + 2 * R;  // gz tile, origin (h0 - R, w0 - R)
    A* xs = smem;
    A* gz = xs + rx * cx * cb;                    // [NB][rg][cg][cb]
    A* ws = gz + KS::NB * rg * cg * cb;
    A* pc = ws + KS::NB * KMAX * KMAX * cb;       // [NB][7][cb]
    A* red = pc + KS::NB * 7 * cb;                // [threads]
    const int64_t tile = blockIdx.x;
    const int64_t ty = tile / g.tiles_w, tx = tile - ty * g.tiles_w;
    const int64_t n = blockIdx.z;
    const int64_t c0 = int64_t(blockIdx.y) * cb;
    const int64_t h0 = ty * th, w0 = tx * tw;

    load_tile<T, A>(p.x, p.xs, n, c0, cb, p.C, p.H, p.W, h0 - 2 * R, w0 - 2 * R, rx, cx, p.vec_x, xs, tid,
                    g.threads);
    load_weights<T, KS>(p, c0, cb, ws, tid, g.threads);
    const A inv_count = A(1) / p.count;
    for (int i = tid; i < KS::NB * cb; i += g.threads) {
        const int b = i / cb, cl = i % cb;
        const int64_t c = c0 + cl;
        const bool ok = b < p.nb && c < p.C;
        const int64_t m = b * p.C + c;
        const A gamma = ok ? p.gamma[m] : A(0);
        const A rstd = ok ? p.coef[m * COEF_N + COEF_RSTD] : A(0);
        pc[(b * 7 + 0) * cb + cl] = gamma;
        pc[(b * 7 + 1) * cb + cl] = ok ? p.beta[m] : A(0);
        pc[(b * 7 + 2) * cb + cl] = ok ? p.coef[m * COEF_N + COEF_MEAN] : A(0);
        pc[(b * 7 + 3) * cb + cl] = rstd;
        pc[(b * 7 + 4) * cb + cl] = gamma * rstd;
        pc[(b * 7 + 5) * cb + cl] = ok ? p.sums[m] * inv_count : A(0);
        pc[(b * 7 + 6) * cb + cl] = ok ? p.sums[int64_t(p.nb) * p.C + m] * inv_count : A(0);
    }
    __syncthreads();

    // gz_b = dL/dz_b on the tile plus an R halo (zero outside the image)
    const int region = rg * cg * cb;
    for (int i = tid; i < region; i += g.threads) {
        const int cl = i % cb;
        const int pix = i / cb;
        const int er = pix / cg, ec = pix - (pix / cg) * cg;
        const int64_t h = h0 - R + er, w = w0 - R + ec, c = c0 + cl;
        const bool inside = c < p.C && h >= 0 && h < p.H && w >= 0 && w < p.W;
#pragma unroll
        for (int b = 0; b < KS::NB; ++b) {
            A val = A(0);
            if (b < p.nb && inside) {
                const A z = stencil_one<KS, A>(xs, ws, cx, cb, er, ec, cl, b);
                const A* q = pc + b * 7 * cb + cl;
                const A zhat = (z - q[2 * cb]) * q[3 * cb];
                const A a = zhat * q[0] + q[cb];
                const int64_t oc = p.map[p.concat ? b : 0](c);
                const A gy = to_acc(p.gy[offset4(p.ys, n, oc, h, w)]);
                const A ga = activate_backward<A>(gy, a, p.act);
                val = p.training ? q[4 * cb] * (ga - q[5 * cb] - zhat * q[6 * cb]) : q[4 * cb] * ga;
            }
            gz[((b * rg + er) * cg + ec) * cb + cl] = val;
        }
    }
    __syncthreads();

    // grad_x (register-blocked): dx = sum_b sum_taps w_b[u][v] * gz_b[row + 2R - u][col + 2R - v]
    const int cl = tid % cb;
    const int sg = tid / cb;
    const int row = sg / g.gw;
    const int col0 = (sg % g.gw) * kV;
    A dx[kV];
#pragma unroll
    for (int v = 0; v < kV; ++v) dx[v] = A(0);
#pragma unroll
    for (int b = 0; b < KS::NB; ++b) {
        if (b >= p.nb) continue;
        const int o = KS::off(b), k = KS::k(b);
#pragma unroll
        for (int u = 0; u < KMAX; ++u) {
            if (u < o || u >= o + k) continue;
            A rb[kV + KMAX - 1];
            const A* src = gz + ((b * rg + row + 2 * R - u) * cg + col0) * cb + cl;
#pragma unroll
            for (int j = 0; j < kV + KMAX - 1; ++j) rb[j] = src[j * cb];
#pragma unroll
            for (int vv = 0; vv < KMAX; ++vv) {
                if (vv < o || vv >= o + k) continue;
                const A wt = ws[((b * KMAX + u) * KMAX + vv) * cb + cl];
#pragma unroll
                for (int v = 0; v < kV; ++v) dx[v] += wt * rb[v + 2 * R - vv];
            }
        }
    }

    // weight-gradient partials: task = (real tap, channel lane), summed over the tile's positions in `parts`
    // fixed interleaved parts, then the parts in order
    const int tasks = p.taps_total * cb;
    const int parts = p.parts;
    const int npos = th * tw;
    const int64_t slot = (n * g.tiles_h + ty) * g.tiles_w + tx;
    const int64_t mw = int64_t(p.taps_total) * p.C;
    for (int it = tid; it < tasks * parts; it += g.threads) {
        const int task = it % tasks;
        const int part = it / tasks;
        const int tcl = task % cb;
        const int tap = task / cb;
        int b = 0;
        while (b + 1 < p.nb && tap >= p.tap_base[b + 1]) ++b;
        const int k = p.ksize[b];
        const int t = tap - p.tap_base[b];
        const int u = t / k, v = t % k;
        const int up = u + (KMAX - k) / 2, vp = v + (KMAX - k) / 2;  // padded window coordinates
        A s = A(0);
        for (int q = part; q < npos; q += parts) {
            const int r = q / tw, cc = q - (q / tw) * tw;
            s += gz[((b * rg + r + R) * cg + cc + R) * cb + tcl] * xs[((r + R + up) * cx + cc + R + vp) * cb + tcl];
        }
        if (parts == 1) {
            const int64_t c = c0 + tcl;
            if (c < p.C) p.partial[slot * mw + int64_t(p.tap_base[b]) * p.C + c * k * k + t] = s;
        } else {
            red[it] = s;
        }
    }
    __syncthreads();
    if (parts > 1) {
        for (int task = tid; task < tasks; task += g.threads) {
            const int tcl = task % cb;
            const int tap = task / cb;
            int b = 0;
            while (b + 1 < p.nb && tap >= p.tap_base[b + 1]) ++b;
            const int k = p.ksize[b];
            const int t = tap - p.tap_base[b];
            A s = A(0);
            for (int part = 0; part < parts; ++part) s += red[part * tasks + task];
            const int64_t c = c0 + tcl;
            if (c < p.C) p.partial[slot * mw + int64_t(p.tap_base[b]) * p.C + c * k * k + t] = s;
        }
    }
    // stage grad_x in the (no longer needed) x tile and store it
    A* stage = xs;
#pragma unroll
    for (int v = 0; v < kV; ++v) stage[(row * tw + col0 + v) * cb + cl] = dx[v];
    __syncthreads();
    const ChannelMap identity = make_channel_map(0, 0, p.C);
    store_tile<T, A>(p.gx, p.xs, n, c0, cb, p.C, identity, p.H, p.W, h0, w0, th, tw, p.vec_x, stage, tid, g.threads);
}

// ------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------
enum KSetId { KSET_135 = 0, KSET_PAD3 = 3, KSET_PAD5 = 5, KSET_PAD7 = 7 };

struct Plan {
    int kset;
    TileGeom fwd, bwd_a, bwd_b;
    int taps_total;
    int tap_base[5];
    int parts;
    bool channels_last;
    // forward scratch
    size_t f_coef, f_partial, f_bytes;
    // backward scratch
    size_t b_coef, b_partial_a, b_res_a, b_partial_b, b_res_b, b_bytes;
};

inline const char* check_args(const EmcadMsdcArgs& a) {
    if (a.nb < 1 || a.nb > 4) return "multi_scale_dwconv: the cuda backend supports 1 to 4 branches";
    for (int b = 0; b < a.nb; ++b)
        if (a.ksize[b] < 1 || a.ksize[b] > 7 || a.ksize[b] % 2 == 0)
            return "multi_scale_dwconv: the cuda backend supports odd kernel sizes up to 7";
    if (a.dtype < 0 || a.dtype >= EMCAD_DTYPE_COUNT) return "multi_scale_dwconv: unsupported dtype";
    if (a.act < 0 || a.act >= EMCAD_ACT_COUNT) return "multi_scale_dwconv: unsupported activation";
    if (a.n <= 0 || a.c <= 0 || a.h <= 0 || a.w <= 0) return "multi_scale_dwconv: empty input";
    if (a.n > 65535) return "multi_scale_dwconv: batch larger than 65535";
    const int64_t cout = a.concat ? a.nb * a.c : a.c;
    if (a.shuffle_groups < 0 || (a.shuffle_groups > 0 && cout % a.shuffle_groups != 0))
        return "multi_scale_dwconv: shuffle_groups must divide the output channels";
    return nullptr;
}

inline int select_kset(const EmcadMsdcArgs& a) {
    if (a.nb == 3 && a.ksize[0] == 1 && a.ksize[1] == 3 && a.ksize[2] == 5) return KSET_135;
    int kmax = 1;
    for (int b = 0; b < a.nb; ++b) kmax = imax(kmax, a.ksize[b]);
    return kmax <= 3 ? KSET_PAD3 : kmax == 5 ? KSET_PAD5 : KSET_PAD7;
}

template <class KS>
inline bool plan_geometry(const EmcadMsdcArgs& a, size_t acc_bytes, Plan* plan) {
    const bool cl = plan->channels_last;
    const int nb_out = a.concat ? a.nb : 1;
    const bool ok_f = choose_geometry(
        a.h, a.w, a.c, cl, 16,
        [&](int th, int tw, int cb, int threads) {
            return acc_bytes * fwd_smem_elems<KS>(th, tw, cb, threads, nb_out);
        },
        &plan->fwd);
    const bool ok_a = choose_geometry(
        a.h, a.w, a.c, cl, 16,
        [&](int th, int tw, int cb, int threads) { return acc_bytes * bwd_a_smem_elems<KS>(th, tw, cb, threads); },
        &plan->bwd_a);
    const bool ok_b = choose_geometry(
        a.h, a.w, a.c, cl, 16,
        [&](int th, int tw, int cb, int threads) { return acc_bytes * bwd_b_smem_elems<KS>(th, tw, cb, threads); },
        &plan->bwd_b);
    return ok_f && ok_a && ok_b;
}

inline size_t acc_size(int dtype) { return dtype == EMCAD_DTYPE_F64 ? 8 : 4; }

inline bool make_plan(const EmcadMsdcArgs& a, Plan* plan) {
    if (check_args(a) != nullptr) return false;
    plan->kset = select_kset(a);
    plan->channels_last = a.x_stride[1] == 1 && a.c > 1;
    const size_t ab = acc_size(a.dtype);
    bool ok = false;
    switch (plan->kset) {
        case KSET_135: ok = plan_geometry<KS135>(a, ab, plan); break;
        case KSET_PAD3: ok = plan_geometry<KSPad<3>>(a, ab, plan); break;
        case KSET_PAD5: ok = plan_geometry<KSPad<5>>(a, ab, plan); break;
        default: ok = plan_geometry<KSPad<7>>(a, ab, plan); break;
    }
    if (!ok || !grid_ok(plan->fwd, a.n) || !grid_ok(plan->bwd_a, a.n) || !grid_ok(plan->bwd_b, a.n)) return false;
    plan->taps_total = 0;
    for (int b = 0; b < a.nb; ++b) {
        plan->tap_base[b] = plan->taps_total;
        plan->taps_total += a.ksize[b] * a.ksize[b];
    }
    for (int b = a.nb; b < 5; ++b) plan->tap_base[b] = plan->taps_total;
    plan->parts = choose_parts(plan->taps_total * plan->bwd_b.cb, plan->bwd_b.threads);
    const int64_t mc = int64_t(a.nb) * a.c;
    ScratchLayout f;
    plan->f_coef = f.add(size_t(mc) * COEF_N * ab);
    plan->f_partial = a.training ? f.add(size_t(plan->fwd.slots(a.n)) * mc * 3 * ab) : 0;
    plan->f_bytes = f.bytes;
    ScratchLayout b;
    plan->b_coef = b.add(size_t(mc) * COEF_N * ab);
    plan->b_partial_a = b.add(size_t(plan->bwd_a.slots(a.n)) * 2 * mc * ab);
    plan->b_res_a = b.add(size_t(2 * mc) * ab);
    plan->b_partial_b = b.add(size_t(plan->bwd_b.slots(a.n)) * plan->taps_total * a.c * ab);
    plan->b_res_b = b.add(size_t(plan->taps_total) * a.c * ab);
    plan->b_bytes = b.bytes;
    return true;
}

template <class T>
inline Params<T> make_params(const EmcadMsdcArgs& a, const Plan& plan) {
    using A = acc_t<T>;
    Params<T> p;
    p.x = static_cast<const T*>(a.x);
    for (int b = 0; b < 4; ++b) p.w[b] = b < a.nb ? static_cast<const T*>(a.weight[b]) : nullptr;
    p.gy = static_cast<const T*>(a.grad_y);
    p.y = static_cast<T*>(a.y);
    p.gx = static_cast<T*>(a.grad_x);
    p.gamma = static_cast<const A*>(a.bn_weight);
    p.beta = static_cast<const A*>(a.bn_bias);
    p.coef = nullptr;
    p.sums = nullptr;
    p.partial = nullptr;
    p.xs = make_strides(a.x_stride);
    p.ys = make_strides(a.y_stride);
    p.N = a.n;
    p.C = a.c;
    p.H = a.h;
    p.W = a.w;
    p.count = A(double(a.n) * double(a.h) * double(a.w));
    p.nb = a.nb;
    p.act = a.act;
    p.concat = a.concat;
    p.training = a.training;
    const int64_t cout = a.concat ? a.nb * a.c : a.c;
    for (int b = 0; b < 4; ++b) {
        p.ksize[b] = b < a.nb ? a.ksize[b] : 1;
        p.map[b] = make_channel_map(a.concat ? b * a.c : 0, a.shuffle_groups, cout);
    }
    p.taps_total = plan.taps_total;
    for (int b = 0; b < 5; ++b) p.tap_base[b] = plan.tap_base[b];
    p.parts = plan.parts;
    p.vec_x = false;
    p.vec_y = false;
    return p;
}

template <class T>
inline void set_vectors(Params<T>& p, const TileGeom& g, const void* x_ptr, const void* y_ptr, int64_t y_channels,
                        bool identity_map) {
    constexpr int V = Vec<T>::size;
    p.vec_x = vector_ok<T>(x_ptr, p.xs, p.C) && g.cb % V == 0;
    // (C % V == 0 keeps every vector inside one branch's channel range with concat)
    p.vec_y = identity_map && p.C % V == 0 && vector_ok<T>(y_ptr, p.ys, y_channels) && g.cb % V == 0;
}

inline dim3 grid_of(const TileGeom& g, int64_t n) {
    return dim3(unsigned(g.tiles_h * g.tiles_w), unsigned(g.chunks), unsigned(n));
}

template <class T, class KS>
cudaError_t forward_ks(const EmcadMsdcArgs& a, const Plan& plan, cudaStream_t stream) {
    using A = acc_t<T>;
    Params<T> p = make_params<T>(a, plan);
    const TileGeom& g = plan.fwd;
    p.geo = g;
    const int64_t cout = a.concat ? a.nb * a.c : a.c;
    set_vectors(p, g, a.x, a.y, cout, a.shuffle_groups == 0);
    A* coef = scratch_at<A>(a.scratch, plan.f_coef);
    BnGroups<A> groups;
    groups.count = 1;
    groups.g[0].gamma = static_cast<const A*>(a.bn_weight);
    groups.g[0].beta = static_cast<const A*>(a.bn_bias);
    groups.g[0].mean = static_cast<const A*>(a.mean);
    groups.g[0].var = static_cast<const A*>(a.var);
    groups.g[0].out_mean = static_cast<A*>(a.save_mean);
    groups.g[0].out_var = static_cast<A*>(a.save_var);
    groups.g[0].size = int64_t(a.nb) * a.c;
    if (a.training) {
        p.partial = scratch_at<A>(a.scratch, plan.f_partial);
        EMCAD_RETURN_IF_ERROR(launch_kernel(&fwd_kernel<T, KS, MODE_STATS>, grid_of(g, a.n), dim3(g.threads), g.smem,
                                            stream, p));
        EMCAD_RETURN_IF_ERROR(launch_welford_reduce<A>(p.partial, g.slots(a.n), groups, a.eps, coef, stream));
    } else {
        EMCAD_RETURN_IF_ERROR(launch_bn_fold<A>(groups, a.eps, coef, stream));
    }
    p.coef = coef;
    return launch_kernel(&fwd_kernel<T, KS, MODE_APPLY>, grid_of(g, a.n), dim3(g.threads), g.smem, stream, p);
}

template <class T, class KS>
cudaError_t backward_ks(const EmcadMsdcArgs& a, const Plan& plan, cudaStream_t stream) {
    using A = acc_t<T>;
    Params<T> p = make_params<T>(a, plan);
    const int64_t cout = a.concat ? a.nb * a.c : a.c;
    A* coef = scratch_at<A>(a.scratch, plan.b_coef);
    BnGroups<A> groups;
    groups.count = 1;
    groups.g[0].gamma = static_cast<const A*>(a.bn_weight);
    groups.g[0].beta = static_cast<const A*>(a.bn_bias);
    groups.g[0].mean = static_cast<const A*>(a.mean);
    groups.g[0].var = static_cast<const A*>(a.var);
    groups.g[0].out_mean = nullptr;
    groups.g[0].out_var = nullptr;
    groups.g[0].size = int64_t(a.nb) * a.c;
    EMCAD_RETURN_IF_ERROR(launch_bn_fold<A>(groups, a.eps, coef, stream));
    p.coef = coef;

    // pass A
    const TileGeom& ga = plan.bwd_a;
    p.geo = ga;
    set_vectors(p, ga, a.x, a.grad_x, a.c, true);
    p.partial = scratch_at<A>(a.scratch, plan.b_partial_a);
    EMCAD_RETURN_IF_ERROR(
        launch_kernel(&bwd_reduce_kernel<T, KS>, grid_of(ga, a.n), dim3(ga.threads), ga.smem, stream, p));
    const int64_t mc = int64_t(a.nb) * a.c;
    A* res_a = scratch_at<A>(a.scratch, plan.b_res_a);
    SumSegments seg_a;
    seg_a.count = 0;
    const int acc_dt = acc_dtype_of(a.dtype);
    seg_a.add(0, mc, a.grad_bn_bias, acc_dt);
    seg_a.add(mc, mc, a.grad_bn_weight, acc_dt);
    EMCAD_RETURN_IF_ERROR(launch_sum_reduce<A>(p.partial, ga.slots(a.n), 2 * mc, res_a, seg_a, stream));

    // pass B
    const TileGeom& gb = plan.bwd_b;
    p.geo = gb;
    set_vectors(p, gb, a.x, a.grad_x, a.c, true);
    p.vec_y = false;
    // grad_x is stored with x's strides: its vector flag is vec_x (checked on both pointers)
    p.vec_x = p.vec_x && vector_ok<T>(a.grad_x, p.xs, a.c);
    p.sums = res_a;
    p.partial = scratch_at<A>(a.scratch, plan.b_partial_b);
    EMCAD_RETURN_IF_ERROR(
        launch_kernel(&bwd_grad_kernel<T, KS>, grid_of(gb, a.n), dim3(gb.threads), gb.smem, stream, p));
    SumSegments seg_b;
    seg_b.count = 0;
    for (int b = 0; b < a.nb; ++b)
        seg_b.add(int64_t(plan.tap_base[b]) * a.c, int64_t(a.ksize[b]) * a.ksize[b] * a.c, a.grad_weight[b], a.dtype);
    (void)cout;
    return launch_sum_reduce<A>(p.partial, gb.slots(a.n), int64_t(plan.taps_total) * a.c,
                                scratch_at<A>(a.scratch, plan.b_res_b), seg_b, stream);
}

template <class T>
cudaError_t forward(const EmcadMsdcArgs& a, cudaStream_t stream) {
    Plan plan;
    if (!make_plan(a, &plan)) return cudaErrorInvalidValue;
    if (a.scratch_bytes < plan.f_bytes || (plan.f_bytes > 0 && a.scratch == nullptr)) return cudaErrorInvalidValue;
    switch (plan.kset) {
        case KSET_135: return forward_ks<T, KS135>(a, plan, stream);
        case KSET_PAD3: return forward_ks<T, KSPad<3>>(a, plan, stream);
        case KSET_PAD5: return forward_ks<T, KSPad<5>>(a, plan, stream);
        default: return forward_ks<T, KSPad<7>>(a, plan, stream);
    }
}

template <class T>
cudaError_t backward(const EmcadMsdcArgs& a, cudaStream_t stream) {
    Plan plan;
    if (!make_plan(a, &plan)) return cudaErrorInvalidValue;
    if (a.scratch_bytes < plan.b_bytes || a.scratch == nullptr) return cudaErrorInvalidValue;
    switch (plan.kset) {
        case KSET_135: return backward_ks<T, KS135>(a, plan, stream);
        case KSET_PAD3: return backward_ks<T, KSPad<3>>(a, plan, stream);
        case KSET_PAD5: return backward_ks<T, KSPad<5>>(a, plan, stream);
        default: return backward_ks<T, KSPad<7>>(a, plan, stream);
    }
}

// defined (explicitly instantiated) in msdc_<dtype>.cu
extern template cudaError_t forward<float>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t forward<double>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t forward<__half>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t forward<__nv_bfloat16>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t backward<float>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t backward<double>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t backward<__half>(const EmcadMsdcArgs&, cudaStream_t);
extern template cudaError_t backward<__nv_bfloat16>(const EmcadMsdcArgs&, cudaStream_t);

}  // namespace msdc
}  // namespace cuda
}  // namespace emcad
