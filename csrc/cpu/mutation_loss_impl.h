// Fused MUTATION loss statistics, per-row kernels, compiled once per instruction set inside namespace
// emcad_cpu::isa_<name> (isa_target.h). Interface (MlArgs, MlKernels):
// cpu/mutation_loss.h; torch binding: cpu/mutation_loss.cpp. No torch headers: raw pointers and strides.
//
// One *row* is one output row (b, y) of the full-resolution target. For a row the kernels
//   1. interpolate every low-res head vertically (two source rows) then horizontally into a (K, W) buffer;
//   2. for each of the 2^n - 1 subsets sum the heads' buffers, take a softmax over K and
//      forward: accumulate CE, sum p[target] and sum p^2 of the row (vectorised over the row's pixels);
//      backward: form dz and add it to the (K, W) gradient buffer of every head in the subset;
//   3. backward only: reduce each head's (K, W) gradient horizontally into (K, w_i) (bilinear adjoint along x,
//      sequential over x, so deterministic); the vertical adjoint is a gather over rows done afterwards.
// Nothing here depends on the thread count.
#pragma once

namespace ml {

using emcad::load_val;
using emcad::store_val;

// ---- vectorisable exp / log (float); double uses libm --------------------------------------------------
static inline float ml_exp(float x) {
  // Cephes expf: |rel err| ~ 1 ulp on the clamped range; x <= 0 here (logits minus their max)
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round to nearest via 1.5 * 2^23
  const float fx = t - 12582912.0f;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t n = (int32_t)fx;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}

static inline float ml_log(float v) {
  // Cephes logf for v > 0 normal (here v in [1, K])
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(float));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  const int32_t mb = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mb, sizeof(float));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  const float x = small ? m + m - 1.0f : m - 1.0f;
  const float fe = (float)e;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return x + y + 0.693359375f * fe;
}

static inline double ml_exp(double x) { return std::exp(x); }
static inline double ml_log(double x) { return std::log(x); }

// ---- row kernels -------------------------------------------------------------------------------------------
template <typename S, typename T>
struct RowWork {
  const MlArgs& a;
  std::vector<T> u;     // [n][K][W] upsampled heads of this row
  std::vector<T> vrow;  // [K][maxw] vertically interpolated source row
  std::vector<T> zs;    // [K][W] subset logits, then softmax
  std::vector<T> m, ssum, lse, dot;  // [W]
  std::vector<int64_t> tgt;          // [W]
  std::vector<T> grow;  // backward: [n][K][W]

  explicit RowWork(const MlArgs& args, bool backward) : a(args) {
    const int64_t K = a.K, W = a.W;
    int64_t maxw = 1;
    for (int i = 0; i < a.n; ++i) maxw = std::max<int64_t>(maxw, a.head[i].w);
    u.assign((size_t)a.n * K * W, T(0));
    vrow.assign((size_t)K * maxw, T(0));
    zs.assign((size_t)K * W, T(0));
    m.assign(W, T(0));
    ssum.assign(W, T(0));
    lse.assign(W, T(0));
    dot.assign(W, T(0));
    tgt.assign(W, 0);
    if (backward) grow.assign((size_t)a.n * K * W, T(0));
  }

