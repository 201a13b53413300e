// The CPU kernels of every op, compiled once per instruction set (isa_target.h), and the run-time choice among
// those builds (dispatch.cpp). Torch-free.
//
// One KernelTable per instruction set holds the kernels of all ops, per storage dtype (indexed by the EmcadDType
// code, common/codes.h); the bindings call active_table().<op>[dtype code].
#pragma once

#include "cpu/kernel_args.h"
#include "cpu/lgag.h"
#include "cpu/mscam.h"
#include "cpu/msdc.h"
#include "cpu/multidilation.h"
#include "cpu/mutation_loss.h"
#include "cpu/token_dwconv_gelu.h"
#include "cpu/updw.h"

namespace emcad_cpu {

struct KernelTable {
  const char* name;  // "default", "avx2", "avx512"
  MsdcKernels msdc[kCpuDTypes];
  UpdwKernels updw[kCpuDTypes];
  LgagKernels lgag[kCpuDTypes];
  LndwKernels lndw[kCpuDTypes];
  DwgnKernels dwgn[kCpuDTypes];
  MscamKernels mscam[kCpuDTypes];
  MlKernels mutation_loss[kCpuDTypes];
  TdgKernels token_dwconv_gelu[kCpuDTypes];
};

// Each fills the kernel entries of the table with the build for its instruction set (isa_<name>.cpp,
// isa_target.h); the avx2 and avx512 builds exist on x86-64 only.
namespace isa_default { void fill_table(KernelTable& t); }
namespace isa_avx2 { void fill_table(KernelTable& t); }
namespace isa_avx512 { void fill_table(KernelTable& t); }

// The table for the best instruction set this CPU supports (override: EMCAD_CPU_ISA=default|avx2|avx512).
const KernelTable& active_table();
// Select by name ("auto", "default", "avx2", "avx512"); returns false if the CPU lacks it.
bool set_active_isa(const char* name);

}  // namespace emcad_cpu
