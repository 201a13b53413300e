// dilated_dwconv_groupnorm on CPU: argument checks, pass orchestration and fixed-order reductions. The kernels
// are in multidilation_impl.h (per-ISA builds). GroupNorm groups = conv groups (equal sizes). Nothing is saved
// by forward: backward recomputes the conv (once, into a scratch tensor) and the statistics from x.
#include <torch/library.h>

#include "cpu/multidilation_binding.h"

namespace emcad_cpu {
namespace {

struct DwgnStats {
  at::Tensor mean, rstd;  // [N][G] double
};

MdSetup setup_dwgn(const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& gn_weight,
                   const at::Tensor& gn_bias, at::IntArrayRef dilations, double eps) {
  MdSetup s = md_setup(x, weights, biases, dilations, eps, "dwgn");
  for (int64_t i = 1; i < s.a.G; ++i)
    TORCH_CHECK(s.c0[i + 1] - s.c0[i] == s.c0[1], "emcad_kernels cpu: dwgn: the groups must have equal sizes");
  TORCH_CHECK(gn_weight.numel() == s.a.C && gn_bias.numel() == s.a.C, "emcad_kernels cpu: dwgn: gn_weight and "
              "gn_bias must have ", s.a.C, " elements");
  s.nw_all = f64(gn_weight).reshape({-1});
  s.nb_all = f64(gn_bias).reshape({-1});
  s.a.nw = s.nw_all.data_ptr<double>();
  s.a.nb = s.nb_all.data_ptr<double>();
  return s;
}

// Statistics pass (which also fills the conv-output scratch), then a Chan merge of the items of each
// (n, group) in item order.
DwgnStats dwgn_statistics(MdSetup& s, at::Tensor& zbuf) {
  const int64_t N = s.a.N, G = s.a.G;
  const auto zdtype = s.dt == EMCAD_DTYPE_F64 ? at::kDouble : at::kFloat;
  zbuf = at::empty({N, s.a.C, s.a.H, s.a.W}, at::TensorOptions().dtype(zdtype));
  s.a.zbuf = zbuf.data_ptr();
  md_partials(s, 3, std::vector<int64_t>((size_t)G, 0));
  md_run(active_table().dwgn[s.dt].stats, s.a, s.nitems);
  std::vector<emcad::Welford> acc((size_t)(N * G));
  const double* p = s.part.data_ptr<double>();
  for (int64_t it = 0; it < s.nitems; ++it) {
    const double* q = p + s.poff[it];
    acc[(size_t)(s.items[4 * it] * G + s.items[4 * it + 1])].merge(q[0], q[1], q[2]);
  }
  DwgnStats st{at::empty({N, G}, at::kDouble), at::empty({N, G}, at::kDouble)};
  double* m = st.mean.data_ptr<double>();
  double* r = st.rstd.data_ptr<double>();
  for (int64_t e = 0; e < N * G; ++e) {
    m[e] = acc[e].mean;
    r[e] = 1.0 / std::sqrt(acc[e].var_biased() + s.a.eps);
  }
  s.a.gmean = m;
  s.a.grstd = r;
  return st;
}

at::Tensor dwgn_fwd(const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& gn_weight,
                    const at::Tensor& gn_bias, at::IntArrayRef dilations, double eps) {
  MdSetup s = setup_dwgn(x, weights, biases, gn_weight, gn_bias, dilations, eps);
  at::Tensor zbuf;
  DwgnStats st = dwgn_statistics(s, zbuf);
  at::Tensor y = empty_out(x, x.sizes());
  s.a.y = view4(y);
  md_run(active_table().dwgn[s.dt].apply, s.a, s.nitems);
  return y;
}

// Returns [grad x, grad gn_weight, grad gn_bias, grad weights..., grad biases...].
std::vector<at::Tensor> dwgn_bwd(const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
                                 at::TensorList biases, const at::Tensor& gn_weight, const at::Tensor& gn_bias,
                                 at::IntArrayRef dilations, double eps) {
  MdSetup s = setup_dwgn(x, weights, biases, gn_weight, gn_bias, dilations, eps);
  md_check_grad(grad, x);
  const int64_t N = s.a.N, G = s.a.G, C = s.a.C, gc = s.c0[1];
  at::Tensor zbuf;
  DwgnStats st = dwgn_statistics(s, zbuf);
  s.a.g = view4(grad);
  // pass 1: per (n, channel) sum(g) and sum(g*zhat)
  md_partials(s, 0, std::vector<int64_t>((size_t)G, 2));
  md_run(active_table().dwgn[s.dt].bwd_sums, s.a, s.nitems);
  auto sg = at::zeros({N, C}, at::kDouble), sgz = at::zeros({N, C}, at::kDouble);
  {
    double* a0 = sg.data_ptr<double>();
    double* a1 = sgz.data_ptr<double>();
    const double* p = s.part.data_ptr<double>();
    for (int64_t it = 0; it < s.nitems; ++it) {
      const int64_t n = s.items[4 * it], c0 = s.c0[s.items[4 * it + 1]];
      const double* q = p + s.poff[it];
      for (int64_t c = 0; c < gc; ++c) {
        a0[n * C + c0 + c] += q[2 * c];
        a1[n * C + c0 + c] += q[2 * c + 1];
      }
    }
  }
  const at::Tensor ggb = sg.sum(0), ggw = sgz.sum(0);  // over n, fixed order
  // GN backward: dz = rstd*gamma*g - ca - cb*zhat with ca = rstd*mean(gamma*g), cb = rstd*mean(gamma*g*zhat)
  auto ca = at::empty({N, G}, at::kDouble), cb = at::empty({N, G}, at::kDouble);
  {
    const double* gam = s.a.nw;
    const double* a0 = sg.data_ptr<double>();
    const double* a1 = sgz.data_ptr<double>();
    const double M = (double)gc * s.a.H * s.a.W;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < G; ++i) {
        double s1 = 0, s2 = 0;
        for (int64_t c = i * gc; c < (i + 1) * gc; ++c) {
          s1 += gam[c] * a0[n * C + c];
          s2 += gam[c] * a1[n * C + c];
        }
        const double r = st.rstd.data_ptr<double>()[n * G + i];
        ca.data_ptr<double>()[n * G + i] = r * s1 / M;
        cb.data_ptr<double>()[n * G + i] = r * s2 / M;
      }
  }
  s.a.ca = ca.data_ptr<double>();
  s.a.cb = cb.data_ptr<double>();
  // pass 2: grad x and the conv weight / bias partials
  std::vector<int64_t> width(G);
  for (int64_t i = 0; i < G; ++i) width[i] = (int64_t)s.ks[i] * s.ks[i] + 1;
  md_partials(s, 0, width);
  at::Tensor gx = empty_out(x, x.sizes());
  s.a.gx = view4(gx);
  md_run(active_table().dwgn[s.dt].bwd_grad, s.a, s.nitems);
  std::vector<at::Tensor> out;
  out.push_back(gx);
  out.push_back(ggw.to(gn_weight.scalar_type(), false, true).contiguous());
  out.push_back(ggb.to(gn_bias.scalar_type(), false, true).contiguous());
  std::vector<at::Tensor> gb;
  for (int64_t i = 0; i < G; ++i) {
    const int64_t k = s.ks[i], kk = k * k;
    const at::Tensor sum = md_sum_group(s, (int)i, kk + 1);
    out.push_back(sum.narrow(1, 0, kk).reshape({gc, 1, k, k}).to(weights[i].scalar_type(), false, true).contiguous());
    gb.push_back(sum.select(1, kk).to(biases[i].scalar_type(), false, true).contiguous());
  }
  for (auto& t : gb) out.push_back(t);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("dwgn_fwd", &dwgn_fwd);
  m.impl("dwgn_bwd", &dwgn_bwd);
}

}  // namespace emcad_cpu
