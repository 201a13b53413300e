// grouped_attention_gate on CPU: argument checks, allocation, pass orchestration and fixed-order reductions.
//
// Passes (kernels in kernels_impl.h):
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

struct LgagSetup {
  LgagArgs a;
  at::Tensor wg64, wx64, bg64, bx64, wpsi64;
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
  s.wg64 = f64(wg);
  s.wx64 = f64(wx);
  s.bg64 = f64(bg);
  s.bx64 = f64(bx);
  s.wpsi64 = f64(wpsi);
  a.wg = s.wg64.data_ptr<double>();
  a.wx = s.wx64.data_ptr<double>();
  a.bg = s.bg64.data_ptr<double>();
  a.bx = s.bx64.data_ptr<double>();
  a.wpsi = s.wpsi64.data_ptr<double>();
  a.bpsi = bpsi.to(at::kDouble).item<double>();
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
struct Fold {
  at::Tensor s, t, mean, rstd;
};

Fold fold(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var, double eps) {
  Fold f;
  f.mean = f64(mean);
  f.rstd = (f64(var) + eps).rsqrt().contiguous();
  f.s = (f64(gamma) * f.rstd).contiguous();
  f.t = (f64(beta) - f.mean * f.s).contiguous();
  return f;
}

void set_fold(LgagArgs& a, const Fold& fg, const Fold& fx) {
  a.sg = fg.s.data_ptr<double>();
  a.tg = fg.t.data_ptr<double>();
  a.mg = fg.mean.data_ptr<double>();
  a.rg = fg.rstd.data_ptr<double>();
  a.sx = fx.s.data_ptr<double>();
  a.tx = fx.t.data_ptr<double>();
  a.mx = fx.mean.data_ptr<double>();
  a.rx = fx.rstd.data_ptr<double>();
}

double scalar(const at::Tensor& t) { return t.to(at::kDouble).reshape({-1})[0].item<double>(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lgag_fwd(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& wx,
    const at::Tensor& bx, const at::Tensor& wpsi, const at::Tensor& bpsi, const at::Tensor& bn_g_weight,
    const at::Tensor& bn_g_bias, const at::Tensor& mean_g, const at::Tensor& var_g, const at::Tensor& bn_x_weight,
    const at::Tensor& bn_x_bias, const at::Tensor& mean_x, const at::Tensor& var_x, const at::Tensor& bn_psi_weight,
    const at::Tensor& bn_psi_bias, const at::Tensor& mean_psi, const at::Tensor& var_psi, bool training, double eps,
    int64_t groups, c10::string_view activation, bool add_gate_input) {
  LgagSetup s = setup_lgag(g, x, wg, bg, wx, bx, wpsi, bpsi, groups, activation, add_gate_input);
  LgagArgs& a = s.a;
  const KernelTable& kt = active_table();
  const auto sd = stats_dtype(x.scalar_type());
  const int64_t Fi = a.Fi;
  at::Tensor out = empty_out(x, {s.N, a.Fl, a.H, a.W});
  a.out = view4(out);
  at::Tensor mg, vg, mx, vx, mp, vp;
  if (training) {
    auto sg0 = at::empty({s.N, Fi}, at::kDouble), sg1 = at::empty({s.N, Fi}, at::kDouble);
    auto sx0 = at::empty({s.N, Fi}, at::kDouble), sx1 = at::empty({s.N, Fi}, at::kDouble);
    a.sg0 = sg0.data_ptr<double>();
    a.sg1 = sg1.data_ptr<double>();
    a.sx0 = sx0.data_ptr<double>();
    a.sx1 = sx1.data_ptr<double>();
    run_items(kt.lgag_stats[s.dt], a, s.block_items);
    std::tie(mg, vg) = merge_stats(sg0, sg1, s.N, Fi, (double)a.H * a.W);
    std::tie(mx, vx) = merge_stats(sx0, sx1, s.N, Fi, (double)a.H * a.W);
  } else {
    mg = f64(mean_g); vg = f64(var_g); mx = f64(mean_x); vx = f64(var_x);
  }
  Fold fg = fold(bn_g_weight, bn_g_bias, mg, vg, eps), fx = fold(bn_x_weight, bn_x_bias, mx, vx, eps);
  set_fold(a, fg, fx);
  double mean_p, var_p;
  at::Tensor pbuf;
  if (training) {
    pbuf = at::empty({s.N, a.H, a.W}, at::kDouble);
    a.pbuf = pbuf.data_ptr<double>();
    auto sp = at::empty({3, std::max<int64_t>(s.row_items, 1)}, at::kDouble);
    a.sp0 = sp[0].data_ptr<double>();
    a.sp1 = sp[1].data_ptr<double>();
    a.sp2 = sp[2].data_ptr<double>();
    run_items(kt.lgag_psi[s.dt], a, s.row_items);
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
  run_items(kt.lgag_apply[s.dt], a, s.row_items);
  auto st = [&](const at::Tensor& t) { return t.to(sd, false, true).contiguous(); };
  if (training) {
    auto mpt = at::full({1}, mean_p, at::kDouble), vpt = at::full({1}, var_p, at::kDouble);
    return {out, st(mg), st(vg), st(mx), st(vx), st(mpt), st(vpt)};
  }
  return {out, st(mean_g), st(var_g), st(mean_x), st(var_x), st(mean_psi), st(var_psi)};
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
  const KernelTable& kt = active_table();
  const int64_t Fi = a.Fi;
  const double M = (double)s.N * a.H * a.W;
  Fold fg = fold(bn_g_weight, bn_g_bias, save_stats[0], save_stats[1], eps);
  Fold fx = fold(bn_x_weight, bn_x_bias, save_stats[2], save_stats[3], eps);
  set_fold(a, fg, fx);
  const double mean_p = scalar(save_stats[4]), var_p = scalar(save_stats[5]);
  const double gamma_p = scalar(bn_psi_weight);
  const emcad::BnAffine fp = emcad::bn_fold(gamma_p, scalar(bn_psi_bias), mean_p, var_p, eps);
  a.sp = fp.scale;
  a.tp = fp.shift;
  a.mp = mean_p;
  a.rp = 1.0 / std::sqrt(var_p + eps);
  a.grad = view4(grad);
  auto pbuf = at::empty({s.N, a.H, a.W}, at::kDouble), dbuf = at::empty({s.N, a.H, a.W}, at::kDouble);
  a.pbuf = pbuf.data_ptr<double>();
  a.dbuf = dbuf.data_ptr<double>();
  // pass A: dL/d(psi logit after BN) per pixel, psi-BN sums
  auto sp = at::zeros({2, std::max<int64_t>(s.row_items, 1)}, at::kDouble);
  a.sp0 = sp[0].data_ptr<double>();
  a.sp1 = sp[1].data_ptr<double>();
  run_items(kt.lgag_bwd_psi[s.dt], a, s.row_items);
  double s1p = 0, s2p = 0;
  for (int64_t i = 0; i < s.row_items; ++i) {
    s1p += a.sp0[i];
    s2p += a.sp1[i];
  }
  const emcad::BnBackCoef cp = emcad::bn_back_coef(gamma_p, a.rp, s1p, s2p, M, training);
  a.cp1 = cp.c1;
  a.cp2 = cp.c2;
  a.cp3 = cp.c3;
  auto sums = at::zeros({4, s.N, Fi}, at::kDouble);
  auto dpsum = at::zeros({s.N}, at::kDouble);
  a.su = sums[0].data_ptr<double>();
  a.sug = sums[1].data_ptr<double>();
  a.sux = sums[2].data_ptr<double>();
  a.sph = sums[3].data_ptr<double>();
  a.dpsum = dpsum.data_ptr<double>();
  at::Tensor c2g, c3g, c2x, c3x;
  auto reduce_sums = [&]() {
    return std::vector<at::Tensor>{sum_items(sums[0], s.N, {Fi}), sum_items(sums[1], s.N, {Fi}),
                                   sum_items(sums[2], s.N, {Fi}), sum_items(sums[3], s.N, {Fi}),
                                   sum_items(dpsum, s.N, {1})};
  };
  std::vector<at::Tensor> red;
  LgagArgs ga = a;
  if (training) {
    run_items(kt.lgag_bwd_reduce[s.dt], a, s.block_items);
    red = reduce_sums();
    c2g = (-fg.s * red[1] / M).contiguous();
    c3g = (-fg.s * red[0] / M).contiguous();
    c2x = (-fx.s * red[2] / M).contiguous();
    c3x = (-fx.s * red[0] / M).contiguous();
    ga.c2g = c2g.data_ptr<double>();
    ga.c3g = c3g.data_ptr<double>();
    ga.c2x = c2x.data_ptr<double>();
    ga.c3x = c3x.data_ptr<double>();
    ga.su = ga.sug = ga.sux = ga.sph = ga.dpsum = nullptr;
  }
  at::Tensor gg = empty_out(g, {s.N, a.Fg, a.H, a.W}), gx = empty_out(x, {s.N, a.Fl, a.H, a.W});
  ga.gg = view4(gg);
  ga.gx = view4(gx);
  auto wgpart = at::zeros({s.N, Fi, a.jg, a.k * a.k}, at::kDouble);
  auto wxpart = at::zeros({s.N, Fi, a.jx, a.k * a.k}, at::kDouble);
  auto bpart = at::zeros({2, s.N, Fi}, at::kDouble);
  ga.wgpart = wgpart.data_ptr<double>();
  ga.wxpart = wxpart.data_ptr<double>();
  ga.bgpart = bpart[0].data_ptr<double>();
  ga.bxpart = bpart[1].data_ptr<double>();
  run_items(kt.lgag_bwd_grad[s.dt], ga, s.block_items);
  if (!training) red = reduce_sums();
  auto gwg = sum_items(wgpart, s.N, {Fi, a.jg, a.k, a.k});
  auto gwx = sum_items(wxpart, s.N, {Fi, a.jx, a.k, a.k});
  auto gbg = sum_items(bpart[0], s.N, {Fi});
  auto gbx = sum_items(bpart[1], s.N, {Fi});
  auto as = [](const at::Tensor& v, const at::Tensor& like) {  // fresh tensors: outputs must not alias
    return v.reshape(like.sizes()).to(like.scalar_type(), false, true).contiguous();
  };
  auto gwpsi = red[3];
  auto gbpsi = red[4];
  auto ggp = at::full({1}, s2p, at::kDouble), gbp = at::full({1}, s1p, at::kDouble);
  return {gg,
          gx,
          as(gwg, wg),
          as(gbg, bg),
          as(gwx, wx),
          as(gbx, bx),
          as(gwpsi, wpsi),
          as(gbpsi, bpsi),
          as(red[1], bn_g_weight),
          as(red[0], bn_g_bias),
          as(red[2], bn_x_weight),
          as(red[0], bn_x_bias),
          as(ggp, bn_psi_weight),
          as(gbp, bn_psi_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("lgag_fwd_cpu_kernel", &lgag_fwd);
  m.impl("lgag_bwd_cpu_kernel", &lgag_bwd);
}

}  // namespace emcad_cpu
