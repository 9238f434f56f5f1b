// The quantized-linear tile kernels of csrc/quant.cpp for one instruction set. quant.cpp includes this file once per
// ISA, inside its own namespace and under `#pragma GCC target(...)`, with QK_ISA set:
//   4  AVX-512 with VNNI and AMX-INT8: as 3, and int8 activations of 8 rows or more multiply on AMX tiles
//      (tdpbsud: 16 activation rows x 32 bytes times a block's 16 weight rows, one instruction per block); with
//      AMX-BF16 too, bfloat16 activations of 8 rows or more multiply exactly (tdpbf16ps)
//   3  AVX-512 with VNNI: vpdpbusd multiplies 4 u8 weights by 4 s8 activations and adds into an int32 lane; with
//      QK_BF16 set too (AVX512-BF16), bfloat16 activations of 8 rows or more multiply exactly (vdpbf16ps)
//   2  AVX-512BW without VNNI: vpmaddubsw (u8 x s8 pairs -> s16) then vpmaddwd by 1 (pairs -> s32)
//   1  AVX2 + FMA + F16C: as 2 on two 256-bit halves
// The layout (docs/quantization.md): per tile of 16 rows and block of 32 elements, 64-byte groups c that hold 4
// consecutive elements of each of the 16 rows (lane r = row r), 8-bit: 8 groups; 4-bit: 4 groups whose low nibbles
// are elements 4c..4c+3 and high nibbles 16+4c..16+4c+3. A lane's 4 bytes times 4 activation bytes broadcast to
// every lane is one dot-product step; 8 steps cover the block.
// No ATen here: raw pointers only (the code is compiled for an ISA the build machine's flags may not include).

// The activation modes a tile kernel takes ("terms"): 0 float rows, 1 or 2 int8 rows per row of x, or
// kBf16Tiles: bfloat16 rows multiplied exactly on AMX-BF16 tiles (the AMX set) or by AVX512-BF16 pair products (the
// avx512_bf16 set), kAmxRows rows or more (quant.cpp asks bf16_tiles).
constexpr int kBf16Tiles = 3;
// From this many activation rows the AMX path runs (fewer: the VNNI path, which streams the weights as fast)
constexpr int64_t kAmxRows = 8;

