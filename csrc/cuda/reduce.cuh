// Deterministic cross-block reductions and BatchNorm preparation kernels shared by the ops (defined in reduce.cu).
//
// Every op kernel that needs a reduction over the batch writes one partial per block ("slot") into scratch; the
// kernels here combine the slots per output in a fixed order: thread lane l of an output sums slots l, l + L,
// l + 2L, ... sequentially (in double), then the L lanes are combined by a fixed tree. L depends only on the number
// of slots, so results are bitwise reproducible run to run and independent of the GPU.
#pragma once

#include "common.cuh"

namespace emcad {
namespace cuda {

// One BatchNorm "group" of per-channel parameters (e.g. the nb stacked MSDC branches, or LGAG's bn_g).
template <class A>
struct BnGroup {
    const A* gamma;
    const A* beta;
    const A* mean;   // fold only: the statistics to fold (running or saved)
    const A* var;
    A* out_mean;     // optional: receives the statistics used
    A* out_var;
    int64_t size;    // channels in the group
};

constexpr int kMaxBnGroups = 3;

template <class A>
struct BnGroups {
    BnGroup<A> g[kMaxBnGroups];
    int count;
    int64_t total() const {
        int64_t t = 0;
        for (int i = 0; i < count; ++i) t += g[i].size;
        return t;
    }
};

// Destinations of a sum reduction: res[begin, begin + count) is also written, cast, to dst (dtype EmcadDType).
struct SumSegment {
    int64_t begin, count;
    void* dst;
    int dtype;
};
constexpr int kMaxSegments = 8;
struct SumSegments {
    SumSegment s[kMaxSegments];
    int count;
    void add(int64_t begin, int64_t n, void* dst, int dtype) {
        if (dst == nullptr || count >= kMaxSegments) return;
        s[count].begin = begin;
        s[count].count = n;
        s[count].dst = dst;
        s[count].dtype = dtype;
        ++count;
    }
};

// coef[m][COEF_N] for every channel m of the groups (in group order) from gamma, beta, mean, var; copies mean and
// var to out_mean/out_var where given.
template <class A>
cudaError_t launch_bn_fold(const BnGroups<A>& groups, double eps, A* coef, cudaStream_t stream);

// partial[T][M][3] Welford triples -> per channel m: batch mean and biased variance (to out_mean/out_var of its
// group) and coef[m] from the group's gamma/beta.
template <class A>
cudaError_t launch_welford_reduce(const A* partial, int64_t slots, const BnGroups<A>& groups, double eps, A* coef,
                                  cudaStream_t stream);

// partial[T][M] -> res[M] (sum over the T slots), and each segment cast to its destination.
template <class A>
cudaError_t launch_sum_reduce(const A* partial, int64_t slots, int64_t m, A* res, const SumSegments& segments,
                              cudaStream_t stream);

// number of lanes per output of the cross-slot reductions (a function of the slot count only)
inline int reduce_lanes(int64_t slots) {
    int64_t l = slots / 16;
    if (l < 1) l = 1;
    if (l > 256) l = 256;
    return pow2_floor(l);
}

}  // namespace cuda
}  // namespace emcad
