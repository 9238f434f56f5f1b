// Panel GEMM: y (M, N) = x (M, K) @ w (N, K)^T [+ c] with w packed once into column panels, for float and
// double. Used by tritium::linear_packed (csrc/linear.cpp: the serving path's projections with weights packed
// at load) and the LSTM/GRU scans (csrc/rnn.cpp: W_hh packed once per scan).
//
// Why a second kernel next to rowgemm.h: rowgemm reads torch's (N, K) layout as it is, so each output is a dot product
// whose 16 lanes must be reduced at the end (reduce_lanes: about 3 shuffles/adds per output), which at the K of a small
// model's hidden size (a few hundred) is a noticeable share of the K / 16 FMAs. Packed panels make the product an
// outer-product update instead: the panel holds, for each k, kPanel consecutive weight rows' k-th elements side by side
// (packed[p][k][c] = w[p * kPanel + c][k]), so a register tile of MR rows of x x kPanel outputs accumulates x[i][k]
// (broadcast) * panel[k][0:kPanel] (kNV vector loads) for k = 0..K-1 and is stored as it is: no reduction, kNV + MR
// loads per kNV * MR FMAs, and the weight stream is one sequential run per panel.
//
// The register tile is MR = 6 rows x kNV vectors of accumulators, kNV chosen per build so the tile, the kNV panel
// vectors and the broadcast fit the register file: AVX-512's 32 zmm hold 6 x 4 (24 + 4 + 1), AVX2's 16 ymm hold
// 6 x 2 (12 + 2 + 1, the BLIS/OpenBLAS Haswell shape; 6 x 4 there spilled the accumulators to the stack every
// step). The panel width (kNV vectors) follows, so packed panels belong to the build that packed them:
// pack_linear's (panels, K, width) shape carries the width and linear_packed checks it.
//
// Blocking: x is taken in chunks of rows that fit in L2 (a chunk is read from L2 once per panel); the (chunk,
// panel) pairs are split between the threads; each panel is swept by the chunk's MR-row tiles while it sits in
// L2, and its stream is prefetched ahead of the first tile (the weights come from memory at decode shapes, from
// L3 for a long prompt's later chunks).
#pragma once
#include <cstring>

#include "cpu.h"
#include "vec.h"

namespace tritium {
namespace panel {

// vectors per panel row (the register tile's columns): 4 with AVX-512's 32 registers, 2 with AVX2's 16
#if defined(CPU_CAPABILITY_AVX2)
constexpr int kNV = 2;
#else
constexpr int kNV = 4;
#endif

template <typename A>
constexpr int64_t width() {
  return kNV * Vectorized<A>::size();  // 64 floats / 32 doubles with AVX-512, 16 / 8 with AVX2
}

constexpr int kMR = 6;                       // rows of x per register tile (6 x kNV accumulator vectors)
constexpr int64_t kChunkBytes = 256 * 1024;  // rows of x per sweep over the panels: this many bytes (in L2)
constexpr int64_t kPrefetchBytes = 8192;     // prefetch distance in the panel stream
constexpr int64_t kKSplit = 4096, kKBlock = 2048;  // reductions longer than kKSplit go in blocks of kKBlock
constexpr int64_t kSumBlock = 512;           // a tile's register sums restart every this many k (accuracy)

template <typename A>
int64_t packed_size(int64_t N, int64_t K) {
  return (N + width<A>() - 1) / width<A>() * width<A>() * K;
}

// packed[p][k][c] = w[p * NP + c][k] (w rows of stride ldw), 0 for rows past N
template <typename A>
void pack(const A* w, int64_t ldw, int64_t N, int64_t K, A* out) {
  constexpr int64_t NP = width<A>();
  const int64_t panels = (N + NP - 1) / NP;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // a transpose of the panel's (nc, K) block of w (at::vec's 16 x 16 register transposes for float)
      A* dst = out + p * K * NP;
      const int64_t nc = std::min(NP, N - p * NP);
      for (int64_t k0 = 0; k0 < K; k0 += 1024)  // transpose_mxn takes int extents
        at::vec::transpose_mxn<A>(w + p * NP * ldw + k0, ldw, dst + k0 * NP, NP, static_cast<int>(nc),
                                  static_cast<int>(std::min<int64_t>(1024, K - k0)));
      if (nc < NP)
        for (int64_t k = 0; k < K; ++k) std::fill(dst + k * NP + nc, dst + (k + 1) * NP, A(0));
    }
  });
}

