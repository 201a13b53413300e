// CPU kernels for the fused EMCAD ops. This file is compiled once per instruction set: isa_<name>.cpp
// includes it inside namespace emcad_cpu::isa_<name> under `#pragma GCC target(...)`, after defining
// kPixelBlock (output pixels per register block). No torch headers; everything is raw pointers.
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

template <typename F>
inline void with_act(int act, F&& f) {
  switch (act) {
    case emcad::kRelu: f(std::integral_constant<int, emcad::kRelu>{}); break;
    case emcad::kRelu6: f(std::integral_constant<int, emcad::kRelu6>{}); break;
    case emcad::kLeakyRelu: f(std::integral_constant<int, emcad::kLeakyRelu>{}); break;
    case emcad::kHardswish: f(std::integral_constant<int, emcad::kHardswish>{}); break;
    default: f(std::integral_constant<int, emcad::kIdentity>{}); break;
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
// row I/O
// ------------------------------------------------------------------------------------------------------
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

// ======================================================================================================
// multi_scale_dwconv
// ======================================================================================================
// An item is (n, group of `a.group` channel blocks). Rows are the outer loop and the blocks of the group the
// inner one, so that with channels_last every input/output pixel line is used completely while it is hot.
template <typename S>
struct MsdcCtx {
  using A = typename emcad::AccType<S>::type;
  static constexpr int CB = lanes_of<A>();
  static constexpr int KK = kMaxKernel * kMaxKernel;
  const MsdcArgs& a;
  int kmax = 1, P = 0, Wp = 0, s = 1, nblocks = 1, G = 1, ngroups = 1;
  Ring<A> ring, gring;  // one ring per block of the group: block bi uses slots [bi*slots, (bi+1)*slots)
  Scratch<A> ring_mem, gring_mem, w_mem, coef_mem, zrow, yrow, grow, gzrow;
  // per block of the group
  std::vector<int64_t> xoff, gxoff, yoff;  // [G][CB], [G][CB], [G][nb][CB]
  std::vector<char> xcontig, gxcontig, ycontig;
  std::vector<int> c0, lanes, ymap, gxmap;
  std::vector<int64_t> y0off;  // [G][CB] branch-0 output offsets (sum mode)
  int64_t n = 0;
  int nbk = 0;  // blocks in the current item
  int64_t loaded = 0;
  bool x_grouped = false, gx_grouped = false;  // unit channel stride: grouped row I/O

  int blk0 = 0;  // first channel block of the current item
  bool fold = false;

  MsdcCtx(const MsdcArgs& args, bool need_grad, bool fold_bn) : a(args), fold(fold_bn) {
    for (int b = 0; b < a.nb; ++b) kmax = std::max(kmax, a.ks[b]);
    P = kmax / 2;
    s = a.stride;
    Wp = a.W + 2 * P;
    nblocks = (a.C + CB - 1) / CB;
    G = std::max(1, std::min(a.group, nblocks));
    ngroups = (nblocks + G - 1) / G;
    ring.slots = kmax;  // rows [oh*s, oh*s + kmax) are live; a new row replaces one that is done
    ring.row_elems = (int64_t)Wp * CB;
    ring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
    ring.buf = ring_mem.get();
    // weights (times the BN scale if `fold`) and coefficients of every block, built once per call and thread
    w_mem.alloc((size_t)nblocks * std::max<int64_t>(a.taps_total, 1) * CB);
    coef_mem.alloc((size_t)nblocks * a.nb * 8 * CB);
    for (int blk = 0; blk < nblocks; ++blk) {
      const int cb0 = blk * CB, L = std::min(CB, a.C - cb0);
      for (int b = 0; b < a.nb; ++b) {
        const int k = a.ks[b], kk = k * k;
        A* wb = w_mem.get() + ((size_t)blk * a.taps_total + a.toff[b]) * CB;
        for (int t = 0; t < kk; ++t)
          for (int l = 0; l < CB; ++l) {
            double v = 0;
            if (l < L) {
              const int64_t c = cb0 + l;
              v = a.w[a.woff[b] + c * kk + t];
              if (fold) v *= a.scale[(int64_t)b * a.C + c];
            }
            wb[t * CB + l] = (A)v;
          }
        const double* src[6] = {a.scale, a.shift, a.mean, a.rstd, a.c2, a.c3};
        A* cf = coef_mem.get() + ((size_t)blk * a.nb + b) * 8 * CB;
        for (int i = 0; i < 6; ++i)
          for (int l = 0; l < CB; ++l) cf[i * CB + l] = (src[i] && l < L) ? (A)src[i][(int64_t)b * a.C + cb0 + l] : A(0);
      }
    }
    const size_t row = (size_t)std::max(a.Wo, 1) * CB;
    zrow.alloc(row);
    yrow.alloc(row * G);
    if (need_grad) {
      grow.alloc(row);
      gzrow.alloc(row);
      gring = ring;
      gring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
      gring.buf = gring_mem.get();
    }
    xoff.resize((size_t)G * CB);
    gxoff.resize((size_t)G * CB);
    yoff.resize((size_t)G * a.nb * CB);
    xcontig.resize(G);
    gxcontig.resize(G);
    ycontig.resize((size_t)G * a.nb);
    c0.resize(G);
    lanes.resize(G);
    ymap.resize(G);
    gxmap.resize(G);
    y0off.resize((size_t)G * CB);
  }

  A* yrow_of(int bi) const { return yrow.get() + (size_t)bi * std::max(a.Wo, 1) * CB; }
  A* wts(int bi, int b) const { return w_mem.get() + ((size_t)(blk0 + bi) * a.taps_total + a.toff[b]) * CB; }
  // coefficient vectors per branch: 0 scale, 1 shift, 2 mean, 3 rstd, 4 c2, 5 c3
  A* coef(int bi, int b, int i) const { return coef_mem.get() + (((size_t)(blk0 + bi) * a.nb + b) * 8 + i) * CB; }
  int64_t* yo(int bi, int b) { return &yoff[((size_t)bi * a.nb + b) * CB]; }
  A* ring_row(const Ring<A>& r, int bi, int64_t row) const {
    return r.buf + ((size_t)bi * r.slots + (size_t)(row % r.slots)) * r.row_elems;
  }

  int64_t out_channel(int b, int64_t c) const {
    const int64_t oc = a.concat ? (int64_t)b * a.C + c : c;
    const int64_t cout = a.concat ? (int64_t)a.nb * a.C : a.C;
    return emcad::shuffle_dst(oc, cout, a.shuffle_groups);
  }

  // sets up the item's blocks: lanes and offsets
  void begin_item(int64_t item, bool grads) {
    n = item / ngroups;
    const int b0 = (int)(item % ngroups) * G;
    blk0 = b0;
    nbk = std::min(G, nblocks - b0);
    const View4& ov = grads ? a.g : a.y;
    for (int bi = 0; bi < nbk; ++bi) {
      c0[bi] = (b0 + bi) * CB;
      lanes[bi] = std::min(CB, a.C - c0[bi]);
      int64_t* xo = &xoff[(size_t)bi * CB];
      int64_t* gxo = &gxoff[(size_t)bi * CB];
      for (int l = 0; l < CB; ++l) {
        const int64_t c = c0[bi] + std::min(l, lanes[bi] - 1);
        xo[l] = c * a.x.sc;
        gxo[l] = c * a.gx.sc;
      }
      xcontig[bi] = a.x.sc == 1 && lanes_contiguous(xo, lanes[bi]);
      gxcontig[bi] = a.gx.sc == 1 && lanes_contiguous(gxo, lanes[bi]);
      for (int b = 0; b < a.nb; ++b) {
        int64_t* o = yo(bi, b);
        for (int l = 0; l < CB; ++l) o[l] = out_channel(b, c0[bi] + std::min(l, lanes[bi] - 1)) * ov.sc;
        ycontig[(size_t)bi * a.nb + b] = ov.sc == 1 && lanes_contiguous(o, lanes[bi]);
      }
      ymap[bi] = lane_map(yo(bi, 0), lanes[bi], CB, ov.sc);
      gxmap[bi] = lane_map(gxo, lanes[bi], CB, a.gx.sc);
      std::copy(yo(bi, 0), yo(bi, 0) + CB, &y0off[(size_t)bi * CB]);
    }
    x_grouped = a.x.sc == 1 && nbk > 1;
    gx_grouped = a.gx.data != nullptr && a.gx.sc == 1 && nbk > 1;
    loaded = 0;
  }

  // makes padded input rows [0, upto) available in the rings of all blocks of the item
  void load_until(int64_t upto) {
    for (; loaded < upto; ++loaded) {
      if (x_grouped) {
        A* dst[64];
        for (int bi = 0; bi < nbk; ++bi) dst[bi] = ring_row(ring, bi, loaded);
        load_row_blocks<S, A>(a.x, n, loaded - P, c0[0], nbk, lanes[nbk - 1], dst, Wp, P);
        continue;
      }
      for (int bi = 0; bi < nbk; ++bi)
        load_row<S, A>(a.x, n, loaded - P, &xoff[(size_t)bi * CB], lanes[bi], xcontig[bi],
                       ring_row(ring, bi, loaded), Wp, CB, P);
    }
  }

  // stores the y rows of all blocks (sum mode) with one sweep
  void store_y(int64_t oh) {
    A* src[64];
    for (int bi = 0; bi < nbk; ++bi) src[bi] = yrow_of(bi);
    store_row_blocks<S, A>(a.y, n, oh, nbk, src, y0off.data(), lanes.data(), ymap.data(), a.Wo);
  }

  // row pointers of branch b of block bi for output row oh
  void branch_rows(const Ring<A>& r, int bi, int b, int64_t oh, A** rows) const {
    const int pb = a.ks[b] / 2;
    const int64_t r0 = oh * s + (P - pb);
    for (int dy = 0; dy < a.ks[b]; ++dy) rows[dy] = ring_row(r, bi, r0 + dy) + (int64_t)(P - pb) * CB;
  }

  void write_partials(int bi, int b, const double* v0, const double* v1) const {
    for (int l = 0; l < lanes[bi]; ++l) {
      const int64_t idx = (n * a.nb + b) * a.C + c0[bi] + l;
      a.p0[idx] = v0[l];
      a.p1[idx] = v1[l];
    }
  }
};

template <typename S>
void msdc_stats(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, false, false);
  std::vector<emcad::Welford> acc((size_t)ctx.G * a.nb * CB);
  for (int64_t item = i0; item < i1; ++item) {
    ctx.begin_item(item, false);
    std::fill(acc.begin(), acc.end(), emcad::Welford());
    for (int64_t oh = 0; oh < a.Ho; ++oh) {
      ctx.load_until(oh * ctx.s + ctx.kmax);
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int b = 0; b < a.nb; ++b) {
          A* rows[kMaxKernel];
          ctx.branch_rows(ctx.ring, bi, b, oh, rows);
          conv_row_k<A>(a.ks[b], 1, rows, ctx.wts(bi, b), nullptr, a.Wo, ctx.s, ctx.zrow.get(), 1);
          row_stats<A>(ctx.zrow.get(), a.Wo, &acc[((size_t)bi * a.nb + b) * CB]);
        }
    }
    for (int bi = 0; bi < ctx.nbk; ++bi)
      for (int b = 0; b < a.nb; ++b) {
        double m[CB], q[CB];
        for (int l = 0; l < CB; ++l) {
          m[l] = acc[((size_t)bi * a.nb + b) * CB + l].mean;
          q[l] = acc[((size_t)bi * a.nb + b) * CB + l].m2;
        }
        ctx.write_partials(bi, b, m, q);
      }
  }
}

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

