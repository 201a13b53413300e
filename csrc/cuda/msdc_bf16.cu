// multi_scale_dwconv kernels instantiated for __nv_bfloat16 (one dtype per file so nvcc compiles them in parallel).
#include "msdc.cuh"

namespace emcad {
namespace cuda {
namespace msdc {

template cudaError_t forward<__nv_bfloat16>(const EmcadMsdcArgs&, cudaStream_t);
template cudaError_t backward<__nv_bfloat16>(const EmcadMsdcArgs&, cudaStream_t);

}  // namespace msdc
}  // namespace cuda
}  // namespace emcad
