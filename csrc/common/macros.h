// Function attributes of the torch-free helpers in csrc/common (used by the CPU kernels; under nvcc they would be
// host-device functions).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EMCAD_HD __host__ __device__
#define EMCAD_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define EMCAD_HD
#define EMCAD_INLINE inline __attribute__((always_inline))
#else
#define EMCAD_HD
#define EMCAD_INLINE inline
#endif
