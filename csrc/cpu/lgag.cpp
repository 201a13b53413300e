// grouped_attention_gate on CPU: argument checks, allocation, pass orchestration and fixed-order reductions.
//
// Passes (kernels in lgag_impl.h, compiled once per instruction set by isa_<name>.cpp):
//   eval forward:   one row pass (both grouped convs, BN, add, activation, 1x1 psi, BN, sigmoid, x*psi (+g)).
//   train forward:  block pass (statistics of both grouped convs), row pass (psi logits and their statistics
//                   into a one-channel scratch), row pass (x*psi (+g)).
//   backward:       row pass (dL/d psi-logit and psi BN sums), [train: block pass (grouped-conv BN sums)],
//                   block pass (input and weight gradients). Only the inputs and per-channel statistics are
//                   saved; everything else is recomputed. Scratch: two doubles per pixel (not per channel).
#include <torch/library.h>

#include "cpu/binding_utils.h"

namespace emcad_cpu {
namespace {

constexpr int kMaxOutPerGroup = 8;
constexpr int kBand = 8;

double scalar(const at::Tensor& t) { return host_f64(t).at(0); }

struct LgagSetup {
  LgagArgs a;
  Vec wg64, wx64, bg64, bx64, wpsi64;
  int dt = 0;
  int64_t N = 0, row_items = 0, block_items = 0, nbands = 0, nblk = 0;
};

LgagSetup setup_lgag(const at::Tensor& g, const at::Tensor& x, const at::Tensor& wg, const at::Tensor& bg,
                     const at::Tensor& wx, const at::Tensor& bx, const at::Tensor& wpsi, const at::Tensor& bpsi,
                     int64_t groups, c10::string_view activation, bool add_gate_input) {
  check_cpu4(g, "g");
  check_cpu4(x, "x");
  LgagSetup s;
  s.dt = dtype_index(x, "x");
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "emcad_kernels cpu: g and x dtypes differ");
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(2) == x.size(2) && g.size(3) == x.size(3),
              "emcad_kernels cpu: g and x must have the same batch and spatial size");
  LgagArgs& a = s.a;
  a.Fg = (int)g.size(1);
  a.Fl = (int)x.size(1);
  a.Fi = (int)wg.size(0);
  a.H = (int)x.size(2);
  a.W = (int)x.size(3);
  TORCH_CHECK(groups >= 1 && a.Fg % groups == 0 && a.Fl % groups == 0 && a.Fi % groups == 0,
              "emcad_kernels cpu: groups ", groups, " must divide the channels");
  a.groups = (int)groups;
  a.og = (int)(a.Fi / groups);
  a.jg = (int)(a.Fg / groups);
  a.jx = (int)(a.Fl / groups);
  TORCH_CHECK(a.og <= kMaxOutPerGroup, "emcad_kernels cpu: at most ", kMaxOutPerGroup,
              " output channels per group supported, got ", a.og);
  TORCH_CHECK(wg.dim() == 4 && wg.size(1) == a.jg && wg.size(2) == wg.size(3) && wg.size(2) % 2 == 1 &&
                  wg.size(2) <= kMaxKernel,
              "emcad_kernels cpu: wg has shape ", wg.sizes());
  a.k = (int)wg.size(2);
  TORCH_CHECK(wx.dim() == 4 && wx.size(0) == a.Fi && wx.size(1) == a.jx && wx.size(2) == a.k && wx.size(3) == a.k,
              "emcad_kernels cpu: wx has shape ", wx.sizes());
  TORCH_CHECK(wpsi.numel() == a.Fi && bpsi.numel() == 1 && bg.numel() == a.Fi && bx.numel() == a.Fi,
              "emcad_kernels cpu: bad psi/bias shapes");
  TORCH_CHECK(!add_gate_input || a.Fg == a.Fl, "emcad_kernels cpu: add_gate_input needs equal channels");
  a.act = act_id(activation);
  a.add_gate = add_gate_input ? 1 : 0;
  const int cb = block_lanes(s.dt);
  a.block_lanes = (cb / a.og) * a.og;
  a.band = kBand;
  s.wg64 = host_f64(wg);
  s.wx64 = host_f64(wx);
  s.bg64 = host_f64(bg);
  s.bx64 = host_f64(bx);
  s.wpsi64 = host_f64(wpsi);
  a.wg = s.wg64.data();
  a.wx = s.wx64.data();
  a.bg = s.bg64.data();
  a.bx = s.bx64.data();
  a.wpsi = s.wpsi64.data();
  a.bpsi = scalar(bpsi);
  a.g = view4(g);
  a.x = view4(x);
  s.N = x.size(0);
  s.nbands = (a.H + kBand - 1) / kBand;
  s.nblk = (a.Fi + a.block_lanes - 1) / a.block_lanes;
  a.group = blocks_per_item(s.N, s.nblk);
  s.row_items = s.N * s.nbands;
  s.block_items = s.N * ((s.nblk + a.group - 1) / a.group);
  return s;
}

