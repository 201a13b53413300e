// upsample_dwconv (EUCB front): nearest x2 upsample + depthwise 3x3 + BatchNorm + activation as four 2x2 polyphase
// stencils on the low-resolution input (EMCAD.md 11.3). The upsampled tensor is never built: each thread reads a
// low-resolution halo tile from shared memory and writes the 2x2 output phases of kV adjacent input pixels.
//
// Forward, eval:      bn_fold -> apply
// Forward, training:  stats -> welford_reduce -> apply
// Backward:           bn_fold -> pass A (sums of g_a, g_a*zhat) -> sum_reduce -> pass B (grad_x via the transposed
//                     polyphase stencils, weight-gradient partials) -> sum_reduce
#pragma once

#include "common.cuh"
#include "reduce.cuh"
#include "tile.cuh"

namespace emcad {
namespace cuda {
namespace updw {

enum { MODE_STATS = 0, MODE_APPLY = 1 };

template <class T>
struct Params {
    using A = acc_t<T>;
    const T* x;
    const T* w;
    const T* gy;
    T* y;
    T* gx;
    const A* gamma;
    const A* beta;
    const A* coef;  // [C][COEF_N]
    const A* sums;  // [2][C]
    A* partial;
    Strides xs, ys;
    int64_t N, C, H, W;  // low resolution
    A count;             // N * 2H * 2W
    int act, training;
    TileGeom geo;
    bool vec_x, vec_y;
    int parts;
};

inline size_t fwd_smem_elems(int th, int tw, int cb, int threads) {
    const size_t xs = size_t(th + 2) * (tw + 2) * cb;
    const size_t red = size_t(threads) * 3, ys = size_t(4) * th * tw * cb;
    return xs + 16 * size_t(cb) + 2 * size_t(cb) + (red > ys ? red : ys);
}
inline size_t bwd_a_smem_elems(int th, int tw, int cb, int threads) {
    return size_t(th + 2) * (tw + 2) * cb + 16 * size_t(cb) + 4 * size_t(cb) + size_t(threads) * 2;
}
inline size_t bwd_b_smem_elems(int th, int tw, int cb, int threads) {
    return size_t(th + 2) * (tw + 2) * cb + size_t(2 * th + 2) * (2 * tw + 2) * cb + 16 * size_t(cb) +
           7 * size_t(cb) + size_t(threads);
}

// kp[idx * cb + cl] = polyphase weight idx = ((p*2+q)*2+r)*2+s of channel c0 + cl
template <class T>
EMCAD_CU_D void load_polyphase(const Params<T>& p, int64_t c0, int cb, acc_t<T>* kp, int tid, int nthreads) {
    using A = acc_t<T>;
    for (int cl = tid; cl < cb; cl += nthreads) {
        const int64_t c = c0 + cl;
        A w[9];
        for (int i = 0; i < 9; ++i) w[i] = c < p.C ? to_acc(p.w[c * 9 + i]) : A(0);
        A k[16];
        polyphase_weights<A>(w, k);
        for (int i = 0; i < 16; ++i) kp[i * cb + cl] = k[i];
    }
}

// acc[p*2+q][v] = output phase (p, q) of low-res tile position (row, col0 + v); xs has origin (-1, -1)
template <class A>
EMCAD_CU_D void stencil(const A* __restrict__ xs, const A* __restrict__ kp, int cols, int cb, int row, int col0, int cl,
                     A (&acc)[4][kV]) {
#pragma unroll
    for (int ph = 0; ph < 4; ++ph)
#pragma unroll
        for (int v = 0; v < kV; ++v) acc[ph][v] = A(0);
#pragma unroll
    for (int xr = 0; xr < 3; ++xr) {
        A rb[kV + 2];
        const A* src = xs + ((row + xr) * cols + col0) * cb + cl;
#pragma unroll
        for (int j = 0; j < kV + 2; ++j) rb[j] = src[j * cb];
#pragma unroll
        for (int ph_p = 0; ph_p < 2; ++ph_p) {
            const int r = xr - ph_p;
            if (r < 0 || r > 1) continue;
#pragma unroll
            for (int q = 0; q < 2; ++q)
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const A wt = kp[(((ph_p * 2 + q) * 2 + r) * 2 + s) * cb + cl];
#pragma unroll
                    for (int v = 0; v < kV; ++v) acc[ph_p * 2 + q][v] += wt * rb[v + q + s];
                }
        }
    }
}

template <class T, int MODE>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const int tid = threadIdx.x;
    const int cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2, cols = tw + 2;
    A* xs = smem;
    A* kp = xs + rows * cols * cb;
    A* cf = kp + 16 * cb;
    A* un = cf + 2 * cb;
    const int64_t tile = blockIdx.x;
    const int64_t ty = tile / g.tiles_w, tx = tile - ty * g.tiles_w;
    const int64_t n = blockIdx.z;
    const int64_t c0 = int64_t(blockIdx.y) * cb;
    const int64_t h0 = ty * th, w0 = tx * tw;

