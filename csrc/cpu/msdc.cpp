// multi_scale_dwconv on CPU: argument checks, allocation, pass orchestration and fixed-order reductions.
// The kernels themselves are in msdc_impl.h (compiled once per instruction set by isa_<name>.cpp).
#include <torch/library.h>

#include "cpu/binding_utils.h"

namespace emcad_cpu {
namespace {

struct MsdcSetup {
  MsdcArgs a;
  Vec w_all;
  int dt = 0;
  int64_t N = 0, items = 0;
};

MsdcSetup setup_msdc(const at::Tensor& x, at::TensorList weights, bool concat, int64_t shuffle_groups,
                     int64_t stride, c10::string_view activation) {
  check_cpu4(x, "x");
  MsdcSetup s;
  s.dt = dtype_index(x, "x");
  MsdcArgs& a = s.a;
  const int64_t nb = (int64_t)weights.size();
  TORCH_CHECK(nb >= 1 && nb <= kMaxBranches, "emcad_kernels cpu: 1 to ", kMaxBranches, " branches supported, got ",
              nb);
  TORCH_CHECK(stride == 1 || stride == 2, "emcad_kernels cpu: stride ", stride, " not supported");
  a.C = (int)x.size(1);
  a.H = (int)x.size(2);
  a.W = (int)x.size(3);
  a.nb = (int)nb;
  a.stride = (int)stride;
  a.Ho = (int)conv_out(a.H, stride);
  a.Wo = (int)conv_out(a.W, stride);
  a.concat = concat ? 1 : 0;
  const int64_t cout = concat ? nb * a.C : a.C;
  TORCH_CHECK(shuffle_groups >= 0 && (shuffle_groups == 0 || cout % shuffle_groups == 0),
              "emcad_kernels cpu: shuffle_groups ", shuffle_groups, " must divide ", cout);
  a.shuffle_groups = shuffle_groups;
  a.act = act_id(activation);
  int64_t off = 0, toff = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const auto& w = weights[b];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == a.C && w.size(1) == 1 && w.size(2) == w.size(3) &&
                    w.size(2) % 2 == 1 && w.size(2) <= kMaxKernel,
                "emcad_kernels cpu: weights[", b, "] must be [C, 1, k, k] with odd k <= 9, got ", w.sizes());
    a.ks[b] = (int)w.size(2);
    a.woff[b] = off;
    a.toff[b] = toff;
    off += w.numel();
    toff += w.size(2) * w.size(2);
    const Vec wb = host_f64(w);
    s.w_all.insert(s.w_all.end(), wb.begin(), wb.end());
  }
  a.taps_total = toff;
  a.w = s.w_all.data();
  a.x = view4(x);
  s.N = x.size(0);
  const int64_t nblocks = (a.C + block_lanes(s.dt) - 1) / block_lanes(s.dt);
  a.group = blocks_per_item(s.N, nblocks);
  s.items = s.N * ((nblocks + a.group - 1) / a.group);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msdc_fwd(const at::Tensor& x, at::TensorList weights,
                                                        const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                        const at::Tensor& mean, const at::Tensor& var, bool training,
                                                        double eps, c10::string_view activation, bool concat,
                                                        int64_t shuffle_groups, int64_t stride) {
  MsdcSetup s = setup_msdc(x, weights, concat, shuffle_groups, stride, activation);
  MsdcArgs& a = s.a;
  const MsdcKernels& kern = active_table().msdc[s.dt];
  const int64_t nb = a.nb, C = a.C;
  const auto sd = stats_dtype(x.scalar_type());
  Vec m64, v64;
  if (training) {
    Vec p0(s.N * nb * C), p1(s.N * nb * C);
    a.p0 = p0.data();
    a.p1 = p1.data();
    run_items(kern.stats, a, s.items);
    std::tie(m64, v64) = merge_stats(p0, p1, s.N, nb * C, (double)a.Ho * a.Wo);
  } else {
    m64 = host_f64(mean);
    v64 = host_f64(var);
  }
  const HostBn bn = host_bn(host_f64(bn_weight), host_f64(bn_bias), m64, v64, eps);
  a.scale = bn.scale.data();
  a.shift = bn.shift.data();
  const int64_t cout = concat ? nb * C : C;
  at::Tensor y = empty_out(x, {s.N, cout, a.Ho, a.Wo});
  a.y = view4(y);
  run_items(kern.apply, a, s.items);
  // eval: copies of the running statistics (custom-op outputs must not alias inputs)
  at::Tensor save_mean = from_host(m64, {nb, C}, sd), save_var = from_host(v64, {nb, C}, sd);
  return {y, save_mean, save_var};
}

std::vector<at::Tensor> msdc_bwd(const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
                                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& save_mean,
                                 const at::Tensor& save_var, bool training, double eps, c10::string_view activation,
                                 bool concat, int64_t shuffle_groups, int64_t stride) {
  MsdcSetup s = setup_msdc(x, weights, concat, shuffle_groups, stride, activation);
  MsdcArgs& a = s.a;
  check_cpu4(grad, "grad");
  const int64_t nb = a.nb, C = a.C;
  const int64_t cout = concat ? nb * C : C;
  TORCH_CHECK(grad.size(0) == s.N && grad.size(1) == cout && grad.size(2) == a.Ho && grad.size(3) == a.Wo,
              "emcad_kernels cpu: grad has shape ", grad.sizes(), ", expected [", s.N, ", ", cout, ", ", a.Ho, ", ",
              a.Wo, "]");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "emcad_kernels cpu: grad dtype ", grad.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const MsdcKernels& kern = active_table().msdc[s.dt];
  const HostBn bn = host_bn(host_f64(bn_weight), host_f64(bn_bias), host_f64(save_mean), host_f64(save_var), eps);
  a.scale = bn.scale.data();
  a.shift = bn.shift.data();
  a.mean = bn.mean.data();
  a.rstd = bn.rstd.data();
  a.g = view4(grad);
  Vec p0(s.N * nb * C, 0.0), p1(s.N * nb * C, 0.0);
  a.p0 = p0.data();
  a.p1 = p1.data();
  Vec s1, s2, c2(nb * C), c3(nb * C);
  const double count = (double)s.N * a.Ho * a.Wo;
  if (training) {
    run_items(kern.bwd_reduce, a, s.items);
    s1 = sum_items(p0.data(), s.N, nb * C);
    s2 = sum_items(p1.data(), s.N, nb * C);
    for (int64_t i = 0; i < nb * C; ++i) {
      c2[i] = -bn.scale[i] * s2[i] / count;
      c3[i] = -bn.scale[i] * s1[i] / count;
    }
    a.c2 = c2.data();
    a.c3 = c3.data();
    a.bn_partials = 0;
  } else {
    a.bn_partials = 1;
  }
  at::Tensor gx = empty_out(x, {s.N, C, a.H, a.W});
  a.gx = view4(gx);
  Vec wpart(s.N * C * a.taps_total, 0.0);
  a.wpart = wpart.data();
  run_items(kern.bwd_grad, a, s.items);
  if (!training) {
    s1 = sum_items(p0.data(), s.N, nb * C);
    s2 = sum_items(p1.data(), s.N, nb * C);
  }
  const Vec wsum = sum_items(wpart.data(), s.N, C * a.taps_total);
  std::vector<at::Tensor> out;
  out.push_back(gx);
  out.push_back(from_host(s2, bn_weight.sizes(), bn_weight.scalar_type()));
  out.push_back(from_host(s1, bn_bias.sizes(), bn_bias.scalar_type()));
  for (int64_t b = 0; b < nb; ++b) {  // wsum is [C][taps of every branch]: gather this branch's taps
    const int64_t kk = (int64_t)a.ks[b] * a.ks[b];
    Vec wb(C * kk);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < kk; ++t) wb[c * kk + t] = wsum[c * a.taps_total + a.toff[b] + t];
    out.push_back(from_host(wb, weights[b].sizes(), weights[b].scalar_type()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("msdc_fwd", &msdc_fwd);
  m.impl("msdc_bwd", &msdc_bwd);
}

}  // namespace emcad_cpu