template <typename S>
void msdc_apply(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, false, true);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item, false);
      for (int64_t oh = 0; oh < a.Ho; ++oh) {
        ctx.load_until(oh * ctx.s + ctx.kmax);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          for (int b = 0; b < a.nb; ++b) {
            A* rows[kMaxKernel];
            ctx.branch_rows(ctx.ring, bi, b, oh, rows);
            conv_row_k<A>(a.ks[b], 1, rows, ctx.wts(bi, b), ctx.coef(bi, b, 1), a.Wo, ctx.s, ctx.zrow.get(), 1);
            if (a.concat) {
              act_row<ACT, A>(ctx.zrow.get(), ctx.zrow.get(), a.Wo, false);
              store_row<S, A>(a.y, ctx.n, oh, ctx.yo(bi, b), ctx.lanes[bi], ctx.ycontig[(size_t)bi * a.nb + b],
                              ctx.zrow.get(), a.Wo, CB);
            } else {
              act_row<ACT, A>(ctx.yrow_of(bi), ctx.zrow.get(), a.Wo, b > 0);
            }
          }
        }
        if (!a.concat) ctx.store_y(oh);
      }
    }
  });
}

template <typename S>
void msdc_bwd_reduce(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, true, false);
  std::vector<double> s1((size_t)ctx.G * a.nb * CB), s2((size_t)ctx.G * a.nb * CB);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item, true);
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t oh = 0; oh < a.Ho; ++oh) {
        ctx.load_until(oh * ctx.s + ctx.kmax);
        for (int bi = 0; bi < ctx.nbk; ++bi)
          for (int b = 0; b < a.nb; ++b) {
            A* rows[kMaxKernel];
            ctx.branch_rows(ctx.ring, bi, b, oh, rows);
            conv_row_k<A>(a.ks[b], 1, rows, ctx.wts(bi, b), nullptr, a.Wo, ctx.s, ctx.zrow.get(), 1);
            load_row<S, A>(a.g, ctx.n, oh, ctx.yo(bi, b), ctx.lanes[bi], ctx.ycontig[(size_t)bi * a.nb + b],
                           ctx.grow.get(), a.Wo, CB, 0);
            const size_t o = ((size_t)bi * a.nb + b) * CB;
            bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, b, 0), ctx.coef(bi, b, 1),
                                ctx.coef(bi, b, 2), ctx.coef(bi, b, 3), ctx.coef(bi, b, 4), ctx.coef(bi, b, 5),
                                &s1[o], &s2[o], nullptr);
          }
      }
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int b = 0; b < a.nb; ++b)
          ctx.write_partials(bi, b, &s1[((size_t)bi * a.nb + b) * CB], &s2[((size_t)bi * a.nb + b) * CB]);
    }
  });
}

template <typename S>
void msdc_bwd_grad(const MsdcArgs& a, int64_t i0, int64_t i1) {
  using A = typename MsdcCtx<S>::A;
  constexpr int CB = MsdcCtx<S>::CB;
  MsdcCtx<S> ctx(a, true, false);
  const int64_t taps = std::max<int64_t>(a.taps_total, 1);
  Scratch<double> dacc((size_t)ctx.G * taps * CB);
  std::vector<double> s1((size_t)ctx.G * a.nb * CB), s2((size_t)ctx.G * a.nb * CB);
  const int64_t Hp = (int64_t)a.H + 2 * ctx.P;
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item, true);
      dacc.zero();
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      int64_t inited = 0, flushed = 0;
      auto init_row = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi)
          std::memset(ctx.ring_row(ctx.gring, bi, r), 0, sizeof(A) * ctx.gring.row_elems);
      };
      auto flush_row = [&](int64_t r) {
        const int64_t h = r - ctx.P;
        if (h < 0 || h >= a.H) return;
        if (ctx.gx_grouped) {
          A* src[64];
          for (int bi = 0; bi < ctx.nbk; ++bi) src[bi] = ctx.ring_row(ctx.gring, bi, r) + (int64_t)ctx.P * CB;
          store_row_blocks<S, A>(a.gx, ctx.n, h, ctx.nbk, src, ctx.gxoff.data(), ctx.lanes.data(),
                                 ctx.gxmap.data(), a.W);
          return;
        }
        for (int bi = 0; bi < ctx.nbk; ++bi)
          store_row<S, A>(a.gx, ctx.n, h, &ctx.gxoff[(size_t)bi * CB], ctx.lanes[bi], ctx.gxcontig[bi],
                          ctx.ring_row(ctx.gring, bi, r) + (int64_t)ctx.P * CB, a.W, CB);
      };
      for (int64_t oh = 0; oh < a.Ho; ++oh) {
        ctx.load_until(oh * ctx.s + ctx.kmax);
        for (; flushed < oh * ctx.s; ++flushed) {
          if (flushed >= inited) init_row(inited++);
          flush_row(flushed);
        }
        for (; inited < oh * ctx.s + ctx.kmax; ++inited) init_row(inited);
        for (int bi = 0; bi < ctx.nbk; ++bi)
          for (int b = 0; b < a.nb; ++b) {
            A* rows[kMaxKernel];
            A* grows[kMaxKernel];
            ctx.branch_rows(ctx.ring, bi, b, oh, rows);
            ctx.branch_rows(ctx.gring, bi, b, oh, grows);
            const int k = a.ks[b];
            const size_t o = ((size_t)bi * a.nb + b) * CB;
            conv_row_k<A>(k, 1, rows, ctx.wts(bi, b), nullptr, a.Wo, ctx.s, ctx.zrow.get(), 1);
            load_row<S, A>(a.g, ctx.n, oh, ctx.yo(bi, b), ctx.lanes[bi], ctx.ycontig[(size_t)bi * a.nb + b],
                           ctx.grow.get(), a.Wo, CB, 0);
            bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, b, 0), ctx.coef(bi, b, 1),
                                ctx.coef(bi, b, 2), ctx.coef(bi, b, 3), ctx.coef(bi, b, 4), ctx.coef(bi, b, 5),
                                a.bn_partials ? &s1[o] : nullptr, a.bn_partials ? &s2[o] : nullptr,
                                ctx.gzrow.get());
            wgrad_row_k<A>(k, 1, rows, ctx.gzrow.get(), 1, a.Wo, ctx.s,
                           dacc.get() + ((size_t)bi * taps + a.toff[b]) * CB);
            scatter_row_k<A>(k, 1, grows, ctx.wts(bi, b), ctx.gzrow.get(), 1, a.Wo, ctx.s);
          }
      }
      for (; flushed < Hp; ++flushed) {
        if (flushed >= inited) init_row(inited++);
        flush_row(flushed);
      }
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        for (int l = 0; l < ctx.lanes[bi]; ++l)
          for (int64_t t = 0; t < a.taps_total; ++t)
            a.wpart[(ctx.n * a.C + ctx.c0[bi] + l) * a.taps_total + t] = dacc.get()[((size_t)bi * taps + t) * CB + l];
        if (a.bn_partials)
          for (int b = 0; b < a.nb; ++b)
            ctx.write_partials(bi, b, &s1[((size_t)bi * a.nb + b) * CB], &s2[((size_t)bi * a.nb + b) * CB]);
      }
    }
  });
}

// ======================================================================================================
// upsample_dwconv
// ======================================================================================================
// Nearest (any integer scale S): polyphase stencils on the low-resolution rows (EMCAD.md §11.3).
// Bilinear x2: upsampled rows are produced on the fly into a small ring (never the whole tensor), then the
// k x k stencil runs on them; the backward applies the transposed interpolation row by row.
// Items are (n, group of channel blocks), rows outer and blocks inner, as for MSDC.
template <typename S>
struct UpdwCtx {
  using A = typename emcad::AccType<S>::type;
  static constexpr int CB = lanes_of<A>();
  const UpdwArgs& a;
  emcad::Polyphase poly{2, 3, 1};
  int T = 1, PL = 0, PH = 0, Wp = 0, nblocks = 1, p = 0, G = 1, ngroups = 1, nk = 1;
  Scratch<A> ring_mem, xr_mem, tmp, k_mem, kraw_mem, coef_mem, zrow, grow, gzrow, gring_mem, gx_mem;
  Ring<A> ring, gring, xring, gxring;  // per block bi: slots [bi*slots, (bi+1)*slots)
  std::vector<int64_t> xoff, gxoff, yoff, goff;  // [G][CB]
  std::vector<char> xcontig, gxcontig, ycontig, gcontig;
  std::vector<int> c0, lanes;
  int64_t n = 0;
  int nbk = 0;
  int64_t loaded = 0, xloaded = 0;