// The panels of v^T for v (K, N) with rows of stride ldv (a product x @ v, e.g. attention's P V):
// packed[p][k][c] = v[k][p * NP + c], 0 for columns past N. Panels split between the threads from 1 MB of
// them (the small ones attention packs per head, inside its own parallel region, stay on the calling thread).
template <typename A>
void pack_cols(const A* v, int64_t ldv, int64_t K, int64_t N, A* out) {
  constexpr int64_t NP = width<A>();
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, K * NP * int64_t(sizeof(A))));
  at::parallel_for(0, (N + NP - 1) / NP, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nc = std::min(NP, N - p * NP);
      for (int64_t k = 0; k < K; ++k) {
        A* dst = out + (p * K + k) * NP;
        std::memcpy(dst, v + k * ldv + p * NP, nc * sizeof(A));
        for (int64_t c = nc; c < NP; ++c) dst[c] = A(0);
      }
    }
  });
}

// Register type of the micro-kernel: the raw __m512/__m512d (AVX-512) or __m256/__m256d (AVX2). GCC keeps an
// array of them in registers but not an array of at::vec::Vectorized (it stored every accumulator back to the
// stack each step, turning the FMA-bound loop into a load/store-bound one).
#if defined(CPU_CAPABILITY_AVX512)
template <typename A>
struct Reg;
template <>
struct Reg<float> {
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
};
template <>
struct Reg<double> {
  using V = __m512d;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
};
#elif defined(CPU_CAPABILITY_AVX2)
template <typename A>
struct Reg;
template <>
struct Reg<float> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
};
template <>
struct Reg<double> {
  using V = __m256d;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
};
#else
template <typename A>
struct Reg {
  using V = Vectorized<A>;
  static V zero() { return V(0); }
  static V load(const A* p) { return V::loadu(p); }
  static V set1(A a) { return V(a); }
  static V fma(V a, V b, V c) { return at::vec::fmadd(a, b, c); }
  static V add(V a, V b) { return a + b; }
};
#endif

