// Device helpers shared by the op kernels: shared-memory halo tiles (load with zero padding, store with a channel
// map), with a 128-bit vector path for channels-last tensors, and fixed-order block reductions.
//
// Shared-memory tiles are laid out [row][col][channel] in the accumulation type, whatever the global layout, so
// the compute code is layout-independent and threads with consecutive channel lanes read consecutive words.
#pragma once

#include "common.cuh"

#ifdef EMCAD_CUDA_EMULATE
#include <cstdio>
#include <cstdlib>
#define EMCAD_EMU_CHECK(cond, what)                                                     \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            std::fprintf(stderr, "emcad_emu: check failed: %s (%s:%d)\n", what, __FILE__, __LINE__); \
            std::abort();                                                               \
        }                                                                               \
    } while (0)
#else
#define EMCAD_EMU_CHECK(cond, what) \
    do {                            \
    } while (0)
#endif

#ifdef EMCAD_CUDA_EMULATE
#define EMCAD_EMU_COUNT_VECTOR_ACCESS() ++::emcad_emu::vector_accesses()
#else
#define EMCAD_EMU_COUNT_VECTOR_ACCESS() \
    do {                                \
    } while (0)
#endif

namespace emcad {
namespace cuda {

// Loads pixels [h_begin, h_begin + rows) x [w_begin, w_begin + cols) and channels [c_begin, c_begin + ncs) of image
// n into dst[(r * cols + col) * ncs + cl]; zero outside the image and for channels >= channels.
// vec: 128-bit loads (caller guarantees vector_ok<T>, c_begin % V == 0 and ncs % V == 0).
template <class T, class A>
EMCAD_CU_D void load_tile(const T* __restrict__ src, const Strides& s, int64_t n, int64_t c_begin, int ncs,
                       int64_t channels, int64_t H, int64_t W, int64_t h_begin, int64_t w_begin, int rows, int cols,
                       bool vec, A* __restrict__ dst, int tid, int nthreads) {
    if (vec) {
        constexpr int V = Vec<T>::size;
        const int nv = ncs / V;
        const int items = rows * cols * nv;
        for (int i = tid; i < items; i += nthreads) {
            const int vc = i % nv;
            const int pix = i / nv;
            const int r = pix / cols;
            const int col = pix - r * cols;
            const int64_t h = h_begin + r, w = w_begin + col, c = c_begin + int64_t(vc) * V;
            A* d = dst + pix * ncs + vc * V;
            if (h >= 0 && h < H && w >= 0 && w < W && c < channels) {
                const T* p = src + offset4(s, n, c, h, w);
                EMCAD_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "aligned 128-bit load");
                EMCAD_EMU_COUNT_VECTOR_ACCESS();
                const uint4 raw = *reinterpret_cast<const uint4*>(p);
                const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int k = 0; k < V; ++k) d[k] = to_acc(e[k]);
            } else {
#pragma unroll
                for (int k = 0; k < V; ++k) d[k] = A(0);
            }
        }
    } else if (s.c == 1) {
        // channels-last without vectors: channel-fastest for coalescing
        const int items = rows * cols * ncs;
        for (int i = tid; i < items; i += nthreads) {
            const int cl = i % ncs;
            const int pix = i / ncs;
            const int r = pix / cols;
            const int col = pix - r * cols;
            const int64_t h = h_begin + r, w = w_begin + col, c = c_begin + cl;
            dst[i] = (h >= 0 && h < H && w >= 0 && w < W && c < channels) ? to_acc(src[offset4(s, n, c, h, w)])
                                                                            : A(0);
        }
    } else {
        // planar (NCHW): column-fastest for coalescing
        const int items = rows * cols * ncs;
        for (int i = tid; i < items; i += nthreads) {
            const int col = i % cols;
            const int rest = i / cols;
            const int r = rest % rows;
            const int cl = rest / rows;
            const int64_t h = h_begin + r, w = w_begin + col, c = c_begin + cl;
            dst[(r * cols + col) * ncs + cl] =
                (h >= 0 && h < H && w >= 0 && w < W && c < channels) ? to_acc(src[offset4(s, n, c, h, w)]) : A(0);
        }
    }
}