#if QK_ISA >= 2
// 16 int32 / float lanes: one 512-bit register
struct VI {
  __m512i v;
};
struct VF {
  __m512 v;
};
static inline VI vi_load(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
static inline VI vi_zero() { return {_mm512_setzero_si512()}; }
static inline VI vi_and(VI a, int32_t m) { return {_mm512_and_si512(a.v, _mm512_set1_epi32(m))}; }
template <int S>
static inline VI vi_srl32(VI a) { return {_mm512_srli_epi32(a.v, S)}; }
static inline VI vi_add(VI a, VI b) { return {_mm512_add_epi32(a.v, b.v)}; }
static inline VI vi_xor(VI a, int32_t m) { return {_mm512_xor_si512(a.v, _mm512_set1_epi32(m))}; }
template <int S>
static inline VI vi_sll32(VI a) { return {_mm512_slli_epi32(a.v, S)}; }
template <int S>
static inline VI vi_sra32(VI a) { return {_mm512_srai_epi32(a.v, S)}; }
static inline VF vf_zero() { return {_mm512_setzero_ps()}; }
static inline VF vf_set1(float x) { return {_mm512_set1_ps(x)}; }
static inline VF vf_cvt(VI a) { return {_mm512_cvtepi32_ps(a.v)}; }
static inline VF vf_fma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline VF vf_mul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline VF vf_sub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline VF vf_fnma(VF a, VF b, VF c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a b
static inline VF vf_load(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline VF vf_load(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
static inline void vf_store(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
// acc + sum over each lane's 4 byte pairs of w (u8) * x (s8, the same 4 bytes in every lane)
static inline VI dot4(VI acc, VI w, int32_t x4) {
#if QK_ISA >= 3
  return {_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(x4))};
#else
  const __m512i p = _mm512_maddubs_epi16(w.v, _mm512_set1_epi32(x4));
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(p, _mm512_set1_epi16(1)))};
#endif
}
#else
// 16 lanes as two 256-bit halves (rows 0-7, rows 8-15)
struct VI {
  __m256i a, b;
};
struct VF {
  __m256 a, b;
};
static inline VI vi_load(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
static inline VI vi_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline VI vi_and(VI x, int32_t m) {
  const __m256i mm = _mm256_set1_epi32(m);
  return {_mm256_and_si256(x.a, mm), _mm256_and_si256(x.b, mm)};
}
template <int S>
static inline VI vi_srl32(VI x) { return {_mm256_srli_epi32(x.a, S), _mm256_srli_epi32(x.b, S)}; }
static inline VI vi_add(VI x, VI y) { return {_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)}; }
static inline VI vi_xor(VI x, int32_t m) {
  const __m256i mm = _mm256_set1_epi32(m);
  return {_mm256_xor_si256(x.a, mm), _mm256_xor_si256(x.b, mm)};
}
template <int S>
static inline VI vi_sll32(VI x) { return {_mm256_slli_epi32(x.a, S), _mm256_slli_epi32(x.b, S)}; }
template <int S>
static inline VI vi_sra32(VI x) { return {_mm256_srai_epi32(x.a, S), _mm256_srai_epi32(x.b, S)}; }
static inline VF vf_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline VF vf_set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline VF vf_cvt(VI x) { return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
static inline VF vf_fma(VF x, VF y, VF z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
static inline VF vf_mul(VF x, VF y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline VF vf_sub(VF x, VF y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
static inline VF vf_fnma(VF x, VF y, VF z) {
  return {_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b)};
}
static inline VF vf_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline VF vf_load(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
static inline void vf_store(float* p, VF x) {
  _mm256_storeu_ps(p, x.a);
  _mm256_storeu_ps(p + 8, x.b);
}
static inline VI dot4(VI acc, VI w, int32_t x4) {
  const __m256i xb = _mm256_set1_epi32(x4), one = _mm256_set1_epi16(1);
  return {_mm256_add_epi32(acc.a, _mm256_madd_epi16(_mm256_maddubs_epi16(w.a, xb), one)),
          _mm256_add_epi32(acc.b, _mm256_madd_epi16(_mm256_maddubs_epi16(w.b, xb), one))};
}
#endif

// The activations' side: 16 values as floats from float32 / bfloat16 / float16 storage (dtype 0 / 1 / 2), their
// absolute largest and integer sum, rounding to int32 (nearest even: MXCSR's default), int32 -> int8 stores, and
// floats back to the output's dtype (bfloat16: round to nearest even, NaN kept a NaN; float16: F16C's rounding).
#if QK_ISA >= 2
static inline VF vf_load_act(const void* p, int dtype) {
  if (dtype == 0) return {_mm512_loadu_ps(p)};
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  if (dtype == 1) return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  return {_mm512_cvtph_ps(h)};
}
static inline float vf_absmax(VF a, VF b) {
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a.v), _mm512_abs_ps(b.v)));
}
static inline float vf_hsum(VF a) { return _mm512_reduce_add_ps(a.v); }
static inline VF vf_add(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline VI vf_round(VF a) { return {_mm512_cvtps_epi32(a.v)}; }
static inline int32_t vi_hsum(VI a) { return _mm512_reduce_add_epi32(a.v); }
static inline void vi_store_i8(int8_t* p, VI a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(a.v));
}
// the n (<= 16) first values of a to p as dtype
static inline void vf_store_act(void* p, int dtype, VF a, int n) {
  const __mmask16 k = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  if (dtype == 0) return _mm512_mask_storeu_ps(p, k, a.v);
  __m256i h;
  if (dtype == 1) {
    const __m512i bits = _mm512_castps_si512(a.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    h = _mm512_cvtepi32_epi16(r);
  } else {
    h = _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_mask_storeu_epi16(p, k, h);
}
#else
static inline VF vf_load_act(const void* p, int dtype) {
  const float* f = static_cast<const float*>(p);
  if (dtype == 0) return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
  const __m128i* h = static_cast<const __m128i*>(p);
  const __m128i lo = _mm_loadu_si128(h), hi = _mm_loadu_si128(h + 1);
  if (dtype == 1)
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16))};
  return {_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi)};
}
static inline float hmax8(__m256 m) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
static inline float vf_absmax(VF a, VF b) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a.a), _mm256_andnot_ps(sign, a.b)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, b.a), _mm256_andnot_ps(sign, b.b)));
  return hmax8(m);
}
static inline float vf_hsum(VF a) {
  const __m256 s = _mm256_add_ps(a.a, a.b);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
static inline VF vf_add(VF x, VF y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
static inline VI vf_round(VF x) { return {_mm256_cvtps_epi32(x.a), _mm256_cvtps_epi32(x.b)}; }
static inline int32_t vi_hsum(VI x) {
  const __m256i s = _mm256_add_epi32(x.a, x.b);
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}
static inline void vi_store_i8(int8_t* p, VI x) {
  const __m128i a = _mm_packs_epi32(_mm256_castsi256_si128(x.a), _mm256_extracti128_si256(x.a, 1));
  const __m128i b = _mm_packs_epi32(_mm256_castsi256_si128(x.b), _mm256_extracti128_si256(x.b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(a, b));
}
static inline __m128i bf16_of(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
static inline void vf_store_act(void* p, int dtype, VF x, int n) {
  alignas(32) uint8_t tmp[64];
  void* dst = n >= 16 ? p : tmp;
  if (dtype == 0) {
    _mm256_storeu_ps(static_cast<float*>(dst), x.a);
    _mm256_storeu_ps(static_cast<float*>(dst) + 8, x.b);
  } else {
    __m128i* h = static_cast<__m128i*>(dst);
    if (dtype == 1) {
      _mm_storeu_si128(h, bf16_of(x.a));
      _mm_storeu_si128(h + 1, bf16_of(x.b));
    } else {
      _mm_storeu_si128(h, _mm256_cvtps_ph(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm_storeu_si128(h + 1, _mm256_cvtps_ph(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
  if (n < 16) std::memcpy(p, tmp, static_cast<size_t>(n) * (dtype == 0 ? 4 : 2));
}
#endif

// Rows of x (dtype 0 / 1 / 2: float32 / bfloat16 / float16; row stride xs elements; K = k) -> what the tile kernels
// read. terms > 0: per row m and term t (output row r = m * terms + t), per block b of 32 (zero padded past k):
// xq[r * kp + ...] the int8 values round_half_even(x / d), d = absmax / 127; dx[b * ds + 2 r + {0, 1}] = d and
// d * sum(xq) (block-major: a block's rows side by side); sx16[r * 2 nb + 2 b + {0, 1}] = d * the sums over each
// half block. The second term quantizes what the first left over (x - d * xq, one FMA rounding). terms == 0:
// xf[m * kp + ...] x as floats (zero padded) and sx16 the sums of x over each half block. terms == kBf16Tiles
// (bfloat16 x only): xq holds the bfloat16 rows (row stride kp elements, zero padded), dx[b * ds + 2 m + {0, 1}] = 1
// and the sum of x over the block.
static void quantize_rows(const void* x, int dtype, int64_t xs, int64_t rows, int64_t k, int terms, int8_t* xq,
                          float* xf, int64_t kp, float* dx, int64_t ds, float* sx16) {
  const int64_t nb = kp / 32, es = dtype == 0 ? 4 : 2;
  alignas(64) uint8_t tail[32 * 4];
  for (int64_t m = 0; m < rows; ++m) {
    const uint8_t* row = static_cast<const uint8_t*>(x) + m * xs * es;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* src = row + b * 32 * es;
      if (32 * b + 32 > k) {  // the last, partial block: through a zero-filled copy
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, src, static_cast<size_t>(k - 32 * b) * es);
        src = tail;
      }
      VF lo = vf_load_act(src, dtype), hi = vf_load_act(src + 16 * es, dtype);
      if (terms == kBf16Tiles) {  // bfloat16 rows as they are, each block's sum beside a unit scale
        std::memcpy(reinterpret_cast<uint16_t*>(xq) + m * kp + 32 * b, src, 64);
        dx[b * ds + 2 * m] = 1.f;
        dx[b * ds + 2 * m + 1] = vf_hsum(vf_add(lo, hi));
        continue;
      }
      if (terms == 0) {
        vf_store(xf + m * kp + 32 * b, lo);
        vf_store(xf + m * kp + 32 * b + 16, hi);
        sx16[m * 2 * nb + 2 * b] = vf_hsum(lo);
        sx16[m * 2 * nb + 2 * b + 1] = vf_hsum(hi);
        continue;
      }
      for (int t = 0; t < terms; ++t) {
        const int64_t r = m * terms + t;
        const float d = vf_absmax(lo, hi) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        const VI ql = vf_round(vf_mul(lo, vf_set1(inv))), qh = vf_round(vf_mul(hi, vf_set1(inv)));
        vi_store_i8(xq + r * kp + 32 * b, ql);
        vi_store_i8(xq + r * kp + 32 * b + 16, qh);
        const int32_t s0 = vi_hsum(ql), s1 = vi_hsum(qh);
        dx[b * ds + 2 * r] = d;
        dx[b * ds + 2 * r + 1] = d * static_cast<float>(s0 + s1);
        sx16[r * 2 * nb + 2 * b] = d * static_cast<float>(s0);
        sx16[r * 2 * nb + 2 * b + 1] = d * static_cast<float>(s1);
        if (t + 1 < terms) {  // what this term left over: x - q d, one rounding
          lo = vf_fma(vf_cvt(ql), vf_set1(-d), lo);
          hi = vf_fma(vf_cvt(qh), vf_set1(-d), hi);
        }
      }
    }
  }
}

// out (rows, terms, 16) floats, a tile's products (two terms: summed) -> y's rows (row stride ldy elements, dtype as
// quantize_rows'), cols (<= 16) columns from y.
static void store_rows(const float* out, int terms, int64_t rows, int cols, void* y, int dtype, int64_t ldy) {
  const int64_t es = dtype == 0 ? 4 : 2;
  for (int64_t m = 0; m < rows; ++m) {
    const float* o = out + m * terms * 16;
    const VF v = terms == 2 ? vf_add(vf_load(o), vf_load(o + 16)) : vf_load(o);
    vf_store_act(static_cast<uint8_t*>(y) + m * ldy * es, dtype, v, cols);
  }
}

// dot4 for 8-bit weights (u8 up to 255): VNNI takes them as they are; the byte multiply-add would saturate its
// 16-bit pair sums (255 * 127 * 2 > 32767), so there the weight is split into nibbles, w = 16 h + l, and the two
// products combined in 32 bits.
static inline VI dot4_u8(VI acc, VI w, int32_t x4) {
#if QK_ISA >= 3
  return dot4(acc, w, x4);
#else
  const VI h = dot4(vi_zero(), vi_and(vi_srl32<4>(w), 0x0F0F0F0F), x4);
  const VI l = dot4(vi_zero(), vi_and(w, 0x0F0F0F0F), x4);
#if QK_ISA == 2
  return vi_add(acc, vi_add(VI{_mm512_slli_epi32(h.v, 4)}, l));
#else
  return vi_add(acc, vi_add(VI{_mm256_slli_epi32(h.a, 4), _mm256_slli_epi32(h.b, 4)}, l));
#endif
#endif
}

// How far ahead of the block being multiplied its successors are prefetched, in bytes: a decode step's
// products are small and cold, and one core's hardware prefetcher alone does not keep its stream in flight.
constexpr int64_t kPrefetchAhead = 4096;

// The 8 weight groups of one block of a tile: raw bytes for 8-bit, nibbles split for 4-bit (groups 4..7 are the
// high nibbles of the 4 loaded groups). The block kPrefetchAhead bytes on is prefetched (prefetches do not fault:
// past the end of the weight they are dropped). Always inlined: called out of line (as the compiler chose for the
// 4-bit form) its 8 registers went through memory once per block.
template <int BITS>
__attribute__((always_inline)) static inline void load_block(const uint8_t* p, VI (&w)[8]) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  for (int64_t off = 0; off < BB; off += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + off),
                                                          _MM_HINT_T0);
  if constexpr (BITS == 8) {
    for (int c = 0; c < 8; ++c) w[c] = vi_load(p + 64 * c);
  } else {
    for (int c = 0; c < 4; ++c) {
      const VI raw = vi_load(p + 64 * c);
      w[c] = vi_and(raw, 0x0F0F0F0F);
      w[c + 4] = vi_and(vi_srl32<4>(raw), 0x0F0F0F0F);
    }
  }
}

// Per-call arguments of a tile kernel. S: the scales' storage (uint16_t: float16 bits; float).
template <typename S>
struct TileArgs {
  const uint8_t* q;      // the tile's first block
  const S* scales;       // the tile's (groups, 16) scales
  const S* mins;         // the tile's (groups, 16) mins, or nullptr (symmetric: q - 2**(bits-1))
  int64_t nb;            // blocks of 32 per row
  int64_t group_blocks;  // blocks per scale group (0: group 16, two groups a block)
};

// The scale (and min) vectors of a tile's current group, advanced block by block: next_block() before each block
// of a group >= 32 (group 16 reads its two scales per block directly).
template <typename S>
struct GroupScales {
  const S* sp;
  const S* mp;
  int64_t per_group, in_group = 0;
  VF d, mn;
  explicit GroupScales(const TileArgs<S>& a)
      : sp(a.scales), mp(a.mins), per_group(a.group_blocks), d(vf_load(a.scales)),
        mn(a.mins ? vf_load(a.mins) : vf_zero()) {}
  void next_block() {
    if (in_group == per_group) {
      in_group = 0;
      sp += 16;
      d = vf_load(sp);
      if (mp) {
        mp += 16;
        mn = vf_load(mp);
      }
    }
    ++in_group;
  }
};

// int8 activations: rows m of xq (int8, row stride xs); per block b and row m the pair dx[b * ds + 2 m + {0, 1}]
// (the block's scale, then the dequantised activations' sum: scale * sum(xq) over the block); per half-block the
// sums sx16 (row stride 2 ss). out: MT x 16 floats.
template <int BITS, typename S, int MT, bool MINS>
static void tile_int8_impl(const TileArgs<S>& a, const int8_t* xq, int64_t xs, const float* dx, int64_t ds,
                           const float* sx16, int64_t ss, float* out) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;  // bytes per block of a tile
  constexpr float OFF = BITS == 8 ? 128.0f : 8.0f;
  const bool half = a.group_blocks == 0;
  VF acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = vf_zero();
  GroupScales<S> g(a);
  const S* sp = a.scales;
  for (int64_t b = 0; b < a.nb; ++b) {
    VI w[8];
    load_block<BITS>(a.q + b * BB, w);
    if (half) {
      // group 16 (8-bit only): elements 0..15 are groups 0..3, 16..31 groups 4..7, each with its own scale
      const VF d0 = vf_load(sp + 32 * b), d1 = vf_load(sp + 32 * b + 16);
      for (int m = 0; m < MT; ++m) {
        const int32_t* x4 = reinterpret_cast<const int32_t*>(xq + m * xs + 32 * b);
        VI s0 = vi_zero(), s1 = vi_zero();
        for (int c = 0; c < 4; ++c) s0 = dot4_u8(s0, w[c], x4[c]);
        for (int c = 4; c < 8; ++c) s1 = dot4_u8(s1, w[c], x4[c]);
        const float xd = dx[b * ds + 2 * m];
        // d * (x_d * dot - OFF * sum(x)) per half block
        VF t0 = vf_sub(vf_mul(vf_cvt(s0), vf_set1(xd)), vf_set1(OFF * sx16[m * ss * 2 + 2 * b]));
        VF t1 = vf_sub(vf_mul(vf_cvt(s1), vf_set1(xd)), vf_set1(OFF * sx16[m * ss * 2 + 2 * b + 1]));
        acc[m] = vf_fma(d1, t1, vf_fma(d0, t0, acc[m]));
      }
      continue;
    }
    g.next_block();
    for (int m = 0; m < MT; ++m) {
      const int32_t* x4 = reinterpret_cast<const int32_t*>(xq + m * xs + 32 * b);
      // two chains so consecutive dot steps do not wait on each other
      VI s0 = vi_zero(), s1 = vi_zero();
      for (int c = 0; c < 8; c += 2) {
        if constexpr (BITS == 8) {
          s0 = dot4_u8(s0, w[c], x4[c]);
          s1 = dot4_u8(s1, w[c + 1], x4[c + 1]);
        } else {
          s0 = dot4(s0, w[c], x4[c]);
          s1 = dot4(s1, w[c + 1], x4[c + 1]);
        }
      }
      const float xd = dx[b * ds + 2 * m], xs32 = dx[b * ds + 2 * m + 1];
      const VF dot = vf_mul(vf_cvt(vi_add(s0, s1)), vf_set1(xd));
      if constexpr (MINS) {
        acc[m] = vf_fma(g.mn, vf_set1(xs32), vf_fma(g.d, dot, acc[m]));
      } else {
        acc[m] = vf_fma(g.d, vf_sub(dot, vf_set1(OFF * xs32)), acc[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) vf_store(out + 16 * m, acc[m]);
}

template <int BITS, typename S, int MT>
static void tile_int8(const TileArgs<S>& a, const int8_t* xq, int64_t xs, const float* dx, int64_t ds,
                      const float* sx16, int64_t ss, float* out) {
  if (a.mins)
    tile_int8_impl<BITS, S, MT, true>(a, xq, xs, dx, ds, sx16, ss, out);
  else
    tile_int8_impl<BITS, S, MT, false>(a, xq, xs, dx, ds, sx16, ss, out);
}

#if QK_ISA == 4
// AMX: the tile registers hold, per block of 32 activations, the C = A B products of 16 activation rows (A: 16
// rows x 32 int8) and the block's 16 weight rows (B: 8 rows of 64 bytes, each a group of the packed layout: exactly
// AMX's B layout, 4 consecutive K elements per column), into C (16 x 16 int32). Two stages, so one block's products
// run on the tile unit while the vector unit scales the previous block's into the float accumulators as
// tile_int8_impl does. Registers: tmm0-3 C, tmm4-5 A, tmm6-7 B. One term (T 1): stage s uses C s, A 4 + s, B 6 + s.
// Two terms (T 2): a pass is 32 int8 rows, the two terms of 16 rows of x, as A 4 (int8 rows 0-15) and A 5 (16-31)
// against one B: stage s uses C 2s, C 2s + 1 and B 6 + s, so a block's weights are split and loaded once for both
// terms and each row's two products are scaled into one accumulator. Rows past the caller's M are computed on
// padding and dropped.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// This thread's tile configuration is ours until amx_end (other AMX users, oneDNN's brgemm, configure their own):
// kind 1 for the int8 kernels (tmm0-3 C 16 x 64 bytes, tmm4-5 A 16 x 32, tmm6-7 B 8 x 64), kind 2 for bfloat16
// (tmm0-1 C, tmm2-3 A, tmm4-7 B, each 16 x 64 bytes); 0 when none is loaded.
static thread_local int tl_amx_kind = 0;

static inline void amx_begin(int kind) {
  if (tl_amx_kind == kind) return;
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) {
    const bool int8_a = kind == 1 && (i == 4 || i == 5), int8_b = kind == 1 && i >= 6;
    c.rows[i] = int8_b ? 8 : 16;
    c.colsb[i] = int8_a ? 32 : 64;
  }
  // ldtilecfg on the whole struct: GCC 12's _tile_loadconfig tells the compiler it reads only 8 bytes, so the
  // other fields' stores could be dropped as dead
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
  tl_amx_kind = kind;
}

static void amx_end() {
  if (!tl_amx_kind) return;
  _tile_release();
  tl_amx_kind = 0;
}

// A block's bytes as AMX reads them (8-bit: the packed block itself; 4-bit: its nibbles split into `unpacked`),
// the block kPrefetchAhead bytes on prefetched.
template <int BITS>
static inline const uint8_t* amx_weights(const uint8_t* q, uint8_t* unpacked) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  for (int64_t off = 0; off < BB; off += 64) _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchAhead + off),
                                                          _MM_HINT_T0);
  if constexpr (BITS == 8) return q;
  const __m512i m = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m512i raw = _mm512_loadu_si512(q + 64 * c);
    _mm512_store_si512(unpacked + 64 * c, _mm512_and_si512(raw, m));
    _mm512_store_si512(unpacked + 64 * (c + 4), _mm512_and_si512(_mm512_srli_epi16(raw, 4), m));
  }
  return unpacked;
}

// Stage S's products of one block (weights w, activations xq with row stride xs), stored into prod (T x 256
// int32); the tile intrinsics take literal register numbers, hence the macros. The store of stage S's C tiles
// comes one iteration after their product (amx_store), so that no instruction reads what the one before wrote.
#define TRITIUM_AMX_BLOCK1(C, A, B)        \
  do {                                     \
    _tile_loadd(A, xq, xs);                \
    _tile_loadd(B, w, 64);                 \
    _tile_zero(C);                         \
    _tile_dpbsud(C, A, B);                 \
  } while (0)
#define TRITIUM_AMX_BLOCK2(C0, C1, B)      \
  do {                                     \
    _tile_loadd(4, xq, xs);                \
    _tile_loadd(5, xq + 16 * xs, xs);      \
    _tile_loadd(B, w, 64);                 \
    _tile_zero(C0);                        \
    _tile_zero(C1);                        \
    _tile_dpbsud(C0, 4, B);                \
    _tile_dpbsud(C1, 5, B);                \
  } while (0)
template <int T, int S>
static inline void amx_block(const uint8_t* w, const int8_t* xq, int64_t xs) {
  if constexpr (T == 1 && S == 0) TRITIUM_AMX_BLOCK1(0, 4, 6);
  if constexpr (T == 1 && S == 1) TRITIUM_AMX_BLOCK1(1, 5, 7);
  if constexpr (T == 2 && S == 0) TRITIUM_AMX_BLOCK2(0, 1, 6);
  if constexpr (T == 2 && S == 1) TRITIUM_AMX_BLOCK2(2, 3, 7);
}
#undef TRITIUM_AMX_BLOCK1
#undef TRITIUM_AMX_BLOCK2

template <int T, int S>
static inline void amx_store(int32_t* prod) {
  if constexpr (T == 1 && S == 0) _tile_stored(0, prod, 64);
  if constexpr (T == 1 && S == 1) _tile_stored(1, prod, 64);
  if constexpr (T == 2 && S == 0) {
    _tile_stored(0, prod, 64);
    _tile_stored(1, prod + 256, 64);
  }
  if constexpr (T == 2 && S == 1) {
    _tile_stored(2, prod, 64);
    _tile_stored(3, prod + 256, 64);
  }
}

// One pass: 16 rows of x (T int8 rows each, consecutive), rows of them valid; out gets T x rows rows of 16 (T 2:
// each row's result in its first int8 row, zero in the second; store_rows adds the pair).
template <int BITS, typename S, bool MINS, int T>
static void tile_int8_amx(const TileArgs<S>& a, const int8_t* xq, int64_t xs, const float* dx, int64_t ds,
                          int64_t rows, float* out) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  const VF off = vf_set1(BITS == 8 ? 128.0f : 8.0f);
  // A pipeline two blocks deep, each stage a block behind the one before, so that no instruction reads what the
  // previous one just wrote (a tile load of freshly stored bytes, or vector loads of a fresh tile store, wait for
  // the stores to retire): iteration b splits block b + 2's nibbles, multiplies block b into stage b % 2's C tiles,
  // stores block b - 1's products, and scales block b - 2's into the accumulators.
  alignas(64) int32_t prod[2][T * 256];
  alignas(64) uint8_t unpacked[3][512];
  VF acc[16];
#pragma GCC unroll 16
  for (int m = 0; m < 16; ++m) acc[m] = vf_zero();
  GroupScales<S> g(a);
  const int64_t nb = a.nb;
  const uint8_t* w[3] = {nullptr, nullptr, nullptr};
  for (int64_t b = 0; b < std::min<int64_t>(2, nb); ++b) w[b] = amx_weights<BITS>(a.q + b * BB, unpacked[b]);
  for (int64_t b = 0; b < nb + 2; ++b) {
    if (b < nb) {
      if (b & 1)
        amx_block<T, 1>(w[b % 3], xq + 32 * b, xs);
      else
        amx_block<T, 0>(w[b % 3], xq + 32 * b, xs);
    }
    if (b + 2 < nb) w[(b + 2) % 3] = amx_weights<BITS>(a.q + (b + 2) * BB, unpacked[(b + 2) % 3]);
    if (b >= 1 && b <= nb) {
      if ((b - 1) & 1)
        amx_store<T, 1>(prod[1]);
      else
        amx_store<T, 0>(prod[0]);
    }
    if (b < 2) continue;
    const int64_t c = b - 2;  // the block scaled now
    g.next_block();
    const int32_t* p = prod[c & 1];
    const float* d = dx + c * ds;  // per int8 row: scale, scaled sum
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) {
      VF dot = vf_mul(vf_cvt(vi_load(reinterpret_cast<const uint8_t*>(p + 16 * T * m))), vf_set1(d[2 * T * m]));
      float xs32 = d[2 * T * m + 1];
      if constexpr (T == 2) {
        dot = vf_fma(vf_cvt(vi_load(reinterpret_cast<const uint8_t*>(p + 32 * m + 16))), vf_set1(d[4 * m + 2]), dot);
        xs32 += d[4 * m + 3];
      }
      if constexpr (MINS) {
        acc[m] = vf_fma(g.mn, vf_set1(xs32), vf_fma(g.d, dot, acc[m]));
      } else {  // the offset's share, dot - OFF * sum(x), one instruction with the sum broadcast
        acc[m] = vf_fma(g.d, vf_fnma(off, vf_set1(xs32), dot), acc[m]);
      }
    }
  }
  // acc indexed by constants only (a runtime index would keep the accumulators in memory, not registers)
#pragma GCC unroll 16
  for (int m = 0; m < 16; ++m)
    if (m < rows) {
      vf_store(out + 16 * T * m, acc[m]);
      if constexpr (T == 2) vf_store(out + 32 * m + 16, vf_zero());
    }
}

// bfloat16 activations on AMX-BF16 tiles: exact products of x's bfloat16 values and the integer weights,
// accumulated in float32 (as the float kernels), with no activation quantization. A 4-bit weight q enters as the
// bfloat16 0x4300 | q = 128 + q (exact); an 8-bit one as two, its nibbles h and l in two B tiles multiplied into
// the same C: 0x4500 | h = 16 (128 + h) and 0x4300 | l = 128 + l, together 2176 + q. So a block's product is
// C = sum x (Z + q) (Z = 128 or 2176), and the block's share d * sum x (q - OFF) + mn * sum x = d * C +
// (mn - (Z + OFF) d) * sum x (OFF = 0 with mins, else 2^(bits - 1)).
// B for tdpbf16ps: 16 rows of k pairs (row p: elements 2p and 2p + 1 of the 16 weight rows, as bfloat16 pairs).
// A 64-byte group of the packed block (4 consecutive elements of each weight row) makes two pair rows, each one
// in-lane byte shuffle of its nibbles (a lane holds 4 weight rows' 4 bytes, a pair row's lane their 2 pairs), a
// word's high byte then set. 4-bit: element e < 16 is the low nibble of group e / 4, e >= 16 the high nibble of
// group (e - 16) / 4; 8-bit: element e is group e / 4's byte, split into h (B rows 16-31) and l (rows 0-15).
template <int BITS>
static inline const uint16_t* amx_weights_bf16(const uint8_t* q, uint16_t* rows) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  for (int64_t off = 0; off < BB; off += 64) _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchAhead + off),
                                                          _MM_HINT_T0);
  // byte 2w of a lane's word w (pair n = w / 2 of that lane's 4 weight rows, element w % 2) from byte 4 (w / 2) +
  // 2 h + w % 2 (h: the first or second pair of the group); byte 2w + 1 zeroed (index bit 7)
  const __m512i pick0 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128,
                                                             12, -128, 13, -128));
  const __m512i pick1 = _mm512_broadcast_i32x4(_mm_setr_epi8(2, -128, 3, -128, 6, -128, 7, -128, 10, -128, 11, -128,
                                                             14, -128, 15, -128));
  const __m512i nib = _mm512_set1_epi8(0x0F), z128 = _mm512_set1_epi16(0x4300), z2048 = _mm512_set1_epi16(0x4500);
  auto pair_rows = [&](__m512i v, __m512i high, uint16_t* dst) {
    _mm512_store_si512(dst, _mm512_or_si512(_mm512_shuffle_epi8(v, pick0), high));
    _mm512_store_si512(dst + 32, _mm512_or_si512(_mm512_shuffle_epi8(v, pick1), high));
  };
  for (int c = 0; c < BITS; ++c) {  // 4 groups (4-bit) or 8 (8-bit)
    const __m512i raw = _mm512_loadu_si512(q + 64 * c);
    const __m512i lo = _mm512_and_si512(raw, nib), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
    pair_rows(lo, z128, rows + 64 * c);
    pair_rows(hi, BITS == 4 ? z128 : z2048, rows + 64 * c + (BITS == 4 ? 512 : 1024) / 2);
  }
  return rows;
}