// BN fold of one grouped conv: a = z*s + t on z = conv + bias
HostBn fold(const at::Tensor& gamma, const at::Tensor& beta, Vec mean, const Vec& var, double eps) {
  return host_bn(host_f64(gamma), host_f64(beta), std::move(mean), var, eps);
}

void set_fold(LgagArgs& a, const HostBn& fg, const HostBn& fx) {
  a.sg = fg.scale.data();
  a.tg = fg.shift.data();
  a.mg = fg.mean.data();
  a.rg = fg.rstd.data();
  a.sx = fx.scale.data();
  a.tx = fx.shift.data();
  a.mx = fx.mean.data();
  a.rx = fx.rstd.data();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lgag_fwd(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& wx,
    const at::Tensor& bx, const at::Tensor& wpsi, const at::Tensor& bpsi, const at::Tensor& bn_g_weight,
    const at::Tensor& bn_g_bias, const at::Tensor& mean_g, const at::Tensor& var_g, const at::Tensor& bn_x_weight,
    const at::Tensor& bn_x_bias, const at::Tensor& mean_x, const at::Tensor& var_x, const at::Tensor& bn_psi_weight,
    const at::Tensor& bn_psi_bias, const at::Tensor& mean_psi, const at::Tensor& var_psi, bool training, double eps,
    int64_t groups, c10::string_view activation, bool add_gate_input) {
  LgagSetup s = setup_lgag(g, x, wg, bg, wx, bx, wpsi, bpsi, groups, activation, add_gate_input);
  LgagArgs& a = s.a;
  const LgagKernels& kern = active_table().lgag[s.dt];
  const auto sd = stats_dtype(x.scalar_type());
  const int64_t Fi = a.Fi;
  at::Tensor out = empty_out(x, {s.N, a.Fl, a.H, a.W});
  a.out = view4(out);
  Vec mg, vg, mx, vx;
  if (training) {
    Vec sg0(s.N * Fi), sg1(s.N * Fi), sx0(s.N * Fi), sx1(s.N * Fi);
    a.sg0 = sg0.data();
    a.sg1 = sg1.data();
    a.sx0 = sx0.data();
    a.sx1 = sx1.data();
    run_items(kern.stats, a, s.block_items);
    std::tie(mg, vg) = merge_stats(sg0, sg1, s.N, Fi, (double)a.H * a.W);
    std::tie(mx, vx) = merge_stats(sx0, sx1, s.N, Fi, (double)a.H * a.W);
  } else {
    mg = host_f64(mean_g); vg = host_f64(var_g); mx = host_f64(mean_x); vx = host_f64(var_x);
  }
  const HostBn fg = fold(bn_g_weight, bn_g_bias, mg, vg, eps), fx = fold(bn_x_weight, bn_x_bias, mx, vx, eps);
  set_fold(a, fg, fx);
  double mean_p, var_p;
  Vec pbuf;
  if (training) {
    pbuf.resize(s.N * a.H * a.W);
    a.pbuf = pbuf.data();
    Vec sp(3 * std::max<int64_t>(s.row_items, 1));
    a.sp0 = sp.data();
    a.sp1 = a.sp0 + std::max<int64_t>(s.row_items, 1);
    a.sp2 = a.sp1 + std::max<int64_t>(s.row_items, 1);
    run_items(kern.psi, a, s.row_items);
    emcad::Welford acc;
    for (int64_t i = 0; i < s.row_items; ++i) acc.merge(a.sp0[i], a.sp1[i], a.sp2[i]);
    mean_p = acc.n > 0 ? acc.mean : std::numeric_limits<double>::quiet_NaN();
    var_p = acc.n > 0 ? acc.var_biased() : std::numeric_limits<double>::quiet_NaN();
  } else {
    mean_p = scalar(mean_psi);
    var_p = scalar(var_psi);
  }
  const emcad::BnAffine fp = emcad::bn_fold(scalar(bn_psi_weight), scalar(bn_psi_bias), mean_p, var_p, eps);
  a.sp = fp.scale;
  a.tp = fp.shift;
  run_items(kern.apply, a, s.row_items);
  // eval: copies of the running statistics (custom-op outputs must not alias inputs)
  return {out, from_host(mg, {Fi}, sd), from_host(vg, {Fi}, sd), from_host(mx, {Fi}, sd), from_host(vx, {Fi}, sd),
          from_host(&mean_p, {1}, sd), from_host(&var_p, {1}, sd)};
}

std::vector<at::Tensor> lgag_bwd(const at::Tensor& grad, const at::Tensor& g, const at::Tensor& x,
                                 const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& wx, const at::Tensor& bx,
                                 const at::Tensor& wpsi, const at::Tensor& bpsi, const at::Tensor& bn_g_weight,
                                 const at::Tensor& bn_g_bias, const at::Tensor& bn_x_weight,
                                 const at::Tensor& bn_x_bias, const at::Tensor& bn_psi_weight,
                                 const at::Tensor& bn_psi_bias, at::TensorList save_stats, bool training, double eps,
                                 int64_t groups, c10::string_view activation, bool add_gate_input) {
  LgagSetup s = setup_lgag(g, x, wg, bg, wx, bx, wpsi, bpsi, groups, activation, add_gate_input);
  LgagArgs& a = s.a;
  check_cpu4(grad, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes(), "emcad_kernels cpu: grad has shape ", grad.sizes(), ", expected ",
              x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "emcad_kernels cpu: grad dtype differs from x");
  TORCH_CHECK(save_stats.size() == 6, "emcad_kernels cpu: save_stats must hold 6 tensors");
  const LgagKernels& kern = active_table().lgag[s.dt];
  const int64_t Fi = a.Fi;
  const double M = (double)s.N * a.H * a.W;
  const HostBn fg = fold(bn_g_weight, bn_g_bias, host_f64(save_stats[0]), host_f64(save_stats[1]), eps);
  const HostBn fx = fold(bn_x_weight, bn_x_bias, host_f64(save_stats[2]), host_f64(save_stats[3]), eps);
  set_fold(a, fg, fx);
  const double mean_p = scalar(save_stats[4]), var_p = scalar(save_stats[5]);
  const double gamma_p = scalar(bn_psi_weight);
  const emcad::BnAffine fp = emcad::bn_fold(gamma_p, scalar(bn_psi_bias), mean_p, var_p, eps);
  a.sp = fp.scale;
  a.tp = fp.shift;
  a.mp = mean_p;
  a.rp = 1.0 / std::sqrt(var_p + eps);
  a.grad = view4(grad);
  Vec pbuf(s.N * a.H * a.W), dbuf(s.N * a.H * a.W);
  a.pbuf = pbuf.data();
  a.dbuf = dbuf.data();
  // pass A: dL/d(psi logit after BN) per pixel, psi-BN sums
  const int64_t nsp = std::max<int64_t>(s.row_items, 1);
  Vec sp(2 * nsp, 0.0);
  a.sp0 = sp.data();
  a.sp1 = sp.data() + nsp;
  run_items(kern.bwd_psi, a, s.row_items);
  double s1p = 0, s2p = 0;
  for (int64_t i = 0; i < s.row_items; ++i) {
    s1p += a.sp0[i];
    s2p += a.sp1[i];
  }
  const emcad::BnBackCoef cp = emcad::bn_back_coef(gamma_p, a.rp, s1p, s2p, M, training);
  a.cp1 = cp.c1;
  a.cp2 = cp.c2;
  a.cp3 = cp.c3;
  const int64_t NF = s.N * Fi;
  Vec sums(4 * NF, 0.0), dpsum(s.N, 0.0);
  a.su = sums.data();
  a.sug = sums.data() + NF;
  a.sux = sums.data() + 2 * NF;
  a.sph = sums.data() + 3 * NF;
  a.dpsum = dpsum.data();
  // per-channel sums over the batch, in batch order: su, sug, sux, sph (each [Fi]) and dpsum ([1])
  auto reduce_sums = [&]() {
    return std::vector<Vec>{sum_items(a.su, s.N, Fi), sum_items(a.sug, s.N, Fi), sum_items(a.sux, s.N, Fi),
                            sum_items(a.sph, s.N, Fi), sum_items(a.dpsum, s.N, 1)};
  };
  std::vector<Vec> red;
  Vec c2g(Fi), c3g(Fi), c2x(Fi), c3x(Fi);
  LgagArgs ga = a;
  if (training) {
    run_items(kern.bwd_reduce, a, s.block_items);
    red = reduce_sums();
    for (int64_t i = 0; i < Fi; ++i) {
      c2g[i] = -fg.scale[i] * red[1][i] / M;
      c3g[i] = -fg.scale[i] * red[0][i] / M;
      c2x[i] = -fx.scale[i] * red[2][i] / M;
      c3x[i] = -fx.scale[i] * red[0][i] / M;
    }
    ga.c2g = c2g.data();
    ga.c3g = c3g.data();
    ga.c2x = c2x.data();
    ga.c3x = c3x.data();
    ga.su = ga.sug = ga.sux = ga.sph = ga.dpsum = nullptr;
  }
  at::Tensor gg = empty_out(g, {s.N, a.Fg, a.H, a.W}), gx = empty_out(x, {s.N, a.Fl, a.H, a.W});
  ga.gg = view4(gg);
  ga.gx = view4(gx);
  const int64_t kk = (int64_t)a.k * a.k;
  Vec wgpart(s.N * Fi * a.jg * kk, 0.0), wxpart(s.N * Fi * a.jx * kk, 0.0), bpart(2 * NF, 0.0);
  ga.wgpart = wgpart.data();
  ga.wxpart = wxpart.data();
  ga.bgpart = bpart.data();
  ga.bxpart = bpart.data() + NF;
  run_items(kern.bwd_grad, ga, s.block_items);
  if (!training) red = reduce_sums();
  auto as = [](const Vec& v, const at::Tensor& like) { return from_host(v, like.sizes(), like.scalar_type()); };
  const Vec ggp{s2p}, gbp{s1p};
  return {gg,
          gx,
          as(sum_items(wgpart.data(), s.N, Fi * a.jg * kk), wg),
          as(sum_items(bpart.data(), s.N, Fi), bg),
          as(sum_items(wxpart.data(), s.N, Fi * a.jx * kk), wx),
          as(sum_items(bpart.data() + NF, s.N, Fi), bx),
          as(red[3], wpsi),
          as(red[4], bpsi),
          as(red[1], bn_g_weight),
          as(red[0], bn_g_bias),
          as(red[2], bn_x_weight),
          as(red[0], bn_x_bias),
          as(ggp, bn_psi_weight),
          as(gbp, bn_psi_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("lgag_fwd", &lgag_fwd);
  m.impl("lgag_bwd", &lgag_bwd);
}

}  // namespace emcad_cpu