// y[i][0:ncols] = sum_k x[i][k] * b[k][0:ncols] (+ sum_k x2[i][k] * b2[k][0:ncols] for k < K2) (+ c[i][0:ncols])
// for i < MR. PF: prefetch the panel stream. The second product (x2, b2: a second operand pair with its own short
// reduction, e.g. LoRA's rank-r term) joins the same accumulators: no pass of its own over y.
// GLU: the panel's first half columns are gates and its second half the matching up projections (pack_glu's
// interleaved weights): y[i][0:ncols] = silu(gate) * up, ncols <= width / 2 outputs (no c); with pre, the
// pre-activations too: gate at pre[i][0:ncols], up at pre[i][up_off:up_off + ncols] (row stride ldpre).
template <typename A, int MR, bool PF, bool GLU = false>
inline void tile(const A* x, int64_t ldx, const A* b, int64_t K, A* y, int64_t ldy, int64_t ncols, const A* c,
                 int64_t ldc, A* pre = nullptr, int64_t ldpre = 0, int64_t up_off = 0, const A* x2 = nullptr,
                 int64_t ldx2 = 0, const A* b2 = nullptr, int64_t K2 = 0) {
  using Vec = Vectorized<A>;
  using R = Reg<A>;
  constexpr int NV = kNV;
  constexpr int64_t V = Vec::size(), NP = NV * V;
  typename R::V acc[MR * NV], part[MR * NV];
  for (int i = 0; i < MR * NV; ++i) acc[i] = R::zero();
  // the reduction in blocks of kSumBlock: each block's sum starts from zero in the registers and is added to the
  // sum of the blocks before it (in part, spilled): one long register chain over K = 4096 had several times
  // torch's rounding error (error ~ sqrt(K) ulp of the running sum; MKL's blocks sum the same way as this)
  for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
    const int64_t k1 = std::min(K, k0 + kSumBlock);
    for (int64_t k = k0; k < k1; ++k) {
      const A* bk = b + k * NP;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if constexpr (PF)  // every cache line of the panel row kPrefetchBytes ahead
        for (int64_t off = 0; off < int64_t(sizeof(A)) * NP; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(bk) + kPrefetchBytes + off, _MM_HINT_T0);
#endif
      typename R::V bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = R::load(bk + j * V);
      for (int i = 0; i < MR; ++i) {
        const auto a = R::set1(x[i * ldx + k]);
        for (int j = 0; j < NV; ++j) acc[NV * i + j] = R::fma(a, bv[j], acc[NV * i + j]);
      }
    }
    if (k0 > 0)
      for (int i = 0; i < MR * NV; ++i) acc[i] = R::add(acc[i], part[i]);
    if (k1 < K)
      for (int i = 0; i < MR * NV; ++i) {
        part[i] = acc[i];
        acc[i] = R::zero();
      }
  }
  for (int64_t k = 0; k < K2; ++k) {
    const A* bk = b2 + k * NP;
    typename R::V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = R::load(bk + j * V);
    for (int i = 0; i < MR; ++i) {
      const auto a = R::set1(x2[i * ldx2 + k]);
      for (int j = 0; j < NV; ++j) acc[NV * i + j] = R::fma(a, bv[j], acc[NV * i + j]);
    }
  }
  if constexpr (GLU) {
    constexpr int H = NV / 2;  // gate vectors, then as many up vectors
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < H && j * V < ncols; ++j) {
        const Vec g(acc[NV * i + j]), u(acc[NV * i + H + j]);
        const Vec o = g / (Vec(1) + fexp(g.neg())) * u;  // silu as tritium.swiglu computes it
        const int64_t cnt = std::min<int64_t>(V, ncols - j * V);
        o.store(y + i * ldy + j * V, cnt);
        if (pre) {
          g.store(pre + i * ldpre + j * V, cnt);
          u.store(pre + i * ldpre + up_off + j * V, cnt);
        }
      }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    A* yr = y + i * ldy;
    const A* cr = c ? c + i * ldc : nullptr;
    if (ncols == NP) {
      for (int j = 0; j < NV; ++j) {
        Vec v(acc[NV * i + j]);
        if (cr) v = v + Vec::loadu(cr + j * V);
        v.store(yr + j * V);
      }
    } else {
      for (int j = 0; j < NV && j * V < ncols; ++j) {
        const int64_t cnt = std::min<int64_t>(V, ncols - j * V);
        Vec v(acc[NV * i + j]);
        if (cr) v = v + Vec::loadu(cr + j * V, cnt);
        v.store(yr + j * V, cnt);
      }
    }
  }
}

template <typename A, bool PF, bool GLU = false>
inline void tile_rows(int mr, const A* x, int64_t ldx, const A* b, int64_t K, A* y, int64_t ldy, int64_t ncols,
                      const A* c, int64_t ldc, A* pre = nullptr, int64_t ldpre = 0, int64_t up_off = 0,
                      const A* x2 = nullptr, int64_t ldx2 = 0, const A* b2 = nullptr, int64_t K2 = 0) {
#define TRITIUM_TILE(R_) tile<A, R_, PF, GLU>(x, ldx, b, K, y, ldy, ncols, c, ldc, pre, ldpre, up_off, x2, ldx2, b2, K2)
  switch (mr) {
    case 6: TRITIUM_TILE(6); break;
    case 5: TRITIUM_TILE(5); break;
    case 4: TRITIUM_TILE(4); break;
    case 3: TRITIUM_TILE(3); break;
    case 2: TRITIUM_TILE(2); break;
    default: TRITIUM_TILE(1); break;
  }
#undef TRITIUM_TILE
}

