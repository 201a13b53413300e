// Run-time choice of the kernel build for this CPU (the extension is compiled without -march=native; the builds:
// isa_<name>.cpp, isa_target.h); one choice for the kernels of all ops.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

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

// the table of one instruction set
KernelTable make_table(const char* name, void (*fill)(KernelTable&)) {
  KernelTable t{};
  t.name = name;
  fill(t);
  return t;
}

const KernelTable& default_table() {
  static const KernelTable t = make_table("default", isa_default::fill_table);
  return t;
}

#if defined(__x86_64__) && defined(__GNUC__)
const KernelTable& avx2_table() {
  static const KernelTable t = make_table("avx2", isa_avx2::fill_table);
  return t;
}

const KernelTable& avx512_table() {
  static const KernelTable t = make_table("avx512", isa_avx512::fill_table);
  return t;
}
#endif

const KernelTable* table_for(const char* isa) {
  if (std::strcmp(isa, "auto") == 0) isa = cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "default";
  if (std::strcmp(isa, "default") == 0) return &default_table();
#if defined(__x86_64__) && defined(__GNUC__)
  if (std::strcmp(isa, "avx2") == 0) return cpu_has("avx2") ? &avx2_table() : nullptr;
  if (std::strcmp(isa, "avx512") == 0) return cpu_has("avx512") ? &avx512_table() : nullptr;
#endif
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

bool set_active_isa(const char* name) {
  const KernelTable* t = table_for(name);
  if (!t) return false;
  g_active.store(t, std::memory_order_release);
  return true;
}

}  // namespace emcad_cpu
