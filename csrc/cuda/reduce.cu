// Deterministic cross-block reductions and BatchNorm folding (see reduce.cuh).
#include "reduce.cuh"
#include "tile.cuh"

namespace emcad {
namespace cuda {
namespace {

constexpr int kReduceThreads = 256;

template <class A>
struct FoldParams {
    BnGroups<A> groups;
    double eps;
    A* coef;
    int64_t total;
};

template <class A>
EMCAD_CU_HD int find_group(const BnGroups<A>& groups, int64_t m, int64_t* local) {
    int k = 0;
    while (k < groups.count - 1 && m >= groups.g[k].size) {
        m -= groups.g[k].size;
        ++k;
    }
    *local = m;
    return k;
}

template <class A>
__global__ void __launch_bounds__(kReduceThreads) bn_fold_kernel(FoldParams<A> p) {
    const int64_t step = int64_t(gridDim.x) * blockDim.x;
    for (int64_t m = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; m < p.total; m += step) {
        int64_t i;
        const int k = find_group(p.groups, m, &i);
        const BnGroup<A> g = p.groups.g[k];
        const A mean = g.mean[i], var = g.var[i];
        bn_coefficients<A>(g.gamma[i], g.beta[i], mean, var, p.eps, p.coef + m * COEF_N);
        if (g.out_mean != nullptr) g.out_mean[i] = mean;
        if (g.out_var != nullptr) g.out_var[i] = var;
    }
}

template <class A>
struct WelfordParams {
    const A* partial;
    int64_t slots, total;
    int lanes, outs;
    BnGroups<A> groups;
    double eps;
    A* coef;
};

template <class A>
__global__ void __launch_bounds__(kReduceThreads) welford_reduce_kernel(WelfordParams<A> p) {
    EMCAD_DYNAMIC_SMEM(double, red);  // [lanes][outs][3]
    const int tid = threadIdx.x;
    const int o = tid % p.outs;
    const int lane = tid / p.outs;
    const int64_t m = int64_t(blockIdx.x) * p.outs + o;
    Welford<double> w = {0.0, 0.0, 0.0};
    if (m < p.total) {
        for (int64_t t = lane; t < p.slots; t += p.lanes) {
            const A* q = p.partial + (t * p.total + m) * 3;
            const Welford<double> b = {double(q[0]), double(q[1]), double(q[2])};
            w = welford_merge(w, b);
        }
    }
    double* mine = red + (lane * p.outs + o) * 3;
    mine[0] = w.n;
    mine[1] = w.mean;
    mine[2] = w.m2;
    tree_welford_groups<double>(red, p.lanes, p.outs, lane, o);
    if (lane == 0 && m < p.total) {
        const double n = red[o * 3 + 0];
        const A mean = A(red[o * 3 + 1]);
        const A var = A(n > 0.0 ? red[o * 3 + 2] / n : 0.0);  // biased, like BatchNorm's normalisation
        int64_t i;
        const int k = find_group(p.groups, m, &i);
        const BnGroup<A> g = p.groups.g[k];
        if (g.out_mean != nullptr) g.out_mean[i] = mean;
        if (g.out_var != nullptr) g.out_var[i] = var;
        bn_coefficients<A>(g.gamma[i], g.beta[i], mean, var, p.eps, p.coef + m * COEF_N);
    }
}

template <class A>
struct SumParams {
    const A* partial;
    int64_t slots, total;
    int lanes, outs;
    A* res;
    SumSegments segments;
};

EMCAD_CU_D void store_as(void* dst, int64_t i, int dtype, double v) {
    switch (dtype) {
        case EMCAD_DTYPE_F64: static_cast<double*>(dst)[i] = v; break;
        case EMCAD_DTYPE_F16: static_cast<__half*>(dst)[i] = __float2half_rn(float(v)); break;
        case EMCAD_DTYPE_BF16: static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(float(v)); break;
        default: static_cast<float*>(dst)[i] = float(v); break;
    }
}

template <class A>
__global__ void __launch_bounds__(kReduceThreads) sum_reduce_kernel(SumParams<A> p) {
    EMCAD_DYNAMIC_SMEM(double, red);  // [lanes][outs]
    const int tid = threadIdx.x;
    const int o = tid % p.outs;
    const int lane = tid / p.outs;
    const int64_t m = int64_t(blockIdx.x) * p.outs + o;
    double s = 0.0;
    if (m < p.total) {
        for (int64_t t = lane; t < p.slots; t += p.lanes) s += double(p.partial[t * p.total + m]);
    }
    red[lane * p.outs + o] = s;
    tree_sum_groups<double, 1>(red, p.lanes, p.outs, lane, o);
    if (lane == 0 && m < p.total) {
        const double v = red[o];
        p.res[m] = A(v);
        for (int k = 0; k < p.segments.count; ++k) {
            const SumSegment& seg = p.segments.s[k];
            if (m >= seg.begin && m < seg.begin + seg.count) store_as(seg.dst, m - seg.begin, seg.dtype, double(A(v)));
        }
    }
}

}  // namespace

template <class A>
cudaError_t launch_bn_fold(const BnGroups<A>& groups, double eps, A* coef, cudaStream_t stream) {
    FoldParams<A> p;
    p.groups = groups;
    p.eps = eps;
    p.coef = coef;
    p.total = groups.total();
    if (p.total == 0) return cudaSuccess;
    const int64_t blocks = imin(int(ceil_div(p.total, kReduceThreads)), 4096);
    return launch_kernel(&bn_fold_kernel<A>, dim3(unsigned(blocks)), dim3(kReduceThreads), 0, stream, p);
}

template <class A>
cudaError_t launch_welford_reduce(const A* partial, int64_t slots, const BnGroups<A>& groups, double eps, A* coef,
                                  cudaStream_t stream) {
    WelfordParams<A> p;
    p.partial = partial;
    p.slots = slots;
    p.total = groups.total();
    p.lanes = reduce_lanes(slots);
    p.outs = kReduceThreads / p.lanes;
    p.groups = groups;
    p.eps = eps;
    p.coef = coef;
    if (p.total == 0) return cudaSuccess;
    const int64_t blocks = ceil_div(p.total, p.outs);
    if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
    return launch_kernel(&welford_reduce_kernel<A>, dim3(unsigned(blocks)), dim3(kReduceThreads),
                         size_t(kReduceThreads) * 3 * sizeof(double), stream, p);
}

template <class A>
cudaError_t launch_sum_reduce(const A* partial, int64_t slots, int64_t m, A* res, const SumSegments& segments,
                              cudaStream_t stream) {
    SumParams<A> p;
    p.partial = partial;
    p.slots = slots;
    p.total = m;
    p.lanes = reduce_lanes(slots);
    p.outs = kReduceThreads / p.lanes;
    p.res = res;
    p.segments = segments;
    if (m == 0) return cudaSuccess;
    const int64_t blocks = ceil_div(m, p.outs);
    if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
    return launch_kernel(&sum_reduce_kernel<A>, dim3(unsigned(blocks)), dim3(kReduceThreads),
                         size_t(kReduceThreads) * sizeof(double), stream, p);
}

template cudaError_t launch_bn_fold<float>(const BnGroups<float>&, double, float*, cudaStream_t);
template cudaError_t launch_bn_fold<double>(const BnGroups<double>&, double, double*, cudaStream_t);
template cudaError_t launch_welford_reduce<float>(const float*, int64_t, const BnGroups<float>&, double, float*,
                                                  cudaStream_t);
template cudaError_t launch_welford_reduce<double>(const double*, int64_t, const BnGroups<double>&, double, double*,
                                                   cudaStream_t);
template cudaError_t launch_sum_reduce<float>(const float*, int64_t, int64_t, float*, const SumSegments&,
                                              cudaStream_t);
template cudaError_t launch_sum_reduce<double>(const double*, int64_t, int64_t, double*, const SumSegments&,
                                               cudaStream_t);

}  // namespace cuda
}  // namespace emcad
