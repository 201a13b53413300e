// Helpers shared by the stencil kernels of multi_scale_dwconv (msdc_impl.h), upsample_dwconv (updw_impl.h) and
// grouped_attention_gate (lgag_impl.h): padded row buffers, row loads/stores with dtype and layout conversion,
// register-blocked stencil cores and per-lane row reductions (multidilation_impl.h uses Scratch and the dtype
// conversions). Compiled once per instruction set inside namespace emcad_cpu::isa_<name> with kPixelBlock
// defined (isa_target.h). No torch headers; everything is raw pointers.
//
// Design (KERNELS.md §6, §7; EMCAD.md §11):
// * Every stencil runs on thread-local, zero-padded row buffers in "pixel-major, channel-block" layout
//   [column][slot][CB], CB = 64 bytes of the accumulation type (16 floats / 8 doubles). Loading a row
//   converts the storage dtype (fp32 / fp64 / bf16) and any layout or strides (NCHW, channels_last,
//   non-contiguous, overlapping) into that layout, so the inner loops are branch-free, vectorised over
//   channels and blocked over output pixels (register accumulators), whatever the input layout.
// * Rows live in small ring buffers: each input row is read from memory once per pass.
// * Outputs are stored through the output's strides with a per-lane channel map (channel shuffle on store).
// * Reductions (BN statistics, BN-backward sums, weight gradients) accumulate per row in the accumulation
//   type, then per item in double; items are defined by the shape only and their partials are reduced by
//   the bindings in a fixed order: bitwise reproducible for any thread count.
// * Statistics use per-row (mean, M2) merged with Chan's formula (no E[z^2] - E[z]^2 cancellation).
#pragma once

using emcad::bf16;
using emcad::load_val;
using emcad::store_val;

template <typename A>
constexpr int lanes_of() {
  return static_cast<int>(64 / sizeof(A));
}

// ------------------------------------------------------------------------------------------------------
// small utilities
// ------------------------------------------------------------------------------------------------------
template <typename T>
struct Scratch {
  T* p = nullptr;
  size_t n = 0;
  Scratch() = default;
  explicit Scratch(size_t count) { alloc(count); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(p); }
  void alloc(size_t count) {
    std::free(p);
    size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    n = count;
  }
  void zero() { std::memset(p, 0, n * sizeof(T)); }
  T* get() const { return p; }
};

// f(std::integral_constant<int, ACT>{}) for the run-time activation code act (anything else: identity), so that
// the kernels are compiled once per activation. Defined here, under the instruction set's target pragma, not
// next to act_fwd: a helper compiled for the default target changes which calls get inlined into the kernels,
// and with that which multiply-adds the compiler contracts into FMAs (different rounding).
template <typename F>
inline void with_act(int act, F&& f) {
  switch (act) {
    case EMCAD_ACT_RELU: f(std::integral_constant<int, EMCAD_ACT_RELU>{}); break;
    case EMCAD_ACT_RELU6: f(std::integral_constant<int, EMCAD_ACT_RELU6>{}); break;
    case EMCAD_ACT_LEAKYRELU: f(std::integral_constant<int, EMCAD_ACT_LEAKYRELU>{}); break;
    case EMCAD_ACT_HSWISH: f(std::integral_constant<int, EMCAD_ACT_HSWISH>{}); break;
    default: f(std::integral_constant<int, EMCAD_ACT_IDENTITY>{}); break;
  }
}

template <typename F>
inline void with_k(int k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 9: f(std::integral_constant<int, 9>{}); break;
    default: throw std::runtime_error("emcad_kernels cpu: kernel size out of range");
  }
}

// ------------------------------------------------------------------------------------------------------
// vectorised transposes between channel-planar rows (NCHW-like: each lane a contiguous row) and the
// pixel-major row buffers, for fp32 / bf16 storage; they return the number of columns done (the rest is
// left to the scalar code). Other dtypes and the baseline ISA use the scalar code only.
// ------------------------------------------------------------------------------------------------------
template <typename S, typename A>
inline int64_t load_planar_fast(const S*, const int64_t*, int, int64_t, A*, int64_t) {
  return 0;
}
template <typename S, typename A>
inline int64_t store_planar_fast(S*, const int64_t*, int, int64_t, const A*, int64_t) {
  return 0;
}