// ---------------------------------------------------------------------------------------------------------
// bfloat16 panels for AVX512-BF16's dot products (vdpbf16ps: each float lane accumulates a0 * b0 + a1 * b1 of a
// pair of bfloat16, so one instruction does the work of two float FMAs). The AVX-512 float tiles' 6 x 64 shape
// with two k per step: packed[p][k2][c][2] = (w[p * 64 + c][2 k2], w[p * 64 + c][2 k2 + 1]), K rounded up to even
// with zeros; x's pair (x[i][2 k2], x[i][2 k2 + 1]) is broadcast as one 32-bit element. Float accumulators and
// output (the products of two bfloat16 are exact in float). Used by the bfloat16 attention (csrc/attention.cpp).
// Compiled for the instruction with a target attribute and chosen at run time (has_bf16_dot): an AVX-512 build
// must still run on CPUs without AVX512-BF16.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kWidth16 = 64;

inline int64_t packed_size_bf16(int64_t N, int64_t K) {
  return (N + kWidth16 - 1) / kWidth16 * kWidth16 * ((K + 1) / 2 * 2);
}

inline bool has_bf16_dot() {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  return cpu::features().avx512_bf16;
#else
  return false;
#endif
}

// packed[p][k2][c][2] from element (n, k) of a matrix with strides (sn, sk): pack_bf16's w (N, K) is (ldw, 1), the
// panels of v^T for v (K, N) (pack_cols_bf16) are (1, ldv). Zero past N and past K. Single-threaded.
inline void pack_pairs(const c10::BFloat16* w, int64_t sn, int64_t sk, int64_t N, int64_t K, c10::BFloat16* out) {
  constexpr int64_t NP = kWidth16;
  const int64_t K2 = (K + 1) / 2;
  const c10::BFloat16 zero(0.f);
  for (int64_t p = 0; p * NP < N; ++p) {
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      c10::BFloat16* dst = out + (p * K2 + k2) * NP * 2;
      const int64_t k = 2 * k2;
      for (int64_t c = 0; c < NP; ++c) {
        const int64_t n = p * NP + c;
        const bool in = n < N;
        dst[2 * c] = in ? w[n * sn + k * sk] : zero;
        dst[2 * c + 1] = in && k + 1 < K ? w[n * sn + (k + 1) * sk] : zero;
      }
    }
  }
}
inline void pack_bf16(const c10::BFloat16* w, int64_t ldw, int64_t N, int64_t K, c10::BFloat16* out) {
  pack_pairs(w, ldw, 1, N, K, out);
}
inline void pack_cols_bf16(const c10::BFloat16* v, int64_t ldv, int64_t K, int64_t N, c10::BFloat16* out) {
  pack_pairs(v, 1, ldv, N, K, out);
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)

// acc[4 i + j] += pair of x row i at k (TAIL: x[k] with a zero: x[k + 1] is not read, it may lie past the row)
// times the 4 vectors of the panel's pair row bk
template <int MR, bool TAIL>
TRITIUM_BF16_DOT TRITIUM_INLINE void dot_step(__m512* acc, const c10::BFloat16* bk,
                                                                     const c10::BFloat16* x, int64_t ldx, int64_t k) {
  const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk), b1 = (__m512bh)_mm512_loadu_si512(bk + 32);
  const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bk + 64), b3 = (__m512bh)_mm512_loadu_si512(bk + 96);
  for (int i = 0; i < MR; ++i) {
    int32_t v;
    if constexpr (TAIL) {
      v = int32_t(x[i * ldx + k].x);
    } else {
      std::memcpy(&v, x + i * ldx + k, 4);
    }
    const __m512bh a = (__m512bh)_mm512_set1_epi32(v);
    acc[4 * i] = _mm512_dpbf16_ps(acc[4 * i], a, b0);
    acc[4 * i + 1] = _mm512_dpbf16_ps(acc[4 * i + 1], a, b1);
    acc[4 * i + 2] = _mm512_dpbf16_ps(acc[4 * i + 2], a, b2);
    acc[4 * i + 3] = _mm512_dpbf16_ps(acc[4 * i + 3], a, b3);
  }
}