    load_tile<T, A>(p.x, p.xs, n, c0, cb, p.C, p.H, p.W, h0 - 1, w0 - 1, rows, cols, p.vec_x, xs, tid, g.threads);
    load_polyphase<T>(p, c0, cb, kp, tid, g.threads);
    if (MODE == MODE_APPLY) {
        for (int cl = tid; cl < cb; cl += g.threads) {
            const int64_t c = c0 + cl;
            cf[cl] = c < p.C ? p.coef[c * COEF_N + COEF_SCALE] : A(0);
            cf[cb + cl] = c < p.C ? p.coef[c * COEF_N + COEF_SHIFT] : A(0);
        }
    }
    __syncthreads();

    const int cl = tid % cb;
    const int sg = tid / cb;
    const int row = sg / g.gw;
    const int col0 = (sg % g.gw) * kV;
    A acc[4][kV];
    stencil<A>(xs, kp, cols, cb, row, col0, cl, acc);
    const int64_t c = c0 + cl;
    const int64_t h = h0 + row;

    if (MODE == MODE_STATS) {
        int valid = 0;
        if (c < p.C && h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (w0 + col0), 0), kV));
        A vals[4 * kV];
#pragma unroll
        for (int v = 0; v < kV; ++v)
#pragma unroll
            for (int ph = 0; ph < 4; ++ph) vals[v * 4 + ph] = acc[ph][v];
        const Welford<A> wf = local_welford<A, 4 * kV>(vals, 4 * valid);
        A* red = un;
        A* mine = red + tid * 3;  // tid = sg * cb + cl
        mine[0] = wf.n;
        mine[1] = wf.mean;
        mine[2] = wf.m2;
        tree_welford_groups<A>(red, g.gh * g.gw, cb, sg, cl);
        if (sg == 0 && c < p.C) {
            const int64_t slot = (n * g.tiles_h + ty) * g.tiles_w + tx;
            A* dst = p.partial + (slot * p.C + c) * 3;
            dst[0] = red[cl * 3 + 0];
            dst[1] = red[cl * 3 + 1];
            dst[2] = red[cl * 3 + 2];
        }
    } else {
        A* ys = un;  // [2 th][2 tw][cb]
        const A scale = cf[cl], shift = cf[cb + cl];
#pragma unroll
        for (int v = 0; v < kV; ++v)
#pragma unroll
            for (int ph = 0; ph < 4; ++ph) {
                const int pp = ph >> 1, qq = ph & 1;
                ys[((2 * row + pp) * (2 * tw) + 2 * (col0 + v) + qq) * cb + cl] =
                    activate<A>(acc[ph][v] * scale + shift, p.act);
            }
        __syncthreads();
        const ChannelMap identity = make_channel_map(0, 0, p.C);
        store_tile<T, A>(p.y, p.ys, n, c0, cb, p.C, identity, 2 * p.H, 2 * p.W, 2 * h0, 2 * w0, 2 * th, 2 * tw,
                         p.vec_y, ys, tid, g.threads);
    }
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads) bwd_reduce_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const int tid = threadIdx.x;
    const int cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2, cols = tw + 2;
    A* xs = smem;
    A* kp = xs + rows * cols * cb;
    A* pc = kp + 16 * cb;  // [4][cb]: gamma, beta, mean, rstd
    A* red = pc + 4 * cb;  // [threads][2]
    const int64_t tile = blockIdx.x;
    const int64_t ty = tile / g.tiles_w, tx = tile - ty * g.tiles_w;
    const int64_t n = blockIdx.z;
    const int64_t c0 = int64_t(blockIdx.y) * cb;
    const int64_t h0 = ty * th, w0 = tx * tw;

    load_tile<T, A>(p.x, p.xs, n, c0, cb, p.C, p.H, p.W, h0 - 1, w0 - 1, rows, cols, p.vec_x, xs, tid, g.threads);
    load_polyphase<T>(p, c0, cb, kp, tid, g.threads);
    for (int cl = tid; cl < cb; cl += g.threads) {
        const int64_t c = c0 + cl;
        const bool ok = c < p.C;
        pc[0 * cb + cl] = ok ? p.gamma[c] : A(0);
        pc[1 * cb + cl] = ok ? p.beta[c] : A(0);
        pc[2 * cb + cl] = ok ? p.coef[c * COEF_N + COEF_MEAN] : A(0);
        pc[3 * cb + cl] = ok ? p.coef[c * COEF_N + COEF_RSTD] : A(0);
    }
    __syncthreads();

    const int cl = tid % cb;
    const int sg = tid / cb;
    const int row = sg / g.gw;
    const int col0 = (sg % g.gw) * kV;
    A acc[4][kV];
    stencil<A>(xs, kp, cols, cb, row, col0, cl, acc);
    const int64_t c = c0 + cl;
    const int64_t h = h0 + row;
    int valid = 0;
    if (c < p.C && h < p.H) valid = int(m_min<int64_t>(m_max<int64_t>(p.W - (w0 + col0), 0), kV));
    const A gamma = pc[cl], beta = pc[cb + cl], mean = pc[2 * cb + cl], rstd = pc[3 * cb + cl];
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int v = 0; v < kV; ++v) {
        if (v >= valid) continue;
#pragma unroll
        for (int ph = 0; ph < 4; ++ph) {
            const A zhat = (acc[ph][v] - mean) * rstd;
            const A a = zhat * gamma + beta;
            const A gy = to_acc(p.gy[offset4(p.ys, n, c, 2 * h + (ph >> 1), 2 * (w0 + col0 + v) + (ph & 1))]);
            const A ga = activate_backward<A>(gy, a, p.act);
            s1 += ga;
            s2 += ga * zhat;
        }
    }
    red[tid * 2 + 0] = s1;
    red[tid * 2 + 1] = s2;
    tree_sum_groups<A, 2>(red, g.gh * g.gw, cb, sg, cl);
    if (sg == 0 && c < p.C) {
        const int64_t slot = (n * g.tiles_h + ty) * g.tiles_w + tx;
        p.partial[slot * 2 * p.C + c] = red[cl * 2 + 0];
        p.partial[slot * 2 * p.C + p.C + c] = red[cl * 2 + 1];
    }
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads) bwd_grad_kernel(Params<T> p) {
    using A = acc_t<T>;
    EMCAD_DYNAMIC_SMEM(A, smem);
    const TileGeom& g = p.geo;
    const int tid = threadIdx.x;
    const int cb = g.cb, th = g.th, tw = g.tw;
    const int rows = th + 2, cols = tw + 2;            // low-res x tile, origin (h0 - 1, w0 - 1)
    const int rg = 2 * th + 2, cg = 2 * tw + 2;        // high-res gz tile, origin (2 h0 - 1, 2 w0 - 1)
    A* xs = smem;
    A* gz = xs + rows * cols * cb;
    A* kp = gz + rg * cg * cb;
    A* pc = kp + 16 * cb;  // [7][cb]: gamma, beta, mean, rstd, scale, s1/M, s2/M
    A* red = pc + 7 * cb;  // [threads]
    const int64_t tile = blockIdx.x;
    const int64_t ty = tile / g.tiles_w, tx = tile - ty * g.tiles_w;
    const int64_t n = blockIdx.z;
    const int64_t c0 = int64_t(blockIdx.y) * cb;
    const int64_t h0 = ty * th, w0 = tx * tw;

    load_tile<T, A>(p.x, p.xs, n, c0, cb, p.C, p.H, p.W, h0 - 1, w0 - 1, rows, cols, p.vec_x, xs, tid, g.threads);
    load_polyphase<T>(p, c0, cb, kp, tid, g.threads);
    const A inv_count = A(1) / p.count;
    for (int cl = tid; cl < cb; cl += g.threads) {
        const int64_t c = c0 + cl;
        const bool ok = c < p.C;
        const A gamma = ok ? p.gamma[c] : A(0);
        const A rstd = ok ? p.coef[c * COEF_N + COEF_RSTD] : A(0);
        pc[0 * cb + cl] = gamma;
        pc[1 * cb + cl] = ok ? p.beta[c] : A(0);
        pc[2 * cb + cl] = ok ? p.coef[c * COEF_N + COEF_MEAN] : A(0);
        pc[3 * cb + cl] = rstd;
        pc[4 * cb + cl] = gamma * rstd;
        pc[5 * cb + cl] = ok ? p.sums[c] * inv_count : A(0);
        pc[6 * cb + cl] = ok ? p.sums[p.C + c] * inv_count : A(0);
    }
    __syncthreads();

    // gz = dL/dz on the high-resolution tile plus a 1-pixel halo
    const int64_t H2 = 2 * p.H, W2 = 2 * p.W;
    const int region = rg * cg * cb;
    for (int i = tid; i < region; i += g.threads) {
        const int cl = i % cb;
        const int pix = i / cb;
        const int er = pix / cg, ec = pix - (pix / cg) * cg;
        const int64_t Y = 2 * h0 - 1 + er, X = 2 * w0 - 1 + ec, c = c0 + cl;
        A val = A(0);
        if (c < p.C && Y >= 0 && Y < H2 && X >= 0 && X < W2) {
            const int yr = er - 1, xr = ec - 1;
            const int i_rel = (yr + 2) / 2 - 1, j_rel = (xr + 2) / 2 - 1;  // floor(yr / 2) for yr >= -1
            const int pp = yr - 2 * i_rel, qq = xr - 2 * j_rel;
            A z = A(0);
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int s = 0; s < 2; ++s)
                    z += kp[(((pp * 2 + qq) * 2 + r) * 2 + s) * cb + cl] *
                         xs[((i_rel + pp + r) * cols + j_rel + qq + s) * cb + cl];
            const A zhat = (z - pc[2 * cb + cl]) * pc[3 * cb + cl];
            const A a = zhat * pc[cl] + pc[cb + cl];
            const A gy = to_acc(p.gy[offset4(p.ys, n, c, Y, X)]);
            const A ga = activate_backward<A>(gy, a, p.act);
            const A scale = pc[4 * cb + cl];
            val = p.training ? scale * (ga - pc[5 * cb + cl] - zhat * pc[6 * cb + cl]) : scale * ga;
        }
        gz[i] = val;
    }
    __syncthreads();

    // grad_x: dX[i][j] = sum_{p,q,r,s} K[p][q][r][s] * gz[2(i-p+1-r)+p][2(j-q+1-s)+q]
    const int cl = tid % cb;
    const int sg = tid / cb;
    const int row = sg / g.gw;
    const int col0 = (sg % g.gw) * kV;
    A dx[kV];
