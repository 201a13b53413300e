// Helpers shared by the torch bindings of the CPU kernels (the only CPU files that include torch).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/bn.h"
#include "common/torch_codes.h"
#include "cpu/kernels.h"

namespace emcad_cpu {

// the EmcadDType code of t (float32, float64 or bfloat16: the index of the kernel tables)
inline int dtype_index(const at::Tensor& t, const char* name) {
  const int code = emcad::dtype_code(t.scalar_type());
  TORCH_CHECK(code == EMCAD_DTYPE_F32 || code == EMCAD_DTYPE_F64 || code == EMCAD_DTYPE_BF16, "emcad_kernels cpu: ",
              name, " has dtype ", t.scalar_type(), "; supported: float32, float64, bfloat16");
  return code;
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

// the EmcadActivation code of an activation the CPU kernels support (all but gelu)
inline int act_id(c10::string_view s) {
  const int code = emcad::activation_code(s);
  TORCH_CHECK(code >= 0 && code != EMCAD_ACT_GELU, "emcad_kernels cpu: activation ", std::string(s),
              " not supported");
  return code;
}

// number of output pixels of a conv with odd kernel, padding k/2
inline int64_t conv_out(int64_t size, int64_t stride) { return size > 0 ? (size - 1) / stride + 1 : 0; }

template <typename Args, typename Fn>
inline void run_items(Fn fn, const Args& args, int64_t items) {
  TORCH_CHECK(fn != nullptr, "emcad_kernels cpu: kernel not available in this build");
  if (items <= 0) return;
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { fn(args, b, e); });
}

// ---- host-side parameter handling ----------------------------------------------------------------------
// The per-call set-up (BN folding, weight conversion, statistics outputs) works on small host vectors with
// plain loops: done with aten ops it cost 10 to 30 dispatcher calls per fused call (measured with the profiler),
// a large share of the time of a fused op on a small feature map.
using Vec = std::vector<double>;

// float64 copy, in logical (row-major) order, of a small tensor of any floating dtype and any strides (e.g. a
// channels_last conv weight)
inline Vec host_f64(const at::Tensor& t) {
  Vec v(t.numel());
  if (v.empty()) return v;
  if (t.dim() > 4) return host_f64(t.contiguous().view({-1}));
  int64_t size[4] = {1, 1, 1, 1}, stride[4] = {0, 0, 0, 0};
  for (int64_t d = 0, o = 4 - t.dim(); d < t.dim(); ++d) {
    size[o + d] = t.size(d);
    stride[o + d] = t.stride(d);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "host_f64", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    size_t i = 0;
    for (int64_t a = 0; a < size[0]; ++a)
      for (int64_t b = 0; b < size[1]; ++b)
        for (int64_t c = 0; c < size[2]; ++c)
          for (int64_t d = 0; d < size[3]; ++d)
            v[i++] = static_cast<double>(p[a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3]]);
  });
  return v;
}

// a fresh tensor (custom-op outputs must not alias) of `shape` and `dtype` holding v[0, numel)
inline at::Tensor from_host(const double* v, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "from_host", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    const int64_t n = out.numel();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

inline at::Tensor from_host(const Vec& v, at::IntArrayRef shape, at::ScalarType dtype) {
  return from_host(v.data(), shape, dtype);
}

// BN per channel as y = z * scale + shift, with rstd = 1 / sqrt(var + eps)
struct HostBn {
  Vec mean, rstd, scale, shift;
};

inline HostBn host_bn(const Vec& gamma, const Vec& beta, Vec mean, const Vec& var, double eps) {
  HostBn f;
  const size_t n = var.size();
  f.mean = std::move(mean);
  f.rstd.resize(n);
  f.scale.resize(n);
  f.shift.resize(n);
  for (size_t i = 0; i < n; ++i) {
    f.rstd[i] = 1.0 / std::sqrt(var[i] + eps);
    f.scale[i] = gamma[i] * f.rstd[i];
    f.shift[i] = beta[i] - f.mean[i] * f.scale[i];
  }
  return f;
}

// Chan merge of per-item (mean, M2) partials laid out [items][rows] with equal counts, in item order.
// Returns (mean, biased var) per row.
inline std::pair<Vec, Vec> merge_stats(const Vec& p0, const Vec& p1, int64_t items, int64_t rows,
                                       double count_per_item) {
  Vec mean(rows), var(rows);
  for (int64_t r = 0; r < rows; ++r) {
    emcad::Welford acc;
    for (int64_t i = 0; i < items; ++i) acc.merge(count_per_item, p0[i * rows + r], p1[i * rows + r]);
    mean[r] = acc.n > 0 ? acc.mean : std::numeric_limits<double>::quiet_NaN();
    var[r] = acc.n > 0 ? acc.var_biased() : std::numeric_limits<double>::quiet_NaN();
  }
  return {mean, var};
}

// sum over the leading dimension of an [items][rest] buffer, in item order
inline Vec sum_items(const double* p, int64_t items, int64_t rest) {
  Vec out(rest, 0.0);
  for (int64_t i = 0; i < items; ++i)
    for (int64_t r = 0; r < rest; ++r) out[r] += p[i * rest + r];
  return out;
}

}  // namespace emcad_cpu
