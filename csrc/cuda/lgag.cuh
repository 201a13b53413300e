#pragma once
#include "common.cuh"
namespace emcad { namespace cuda { namespace lgag {
struct Plan { size_t f_bytes, b_bytes; };
inline const char* check_args(const EmcadLgagArgs&) { return "not yet"; }
inline bool make_plan(const EmcadLgagArgs&, Plan*) { return false; }
template <class T> cudaError_t forward(const EmcadLgagArgs&, cudaStream_t) { return cudaErrorInvalidValue; }
template <class T> cudaError_t backward(const EmcadLgagArgs&, cudaStream_t) { return cudaErrorInvalidValue; }
}}}