  UpdwCtx(const UpdwArgs& args, bool need_grad) : a(args) {
    nblocks = (a.C + CB - 1) / CB;
    G = std::max(1, std::min(a.group, nblocks));
    ngroups = (nblocks + G - 1) / G;
    p = a.k / 2;
    const size_t row = (size_t)std::max(a.Wo, 1) * CB;
    zrow.alloc(row);
    if (need_grad) {
      grow.alloc(row);
      gzrow.alloc(row);
    }
    if (!a.bilinear) {
      poly = emcad::Polyphase{a.S, a.k, p};
      T = poly.taps();
      PL = poly.pad_lo();
      PH = poly.pad_hi();
      Wp = a.W + PL + PH;
      ring.slots = PL + PH + 2;
      ring.row_elems = (int64_t)Wp * CB;
      nk = a.S * a.S * T * T;
    } else {
      ring.slots = a.k + 1;  // upsampled rows, padded by p on both sides
      ring.row_elems = (int64_t)(2 * a.W + 2 * p) * CB;
      xring.slots = 4;
      xring.row_elems = (int64_t)std::max(a.W, 1) * CB;
      xr_mem.alloc((size_t)G * xring.slots * xring.row_elems);
      xring.buf = xr_mem.get();
      tmp.alloc((size_t)std::max(a.W, 1) * CB);
      nk = a.k * a.k;
      if (need_grad) {
        gxring = xring;
        gx_mem.alloc((size_t)G * xring.slots * xring.row_elems);
        gxring.buf = gx_mem.get();
      }
    }
    ring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
    ring.buf = ring_mem.get();
    if (need_grad) {
      gring = ring;
      gring_mem.alloc((size_t)G * ring.slots * ring.row_elems);
      gring.buf = gring_mem.get();
    }
    // (polyphase) kernels, folded and raw, and coefficients of every block: built once per call and thread
    k_mem.alloc((size_t)nblocks * nk * CB);
    kraw_mem.alloc((size_t)nblocks * nk * CB);
    coef_mem.alloc((size_t)nblocks * 8 * CB);
    for (int blk = 0; blk < nblocks; ++blk) build_block(blk);
    for (auto* v : {&xoff, &gxoff, &yoff, &goff}) v->resize((size_t)G * CB);
    for (auto* v : {&xcontig, &gxcontig, &ycontig, &gcontig}) v->resize(G);
    c0.resize(G);
    lanes.resize(G);
  }

  static A* rrow(const Ring<A>& r, int bi, int64_t row) {
    return r.buf + ((size_t)bi * r.slots + (size_t)(row % r.slots)) * r.row_elems;
  }
  int blk0 = 0;  // first channel block of the current item
  A* coef(int bi, int i) const { return coef_mem.get() + ((size_t)(blk0 + bi) * 8 + i) * CB; }
  A* kern(int bi, bool fold) const {
    return (fold ? k_mem.get() : kraw_mem.get()) + (size_t)(blk0 + bi) * nk * CB;
  }

  void build_block(int blk) {
    const int cb0 = blk * CB, L = std::min(CB, a.C - cb0), kk = a.k * a.k;
    const double* src[6] = {a.scale, a.shift, a.mean, a.rstd, a.c2, a.c3};
    A* cf = coef_mem.get() + (size_t)blk * 8 * CB;
    for (int i = 0; i < 6; ++i)
      for (int l = 0; l < CB; ++l) cf[i * CB + l] = (src[i] && l < L) ? (A)src[i][cb0 + l] : A(0);
    auto wval = [&](int l, int t, bool f) -> double {
      if (l >= L) return 0.0;
      double v = a.w[(int64_t)(cb0 + l) * kk + t];
      if (f) v *= a.scale[cb0 + l];
      return v;
    };
    A* kf = k_mem.get() + (size_t)blk * nk * CB;
    A* kr = kraw_mem.get() + (size_t)blk * nk * CB;
    if (!a.bilinear) {
      std::vector<double> kd((size_t)nk * CB, 0.0), kdr((size_t)nk * CB, 0.0);
      for (int ph = 0; ph < a.S; ++ph)
        for (int q = 0; q < a.S; ++q)
          for (int dy = 0; dy < a.k; ++dy)
            for (int dx = 0; dx < a.k; ++dx) {
              const int r = poly.tap(ph, dy), sidx = poly.tap(q, dx);
              const size_t base = (((size_t)(ph * a.S + q) * T + r) * T + sidx) * CB;
              for (int l = 0; l < CB; ++l) {
                kd[base + l] += wval(l, dy * a.k + dx, a.scale != nullptr);
                kdr[base + l] += wval(l, dy * a.k + dx, false);
              }
            }
      for (size_t i = 0; i < (size_t)nk * CB; ++i) {
        kf[i] = (A)kd[i];
        kr[i] = (A)kdr[i];
      }
    } else {
      for (int t = 0; t < kk; ++t)
        for (int l = 0; l < CB; ++l) {
          kf[t * CB + l] = (A)wval(l, t, a.scale != nullptr);
          kr[t * CB + l] = (A)wval(l, t, false);
        }
    }
  }
  A* pk(int bi, int ph, int q, bool fold) const { return kern(bi, fold) + ((size_t)(ph * a.S + q) * T * T) * CB; }

  void begin_item(int64_t item) {
    n = item / ngroups;
    const int b0 = (int)(item % ngroups) * G;
    blk0 = b0;
    nbk = std::min(G, nblocks - b0);
    for (int bi = 0; bi < nbk; ++bi) {
      c0[bi] = (b0 + bi) * CB;
      lanes[bi] = std::min(CB, a.C - c0[bi]);
      const int L = lanes[bi];
      int64_t *xo = &xoff[(size_t)bi * CB], *gxo = &gxoff[(size_t)bi * CB], *yo = &yoff[(size_t)bi * CB],
              *go = &goff[(size_t)bi * CB];
      for (int l = 0; l < CB; ++l) {
        const int64_t c = c0[bi] + std::min(l, L - 1);
        xo[l] = c * a.x.sc;
        gxo[l] = c * a.gx.sc;
        yo[l] = c * a.y.sc;
        go[l] = c * a.g.sc;
      }
      xcontig[bi] = a.x.sc == 1 && lanes_contiguous(xo, L);
      gxcontig[bi] = a.gx.sc == 1 && lanes_contiguous(gxo, L);
      ycontig[bi] = a.y.sc == 1 && lanes_contiguous(yo, L);
      gcontig[bi] = a.g.sc == 1 && lanes_contiguous(go, L);
    }
    loaded = 0;
    xloaded = 0;
  }

  // ---- nearest: low-res padded rows [0, upto) of every block ----
  void load_lowres_until(int64_t upto) {
    for (; loaded < upto; ++loaded)
      for (int bi = 0; bi < nbk; ++bi)
        load_row<S, A>(a.x, n, loaded - PL, &xoff[(size_t)bi * CB], lanes[bi], xcontig[bi], rrow(ring, bi, loaded),
                       Wp, CB, PL);
  }

  void nearest_row(int bi, int64_t y, bool fold) {
    const int64_t i = y / a.S;
    const int ph = (int)(y % a.S);
    for (int q = 0; q < a.S; ++q) {
      A* rows[kMaxKernel];
      const int64_t coff = (int64_t)(poly.rb(q) + PL) * CB;
      for (int r = 0; r < T; ++r) rows[r] = rrow(ring, bi, i + poly.rb(ph) + PL + r) + coff;
      conv_row_k<A>(T, 1, rows, pk(bi, ph, q, fold), fold ? coef(bi, 1) : nullptr, a.W, 1,
                    zrow.get() + (int64_t)q * CB, a.S);
    }
  }

  // ---- bilinear x2: upsampled padded rows [0, upto) of every block ----
  void lowres_until(int64_t i) {  // low-res rows are needed in increasing order, window of at most 3
    for (; xloaded <= i; ++xloaded)
      for (int bi = 0; bi < nbk; ++bi)
        load_row<S, A>(a.x, n, xloaded, &xoff[(size_t)bi * CB], lanes[bi], xcontig[bi], rrow(xring, bi, xloaded),
                       a.W, CB, 0);
  }

  void make_up_row(int bi, int64_t r) {
    A* dst = rrow(ring, bi, r);
    const int64_t u = r - p;
    std::memset(dst, 0, sizeof(A) * ring.row_elems);
    if (u < 0 || u >= 2LL * a.H) return;
    const emcad::Lerp2 v = emcad::bilinear2_src((int)u, a.H);
    const A* x0 = rrow(xring, bi, v.i0);
    const A* x1 = rrow(xring, bi, v.i1);
    A* t = tmp.get();
    const A l0 = (A)v.l0, l1 = (A)v.l1;
#pragma omp simd
    for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) t[i] = l0 * x0[i] + l1 * x1[i];
    A* d = dst + (int64_t)p * CB;
    for (int xo = 0; xo < 2 * a.W; ++xo) {
      const emcad::Lerp2 hz = emcad::bilinear2_src(xo, a.W);
      const A m0 = (A)hz.l0, m1 = (A)hz.l1;
      const A* s0 = t + (int64_t)hz.i0 * CB;
      const A* s1 = t + (int64_t)hz.i1 * CB;
#pragma omp simd
      for (int l = 0; l < CB; ++l) d[(int64_t)xo * CB + l] = m0 * s0[l] + m1 * s1[l];
    }
  }

  void up_until(int64_t upto) {
    for (; loaded < upto; ++loaded) {
      const int64_t u = loaded - p;
      if (u >= 0 && u < 2LL * a.H) lowres_until(emcad::bilinear2_src((int)u, a.H).i1);
      for (int bi = 0; bi < nbk; ++bi) make_up_row(bi, loaded);
    }
  }

  void bilinear_row(int bi, int64_t y, bool fold) {
    A* rows[kMaxKernel];
    for (int dy = 0; dy < a.k; ++dy) rows[dy] = rrow(ring, bi, y + dy);
    conv_row_k<A>(a.k, 1, rows, kern(bi, fold), fold ? coef(bi, 1) : nullptr, a.Wo, 1, zrow.get(), 1);
  }

  // rows needed for output row y, for every block
  void prepare(int64_t y) {
    if (a.bilinear) up_until(y + a.k);
    else load_lowres_until(y / a.S + PL + PH + 1);
  }

  void out_row(int bi, int64_t y, bool fold) {
    if (a.bilinear) bilinear_row(bi, y, fold);
    else nearest_row(bi, y, fold);
  }
};

