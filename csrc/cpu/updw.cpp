// upsample_dwconv on CPU: argument checks, allocation, pass orchestration and fixed-order reductions.
// The kernels are in updw_impl.h (compiled once per instruction set by isa_<name>.cpp).
#include <torch/library.h>

#include "cpu/binding_utils.h"

namespace emcad_cpu {
namespace {

struct UpdwSetup {
  UpdwArgs a;
  Vec w64;
  int dt = 0;
  int64_t N = 0, items = 0;
};

UpdwSetup setup_updw(const at::Tensor& x, const at::Tensor& weight, c10::string_view mode,
                     c10::string_view activation, int64_t scale) {
  check_cpu4(x, "x");
  UpdwSetup s;
  s.dt = dtype_index(x, "x");
  UpdwArgs& a = s.a;
  a.C = (int)x.size(1);
  a.H = (int)x.size(2);
  a.W = (int)x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == a.C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1 && weight.size(2) <= kMaxKernel,
              "emcad_kernels cpu: weight must be [C, 1, k, k] with odd k <= 9, got ", weight.sizes());
  a.k = (int)weight.size(2);
  TORCH_CHECK(mode == "nearest" || mode == "bilinear", "emcad_kernels cpu: mode ", std::string(mode),
              " not supported");
  a.bilinear = mode == "bilinear";
  if (a.bilinear) {
    TORCH_CHECK(scale == 2, "emcad_kernels cpu: bilinear scale ", scale, " not supported (only 2)");
  } else {
    TORCH_CHECK(scale >= 1 && scale <= 4, "emcad_kernels cpu: nearest scale ", scale, " not supported (1 to 4)");
  }
  a.S = (int)scale;
  a.Ho = a.H * a.S;
  a.Wo = a.W * a.S;
  a.act = act_id(activation);
  s.w64 = host_f64(weight);  // [C][k*k]
  a.w = s.w64.data();
  a.x = view4(x);
  s.N = x.size(0);
  const int64_t nblocks = (a.C + block_lanes(s.dt) - 1) / block_lanes(s.dt);
  a.group = blocks_per_item(s.N, nblocks);
  s.items = s.N * ((nblocks + a.group - 1) / a.group);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> updw_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                        const at::Tensor& mean, const at::Tensor& var, bool training,
                                                        double eps, c10::string_view mode,
                                                        c10::string_view activation, int64_t scale) {
  UpdwSetup s = setup_updw(x, weight, mode, activation, scale);
  UpdwArgs& a = s.a;
  const UpdwKernels& kern = active_table().updw[s.dt];
  const int64_t C = a.C;
  const auto sd = stats_dtype(x.scalar_type());
  Vec m64, v64;
  if (training) {
    Vec p0(s.N * C), p1(s.N * C);
    a.p0 = p0.data();
    a.p1 = p1.data();
    run_items(kern.stats, a, s.items);
    std::tie(m64, v64) = merge_stats(p0, p1, s.N, C, (double)a.Ho * a.Wo);
  } else {
    m64 = host_f64(mean);
    v64 = host_f64(var);
  }
  const HostBn bn = host_bn(host_f64(bn_weight), host_f64(bn_bias), m64, v64, eps);
  a.scale = bn.scale.data();
  a.shift = bn.shift.data();
  at::Tensor y = empty_out(x, {s.N, C, a.Ho, a.Wo});
  a.y = view4(y);
  run_items(kern.apply, a, s.items);
  // eval: copies of the running statistics (custom-op outputs must not alias inputs)
  at::Tensor save_mean = from_host(m64, {C}, sd), save_var = from_host(v64, {C}, sd);
  return {y, save_mean, save_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> updw_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& save_mean, const at::Tensor& save_var, bool training, double eps,
    c10::string_view mode, c10::string_view activation, int64_t scale) {
  UpdwSetup s = setup_updw(x, weight, mode, activation, scale);
  UpdwArgs& a = s.a;
  check_cpu4(grad, "grad");
  TORCH_CHECK(grad.size(0) == s.N && grad.size(1) == a.C && grad.size(2) == a.Ho && grad.size(3) == a.Wo,
              "emcad_kernels cpu: grad has shape ", grad.sizes(), ", expected [", s.N, ", ", a.C, ", ", a.Ho, ", ",
              a.Wo, "]");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "emcad_kernels cpu: grad dtype ", grad.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const UpdwKernels& kern = active_table().updw[s.dt];
  const int64_t C = a.C;
  const HostBn bn = host_bn(host_f64(bn_weight), host_f64(bn_bias), host_f64(save_mean), host_f64(save_var), eps);
  a.scale = bn.scale.data();
  a.shift = bn.shift.data();
  a.mean = bn.mean.data();
  a.rstd = bn.rstd.data();
  a.g = view4(grad);
  Vec p0(s.N * C, 0.0), p1(s.N * C, 0.0);
  a.p0 = p0.data();
  a.p1 = p1.data();
  Vec s1, s2, c2(C), c3(C);
  const double count = (double)s.N * a.Ho * a.Wo;
  if (training) {
    run_items(kern.bwd_reduce, a, s.items);
    s1 = sum_items(p0.data(), s.N, C);
    s2 = sum_items(p1.data(), s.N, C);
    for (int64_t i = 0; i < C; ++i) {
      c2[i] = -bn.scale[i] * s2[i] / count;
      c3[i] = -bn.scale[i] * s1[i] / count;
    }
    a.c2 = c2.data();
    a.c3 = c3.data();
  } else {
    a.bn_partials = 1;
  }
  at::Tensor gx = empty_out(x, {s.N, C, a.H, a.W});
  a.gx = view4(gx);
  Vec wpart(s.N * C * a.k * a.k, 0.0);
  a.wpart = wpart.data();
  run_items(kern.bwd_grad, a, s.items);
  if (!training) {
    s1 = sum_items(p0.data(), s.N, C);
    s2 = sum_items(p1.data(), s.N, C);
  }
  auto gw = from_host(sum_items(wpart.data(), s.N, C * a.k * a.k), weight.sizes(), weight.scalar_type());
  return {gx, gw, from_host(s2, bn_weight.sizes(), bn_weight.scalar_type()),
          from_host(s1, bn_bias.sizes(), bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("updw_fwd", &updw_fwd);
  m.impl("updw_bwd", &updw_bwd);
}

}  // namespace emcad_cpu
