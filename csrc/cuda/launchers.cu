// extern "C" launcher API (launchers.h): argument checks, scratch queries and dtype dispatch.
#include "launchers.h"

#include "lgag.cuh"
#include "msdc.cuh"
#include "updw.cuh"

namespace {

using namespace emcad::cuda;

template <class F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
    switch (dtype) {
        case EMCAD_DTYPE_F32: return f(float());
        case EMCAD_DTYPE_F64: return f(double());
        case EMCAD_DTYPE_F16: return f(__half());
        case EMCAD_DTYPE_BF16: return f(__nv_bfloat16());
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace

extern "C" {

int emcad_cuda_api_version(void) { return 1; }

#ifdef EMCAD_CUDA_EMULATE
// CPU emulation builds only: 128-bit vector accesses executed so far (tests/test_cuda_backend.py)
long long emcad_emu_vector_accesses(void) { return ::emcad_emu::vector_accesses().load(); }
#endif

size_t emcad_cuda_args_sizeof(int which) {
    switch (which) {
        case 0: return sizeof(EmcadMsdcArgs);
        case 1: return sizeof(EmcadUpdwArgs);
        case 2: return sizeof(EmcadLgagArgs);
        default: return 0;
    }
}

// ---- multi_scale_dwconv ----
const char* emcad_msdc_check(const EmcadMsdcArgs* args) {
    if (args == nullptr) return "null arguments";
    const char* why = msdc::check_args(*args);
    if (why != nullptr) return why;
    msdc::Plan plan;
    if (!msdc::make_plan(*args, &plan)) return "multi_scale_dwconv: problem too large for the cuda launch grid";
    return nullptr;
}

size_t emcad_msdc_forward_scratch_bytes(const EmcadMsdcArgs* args) {
    msdc::Plan plan;
    return args != nullptr && msdc::make_plan(*args, &plan) ? plan.f_bytes : 0;
}

size_t emcad_msdc_backward_scratch_bytes(const EmcadMsdcArgs* args) {
    msdc::Plan plan;
    return args != nullptr && msdc::make_plan(*args, &plan) ? plan.b_bytes : 0;
}

cudaError_t emcad_msdc_forward(const EmcadMsdcArgs* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    return dispatch_dtype(args->dtype, [&](auto tag) { return msdc::forward<decltype(tag)>(*args, stream); });
}

cudaError_t emcad_msdc_backward(const EmcadMsdcArgs* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    return dispatch_dtype(args->dtype, [&](auto tag) { return msdc::backward<decltype(tag)>(*args, stream); });
}

// ---- upsample_dwconv ----
const char* emcad_updw_check(const EmcadUpdwArgs* args) {
    if (args == nullptr) return "null arguments";
    const char* why = updw::check_args(*args);
    if (why != nullptr) return why;
    updw::Plan plan;
    if (!updw::make_plan(*args, &plan)) return "upsample_dwconv: problem too large for the cuda launch grid";
    return nullptr;
}

size_t emcad_updw_forward_scratch_bytes(const EmcadUpdwArgs* args) {
    updw::Plan plan;
    return args != nullptr && updw::make_plan(*args, &plan) ? plan.f_bytes : 0;
}

size_t emcad_updw_backward_scratch_bytes(const EmcadUpdwArgs* args) {
    updw::Plan plan;
    return args != nullptr && updw::make_plan(*args, &plan) ? plan.b_bytes : 0;
}

cudaError_t emcad_updw_forward(const EmcadUpdwArgs* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    return dispatch_dtype(args->dtype, [&](auto tag) { return updw::forward<decltype(tag)>(*args, stream); });
}

cudaError_t emcad_updw_backward(const EmcadUpdwArgs* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    return dispatch_dtype(args->dtype, [&](auto tag) { return updw::backward<decltype(tag)>(*args, stream); });
}

// ---- grouped_attention_gate ----
const char* emcad_lgag_check(const EmcadLgagArgs* args) {
    if (args == nullptr) return "null arguments";
    const char* why = lgag::check_args(*args);
    if (why != nullptr) return why;
    lgag::Plan plan;
    if (!lgag::make_plan(*args, &plan)) return "grouped_attention_gate: problem too large for the cuda launch grid";
    return nullptr;
}

size_t emcad_lgag_forward_scratch_bytes(const EmcadLgagArgs* args) {
    lgag::Plan plan;
    return args != nullptr && lgag::make_plan(*args, &plan) ? plan.f_bytes : 0;
}

size_t emcad_lgag_backward_scratch_bytes(const EmcadLgagArgs* args) {
    lgag::Plan plan;
    return args != nullptr && lgag::make_plan(*args, &plan) ? plan.b_bytes : 0;
}

cudaError_t emcad_lgag_forward(const EmcadLgagArgs* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    return dispatch_dtype(args->dtype, [&](auto tag) { return lgag::forward<decltype(tag)>(*args, stream); });
}

cudaError_t emcad_lgag_backward(const EmcadLgagArgs* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    return dispatch_dtype(args->dtype, [&](auto tag) { return lgag::backward<decltype(tag)>(*args, stream); });
}

}  // extern "C"
