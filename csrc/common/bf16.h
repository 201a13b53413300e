// bfloat16 <-> float conversion, bit-exact with c10::BFloat16 (round to nearest even, NaN -> 0x7FC0).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace emcad {

struct bf16 {
  uint16_t bits;
};

EMCAD_INLINE float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

EMCAD_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (f != f) return 0x7FC0;  // NaN
  const uint32_t bias = ((u >> 16) & 1u) + 0x7FFFu;
  return static_cast<uint16_t>((u + bias) >> 16);
}

// storage <-> accumulation type
EMCAD_INLINE float load_val(const float* p) { return *p; }
EMCAD_INLINE double load_val(const double* p) { return *p; }
EMCAD_INLINE float load_val(const bf16* p) { return bf16_to_float(p->bits); }
EMCAD_INLINE void store_val(float* p, float v) { *p = v; }
EMCAD_INLINE void store_val(double* p, double v) { *p = v; }
EMCAD_INLINE void store_val(bf16* p, float v) { p->bits = float_to_bf16(v); }

template <typename S> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

}  // namespace emcad
