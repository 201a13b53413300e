// mscam on CPU: EMCAD's CAB then SAB applied as y = x * ca * sa, forward and backward.
//
// Forward, three passes over x: (1) global sum / max per channel (partials per item), then the tiny shared MLP +
// sigmoid in double here -> ca; (2) per pixel mean_c and max_c of x * ca into a small zero-padded (N, 2, H, W)
// map; (3) per row band: sa = sigmoid(conv_k(map)) for the band's rows, then y = (x * ca) * sa.
// Backward recomputes ca, the map and sa from x (nothing is saved but the op's inputs), then: (4) g_q per
// pixel = sum_c g * x * ca * sa' ; (5) conv backward (map gradient, SAB weight partials) and the per-channel
// sums sum_p g_d1 * x for the CAB gradient; MLP backward here in double; (6) gx, plus the max-pool gradient at
// each channel's global arg-max. All partials are per item (shape-defined) and reduced here in item order.
//
// Layouts: channels_last x runs natively (the fast path: vectors over channels); every other layout is read as
// NCHW (x.contiguous()) and runs natively too (vectors over columns). Outputs have reference.output_memory_format.
// Kernels: mscam_impl.h, compiled once per instruction set with all other CPU kernels (isa_<name>.cpp).
#include <torch/library.h>

#include <limits>

#include "common/activations.h"
#include "cpu/binding_utils.h"