#if defined(EMCAD_ISA_AVX512)
// in-register transpose of 16 rows of 16 floats: r[i][j] -> r[j][i]
inline void tr16x16_ps(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 0]), _mm512_castps_pd(t[4 * i + 2])));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 0]), _mm512_castps_pd(t[4 * i + 2])));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif
#if defined(EMCAD_ISA_AVX2) || defined(EMCAD_ISA_AVX512)
inline void tr8x8_ps(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  u[0] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(1, 0, 1, 0));
  u[1] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(3, 2, 3, 2));
  u[2] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(1, 0, 1, 0));
  u[3] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(3, 2, 3, 2));
  u[4] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(1, 0, 1, 0));
  u[5] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(3, 2, 3, 2));
  u[6] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(1, 0, 1, 0));
  u[7] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(3, 2, 3, 2));
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

#if defined(EMCAD_ISA_AVX512)
EMCAD_INLINE __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
EMCAD_INLINE __m512 ld16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
EMCAD_INLINE void st16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
EMCAD_INLINE void st16(bf16* p, __m512 v) {  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
template <typename S>
inline int64_t load_planar16(const S* base, const int64_t* off, int lanes, int64_t W, float* d0, int64_t ps) {
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {
    __m512 r[16];
    for (int l = 0; l < 16; ++l) r[l] = l < lanes ? ld16(base + off[l] + w) : _mm512_setzero_ps();
    tr16x16_ps(r);
    for (int u = 0; u < 16; ++u) _mm512_storeu_ps(d0 + (w + u) * ps, r[u]);
  }
  return w;
}
template <typename S>
inline int64_t store_planar16(S* base, const int64_t* off, int lanes, int64_t W, const float* src, int64_t ps) {
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {
    __m512 r[16];
    for (int u = 0; u < 16; ++u) r[u] = _mm512_loadu_ps(src + (w + u) * ps);
    tr16x16_ps(r);
    for (int l = 0; l < lanes; ++l) st16(base + off[l] + w, r[l]);
  }
  return w;
}
template <>
inline int64_t load_planar_fast<float, float>(const float* b, const int64_t* o, int n, int64_t W, float* d, int64_t ps) {
  return load_planar16(b, o, n, W, d, ps);
}
template <>
inline int64_t load_planar_fast<bf16, float>(const bf16* b, const int64_t* o, int n, int64_t W, float* d, int64_t ps) {
  return load_planar16(b, o, n, W, d, ps);
}
template <>
inline int64_t store_planar_fast<float, float>(float* b, const int64_t* o, int n, int64_t W, const float* s,
                                               int64_t ps) {
  return store_planar16(b, o, n, W, s, ps);
}
template <>
inline int64_t store_planar_fast<bf16, float>(bf16* b, const int64_t* o, int n, int64_t W, const float* s,
                                              int64_t ps) {
  return store_planar16(b, o, n, W, s, ps);
}
#elif defined(EMCAD_ISA_AVX2)
EMCAD_INLINE __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
EMCAD_INLINE __m256 ld8(const bf16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
template <typename S>
inline int64_t load_planar8(const S* base, const int64_t* off, int lanes, int64_t W, float* d0, int64_t ps) {
  int64_t w = 0;
  for (; w + 8 <= W; w += 8)
    for (int h = 0; h < 2; ++h) {  // lanes 8h .. 8h+7
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = 8 * h + i < lanes ? ld8(base + off[8 * h + i] + w) : _mm256_setzero_ps();
      tr8x8_ps(r);
      for (int u = 0; u < 8; ++u) _mm256_storeu_ps(d0 + (w + u) * ps + 8 * h, r[u]);
    }
  return w;
}
template <>
inline int64_t load_planar_fast<float, float>(const float* b, const int64_t* o, int n, int64_t W, float* d, int64_t ps) {
  return load_planar8(b, o, n, W, d, ps);
}
template <>
inline int64_t load_planar_fast<bf16, float>(const bf16* b, const int64_t* o, int n, int64_t W, float* d, int64_t ps) {
  return load_planar8(b, o, n, W, d, ps);
}
template <>
inline int64_t store_planar_fast<float, float>(float* base, const int64_t* off, int lanes, int64_t W, const float* src,
                                               int64_t ps) {
  int64_t w = 0;
  for (; w + 8 <= W; w += 8)
    for (int h = 0; h < 2; ++h) {
      __m256 r[8];
      for (int u = 0; u < 8; ++u) r[u] = _mm256_loadu_ps(src + (w + u) * ps + 8 * h);
      tr8x8_ps(r);
      for (int i = 0; i < 8 && 8 * h + i < lanes; ++i) _mm256_storeu_ps(base + off[8 * h + i] + w, r[i]);
    }
  return w;
}
#endif

// Loads row `row` of image n (out of range: zeros) into `dst`, a row of `wp` pixels with pixel stride `ps`
// elements; image column w goes to pixel padl + w; lane l < lanes reads element offset off[l] (channel
// times channel stride); other lanes and the padding pixels are zero. `contig`: off[l] = off[0] + l.
template <typename S, typename A>
void load_row(const View4& v, int64_t n, int64_t row, const int64_t* off, int lanes, bool contig, A* dst,
              int wp, int ps, int padl) {
  constexpr int CB = lanes_of<A>();
  if (row < 0 || row >= v.h) {
    for (int q = 0; q < wp; ++q)
      for (int l = 0; l < CB; ++l) dst[(size_t)q * ps + l] = A(0);
    return;
  }
  for (int q = 0; q < padl; ++q)
    for (int l = 0; l < CB; ++l) dst[(size_t)q * ps + l] = A(0);
  for (int64_t q = padl + v.w; q < wp; ++q)
    for (int l = 0; l < CB; ++l) dst[(size_t)q * ps + l] = A(0);
  const S* base = static_cast<const S*>(v.data) + n * v.sn + row * v.sh;
  A* d0 = dst + (size_t)padl * ps;
  const int64_t W = v.w, sw = v.sw;
  if (contig && lanes == CB) {
    const S* src = base + off[0];
    for (int64_t w = 0; w < W; ++w) {
      const S* s = src + w * sw;
      A* d = d0 + w * ps;
#pragma omp simd
      for (int l = 0; l < CB; ++l) d[l] = load_val(s + l);
    }
    return;
  }
  if (lanes < CB)
    for (int64_t w = 0; w < W; ++w)
      for (int l = lanes; l < CB; ++l) d0[w * ps + l] = A(0);
  if (contig) {
    const S* src = base + off[0];
    for (int64_t w = 0; w < W; ++w)
      for (int l = 0; l < lanes; ++l) d0[w * ps + l] = load_val(src + w * sw + l);
    return;
  }
  if (sw == 1) {
    // NCHW-like: each lane is a contiguous row; vector transposes, then 8 columns at a time through registers
    int64_t w = load_planar_fast<S, A>(base, off, lanes, W, d0, ps);
    for (; w + 8 <= W; w += 8) {
      for (int l = 0; l < lanes; ++l) {
        const S* s = base + off[l] + w;
        A t[8];
        for (int u = 0; u < 8; ++u) t[u] = load_val(s + u);
        for (int u = 0; u < 8; ++u) d0[(w + u) * ps + l] = t[u];
      }
    }
    for (; w < W; ++w)
      for (int l = 0; l < lanes; ++l) d0[w * ps + l] = load_val(base + off[l] + w);
    return;
  }
  // generic strides (e.g. channels_last with a permuted channel map): pixel-major for locality
  for (int64_t w = 0; w < W; ++w) {
    const S* s = base + w * sw;
    A* d = d0 + w * ps;
    for (int l = 0; l < lanes; ++l) d[l] = load_val(s + off[l]);
  }
}

// Stores pixels [0, count) of `src` (pixel stride ps) to row `row` of image n; lane l goes to element offset
// off[l]. `contig`: off[l] = off[0] + l.
template <typename S, typename A>
void store_row(const View4& v, int64_t n, int64_t row, const int64_t* off, int lanes, bool contig, const A* src,
               int64_t count, int ps) {
  constexpr int CB = lanes_of<A>();
  S* base = static_cast<S*>(v.data) + n * v.sn + row * v.sh;
  const int64_t sw = v.sw;
  if (contig) {
    S* dst = base + off[0];
    if (lanes == CB) {
      for (int64_t w = 0; w < count; ++w) {
        S* d = dst + w * sw;
        const A* s = src + w * ps;
#pragma omp simd
        for (int l = 0; l < CB; ++l) store_val(d + l, s[l]);
      }
    } else {
      for (int64_t w = 0; w < count; ++w)
        for (int l = 0; l < lanes; ++l) store_val(dst + w * sw + l, src[w * ps + l]);
    }
    return;
  }
  if (sw == 1) {
    int64_t w = store_planar_fast<S, A>(base, off, lanes, count, src, ps);
    for (; w + 8 <= count; w += 8) {
      for (int l = 0; l < lanes; ++l) {
        S* d = base + off[l] + w;
        for (int u = 0; u < 8; ++u) store_val(d + u, src[(w + u) * ps + l]);
      }
    }
    for (; w < count; ++w)
      for (int l = 0; l < lanes; ++l) store_val(base + off[l] + w, src[w * ps + l]);
    return;
  }
  for (int64_t w = 0; w < count; ++w) {
    S* d = base + w * sw;
    const A* s = src + w * ps;
    for (int l = 0; l < lanes; ++l) store_val(d + off[l], s[l]);
  }
}

inline bool lanes_contiguous(const int64_t* off, int lanes) {
  for (int l = 1; l < lanes; ++l)
    if (off[l] != off[0] + l) return false;
  return true;
}

// ------------------------------------------------------------------------------------------------------
// grouped row I/O for channels_last-like tensors (unit channel stride): one sweep over the pixels moves
// every channel block of an item, so each pixel line is read or written completely at once
// ------------------------------------------------------------------------------------------------------
// Loads row `row` of image n for blocks bi < nbk whose lanes are the consecutive channels
// c_first + bi*CB + l (lanes of the last block: lanes_last) into padded rows dst[bi] (pixel stride CB).
template <typename S, typename A>
void load_row_blocks(const View4& v, int64_t n, int64_t row, int64_t c_first, int nbk, int lanes_last,
                     A* const* dst, int wp, int padl) {
  constexpr int CB = lanes_of<A>();
  const int64_t W = v.w;
  for (int bi = 0; bi < nbk; ++bi) {
    A* d = dst[bi];
    if (row < 0 || row >= v.h) {
      std::memset(d, 0, sizeof(A) * (size_t)wp * CB);
      continue;
    }
    std::memset(d, 0, sizeof(A) * (size_t)padl * CB);
    std::memset(d + (padl + W) * CB, 0, sizeof(A) * (size_t)(wp - padl - W) * CB);
  }
  if (row < 0 || row >= v.h) return;
  const S* base = static_cast<const S*>(v.data) + n * v.sn + row * v.sh + c_first;
  const int full = lanes_last == CB ? nbk : nbk - 1;
  for (int64_t w = 0; w < W; ++w) {
    const S* src = base + w * v.sw;
    for (int bi = 0; bi < full; ++bi) {
      A* d = dst[bi] + (padl + w) * CB;
      const S* sp = src + bi * CB;
#pragma omp simd
      for (int l = 0; l < CB; ++l) d[l] = load_val(sp + l);
    }
    if (full < nbk) {
      A* d = dst[full] + (padl + w) * CB;
      const S* sp = src + full * CB;
      for (int l = 0; l < CB; ++l) d[l] = l < lanes_last ? load_val(sp + l) : A(0);
    }
  }
}

// How the lanes of a block map to the channels of one pixel: consecutive, two interleaved runs (the channel
// shuffle of EMCAD's MSCB, lanes 2i -> run 0, 2i+1 -> run 1) or anything (scalar).
enum LaneMap : int { kLanesContig = 0, kLanesRuns2 = 1, kLanesScalar = 2 };

inline int lane_map(const int64_t* off, int lanes, int CB, int64_t sc) {
  if (sc == 1 && lanes_contiguous(off, lanes)) return kLanesContig;
  if (sc == 1 && lanes == CB && CB % 2 == 0) {
    bool ok = true;
    for (int l = 0; l < lanes && ok; ++l) ok = off[l] == off[l % 2] + l / 2;
    if (ok) return kLanesRuns2;
  }
  return kLanesScalar;
}

// Stores the nbk blocks of one output row with one sweep over the pixels: block bi from src[bi] (pixel
// stride CB) to channel offsets off[bi*CB + l], lanes lanes[bi], mapping kind map[bi].
template <typename S, typename A>
void store_row_blocks(const View4& v, int64_t n, int64_t row, int nbk, A* const* src, const int64_t* off,
                      const int* lanes, const int* map, int64_t count) {
  constexpr int CB = lanes_of<A>();
  S* base = static_cast<S*>(v.data) + n * v.sn + row * v.sh;
  for (int64_t w = 0; w < count; ++w) {
    S* px = base + w * v.sw;
    for (int bi = 0; bi < nbk; ++bi) {
      const A* sp = src[bi] + w * CB;
      const int64_t* o = off + (size_t)bi * CB;
      if (map[bi] == kLanesContig && lanes[bi] == CB) {
        S* d = px + o[0];
#pragma omp simd
        for (int l = 0; l < CB; ++l) store_val(d + l, sp[l]);
      } else if (map[bi] == kLanesRuns2) {
        S* d0 = px + o[0];
        S* d1 = px + o[1];
#pragma omp simd
        for (int i = 0; i < CB / 2; ++i) {
          store_val(d0 + i, sp[2 * i]);
          store_val(d1 + i, sp[2 * i + 1]);
        }
      } else {
        for (int l = 0; l < lanes[bi]; ++l) store_val(px + o[l], sp[l]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// stencil cores (templated on the kernel size K and the slots per lane J; J = 0: runtime slot count jn)
// ------------------------------------------------------------------------------------------------------
// NP output pixels starting at o, accumulated in registers
template <int K, int J, int NP, typename A>
EMCAD_INLINE void conv_px(const A* const* rows, const A* __restrict__ w, const A* __restrict__ init, int64_t o,
                          int64_t pstep, int64_t ps, int JJ, A* __restrict__ out, int64_t ostep) {
  constexpr int CB = lanes_of<A>();
  A acc[NP][CB];
  for (int p = 0; p < NP; ++p)
    for (int l = 0; l < CB; ++l) acc[p][l] = init ? init[l] : A(0);
  for (int dy = 0; dy < K; ++dy) {  // rows are not unrolled: keeps the code (and compile time) small
    const A* xr = rows[dy] + o * pstep;
#pragma GCC unroll 9
    for (int dx = 0; dx < K; ++dx) {
      for (int j = 0; j < JJ; ++j) {
        const A* wp = w + ((dy * K + dx) * JJ + j) * CB;
        const A* xp = xr + dx * ps + j * CB;
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p)
#pragma omp simd
          for (int l = 0; l < CB; ++l) acc[p][l] += wp[l] * xp[p * pstep + l];
      }
    }
  }
  for (int p = 0; p < NP; ++p)
#pragma omp simd
    for (int l = 0; l < CB; ++l) out[(o + p) * ostep * CB + l] = acc[p][l];
}

// out[o*ostep] = init + sum_{dy,dx,j} w[(dy*K+dx)*JJ + j] * rows[dy][(o*colstep + dx)*ps + j*CB],
// o in [0, n_out); rows[dy] point at the first pixel of the window for o = 0. Pixels are blocked by PB
// (register accumulators), then PB/2 for short rows, then one at a time.
template <int K, int J, typename A>
__attribute__((noinline)) void conv_row(const A* const* rows, const A* __restrict__ w, const A* __restrict__ init,
                                        int n_out, int colstep, int jn, A* __restrict__ out, int ostep) {
  constexpr int CB = lanes_of<A>();
  // fp64 is the verification dtype: smaller blocks keep the code size down
  constexpr int PB = sizeof(A) == 8 ? (kPixelBlock > 1 ? kPixelBlock / 2 : 1) : kPixelBlock;
  const int JJ = J > 0 ? J : jn;
  const int64_t ps = (int64_t)JJ * CB;
  const int64_t pstep = (int64_t)colstep * ps;
  int64_t o = 0;
  for (; o + PB <= n_out; o += PB) conv_px<K, J, PB, A>(rows, w, init, o, pstep, ps, JJ, out, ostep);
  if (PB >= 4)
    for (; o + PB / 2 <= n_out; o += PB / 2)
      conv_px<K, J, (PB >= 4 ? PB / 2 : 1), A>(rows, w, init, o, pstep, ps, JJ, out, ostep);
  for (; o < n_out; ++o) conv_px<K, J, 1, A>(rows, w, init, o, pstep, ps, JJ, out, ostep);
}

// dacc[(dy*K+dx)*JJ + j] += sum_o gz[o*gstep] * rows[dy][(o*colstep + dx)*ps + j*CB]  (row sums in A)
template <int K, int J, typename A>
__attribute__((noinline)) void wgrad_row(const A* const* rows, const A* __restrict__ gz, int gstep, int n_out, int colstep, int jn,
               double* __restrict__ dacc) {
  constexpr int CB = lanes_of<A>();
  const int JJ = J > 0 ? J : jn;
  const int64_t ps = (int64_t)JJ * CB;
  const int64_t pstep = (int64_t)colstep * ps;
  for (int dy = 0; dy < K; ++dy) {
    for (int j = 0; j < JJ; ++j) {
      A acc[K][CB];
      for (int dx = 0; dx < K; ++dx)
        for (int l = 0; l < CB; ++l) acc[dx][l] = A(0);
      const A* xr = rows[dy] + j * CB;
      for (int o = 0; o < n_out; ++o) {
        const A* g = gz + (int64_t)o * gstep * CB;
        const A* xp = xr + (int64_t)o * pstep;
#pragma GCC unroll 9
        for (int dx = 0; dx < K; ++dx)
#pragma omp simd
          for (int l = 0; l < CB; ++l) acc[dx][l] += g[l] * xp[dx * ps + l];
      }
      for (int dx = 0; dx < K; ++dx) {
        double* d = dacc + ((dy * K + dx) * JJ + j) * CB;
        for (int l = 0; l < CB; ++l) d[l] += (double)acc[dx][l];
      }
    }
  }
}

// grows[dy][(o*colstep + dx)*ps + j*CB] += w[(dy*K+dx)*JJ + j] * gz[o*gstep]  (transposed conv, scatter form)
template <int K, int J, typename A>
__attribute__((noinline)) void scatter_row(A* const* grows, const A* __restrict__ w, const A* __restrict__ gz, int gstep, int n_out,
                 int colstep, int jn) {
  constexpr int CB = lanes_of<A>();
  const int JJ = J > 0 ? J : jn;
  const int64_t ps = (int64_t)JJ * CB;
  const int64_t pstep = (int64_t)colstep * ps;
  for (int dy = 0; dy < K; ++dy) {
    for (int j = 0; j < JJ; ++j) {
      A wr[K][CB];
      for (int dx = 0; dx < K; ++dx)
        for (int l = 0; l < CB; ++l) wr[dx][l] = w[((dy * K + dx) * JJ + j) * CB + l];
      A* gr = grows[dy] + j * CB;
      for (int o = 0; o < n_out; ++o) {
        const A* g = gz + (int64_t)o * gstep * CB;
        A* p = gr + (int64_t)o * pstep;
#pragma GCC unroll 9
        for (int dx = 0; dx < K; ++dx)
#pragma omp simd
          for (int l = 0; l < CB; ++l) p[dx * ps + l] += wr[dx][l] * g[l];
      }
    }
  }
}

template <typename A>
inline void conv_row_k(int k, int j, const A* const* rows, const A* w, const A* init, int n_out, int colstep,
                       A* out, int ostep) {
  with_k(k, [&](auto KC) {
    constexpr int K = decltype(KC)::value;
    if (j == 1) conv_row<K, 1, A>(rows, w, init, n_out, colstep, 1, out, ostep);
    else if (K % 2 == 0) throw std::runtime_error("emcad_kernels cpu: even kernel with grouped input");
    else if (j == 2) conv_row<(K | 1), 2, A>(rows, w, init, n_out, colstep, 2, out, ostep);
    else conv_row<(K | 1), 0, A>(rows, w, init, n_out, colstep, j, out, ostep);
  });
}

template <typename A>
inline void wgrad_row_k(int k, int j, const A* const* rows, const A* gz, int gstep, int n_out, int colstep,
                        double* dacc) {
  with_k(k, [&](auto KC) {
    constexpr int K = decltype(KC)::value;
    if (j == 1) wgrad_row<K, 1, A>(rows, gz, gstep, n_out, colstep, 1, dacc);
    else if (K % 2 == 0) throw std::runtime_error("emcad_kernels cpu: even kernel with grouped input");
    else if (j == 2) wgrad_row<(K | 1), 2, A>(rows, gz, gstep, n_out, colstep, 2, dacc);
    else wgrad_row<(K | 1), 0, A>(rows, gz, gstep, n_out, colstep, j, dacc);
  });
}

template <typename A>
inline void scatter_row_k(int k, int j, A* const* grows, const A* w, const A* gz, int gstep, int n_out,
                          int colstep) {
  with_k(k, [&](auto KC) {
    constexpr int K = decltype(KC)::value;
    if (j == 1) scatter_row<K, 1, A>(grows, w, gz, gstep, n_out, colstep, 1);
    else if (K % 2 == 0) throw std::runtime_error("emcad_kernels cpu: even kernel with grouped input");
    else if (j == 2) scatter_row<(K | 1), 2, A>(grows, w, gz, gstep, n_out, colstep, 2);
    else scatter_row<(K | 1), 0, A>(grows, w, gz, gstep, n_out, colstep, j);
  });
}

// ------------------------------------------------------------------------------------------------------
// per-lane row reductions
// ------------------------------------------------------------------------------------------------------
// merges the (mean, M2) of the n_px pixels of row buffer z (pixel stride CB) into acc[l]
template <typename A>
inline void row_stats(const A* z, int64_t n_px, emcad::Welford* acc) {
  constexpr int CB = lanes_of<A>();
  if (n_px <= 0) return;
  A sum[CB], m2[CB], mean[CB];
  for (int l = 0; l < CB; ++l) sum[l] = m2[l] = A(0);
  for (int64_t o = 0; o < n_px; ++o)
#pragma omp simd
    for (int l = 0; l < CB; ++l) sum[l] += z[o * CB + l];
  for (int l = 0; l < CB; ++l) mean[l] = sum[l] / A(n_px);
  for (int64_t o = 0; o < n_px; ++o)
#pragma omp simd
    for (int l = 0; l < CB; ++l) {
      const A d = z[o * CB + l] - mean[l];
      m2[l] += d * d;
    }
  for (int l = 0; l < CB; ++l) acc[l].merge((double)n_px, (double)mean[l], (double)m2[l]);
}

// Per-lane BN-backward row: ga = act'(z*scale + shift) * g, zhat = (z - mean)*rstd;
// sums s1 += ga, s2 += ga*zhat (if s1 != nullptr); gz = c1*ga + c2*zhat + c3 (if gz != nullptr).
template <int ACT, typename A>
inline void bn_back_row(const A* __restrict__ z, const A* __restrict__ g, int64_t n_px, int zstep, const A* sc,
                        const A* sh, const A* mu, const A* rs, const A* c2, const A* c3, double* s1, double* s2,
                        A* __restrict__ gz) {
  constexpr int CB = lanes_of<A>();
  A t1[CB], t2[CB];
  for (int l = 0; l < CB; ++l) t1[l] = t2[l] = A(0);
  for (int64_t o = 0; o < n_px; ++o) {
    const A* zp = z + o * zstep * CB;
    const A* gp = g + o * zstep * CB;
    A* gzp = gz ? gz + o * zstep * CB : nullptr;
#pragma omp simd
    for (int l = 0; l < CB; ++l) {
      const A zz = zp[l];
      const A ga = emcad::act_bwd<ACT>(zz * sc[l] + sh[l], gp[l]);
      const A zh = (zz - mu[l]) * rs[l];
      t1[l] += ga;
      t2[l] += ga * zh;
      if (gzp) gzp[l] = sc[l] * ga + c2[l] * zh + c3[l];
    }
  }
  if (s1)
    for (int l = 0; l < CB; ++l) {
      s1[l] += (double)t1[l];
      s2[l] += (double)t2[l];
    }
}

// y (+)= act(z) over n_px pixels of CB lanes
template <int ACT, typename A>
inline void act_row(A* __restrict__ y, const A* __restrict__ z, int64_t n_px, bool accumulate) {
  constexpr int CB = lanes_of<A>();
  if (accumulate) {
#pragma omp simd
    for (int64_t i = 0; i < n_px * CB; ++i) y[i] += emcad::act_fwd<ACT>(z[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n_px * CB; ++i) y[i] = emcad::act_fwd<ACT>(z[i]);
  }
}

// ------------------------------------------------------------------------------------------------------
// ring of zero-padded rows
// ------------------------------------------------------------------------------------------------------
template <typename A>
struct Ring {
  A* buf = nullptr;
  int slots = 1;
  int64_t row_elems = 0;
  A* row(int64_t r) const { return buf + (r % slots) * row_elems; }
};