// Stage S's product of one block: A tile 2 + S, B tile(s) 4 + 2S (8-bit: and 5 + 2S), C tile S
#define TRITIUM_AMX_BF16_BLOCK(C, A, B0, B1) \
  do {                                       \
    _tile_loadd(A, xb, xs * 2);              \
    _tile_loadd(B0, w, 64);                  \
    _tile_zero(C);                           \
    _tile_dpbf16ps(C, A, B0);                \
    if constexpr (BITS == 8) {               \
      _tile_loadd(B1, w + 512, 64);          \
      _tile_dpbf16ps(C, A, B1);              \
    }                                        \
  } while (0)

// One pass: 16 bfloat16 rows of x (row stride xs elements), rows of them valid, into out (rows x 16); dx as
// quantize_rows' kBf16Tiles. The pipeline of tile_int8_amx.
template <int BITS, typename S, bool MINS>
static void tile_bf16_amx(const TileArgs<S>& a, const uint16_t* xb, int64_t xs, const float* dx, int64_t ds,
                          int64_t rows, float* out) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  constexpr float Z = BITS == 4 ? 128.0f : 2176.0f, OFF = MINS ? 0.0f : BITS == 4 ? 8.0f : 128.0f;
  const VF shift = vf_set1(-(Z + OFF));
  alignas(64) float prod[2][256];
  alignas(64) uint16_t wrows[3][BITS == 4 ? 512 : 1024];
  VF acc[16];
