// The CPU kernels of every op compiled for AVX2 + FMA, chosen at run time on CPUs that have them (isa_target.h).
#define EMCAD_ISA_AVX2 1
#include "cpu/isa_target.h"