template <int MR, bool PF>
TRITIUM_BF16_DOT inline void tile_bf16(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* b, int64_t K,
                                       float* y, int64_t ldy, int64_t ncols, const float* c, int64_t ldc) {
  constexpr int64_t NP = kWidth16;
  __m512 acc[MR * 4];
  for (int i = 0; i < MR * 4; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const c10::BFloat16* bk = b + k2 * NP * 2;
    if constexpr (PF)
      for (int64_t off = 0; off < int64_t(sizeof(c10::BFloat16)) * NP * 2; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(bk) + kPrefetchBytes + off, _MM_HINT_T0);
    dot_step<MR, false>(acc, bk, x, ldx, 2 * k2);
  }
  if (K & 1) dot_step<MR, true>(acc, b + K2 * NP * 2, x, ldx, K - 1);
  for (int i = 0; i < MR; ++i) {
    float* yr = y + i * ldy;
    const float* cr = c ? c + i * ldc : nullptr;
    for (int j = 0; j < 4 && j * 16 < ncols; ++j) {
      const int64_t cnt = std::min<int64_t>(16, ncols - j * 16);
      const __mmask16 mk = cnt == 16 ? __mmask16(0xffff) : __mmask16((1u << cnt) - 1);
      __m512 v = acc[4 * i + j];
      if (cr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, cr + j * 16));
      _mm512_mask_storeu_ps(yr + j * 16, mk, v);
    }
  }
}

template <bool PF>
TRITIUM_BF16_DOT __attribute__((noinline)) void tile_rows_bf16(int mr, const c10::BFloat16* x, int64_t ldx,
                                                               const c10::BFloat16* b, int64_t K, float* y,
                                                               int64_t ldy, int64_t ncols, const float* c,
                                                               int64_t ldc) {
  switch (mr) {
    case 6: tile_bf16<6, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 5: tile_bf16<5, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 4: tile_bf16<4, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 3: tile_bf16<3, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 2: tile_bf16<2, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    default: tile_bf16<1, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
  }
}
#endif

}  // namespace panel

