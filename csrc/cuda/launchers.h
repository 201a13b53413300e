/* C launcher API of the pure-CUDA kernels in csrc/cuda (no torch types).
 *
 * The binding (torch_binding.cpp) fills one argument struct per call with raw pointers, sizes and element strides,
 * asks for the scratch size, allocates the scratch through the PyTorch caching allocator and calls the launcher on
 * the current stream. Launchers never allocate, never synchronise with the host and never exit: they return a
 * cudaError_t (cudaErrorInvalidValue for arguments they do not support; emcad_*_check() says why).
 *
 * Conventions shared by all ops:
 * - tensor strides are in elements, in the order (n, c, h, w); any strides work, the channels-last fast path
 *   (128-bit vector loads/stores) is taken when the channel stride is 1 and sizes/pointers are 16-byte aligned;
 * - "acc" dtype = float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs; BatchNorm
 *   parameters, statistics and BatchNorm gradients are in the acc dtype, contiguous, one value per channel;
 * - conv weights, biases and their gradients have the input dtype and are contiguous;
 * - forward: mean/var are the running statistics (used when training == 0, ignored otherwise); save_mean/save_var
 *   receive the statistics used (batch mean and biased variance in training, copies of mean/var otherwise);
 *   backward: mean/var are the statistics returned by the forward;
 * - the kernels are deterministic: no floating-point atomics, fixed-order reductions; the reduction partition
 *   depends only on the problem sizes.
 *
 * This header is C-compatible (the struct layouts are mirrored with ctypes by the CPU emulation tests).
 */
#ifndef EMCAD_CUDA_LAUNCHERS_H_
#define EMCAD_CUDA_LAUNCHERS_H_

#include <stddef.h>
#include <stdint.h>

/* EmcadDType, EmcadActivation (relative path: the binding is also compiled with only csrc/cuda on the include
 * path) */
#include "../common/codes.h"

#ifdef EMCAD_CUDA_EMULATE
#include "cuda_emulation.cuh"
#else
#include <cuda_runtime_api.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* multi_scale_dwconv: nb depthwise convs (odd k <= 7, stride 1, padding k//2) on the same input, each followed by
 * BatchNorm and the activation; summed (concat == 0) or concatenated, then channel-shuffled (shuffle_groups > 0). */
typedef struct EmcadMsdcArgs {
    int64_t n, c, h, w;     /* input (and output) batch, channels, height, width */
    int64_t x_stride[4];    /* x and grad_x */
    int64_t y_stride[4];    /* y and grad_y (channels: c, or nb*c with concat) */
    int32_t nb;             /* branches, 1..4 */
    int32_t ksize[4];       /* kernel size of each branch */
    int32_t dtype;          /* EmcadDType of x, weights, y */
    int32_t act;            /* EmcadActivation */
    int32_t concat;
    int32_t shuffle_groups; /* 0: no shuffle */
    int32_t training;       /* 1: normalise with batch statistics */
    int32_t reserved;
    double eps;
    const void* x;
    const void* weight[4];  /* [c, 1, k, k] each */
    const void* bn_weight;  /* [nb, c] acc dtype */
    const void* bn_bias;    /* [nb, c] */
    const void* mean;       /* [nb, c] */
    const void* var;        /* [nb, c] */
    void* y;                /* forward output */
    void* save_mean;        /* [nb, c] forward output */
    void* save_var;         /* [nb, c] forward output */
    const void* grad_y;     /* backward input, strides y_stride */
    void* grad_x;           /* backward output, strides x_stride */
    void* grad_weight[4];   /* backward outputs [c, 1, k, k] */
    void* grad_bn_weight;   /* backward output [nb, c] acc dtype */
    void* grad_bn_bias;     /* backward output [nb, c] acc dtype */
    void* scratch;
    size_t scratch_bytes;
} EmcadMsdcArgs;

/* upsample_dwconv: nearest x2 upsampling, depthwise 3x3 (padding 1), BatchNorm, activation; computed as four 2x2
 * polyphase stencils on the low-resolution input. */
typedef struct EmcadUpdwArgs {
    int64_t n, c, h, w;     /* low-resolution input; the output is n x c x (scale*h) x (scale*w) */
    int64_t x_stride[4];    /* x and grad_x */
    int64_t y_stride[4];    /* y and grad_y */
    int32_t ksize;          /* 3 */
    int32_t scale;          /* 2 */
    int32_t mode;           /* 0: nearest */
    int32_t dtype;
    int32_t act;
    int32_t training;
    double eps;
    const void* x;
    const void* weight;     /* [c, 1, k, k] */
    const void* bn_weight;  /* [c] acc dtype */
    const void* bn_bias;
    const void* mean;
    const void* var;
    void* y;
    void* save_mean;
    void* save_var;
    const void* grad_y;
    void* grad_x;
    void* grad_weight;
    void* grad_bn_weight;   /* acc dtype */
    void* grad_bn_bias;     /* acc dtype */
    void* scratch;
    size_t scratch_bytes;
} EmcadUpdwArgs;