  // loads the target row and the upsampled heads; returns false if a target value is out of range
  bool load(int64_t b, int64_t y) {
    const int64_t K = a.K, W = a.W;
    bool ok = true;
    const int64_t* tp = a.target + b * a.t_sn + y * a.t_sh;
    for (int64_t x = 0; x < W; ++x) {
      int64_t t = tp[x * a.t_sw];
      if (t < 0 || t >= K) {
        ok = false;
        t = 0;
      }
      tgt[x] = t;
    }
    for (int i = 0; i < a.n; ++i) {
      const MlHead& h = a.head[i];
      const S* base = static_cast<const S*>(h.data) + b * h.sn;
      const int64_t y0 = h.y0[y], y1 = h.y1[y];
      const T ly = static_cast<const T*>(h.ly)[y], hy = T(1) - ly;
      for (int64_t c = 0; c < K; ++c) {
        const S* r0 = base + c * h.sc + y0 * h.sh;
        const S* r1 = base + c * h.sc + y1 * h.sh;
        T* vr = vrow.data() + c * h.w;
        for (int64_t xs = 0; xs < h.w; ++xs)
          vr[xs] = hy * static_cast<T>(load_val(r0 + xs * h.sw)) + ly * static_cast<T>(load_val(r1 + xs * h.sw));
      }
      const int64_t* x0 = h.x0;
      const int64_t* x1 = h.x1;
      const T* lx = static_cast<const T*>(h.lx);
      for (int64_t c = 0; c < K; ++c) {
        const T* vr = vrow.data() + c * h.w;
        T* ur = u.data() + ((size_t)i * K + c) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) ur[x] = (T(1) - lx[x]) * vr[x0[x]] + lx[x] * vr[x1[x]];
      }
    }
    return ok;
  }

  // softmax of the subset `mask` into zs (probabilities); lse and the subset logits at the target are kept
  // for the CE: returns the row's CE sum when `want_ce`
  T softmax(int mask, bool want_ce) {
    const int64_t K = a.K, W = a.W;
    int first = -1;
    for (int i = 0; i < a.n; ++i) {
      if (!(mask >> i & 1)) continue;
      const T* ui = u.data() + (size_t)i * K * W;
      if (first < 0) {
        std::memcpy(zs.data(), ui, sizeof(T) * K * W);
        first = i;
      } else {
        for (int64_t j = 0; j < K * W; ++j) zs[j] += ui[j];
      }
    }
    T* mm = m.data();
    std::memcpy(mm, zs.data(), sizeof(T) * W);
    for (int64_t c = 1; c < K; ++c) {
      const T* zr = zs.data() + c * W;
#pragma omp simd
      for (int64_t x = 0; x < W; ++x) mm[x] = zr[x] > mm[x] ? zr[x] : mm[x];
    }
    T ce = T(0);
    if (want_ce) {
      const T* z = zs.data();
      const int64_t* t = tgt.data();
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t x = 0; x < W; ++x) acc += z[t[x] * W + x] - mm[x];
      ce = -acc;  // -(z_t - m); + log(sum) below
    }
    T* sm = ssum.data();
    std::fill(sm, sm + W, T(0));
    for (int64_t c = 0; c < K; ++c) {
      T* zr = zs.data() + c * W;
#pragma omp simd
      for (int64_t x = 0; x < W; ++x) {
        const T e = ml_exp(zr[x] - mm[x]);
        zr[x] = e;
        sm[x] += e;
      }
    }
    T* ls = lse.data();
    if (want_ce) {
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t x = 0; x < W; ++x) acc += ml_log(sm[x]);
      ce += acc;
    }
#pragma omp simd
    for (int64_t x = 0; x < W; ++x) ls[x] = T(1) / sm[x];
    for (int64_t c = 0; c < K; ++c) {
      T* zr = zs.data() + c * W;
#pragma omp simd
      for (int64_t x = 0; x < W; ++x) zr[x] *= ls[x];
    }
    return ce;
  }
};

// Forward over rows [r0, r1) of the B*H rows; adds into out[S + 2*S*K + K] (double, this chunk's partial):
// ce[S], inter[S][K], psq[S][K], tcount[K]. Returns false if a target value was out of range.
template <typename S, typename T = typename emcad::AccType<S>::type>
bool ml_forward_rows(const MlArgs& a, int64_t r0, int64_t r1, double* out) {
  RowWork<S, T> w(a, false);
  const int64_t K = a.K, W = a.W, NS = a.nsub;
  double* ce = out;
  double* inter = out + NS;
  double* psq = inter + NS * K;
  double* tcount = psq + NS * K;
  bool ok = true;
  std::vector<T> rowinter(4 * K);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.H, y = r % a.H;
    ok = w.load(b, y) && ok;
    for (int64_t x = 0; x < W; ++x) tcount[w.tgt[x]] += 1.0;
    for (int64_t s = 0; s < NS; ++s) {
      ce[s] += (double)w.softmax(a.masks[s], true);
      // four interleaved partial arrays: neighbouring pixels mostly share a class, so one array would make
      // a single serial chain of dependent adds
      std::fill(rowinter.begin(), rowinter.end(), T(0));
      T* ri = rowinter.data();
      int64_t x = 0;
      for (; x + 4 <= W; x += 4) {
        for (int64_t j = 0; j < 4; ++j) ri[j * K + w.tgt[x + j]] += w.zs[w.tgt[x + j] * W + x + j];
      }
      for (; x < W; ++x) ri[w.tgt[x]] += w.zs[w.tgt[x] * W + x];
      for (int64_t c = 0; c < K; ++c) {
        inter[s * K + c] += (double)(((ri[c] + ri[K + c]) + ri[2 * K + c]) + ri[3 * K + c]);
        const T* pr = w.zs.data() + c * W;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t x = 0; x < W; ++x) acc += pr[x] * pr[x];
        psq[s * K + c] += (double)acc;
      }
    }
  }
  return ok;
}

