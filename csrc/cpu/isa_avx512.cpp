// The CPU kernels of every op compiled for AVX-512 (F/BW/VL/DQ) with 512-bit vectors, chosen at run time on CPUs that have it (isa_target.h).
#define EMCAD_ISA_AVX512 1
#include "cpu/isa_target.h"
