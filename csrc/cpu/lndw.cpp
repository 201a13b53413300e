// layernorm_dilated_dwconv on CPU: argument checks, allocation and fixed-order reductions. The kernels are in
// multidilation_impl.h (per-ISA builds). No statistics are saved: backward recomputes the LayerNorm from x.
#include <torch/library.h>

#include "cpu/multidilation_binding.h"

namespace emcad_cpu {
namespace {

void check_vectors(at::TensorList ts, const MdSetup& s, const char* name) {
  TORCH_CHECK((int64_t)ts.size() == s.a.G, "emcad_kernels cpu: lndw: ", name, " must have one entry per group");
  for (int64_t i = 0; i < s.a.G; ++i)
    TORCH_CHECK(ts[i].numel() == s.c0[i + 1] - s.c0[i], "emcad_kernels cpu: lndw: ", name, "[", i, "] has ",
                ts[i].numel(), " elements, expected ", s.c0[i + 1] - s.c0[i]);
}

MdSetup setup_lndw(const at::Tensor& x, at::TensorList ln_weights, at::TensorList ln_biases, at::TensorList weights,
                   at::TensorList biases, at::IntArrayRef dilations, double eps) {
  MdSetup s = md_setup(x, weights, biases, dilations, eps, "lndw");
  check_vectors(ln_weights, s, "ln_weights");
  check_vectors(ln_biases, s, "ln_biases");
  s.nw_all = flat64(ln_weights);
  s.nb_all = flat64(ln_biases);
  s.a.nw = s.nw_all.data_ptr<double>();
  s.a.nb = s.nb_all.data_ptr<double>();
  return s;
}

at::Tensor lndw_fwd(const at::Tensor& x, at::TensorList ln_weights, at::TensorList ln_biases, at::TensorList weights,
                    at::TensorList biases, at::IntArrayRef dilations, double eps) {
  MdSetup s = setup_lndw(x, ln_weights, ln_biases, weights, biases, dilations, eps);
  at::Tensor y = empty_out(x, x.sizes());
  s.a.y = view4(y);
  md_run(active_table().lndw[s.dt].fwd, s.a, s.nitems);
  return y;
}

// Returns [grad x, grad ln_weights..., grad ln_biases..., grad weights..., grad biases...].
std::vector<at::Tensor> lndw_bwd(const at::Tensor& grad, const at::Tensor& x, at::TensorList ln_weights,
                                 at::TensorList ln_biases, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef dilations, double eps) {
  MdSetup s = setup_lndw(x, ln_weights, ln_biases, weights, biases, dilations, eps);
  md_check_grad(grad, x);
  const int64_t G = s.a.G;
  std::vector<int64_t> width(G);
  for (int64_t i = 0; i < G; ++i) width[i] = (int64_t)s.ks[i] * s.ks[i] + 3;
  md_partials(s, 0, width);
  s.a.g = view4(grad);
  at::Tensor gx = empty_out(x, x.sizes());
  s.a.gx = view4(gx);
  md_run(active_table().lndw[s.dt].bwd, s.a, s.nitems);
  std::vector<at::Tensor> glw, glb, gw, gb;
  for (int64_t i = 0; i < G; ++i) {
    const int64_t k = s.ks[i], kk = k * k;
    const at::Tensor sum = md_sum_group(s, (int)i, kk + 3);
    const int64_t gc = sum.size(0);
    gw.push_back(sum.narrow(1, 0, kk).reshape({gc, 1, k, k}).to(weights[i].scalar_type(), false, true).contiguous());
    gb.push_back(sum.select(1, kk).to(biases[i].scalar_type(), false, true).contiguous());
    glw.push_back(sum.select(1, kk + 1).to(ln_weights[i].scalar_type(), false, true).contiguous());
    glb.push_back(sum.select(1, kk + 2).to(ln_biases[i].scalar_type(), false, true).contiguous());
  }
  std::vector<at::Tensor> out;
  out.push_back(gx);
  for (auto* v : {&glw, &glb, &gw, &gb})
    for (auto& t : *v) out.push_back(t);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("lndw_fwd", &lndw_fwd);
  m.impl("lndw_bwd", &lndw_bwd);
}

}  // namespace emcad_cpu