#pragma unroll
    for (int v = 0; v < kV; ++v) dx[v] = A(0);
#pragma unroll
    for (int pp = 0; pp < 2; ++pp)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int er = 2 * row + 3 - pp - 2 * r;
            A rb[2 * kV + 2];
            const A* src = gz + (er * cg + 2 * col0) * cb + cl;
#pragma unroll
            for (int j = 0; j < 2 * kV + 2; ++j) rb[j] = src[j * cb];
#pragma unroll
            for (int qq = 0; qq < 2; ++qq)
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const A wt = kp[(((pp * 2 + qq) * 2 + r) * 2 + s) * cb + cl];
#pragma unroll
                    for (int v = 0; v < kV; ++v) dx[v] += wt * rb[2 * v + 3 - qq - 2 * s];
                }
        }

    // weight-gradient partials: dw[a][b] = sum over owned outputs gz[Y][X] * U[Y + a - 1][X + b - 1]
    const int tasks = 9 * cb;
    const int parts = p.parts;
    const int npos = 4 * th * tw;
    const int64_t slot = (n * g.tiles_h + ty) * g.tiles_w + tx;
    for (int it = tid; it < tasks * parts; it += g.threads) {
        const int task = it % tasks;
        const int part = it / tasks;
        const int tcl = task % cb;
        const int tap = task / cb;
        const int ta = tap / 3, tb = tap % 3;
        A s = A(0);
        for (int q = part; q < npos; q += parts) {
            const int yy = q / (2 * tw), xx = q - (q / (2 * tw)) * (2 * tw);
            const int er = yy + 1, ec = xx + 1;
            s += gz[(er * cg + ec) * cb + tcl] * xs[(((er + ta) >> 1) * cols + ((ec + tb) >> 1)) * cb + tcl];
        }
        if (parts == 1) {
            const int64_t c = c0 + tcl;
            if (c < p.C) p.partial[slot * 9 * p.C + c * 9 + tap] = s;
        } else {
            red[it] = s;
        }
    }
    __syncthreads();
    if (parts > 1) {
        for (int task = tid; task < tasks; task += g.threads) {
            const int tcl = task % cb;
            const int tap = task / cb;
            A s = A(0);
            for (int part = 0; part < parts; ++part) s += red[part * tasks + task];
            const int64_t c = c0 + tcl;
            if (c < p.C) p.partial[slot * 9 * p.C + c * 9 + tap] = s;
        }
    }
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
struct Plan {
    TileGeom fwd, bwd_a, bwd_b;
    int parts;
    size_t f_coef, f_partial, f_bytes;
    size_t b_coef, b_partial_a, b_res_a, b_partial_b, b_res_b, b_bytes;
};

