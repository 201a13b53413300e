// The only CUDA-side file that includes torch: turns tensors into launcher calls (launchers.h).
//
// Per op: check the arguments, make inputs dense in the output's memory format (channels_last only when the input
// is unambiguously channels_last, like emcad_kernels.reference.output_memory_format), allocate outputs and the
// scratch the launcher asks for through the caching allocator, and launch on the current stream of the input's
// device. No host synchronisation, so the ops can be captured in CUDA graphs.
//
// Registered as the CUDA kernels of emcad_kernels::<op>_{fwd,bwd}, the ops whose schemas (shared with the CPU
// kernels), fake tensors, autograd and FLOP formulas the op descriptors define (emcad_kernels/ops/<op>.py).
//
// Test build: with EMCAD_CUDA_EMULATE defined (tests/test_cuda_backend.py, CPU machines) this same file is compiled
// against the CPU torch and linked with the CPU emulation of the launchers (cuda_emulation.cuh); the kernels are then
// registered for emcad_kernels_emu::* (the same descriptors, another namespace) under the CPU dispatch key, so that
// the whole path (binding, ops, autograd, torch.compile) runs on machines without a GPU.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef EMCAD_CUDA_EMULATE
// c10's CUDA headers are enough (at::cuda::getCurrentCUDAStream is c10::cuda's); ATen/cuda/CUDAContext.h would
// also pull in cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "../common/torch_codes.h"  // relative: also compiled with only csrc/cuda on the include path
#include "launchers.h"

#ifdef EMCAD_CUDA_EMULATE
#define EMCAD_DEVICE_GUARD(t) (void)(t)
#define EMCAD_CURRENT_STREAM nullptr
#define EMCAD_DEVICE_NAME "CPU (emulation build)"
#else
#define EMCAD_DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard emcad_device_guard_((t).device())
#define EMCAD_CURRENT_STREAM at::cuda::getCurrentCUDAStream().stream()
#define EMCAD_DEVICE_NAME "CUDA"
#endif

namespace {

using at::Tensor;

int dtype_code(at::ScalarType t) {
    const int code = emcad::dtype_code(t);
    TORCH_CHECK(code >= 0, "emcad_kernels cuda backend: unsupported dtype ", t);
    return code;
}

int activation_code(c10::string_view name) {
    const int code = emcad::activation_code(name);
    TORCH_CHECK(code >= 0, "emcad_kernels cuda backend: unknown activation '", std::string(name.data(), name.size()),
                "'");
    return code;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// channels_last only if x is unambiguously so (reference.output_memory_format)
at::MemoryFormat out_format(const Tensor& x) {
    if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
        return at::MemoryFormat::ChannelsLast;
    return at::MemoryFormat::Contiguous;
}

void check_input(const Tensor& x, const char* name) {
#ifdef EMCAD_CUDA_EMULATE
    const bool on_device = x.is_cpu();
#else
    const bool on_device = x.is_cuda();
#endif
    TORCH_CHECK(on_device, "emcad_kernels cuda backend: ", name, " must be a ", EMCAD_DEVICE_NAME, " tensor");
    TORCH_CHECK(x.dim() == 4, "emcad_kernels cuda backend: ", name, " must be 4-D, got ", x.sizes());
    dtype_code(x.scalar_type());
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "emcad_kernels cuda backend: ", name, " is on ", t.device(),
                " but the input is on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "emcad_kernels cuda backend: ", name, " has dtype ",
                t.scalar_type(), ", expected ", x.scalar_type());
}

// a per-channel BatchNorm tensor in the accumulation dtype, dense, with `numel` values
Tensor bn_param(const Tensor& t, const Tensor& x, int64_t numel, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "emcad_kernels cuda backend: ", name, " is on ", t.device(),
                " but the input is on ", x.device());
    TORCH_CHECK(t.numel() == numel, "emcad_kernels cuda backend: ", name, " has ", t.numel(), " values, expected ",
                numel);
    return t.to(acc_type(x.scalar_type())).contiguous();
}

void fill_strides(int64_t* dst, const Tensor& t) {
    for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "emcad_kernels cuda backend: ", what, " failed: ", cudaGetErrorString(err));
}