#pragma GCC unroll 16
  for (int m = 0; m < 16; ++m) acc[m] = vf_zero();
  GroupScales<S> g(a);
  const int64_t nb = a.nb;
  const uint16_t* w[3] = {nullptr, nullptr, nullptr};
  for (int64_t b = 0; b < std::min<int64_t>(2, nb); ++b) w[b] = amx_weights_bf16<BITS>(a.q + b * BB, wrows[b]);
  for (int64_t b = 0; b < nb + 2; ++b) {
    if (b < nb) {
      const uint16_t* wb = w[b % 3];
      const uint16_t* xbb = xb + 32 * b;
      if (b & 1) {
        const uint16_t *w = wb, *xb = xbb;
        TRITIUM_AMX_BF16_BLOCK(1, 3, 6, 7);
      } else {
        const uint16_t *w = wb, *xb = xbb;
        TRITIUM_AMX_BF16_BLOCK(0, 2, 4, 5);
      }
    }
    if (b + 2 < nb) w[(b + 2) % 3] = amx_weights_bf16<BITS>(a.q + (b + 2) * BB, wrows[(b + 2) % 3]);
    if (b >= 1 && b <= nb) {
      if ((b - 1) & 1)
        _tile_stored(1, prod[1], 64);
      else
        _tile_stored(0, prod[0], 64);
    }
    if (b < 2) continue;
    const int64_t c = b - 2;  // the block scaled now
    g.next_block();
    const VF mn = vf_fma(g.d, shift, MINS ? g.mn : vf_zero());
    const float* p = prod[c & 1];
    const float* d = dx + c * ds;
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) acc[m] = vf_fma(mn, vf_set1(d[2 * m + 1]), vf_fma(g.d, vf_load(p + 16 * m), acc[m]));
  }