inline const char* check_args(const EmcadUpdwArgs& a) {
    if (a.mode != 0) return "upsample_dwconv: the cuda backend supports mode='nearest' only";
    if (a.scale != 2) return "upsample_dwconv: the cuda backend supports scale=2 only";
    if (a.ksize != 3) return "upsample_dwconv: the cuda backend supports kernel size 3 only";
    if (a.dtype < 0 || a.dtype >= EMCAD_DTYPE_COUNT) return "upsample_dwconv: unsupported dtype";
    if (a.act < 0 || a.act >= EMCAD_ACT_COUNT) return "upsample_dwconv: unsupported activation";
    if (a.n <= 0 || a.c <= 0 || a.h <= 0 || a.w <= 0) return "upsample_dwconv: empty input";
    if (a.n > 65535) return "upsample_dwconv: batch larger than 65535";
    return nullptr;
}

inline bool make_plan(const EmcadUpdwArgs& a, Plan* plan) {
    if (check_args(a) != nullptr) return false;
    const bool cl = a.x_stride[1] == 1 && a.c > 1;
    const size_t ab = a.dtype == EMCAD_DTYPE_F64 ? 8 : 4;
    bool ok = choose_geometry(
        a.h, a.w, a.c, cl, 16,
        [&](int th, int tw, int cb, int threads) { return ab * fwd_smem_elems(th, tw, cb, threads); }, &plan->fwd);
    ok = ok && choose_geometry(
                   a.h, a.w, a.c, cl, 16,
                   [&](int th, int tw, int cb, int threads) { return ab * bwd_a_smem_elems(th, tw, cb, threads); },
                   &plan->bwd_a);
    ok = ok && choose_geometry(
                   a.h, a.w, a.c, cl, 16,
                   [&](int th, int tw, int cb, int threads) { return ab * bwd_b_smem_elems(th, tw, cb, threads); },
                   &plan->bwd_b);
    if (!ok || !grid_ok(plan->fwd, a.n) || !grid_ok(plan->bwd_a, a.n) || !grid_ok(plan->bwd_b, a.n)) return false;
    plan->parts = choose_parts(9 * plan->bwd_b.cb, plan->bwd_b.threads);
    ScratchLayout f;
    plan->f_coef = f.add(size_t(a.c) * COEF_N * ab);
    plan->f_partial = a.training ? f.add(size_t(plan->fwd.slots(a.n)) * a.c * 3 * ab) : 0;
    plan->f_bytes = f.bytes;
    ScratchLayout b;
    plan->b_coef = b.add(size_t(a.c) * COEF_N * ab);
    plan->b_partial_a = b.add(size_t(plan->bwd_a.slots(a.n)) * 2 * a.c * ab);
    plan->b_res_a = b.add(size_t(2 * a.c) * ab);
    plan->b_partial_b = b.add(size_t(plan->bwd_b.slots(a.n)) * 9 * a.c * ab);
    plan->b_res_b = b.add(size_t(9 * a.c) * ab);
    plan->b_bytes = b.bytes;
    return true;
}

