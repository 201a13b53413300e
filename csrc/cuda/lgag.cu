// grouped_attention_gate kernels instantiated for every supported dtype.
#include "lgag.cuh"

namespace emcad {
namespace cuda {
namespace lgag {

template cudaError_t forward<float>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t forward<double>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t forward<__half>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t forward<__nv_bfloat16>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t backward<float>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t backward<double>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t backward<__half>(const EmcadLgagArgs&, cudaStream_t);
template cudaError_t backward<__nv_bfloat16>(const EmcadLgagArgs&, cudaStream_t);

}  // namespace lgag
}  // namespace cuda
}  // namespace emcad
