// multi_scale_dwconv kernels instantiated for __half (one dtype per file so nvcc compiles them in parallel).
#include "msdc.cuh"

namespace emcad {
namespace cuda {
namespace msdc {

template cudaError_t forward<__half>(const EmcadMsdcArgs&, cudaStream_t);
template cudaError_t backward<__half>(const EmcadMsdcArgs&, cudaStream_t);

}  // namespace msdc
}  // namespace cuda
}  // namespace emcad