// Nearest x2 + 3x3 (EMCAD's EUCB) in eval/apply form: one output row of phase ph, both column phases per
// low-res column (6 input vectors feed 8 FMAs and 2 outputs), bias, activation and the store fused; `out` is
// pixel 0 of the output row, `osw` its pixel stride (lanes contiguous). r0/r1: padded low-res rows.
template <int ACT, typename SO, typename A>
__attribute__((noinline)) void updw2x3_row(const A* __restrict__ r0, const A* __restrict__ r1,
                                           const A* __restrict__ k0, const A* __restrict__ k1,
                                           const A* __restrict__ init, int W, SO* __restrict__ out, int64_t osw) {
  constexpr int CB = lanes_of<A>();
  for (int j = 0; j < W; ++j) {
    const A* a0 = r0 + (int64_t)j * CB;
    const A* a1 = r1 + (int64_t)j * CB;
    SO* o0 = out + (int64_t)(2 * j) * osw;
    SO* o1 = o0 + osw;
#pragma omp simd
    for (int l = 0; l < CB; ++l) {
      const A x00 = a0[l], x01 = a0[CB + l], x02 = a0[2 * CB + l];
      const A x10 = a1[l], x11 = a1[CB + l], x12 = a1[2 * CB + l];
      A v0 = init[l] + k0[l] * x00 + k0[CB + l] * x01 + k0[2 * CB + l] * x10 + k0[3 * CB + l] * x11;
      A v1 = init[l] + k1[l] * x01 + k1[CB + l] * x02 + k1[2 * CB + l] * x11 + k1[3 * CB + l] * x12;
      store_val(o0 + l, emcad::act_fwd<ACT>(v0));
      store_val(o1 + l, emcad::act_fwd<ACT>(v1));
    }
  }
}

template <typename S>
void updw_stats(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, false);
  std::vector<emcad::Welford> acc((size_t)ctx.G * CB);
  for (int64_t item = i0; item < i1; ++item) {
    ctx.begin_item(item);
    std::fill(acc.begin(), acc.end(), emcad::Welford());
    for (int64_t y = 0; y < a.Ho; ++y) {
      ctx.prepare(y);
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        ctx.out_row(bi, y, false);
        row_stats<A>(ctx.zrow.get(), a.Wo, &acc[(size_t)bi * CB]);
      }
    }
    for (int bi = 0; bi < ctx.nbk; ++bi)
      for (int l = 0; l < ctx.lanes[bi]; ++l) {
        a.p0[ctx.n * a.C + ctx.c0[bi] + l] = acc[(size_t)bi * CB + l].mean;
        a.p1[ctx.n * a.C + ctx.c0[bi] + l] = acc[(size_t)bi * CB + l].m2;
      }
  }
}

template <typename S>
void updw_apply(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, false);
  const bool x2k3 = !a.bilinear && a.S == 2 && a.k == 3;  // EMCAD's EUCB: fused row kernel
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item);
      for (int64_t y = 0; y < a.Ho; ++y) {
        ctx.prepare(y);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          if (x2k3) {
            const int64_t i = y / 2;
            const int ph = (int)(y % 2);
            const A* r0 = UpdwCtx<S>::rrow(ctx.ring, bi, i + ctx.poly.rb(ph) + ctx.PL);
            const A* r1 = UpdwCtx<S>::rrow(ctx.ring, bi, i + ctx.poly.rb(ph) + ctx.PL + 1);
            const A* k0 = ctx.pk(bi, ph, 0, true);
            const A* k1 = ctx.pk(bi, ph, 1, true);
            if (ctx.ycontig[bi] && ctx.lanes[bi] == CB) {  // straight into the output tensor
              S* out = static_cast<S*>(a.y.data) + ctx.n * a.y.sn + y * a.y.sh + ctx.c0[bi];
              updw2x3_row<ACT, S, A>(r0, r1, k0, k1, ctx.coef(bi, 1), a.W, out, a.y.sw);
            } else {
              updw2x3_row<ACT, A, A>(r0, r1, k0, k1, ctx.coef(bi, 1), a.W, ctx.zrow.get(), CB);
              store_row<S, A>(a.y, ctx.n, y, &ctx.yoff[(size_t)bi * CB], ctx.lanes[bi], ctx.ycontig[bi],
                              ctx.zrow.get(), a.Wo, CB);
            }
            continue;
          }
          ctx.out_row(bi, y, true);
          act_row<ACT, A>(ctx.zrow.get(), ctx.zrow.get(), a.Wo, false);
          store_row<S, A>(a.y, ctx.n, y, &ctx.yoff[(size_t)bi * CB], ctx.lanes[bi], ctx.ycontig[bi], ctx.zrow.get(),
                          a.Wo, CB);
        }
      }
    }
  });
}

template <typename S>
void updw_bwd_reduce(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, true);
  std::vector<double> s1((size_t)ctx.G * CB), s2((size_t)ctx.G * CB);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item);
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t y = 0; y < a.Ho; ++y) {
        ctx.prepare(y);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          ctx.out_row(bi, y, false);
          load_row<S, A>(a.g, ctx.n, y, &ctx.goff[(size_t)bi * CB], ctx.lanes[bi], ctx.gcontig[bi], ctx.grow.get(),
                         a.Wo, CB, 0);
          bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, 0), ctx.coef(bi, 1),
                              ctx.coef(bi, 2), ctx.coef(bi, 3), ctx.coef(bi, 4), ctx.coef(bi, 5), &s1[(size_t)bi * CB],
                              &s2[(size_t)bi * CB], nullptr);
        }
      }
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int l = 0; l < ctx.lanes[bi]; ++l) {
          a.p0[ctx.n * a.C + ctx.c0[bi] + l] = s1[(size_t)bi * CB + l];
          a.p1[ctx.n * a.C + ctx.c0[bi] + l] = s2[(size_t)bi * CB + l];
        }
    }
  });
}