// y (M, N; row stride ldy) = x (M, K; row stride ldx) @ w^T [+ c] with w packed by panel::pack; c null or
// (M, N) with row stride ldc (ldc = 0: one row added to every row, a bias). y must not alias x; it may alias c.
// pstride: elements from one panel to the next (default K * width: pack's layout; a product over a sub-range
// of a longer packing's k passes the full packing's). Called inside a parallel region it runs on that thread.
// GLU (float/double): packed holds pack_glu's interleaved [gate | up] panels of N = 2F rows; y gets the F columns
// silu(x @ gate^T) * (x @ up^T) (no c): SwiGLU in the product's epilogue. pre (GLU only; null or (M, 2F) with row
// stride ldpre): also the pre-activations [x @ gate^T, x @ up^T] in the usual (gate, then up) column order.
// x2, packed2, K2 (float/double, not GLU; null or x2 (M, K2) with row stride ldx2 and packed2 a w2 (N, K2) packed
// by panel::pack): y also gets x2 @ w2^T, in the same register tiles (a second, short reduction).
template <typename X, typename A, bool GLU = false>
void panel_gemm(const X* x, int64_t ldx, int64_t M, int64_t K, const X* packed, int64_t N, A* y, int64_t ldy,
                const A* c = nullptr, int64_t ldc = 0, int64_t pstride = -1, A* pre = nullptr, int64_t ldpre = 0,
                const X* x2 = nullptr, int64_t ldx2 = 0, const X* packed2 = nullptr, int64_t K2 = 0) {
  // X = A (float, double: panel::pack's panels) or X = bfloat16, A = float (panel::pack_bf16's pair panels, on a
  // CPU with AVX512-BF16: the caller checks panel::has_bf16_dot)
  constexpr bool bf16 = std::is_same_v<X, c10::BFloat16>;
  static_assert(bf16 ? std::is_same_v<A, float> : std::is_same_v<X, A>, "panel_gemm: unsupported types");
  static_assert(!(bf16 && GLU), "panel_gemm: GLU epilogue for float/double only");
  constexpr int64_t NP = bf16 ? panel::kWidth16 : panel::width<A>();
  if (M <= 0 || N <= 0) return;
  // a long reduction (a vocabulary-sized K: the cross-entropy's input gradient g @ W) in blocks of kKBlock: each
  // block's stretch of the panels fits in L2 and is swept by every row chunk, the blocks after the first adding
  // into y (one panel of K = 49152 floats is 12 MB: without blocks it was streamed from memory per 6 rows)
  if constexpr (!bf16 && !GLU) {
    if (K > panel::kKSplit) {
      const int64_t ps = pstride < 0 ? K * NP : pstride;
      for (int64_t k0 = 0; k0 < K; k0 += panel::kKBlock) {
        const int64_t kk = std::min(panel::kKBlock, K - k0);
        panel_gemm<X, A>(x + k0, ldx, M, kk, packed + k0 * NP, N, y, ldy, k0 == 0 ? c : y, k0 == 0 ? ldc : ldy, ps,
                         nullptr, 0, x2, ldx2, k0 == 0 ? packed2 : nullptr, k0 == 0 ? K2 : 0);
      }
      return;
    }
  }
  const int64_t panels = (N + NP - 1) / NP;
  const int64_t kstride = bf16 ? (K + 1) / 2 * 2 * NP : K * NP;  // one panel's elements
  const int64_t chunk = std::max<int64_t>(panel::kMR, panel::kChunkBytes / std::max<int64_t>(1, K * int64_t(sizeof(X))) /
                                                          panel::kMR * panel::kMR);
  // work items (chunk of x rows, panel), chunk-major, split into one contiguous range per thread: a small M is one
  // chunk (threads split the panels, each streaming its own part of the weights); a long prompt's chunks are
  // shared too, so N = 576 (9 panels) does not leave one thread with 5 panels and the other with 4
  const int64_t chunks = (M + chunk - 1) / chunk, items = chunks * panels;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, NP * K * std::min<int64_t>(M, chunk)));
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r0 = (it / panels) * chunk, r1 = std::min(M, r0 + chunk), p = it % panels;
      const X* b = packed + p * (pstride < 0 ? kstride : pstride);
      constexpr int64_t NY = GLU ? NP / 2 : NP;  // output columns per panel
      const int64_t ncols = std::min(NY, (GLU ? N / 2 : N) - p * NY);
      for (int64_t m0 = r0; m0 < r1; m0 += panel::kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(panel::kMR, r1 - m0));
        const A* cm = c ? c + m0 * ldc + p * NP : nullptr;
        const X* xm = x + m0 * ldx;
        A* ym = y + m0 * ldy + p * NY;
        // the chunk's first sweep over the panel prefetches: it comes from memory (or L3 for later chunks)
        if constexpr (bf16) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
          if (m0 == r0)
            panel::tile_rows_bf16<true>(mr, xm, ldx, b, K, ym, ldy, ncols, cm, ldc);
          else
            panel::tile_rows_bf16<false>(mr, xm, ldx, b, K, ym, ldy, ncols, cm, ldc);
#else
          TORCH_CHECK(false, "panel_gemm: bfloat16 panels need an AVX-512 build");