// Stores src[(r * cols + col) * ncs + cl] to channel map(c_begin + cl) of pixel (h_begin + r, w_begin + col) of
// image n, for channels c_begin + cl < channels and pixels inside H x W.
// vec: 128-bit stores (caller guarantees vector_ok<T> for dst, an identity map with offset % V == 0,
// c_begin % V == 0 and ncs % V == 0).
template <class T, class A>
EMCAD_CU_D void store_tile(T* __restrict__ dst, const Strides& s, int64_t n, int64_t c_begin, int ncs, int64_t channels,
                        const ChannelMap& map, int64_t H, int64_t W, int64_t h_begin, int64_t w_begin, int rows,
                        int cols, bool vec, const A* __restrict__ src, int tid, int nthreads) {
    if (vec) {
        constexpr int V = Vec<T>::size;
        const int nv = ncs / V;
        const int items = rows * cols * nv;
        for (int i = tid; i < items; i += nthreads) {
            const int vc = i % nv;
            const int pix = i / nv;
            const int r = pix / cols;
            const int col = pix - r * cols;
            const int64_t h = h_begin + r, w = w_begin + col, c = c_begin + int64_t(vc) * V;
            if (h < 0 || h >= H || w < 0 || w >= W || c >= channels) continue;
            uint4 raw;
            T* e = reinterpret_cast<T*>(&raw);
            const A* sp = src + pix * ncs + vc * V;
#pragma unroll
            for (int k = 0; k < V; ++k) e[k] = from_acc<T>(sp[k]);
            T* p = dst + offset4(s, n, map(c), h, w);
            EMCAD_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "aligned 128-bit store");
            EMCAD_EMU_COUNT_VECTOR_ACCESS();
            *reinterpret_cast<uint4*>(p) = raw;
        }
    } else if (s.c == 1) {
        const int items = rows * cols * ncs;
        for (int i = tid; i < items; i += nthreads) {
            const int cl = i % ncs;
            const int pix = i / ncs;
            const int r = pix / cols;
            const int col = pix - r * cols;
            const int64_t h = h_begin + r, w = w_begin + col, c = c_begin + cl;
            if (h < 0 || h >= H || w < 0 || w >= W || c >= channels) continue;
            dst[offset4(s, n, map(c), h, w)] = from_acc<T>(src[i]);
        }
    } else {
        const int items = rows * cols * ncs;
        for (int i = tid; i < items; i += nthreads) {
            const int col = i % cols;
            const int rest = i / cols;
            const int r = rest % rows;
            const int cl = rest / rows;
            const int64_t h = h_begin + r, w = w_begin + col, c = c_begin + cl;
            if (h < 0 || h >= H || w < 0 || w >= W || c >= channels) continue;
            dst[offset4(s, n, map(c), h, w)] = from_acc<T>(src[(r * cols + col) * ncs + cl]);
        }
    }
}

// Fixed-order tree over `groups` (a power of two) per lane: red[((g * lanes) + lane) * K + k] += red[...g + s...],
// so that group 0 ends with the sum over all groups. Every thread of the block must call it; the caller has
// written its entries (the first barrier is inside). Ends with a barrier.
template <class A, int K>
EMCAD_CU_D void tree_sum_groups(A* red, int groups, int lanes, int my_group, int my_lane) {
    for (int s = groups / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (my_group < s) {
            A* a = red + (my_group * lanes + my_lane) * K;
            const A* b = red + ((my_group + s) * lanes + my_lane) * K;
#pragma unroll
            for (int k = 0; k < K; ++k) a[k] += b[k];
        }
    }
    __syncthreads();
}

// The same with Welford/Chan merging of (count, mean, m2) triples.
template <class A>
EMCAD_CU_D void tree_welford_groups(A* red, int groups, int lanes, int my_group, int my_lane) {
    for (int s = groups / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (my_group < s) {
            A* a = red + (my_group * lanes + my_lane) * 3;
            const A* b = red + ((my_group + s) * lanes + my_lane) * 3;
            Welford<A> wa = {a[0], a[1], a[2]};
            const Welford<A> wb = {b[0], b[1], b[2]};
            wa = welford_merge(wa, wb);
            a[0] = wa.n;
            a[1] = wa.mean;
            a[2] = wa.m2;
        }
    }
    __syncthreads();
}

// Welford statistics of the first `count` of `vals` (two passes over registers).
template <class A, int N>
EMCAD_CU_D Welford<A> local_welford(const A (&vals)[N], int count) {
    Welford<A> w = {A(0), A(0), A(0)};
    if (count <= 0) return w;
    A sum = A(0);
#pragma unroll
    for (int i = 0; i < N; ++i)
        if (i < count) sum += vals[i];
    const A mean = sum / A(count);
    A m2 = A(0);
#pragma unroll
    for (int i = 0; i < N; ++i)
        if (i < count) {
            const A d = vals[i] - mean;
            m2 += d * d;
        }
    w.n = A(count);
    w.mean = mean;
    w.m2 = m2;
    return w;
}

// Per-item partition of a fixed-order sum: items = tasks * parts; item i handles task i % tasks and the
// positions q = part, part + parts, ...; the caller then adds the parts in order (finish_parts).
EMCAD_CU_HD int choose_parts(int tasks, int threads) {
    int p = 1;
    while (p * 2 * tasks <= threads) p *= 2;
    return p;
}

}  // namespace cuda
}  // namespace emcad
