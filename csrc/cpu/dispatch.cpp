// Run-time choice of the kernel build for this CPU (the extension is compiled without -march=native).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/multidilation.h"

namespace emcad_cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::strcmp(isa, "default") == 0;
}

const KernelTable* table_for(const char* isa) {
  if (std::strcmp(isa, "avx512") == 0) return cpu_has("avx512") ? &isa_avx512::table() : nullptr;
  if (std::strcmp(isa, "avx2") == 0) return cpu_has("avx2") ? &isa_avx2::table() : nullptr;
  if (std::strcmp(isa, "default") == 0) return &isa_default::table();
  if (std::strcmp(isa, "auto") == 0) {
    if (cpu_has("avx512")) return &isa_avx512::table();
    if (cpu_has("avx2")) return &isa_avx2::table();
    return &isa_default::table();
  }
  return nullptr;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& active_table() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    const char* env = std::getenv("EMCAD_CPU_ISA");
    t = env ? table_for(env) : nullptr;
    if (!t) t = table_for("auto");
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

const MdTable& active_md_table() {
  // follows the choice of active_table(), so cpu_set_isa() switches both kernel families
  const char* name = active_table().name;
  if (std::strcmp(name, "avx512") == 0) return isa_avx512::md_table();
  if (std::strcmp(name, "avx2") == 0) return isa_avx2::md_table();
  return isa_default::md_table();
}

bool set_active_isa(const char* name) {
  const KernelTable* t = table_for(name);
  if (!t) return false;
  g_active.store(t, std::memory_order_release);
  return true;
}

}  // namespace emcad_cpu