#endif
        } else {
          A* pm = GLU && pre ? pre + m0 * ldpre + p * NY : nullptr;
          const X* x2m = packed2 ? x2 + m0 * ldx2 : nullptr;
          const X* b2p = packed2 ? packed2 + p * K2 * NP : nullptr;
          const int64_t k2 = packed2 ? K2 : 0;
          if (m0 == r0)
            panel::tile_rows<A, true, GLU>(mr, xm, ldx, b, K, ym, ldy, ncols, cm, ldc, pm, ldpre, N / 2, x2m, ldx2,
                                           b2p, k2);
          else
            panel::tile_rows<A, false, GLU>(mr, xm, ldx, b, K, ym, ldy, ncols, cm, ldc, pm, ldpre, N / 2, x2m, ldx2,
                                            b2p, k2);
        }
      }
    }
  };
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (items <= grain || nt <= 1) {
    run(0, items);
    return;
  }
  // the ranges hold equal numbers of rows x panels, not of items: the last chunk is usually shorter, so an equal
  // count of items would give the thread without it more work while the other waits
  auto start = [&](int64_t it) {  // row-panels before item it
    const int64_t ch = it / panels;
    return ch * chunk * panels + (it % panels) * std::min(chunk, M - ch * chunk);
  };
  auto first_from = [&](int64_t target) {  // the first item starting at or after target
    int64_t lo = 0, hi = items;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (start(mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  const int64_t total = M * panels;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run(first_from(total * t / nt), first_from(total * (t + 1) / nt));
  });
}

// y (R, C; row stride ldy) = a^T b for a (M, R; row stride lda) and b (M, C; row stride ldb), both contiguous
// along their rows: a linear layer's weight gradient dy^T x, whose reduction runs down both operands' columns.
// Per chunk of kTnChunk reduction rows: b's chunk is packed into column panels (pack_cols) and a's chunk
// transposed in blocks of kTnRows rows of y (at::vec::transpose_mxn: rows along the reduction, as tile reads
// x), then the forward's register tiles accumulate into y (c = y after the first chunk). The threads split
// the reduction, each packing only its own rows of a and b; each thread but the first sums into its own (R, C)
// partial, added into y at the end. colsum (null or R): a's column sums (the bias gradient), from the transposed
// blocks. accumulate: y += a^T b (the first chunk's tiles add into y too). Float/double (A); R, C > 0.
constexpr int64_t kTnChunk = 256, kTnRows = 192;

template <typename A>
void panel_gemm_tn(const A* a, int64_t lda, const A* b, int64_t ldb, int64_t M, int64_t R, int64_t C, A* y,
                   int64_t ldy, A* colsum, bool accumulate = false) {
  constexpr int64_t NP = panel::width<A>(), KC = kTnChunk, RB = kTnRows;
  const int64_t panels = (C + NP - 1) / NP;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::in_parallel_region() ? 1 : at::get_num_threads(),
                                                            M / KC));
  // partial sums of threads 1.. (y itself for thread 0), contiguous R x C each; colsum partials likewise
  std::vector<A> part((nt - 1) * R * C), sums(colsum ? nt * R : 0, A(0));
  auto run = [&](int64_t t) {
    const int64_t mb = M * t / nt, me = M * (t + 1) / nt;
    A* yt = t == 0 ? y : part.data() + (t - 1) * R * C;
    const int64_t ld = t == 0 ? ldy : C;
    const bool add0 = accumulate && t == 0;  // the first chunk adds into yt (y's own sums), not over it
    auto pb = std::make_unique<A[]>(panels * KC * NP);
    auto at_ = std::make_unique<A[]>(RB * KC);
    for (int64_t m0 = mb; m0 < me; m0 += KC) {
      const int64_t kk = std::min(KC, me - m0);
      panel::pack_cols<A>(b + m0 * ldb, ldb, kk, C, pb.get());
      for (int64_t r0 = 0; r0 < R; r0 += RB) {
        const int64_t rr = std::min(RB, R - r0);
        at::vec::transpose_mxn<A>(a + m0 * lda + r0, lda, at_.get(), KC, static_cast<int>(kk), static_cast<int>(rr));
        if (colsum) {
          A* st = sums.data() + t * R + r0;
          for (int64_t r = 0; r < rr; ++r)
            st[r] += at::vec::reduce_all<A>([](Vectorized<A> u, Vectorized<A> v) { return u + v; },
                                            at_.get() + r * KC, kk);
        }
        for (int64_t p = 0; p < panels; ++p) {
          const A* bp = pb.get() + p * kk * NP;
          const int64_t ncols = std::min(NP, C - p * NP);
          for (int64_t i = 0; i < rr; i += panel::kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(panel::kMR, rr - i));
            A* yi = yt + (r0 + i) * ld + p * NP;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
            if (m0 != mb || add0)  // the tile's partial sums (L3), read by its epilogue: fetched while it computes
              for (int r = 0; r < mr; ++r)
                for (int64_t off = 0; off < int64_t(sizeof(A)) * ncols; off += 64)
                  _mm_prefetch(reinterpret_cast<const char*>(yi + r * ld) + off, _MM_HINT_T0);
#endif
            panel::tile_rows<A, false>(mr, at_.get() + i * KC, KC, bp, kk, yi, ld, ncols,
                                       m0 == mb && !add0 ? nullptr : yi, ld);
          }
        }
      }
    }
  };
  if (nt == 1) {
    run(0);
  } else {
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run(t);
    });
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t t = 1; t < nt; ++t)
          at::vec::map2([](Vectorized<A> u, Vectorized<A> v) { return u + v; }, y + r * ldy, y + r * ldy,
                        part.data() + ((t - 1) * R + r) * C, C);
    });
  }
  if (colsum)
    for (int64_t r = 0; r < R; ++r) {
      A s = A(0);
      for (int64_t t = 0; t < nt; ++t) s += sums[t * R + r];
      colsum[r] = s;
    }
}

