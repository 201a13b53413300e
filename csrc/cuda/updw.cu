// upsample_dwconv kernels instantiated for every supported dtype.
#include "updw.cuh"

namespace emcad {
namespace cuda {
namespace updw {

template cudaError_t forward<float>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t forward<double>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t forward<__half>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t forward<__nv_bfloat16>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t backward<float>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t backward<double>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t backward<__half>(const EmcadUpdwArgs&, cudaStream_t);
template cudaError_t backward<__nv_bfloat16>(const EmcadUpdwArgs&, cudaStream_t);

}  // namespace updw
}  // namespace cuda
}  // namespace emcad
