/* The integer codes by which the bindings tell the kernels which activation and which storage dtype to use,
 * shared by the CPU kernels (csrc/cpu), the CUDA kernels and their C launcher API (csrc/cuda/launchers.h) and,
 * by value, the Triton kernels (emcad_kernels/triton/_utils.py ACTIVATION_CODES; tests/test_native_codes.py
 * checks that the Python tables match this file).
 *
 * Plain C: no includes, usable from C, C++, CUDA and the CPU emulation of the CUDA kernels. The CPU kernel
 * tables are indexed by the dtype code, so float32, float64 and bfloat16 must stay 0, 1, 2.
 */
#ifndef EMCAD_COMMON_CODES_H_
#define EMCAD_COMMON_CODES_H_

/* the names of emcad_kernels.ACTIVATIONS */
enum EmcadActivation {
    EMCAD_ACT_IDENTITY = 0,
    EMCAD_ACT_RELU = 1,
    EMCAD_ACT_RELU6 = 2,
    EMCAD_ACT_LEAKYRELU = 3, /* negative slope EMCAD_LEAKY_SLOPE */
    EMCAD_ACT_HSWISH = 4,
    EMCAD_ACT_GELU = 5       /* exact (erf); not in the CPU kernels */
};
#define EMCAD_ACT_COUNT 6 /* codes are 0 .. EMCAD_ACT_COUNT - 1 */

/* negative slope of leakyrelu (EMCAD's nn.LeakyReLU(0.2)); converted to the compute type like a PyTorch scalar */
#define EMCAD_LEAKY_SLOPE 0.2

enum EmcadDType {
    EMCAD_DTYPE_F32 = 0,
    EMCAD_DTYPE_F64 = 1,
    EMCAD_DTYPE_BF16 = 2,
    EMCAD_DTYPE_F16 = 3 /* not in the CPU kernels */
};
#define EMCAD_DTYPE_COUNT 4 /* codes are 0 .. EMCAD_DTYPE_COUNT - 1 */

#endif /* EMCAD_COMMON_CODES_H_ */
