// multi_scale_dwconv kernels instantiated for float (one dtype per file so nvcc compiles them in parallel).
#include "msdc.cuh"

namespace emcad {
namespace cuda {
namespace msdc {

template cudaError_t forward<float>(const EmcadMsdcArgs&, cudaStream_t);
template cudaError_t backward<float>(const EmcadMsdcArgs&, cudaStream_t);

}  // namespace msdc
}  // namespace cuda
}  // namespace emcad