#pragma GCC unroll 16
  for (int m = 0; m < 16; ++m)
    if (m < rows) vf_store(out + 16 * m, acc[m]);
}
#undef TRITIUM_AMX_BF16_BLOCK
#endif

#if QK_BF16
// AVX512-BF16 (vdpbf16ps: 16 lanes, each adding two bfloat16 products into a float32), the CPUs without AMX: the
// same exact products as tile_bf16_amx, bfloat16 x of kAmxRows rows or more times each weight as the bfloat16 128 +
// q (8-bit: 16 (128 + h) and 128 + l, its nibbles, in two products), scaled per block in float32. A tile's weights
// are widened once into pair vectors (lane r: the weight row r's two elements of a k pair, as bfloat16) that every
// row of x then reuses from L1/L2: the widening is amortised over the rows, which the int8 kernels cannot do with
// the activation quantization and scale work they repeat per row and block.
constexpr int kDotRows = 8;  // rows of x per pass over a tile's pair vectors: 8 accumulators and their 8 sums

// One block's pair vectors: 16 for 4-bit (pair p: elements 2p, 2p + 1), 32 for 8-bit (p < 16 the low nibbles' 128 +
// l, p >= 16 the high nibbles' 2048 + 16 h, of pair p % 16). A packed group c holds, per lane, elements 4c..4c+3
// (8-bit; 4-bit: the low nibbles, and 16 + 4c.. the high): pairs 2c and 2c + 1 (4-bit high nibbles: 8 + 2c, 9 + 2c).
template <int BITS>
static inline void bf16_pairs(const uint8_t* q, __m512i* out) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  for (int64_t off = 0; off < BB; off += 64) _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchAhead + off),
                                                          _MM_HINT_T0);
  // a dword lane's bytes 0, 1 (pick0) or 2, 3 (pick1) into the low bytes of its two words, the high bytes zeroed
  const __m512i pick0 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128,
                                                             12, -128, 13, -128));
  const __m512i pick1 = _mm512_broadcast_i32x4(_mm_setr_epi8(2, -128, 3, -128, 6, -128, 7, -128, 10, -128, 11, -128,
                                                             14, -128, 15, -128));
  const __m512i nib = _mm512_set1_epi8(0x0F), z128 = _mm512_set1_epi16(0x4300), z2048 = _mm512_set1_epi16(0x4500);
  for (int c = 0; c < BITS; ++c) {  // 4 groups (4-bit) or 8 (8-bit)
    const __m512i raw = _mm512_loadu_si512(q + 64 * c);
    const __m512i lo = _mm512_and_si512(raw, nib), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
    const int64_t plo = 2 * c, phi = BITS == 4 ? 8 + 2 * c : 16 + 2 * c;
    out[plo] = _mm512_or_si512(_mm512_shuffle_epi8(lo, pick0), z128);
    out[plo + 1] = _mm512_or_si512(_mm512_shuffle_epi8(lo, pick1), z128);
    out[phi] = _mm512_or_si512(_mm512_shuffle_epi8(hi, pick0), BITS == 4 ? z128 : z2048);
    out[phi + 1] = _mm512_or_si512(_mm512_shuffle_epi8(hi, pick1), BITS == 4 ? z128 : z2048);
  }
}

