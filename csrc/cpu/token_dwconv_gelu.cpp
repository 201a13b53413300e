// token_dwconv_gelu on CPU: PVTv2's Mix-FFN middle, y = GELU(dwconv3x3(x) + bias), on (N, H*W, C) tokens, forward
// and backward (semantics: emcad_kernels/reference.py, token_dwconv_gelu_forward / _backward).
//
// The tokens are an NHWC map already, so the kernels read them in place, vectorised over the contiguous channels:
// the forward reads x once and writes y once (the plain module transposes to NCHW, convolves, transposes back and
// runs GELU: four passes). The backward recomputes z from x (the op saves only its inputs), streams dz = g GELU'(z)
// through a three-row ring buffer per item and writes dx; the weight and bias gradients are per-item partial rows
// reduced here in item order (bitwise the same for any thread count, no atomics).
//
// Kernels: token_dwconv_gelu_impl.h, compiled once per instruction set with all other CPU kernels
// (isa_<name>.cpp); the build in use follows active_table() (emcad_kernels cpu_set_isa / EMCAD_CPU_ISA).
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/binding_utils.h"

namespace emcad_cpu {

namespace {

struct Setup {
  at::Tensor x;          // contiguous tokens
  at::Tensor w, bias;    // accumulation dtype: [9][C] tap-major, [C]
  int dt = 0;
  int64_t items = 0;
  TdgArgs a;
};

Setup setup(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t height, int64_t width) {
  TORCH_CHECK(x.device().is_cpu(), "emcad_kernels cpu: token_dwconv_gelu: x is on ", x.device(), ", expected cpu");
  TORCH_CHECK(x.dim() == 3, "emcad_kernels cpu: token_dwconv_gelu: x must be 3-D (N, H*W, C), got ", x.sizes());
  Setup s;
  s.dt = dtype_index(x, "token_dwconv_gelu: x");
  const int64_t N = x.size(0), C = x.size(2);
  TORCH_CHECK(height >= 1 && width >= 1 && height * width == x.size(1), "emcad_kernels cpu: token_dwconv_gelu: ",
              "height x width = ", height, " x ", width, " does not match the ", x.size(1), " tokens of x");
  TORCH_CHECK(weight.device().is_cpu() && bias.device().is_cpu(), "emcad_kernels cpu: token_dwconv_gelu: weight "
              "and bias must be cpu tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "emcad_kernels cpu: token_dwconv_gelu: weight and bias must have x's dtype ", x.scalar_type());
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({C, 1, 3, 3}), "emcad_kernels cpu: token_dwconv_gelu: weight must "
              "have shape [", C, ", 1, 3, 3], got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "emcad_kernels cpu: token_dwconv_gelu: bias must have shape [",
              C, "], got ", bias.sizes());
  s.x = x.contiguous();
  const at::ScalarType acc = s.dt == EMCAD_DTYPE_F64 ? at::kDouble : at::kFloat;
  // [C, 1, 3, 3] -> [9][C]: each tap's weights contiguous over the channels
  s.w = weight.reshape({C, 9}).t().to(acc).contiguous();
  s.bias = bias.to(acc).contiguous();
  // items: (n, band of rows), about 32 in all; a function of the shape only
  const int64_t want = std::max<int64_t>(1, (32 + N - 1) / std::max<int64_t>(N, 1));
  const int64_t nb = std::max<int64_t>(1, std::min(height, want));
  const int64_t band = (height + nb - 1) / nb;
  TdgArgs& a = s.a;
  a.x = s.x.data_ptr();
  a.N = N;
  a.H = height;
  a.W = width;
  a.C = C;
  a.band = band;
  a.nbands = (height + band - 1) / band;
  a.w = s.w.data_ptr();
  a.bias = s.bias.data_ptr();
  s.items = C > 0 ? N * a.nbands : 0;
  return s;
}

at::Tensor token_dwconv_gelu_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 int64_t height, int64_t width) {
  Setup s = setup(x, weight, bias, height, width);
  at::Tensor y = at::empty(s.x.sizes(), s.x.options());
  s.a.y = y.data_ptr();
  run_items(active_table().token_dwconv_gelu[s.dt].fwd, s.a, s.items);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_dwconv_gelu_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     const at::Tensor& bias, int64_t height,
                                                                     int64_t width) {
  Setup s = setup(x, weight, bias, height, width);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device().is_cpu(),
              "emcad_kernels cpu: token_dwconv_gelu: grad must match x (", x.sizes(), ", ", x.scalar_type(),
              "), got ", grad.sizes(), ", ", grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  at::Tensor gx = at::empty(s.x.sizes(), s.x.options());
  const int64_t C = s.a.C;
  std::vector<double> part((size_t)(std::max<int64_t>(s.items, 1) * 10 * C));
  s.a.g = g.data_ptr();
  s.a.gx = gx.data_ptr();
  s.a.part = part.data();
  run_items(active_table().token_dwconv_gelu[s.dt].bwd, s.a, s.items);
  // partial rows [items][tap][C] + [items][C] -> weight [C][tap] and bias [C], summed in item order
  const Vec sums = sum_items(part.data(), s.items, 10 * C);
  Vec gw((size_t)(9 * C));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < 9; ++t) gw[c * 9 + t] = sums[t * C + c];
  return {gx, from_host(gw, weight.sizes(), weight.scalar_type()),
          from_host(sums.data() + 9 * C, bias.sizes(), bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("token_dwconv_gelu_fwd", &token_dwconv_gelu_fwd);
  m.impl("token_dwconv_gelu_bwd", &token_dwconv_gelu_bwd);
}

}  // namespace emcad_cpu