// Backward over rows [r0, r1): writes, per head i and row (b, y), the horizontally reduced gradient
// hbuf_i[(b * H + y) * K * w_i + c * w_i + xs].
template <typename S, typename T = typename emcad::AccType<S>::type>
bool ml_backward_rows(const MlArgs& a, int64_t r0, int64_t r1) {
  RowWork<S, T> w(a, true);
  const int64_t K = a.K, W = a.W, NS = a.nsub;
  const T* gce = static_cast<const T*>(a.g_ce);
  const T* gin = static_cast<const T*>(a.g_inter);
  const T* gps = static_cast<const T*>(a.g_psq);
  bool ok = true;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.H, y = r % a.H;
    ok = w.load(b, y) && ok;
    std::fill(w.grow.begin(), w.grow.end(), T(0));
    for (int64_t s = 0; s < NS; ++s) {
      w.softmax(a.masks[s], false);
      const T gc = gce[s];
      const T* gi = gin + s * K;
      const T* gp = gps + s * K;
      T* dt = w.dot.data();
      // <g, p> = gi[t] p_t + 2 sum_c gp_c p_c^2
      // p_t is kept in `m` (free after the softmax) for the one-hot terms below
      for (int64_t x = 0; x < W; ++x) {
        const T pt = w.zs[w.tgt[x] * W + x];
        w.m[x] = pt;
        dt[x] = gi[w.tgt[x]] * pt;
      }
      for (int64_t c = 0; c < K; ++c) {
        const T two_gp = T(2) * gp[c];
        const T* pr = w.zs.data() + c * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) dt[x] += two_gp * pr[x] * pr[x];
      }
      // dz_c = p_c (gc + 2 gp_c p_c - <g,p>) + [c == t] (gi_t p_t - gc); written back into zs
      for (int64_t c = 0; c < K; ++c) {
        const T two_gp = T(2) * gp[c];
        T* pr = w.zs.data() + c * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) pr[x] = pr[x] * (gc + two_gp * pr[x] - dt[x]);
      }
      for (int64_t x = 0; x < W; ++x) {
        const int64_t t = w.tgt[x];
        w.zs[t * W + x] += gi[t] * w.m[x] - gc;
      }
      for (int i = 0; i < a.n; ++i) {
        if (!(a.masks[s] >> i & 1)) continue;
        T* gr = w.grow.data() + (size_t)i * K * W;
        for (int64_t j = 0; j < K * W; ++j) gr[j] += w.zs[j];
      }
    }
    // horizontal adjoint into (K, w_i), sequential over x
    for (int i = 0; i < a.n; ++i) {
      const MlHead& h = a.head[i];
      T* hb = static_cast<T*>(h.hbuf) + r * K * h.w;
      std::fill(hb, hb + K * h.w, T(0));
      const T* lx = static_cast<const T*>(h.lx);
      // x outer, classes inner: K independent accumulation chains instead of one (same order per element)
      const T* gi0 = w.grow.data() + (size_t)i * K * W;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t a0 = h.x0[x], a1 = h.x1[x];
        const T l1 = lx[x], l0 = T(1) - l1;
        for (int64_t c = 0; c < K; ++c) {
          const T gv = gi0[c * W + x];
          hb[c * h.w + a0] += l0 * gv;
          hb[c * h.w + a1] += l1 * gv;
        }
      }
    }
  }
  return ok;
}

// Vertical adjoint of head i for source rows [q0, q1) of the B*h_i source rows: a gather over the full-res rows
// that read each source row (fixed order: increasing y), written to the gradient in its own strides.
template <typename S, typename T = typename emcad::AccType<S>::type>
void ml_gather_rows(const MlArgs& a, int i, int64_t q0, int64_t q1) {
  const MlHead& h = a.head[i];
  const int64_t K = a.K;
  std::vector<T> acc((size_t)K * h.w);
  const T* hbuf = static_cast<const T*>(h.hbuf);
  const T* wts = static_cast<const T*>(h.inv_w);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t b = q / h.h, ys = q % h.h;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t j = h.inv_start[ys]; j < h.inv_start[ys + 1]; ++j) {
      const T wt = wts[j];
      const T* src = hbuf + (b * a.H + h.inv_y[j]) * K * h.w;
#pragma omp simd
      for (int64_t e = 0; e < K * h.w; ++e) acc[e] += wt * src[e];
    }
    S* out = static_cast<S*>(h.grad) + b * h.g_sn + ys * h.g_sh;
    for (int64_t c = 0; c < K; ++c)
      for (int64_t xs = 0; xs < h.w; ++xs) store_val(out + c * h.g_sc + xs * h.g_sw, acc[c * h.w + xs]);
  }
}

// the kernels of logits type S (MlKernels, mutation_loss.h)
template <typename S>
MlKernels ml_kernels() {
  MlKernels k;
  k.fwd = ml_forward_rows<S>;
  k.bwd = ml_backward_rows<S>;
  k.gather = ml_gather_rows<S>;
  return k;
}

}  // namespace ml