template <class T>
inline Params<T> make_params(const EmcadUpdwArgs& a, const Plan& plan) {
    using A = acc_t<T>;
    Params<T> p;
    p.x = static_cast<const T*>(a.x);
    p.w = static_cast<const T*>(a.weight);
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
    p.count = A(double(a.n) * 4.0 * double(a.h) * double(a.w));
    p.act = a.act;
    p.training = a.training;
    p.parts = plan.parts;
    p.vec_x = false;
    p.vec_y = false;
    return p;
}

inline dim3 grid_of(const TileGeom& g, int64_t n) {
    return dim3(unsigned(g.tiles_h * g.tiles_w), unsigned(g.chunks), unsigned(n));
}

template <class A>
inline BnGroups<A> bn_groups(const EmcadUpdwArgs& a, bool outputs) {
    BnGroups<A> groups;
    groups.count = 1;
    groups.g[0].gamma = static_cast<const A*>(a.bn_weight);
    groups.g[0].beta = static_cast<const A*>(a.bn_bias);
    groups.g[0].mean = static_cast<const A*>(a.mean);
    groups.g[0].var = static_cast<const A*>(a.var);
    groups.g[0].out_mean = outputs ? static_cast<A*>(a.save_mean) : nullptr;
    groups.g[0].out_var = outputs ? static_cast<A*>(a.save_var) : nullptr;
    groups.g[0].size = a.c;
    return groups;
}

