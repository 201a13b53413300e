// The CPU kernels of every op compiled for baseline x86-64 (SSE2): runs on any x86-64 CPU (isa_target.h).
#define EMCAD_ISA_DEFAULT 1
#include "cpu/isa_target.h"