template <typename S>
void updw_bwd_grad(const UpdwArgs& a, int64_t i0, int64_t i1) {
  using A = typename UpdwCtx<S>::A;
  constexpr int CB = UpdwCtx<S>::CB;
  UpdwCtx<S> ctx(a, true);
  const int kk = a.k * a.k;
  const int nk = ctx.nk;
  Scratch<double> dacc((size_t)ctx.G * nk * CB);
  std::vector<double> s1((size_t)ctx.G * CB), s2((size_t)ctx.G * CB);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_item(item);
      dacc.zero();
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      auto grad_row = [&](int bi, int64_t y) {
        ctx.out_row(bi, y, false);
        load_row<S, A>(a.g, ctx.n, y, &ctx.goff[(size_t)bi * CB], ctx.lanes[bi], ctx.gcontig[bi], ctx.grow.get(),
                       a.Wo, CB, 0);
        bn_back_row<ACT, A>(ctx.zrow.get(), ctx.grow.get(), a.Wo, 1, ctx.coef(bi, 0), ctx.coef(bi, 1),
                            ctx.coef(bi, 2), ctx.coef(bi, 3), ctx.coef(bi, 4), ctx.coef(bi, 5),
                            a.bn_partials ? &s1[(size_t)bi * CB] : nullptr,
                            a.bn_partials ? &s2[(size_t)bi * CB] : nullptr, ctx.gzrow.get());
      };
      auto init_g = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi)
          std::memset(UpdwCtx<S>::rrow(ctx.gring, bi, r), 0, sizeof(A) * ctx.gring.row_elems);
      };
      if (!a.bilinear) {
        // gx lives in a ring of padded low-res rows
        const int64_t Hp = (int64_t)a.H + ctx.PL + ctx.PH;
        int64_t inited = 0, flushed = 0;
        auto flush_row = [&](int64_t r) {
          const int64_t h = r - ctx.PL;
          if (h < 0 || h >= a.H) return;
          for (int bi = 0; bi < ctx.nbk; ++bi)
            store_row<S, A>(a.gx, ctx.n, h, &ctx.gxoff[(size_t)bi * CB], ctx.lanes[bi], ctx.gxcontig[bi],
                            UpdwCtx<S>::rrow(ctx.gring, bi, r) + (int64_t)ctx.PL * CB, a.W, CB);
        };
        for (int64_t y = 0; y < a.Ho; ++y) {
          const int64_t i = y / a.S;
          const int ph = (int)(y % a.S);
          for (; flushed < i; ++flushed) {
            if (flushed >= inited) init_g(inited++);
            flush_row(flushed);
          }
          for (; inited < i + ctx.PL + ctx.PH + 1; ++inited) init_g(inited);
          ctx.prepare(y);
          for (int bi = 0; bi < ctx.nbk; ++bi) {
            grad_row(bi, y);
            for (int q = 0; q < a.S; ++q) {
              A* rows[kMaxKernel];
              A* grows[kMaxKernel];
              const int64_t coff = (int64_t)(ctx.poly.rb(q) + ctx.PL) * CB;
              for (int r = 0; r < ctx.T; ++r) {
                rows[r] = UpdwCtx<S>::rrow(ctx.ring, bi, i + ctx.poly.rb(ph) + ctx.PL + r) + coff;
                grows[r] = UpdwCtx<S>::rrow(ctx.gring, bi, i + ctx.poly.rb(ph) + ctx.PL + r) + coff;
              }
              const A* gz = ctx.gzrow.get() + (int64_t)q * CB;
              wgrad_row_k<A>(ctx.T, 1, rows, gz, a.S, a.W, 1,
                             dacc.get() + ((size_t)bi * nk + (size_t)(ph * a.S + q) * ctx.T * ctx.T) * CB);
              scatter_row_k<A>(ctx.T, 1, grows, ctx.pk(bi, ph, q, false), gz, a.S, a.W, 1);
            }
          }
        }
        for (; flushed < Hp; ++flushed) {
          if (flushed >= inited) init_g(inited++);
          flush_row(flushed);
        }
      } else {
        // gU lives in a ring of padded upsampled rows; each finished gU row is interpolated back (transposed)
        // into a ring of low-res gx rows
        const int p = ctx.p;
        const int64_t Hu = 2LL * a.H, Hup = Hu + 2 * p;
        int64_t inited = 0, flushed = 0, xinited = 0, xflushed = 0;
        auto xinit_until = [&](int64_t i) {
          for (; xinited <= i; ++xinited)
            for (int bi = 0; bi < ctx.nbk; ++bi)
              std::memset(UpdwCtx<S>::rrow(ctx.gxring, bi, xinited), 0, sizeof(A) * ctx.gxring.row_elems);
        };
        auto xflush_until = [&](int64_t i) {  // low-res rows < i are final
          for (; xflushed < i && xflushed < a.H; ++xflushed) {
            xinit_until(xflushed);
            for (int bi = 0; bi < ctx.nbk; ++bi)
              store_row<S, A>(a.gx, ctx.n, xflushed, &ctx.gxoff[(size_t)bi * CB], ctx.lanes[bi], ctx.gxcontig[bi],
                              UpdwCtx<S>::rrow(ctx.gxring, bi, xflushed), a.W, CB);
          }
        };
        auto flush_row = [&](int64_t r) {
          const int64_t u = r - p;
          if (u < 0 || u >= Hu) return;
          const emcad::Lerp2 v = emcad::bilinear2_src((int)u, a.H);
          xinit_until(v.i1);
          for (int bi = 0; bi < ctx.nbk; ++bi) {
            const A* gu = UpdwCtx<S>::rrow(ctx.gring, bi, r) + (int64_t)p * CB;
            A* t = ctx.tmp.get();
            std::memset(t, 0, sizeof(A) * (size_t)a.W * CB);
            for (int xo = 0; xo < 2 * a.W; ++xo) {
              const emcad::Lerp2 hz = emcad::bilinear2_src(xo, a.W);
              const A m0 = (A)hz.l0, m1 = (A)hz.l1;
              A* t0 = t + (int64_t)hz.i0 * CB;
              A* t1 = t + (int64_t)hz.i1 * CB;
              const A* g = gu + (int64_t)xo * CB;
#pragma omp simd
              for (int l = 0; l < CB; ++l) t0[l] += m0 * g[l];
#pragma omp simd
              for (int l = 0; l < CB; ++l) t1[l] += m1 * g[l];
            }
            A* x0 = UpdwCtx<S>::rrow(ctx.gxring, bi, v.i0);
            A* x1 = UpdwCtx<S>::rrow(ctx.gxring, bi, v.i1);
            const A l0 = (A)v.l0, l1 = (A)v.l1;
#pragma omp simd
            for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) x0[i] += l0 * t[i];
#pragma omp simd
            for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) x1[i] += l1 * t[i];
          }
          // low-res row i receives from upsampled rows u <= 2i + 2: rows < u/2 are final
          xflush_until(u / 2);
        };
        for (int64_t y = 0; y < a.Ho; ++y) {
          for (; flushed < y; ++flushed) {
            if (flushed >= inited) init_g(inited++);
            flush_row(flushed);
          }
          for (; inited < y + a.k; ++inited) init_g(inited);
          ctx.prepare(y);
          for (int bi = 0; bi < ctx.nbk; ++bi) {
            grad_row(bi, y);
            A* rows[kMaxKernel];
            A* grows[kMaxKernel];
            for (int dy = 0; dy < a.k; ++dy) {
              rows[dy] = UpdwCtx<S>::rrow(ctx.ring, bi, y + dy);
              grows[dy] = UpdwCtx<S>::rrow(ctx.gring, bi, y + dy);
            }
            wgrad_row_k<A>(a.k, 1, rows, ctx.gzrow.get(), 1, a.Wo, 1, dacc.get() + (size_t)bi * nk * CB);
            scatter_row_k<A>(a.k, 1, grows, ctx.kern(bi, false), ctx.gzrow.get(), 1, a.Wo, 1);
          }
        }
        for (; flushed < Hup; ++flushed) {
          if (flushed >= inited) init_g(inited++);
          flush_row(flushed);
        }
        xflush_until(a.H);
      }
      // weight gradient of the item: polyphase taps fold back onto the original taps
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        const double* dk = dacc.get() + (size_t)bi * nk * CB;
        for (int l = 0; l < ctx.lanes[bi]; ++l) {
          double* dst = a.wpart + (ctx.n * a.C + ctx.c0[bi] + l) * kk;
          if (a.bilinear) {
            for (int t = 0; t < kk; ++t) dst[t] = dk[(size_t)t * CB + l];
          } else {
            for (int t = 0; t < kk; ++t) dst[t] = 0;
            for (int ph = 0; ph < a.S; ++ph)
              for (int q = 0; q < a.S; ++q)
                for (int dy = 0; dy < a.k; ++dy)
                  for (int dx = 0; dx < a.k; ++dx) {
                    const int r = ctx.poly.tap(ph, dy), sidx = ctx.poly.tap(q, dx);
                    dst[dy * a.k + dx] += dk[((((size_t)(ph * a.S + q) * ctx.T + r) * ctx.T + sidx) * CB) + l];
                  }
          }
        }
        if (a.bn_partials)
          for (int l = 0; l < ctx.lanes[bi]; ++l) {
            a.p0[ctx.n * a.C + ctx.c0[bi] + l] = s1[(size_t)bi * CB + l];
            a.p1[ctx.n * a.C + ctx.c0[bi] + l] = s2[(size_t)bi * CB + l];
          }
      }
    }
  });
}

// ======================================================================================================
// grouped_attention_gate
// ======================================================================================================
// Lanes are output channels o of the grouped convs; slot j of lane o holds input channel (o / og) * J + j.
// Row items (n, band of rows) see every channel (the psi reduction over F_int); block items (n, block of
// whole groups) see one block over the whole image (BN statistics and gradients of the grouped convs).

// Loads row `row` of image n into a padded row with pixel stride J*CB for the lanes of a block whose first
// lane is output channel o0.
template <typename S, typename A>
void load_group_row(const View4& v, int64_t n, int64_t row, int o0, int og, int J, int lanes, A* dst, int wp,
                    int padl) {
  constexpr int CB = lanes_of<A>();
  const int64_t ps = (int64_t)J * CB;
  if (og == 1 && v.sc == 1 && lanes == CB && row >= 0 && row < v.h) {
    for (int q = 0; q < padl; ++q)
      for (int i = 0; i < ps; ++i) dst[q * ps + i] = A(0);
    for (int64_t q = padl + v.w; q < wp; ++q)
      for (int i = 0; i < ps; ++i) dst[q * ps + i] = A(0);
    const S* base = static_cast<const S*>(v.data) + n * v.sn + row * v.sh + (int64_t)o0 * J;
    A* d0 = dst + (int64_t)padl * ps;
    if (J == 2) {
      for (int64_t w = 0; w < v.w; ++w) {
        const S* s = base + w * v.sw;
        A* d = d0 + w * ps;
#pragma omp simd
        for (int l = 0; l < CB; ++l) {
          d[l] = load_val(s + 2 * l);
          d[CB + l] = load_val(s + 2 * l + 1);
        }
      }
    } else {
      for (int64_t w = 0; w < v.w; ++w) {
        const S* s = base + w * v.sw;
        A* d = d0 + w * ps;
        for (int j = 0; j < J; ++j)
          for (int l = 0; l < CB; ++l) d[j * CB + l] = load_val(s + (int64_t)l * J + j);
      }
    }
    return;
  }
  int64_t off[CB];
  for (int j = 0; j < J; ++j) {
    for (int l = 0; l < CB; ++l) off[l] = ((int64_t)((o0 + std::min(l, lanes - 1)) / og) * J + j) * v.sc;
    load_row<S, A>(v, n, row, off, lanes, v.sc == 1 && lanes_contiguous(off, lanes), dst + j * CB, wp, (int)ps,
                   padl);
  }
}

template <typename A>
EMCAD_INLINE A sigmoid_val(A v) {
  return A(1) / (A(1) + std::exp(-v));
}

enum LgagCoef {
  kSg = 0, kTgF, kSx, kTxF, kBg, kBx, kMg, kRg, kMx, kRx, kC2g, kC3g, kC2x, kC3x, kWpsi, kTg, kTx, kNumCoef
};

template <typename S>
struct LgagCtx {
  using A = typename emcad::AccType<S>::type;
  static constexpr int CB = lanes_of<A>();
  const LgagArgs& a;
  int K = 3, P = 1, Wp = 0, nblk = 1, bl = CB, kk = 9, nbands = 1;
  int G = 1, ngroups = 1;  // block items: blocks per item
  int nrings = 1;  // blocks with rings (row items: all, block items: the item's group)
  Scratch<A> wg_mem, wx_mem, wgr_mem, wxr_mem, coef_mem, ring_mem, gring_mem, zg, zx, pacc, prow, u, tmp, tmp2;
  Scratch<double> dprow_mem;
  int64_t ring_g_elems = 0, ring_x_elems = 0;
  int slots = 4;
  int64_t loaded = 0;
  int64_t n = 0;