// MT rows of bfloat16 x (row stride xs elements, zero padded to whole blocks) against a tile's pair vectors wp (nb
// blocks of 16 / 32); dx as quantize_rows' kBf16Tiles (the sum of x over each block at dx[b * ds + 2 m + 1]). The
// first `rows` of the MT rows are stored to out (16 floats each); the others are padding of the activation buffer.
template <int BITS, typename S, bool MINS, int MT>
static void bf16_dot_rows(const TileArgs<S>& a, const __m512i* wp, const uint16_t* xb, int64_t xs, const float* dx,
                          int64_t ds, int64_t rows, float* out) {
  constexpr int P = BITS == 4 ? 16 : 32;
  constexpr float Z = BITS == 4 ? 128.0f : 2176.0f, OFF = MINS ? 0.0f : BITS == 4 ? 8.0f : 128.0f;
  const VF shift = vf_set1(-(Z + OFF));
  __m512 tot[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
  GroupScales<S> g(a);
  for (int64_t b = 0; b < a.nb; ++b) {
    // two chains per row (even and odd pairs), summed at the block's end: with one, MT = 8 dependent chains of
    // vdpbf16ps ran at the instruction's latency (4.5 G/s on the AMD EPYC measured), with two at 6.5 G/s
    __m512 acc[MT], acc2[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
    const __m512i* w = wp + b * P;
    // each row's block as 16 int32 pairs, addressed from one pointer per row (the broadcasts then take an
    // immediate offset: no address arithmetic between the products, which would bound the loop by instructions)
    const int32_t* xr[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) xr[m] = reinterpret_cast<const int32_t*>(xb + m * xs + 32 * b);
#pragma GCC unroll 16
    for (int p = 0; p < P; p += 2) {
      const __m512bh w0 = reinterpret_cast<__m512bh>(w[p]), w1 = reinterpret_cast<__m512bh>(w[p + 1]);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm512_dpbf16_ps(acc[m], reinterpret_cast<__m512bh>(_mm512_set1_epi32(xr[m][p & 15])), w0);
        acc2[m] = _mm512_dpbf16_ps(acc2[m], reinterpret_cast<__m512bh>(_mm512_set1_epi32(xr[m][(p + 1) & 15])), w1);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_add_ps(acc[m], acc2[m]);
    g.next_block();
    // d C + (mn - (Z + OFF) d) sum(x): C = sum x (Z + q), q - OFF the symmetric weight
    const VF mn = vf_fma(g.d, shift, MINS ? g.mn : vf_zero());
    const float* d = dx + b * ds;
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m)
      tot[m] = _mm512_fmadd_ps(mn.v, _mm512_set1_ps(d[2 * m + 1]), _mm512_fmadd_ps(g.d.v, acc[m], tot[m]));
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
    if (m < rows) _mm512_storeu_ps(out + 16 * m, tot[m]);
}

// All M rows of x against one tile: the tile's pair vectors built once (a thread's scratch), then passes of kDotRows
// rows (the last one of 4 where at most 4 remain; the activation buffer holds whole passes of 16 rows).
template <int BITS, typename S>
static void tile_bf16_dot(const TileArgs<S>& a, const uint16_t* xb, int64_t xs, const float* dx, int64_t ds,
                          int64_t M, float* out) {
  constexpr int P = BITS == 4 ? 16 : 32;
  thread_local std::vector<uint8_t> scratch;  // (a vector of __m512i would drop its alignment attribute)
  if (static_cast<int64_t>(scratch.size()) < a.nb * P * 64 + 64) scratch.resize(a.nb * P * 64 + 64);
  __m512i* wp = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
  for (int64_t b = 0; b < a.nb; ++b) bf16_pairs<BITS>(a.q + b * (16 * 32 * BITS / 8), wp + b * P);
  for (int64_t m = 0; m < M; m += kDotRows) {
    const int64_t rows = std::min<int64_t>(kDotRows, M - m);
    const uint16_t* x = xb + m * xs;
    auto run = [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      if (a.mins)
        bf16_dot_rows<BITS, S, true, MT>(a, wp, x, xs, dx + 2 * m, ds, rows, out + 16 * m);
      else
        bf16_dot_rows<BITS, S, false, MT>(a, wp, x, xs, dx + 2 * m, ds, rows, out + 16 * m);
    };
    if (rows > 4)
      run(std::integral_constant<int, kDotRows>{});
    else
      run(std::integral_constant<int, 4>{});
  }
}
#endif

// Byte J of each lane as a float: unsigned (q), or for symmetric weights the signed q - OFF (the offset removed
// before any product, so the sums are those of a float matmul of the dequantised weight): the lanes were xor'ed
// with the offset's bit, which makes each byte q - OFF in two's complement (8-bit) or a 4-bit two's complement
// nibble, then shifted up to the top and arithmetically back down (sign extension).
template <int J, bool SIGNED, int BITS>
static inline VF byte_as_float(VI w) {
  if constexpr (SIGNED) {
    return vf_cvt(vi_sra32<32 - BITS>(vi_sll32<24 - 8 * J + 8 - BITS>(w)));
  } else if constexpr (J == 3) {
    return vf_cvt(vi_srl32<24>(w));
  } else {
    return vf_cvt(vi_and(vi_srl32<8 * J>(w), 0xFF));
  }
}

// float activations: rows m of xf (float, row stride xs, zero padded to a multiple of 32) and their per-16 sums
// sx16 (row stride 2 * ss; used for the mins). The weights are widened to float in registers: each 4-byte lane holds
// 4 consecutive elements of its row, element j is byte j.
template <int BITS, typename S, int MT, bool SIGNED>
static void tile_float_impl(const TileArgs<S>& a, const float* xf, int64_t xs, const float* sx16, int64_t ss,
                            float* out) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  constexpr int32_t FLIP = BITS == 8 ? 0x80808080 : 0x08080808;
  const bool half = a.group_blocks == 0;
  VF acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = vf_zero();
  GroupScales<S> g(a);
  const S* sp = a.scales;
  for (int64_t b = 0; b < a.nb; ++b) {
    VI w[8];
    load_block<BITS>(a.q + b * BB, w);
    VF s0[MT], s1[MT];  // sums over the block's first and second 16 elements
    for (int m = 0; m < MT; ++m) s0[m] = s1[m] = vf_zero();
    for (int c = 0; c < 8; ++c) {
      const VI wc = SIGNED ? vi_xor(w[c], FLIP) : w[c];
      const VF w0 = byte_as_float<0, SIGNED, BITS>(wc), w1 = byte_as_float<1, SIGNED, BITS>(wc);
      const VF w2 = byte_as_float<2, SIGNED, BITS>(wc), w3 = byte_as_float<3, SIGNED, BITS>(wc);
      for (int m = 0; m < MT; ++m) {
        const float* x = xf + m * xs + 32 * b + 4 * c;
        VF& s = c < 4 ? s0[m] : s1[m];
        s = vf_fma(w0, vf_set1(x[0]), s);
        s = vf_fma(w1, vf_set1(x[1]), s);
        s = vf_fma(w2, vf_set1(x[2]), s);
        s = vf_fma(w3, vf_set1(x[3]), s);
      }
    }
    if (half) {  // group 16: symmetric 8-bit only (Q6_K)
      const VF d0 = vf_load(sp + 32 * b), d1 = vf_load(sp + 32 * b + 16);
      for (int m = 0; m < MT; ++m) acc[m] = vf_fma(d1, s1[m], vf_fma(d0, s0[m], acc[m]));
      continue;
    }
    g.next_block();
    for (int m = 0; m < MT; ++m) {
      const VF dot = vf_fma(s0[m], vf_set1(1.0f), s1[m]);
      if constexpr (SIGNED) {
        acc[m] = vf_fma(g.d, dot, acc[m]);
      } else {
        const float xs32 = sx16[m * ss * 2 + 2 * b] + sx16[m * ss * 2 + 2 * b + 1];
        acc[m] = vf_fma(g.mn, vf_set1(xs32), vf_fma(g.d, dot, acc[m]));
      }
    }
  }
  for (int m = 0; m < MT; ++m) vf_store(out + 16 * m, acc[m]);
}

template <int BITS, typename S, int MT>
static void tile_float(const TileArgs<S>& a, const float* xf, int64_t xs, const float* sx16, int64_t ss, float* out) {
  if (a.mins)
    tile_float_impl<BITS, S, MT, false>(a, xf, xs, sx16, ss, out);
  else
    tile_float_impl<BITS, S, MT, true>(a, xf, xs, sx16, ss, out);
}

// The tile's 16 rows of W dequantised into W^T: out[e * ldo + r] = W[16 t + r, e] for e < k (the tile's 16
// columns of a (K, N) matrix, one vector store per element), each value scales * q + mins (or scales * (q - OFF))
// in float32 with one rounding, as quant_dequantize.
template <int BITS, typename S>
static void tile_dequant_t(const TileArgs<S>& a, int64_t k, float* out, int64_t ldo) {
  constexpr int64_t BB = 16 * 32 * BITS / 8;
  constexpr int32_t FLIP = BITS == 8 ? 0x80808080 : 0x08080808;
  const bool half = a.group_blocks == 0;
  for (int64_t b = 0; b < a.nb; ++b) {
    VI w[8];
    load_block<BITS>(a.q + b * BB, w);
    for (int c = 0; c < 8; ++c) {
      const int64_t e0 = 32 * b + (BITS == 8 ? 4 * c : (c < 4 ? 4 * c : 16 + 4 * (c - 4)));
      const int64_t g = half ? 2 * b + (e0 % 32 >= 16) : e0 / (32 * a.group_blocks);
      const VF d = vf_load(a.scales + 16 * g);
      VF v[4];
      if (a.mins) {
        v[0] = byte_as_float<0, false, BITS>(w[c]);
        v[1] = byte_as_float<1, false, BITS>(w[c]);
        v[2] = byte_as_float<2, false, BITS>(w[c]);
        v[3] = byte_as_float<3, false, BITS>(w[c]);
        const VF m = vf_load(a.mins + 16 * g);
        for (int j = 0; j < 4; ++j) v[j] = vf_fma(d, v[j], m);
      } else {
        const VI wc = vi_xor(w[c], FLIP);
        v[0] = byte_as_float<0, true, BITS>(wc);
        v[1] = byte_as_float<1, true, BITS>(wc);
        v[2] = byte_as_float<2, true, BITS>(wc);
        v[3] = byte_as_float<3, true, BITS>(wc);
        for (int j = 0; j < 4; ++j) v[j] = vf_mul(d, v[j]);
      }
      for (int j = 0; j < 4; ++j)
        if (e0 + j < k) vf_store(out + (e0 + j) * ldo, v[j]);
    }
  }
}

static void dequant_t(int bits, bool half_scales, const uint8_t* q, const void* scales, const void* mins, int64_t nb,
                      int64_t group_blocks, int64_t k, float* out, int64_t ldo) {
  if (half_scales) {
    const TileArgs<uint16_t> a{q, static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(mins), nb,
                               group_blocks};
    bits == 8 ? tile_dequant_t<8>(a, k, out, ldo) : tile_dequant_t<4>(a, k, out, ldo);
  } else {
    const TileArgs<float> a{q, static_cast<const float*>(scales), static_cast<const float*>(mins), nb, group_blocks};
    bits == 8 ? tile_dequant_t<8>(a, k, out, ldo) : tile_dequant_t<4>(a, k, out, ldo);
  }
}

// One tile, all rows of x (terms: 0 float activations, else the int8 rows per row of x; M counts int8 rows):
// m-tiles of 8 (int8 activations, AVX-512) or 4 rows, then the remainder.
template <int BITS, typename S>
static void tile_rows(int terms, const TileArgs<S>& a, int64_t M, const void* x, int64_t xs, const float* dx,
                      const float* sx16, int64_t ss, float* out) {
  int64_t m = 0;
  const bool int8_act = terms > 0;
  const int64_t pass = 16 * (terms == 2 ? 2 : 1);
  const int64_t ds = 2 * ((M + pass - 1) / pass * pass);  // dx's block stride: quant.cpp's rows in whole passes
  auto run = [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    if (int8_act) {
      tile_int8<BITS, S, MT>(a, static_cast<const int8_t*>(x) + m * xs, xs, dx + 2 * m, ds, sx16 + m * ss * 2, ss,
                             out + 16 * m);
    } else {
      tile_float<BITS, S, MT>(a, static_cast<const float*>(x) + m * xs, xs, sx16 + m * ss * 2, ss, out + 16 * m);
    }
    m += MT;
  };
#if QK_BF16
  // quant.cpp's bf16_tiles held (groups of 32 or more), kAmxRows rows or more: AVX512-BF16 pair products
  if (terms == kBf16Tiles) {
    tile_bf16_dot<BITS, S>(a, static_cast<const uint16_t*>(x), xs, dx, ds, M, out);
    return;
  }
#endif
#if QK_ISA == 4
  // quant.cpp's bf16_tiles held (groups of 32 or more), kAmxRows rows or more
  if (terms == kBf16Tiles) {
    amx_begin(2);
    for (; m < M; m += 16) {
      const uint16_t* xb = static_cast<const uint16_t*>(x) + m * xs;
      const int64_t rows = std::min<int64_t>(16, M - m);
      if (a.mins)
        tile_bf16_amx<BITS, S, true>(a, xb, xs, dx + 2 * m, ds, rows, out + 16 * m);
      else
        tile_bf16_amx<BITS, S, false>(a, xb, xs, dx + 2 * m, ds, rows, out + 16 * m);
    }
    return;
  }
  // int8 activations, 8 int8 rows or more, scales per group of 32 or more: AMX, 16 rows of x per pass (the
  // activation buffers hold whole passes: quant.cpp pads them)
  if (int8_act && M >= kAmxRows && a.group_blocks > 0) {
    amx_begin(1);
    auto amx = [&](auto t) {
      constexpr int T = decltype(t)::value;
      for (; m < M; m += 16 * T) {
        const int8_t* xq = static_cast<const int8_t*>(x) + m * xs;
        const int64_t rows = std::min<int64_t>(16, (M - m) / T);
        if (a.mins)
          tile_int8_amx<BITS, S, true, T>(a, xq, xs, dx + 2 * m, ds, rows, out + 16 * m);
        else
          tile_int8_amx<BITS, S, false, T>(a, xq, xs, dx + 2 * m, ds, rows, out + 16 * m);
      }
    };
    if (terms == 2)
      amx(std::integral_constant<int, 2>{});
    else
      amx(std::integral_constant<int, 1>{});
    return;
  }
#endif
#if QK_ISA >= 2
  // int8 activations in 512-bit registers: 16 rows per pass over the weights (a batched decode step's), then 8, so
  // a block's nibbles are split and its groups loaded once per pass; the 8 weight groups and 8 accumulators fit the
  // 32 registers, and at 16 the compiler keeps all but a few accumulators in them too
  if (int8_act) {
    while (M - m >= 16) run(std::integral_constant<int, 16>{});
    while (M - m >= 8) run(std::integral_constant<int, 8>{});
  }
#endif
  while (M - m >= 4) run(std::integral_constant<int, 4>{});
  if (M - m == 3) run(std::integral_constant<int, 3>{});
  if (M - m == 2) run(std::integral_constant<int, 2>{});
  if (M - m == 1) run(std::integral_constant<int, 1>{});
}

// The entry point quant.cpp calls for one tile: out (M, 16) floats.
static void tile(int bits, bool half_scales, int terms, const uint8_t* q, const void* scales, const void* mins,
                 int64_t nb, int64_t group_blocks, int64_t M, const void* x, int64_t xs, const float* dx,
                 const float* sx16, int64_t ss, float* out) {
  if (half_scales) {
    const TileArgs<uint16_t> a{q, static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(mins), nb,
                               group_blocks};
    if (bits == 8)
      tile_rows<8>(terms, a, M, x, xs, dx, sx16, ss, out);
    else
      tile_rows<4>(terms, a, M, x, xs, dx, sx16, ss, out);
  } else {
    const TileArgs<float> a{q, static_cast<const float*>(scales), static_cast<const float*>(mins), nb, group_blocks};
    if (bits == 8)
      tile_rows<8>(terms, a, M, x, xs, dx, sx16, ss, out);
    else
      tile_rows<4>(terms, a, M, x, xs, dx, sx16, ss, out);
  }
}