Tensor scratch_for(size_t bytes, const Tensor& like) {
    return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// The gradient of a parameter with the strides the fake implementation promises (empty_like of the parameter).
// The kernels write dense row-major values, so a parameter with another physical layout gets a dense buffer
// that is copied back after the launch.
struct ParamGrad {
    Tensor out, buf;
    void finish() {
        if (!out.is_same(buf)) out.copy_(buf);
    }
};

ParamGrad param_grad(const Tensor& param) {
    Tensor out = at::empty_like(param);
    return {out, out.is_contiguous() ? out : at::empty(param.sizes(), param.options())};
}

Tensor cast_like(const Tensor& t, const Tensor& like) {
    return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

// ------------------------------------------------------------------------------------------------------------
// multi_scale_dwconv
// ------------------------------------------------------------------------------------------------------------
struct MsdcPrepared {
    EmcadMsdcArgs args;
    Tensor x;
    std::vector<Tensor> weights;
    Tensor bn_weight, bn_bias, mean, var;
    at::MemoryFormat fmt;
};

MsdcPrepared msdc_prepare(const Tensor& x_in, at::TensorList weights, const Tensor& bn_weight, const Tensor& bn_bias,
                          const Tensor& mean, const Tensor& var, bool training, double eps,
                          c10::string_view activation, bool concat, int64_t shuffle_groups) {
    check_input(x_in, "x");
    const int64_t nb = static_cast<int64_t>(weights.size());
    TORCH_CHECK(nb >= 1 && nb <= 4, "emcad_kernels cuda backend: multi_scale_dwconv supports 1 to 4 branches");
    MsdcPrepared p;
    p.fmt = out_format(x_in);
    p.x = x_in.contiguous(p.fmt);
    const int64_t c = p.x.size(1);
    for (int64_t b = 0; b < nb; ++b) {
        const Tensor& w = weights[b];
        check_like(w, p.x, "weights[i]");
        TORCH_CHECK(w.dim() == 4 && w.size(0) == c && w.size(1) == 1 && w.size(2) == w.size(3),
                    "emcad_kernels cuda backend: weights[", b, "] must have shape [C, 1, k, k], got ", w.sizes());
        p.weights.push_back(w.contiguous());
    }
    p.bn_weight = bn_param(bn_weight, p.x, nb * c, "bn_weight");
    p.bn_bias = bn_param(bn_bias, p.x, nb * c, "bn_bias");
    p.mean = bn_param(mean, p.x, nb * c, "mean");
    p.var = bn_param(var, p.x, nb * c, "var");
    EmcadMsdcArgs& a = p.args;
    a = EmcadMsdcArgs{};
    a.n = p.x.size(0);
    a.c = c;
    a.h = p.x.size(2);
    a.w = p.x.size(3);
    fill_strides(a.x_stride, p.x);
    a.nb = static_cast<int32_t>(nb);
    for (int64_t b = 0; b < nb; ++b) {
        a.ksize[b] = static_cast<int32_t>(p.weights[b].size(-1));
        a.weight[b] = p.weights[b].data_ptr();
    }
    a.dtype = dtype_code(p.x.scalar_type());
    a.act = activation_code(activation);
    a.concat = concat ? 1 : 0;
    a.shuffle_groups = static_cast<int32_t>(shuffle_groups);
    a.training = training ? 1 : 0;
    a.eps = eps;
    a.x = p.x.data_ptr();
    a.bn_weight = p.bn_weight.data_ptr();
    a.bn_bias = p.bn_bias.data_ptr();
    a.mean = p.mean.data_ptr();
    a.var = p.var.data_ptr();
    const char* why = emcad_msdc_check(&a);
    TORCH_CHECK(why == nullptr, "emcad_kernels cuda backend: ", why == nullptr ? "" : why);
    return p;
}

void check_stride(int64_t stride) {
    TORCH_CHECK(stride == 1, "emcad_kernels cuda backend: multi_scale_dwconv supports stride 1 only, got ", stride);
}

std::tuple<Tensor, Tensor, Tensor> msdc_fwd(const Tensor& x, at::TensorList weights, const Tensor& bn_weight,
                                            const Tensor& bn_bias, const Tensor& mean, const Tensor& var,
                                            bool training, double eps, c10::string_view activation, bool concat,
                                            int64_t shuffle_groups, int64_t stride) {
    EMCAD_DEVICE_GUARD(x);
    check_stride(stride);
    MsdcPrepared p =
        msdc_prepare(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups);
    EmcadMsdcArgs& a = p.args;
    const int64_t cout = concat ? a.nb * a.c : a.c;
    Tensor y = at::empty({a.n, cout, a.h, a.w}, p.x.options().memory_format(p.fmt));
    Tensor save_mean = at::empty({a.nb, a.c}, p.x.options().dtype(acc_type(p.x.scalar_type())));
    Tensor save_var = at::empty_like(save_mean);
    fill_strides(a.y_stride, y);
    a.y = y.data_ptr();
    a.save_mean = save_mean.data_ptr();
    a.save_var = save_var.data_ptr();
    const size_t bytes = emcad_msdc_forward_scratch_bytes(&a);
    Tensor scratch = scratch_for(bytes, p.x);
    a.scratch = scratch.data_ptr();
    a.scratch_bytes = bytes;
    check_launch(emcad_msdc_forward(&a, EMCAD_CURRENT_STREAM), "multi_scale_dwconv forward");
    return {y, save_mean, save_var};
}

// returns [grad_x, grad_bn_weight, grad_bn_bias, *grad_weights]
std::vector<Tensor> msdc_bwd(const Tensor& grad, const Tensor& x, at::TensorList weights, const Tensor& bn_weight,
                             const Tensor& bn_bias, const Tensor& save_mean, const Tensor& save_var, bool training,
                             double eps, c10::string_view activation, bool concat, int64_t shuffle_groups,
                             int64_t stride) {
    EMCAD_DEVICE_GUARD(x);
    check_stride(stride);
    MsdcPrepared p = msdc_prepare(x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation,
                                  concat, shuffle_groups);
    EmcadMsdcArgs& a = p.args;
    const int64_t cout = concat ? a.nb * a.c : a.c;
    check_like(grad, p.x, "grad");
    TORCH_CHECK(grad.dim() == 4 && grad.size(0) == a.n && grad.size(1) == cout && grad.size(2) == a.h &&
                    grad.size(3) == a.w,
                "emcad_kernels cuda backend: grad has shape ", grad.sizes());
    const Tensor g = grad.contiguous(p.fmt);
    Tensor gx = at::empty_like(p.x, p.x.options(), p.fmt);
    const auto acc = p.x.options().dtype(acc_type(p.x.scalar_type()));
    Tensor gbw = at::empty({a.nb, a.c}, acc);
    Tensor gbb = at::empty({a.nb, a.c}, acc);
    std::vector<ParamGrad> gws;
    for (int b = 0; b < a.nb; ++b) {
        gws.push_back(param_grad(weights[b]));
        a.grad_weight[b] = gws.back().buf.data_ptr();
    }
    fill_strides(a.y_stride, g);
    a.grad_y = g.data_ptr();
    a.grad_x = gx.data_ptr();
    a.grad_bn_weight = gbw.data_ptr();
    a.grad_bn_bias = gbb.data_ptr();
    const size_t bytes = emcad_msdc_backward_scratch_bytes(&a);
    Tensor scratch = scratch_for(bytes, p.x);
    a.scratch = scratch.data_ptr();
    a.scratch_bytes = bytes;
    check_launch(emcad_msdc_backward(&a, EMCAD_CURRENT_STREAM), "multi_scale_dwconv backward");
    std::vector<Tensor> out{gx, cast_like(gbw, bn_weight), cast_like(gbb, bn_bias)};
    for (auto& t : gws) {
        t.finish();
        out.push_back(t.out);
    }
    return out;
}

// ------------------------------------------------------------------------------------------------------------
// upsample_dwconv
// ------------------------------------------------------------------------------------------------------------
struct UpdwPrepared {
    EmcadUpdwArgs args;
    Tensor x, weight, bn_weight, bn_bias, mean, var;
    at::MemoryFormat fmt;
};

UpdwPrepared updw_prepare(const Tensor& x_in, const Tensor& weight, const Tensor& bn_weight, const Tensor& bn_bias,
                          const Tensor& mean, const Tensor& var, bool training, double eps, c10::string_view mode,
                          c10::string_view activation, int64_t scale) {
    check_input(x_in, "x");
    UpdwPrepared p;
    p.fmt = out_format(x_in);
    p.x = x_in.contiguous(p.fmt);
    const int64_t c = p.x.size(1);
    check_like(weight, p.x, "weight");
    TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == weight.size(3),
                "emcad_kernels cuda backend: weight must have shape [C, 1, k, k], got ", weight.sizes());
    p.weight = weight.contiguous();
    p.bn_weight = bn_param(bn_weight, p.x, c, "bn_weight");
    p.bn_bias = bn_param(bn_bias, p.x, c, "bn_bias");
    p.mean = bn_param(mean, p.x, c, "mean");
    p.var = bn_param(var, p.x, c, "var");
    EmcadUpdwArgs& a = p.args;
    a = EmcadUpdwArgs{};
    a.n = p.x.size(0);
    a.c = c;
    a.h = p.x.size(2);
    a.w = p.x.size(3);
    fill_strides(a.x_stride, p.x);
    a.ksize = static_cast<int32_t>(p.weight.size(-1));
    a.scale = static_cast<int32_t>(scale);
    a.mode = std::string(mode.data(), mode.size()) == "nearest" ? 0 : 1;
    a.dtype = dtype_code(p.x.scalar_type());
    a.act = activation_code(activation);
    a.training = training ? 1 : 0;
    a.eps = eps;
    a.x = p.x.data_ptr();
    a.weight = p.weight.data_ptr();
    a.bn_weight = p.bn_weight.data_ptr();
    a.bn_bias = p.bn_bias.data_ptr();
    a.mean = p.mean.data_ptr();
    a.var = p.var.data_ptr();
    const char* why = emcad_updw_check(&a);
    TORCH_CHECK(why == nullptr, "emcad_kernels cuda backend: ", why == nullptr ? "" : why);
    return p;
}

std::tuple<Tensor, Tensor, Tensor> updw_fwd(const Tensor& x, const Tensor& weight, const Tensor& bn_weight,
                                            const Tensor& bn_bias, const Tensor& mean, const Tensor& var,
                                            bool training, double eps, c10::string_view mode,
                                            c10::string_view activation, int64_t scale) {
    EMCAD_DEVICE_GUARD(x);
    UpdwPrepared p = updw_prepare(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale);
    EmcadUpdwArgs& a = p.args;
    Tensor y = at::empty({a.n, a.c, a.h * scale, a.w * scale}, p.x.options().memory_format(p.fmt));
    Tensor save_mean = at::empty({a.c}, p.x.options().dtype(acc_type(p.x.scalar_type())));
    Tensor save_var = at::empty_like(save_mean);
    fill_strides(a.y_stride, y);
    a.y = y.data_ptr();
    a.save_mean = save_mean.data_ptr();
    a.save_var = save_var.data_ptr();
    const size_t bytes = emcad_updw_forward_scratch_bytes(&a);
    Tensor scratch = scratch_for(bytes, p.x);
    a.scratch = scratch.data_ptr();
    a.scratch_bytes = bytes;
    check_launch(emcad_updw_forward(&a, EMCAD_CURRENT_STREAM), "upsample_dwconv forward");
    return {y, save_mean, save_var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> updw_bwd(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                    const Tensor& bn_weight, const Tensor& bn_bias,
                                                    const Tensor& save_mean, const Tensor& save_var, bool training,
                                                    double eps, c10::string_view mode, c10::string_view activation,
                                                    int64_t scale) {
    EMCAD_DEVICE_GUARD(x);
    UpdwPrepared p =
        updw_prepare(x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation, scale);
    EmcadUpdwArgs& a = p.args;
    check_like(grad, p.x, "grad");
    TORCH_CHECK(grad.dim() == 4 && grad.size(0) == a.n && grad.size(1) == a.c && grad.size(2) == a.h * scale &&
                    grad.size(3) == a.w * scale,
                "emcad_kernels cuda backend: grad has shape ", grad.sizes());
    const Tensor g = grad.contiguous(p.fmt);
    Tensor gx = at::empty_like(p.x, p.x.options(), p.fmt);
    ParamGrad gw = param_grad(weight);
    const auto acc = p.x.options().dtype(acc_type(p.x.scalar_type()));
    Tensor gbw = at::empty({a.c}, acc);
    Tensor gbb = at::empty({a.c}, acc);
    fill_strides(a.y_stride, g);
    a.grad_y = g.data_ptr();
    a.grad_x = gx.data_ptr();
    a.grad_weight = gw.buf.data_ptr();
    a.grad_bn_weight = gbw.data_ptr();
    a.grad_bn_bias = gbb.data_ptr();
    const size_t bytes = emcad_updw_backward_scratch_bytes(&a);
    Tensor scratch = scratch_for(bytes, p.x);
    a.scratch = scratch.data_ptr();
    a.scratch_bytes = bytes;
    check_launch(emcad_updw_backward(&a, EMCAD_CURRENT_STREAM), "upsample_dwconv backward");
    gw.finish();
    return {gx, gw.out, cast_like(gbw, bn_weight), cast_like(gbb, bn_bias)};
}

// ------------------------------------------------------------------------------------------------------------
// grouped_attention_gate
// ------------------------------------------------------------------------------------------------------------
struct LgagPrepared {
    EmcadLgagArgs args;
    Tensor g, x;
    std::vector<Tensor> params;  // wg, bg, wx, bx, wpsi, bpsi
    std::vector<Tensor> bn;      // g: w, b, mean, var; x: ...; psi: ...
};

// bn: 12 tensors (weight, bias, mean, var of bn_g, bn_x, bn_psi)
LgagPrepared lgag_prepare(const Tensor& g_in, const Tensor& x_in, const Tensor& wg, const Tensor& bg,
                          const Tensor& wx, const Tensor& bx, const Tensor& wpsi, const Tensor& bpsi,
                          const std::vector<Tensor>& bn, bool training, double eps, int64_t groups,
                          c10::string_view activation, bool add_gate_input) {
    check_input(g_in, "g");
    check_input(x_in, "x");
    check_like(g_in, x_in, "g");
    LgagPrepared p;
    p.g = g_in.contiguous(out_format(g_in));
    p.x = x_in.contiguous(out_format(x_in));
    TORCH_CHECK(p.g.size(0) == p.x.size(0) && p.g.size(2) == p.x.size(2) && p.g.size(3) == p.x.size(3),
                "emcad_kernels cuda backend: g and x must have the same batch and spatial size");
    const char* names[6] = {"wg", "bg", "wx", "bx", "wpsi", "bpsi"};
    const Tensor* ins[6] = {&wg, &bg, &wx, &bx, &wpsi, &bpsi};
    for (int i = 0; i < 6; ++i) {
        check_like(*ins[i], p.x, names[i]);
        p.params.push_back(ins[i]->contiguous());
    }
    const int64_t f_int = wg.size(0);
    TORCH_CHECK(wg.dim() == 4 && wx.dim() == 4 && wx.size(0) == f_int && wpsi.numel() == f_int && bg.numel() == f_int &&
                    bx.numel() == f_int && bpsi.numel() == 1,
                "emcad_kernels cuda backend: inconsistent grouped_attention_gate parameter shapes");
    TORCH_CHECK(bn.size() == 12, "emcad_kernels cuda backend: expected 12 BatchNorm tensors");
    const char* bn_names[3] = {"bn_g", "bn_x", "bn_psi"};
    for (int k = 0; k < 12; ++k) p.bn.push_back(bn_param(bn[k], p.x, k < 8 ? f_int : 1, bn_names[k / 4]));
    EmcadLgagArgs& a = p.args;
    a = EmcadLgagArgs{};
    a.n = p.x.size(0);
    a.h = p.x.size(2);
    a.w = p.x.size(3);
    a.cg = p.g.size(1);
    a.cx = p.x.size(1);
    a.f_int = f_int;
    fill_strides(a.g_stride, p.g);
    fill_strides(a.x_stride, p.x);
    a.groups = static_cast<int32_t>(groups);
    a.ksize = static_cast<int32_t>(wg.size(-1));
    TORCH_CHECK(wg.size(1) * groups == a.cg && wx.size(1) * groups == a.cx && wx.size(-1) == wg.size(-1),
                "emcad_kernels cuda backend: grouped conv weights do not match the channels and groups");
    a.dtype = dtype_code(p.x.scalar_type());
    a.act = activation_code(activation);
    a.training = training ? 1 : 0;
    a.add_gate_input = add_gate_input ? 1 : 0;
    a.eps = eps;
    a.g = p.g.data_ptr();
    a.x = p.x.data_ptr();
    a.wg = p.params[0].data_ptr();
    a.bg = p.params[1].data_ptr();
    a.wx = p.params[2].data_ptr();
    a.bx = p.params[3].data_ptr();
    a.wpsi = p.params[4].data_ptr();
    a.bpsi = p.params[5].data_ptr();
    for (int k = 0; k < 4; ++k) {
        a.bn_g[k] = p.bn[k].data_ptr();
        a.bn_x[k] = p.bn[4 + k].data_ptr();
        a.bn_psi[k] = p.bn[8 + k].data_ptr();
    }
    const char* why = emcad_lgag_check(&a);
    TORCH_CHECK(why == nullptr, "emcad_kernels cuda backend: ", why == nullptr ? "" : why);
    return p;
}

// returns (out, mean_g, var_g, mean_x, var_x, mean_psi, var_psi)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lgag_fwd(
    const Tensor& g, const Tensor& x, const Tensor& wg, const Tensor& bg, const Tensor& wx, const Tensor& bx,
    const Tensor& wpsi, const Tensor& bpsi, const Tensor& bn_g_weight, const Tensor& bn_g_bias, const Tensor& mean_g,
    const Tensor& var_g, const Tensor& bn_x_weight, const Tensor& bn_x_bias, const Tensor& mean_x, const Tensor& var_x,
    const Tensor& bn_psi_weight, const Tensor& bn_psi_bias, const Tensor& mean_psi, const Tensor& var_psi,
    bool training, double eps, int64_t groups, c10::string_view activation, bool add_gate_input) {
    EMCAD_DEVICE_GUARD(x);
    const std::vector<Tensor> bn{bn_g_weight, bn_g_bias,   mean_g,        var_g,       bn_x_weight, bn_x_bias,
                                 mean_x,      var_x,       bn_psi_weight, bn_psi_bias, mean_psi,    var_psi};
    LgagPrepared p =
        lgag_prepare(g, x, wg, bg, wx, bx, wpsi, bpsi, bn, training, eps, groups, activation, add_gate_input);
    EmcadLgagArgs& a = p.args;
    Tensor out = at::empty_like(p.x, p.x.options(), out_format(p.x));
    const auto acc = p.x.options().dtype(acc_type(p.x.scalar_type()));
    std::vector<Tensor> result{out};
    for (int k = 0; k < 6; ++k) {
        result.push_back(at::empty({k < 4 ? a.f_int : 1}, acc));
        a.save_stats[k] = result.back().data_ptr();
    }
    fill_strides(a.out_stride, out);
    a.out = out.data_ptr();
    const size_t bytes = emcad_lgag_forward_scratch_bytes(&a);
    Tensor scratch = scratch_for(bytes, p.x);
    a.scratch = scratch.data_ptr();
    a.scratch_bytes = bytes;
    check_launch(emcad_lgag_forward(&a, EMCAD_CURRENT_STREAM), "grouped_attention_gate forward");
    return {result[0], result[1], result[2], result[3], result[4], result[5], result[6]};
}

// save_stats: the 6 forward statistics.
// returns grads of (g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g w, b, bn_x w, b, bn_psi w, b)
std::vector<Tensor> lgag_bwd(const Tensor& grad, const Tensor& g, const Tensor& x, const Tensor& wg, const Tensor& bg,
                             const Tensor& wx, const Tensor& bx, const Tensor& wpsi, const Tensor& bpsi,
                             const Tensor& bn_g_weight, const Tensor& bn_g_bias, const Tensor& bn_x_weight,
                             const Tensor& bn_x_bias, const Tensor& bn_psi_weight, const Tensor& bn_psi_bias,
                             at::TensorList save_stats, bool training, double eps, int64_t groups,
                             c10::string_view activation, bool add_gate_input) {
    EMCAD_DEVICE_GUARD(x);
    TORCH_CHECK(save_stats.size() == 6, "emcad_kernels cuda backend: expected 6 statistics, got ", save_stats.size());
    const Tensor bn_weights[6] = {bn_g_weight, bn_g_bias, bn_x_weight, bn_x_bias, bn_psi_weight, bn_psi_bias};
    std::vector<Tensor> bn;
    for (int k = 0; k < 3; ++k) {
        bn.push_back(bn_weights[2 * k]);
        bn.push_back(bn_weights[2 * k + 1]);
        bn.push_back(save_stats[2 * k]);
        bn.push_back(save_stats[2 * k + 1]);
    }
    LgagPrepared p =
        lgag_prepare(g, x, wg, bg, wx, bx, wpsi, bpsi, bn, training, eps, groups, activation, add_gate_input);
    EmcadLgagArgs& a = p.args;
    check_like(grad, p.x, "grad");
    TORCH_CHECK(grad.sizes() == p.x.sizes(), "emcad_kernels cuda backend: grad has shape ", grad.sizes());
    const Tensor go = grad.contiguous(out_format(p.x));
    Tensor gg = at::empty_like(p.g, p.g.options(), out_format(p.g));
    Tensor gx = at::empty_like(p.x, p.x.options(), out_format(p.x));
    std::vector<ParamGrad> gparams;
    const Tensor* originals[6] = {&wg, &bg, &wx, &bx, &wpsi, &bpsi};
    for (int i = 0; i < 6; ++i) gparams.push_back(param_grad(*originals[i]));
    const auto acc = p.x.options().dtype(acc_type(p.x.scalar_type()));
    std::vector<Tensor> gbn;
    for (int k = 0; k < 6; ++k) {
        gbn.push_back(at::empty({k < 4 ? a.f_int : 1}, acc));
        a.grad_bn[k] = gbn.back().data_ptr();
    }
    fill_strides(a.out_stride, go);
    a.grad_out = go.data_ptr();
    a.grad_g = gg.data_ptr();
    a.grad_x = gx.data_ptr();
    a.grad_wg = gparams[0].buf.data_ptr();
    a.grad_bg = gparams[1].buf.data_ptr();
    a.grad_wx = gparams[2].buf.data_ptr();
    a.grad_bx = gparams[3].buf.data_ptr();
    a.grad_wpsi = gparams[4].buf.data_ptr();
    a.grad_bpsi = gparams[5].buf.data_ptr();
    const size_t bytes = emcad_lgag_backward_scratch_bytes(&a);
    Tensor scratch = scratch_for(bytes, p.x);
    a.scratch = scratch.data_ptr();
    a.scratch_bytes = bytes;
    check_launch(emcad_lgag_backward(&a, EMCAD_CURRENT_STREAM), "grouped_attention_gate backward");
    std::vector<Tensor> out{gg, gx};
    for (auto& t : gparams) {
        t.finish();
        out.push_back(t.out);
    }
    for (int k = 0; k < 6; ++k) out.push_back(cast_like(gbn[k], bn_weights[k]));
    return out;
}

int64_t api_version() { return emcad_cuda_api_version(); }

// The schemas are the op descriptors' (emcad_kernels/ops/<op>.py), shared with the CPU kernels.
void impl_ops(torch::Library& m) {
    m.impl("msdc_fwd", &msdc_fwd);
    m.impl("msdc_bwd", &msdc_bwd);
    m.impl("updw_fwd", &updw_fwd);
    m.impl("updw_bwd", &updw_bwd);
    m.impl("lgag_fwd", &lgag_fwd);
    m.impl("lgag_bwd", &lgag_bwd);
}

}  // namespace

#ifdef EMCAD_CUDA_EMULATE
TORCH_LIBRARY_IMPL(emcad_kernels_emu, CPU, m) { impl_ops(m); }
#else
TORCH_LIBRARY_IMPL(emcad_kernels, CUDA, m) { impl_ops(m); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "emcad_kernels CUDA kernels for the ops torch.ops.emcad_kernels.<op>_fwd / <op>_bwd";
    m.def("api_version", &api_version, "version of the C launcher API");
}