  LgagCtx(const LgagArgs& args, bool row_items, bool need_grad) : a(args) {
    K = a.k;
    P = K / 2;
    kk = K * K;
    Wp = a.W + 2 * P;
    bl = a.block_lanes;
    nblk = (a.Fi + bl - 1) / bl;
    nbands = (a.H + a.band - 1) / std::max(a.band, 1);
    G = std::max(1, std::min(a.group, nblk));
    ngroups = (nblk + G - 1) / G;
    nrings = row_items ? nblk : G;
    slots = K + 1;
    const size_t wsz = (size_t)nblk * kk * CB;
    wg_mem.alloc(wsz * a.jg);
    wx_mem.alloc(wsz * a.jx);
    wgr_mem.alloc(wsz * a.jg);
    wxr_mem.alloc(wsz * a.jx);
    coef_mem.alloc((size_t)nblk * kNumCoef * CB);
    ring_g_elems = (int64_t)Wp * a.jg * CB;
    ring_x_elems = (int64_t)Wp * a.jx * CB;
    ring_mem.alloc((size_t)nrings * slots * (ring_g_elems + ring_x_elems));
    if (need_grad) gring_mem.alloc((size_t)G * slots * (ring_g_elems + ring_x_elems));
    const size_t row = (size_t)std::max(a.W, 1) * CB;
    zg.alloc(row);
    zx.alloc(row);
    pacc.alloc(row);
    u.alloc(row);
    tmp.alloc(row);
    tmp2.alloc(row);
    prow.alloc((size_t)std::max(a.W, 1));
    dprow_mem.alloc((size_t)std::max(a.W, 1));
    // per-block weights and coefficients
    for (int b = 0; b < nblk; ++b) {
      const int o0 = b * bl, lanes = std::min(bl, a.Fi - o0);
      for (int t = 0; t < kk; ++t)
        for (int l = 0; l < CB; ++l) {
          for (int j = 0; j < a.jg; ++j) {
            const double w = l < lanes ? a.wg[((int64_t)(o0 + l) * a.jg + j) * kk + t] : 0.0;
            const double f = (l < lanes && a.sg) ? a.sg[o0 + l] : 0.0;
            wgr(b)[(t * a.jg + j) * CB + l] = (A)w;
            wgf(b)[(t * a.jg + j) * CB + l] = (A)(w * f);
          }
          for (int j = 0; j < a.jx; ++j) {
            const double w = l < lanes ? a.wx[((int64_t)(o0 + l) * a.jx + j) * kk + t] : 0.0;
            const double f = (l < lanes && a.sx) ? a.sx[o0 + l] : 0.0;
            wxr(b)[(t * a.jx + j) * CB + l] = (A)w;
            wxf(b)[(t * a.jx + j) * CB + l] = (A)(w * f);
          }
        }
      auto at = [&](const double* p, int l) -> double { return (p && l < lanes) ? p[o0 + l] : 0.0; };
      for (int l = 0; l < CB; ++l) {
        const double sg = at(a.sg, l), tg = at(a.tg, l), sx = at(a.sx, l), tx = at(a.tx, l);
        const double bg = at(a.bg, l), bx = at(a.bx, l);
        coef(b, kSg)[l] = (A)sg;
        coef(b, kTgF)[l] = (A)(bg * sg + tg);
        coef(b, kSx)[l] = (A)sx;
        coef(b, kTxF)[l] = (A)(bx * sx + tx);
        coef(b, kBg)[l] = (A)bg;
        coef(b, kBx)[l] = (A)bx;
        coef(b, kMg)[l] = (A)at(a.mg, l);
        coef(b, kRg)[l] = (A)at(a.rg, l);
        coef(b, kMx)[l] = (A)at(a.mx, l);
        coef(b, kRx)[l] = (A)at(a.rx, l);
        coef(b, kC2g)[l] = (A)at(a.c2g, l);
        coef(b, kC3g)[l] = (A)at(a.c3g, l);
        coef(b, kC2x)[l] = (A)at(a.c2x, l);
        coef(b, kC3x)[l] = (A)at(a.c3x, l);
        coef(b, kWpsi)[l] = (A)at(a.wpsi, l);
        coef(b, kTg)[l] = (A)tg;
        coef(b, kTx)[l] = (A)tx;
      }
    }
  }

  A* wgf(int b) const { return wg_mem.get() + (size_t)b * kk * a.jg * CB; }
  A* wxf(int b) const { return wx_mem.get() + (size_t)b * kk * a.jx * CB; }
  A* wgr(int b) const { return wgr_mem.get() + (size_t)b * kk * a.jg * CB; }
  A* wxr(int b) const { return wxr_mem.get() + (size_t)b * kk * a.jx * CB; }
  A* coef(int b, int i) const { return coef_mem.get() + ((size_t)b * kNumCoef + i) * CB; }
  int o0(int b) const { return b * bl; }
  int lanes(int b) const { return std::min(bl, a.Fi - b * bl); }

  // ring slot r of ring set `ri` (block index for row items, 0 for block items)
  A* ring_g(int ri, int64_t r) const {
    return ring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + (r % slots) * ring_g_elems;
  }
  A* ring_x(int ri, int64_t r) const {
    return ring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + slots * ring_g_elems +
           (r % slots) * ring_x_elems;
  }
  A* gring_g(int ri, int64_t r) const {
    return gring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + (r % slots) * ring_g_elems;
  }
  A* gring_x(int ri, int64_t r) const {
    return gring_mem.get() + (size_t)ri * slots * (ring_g_elems + ring_x_elems) + slots * ring_g_elems +
           (r % slots) * ring_x_elems;
  }
  // block items: the item's first block and block count
  int b0 = 0, nbk = 1;
  void begin_block_item(int64_t item) {
    n = item / ngroups;
    b0 = (int)(item % ngroups) * G;
    nbk = std::min(G, nblk - b0);
  }
  void load_group_rows(int64_t h) {  // padded rows needed for output row h, for every block of the item
    for (int bi = 0; bi < nbk; ++bi) load_block_rows(bi, b0 + bi, h == 0 ? 0 : h + K - 1, h + K);
  }

  // loads padded rows [loaded, upto) of block b into ring set ri
  void load_block_rows(int ri, int b, int64_t from, int64_t upto) {
    for (int64_t r = from; r < upto; ++r) {
      load_group_row<S, A>(a.g, n, r - P, o0(b), a.og, a.jg, lanes(b), ring_g(ri, r), Wp, P);
      load_group_row<S, A>(a.x, n, r - P, o0(b), a.og, a.jx, lanes(b), ring_x(ri, r), Wp, P);
    }
  }

  void rows_of(int ri, int64_t h, bool x_ring, A** rows) const {
    for (int dy = 0; dy < K; ++dy) rows[dy] = x_ring ? ring_x(ri, h + dy) : ring_g(ri, h + dy);
  }

  // z rows of block b for output row h (folded: BN-applied a_g, a_x; raw: conv + bias)
  void z_rows(int ri, int b, int64_t h, bool fold) {
    A* rows[kMaxKernel];
    rows_of(ri, h, false, rows);
    conv_row_k<A>(K, a.jg, rows, fold ? wgf(b) : wgr(b), coef(b, fold ? kTgF : kBg), a.W, 1, zg.get(), 1);
    rows_of(ri, h, true, rows);
    conv_row_k<A>(K, a.jx, rows, fold ? wxf(b) : wxr(b), coef(b, fold ? kTxF : kBx), a.W, 1, zx.get(), 1);
  }

  // row items: p (psi logit before BN, incl. bias) for row h into prow; rings of all blocks advance together
  template <int ACT>
  void psi_row(int64_t h) {
    for (int b = 0; b < nblk; ++b) load_block_rows(b, b, std::max(loaded, h), h + K);
    loaded = std::max(loaded, h + K);
    A* pa = pacc.get();
    std::memset(pa, 0, sizeof(A) * (size_t)a.W * CB);
    for (int b = 0; b < nblk; ++b) {
      z_rows(b, b, h, true);
      const A* wp = coef(b, kWpsi);
      const A* g = zg.get();
      const A* x = zx.get();
      for (int64_t w = 0; w < a.W; ++w)
#pragma omp simd
        for (int l = 0; l < CB; ++l) pa[w * CB + l] += wp[l] * emcad::act_fwd<ACT>(g[w * CB + l] + x[w * CB + l]);
    }
    const A bp = (A)a.bpsi;
    for (int64_t w = 0; w < a.W; ++w) {
      A s = A(0);
      for (int l = 0; l < CB; ++l) s += pa[w * CB + l];
      prow.get()[w] = s + bp;
    }
  }

  void begin_row_item(int64_t item) {
    n = item / nbands;
    loaded = (item % nbands) * (int64_t)a.band;
  }
  void band_of(int64_t item, int64_t& h0, int64_t& h1) const {
    h0 = (item % nbands) * (int64_t)a.band;
    h1 = std::min<int64_t>(a.H, h0 + a.band);
  }
};

template <typename S>
void lgag_stats(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, false, false);
  std::vector<emcad::Welford> accg((size_t)ctx.G * CB), accx((size_t)ctx.G * CB);
  for (int64_t item = i0; item < i1; ++item) {
    ctx.begin_block_item(item);
    std::fill(accg.begin(), accg.end(), emcad::Welford());
    std::fill(accx.begin(), accx.end(), emcad::Welford());
    for (int64_t h = 0; h < a.H; ++h) {
      ctx.load_group_rows(h);
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        ctx.z_rows(bi, ctx.b0 + bi, h, false);
        row_stats<A>(ctx.zg.get(), a.W, &accg[(size_t)bi * CB]);
        row_stats<A>(ctx.zx.get(), a.W, &accx[(size_t)bi * CB]);
      }
    }
    for (int bi = 0; bi < ctx.nbk; ++bi)
      for (int l = 0; l < ctx.lanes(ctx.b0 + bi); ++l) {
        const int64_t idx = ctx.n * a.Fi + ctx.o0(ctx.b0 + bi) + l;
        a.sg0[idx] = accg[(size_t)bi * CB + l].mean;
        a.sg1[idx] = accg[(size_t)bi * CB + l].m2;
        a.sx0[idx] = accx[(size_t)bi * CB + l].mean;
        a.sx1[idx] = accx[(size_t)bi * CB + l].m2;
      }
  }
}

