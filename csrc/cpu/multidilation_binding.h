// Shared setup of the torch bindings of the multi-dilation ops (lndw.cpp, dwgn.cpp): argument checks, the
// flattened per-group parameters, and the item partition (a function of the shape only) with its partial slots.
#pragma once
#include <vector>

#include "cpu/binding_utils.h"
#include "cpu/multidilation.h"

namespace emcad_cpu {

struct MdSetup {
  MdArgs a;
  std::vector<int64_t> c0, woff, poff;
  std::vector<int> ks, dil;
  std::vector<int32_t> items;  // [items][4]: n, group, first row, end row
  at::Tensor w_all, b_all, nw_all, nb_all, part;
  int dt = 0;
  int64_t nitems = 0;
};

inline at::Tensor flat64(at::TensorList ts) {
  std::vector<at::Tensor> flat;
  for (const auto& t : ts) flat.push_back(t.reshape({-1}).to(at::kDouble));
  return at::cat(flat).contiguous();
}

// Rows per item: enough items (>= kMinItems when the batch and groups allow it) to keep both cores busy
// even at batch 1 with one group (GHPA), at least 4 rows per band so the halo recomputation stays modest,
// and small enough that an item's planar buffers stay in L2.
inline int64_t md_band_rows(int64_t N, int64_t G, int64_t H, int64_t W, int64_t gmax, int64_t halmax) {
  const int64_t per_plane = std::max<int64_t>(1, N * G);
  int64_t bands = (kMinItems + per_plane - 1) / per_plane;
  bands = std::max<int64_t>(1, std::min(bands, H / 4));
  int64_t band = (H + bands - 1) / bands;
  while (band > 4 && gmax * (band + 4 * halmax) * (W + 2 * halmax) > (int64_t(1) << 17)) band = (band + 1) / 2;
  return std::max<int64_t>(1, band);
}

// weights[i] is [g_i, 1, k_i, k_i]; checks what the kernels rely on (functional.py has the user-facing checks).
inline MdSetup md_setup(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                        at::IntArrayRef dilations, double eps, const char* op) {
  check_cpu4(x, "x");
  MdSetup s;
  s.dt = dtype_index(x, "x");
  const int64_t G = (int64_t)weights.size();
  TORCH_CHECK(G >= 1, "emcad_kernels cpu: ", op, " needs at least one group");
  TORCH_CHECK((int64_t)dilations.size() == G && (int64_t)biases.size() == G, "emcad_kernels cpu: ", op,
              ": weights, biases and dilations must have one entry per group (got ", G, ", ", biases.size(), ", ",
              dilations.size(), ")");
  TORCH_CHECK(eps > 0, "emcad_kernels cpu: ", op, ": eps must be positive, got ", eps);
  MdArgs& a = s.a;
  a.N = (int)x.size(0);
  a.C = (int)x.size(1);
  a.H = (int)x.size(2);
  a.W = (int)x.size(3);
  a.G = (int)G;
  a.eps = eps;
  int64_t c = 0, off = 0, gmax = 0, halmax = 0;
  for (int64_t i = 0; i < G; ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 4 && w.size(0) >= 1 && w.size(1) == 1 && w.size(2) == w.size(3) &&
                    w.size(2) % 2 == 1 && w.size(2) <= kMaxKernel,
                "emcad_kernels cpu: ", op, ": weights[", i, "] must be [g, 1, k, k] with odd k <= 9, got ",
                w.sizes());
    TORCH_CHECK(biases[i].numel() == w.size(0), "emcad_kernels cpu: ", op, ": biases[", i, "] has ",
                biases[i].numel(), " elements, expected ", w.size(0));
    TORCH_CHECK(dilations[i] >= 1, "emcad_kernels cpu: ", op, ": dilations[", i, "] must be >= 1");
    s.c0.push_back(c);
    s.woff.push_back(off);
    s.ks.push_back((int)w.size(2));
    s.dil.push_back((int)dilations[i]);
    c += w.size(0);
    off += w.numel();
    gmax = std::max<int64_t>(gmax, w.size(0));
    halmax = std::max<int64_t>(halmax, dilations[i] * (w.size(2) / 2));
  }
  s.c0.push_back(c);
  TORCH_CHECK(c == a.C, "emcad_kernels cpu: ", op, ": weights cover ", c, " channels but x has ", a.C);
  s.w_all = flat64(weights);
  s.b_all = flat64(biases);
  a.c0 = s.c0.data();
  a.ks = s.ks.data();
  a.dil = s.dil.data();
  a.woff = s.woff.data();
  a.w = s.w_all.data_ptr<double>();
  a.b = s.b_all.data_ptr<double>();
  a.x = view4(x);
  if (a.N > 0 && a.H > 0 && a.W > 0) {
    const int64_t band = md_band_rows(a.N, G, a.H, a.W, gmax, halmax);
    for (int64_t n = 0; n < a.N; ++n)
      for (int64_t i = 0; i < G; ++i)
        for (int64_t h0 = 0; h0 < a.H; h0 += band) {
          s.items.push_back((int32_t)n);
          s.items.push_back((int32_t)i);
          s.items.push_back((int32_t)h0);
          s.items.push_back((int32_t)std::min<int64_t>(a.H, h0 + band));
        }
  }
  s.nitems = (int64_t)s.items.size() / 4;
  a.items = s.items.data();
  return s;
}

// Allocates zeroed partial slots: `per_channel` doubles per channel of the item's group (+ `fixed` per item).
inline void md_partials(MdSetup& s, int64_t fixed, const std::vector<int64_t>& per_channel_of_group) {
  s.poff.assign((size_t)s.nitems, 0);
  int64_t total = 0;
  for (int64_t it = 0; it < s.nitems; ++it) {
    const int gi = s.items[4 * it + 1];
    s.poff[it] = total;
    total += fixed + (s.c0[gi + 1] - s.c0[gi]) * per_channel_of_group[gi];
  }
  s.part = at::zeros({std::max<int64_t>(total, 1)}, at::kDouble);
  s.a.poff = s.poff.data();
  s.a.part = s.part.data_ptr<double>();
}

// Sum of the items' partials of group gi (each [gc][width]) in item order -> [gc][width] double tensor.
inline at::Tensor md_sum_group(const MdSetup& s, int gi, int64_t width) {
  const int64_t gc = s.c0[gi + 1] - s.c0[gi];
  auto out = at::zeros({gc, width}, at::kDouble);
  double* o = out.data_ptr<double>();
  const double* p = s.part.data_ptr<double>();
  for (int64_t it = 0; it < s.nitems; ++it) {
    if (s.items[4 * it + 1] != gi) continue;
    const double* q = p + s.poff[it];
    for (int64_t e = 0; e < gc * width; ++e) o[e] += q[e];
  }
  return out;
}

inline void md_check_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_cpu4(grad, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes(), "emcad_kernels cpu: grad has shape ", grad.sizes(), ", expected ",
              x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "emcad_kernels cpu: grad dtype ", grad.scalar_type(),
              " differs from x dtype ", x.scalar_type());
}

inline void md_run(MdFn fn, const MdArgs& a, int64_t items) { run_items(fn, a, items); }  // grain: one item

}  // namespace emcad_cpu
