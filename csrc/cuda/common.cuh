// Shared host/device helpers of the CUDA kernels: no torch headers.
//
// Everything marked EMCAD_CU_HD compiles for host and device (and under the CPU emulation, see cuda_emulation.cuh):
// dtype conversions, activations and their derivatives, BatchNorm folding, Welford/Chan merging, the channel
// shuffle index map, the nearest-x2 polyphase weights, tile geometry and scratch layout. The host-side planning
// functions are plain C++ so that they can be unit-tested on CPU.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef EMCAD_CUDA_EMULATE
#include <cmath>
#include "cuda_emulation.cuh"
#define EMCAD_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emcad_emu::dynamic_smem())
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define EMCAD_DYNAMIC_SMEM(type, name)                         \
    extern __shared__ __align__(16) unsigned char emcad_smem_raw[]; \
    type* name = reinterpret_cast<type*>(emcad_smem_raw)
#endif

#include "launchers.h"

#define EMCAD_CU_HD __host__ __device__ __forceinline__
#define EMCAD_CU_D __device__ __forceinline__

#define EMCAD_RETURN_IF_ERROR(expr)          \
    do {                                     \
        cudaError_t emcad_err_ = (expr);     \
        if (emcad_err_ != cudaSuccess) return emcad_err_; \
    } while (0)