template <typename S>
void lgag_psi(const LgagArgs& a, int64_t i0, int64_t i1) {
  LgagCtx<S> ctx(a, true, false);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_row_item(item);
      int64_t h0, h1;
      ctx.band_of(item, h0, h1);
      emcad::Welford acc;
      for (int64_t h = h0; h < h1; ++h) {
        ctx.template psi_row<ACT>(h);
        double* dst = a.pbuf + (ctx.n * a.H + h) * a.W;
        double s = 0;
        for (int64_t w = 0; w < a.W; ++w) {
          dst[w] = (double)ctx.prow.get()[w];
          s += dst[w];
        }
        const double mean = s / a.W;
        double m2 = 0;
        for (int64_t w = 0; w < a.W; ++w) m2 += (dst[w] - mean) * (dst[w] - mean);
        acc.merge((double)a.W, mean, m2);
      }
      a.sp0[item] = acc.n;
      a.sp1[item] = acc.mean;
      a.sp2[item] = acc.m2;
    }
  });
}

// out = x * sigmoid(p*sp + tp) (+ g) for row h, psi row given in ctx.prow as ap (already BN-applied sigmoid)
template <typename S, typename A>
void lgag_out_row(LgagCtx<S>& ctx, const LgagArgs& a, int64_t h, const A* psi) {
  constexpr int CB = lanes_of<A>();
  int64_t off[CB], goff[CB], ooff[CB];
  for (int c0 = 0; c0 < a.Fl; c0 += CB) {
    const int lanes = std::min(CB, a.Fl - c0);
    for (int l = 0; l < CB; ++l) {
      const int64_t c = c0 + std::min(l, lanes - 1);
      off[l] = c * a.x.sc;
      goff[l] = c * a.g.sc;
      ooff[l] = c * a.out.sc;
    }
    A* xb = ctx.tmp.get();
    A* gb = ctx.tmp2.get();
    load_row<S, A>(a.x, ctx.n, h, off, lanes, a.x.sc == 1, xb, a.W, CB, 0);
    if (a.add_gate) {
      load_row<S, A>(a.g, ctx.n, h, goff, lanes, a.g.sc == 1, gb, a.W, CB, 0);
      for (int64_t w = 0; w < a.W; ++w) {
        const A ps = psi[w];
#pragma omp simd
        for (int l = 0; l < CB; ++l) xb[w * CB + l] = xb[w * CB + l] * ps + gb[w * CB + l];
      }
    } else {
      for (int64_t w = 0; w < a.W; ++w) {
        const A ps = psi[w];
#pragma omp simd
        for (int l = 0; l < CB; ++l) xb[w * CB + l] *= ps;
      }
    }
    store_row<S, A>(a.out, ctx.n, h, ooff, lanes, a.out.sc == 1, xb, a.W, CB);
  }
}

template <typename S>
void lgag_apply(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  LgagCtx<S> ctx(a, a.pbuf == nullptr, false);
  std::vector<A> psi((size_t)std::max(a.W, 1));
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_row_item(item);
      int64_t h0, h1;
      ctx.band_of(item, h0, h1);
      for (int64_t h = h0; h < h1; ++h) {
        if (a.pbuf) {
          const double* p = a.pbuf + (ctx.n * a.H + h) * a.W;
          for (int64_t w = 0; w < a.W; ++w) psi[w] = (A)sigmoid_val<double>(p[w] * a.sp + a.tp);
        } else {
          ctx.template psi_row<ACT>(h);
          for (int64_t w = 0; w < a.W; ++w) psi[w] = sigmoid_val<A>(ctx.prow.get()[w] * (A)a.sp + (A)a.tp);
        }
        lgag_out_row<S, A>(ctx, a, h, psi.data());
      }
    }
  });
}

template <typename S>
void lgag_bwd_psi(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, true, false);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    int64_t off[CB], goff[CB];
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_row_item(item);
      int64_t h0, h1;
      ctx.band_of(item, h0, h1);
      double s1 = 0, s2 = 0;
      for (int64_t h = h0; h < h1; ++h) {
        ctx.template psi_row<ACT>(h);
        // ds = sum_c grad[c] * x[c]
        A* acc = ctx.pacc.get();
        std::memset(acc, 0, sizeof(A) * (size_t)a.W * CB);
        for (int c0 = 0; c0 < a.Fl; c0 += CB) {
          const int lanes = std::min(CB, a.Fl - c0);
          for (int l = 0; l < CB; ++l) {
            const int64_t c = c0 + std::min(l, lanes - 1);
            off[l] = c * a.x.sc;
            goff[l] = c * a.grad.sc;
          }
          A* xb = ctx.tmp.get();
          A* gb = ctx.tmp2.get();
          load_row<S, A>(a.x, ctx.n, h, off, lanes, a.x.sc == 1, xb, a.W, CB, 0);
          load_row<S, A>(a.grad, ctx.n, h, goff, lanes, a.grad.sc == 1, gb, a.W, CB, 0);
#pragma omp simd
          for (int64_t i = 0; i < (int64_t)a.W * CB; ++i) acc[i] += xb[i] * gb[i];
        }
        double* pd = a.pbuf + (ctx.n * a.H + h) * a.W;
        double* dd = a.dbuf + (ctx.n * a.H + h) * a.W;
        double r1 = 0, r2 = 0;
        for (int64_t w = 0; w < a.W; ++w) {
          A ds = A(0);
          for (int l = 0; l < CB; ++l) ds += acc[w * CB + l];
          const double p = (double)ctx.prow.get()[w];
          const double psi = sigmoid_val<double>(p * a.sp + a.tp);
          const double dap = (double)ds * psi * (1.0 - psi);
          pd[w] = p;
          dd[w] = dap;
          r1 += dap;
          r2 += dap * ((p - a.mp) * a.rp);
        }
        s1 += r1;
        s2 += r2;
      }
      a.sp0[item] = s1;
      a.sp1[item] = s2;
    }
  });
}

// Block pass per row: recomputes z_g, z_x (conv + bias), u, h and du; optionally the BN-backward sums,
// the psi weight-gradient sums and dz_g, dz_x.
template <int ACT, typename S>
void lgag_block_row(LgagCtx<S>& ctx, const LgagArgs& a, int ri, int b, int64_t h, double* su, double* sug, double* sux,
                    double* sph, double* dpsum, typename LgagCtx<S>::A* dzg, typename LgagCtx<S>::A* dzx,
                    double* bgs, double* bxs) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  ctx.z_rows(ri, b, h, false);
  // dp per pixel
  double* dp = ctx.dprow_mem.get();
  const double* pd = a.pbuf + (ctx.n * a.H + h) * a.W;
  const double* dd = a.dbuf + (ctx.n * a.H + h) * a.W;
  double dps = 0;
  for (int64_t w = 0; w < a.W; ++w) {
    dp[w] = a.cp1 * dd[w] + a.cp2 * ((pd[w] - a.mp) * a.rp) + a.cp3;
    dps += dp[w];
  }
  if (dpsum) *dpsum += dps;
  const A *sg = ctx.coef(b, kSg), *tg = ctx.coef(b, kTg), *sx = ctx.coef(b, kSx), *tx = ctx.coef(b, kTx);
  const A *mg = ctx.coef(b, kMg), *rg = ctx.coef(b, kRg), *mx = ctx.coef(b, kMx), *rx = ctx.coef(b, kRx);
  const A *c2g = ctx.coef(b, kC2g), *c3g = ctx.coef(b, kC3g), *c2x = ctx.coef(b, kC2x), *c3x = ctx.coef(b, kC3x);
  const A* wp = ctx.coef(b, kWpsi);
  A t_u[CB], t_ug[CB], t_ux[CB], t_ph[CB], t_bg[CB], t_bx[CB];
  for (int l = 0; l < CB; ++l) t_u[l] = t_ug[l] = t_ux[l] = t_ph[l] = t_bg[l] = t_bx[l] = A(0);
  const A* zgp = ctx.zg.get();
  const A* zxp = ctx.zx.get();
  for (int64_t w = 0; w < a.W; ++w) {
    const A dpw = (A)dp[w];
#pragma omp simd
    for (int l = 0; l < CB; ++l) {
      const A zg = zgp[w * CB + l], zx = zxp[w * CB + l];
      const A uu = zg * sg[l] + tg[l] + zx * sx[l] + tx[l];
      const A du = emcad::act_bwd<ACT>(uu, dpw * wp[l]);
      const A zhg = (zg - mg[l]) * rg[l];
      const A zhx = (zx - mx[l]) * rx[l];
      t_u[l] += du;
      t_ug[l] += du * zhg;
      t_ux[l] += du * zhx;
      t_ph[l] += dpw * emcad::act_fwd<ACT>(uu);
      const A gzg = sg[l] * du + c2g[l] * zhg + c3g[l];
      const A gzx = sx[l] * du + c2x[l] * zhx + c3x[l];
      t_bg[l] += gzg;
      t_bx[l] += gzx;
      if (dzg) {
        dzg[w * CB + l] = gzg;
        dzx[w * CB + l] = gzx;
      }
    }
  }
  for (int l = 0; l < CB; ++l) {
    if (su) {
      su[l] += (double)t_u[l];
      sug[l] += (double)t_ug[l];
      sux[l] += (double)t_ux[l];
      sph[l] += (double)t_ph[l];
    }
    if (bgs) {
      bgs[l] += (double)t_bg[l];
      bxs[l] += (double)t_bx[l];
    }
  }
}

