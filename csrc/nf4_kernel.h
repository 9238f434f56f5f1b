// NF4 kernels for one instruction set, included by csrc/nf4.cpp once per set inside a namespace compiled for it
// (NF4_ISA 1: AVX2 + FMA, 2: AVX-512F/BW/VL/DQ). No include guard: that is the point.
//
// The weight is bitsandbytes' NF4 layout (python/tritium/ops/nf4.py): row n of W (N, K), K a multiple of the
// blocksize, is bytes [n K / 2, (n + 1) K / 2), byte j holding element 2j in its high nibble and 2j + 1 in its low
// one, and absmax[(n K + k) / blocksize] scales element k. A vector of V bytes widened to V 32-bit lanes gives,
// shifted, the V even elements of a run of 2V and, masked, the V odd ones; each 4-bit index becomes its code value
// by a 16-entry table lookup in registers (AVX-512: one vpermps over the 16 codes; AVX2: two vpermps over the
// halves and a blend on the index's bit 3), times the block's absmax: the float32 weight bitsandbytes'
// dequantize_4bit gives, one rounding. x is read deinterleaved the same way (its even and odd elements of each run
// of 2V side by side, prepared once per call), so no weight is shuffled back into order.

#if NF4_ISA == 2
constexpr int V = 16;
using VF = __m512;
using VI = __m512i;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vset1(float f) { return _mm512_set1_ps(f); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
// V bytes -> V lanes
inline VI widen(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VI hi_nib(VI b) { return _mm512_srli_epi32(b, 4); }
inline VI lo_nib(VI b) { return _mm512_and_si512(b, _mm512_set1_epi32(15)); }
struct Table {
  VF t;
  Table(const float* code) : t(_mm512_loadu_ps(code)) {}
  VF operator()(VI idx) const { return _mm512_permutexvar_ps(idx, t); }
};
#else
constexpr int V = 8;
using VF = __m256;
using VI = __m256i;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF vset1(float f) { return _mm256_set1_ps(f); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VI widen(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline VI hi_nib(VI b) { return _mm256_srli_epi32(b, 4); }
inline VI lo_nib(VI b) { return _mm256_and_si256(b, _mm256_set1_epi32(15)); }
struct Table {
  VF lo, hi;
  Table(const float* code) : lo(_mm256_loadu_ps(code)), hi(_mm256_loadu_ps(code + 8)) {}
  VF operator()(VI idx) const {
    // vpermps uses the index's low 3 bits; bit 3 (moved to the sign bit) picks the upper half
    const VF a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
};
#endif

constexpr int RUN = 2 * V;  // elements per run: V bytes

// x (M rows of K, any float dtype converted to float32) deinterleaved per run of RUN: out[m][r RUN + j] = x[m][r RUN
// + 2j] and out[m][r RUN + V + j] = x[m][r RUN + 2j + 1], j < V
template <typename T>
void deinterleave(const T* x, int64_t ldx, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * ldx;
    float* o = out + m * K;
    for (int64_t r = 0; r < K; r += RUN)
      for (int j = 0; j < V; ++j) {
        o[r + j] = static_cast<float>(xr[r + 2 * j]);
        o[r + V + j] = static_cast<float>(xr[r + 2 * j + 1]);
      }
  }
}

// y[m][n] (float32, ldy) = sum_k xd[m] . W[n] for rows n in [n0, n1), M rows of deinterleaved x (up to kMaxRows per
// pass: their accumulators stay in registers while a row's weights are decoded once)
constexpr int kMaxRows = 8;

template <int MR>
void gemv_pass(const float* xd, int64_t K, const uint8_t* q, const float* absmax, int64_t bs, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  const Table tab(kNF4Code);
  const int64_t bpr = K / bs;  // blocks per row
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = q + n * (K / 2);
    const float* am = absmax + n * bpr;
    VF acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = vzero();
    for (int64_t b = 0; b < bpr; ++b) {
      const VF s = vset1(am[b]);
      for (int64_t r = b * bs; r < (b + 1) * bs; r += RUN) {
        const VI bytes = widen(qr + r / 2);
        const VF we = vmul(tab(hi_nib(bytes)), s), wo = vmul(tab(lo_nib(bytes)), s);
        for (int i = 0; i < MR; ++i) {
          acc[i] = vfma(we, vload(xd + i * K + r), acc[i]);
          acc[i] = vfma(wo, vload(xd + i * K + r + V), acc[i]);
        }
      }
    }
    for (int i = 0; i < MR; ++i) y[i * ldy + n] = vsum(acc[i]);
  }
}

void gemv(const float* xd, int64_t M, int64_t K, const uint8_t* q, const float* absmax, int64_t bs, int64_t n0,
          int64_t n1, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; m += kMaxRows) {
    const float* xm = xd + m * K;
    float* ym = y + m * ldy;
    switch (std::min<int64_t>(kMaxRows, M - m)) {
      case 1: gemv_pass<1>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      case 2: gemv_pass<2>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      case 3: gemv_pass<3>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      case 4: gemv_pass<4>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      case 5: gemv_pass<5>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      case 6: gemv_pass<6>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      case 7: gemv_pass<7>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
      default: gemv_pass<8>(xm, K, q, absmax, bs, n0, n1, ym, ldy); break;
    }
  }
}

// rows [n0, n1) of W as float32 in order (out row n at out + (n - n0) ldo): each run's even and odd elements are
// interleaved back by two unpack steps (AVX-512: unpacklo/hi within 128-bit lanes, then a lane permute; AVX2 the
// same on 128-bit halves)
void dequant_rows(const uint8_t* q, const float* absmax, int64_t K, int64_t bs, int64_t n0, int64_t n1, float* out,
                  int64_t ldo) {
  const Table tab(kNF4Code);
  const int64_t bpr = K / bs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = q + n * (K / 2);
    const float* am = absmax + n * bpr;
    float* o = out + (n - n0) * ldo;
    for (int64_t b = 0; b < bpr; ++b) {
      const VF s = vset1(am[b]);
      for (int64_t r = b * bs; r < (b + 1) * bs; r += RUN) {
        const VI bytes = widen(qr + r / 2);
        const VF we = vmul(tab(hi_nib(bytes)), s), wo = vmul(tab(lo_nib(bytes)), s);
#if NF4_ISA == 2
        const VF l = _mm512_unpacklo_ps(we, wo), h = _mm512_unpackhi_ps(we, wo);
        // l holds pairs 0-1, 4-5, 8-9, 12-13 (128-bit lanes), h pairs 2-3, 6-7, 10-11, 14-15
        const VF first = _mm512_permutex2var_ps(l, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21,
                                                                       22, 23), h);
        const VF second = _mm512_permutex2var_ps(l, _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15,
                                                                        28, 29, 30, 31), h);
        vstore(o + r, first);
        vstore(o + r + V, second);
#else
        const VF l = _mm256_unpacklo_ps(we, wo), h = _mm256_unpackhi_ps(we, wo);
        // l: pairs 0-1 (lane 0), 4-5 (lane 1); h: pairs 2-3, 6-7
        vstore(o + r, _mm256_permute2f128_ps(l, h, 0x20));
        vstore(o + r + V, _mm256_permute2f128_ps(l, h, 0x31));
#endif
      }
    }
  }
}