namespace emcad {
namespace cuda {

// ------------------------------------------------------------------------------------------------------------
// dtypes
// ------------------------------------------------------------------------------------------------------------
template <class T>
struct AccType {
    using type = float;
};
template <>
struct AccType<double> {
    using type = double;
};
template <class T>
using acc_t = typename AccType<T>::type;

EMCAD_CU_HD float to_acc(float v) { return v; }
EMCAD_CU_HD double to_acc(double v) { return v; }
EMCAD_CU_HD float to_acc(__half v) { return __half2float(v); }
EMCAD_CU_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
struct Cast;
template <>
struct Cast<float> {
    EMCAD_CU_HD static float from(float v) { return v; }
};
template <>
struct Cast<double> {
    EMCAD_CU_HD static double from(double v) { return v; }
};
template <>
struct Cast<__half> {
    EMCAD_CU_HD static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cast<__nv_bfloat16> {
    EMCAD_CU_HD static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <class T, class A>
EMCAD_CU_HD T from_acc(A v) {
    return Cast<T>::from(v);
}

// elements of T per 16-byte vector
template <class T>
struct Vec {
    static constexpr int size = 16 / static_cast<int>(sizeof(T));
};

// ------------------------------------------------------------------------------------------------------------
// math (float and double overloads that exist on host, device and under the emulation)
// ------------------------------------------------------------------------------------------------------------
EMCAD_CU_HD float m_sqrt(float v) { return sqrtf(v); }
EMCAD_CU_HD double m_sqrt(double v) { return sqrt(v); }
EMCAD_CU_HD float m_exp(float v) { return expf(v); }
EMCAD_CU_HD double m_exp(double v) { return exp(v); }
EMCAD_CU_HD float m_erf(float v) { return erff(v); }
EMCAD_CU_HD double m_erf(double v) { return erf(v); }
EMCAD_CU_HD float m_rsqrt(float v) { return 1.0f / sqrtf(v); }
EMCAD_CU_HD double m_rsqrt(double v) { return 1.0 / sqrt(v); }
template <class A>
EMCAD_CU_HD A m_min(A a, A b) {
    return b < a ? b : a;
}
template <class A>
EMCAD_CU_HD A m_max(A a, A b) {
    return a < b ? b : a;
}
EMCAD_CU_HD int imin(int a, int b) { return a < b ? a : b; }
EMCAD_CU_HD int imax(int a, int b) { return a < b ? b : a; }
EMCAD_CU_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------------------
// activations (emcad_kernels.reference.activate / activate_backward, PyTorch's conventions at the kinks)
// ------------------------------------------------------------------------------------------------------------
template <class A>
EMCAD_CU_HD A activate(A z, int act) {
    switch (act) {
        case EMCAD_ACT_RELU: return z > A(0) ? z : A(0);
        case EMCAD_ACT_RELU6: return m_min(m_max(z, A(0)), A(6));  // hardtanh(z, 0, 6)
        case EMCAD_ACT_LEAKYRELU: return z > A(0) ? z : z * A(EMCAD_LEAKY_SLOPE);
        case EMCAD_ACT_GELU: return A(0.5) * z * (A(1) + m_erf(z * A(0.70710678118654752440)));
        case EMCAD_ACT_HSWISH: return z * m_min(m_max(z + A(3), A(0)), A(6)) / A(6);
        default: return z;
    }
}

// gradient wrt the activation input a, given the upstream gradient g
template <class A>
EMCAD_CU_HD A activate_backward(A g, A a, int act) {
    switch (act) {
        case EMCAD_ACT_RELU: return a > A(0) ? g : A(0);
        case EMCAD_ACT_RELU6: return (a > A(0) && a < A(6)) ? g : A(0);
        case EMCAD_ACT_LEAKYRELU: return a > A(0) ? g : g * A(EMCAD_LEAKY_SLOPE);
        case EMCAD_ACT_GELU: {
            // aten gelu_backward: cdf + x * pdf
            const A cdf = A(0.5) * (A(1) + m_erf(a * A(0.70710678118654752440)));
            const A pdf = m_exp(A(-0.5) * a * a) * A(0.39894228040143267794);
            return g * (cdf + a * pdf);
        }
        case EMCAD_ACT_HSWISH:  // aten hardswish_backward
            if (a < A(-3)) return A(0);
            if (a <= A(3)) return g * (a / A(3) + A(0.5));
            return g;
        default: return g;
    }
}

template <class A>
EMCAD_CU_HD A sigmoid(A v) {
    return A(1) / (A(1) + m_exp(-v));
}

// ------------------------------------------------------------------------------------------------------------
// BatchNorm
// ------------------------------------------------------------------------------------------------------------
// Per-channel coefficients prepared once per call (scratch, [channels][4]): a = z * scale + shift with
// scale = gamma * rstd, shift = beta - mean * scale; mean and rstd for the backward (zhat = (z - mean) * rstd).
enum { COEF_SCALE = 0, COEF_SHIFT = 1, COEF_MEAN = 2, COEF_RSTD = 3, COEF_N = 4 };

template <class A>
EMCAD_CU_HD void bn_coefficients(A gamma, A beta, A mean, A var, double eps, A* coef) {
    const A rstd = m_rsqrt(var + A(eps));
    const A scale = gamma * rstd;
    coef[COEF_SCALE] = scale;
    coef[COEF_SHIFT] = beta - mean * scale;
    coef[COEF_MEAN] = mean;
    coef[COEF_RSTD] = rstd;
}

// Welford / Chan partial statistics (count, mean, sum of squared deviations)
template <class A>
struct Welford {
    A n, mean, m2;
};

template <class A>
EMCAD_CU_HD Welford<A> welford_merge(Welford<A> a, Welford<A> b) {
    if (b.n == A(0)) return a;
    if (a.n == A(0)) return b;
    const A n = a.n + b.n;
    const A d = b.mean - a.mean;
    const A fb = b.n / n;
    Welford<A> r;
    r.n = n;
    r.mean = a.mean + d * fb;
    r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
    return r;
}

// ------------------------------------------------------------------------------------------------------------
// channel shuffle (EMCAD.md 2.2): output channel o takes source channel (o mod g) * n + o / g, n = C / g;
// the inverse map sends source channel s to o = (s mod n) * g + s / n.
// ------------------------------------------------------------------------------------------------------------
struct ChannelMap {
    int64_t offset;  // added to the source channel first (the branch's slot with concat)
    int64_t groups;  // 0: identity
    int64_t per_group;
    EMCAD_CU_HD int64_t operator()(int64_t c) const {
        const int64_t s = c + offset;
        if (groups <= 0) return s;
        return (s % per_group) * groups + s / per_group;
    }
};

EMCAD_CU_HD ChannelMap make_channel_map(int64_t offset, int64_t groups, int64_t channels_out) {
    ChannelMap m;
    m.offset = offset;
    m.groups = groups > 0 ? groups : 0;
    m.per_group = groups > 0 ? channels_out / groups : 1;
    return m;
}

// ------------------------------------------------------------------------------------------------------------
// nearest x2 + 3x3 as four 2x2 polyphase stencils (EMCAD.md 11.3):
// O[2i+p][2j+q] = sum_{r,s in {0,1}} K[p][q][r][s] * X[i+p-1+r][j+q-1+s],
// K[p][q][r][s] = sum_{a in A_p(r)} sum_{b in A_q(s)} w[a][b], A_0 = ({0}, {1,2}), A_1 = ({0,1}, {2}).
// ------------------------------------------------------------------------------------------------------------
EMCAD_CU_HD int polyphase_first(int phase, int r) { return phase == 0 ? (r == 0 ? 0 : 1) : (r == 0 ? 0 : 2); }
EMCAD_CU_HD int polyphase_last(int phase, int r) { return phase == 0 ? (r == 0 ? 0 : 2) : (r == 0 ? 1 : 2); }

// w: 3x3 row-major; k: [p][q][r][s] flattened as ((p*2+q)*2+r)*2+s
template <class A>
EMCAD_CU_HD void polyphase_weights(const A* w, A* k) {
    for (int p = 0; p < 2; ++p)
        for (int q = 0; q < 2; ++q)
            for (int r = 0; r < 2; ++r)
                for (int s = 0; s < 2; ++s) {
                    A acc = A(0);
                    for (int a = polyphase_first(p, r); a <= polyphase_last(p, r); ++a)
                        for (int b = polyphase_first(q, s); b <= polyphase_last(q, s); ++b) acc += w[a * 3 + b];
                    k[((p * 2 + q) * 2 + r) * 2 + s] = acc;
                }
}

// ------------------------------------------------------------------------------------------------------------
// strides
// ------------------------------------------------------------------------------------------------------------
struct Strides {
    int64_t n, c, h, w;
};

inline Strides make_strides(const int64_t* s) {
    Strides r;
    r.n = s[0];
    r.c = s[1];
    r.h = s[2];
    r.w = s[3];
    return r;
}

EMCAD_CU_HD int64_t offset4(const Strides& s, int64_t n, int64_t c, int64_t h, int64_t w) {
    return n * s.n + c * s.c + h * s.h + w * s.w;
}

// The 128-bit vector path of a tile needs unit channel stride and every pixel start 16-byte aligned.
template <class T>
inline bool vector_ok(const void* ptr, const Strides& s, int64_t channels) {
    const int64_t v = Vec<T>::size;
    if (s.c != 1 || channels % v != 0) return false;
    if (s.n % v != 0 || s.h % v != 0 || s.w % v != 0) return false;
    return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// ------------------------------------------------------------------------------------------------------------
// tile geometry (host): a block covers `cb` channels x `gh` rows x `gw * V` columns of positions; one thread per
// (channel, row, column group); each thread computes V adjacent positions along W (register blocking).
// gh and gw are powers of two so block reductions are fixed trees. Only problem sizes enter the choice, so the
// reduction partition (and therefore every rounding) is a function of the shape alone.
// ------------------------------------------------------------------------------------------------------------
constexpr int kV = 4;                 // positions per thread along W
constexpr int kMaxThreads = 256;      // threads per block
constexpr size_t kSmemBudget = 48 * 1024;  // no opt-in shared memory needed

struct TileGeom {
    int cb, gh, gw;      // channels per block, rows per block, column groups per block
    int th, tw;          // tile height / width in positions (th = gh, tw = gw * kV)
    int threads;         // cb * gh * gw
    int64_t tiles_h, tiles_w, chunks;  // grid: tiles_h * tiles_w, chunks, batch
    size_t smem;         // dynamic shared-memory bytes
    int64_t slots(int64_t batch) const { return batch * tiles_h * tiles_w; }
};

inline int pow2_ceil(int64_t v) {
    int p = 1;
    while (p < v && p < (1 << 30)) p <<= 1;
    return p;
}
inline int pow2_floor(int64_t v) {
    int p = 1;
    while (static_cast<int64_t>(p) * 2 <= v && p < (1 << 30)) p <<= 1;
    return p;
}

// smem_fn(th, tw, cb, threads) -> bytes. Returns false if nothing fits the budget.
template <class SmemFn>
inline bool choose_geometry(int64_t out_h, int64_t out_w, int64_t channels, bool channels_last, int max_cb,
                            SmemFn smem_fn, TileGeom* g) {
    if (out_h <= 0 || out_w <= 0 || channels <= 0) return false;
    int gw = imin(pow2_ceil(ceil_div(out_w, kV)), channels_last ? 4 : 8);
    int cb;
    if (channels_last) {
        cb = imin(pow2_ceil(channels), max_cb);
    } else {
        cb = 1;
    }
    int gh = imin(pow2_ceil(out_h), imax(1, kMaxThreads / (cb * gw)));
    if (!channels_last) {
        // small planes: several channels per block so that a block still has work for its threads
        while (cb * 2 <= max_cb && cb * 2 <= pow2_ceil(channels) && cb * 2 * gh * gw <= kMaxThreads) cb *= 2;
    }
    for (;;) {
        const int th = gh, tw = gw * kV, threads = cb * gh * gw;
        const size_t smem = smem_fn(th, tw, cb, threads);
        if (smem <= kSmemBudget) {
            g->cb = cb;
            g->gh = gh;
            g->gw = gw;
            g->th = th;
            g->tw = tw;
            g->threads = threads;
            g->smem = smem;
            g->tiles_h = ceil_div(out_h, th);
            g->tiles_w = ceil_div(out_w, tw);
            g->chunks = ceil_div(channels, cb);
            return true;
        }
        if (gh > 4) {
            gh /= 2;
        } else if (cb > 8) {
            cb /= 2;
        } else if (gh > 1) {
            gh /= 2;
        } else if (cb > 1) {
            cb /= 2;
        } else if (gw > 1) {
            gw /= 2;
        } else {
            return false;
        }
    }
}

inline bool grid_ok(const TileGeom& g, int64_t batch) {
    return g.tiles_h * g.tiles_w < (int64_t(1) << 31) && g.chunks <= 65535 && batch <= 65535 && batch > 0;
}

// ------------------------------------------------------------------------------------------------------------
// scratch layout (host): consecutive 256-byte aligned regions
// ------------------------------------------------------------------------------------------------------------
struct ScratchLayout {
    size_t bytes = 0;
    size_t add(size_t n_bytes) {
        const size_t at = bytes;
        bytes += (n_bytes + 255) / 256 * 256;
        return at;
    }
};

template <class P>
inline P* scratch_at(void* base, size_t offset) {
    return reinterpret_cast<P*>(static_cast<unsigned char*>(base) + offset);
}

// ------------------------------------------------------------------------------------------------------------
// launching
// ------------------------------------------------------------------------------------------------------------
template <class P>
inline cudaError_t launch_kernel(void (*kernel)(P), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                 const P& params) {
#ifdef EMCAD_CUDA_EMULATE
    (void)stream;
    return ::emcad_emu::launch(kernel, grid, block, smem, params);
#else
    void* args[] = {const_cast<P*>(&params)};
    return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, args, smem, stream);
#endif
}

// the acc dtype (EmcadDType) of an input dtype
inline int acc_dtype_of(int dtype) { return dtype == EMCAD_DTYPE_F64 ? EMCAD_DTYPE_F64 : EMCAD_DTYPE_F32; }

}  // namespace cuda
}  // namespace emcad