/* grouped_attention_gate (LGAG): zg = gconv(g, wg) + bg, zx = gconv(x, wx) + bx (k x k, padding k//2, `groups`
 * groups with one output channel each: f_int == groups), h = act(BN_g(zg) + BN_x(zx)),
 * psi = sigmoid(BN_psi(wpsi . h + bpsi)), out = x * psi (+ g when add_gate_input). */
typedef struct EmcadLgagArgs {
    int64_t n, h, w;
    int64_t cg, cx, f_int;  /* channels of g, of x, and of the gate (f_int == groups) */
    int64_t g_stride[4];    /* g and grad_g */
    int64_t x_stride[4];    /* x and grad_x */
    int64_t out_stride[4];  /* out and grad_out (shape of x) */
    int32_t groups;
    int32_t ksize;          /* 3 */
    int32_t dtype;
    int32_t act;
    int32_t training;
    int32_t add_gate_input;
    double eps;
    const void* g;
    const void* x;
    const void* wg;         /* [f_int, cg/groups, k, k] */
    const void* bg;         /* [f_int] */
    const void* wx;         /* [f_int, cx/groups, k, k] */
    const void* bx;         /* [f_int] */
    const void* wpsi;       /* [1, f_int, 1, 1] */
    const void* bpsi;       /* [1] */
    const void* bn_g[4];    /* weight, bias, mean, var: [f_int] acc dtype */
    const void* bn_x[4];    /* [f_int] */
    const void* bn_psi[4];  /* [1] */
    void* out;
    void* save_stats[6];    /* mean_g, var_g, mean_x, var_x ([f_int]), mean_psi, var_psi ([1]); acc dtype */
    const void* grad_out;
    void* grad_g;
    void* grad_x;
    void* grad_wg;
    void* grad_bg;
    void* grad_wx;
    void* grad_bx;
    void* grad_wpsi;
    void* grad_bpsi;
    void* grad_bn[6];       /* bn_g weight, bias, bn_x weight, bias, bn_psi weight, bias; acc dtype */
    void* scratch;
    size_t scratch_bytes;
} EmcadLgagArgs;

/* NULL if the launchers support the arguments, otherwise a static string saying why not. */
const char* emcad_msdc_check(const EmcadMsdcArgs* args);
const char* emcad_updw_check(const EmcadUpdwArgs* args);
const char* emcad_lgag_check(const EmcadLgagArgs* args);

/* Scratch bytes the launcher needs (0 if the arguments are not supported). Pointers in args are not read. */
size_t emcad_msdc_forward_scratch_bytes(const EmcadMsdcArgs* args);
size_t emcad_msdc_backward_scratch_bytes(const EmcadMsdcArgs* args);
size_t emcad_updw_forward_scratch_bytes(const EmcadUpdwArgs* args);
size_t emcad_updw_backward_scratch_bytes(const EmcadUpdwArgs* args);
size_t emcad_lgag_forward_scratch_bytes(const EmcadLgagArgs* args);
size_t emcad_lgag_backward_scratch_bytes(const EmcadLgagArgs* args);

/* Enqueue the whole op (all its kernels) on `stream`. */
cudaError_t emcad_msdc_forward(const EmcadMsdcArgs* args, cudaStream_t stream);
cudaError_t emcad_msdc_backward(const EmcadMsdcArgs* args, cudaStream_t stream);
cudaError_t emcad_updw_forward(const EmcadUpdwArgs* args, cudaStream_t stream);
cudaError_t emcad_updw_backward(const EmcadUpdwArgs* args, cudaStream_t stream);
cudaError_t emcad_lgag_forward(const EmcadLgagArgs* args, cudaStream_t stream);
cudaError_t emcad_lgag_backward(const EmcadLgagArgs* args, cudaStream_t stream);

/* sizeof of the three argument structs, for ABI checks of the ctypes mirrors */
size_t emcad_cuda_args_sizeof(int which);
/* version of this C API */
int emcad_cuda_api_version(void);

#ifdef __cplusplus
}
#endif

#endif /* EMCAD_CUDA_LAUNCHERS_H_ */