// panel_gemm_tn with the threads splitting y's rows (blocks of whole register tiles, at most one per thread), each
// over the whole reduction, instead of splitting the reduction: for a product large against its reduction (an
// expert's weight gradient, a block's key gradient in info_nce), where split sums would take a zeroed (R, C) partial
// per extra thread and a pass adding them up. accumulate: y += a^T b.
template <typename A>
void panel_gemm_tn_rows(const A* a, int64_t lda, const A* b, int64_t ldb, int64_t M, int64_t R, int64_t C, A* y,
                        int64_t ldy, bool accumulate) {
  const int64_t tiles = (R + panel::kMR - 1) / panel::kMR;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::in_parallel_region() ? 1 : at::get_num_threads(),
                                                            tiles));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = std::min(R, tiles * t / nt * panel::kMR);
      const int64_t r1 = std::min(R, tiles * (t + 1) / nt * panel::kMR);
      if (r1 > r0) panel_gemm_tn<A>(a + r0, lda, b, ldb, M, r1 - r0, C, y + r0 * ldy, ldy, nullptr, accumulate);
    }
  });
}

// y (M, N) = a (M, K) @ b (K, N) [+ c] on the float/double panels (panel_gemm) when a has kPanelRows rows or more
// and b is a weight as torch stores it: w.t() for a contiguous w (N, K) (a forward), or contiguous (K, N) (w itself
// in an input gradient); c: null, a bias (ldc 0) or y itself (ldc = y's row stride: beta = 1). Returns false,
// having written nothing, where the panels do not apply (the caller's BLAS then). frozen: b is a view of a frozen
// weight (one that needs no gradient and is read by call after call: LoRA's base), so its panels may come from
// the cache of packed frozen weights (csrc/linear.cpp: keyed on the weight's storage, layout and version
// counter, so an in-place change such as merge() or load_state_dict repacks it). Defined in csrc/linear.cpp.
constexpr int64_t kPanelRows = 64;
// a2, b2 (both or neither; a2 (M, R), b2 (R, N) with b's layout): y also gets a2 @ b2 in the same register tiles
// (LoRA's rank-r term), where the panels apply.
bool panel_mm_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& y, const void* c, int64_t ldc,
                  bool frozen = false, const at::Tensor* a2 = nullptr, const at::Tensor* b2 = nullptr);

}  // namespace tritium
