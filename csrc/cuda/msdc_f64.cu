// multi_scale_dwconv kernels instantiated for double (one dtype per file so nvcc compiles them in parallel).
#include "msdc.cuh"

namespace emcad {
namespace cuda {
namespace msdc {

template cudaError_t forward<double>(const EmcadMsdcArgs&, cudaStream_t);
template cudaError_t backward<double>(const EmcadMsdcArgs&, cudaStream_t);

}  // namespace msdc
}  // namespace cuda
}  // namespace emcad
