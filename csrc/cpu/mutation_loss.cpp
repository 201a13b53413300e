// Fused MUTATION loss statistics on CPU: the op schemas, argument checks, bilinear tables, the fixed
// partition of the work and the fixed-order reductions. The per-row kernels are in mutation_loss_impl.h,
// compiled once per instruction set with all other CPU kernels (isa_<name>.cpp, kernels.h).
//
// forward:  mutation_stats_fwd_cpu_kernel(logits[n], target) -> (ce[S], inter[S,K], psq[S,K], tcount[K])
// backward: mutation_stats_bwd_cpu_kernel(grad_ce, grad_inter, grad_psq, logits[n], target) -> grads[n]
// (semantics: emcad_kernels/reference.py, mutation_stats_forward / mutation_stats_backward).
//
// Determinism: the forward splits the B*H output rows into chunks of kRowsPerChunk rows (a function of the shape
// only); every chunk accumulates its own partial sums in double and the partials are added in chunk order, so
// the result is bitwise the same for any thread count. The backward writes every row's horizontally reduced
// gradient to its own slot and then gathers over rows per source row (no atomics, no shared accumulators).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/binding_utils.h"

namespace emcad_cpu {

constexpr int64_t kRowsPerChunk = 4;

namespace {

// aten's upsample_bilinear2d (align_corners=False, no scale given) source indices and weights, in the compute
// type: scale = in / out, src = max(scale * (dst + 0.5) - 0.5, 0)
template <typename T>
void axis_table(int64_t in, int64_t out, std::vector<int64_t>& i0, std::vector<int64_t>& i1, std::vector<T>& lam) {
  i0.resize(out);
  i1.resize(out);
  lam.resize(out);
  if (in == out) {
    for (int64_t d = 0; d < out; ++d) {
      i0[d] = i1[d] = d;
      lam[d] = T(0);
    }
    return;
  }
  const T scale = static_cast<T>(in) / out;
  for (int64_t d = 0; d < out; ++d) {
    T src = scale * (d + static_cast<T>(0.5)) - static_cast<T>(0.5);
    src = src < T(0) ? T(0) : src;
    const int64_t k = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    T l = src - static_cast<T>(k);
    l = std::min(std::max(l, T(0)), T(1));
    i0[d] = k;
    i1[d] = k + (k < in - 1 ? 1 : 0);
    lam[d] = l;
  }
}

template <typename T>
struct Tables {
  std::vector<int64_t> y0, y1, x0, x1, inv_start, inv_y;
  std::vector<T> ly, lx, inv_w;
};

template <typename T>
void build(Tables<T>& tb, int64_t h, int64_t w, int64_t H, int64_t W, bool inverse) {
  axis_table<T>(h, H, tb.y0, tb.y1, tb.ly);
  axis_table<T>(w, W, tb.x0, tb.x1, tb.lx);
  if (!inverse) return;
  // for each source row ys, the output rows reading it with their weights, in increasing y
  std::vector<int64_t> count(h + 1, 0);
  for (int64_t y = 0; y < H; ++y) {
    count[tb.y0[y]]++;
    count[tb.y1[y]]++;
  }
  tb.inv_start.assign(h + 1, 0);
  for (int64_t q = 0; q < h; ++q) tb.inv_start[q + 1] = tb.inv_start[q] + count[q];
  tb.inv_y.resize(2 * H);
  tb.inv_w.resize(2 * H);
  std::vector<int64_t> pos(tb.inv_start.begin(), tb.inv_start.end() - 1);
  for (int64_t y = 0; y < H; ++y) {
    const T l = tb.ly[y];
    tb.inv_y[pos[tb.y0[y]]] = y;
    tb.inv_w[pos[tb.y0[y]]++] = T(1) - l;
    tb.inv_y[pos[tb.y1[y]]] = y;
    tb.inv_w[pos[tb.y1[y]]++] = l;
  }
}

struct Prepared {
  MlArgs a;
  int dt = 0;
  at::Tensor target;
  std::vector<Tables<float>> tf;
  std::vector<Tables<double>> td;
};

void prepare(Prepared& p, at::TensorList logits, const at::Tensor& target, bool backward) {
  const int64_t n = (int64_t)logits.size();
  TORCH_CHECK(n >= 1 && n <= kMlMaxHeads, "emcad_kernels cpu: mutation_stats: logits must hold 1 to 4 heads, got ",
              n);
  TORCH_CHECK(target.device().is_cpu() && target.dim() == 3 && target.scalar_type() == at::kLong,
              "emcad_kernels cpu: mutation_stats: target must be a (B, H, W) int64 cpu tensor, got ",
              target.scalar_type(), " ", target.sizes());
  p.dt = dtype_index(logits[0], "mutation_stats: logits");
  MlArgs& a = p.a;
  a.n = (int)n;
  a.B = target.size(0);
  a.H = target.size(1);
  a.W = target.size(2);
  a.K = logits[0].size(1);
  TORCH_CHECK(a.K >= 2, "emcad_kernels cpu: mutation_stats: logits need at least 2 classes, got ", a.K);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& z = logits[i];
    TORCH_CHECK(z.device().is_cpu() && z.dim() == 4, "emcad_kernels cpu: mutation_stats: logits[", i,
                "] must be a 4-D cpu tensor, got ", z.sizes());
    TORCH_CHECK(z.scalar_type() == logits[0].scalar_type(), "emcad_kernels cpu: mutation_stats: logits[", i,
                "] has dtype ", z.scalar_type(), ", expected ", logits[0].scalar_type());
    TORCH_CHECK(z.size(0) == a.B && z.size(1) == a.K && z.size(2) >= 1 && z.size(3) >= 1,
                "emcad_kernels cpu: mutation_stats: logits[", i, "] has shape ", z.sizes(), ", expected (", a.B,
                ", ", a.K, ", h, w)");
  }
  p.target = target;
  a.target = target.data_ptr<int64_t>();
  a.t_sn = target.stride(0);
  a.t_sh = target.stride(1);
  a.t_sw = target.stride(2);
  int ns = 0;
  // itertools.combinations(range(n), r) order, by subset size r
  for (int r = 1; r <= n; ++r) {
    std::vector<int> idx(r);
    for (int j = 0; j < r; ++j) idx[j] = j;
    while (true) {
      int mask = 0;
      for (int j : idx) mask |= 1 << j;
      a.masks[ns++] = mask;
      int j = r - 1;
      while (j >= 0 && idx[j] == (int)n - r + j) --j;
      if (j < 0) break;
      idx[j]++;
      for (int q = j + 1; q < r; ++q) idx[q] = idx[q - 1] + 1;
    }
  }
  a.nsub = ns;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& z = logits[i];
    MlHead& h = a.head[i];
    h.data = z.data_ptr();
    h.h = z.size(2);
    h.w = z.size(3);
    h.sn = z.stride(0);
    h.sc = z.stride(1);
    h.sh = z.stride(2);
    h.sw = z.stride(3);
  }
  if (p.dt == EMCAD_DTYPE_F64) {
    p.td.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      MlHead& h = a.head[i];
      auto& tb = p.td[i];
      build<double>(tb, h.h, h.w, a.H, a.W, backward);
      h.y0 = tb.y0.data(); h.y1 = tb.y1.data(); h.ly = tb.ly.data();
      h.x0 = tb.x0.data(); h.x1 = tb.x1.data(); h.lx = tb.lx.data();
      h.inv_start = tb.inv_start.data(); h.inv_y = tb.inv_y.data(); h.inv_w = tb.inv_w.data();
    }
  } else {
    p.tf.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      MlHead& h = a.head[i];
      auto& tb = p.tf[i];
      build<float>(tb, h.h, h.w, a.H, a.W, backward);
      h.y0 = tb.y0.data(); h.y1 = tb.y1.data(); h.ly = tb.ly.data();
      h.x0 = tb.x0.data(); h.x1 = tb.x1.data(); h.lx = tb.lx.data();
      h.inv_start = tb.inv_start.data(); h.inv_y = tb.inv_y.data(); h.inv_w = tb.inv_w.data();
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mutation_stats_fwd(at::TensorList logits,
                                                                               const at::Tensor& target) {
  Prepared p;
  prepare(p, logits, target, false);
  const MlArgs& a = p.a;
  const int64_t S = a.nsub, K = a.K;
  const int64_t width = S + 2 * S * K + K;
  const int64_t rows = a.B * a.H;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial((size_t)std::max<int64_t>(chunks, 1) * width, 0.0);
  std::vector<char> ok((size_t)std::max<int64_t>(chunks, 1), 1);
  const MlKernels& kern = active_table().mutation_loss[p.dt];
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kRowsPerChunk, r1 = std::min(rows, r0 + kRowsPerChunk);
      ok[c] = kern.fwd(a, r0, r1, partial.data() + c * width) ? 1 : 0;
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    TORCH_CHECK(ok[c], "emcad_kernels cpu: mutation_stats: target has values outside [0, ", K, ")");
  std::vector<double> total(width, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    const double* src = partial.data() + c * width;
    for (int64_t j = 0; j < width; ++j) total[j] += src[j];
  }
  const auto sdt = p.dt == EMCAD_DTYPE_F64 ? at::kDouble : at::kFloat;
  const double* t = total.data();  // [ce (S) | inter (S*K) | psq (S*K) | tcount (K)]
  return {from_host(t, {S}, sdt), from_host(t + S, {S, K}, sdt), from_host(t + S + S * K, {S, K}, sdt),
          from_host(t + S + 2 * S * K, {K}, sdt)};
}

std::vector<at::Tensor> mutation_stats_bwd(const at::Tensor& grad_ce, const at::Tensor& grad_inter,
                                           const at::Tensor& grad_psq, at::TensorList logits,
                                           const at::Tensor& target) {
  Prepared p;
  prepare(p, logits, target, true);
  MlArgs& a = p.a;
  const int64_t S = a.nsub, K = a.K;
  TORCH_CHECK(grad_ce.numel() == S && grad_inter.numel() == S * K && grad_psq.numel() == S * K,
              "emcad_kernels cpu: mutation_stats backward: gradients must have shapes (", S, ",), (", S, ", ", K,
              "), (", S, ", ", K, ")");
  const auto cdt = p.dt == EMCAD_DTYPE_F64 ? at::kDouble : at::kFloat;
  const at::Tensor gce = grad_ce.to(cdt).contiguous(), gin = grad_inter.to(cdt).contiguous(),
                   gps = grad_psq.to(cdt).contiguous();
  a.g_ce = gce.data_ptr();
  a.g_inter = gin.data_ptr();
  a.g_psq = gps.data_ptr();
  std::vector<at::Tensor> hbufs, grads;
  for (int i = 0; i < a.n; ++i) {
    MlHead& h = a.head[i];
    hbufs.push_back(at::empty({a.B * a.H, K, h.w}, at::TensorOptions().dtype(cdt)));
    h.hbuf = hbufs.back().data_ptr();
    grads.push_back(at::empty(logits[i].sizes(), logits[i].options().memory_format(out_format(logits[i]))));
    h.grad = grads.back().data_ptr();
    h.g_sn = grads.back().stride(0);
    h.g_sc = grads.back().stride(1);
    h.g_sh = grads.back().stride(2);
    h.g_sw = grads.back().stride(3);
  }
  const MlKernels& kern = active_table().mutation_loss[p.dt];
  const int64_t rows = a.B * a.H;
  std::vector<char> ok((size_t)std::max<int64_t>(rows, 1), 1);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) { ok[r0] = kern.bwd(a, r0, r1) ? 1 : 0; });
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(ok[r], "emcad_kernels cpu: mutation_stats: target has values outside [0, ", K, ")");
  for (int i = 0; i < a.n; ++i) {
    at::parallel_for(0, a.B * a.head[i].h, 1,
                     [&](int64_t q0, int64_t q1) { kern.gather(a, i, q0, q1); });
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(emcad_kernels, CPU, m) {
  m.impl("mutation_stats_fwd", &mutation_stats_fwd);
  m.impl("mutation_stats_bwd", &mutation_stats_bwd);
}

}  // namespace emcad_cpu