namespace emcad_cpu {

namespace {

double act_f(int act, double v) {
  switch (act) {
    case EMCAD_ACT_RELU: return emcad::act_fwd<EMCAD_ACT_RELU>(v);
    case EMCAD_ACT_RELU6: return emcad::act_fwd<EMCAD_ACT_RELU6>(v);
    case EMCAD_ACT_LEAKYRELU: return emcad::act_fwd<EMCAD_ACT_LEAKYRELU>(v);
    case EMCAD_ACT_HSWISH: return emcad::act_fwd<EMCAD_ACT_HSWISH>(v);
    default: return v;
  }
}

double act_b(int act, double a, double g) {
  switch (act) {
    case EMCAD_ACT_RELU: return emcad::act_bwd<EMCAD_ACT_RELU>(a, g);
    case EMCAD_ACT_RELU6: return emcad::act_bwd<EMCAD_ACT_RELU6>(a, g);
    case EMCAD_ACT_LEAKYRELU: return emcad::act_bwd<EMCAD_ACT_LEAKYRELU>(a, g);
    case EMCAD_ACT_HSWISH: return emcad::act_bwd<EMCAD_ACT_HSWISH>(a, g);
    default: return g;
  }
}

struct Setup {
  at::Tensor x;                   // dense in `fmt`
  Vec w1, w2, ws;                 // [R][C], [C][R], [2][k][k]
  at::MemoryFormat fmt;
  at::ScalarType acc;             // accumulation dtype
  int dt = 0, act = 0, k = 7;
  int64_t N = 0, C = 0, H = 0, W = 0, R = 0, items = 0;
  MscamArgs a;
};

Setup setup(const at::Tensor& x, const at::Tensor& fc1, const at::Tensor& fc2, const at::Tensor& sab_weight,
            c10::string_view activation) {
  check_cpu4(x, "mscam: x");
  Setup s;
  s.dt = dtype_index(x, "mscam: x");
  const int64_t C = x.size(1);
  for (auto* t : {&fc1, &fc2, &sab_weight}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4, "emcad_kernels cpu: mscam: the weights must be 4-D cpu "
                "tensors");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "emcad_kernels cpu: mscam: the weights must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  const int64_t R = fc1.size(0);
  TORCH_CHECK(R >= 1 && fc1.sizes() == at::IntArrayRef({R, C, 1, 1}), "emcad_kernels cpu: mscam: cab_fc1 must have "
              "shape [R, ", C, ", 1, 1], got ", fc1.sizes());
  TORCH_CHECK(fc2.sizes() == at::IntArrayRef({C, R, 1, 1}), "emcad_kernels cpu: mscam: cab_fc2 must have shape [",
              C, ", ", R, ", 1, 1], got ", fc2.sizes());
  const int64_t k = sab_weight.size(3);
  TORCH_CHECK(sab_weight.sizes() == at::IntArrayRef({1, 2, k, k}) && k % 2 == 1 && k <= kMaxKernel,
              "emcad_kernels cpu: mscam: sab_weight must have shape [1, 2, k, k] with odd k <= ", kMaxKernel,
              ", got ", sab_weight.sizes());
  s.act = act_id(activation);
  s.fmt = out_format(x);
  s.x = x.contiguous(s.fmt);
  s.acc = s.dt == EMCAD_DTYPE_F64 ? at::kDouble : at::kFloat;
  s.w1 = host_f64(fc1);
  s.w2 = host_f64(fc2);
  s.ws = host_f64(sab_weight);
  s.k = (int)k;
  s.N = x.size(0);
  s.C = C;
  s.H = x.size(2);
  s.W = x.size(3);
  s.R = R;
  // items: (n, band of rows), about 32 in all; a function of the shape only
  const int64_t want = std::max<int64_t>(1, (32 + s.N - 1) / std::max<int64_t>(s.N, 1));
  const int64_t nb = std::max<int64_t>(1, std::min(s.H, want));
  const int64_t band = std::max<int64_t>(1, (s.H + nb - 1) / nb);
  MscamArgs& a = s.a;
  a.x = s.x.data_ptr();
  a.N = s.N;
  a.C = C;
  a.H = s.H;
  a.W = s.W;
  a.cl = s.fmt == at::MemoryFormat::ChannelsLast ? 1 : 0;
  a.k = s.k;
  a.band = band;
  a.nbands = (s.H + band - 1) / band;
  a.wsab = s.ws.data();
  s.items = s.N * a.nbands;
  return s;
}

struct Pooled {
  at::Tensor avg, mx, idx;  // [N][C] double, double, int64
};

Pooled pool(Setup& s, bool with_idx) {
  const int64_t N = s.N, C = s.C, nb = s.a.nbands;
  auto psum = at::empty({s.items, C}, at::kDouble);
  auto pmax = at::empty({s.items, C}, at::TensorOptions().dtype(s.acc));
  auto pidx = at::empty({s.items, C}, at::kLong);
  s.a.psum = psum.data_ptr<double>();
  s.a.pmax = pmax.data_ptr();
  s.a.pidx = pidx.data_ptr<int64_t>();
  const MscamKernels& f = active_table().mscam[s.dt];
  run_items(with_idx ? f.pool_idx : f.pool, s.a, s.items);
  Pooled p{at::empty({N, C}, at::kDouble), at::empty({N, C}, at::kDouble), at::empty({N, C}, at::kLong)};
  const auto pm = pmax.to(at::kDouble);
  const double* ps = psum.data_ptr<double>();
  const double* pmv = pm.data_ptr<double>();
  const int64_t* pi = pidx.data_ptr<int64_t>();
  double* avg = p.avg.data_ptr<double>();
  double* mx = p.mx.data_ptr<double>();
  int64_t* ix = p.idx.data_ptr<int64_t>();
  const double hw = (double)(s.H * s.W);
  const int64_t none = std::numeric_limits<int64_t>::max();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0, m = -std::numeric_limits<double>::infinity();
      int64_t id = none;
      for (int64_t b = 0; b < nb; ++b) {  // bands in row order: the scan order of the reference
        const int64_t o = (n * nb + b) * C + c;
        sum += ps[o];
        const double mb = pmv[o];
        if (with_idx) {  // a later band replaces on a strictly greater value or a NaN (the last NaN wins)
          if (pi[o] != none && (id == none || mb > m || mb != mb)) {
            m = mb;
            id = pi[o];
          }
        } else if (mb > m || mb != mb) {
          m = mb;
        }
      }
      avg[n * C + c] = sum / hw;
      mx[n * C + c] = m;
      ix[n * C + c] = id == none ? 0 : id;
    }
  return p;
}

struct Cab {
  at::Tensor h_avg, h_max;  // [N][R] double, fc1 outputs
  at::Tensor ca;            // [N][C] accumulation dtype
  at::Tensor ca_d;          // the same values as double
};

Cab cab_mlp(const Setup& s, const Pooled& p) {
  const int64_t N = s.N, C = s.C, R = s.R;
  Cab o{at::empty({N, R}, at::kDouble), at::empty({N, R}, at::kDouble), {}, at::empty({N, C}, at::kDouble)};
  Vec w1t_v((size_t)(C * R)), w2t_v((size_t)(R * C));  // fc1^T [C][R], fc2^T [R][C]
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      w1t_v[c * R + r] = s.w1[r * C + c];
      w2t_v[r * C + c] = s.w2[c * R + r];
    }
  const double* w1t = w1t_v.data();
  const double* w2t = w2t_v.data();
  const double* avg = p.avg.data_ptr<double>();
  const double* mx = p.mx.data_ptr<double>();
  double* ha = o.h_avg.data_ptr<double>();
  double* hm = o.h_max.data_ptr<double>();
  double* ca = o.ca_d.data_ptr<double>();
  // loops ordered so that the inner loop runs over a contiguous output vector (no reductions to reassociate:
  // vectorised, and every sum in a fixed order)
  std::vector<double> ra((size_t)R), rm((size_t)R), za((size_t)C), zm((size_t)C);
  for (int64_t n = 0; n < N; ++n) {
    double* hav = ha + n * R;
    double* hmv = hm + n * R;
    for (int64_t r = 0; r < R; ++r) hav[r] = hmv[r] = 0;
    for (int64_t c = 0; c < C; ++c) {  // h = fc1 @ v, with w1t = fc1^T [C][R]
      const double va = avg[n * C + c], vm = mx[n * C + c];
      const double* wr = w1t + c * R;
      for (int64_t r = 0; r < R; ++r) {
        hav[r] += wr[r] * va;
        hmv[r] += wr[r] * vm;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      ra[r] = act_f(s.act, hav[r]);
      rm[r] = act_f(s.act, hmv[r]);
    }
    std::fill(za.begin(), za.end(), 0.0);
    std::fill(zm.begin(), zm.end(), 0.0);
    for (int64_t r = 0; r < R; ++r) {  // z = fc2 @ act(h), with w2t = fc2^T [R][C]
      const double* wr = w2t + r * C;
      const double a = ra[r], m = rm[r];
      for (int64_t c = 0; c < C; ++c) {
        za[c] += wr[c] * a;
        zm[c] += wr[c] * m;
      }
    }
    for (int64_t c = 0; c < C; ++c) ca[n * C + c] = 1.0 / (1.0 + std::exp(-(za[c] + zm[c])));
  }
  o.ca = o.ca_d.to(s.acc);
  o.ca_d = o.ca.to(at::kDouble);  // the rounded values the kernels use
  return o;
}

at::Tensor mscam_fwd(const at::Tensor& x, const at::Tensor& fc1, const at::Tensor& fc2, const at::Tensor& sab_weight,
                     c10::string_view activation) {
  Setup s = setup(x, fc1, fc2, sab_weight, activation);
  at::Tensor y = empty_out(x, x.sizes());
  if (x.numel() == 0) return y;
  Pooled p = pool(s, false);
  Cab cab = cab_mlp(s, p);
  s.a.ca = cab.ca.data_ptr();
  const int64_t hp = s.H + s.k - 1, wp = s.W + s.k - 1;
  at::Tensor map = at::zeros({s.N, 2, hp, wp}, at::TensorOptions().dtype(s.acc));
  s.a.map = map.data_ptr();
  const MscamKernels& f = active_table().mscam[s.dt];
  run_items(f.map, s.a, s.items);
  TORCH_CHECK(y.is_contiguous(s.fmt), "emcad_kernels cpu: mscam: internal layout error");
  s.a.y = y.data_ptr();
  run_items(f.apply, s.a, s.items);
  return y;
}

// Returns (grad x, grad fc1, grad fc2, grad sab_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mscam_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& fc1,
                                  const at::Tensor& fc2, const at::Tensor& sab_weight, c10::string_view activation) {
  Setup s = setup(x, fc1, fc2, sab_weight, activation);
  check_cpu4(grad, "mscam: grad");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "emcad_kernels cpu: mscam: grad "
              "must have x's shape and dtype");
  const int64_t N = s.N, C = s.C, R = s.R, H = s.H, W = s.W, k = s.k, kk = k * k, nb = s.a.nbands;
  at::Tensor gx = empty_out(x, x.sizes());
  if (x.numel() == 0)
    return {gx, at::zeros_like(fc1), at::zeros_like(fc2), at::zeros_like(sab_weight)};
  at::Tensor g = grad.contiguous(s.fmt);
  s.a.g = g.data_ptr();
  const MscamKernels& f = active_table().mscam[s.dt];
  Pooled p = pool(s, true);
  Cab cab = cab_mlp(s, p);
  s.a.ca = cab.ca.data_ptr();
  const auto accopt = at::TensorOptions().dtype(s.acc);
  const int64_t hp = H + k - 1, wp = W + k - 1;
  at::Tensor map = at::zeros({N, 2, hp, wp}, accopt);
  at::Tensor camax = at::empty({N, H, W}, at::kInt);
  s.a.map = map.data_ptr();
  s.a.camax = camax.data_ptr<int32_t>();
  run_items(f.map_idx, s.a, s.items);
  at::Tensor sa = at::empty({N, H, W}, accopt);
  at::Tensor gq = at::zeros({N, hp, wp}, accopt);
  s.a.sa = sa.data_ptr();
  s.a.gq = gq.data_ptr();
  run_items(f.bwd_gq, s.a, s.items);
  at::Tensor gs = at::empty({N, 2, H, W}, accopt);
  at::Tensor pz = at::empty({s.items, C}, at::kDouble);
  at::Tensor pw = at::empty({s.items, 2 * kk}, at::kDouble);
  s.a.gs = gs.data_ptr();
  s.a.pz = pz.data_ptr<double>();
  s.a.pw = pw.data_ptr<double>();
  run_items(f.bwd_gs, s.a, s.items);
  // SAB weight gradient: items in order
  at::Tensor gws = from_host(sum_items(pw.data_ptr<double>(), s.items, 2 * kk), sab_weight.sizes(),
                             sab_weight.scalar_type());
  // CAB: g_z = (sum_p g_d1 * x) * ca * (1 - ca), then the MLP backward in double
  Vec gw1((size_t)(R * C), 0.0), gw2((size_t)(C * R), 0.0);
  at::Tensor gavg = at::empty({N, C}, at::kDouble), gmax = at::empty({N, C}, at::kDouble);
  {
    const double* pzv = pz.data_ptr<double>();
    const double* ca = cab.ca_d.data_ptr<double>();
    const double* w1 = s.w1.data();
    const double* w2 = s.w2.data();
    const double* ha = cab.h_avg.data_ptr<double>();
    const double* hm = cab.h_max.data_ptr<double>();
    const double* avg = p.avg.data_ptr<double>();
    const double* mx = p.mx.data_ptr<double>();
    double* g1 = gw1.data();
    double* g2 = gw2.data();
    double* ga = gavg.data_ptr<double>();
    double* gm = gmax.data_ptr<double>();
    const double hw = (double)(H * W);
    std::vector<double> gz((size_t)C), gr((size_t)R), gha((size_t)R), ghm((size_t)R), rsum((size_t)R);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t b = 0; b < nb; ++b) t += pzv[(n * nb + b) * C + c];
        const double cv = ca[n * C + c];
        gz[c] = t * cv * (1.0 - cv);
      }
      // inner loops over contiguous outputs (vectorised, fixed order), as in cab_mlp
      std::fill(gr.begin(), gr.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {  // g_r = fc2^T g_z
        const double* wr = w2 + c * R;
        const double gc = gz[c];
        for (int64_t r = 0; r < R; ++r) gr[r] += wr[r] * gc;
      }
      for (int64_t r = 0; r < R; ++r) {
        const double a_avg = ha[n * R + r], a_max = hm[n * R + r];
        gha[r] = act_b(s.act, a_avg, gr[r]);
        ghm[r] = act_b(s.act, a_max, gr[r]);
        rsum[r] = act_f(s.act, a_avg) + act_f(s.act, a_max);
      }
      for (int64_t c = 0; c < C; ++c) {  // grad fc2 += g_z (r_avg + r_max)^T
        double* g2r = g2 + c * R;
        const double gc = gz[c];
        for (int64_t r = 0; r < R; ++r) g2r[r] += gc * rsum[r];
      }
      double* gav = ga + n * C;
      double* gmv = gm + n * C;
      for (int64_t c = 0; c < C; ++c) gav[c] = gmv[c] = 0;
      const double* av = avg + n * C;
      const double* mv = mx + n * C;
      for (int64_t r = 0; r < R; ++r) {  // g_avg / g_max = fc1^T g_h; grad fc1 += g_h v^T
        const double* wr = w1 + r * C;
        double* g1r = g1 + r * C;
        const double a = gha[r], m = ghm[r];
        for (int64_t c = 0; c < C; ++c) {
          gav[c] += wr[c] * a;
          gmv[c] += wr[c] * m;
          g1r[c] += a * av[c] + m * mv[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) gav[c] /= hw;
    }
  }
  at::Tensor gavg_a = gavg.to(s.acc), gmax_a = gmax.to(s.acc);
  s.a.gavg = gavg_a.data_ptr();
  s.a.gmax = gmax_a.data_ptr();
  s.a.gidx = p.idx.data_ptr<int64_t>();
  TORCH_CHECK(gx.is_contiguous(s.fmt), "emcad_kernels cpu: mscam: internal layout error");
  s.a.gx = gx.data_ptr();
  run_items(f.bwd_gx, s.a, s.items);
  run_items(f.fixup, s.a, N);
  return {gx, from_host(gw1, fc1.sizes(), fc1.scalar_type()), from_host(gw2, fc2.sizes(), fc2.scalar_type()), gws};
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("mscam_fwd", &mscam_fwd);
  m.impl("mscam_bwd", &mscam_bwd);
}

}  // namespace emcad_cpu