template <typename S>
void lgag_bwd_reduce(const LgagArgs& a, int64_t i0, int64_t i1) {
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, false, false);
  const size_t gl = (size_t)ctx.G * CB;
  std::vector<double> su(gl), sug(gl), sux(gl), sph(gl);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_block_item(item);
      for (auto* v : {&su, &sug, &sux, &sph}) std::fill(v->begin(), v->end(), 0.0);
      double dps = 0;
      for (int64_t h = 0; h < a.H; ++h) {
        ctx.load_group_rows(h);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          const int b = ctx.b0 + bi;
          const size_t o = (size_t)bi * CB;
          lgag_block_row<ACT, S>(ctx, a, bi, b, h, &su[o], &sug[o], &sux[o], &sph[o], b == 0 ? &dps : nullptr,
                                 nullptr, nullptr, nullptr, nullptr);
        }
      }
      for (int bi = 0; bi < ctx.nbk; ++bi)
        for (int l = 0; l < ctx.lanes(ctx.b0 + bi); ++l) {
          const int64_t idx = ctx.n * a.Fi + ctx.o0(ctx.b0 + bi) + l;
          const size_t o = (size_t)bi * CB + l;
          a.su[idx] = su[o];
          a.sug[idx] = sug[o];
          a.sux[idx] = sux[o];
          a.sph[idx] = sph[o];
        }
      if (ctx.b0 == 0) a.dpsum[ctx.n] = dps;
    }
  });
}

// writes the finished padded gradient row r of one input (g or x) of block b
template <typename S, typename A>
void lgag_flush_row(LgagCtx<S>& ctx, const LgagArgs& a, int ri, int b, int64_t r, bool is_x) {
  constexpr int CB = lanes_of<A>();
  const int64_t h = r - ctx.P;
  if (h < 0 || h >= a.H) return;
  const int J = is_x ? a.jx : a.jg;
  const View4& dst = is_x ? a.gx : a.gg;
  const A* src = (is_x ? ctx.gring_x(ri, r) : ctx.gring_g(ri, r)) + (int64_t)ctx.P * J * CB;
  const int og = a.og, lanes = ctx.lanes(b), nl = (lanes + og - 1) / og;
  const int g0 = ctx.o0(b) / og;  // first group of the block
  A* t = ctx.tmp.get();
  A* e = ctx.tmp2.get();
  std::vector<A> psi;
  const bool add_grad = is_x || a.add_gate;
  if (is_x) {
    psi.resize((size_t)std::max(a.W, 1));
    const double* p = a.pbuf + (ctx.n * a.H + h) * a.W;
    for (int64_t w = 0; w < a.W; ++w) psi[w] = (A)sigmoid_val<double>(p[w] * a.sp + a.tp);
  }
  int64_t off[CB], goff[CB];
  for (int j = 0; j < J; ++j) {
    for (int i = 0; i < CB; ++i) {
      const int64_t c = (int64_t)(g0 + std::min(i, nl - 1)) * J + j;
      off[i] = c * dst.sc;
      goff[i] = c * a.grad.sc;
    }
    for (int64_t w = 0; w < a.W; ++w) {
      const A* s = src + w * J * CB + j * CB;
      for (int i = 0; i < CB; ++i) {
        A v = A(0);
        if (i < nl)
          for (int q = 0; q < og; ++q) v += s[i * og + q];
        t[w * CB + i] = v;
      }
    }
    if (add_grad) {
      load_row<S, A>(a.grad, ctx.n, h, goff, nl, a.grad.sc == 1 && lanes_contiguous(goff, nl), e, a.W, CB, 0);
      for (int64_t w = 0; w < a.W; ++w) {
        const A m = is_x ? psi[w] : A(1);
#pragma omp simd
        for (int i = 0; i < CB; ++i) t[w * CB + i] += e[w * CB + i] * m;
      }
    }
    store_row<S, A>(dst, ctx.n, h, off, nl, dst.sc == 1 && lanes_contiguous(off, nl), t, a.W, CB);
  }
}

template <typename S>
void lgag_bwd_grad(const LgagArgs& a, int64_t i0, int64_t i1) {
  using A = typename LgagCtx<S>::A;
  constexpr int CB = LgagCtx<S>::CB;
  LgagCtx<S> ctx(a, false, true);
  const int kk = ctx.kk;
  const size_t ng = (size_t)kk * a.jg * CB, nx = (size_t)kk * a.jx * CB;
  Scratch<double> dg(ctx.G * ng), dx(ctx.G * nx);
  Scratch<A> dzg((size_t)std::max(a.W, 1) * CB), dzx((size_t)std::max(a.W, 1) * CB);
  const int64_t Hp = (int64_t)a.H + 2 * ctx.P;
  const bool sums = a.su != nullptr;  // eval mode: BN-backward sums come from this pass
  const size_t gl = (size_t)ctx.G * CB;
  std::vector<double> su(gl), sug(gl), sux(gl), sph(gl), bgs(gl), bxs(gl);
  with_act(a.act, [&](auto AC) {
    constexpr int ACT = decltype(AC)::value;
    for (int64_t item = i0; item < i1; ++item) {
      ctx.begin_block_item(item);
      dg.zero();
      dx.zero();
      for (auto* v : {&su, &sug, &sux, &sph, &bgs, &bxs}) std::fill(v->begin(), v->end(), 0.0);
      double dps = 0;
      int64_t inited = 0, flushed = 0;
      auto init_row = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          std::memset(ctx.gring_g(bi, r), 0, sizeof(A) * ctx.ring_g_elems);
          std::memset(ctx.gring_x(bi, r), 0, sizeof(A) * ctx.ring_x_elems);
        }
      };
      auto flush = [&](int64_t r) {
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          lgag_flush_row<S, A>(ctx, a, bi, ctx.b0 + bi, r, false);
          lgag_flush_row<S, A>(ctx, a, bi, ctx.b0 + bi, r, true);
        }
      };
      for (int64_t h = 0; h < a.H; ++h) {
        ctx.load_group_rows(h);
        for (; flushed < h; ++flushed) {
          if (flushed >= inited) init_row(inited++);
          flush(flushed);
        }
        for (; inited < h + ctx.K; ++inited) init_row(inited);
        for (int bi = 0; bi < ctx.nbk; ++bi) {
          const int b = ctx.b0 + bi;
          const size_t o = (size_t)bi * CB;
          lgag_block_row<ACT, S>(ctx, a, bi, b, h, sums ? &su[o] : nullptr, &sug[o], &sux[o], &sph[o],
                                 (sums && b == 0) ? &dps : nullptr, dzg.get(), dzx.get(), &bgs[o], &bxs[o]);
          A* rows[kMaxKernel];
          A* grows[kMaxKernel];
          ctx.rows_of(bi, h, false, rows);
          for (int dy = 0; dy < ctx.K; ++dy) grows[dy] = ctx.gring_g(bi, h + dy);
          wgrad_row_k<A>(ctx.K, a.jg, rows, dzg.get(), 1, a.W, 1, dg.get() + bi * ng);
          scatter_row_k<A>(ctx.K, a.jg, grows, ctx.wgr(b), dzg.get(), 1, a.W, 1);
          ctx.rows_of(bi, h, true, rows);
          for (int dy = 0; dy < ctx.K; ++dy) grows[dy] = ctx.gring_x(bi, h + dy);
          wgrad_row_k<A>(ctx.K, a.jx, rows, dzx.get(), 1, a.W, 1, dx.get() + bi * nx);
          scatter_row_k<A>(ctx.K, a.jx, grows, ctx.wxr(b), dzx.get(), 1, a.W, 1);
        }
      }
      for (; flushed < Hp; ++flushed) {
        if (flushed >= inited) init_row(inited++);
        flush(flushed);
      }
      for (int bi = 0; bi < ctx.nbk; ++bi) {
        const int b = ctx.b0 + bi;
        for (int l = 0; l < ctx.lanes(b); ++l) {
          const int64_t o = ctx.o0(b) + l;
          const int64_t idx = ctx.n * a.Fi + o;
          const size_t q = (size_t)bi * CB + l;
          for (int j = 0; j < a.jg; ++j)
            for (int t = 0; t < kk; ++t)
              a.wgpart[((ctx.n * a.Fi + o) * a.jg + j) * kk + t] = dg.get()[bi * ng + ((size_t)t * a.jg + j) * CB + l];
          for (int j = 0; j < a.jx; ++j)
            for (int t = 0; t < kk; ++t)
              a.wxpart[((ctx.n * a.Fi + o) * a.jx + j) * kk + t] = dx.get()[bi * nx + ((size_t)t * a.jx + j) * CB + l];
          a.bgpart[idx] = bgs[q];
          a.bxpart[idx] = bxs[q];
          if (sums) {
            a.su[idx] = su[q];
            a.sug[idx] = sug[q];
            a.sux[idx] = sux[q];
            a.sph[idx] = sph[q];
          }
        }
      }
      if (sums && ctx.b0 == 0) a.dpsum[ctx.n] = dps;
    }
  });
}

// ======================================================================================================
// kernel table
// ======================================================================================================
#define EMCAD_DT3(fn) {&fn<float>, &fn<double>, &fn<bf16>}
#define EMCAD_NULL3 {nullptr, nullptr, nullptr}

inline const KernelTable& make_table(const char* name) {
  static const KernelTable t = {
      name,
      EMCAD_DT3(msdc_stats), EMCAD_DT3(msdc_apply), EMCAD_DT3(msdc_bwd_reduce), EMCAD_DT3(msdc_bwd_grad),
      EMCAD_DT3(updw_stats), EMCAD_DT3(updw_apply), EMCAD_DT3(updw_bwd_reduce), EMCAD_DT3(updw_bwd_grad),
      EMCAD_DT3(lgag_stats), EMCAD_DT3(lgag_psi), EMCAD_DT3(lgag_apply), EMCAD_DT3(lgag_bwd_psi),
      EMCAD_DT3(lgag_bwd_reduce), EMCAD_DT3(lgag_bwd_grad),
  };
  return t;
}