template <class T>
cudaError_t forward(const EmcadUpdwArgs& a, cudaStream_t stream) {
    using A = acc_t<T>;
    constexpr int V = Vec<T>::size;
    Plan plan;
    if (!make_plan(a, &plan)) return cudaErrorInvalidValue;
    if (a.scratch_bytes < plan.f_bytes || a.scratch == nullptr) return cudaErrorInvalidValue;
    Params<T> p = make_params<T>(a, plan);
    const TileGeom& g = plan.fwd;
    p.geo = g;
    p.vec_x = vector_ok<T>(a.x, p.xs, a.c) && g.cb % V == 0;
    p.vec_y = vector_ok<T>(a.y, p.ys, a.c) && g.cb % V == 0;
    A* coef = scratch_at<A>(a.scratch, plan.f_coef);
    const BnGroups<A> groups = bn_groups<A>(a, true);
    if (a.training) {
        p.partial = scratch_at<A>(a.scratch, plan.f_partial);
        EMCAD_RETURN_IF_ERROR(
            launch_kernel(&fwd_kernel<T, MODE_STATS>, grid_of(g, a.n), dim3(g.threads), g.smem, stream, p));
        EMCAD_RETURN_IF_ERROR(launch_welford_reduce<A>(p.partial, g.slots(a.n), groups, a.eps, coef, stream));
    } else {
        EMCAD_RETURN_IF_ERROR(launch_bn_fold<A>(groups, a.eps, coef, stream));
    }
    p.coef = coef;
    return launch_kernel(&fwd_kernel<T, MODE_APPLY>, grid_of(g, a.n), dim3(g.threads), g.smem, stream, p);
}

