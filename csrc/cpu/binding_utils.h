// Helpers shared by the torch bindings of the CPU kernels (the only CPU files that include torch).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/string_view.h>

#include <string>

#include "common/activations.h"
#include "common/bn.h"
#include "cpu/kernels.h"

namespace emcad_cpu {

inline int dtype_index(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    default:
      TORCH_CHECK(false, "emcad_kernels cpu: ", name, " has dtype ", t.scalar_type(),
                  "; supported: float32, float64, bfloat16");
  }
  return kF32;
}

inline void check_cpu4(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "emcad_kernels cpu: ", name, " is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.dim() == 4, "emcad_kernels cpu: ", name, " must be 4-D, got ", t.sizes());
}

inline View4 view4(const at::Tensor& t) {
  View4 v;
  v.data = const_cast<void*>(t.data_ptr());
  v.n = t.size(0); v.c = t.size(1); v.h = t.size(2); v.w = t.size(3);
  v.sn = t.stride(0); v.sc = t.stride(1); v.sh = t.stride(2); v.sw = t.stride(3);
  return v;
}

// reference.output_memory_format: channels_last only if x is unambiguously channels_last
inline at::MemoryFormat out_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline at::Tensor empty_out(const at::Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().memory_format(out_format(x)));
}

inline at::ScalarType stats_dtype(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

inline at::Tensor f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

inline int act_id(c10::string_view s) {
  if (s == "identity") return emcad::kIdentity;
  if (s == "relu") return emcad::kRelu;
  if (s == "relu6") return emcad::kRelu6;
  if (s == "leakyrelu") return emcad::kLeakyRelu;
  if (s == "hswish") return emcad::kHardswish;
  TORCH_CHECK(false, "emcad_kernels cpu: activation ", std::string(s), " not supported");
  return 0;
}

// number of output pixels of a conv with odd kernel, padding k/2
inline int64_t conv_out(int64_t size, int64_t stride) { return size > 0 ? (size - 1) / stride + 1 : 0; }

template <typename Args, typename Fn>
inline void run_items(Fn fn, const Args& args, int64_t items) {
  TORCH_CHECK(fn != nullptr, "emcad_kernels cpu: kernel not available in this build");
  if (items <= 0) return;
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { fn(args, b, e); });
}

// Chan merge of per-item (mean, M2) partials laid out [items][rows] with equal counts, in item order.
// Returns (mean, biased var) per row, as double tensors.
inline std::pair<at::Tensor, at::Tensor> merge_stats(const at::Tensor& p0, const at::Tensor& p1, int64_t items,
                                                     int64_t rows, double count_per_item) {
  auto mean = at::empty({rows}, at::kDouble), var = at::empty({rows}, at::kDouble);
  const double* m = p0.data_ptr<double>();
  const double* q = p1.data_ptr<double>();
  double* om = mean.data_ptr<double>();
  double* ov = var.data_ptr<double>();
  for (int64_t r = 0; r < rows; ++r) {
    emcad::Welford acc;
    for (int64_t i = 0; i < items; ++i) acc.merge(count_per_item, m[i * rows + r], q[i * rows + r]);
    om[r] = acc.n > 0 ? acc.mean : std::numeric_limits<double>::quiet_NaN();
    ov[r] = acc.n > 0 ? acc.var_biased() : std::numeric_limits<double>::quiet_NaN();
  }
  return {mean, var};
}

// sum over the leading dimension of a [items][rest...] double tensor, in item order
inline at::Tensor sum_items(const at::Tensor& p, int64_t items, at::IntArrayRef shape) {
  int64_t rest = 1;
  for (auto s : shape) rest *= s;
  auto out = at::zeros(shape, at::kDouble);
  double* o = out.data_ptr<double>();
  const double* src = p.data_ptr<double>();
  for (int64_t i = 0; i < items; ++i)
    for (int64_t r = 0; r < rest; ++r) o[r] += src[i * rest + r];
  return out;
}

}  // namespace emcad_cpu
