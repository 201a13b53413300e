// upsample_dwconv on CPU: argument checks, allocation, pass orchestration and fixed-order reductions.
#include <torch/library.h>

#include "cpu/binding_utils.h"

namespace emcad_cpu {
namespace {

struct UpdwSetup {
  UpdwArgs a;
  at::Tensor w64;
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
  s.w64 = f64(weight).view({a.C, a.k * a.k}).contiguous();
  a.w = s.w64.data_ptr<double>();
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
  const KernelTable& kt = active_table();
  const int64_t C = a.C;
  const auto sd = stats_dtype(x.scalar_type());
  at::Tensor m64, v64;
  if (training) {
    auto p0 = at::empty({s.N, C}, at::kDouble), p1 = at::empty({s.N, C}, at::kDouble);
    a.p0 = p0.data_ptr<double>();
    a.p1 = p1.data_ptr<double>();
    run_items(kt.updw_stats[s.dt], a, s.items);
    std::tie(m64, v64) = merge_stats(p0, p1, s.N, C, (double)a.Ho * a.Wo);
  } else {
    m64 = f64(mean);
    v64 = f64(var);
  }
  auto rstd = (v64 + eps).rsqrt();
  auto sc = (f64(bn_weight) * rstd).contiguous();
  auto sh = (f64(bn_bias) - m64 * sc).contiguous();
  a.scale = sc.data_ptr<double>();
  a.shift = sh.data_ptr<double>();
  at::Tensor y = empty_out(x, {s.N, C, a.Ho, a.Wo});
  a.y = view4(y);
  run_items(kt.updw_apply[s.dt], a, s.items);
  at::Tensor save_mean, save_var;
  if (training) {
    save_mean = m64.to(sd).contiguous();
    save_var = v64.to(sd).contiguous();
  } else {
    save_mean = mean.to(sd, false, true).contiguous();
    save_var = var.to(sd, false, true).contiguous();
  }
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
  const KernelTable& kt = active_table();
  const int64_t C = a.C;
  auto m64 = f64(save_mean);
  auto rstd = (f64(save_var) + eps).rsqrt().contiguous();
  auto sc = (f64(bn_weight) * rstd).contiguous();
  auto sh = (f64(bn_bias) - m64 * sc).contiguous();
  a.scale = sc.data_ptr<double>();
  a.shift = sh.data_ptr<double>();
  a.mean = m64.data_ptr<double>();
  a.rstd = rstd.data_ptr<double>();
  a.g = view4(grad);
  auto p0 = at::zeros({s.N, C}, at::kDouble), p1 = at::zeros({s.N, C}, at::kDouble);
  a.p0 = p0.data_ptr<double>();
  a.p1 = p1.data_ptr<double>();
  at::Tensor s1, s2, c2, c3;
  const double count = (double)s.N * a.Ho * a.Wo;
  if (training) {
    run_items(kt.updw_bwd_reduce[s.dt], a, s.items);
    s1 = sum_items(p0, s.N, {C});
    s2 = sum_items(p1, s.N, {C});
    c2 = (-sc * s2 / count).contiguous();
    c3 = (-sc * s1 / count).contiguous();
    a.c2 = c2.data_ptr<double>();
    a.c3 = c3.data_ptr<double>();
  } else {
    a.bn_partials = 1;
  }
  at::Tensor gx = empty_out(x, {s.N, C, a.H, a.W});
  a.gx = view4(gx);
  auto wpart = at::zeros({s.N, C, (int64_t)a.k * a.k}, at::kDouble);
  a.wpart = wpart.data_ptr<double>();
  run_items(kt.updw_bwd_grad[s.dt], a, s.items);
  if (!training) {
    s1 = sum_items(p0, s.N, {C});
    s2 = sum_items(p1, s.N, {C});
  }
  auto gw = sum_items(wpart, s.N, {C, (int64_t)a.k * a.k}).view({C, 1, a.k, a.k}).to(weight.scalar_type());
  return {gx, gw, s2.to(bn_weight.scalar_type()), s1.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("updw_fwd_cpu_kernel", &updw_fwd);
  m.impl("updw_bwd_cpu_kernel", &updw_bwd);
}

}  // namespace emcad_cpu