template <class T>
cudaError_t backward(const EmcadUpdwArgs& a, cudaStream_t stream) {
    using A = acc_t<T>;
    constexpr int V = Vec<T>::size;
    Plan plan;
    if (!make_plan(a, &plan)) return cudaErrorInvalidValue;
    if (a.scratch_bytes < plan.b_bytes || a.scratch == nullptr) return cudaErrorInvalidValue;
    Params<T> p = make_params<T>(a, plan);
    A* coef = scratch_at<A>(a.scratch, plan.b_coef);
    EMCAD_RETURN_IF_ERROR(launch_bn_fold<A>(bn_groups<A>(a, false), a.eps, coef, stream));
    p.coef = coef;

    const TileGeom& ga = plan.bwd_a;
    p.geo = ga;
    p.vec_x = vector_ok<T>(a.x, p.xs, a.c) && ga.cb % V == 0;
    p.partial = scratch_at<A>(a.scratch, plan.b_partial_a);
    EMCAD_RETURN_IF_ERROR(
        launch_kernel(&bwd_reduce_kernel<T>, grid_of(ga, a.n), dim3(ga.threads), ga.smem, stream, p));
    A* res_a = scratch_at<A>(a.scratch, plan.b_res_a);
    SumSegments seg_a;
    seg_a.count = 0;
    const int acc_dt = acc_dtype_of(a.dtype);
    seg_a.add(0, a.c, a.grad_bn_bias, acc_dt);
    seg_a.add(a.c, a.c, a.grad_bn_weight, acc_dt);
    EMCAD_RETURN_IF_ERROR(launch_sum_reduce<A>(p.partial, ga.slots(a.n), 2 * a.c, res_a, seg_a, stream));

    const TileGeom& gb = plan.bwd_b;
    p.geo = gb;
    p.vec_x = vector_ok<T>(a.x, p.xs, a.c) && vector_ok<T>(a.grad_x, p.xs, a.c) && gb.cb % V == 0;
    p.sums = res_a;
    p.partial = scratch_at<A>(a.scratch, plan.b_partial_b);
    EMCAD_RETURN_IF_ERROR(launch_kernel(&bwd_grad_kernel<T>, grid_of(gb, a.n), dim3(gb.threads), gb.smem, stream, p));
    SumSegments seg_b;
    seg_b.count = 0;
    seg_b.add(0, 9 * a.c, a.grad_weight, a.dtype);
    return launch_sum_reduce<A>(p.partial, gb.slots(a.n), 9 * a.c, scratch_at<A>(a.scratch, plan.b_res_b), seg_b,
                                stream);
}

extern template cudaError_t forward<float>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t forward<double>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t forward<__half>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t forward<__nv_bfloat16>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t backward<float>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t backward<double>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t backward<__half>(const EmcadUpdwArgs&, cudaStream_t);
extern template cudaError_t backward<__nv_bfloat16>(const EmcadUpdwArgs&, cudaStream_t);

}  // namespace updw
}  // namespace cuda
}  // namespace emcad
