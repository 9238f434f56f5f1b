// 2-D max pooling over non-overlapping windows, CPU kernels registered for the tritium ops
// python/tritium/ops/pooling.py defines.
//
// x (P, H, W) contiguous (P = batch x channels planes), windows of kh x kw with stride (kh, kw), no padding:
//   y[p, i, j] = max over the window at (i kh, j kw) of x (Ho = H / kh, Wo = W / kw, floor; trailing rows and
//   columns belong to no window), and idx[p, i, j] = the window offset r kw + c (uint8) of the first maximum,
//   a NaN winning as in torch's max_pool2d (the last NaN of the window).
//   backward: dx is dy at each window's idx and zero elsewhere (the windows do not overlap).
// Forward reads x once and writes y and idx (1 byte each); backward reads dy and idx and writes dx once.
// Comparisons are in the input's dtype widened to float (exact): 16-bit values are never rounded.
// Windows two columns wide (kw = 2, the common 2x2 pooling) take a vector path: each window row's 2 K input
// columns load as two vectors, deinterleave into the K windows' left and right columns, and the maximum and its
// offset follow by compares and blends (the window's rows combined in order by the scalar loop's rule, which
// gives the same element: the first maximum, or the last NaN); rows shorter than a vector (1, 2, 4 or 8 windows,
// as the zoo's 8x8 maps) fill the vectors with several output rows on AVX-512 (fwd_rows_w2_packed). The backward
// interleaves each window row's gradient back from dy blended by idx, writing every element of the window rows
// once (no zeroing pass), where a row holds a vector of windows or more or the packed path takes it
// (bwd_rows_w2_packed). Other windows take the scalar loop per window.
#include <cmath>
#include <limits>

#include "cpu.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

// n (<= 2 K) elements from p as two accumulation-type vectors (lanes past n are zero).
template <typename T>
inline std::pair<Vectorized<acc_type<T>>, Vectorized<acc_type<T>>> load2_n(const T* p, int64_t n) {
  using V = Vectorized<acc_type<T>>;
  constexpr int64_t K = V::size();
  if (n == 2 * K) return load2(p);
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return {V::loadu(p, std::min(n, K)), n > K ? V::loadu(p + K, n - K) : V(0)};
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n));
    return {a, b};
  }
}

// n (<= K) window offsets held as accumulation-type values (exact integers) stored as bytes.
template <typename V>
inline void store_offsets(uint8_t* p, const V& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    _mm512_mask_cvtepi32_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1), _mm512_cvttps_epi32(v));
    return;
  }
#endif
  alignas(64) typename V::value_type b[V::size()];
  v.store(b);
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<uint8_t>(b[k]);
}

// The offset in x (and dx) of output row r's first input row: its plane r / Ho, its window row r % Ho.
inline int64_t window_rows(int64_t r, int64_t H, int64_t W, int64_t Ho, int64_t kh) {
  return (r / Ho) * H * W + (r % Ho) * kh * W;
}

// Window row a of K windows (v0, v1: their 2 K input elements in order) folded into the running maximum m and its
// offset best: within the row the right element if greater or NaN, then rows in order by the same rule (a later
// row wins if greater or NaN), which gives the scalar loop's element.
template <typename V>
inline void fold_window_row(const V& v0, const V& v1, int64_t a, V& m, V& best) {
  using A = typename V::value_type;
  const auto [left, right] = at::vec::deinterleave2(v0, v1);
  const V pick = (right > left) | right.isnan();
  const V pm = V::blendv(left, right, pick);
  const V pi = V::blendv(V(A(2 * a)), V(A(2 * a + 1)), pick);
  if (a == 0) {
    m = pm;
    best = pi;
  } else {
    const V take = (pm > m) | pm.isnan();
    m = V::blendv(m, pm, take);
    best = V::blendv(best, pi, take);
  }
}

template <typename scalar_t>
inline void store_windows(scalar_t* y, uint8_t* idx, const Vectorized<acc_type<scalar_t>>& m,
                          const Vectorized<acc_type<scalar_t>>& best, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    m.store(y, n);
  } else {
    store_out(y, m, n, false);
  }
  store_offsets(idx, best, n);
}

#if defined(CPU_CAPABILITY_AVX512)
// n (<= 16) elements at p into the lanes [lane, lane + n) of v (float lanes; 16-bit T widened exactly), the other
// lanes kept: a masked load from p - lane, whose masked-off lanes are never read.
template <typename T>
inline __m512 load_run(__m512 v, const T* p, int64_t lane, int64_t n) {
  const __mmask16 k = static_cast<__mmask16>(((1u << n) - 1) << lane);
  const T* base = reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(p) - lane * sizeof(T));
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_loadu_ps(v, k, base);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(k, base);
    const __m512 f = std::is_same_v<T, c10::BFloat16>
                         ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                         : _mm512_cvtph_ps(h);
    return _mm512_mask_mov_ps(v, k, f);
  }
}

// Rows of 2-column windows shorter than a vector, several output rows to a vector: where a window row's run of
// L = 2 Wo input elements divides the 16 float lanes, v0 and v1 each hold 16 / L runs (of consecutive output rows,
// each from its own row pointer, so planes and trailing rows need nothing special), which deinterleave into 16
// windows of 32 / L output rows, contiguous in y and idx. Output rows [r0, r1): the groups of 32 / L rows; returns
// the first row left for the per-row loop.
template <typename scalar_t>
int64_t fwd_rows_w2_packed(const scalar_t* xp, scalar_t* yp, uint8_t* ip, int64_t r0, int64_t r1, int64_t H,
                           int64_t W, int64_t Ho, int64_t Wo, int64_t kh) {
  using V = Vectorized<float>;
  const int64_t L = 2 * Wo, per = 16 / L, m_rows = 2 * per;  // runs per vector, output rows per step
  const scalar_t* rows[32];
  int64_t r = r0;
  for (; r + m_rows <= r1; r += m_rows) {
    for (int64_t q = 0; q < m_rows; ++q) rows[q] = xp + window_rows(r + q, H, W, Ho, kh);
    V m, best;
    for (int64_t a = 0; a < kh; ++a) {
      __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
      for (int64_t q = 0; q < per; ++q) {
        v0 = load_run(v0, rows[q] + a * W, q * L, L);
        v1 = load_run(v1, rows[per + q] + a * W, q * L, L);
      }
      fold_window_row(V(v0), V(v1), a, m, best);
    }
    store_windows(yp + r * Wo, ip + r * Wo, m, best, 16);
  }
  return r;
}
#endif

// Whether rows of Wo 2-column windows take the packed paths (the AVX-512 build, float lanes)
template <typename scalar_t>
constexpr bool packed_rows(int64_t Wo) {
#if defined(CPU_CAPABILITY_AVX512)
  return std::is_same_v<acc_type<scalar_t>, float> && Wo < 16 && 16 % (2 * Wo) == 0;
#else
  static_cast<void>(Wo);
  return false;
#endif
}

// Output rows [r0, r1) of 2-column windows (kw = 2): y and idx as the scalar loop writes them.
template <typename scalar_t>
void fwd_rows_w2(const scalar_t* xp, scalar_t* yp, uint8_t* ip, int64_t r0, int64_t r1, int64_t H, int64_t W,
                 int64_t Ho, int64_t Wo, int64_t kh) {
  using A = acc_type<scalar_t>;
  using V = Vectorized<A>;
  constexpr int64_t K = V::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    if (packed_rows<scalar_t>(Wo)) r0 = fwd_rows_w2_packed(xp, yp, ip, r0, r1, H, W, Ho, Wo, kh);
  }
#endif
  int64_t plane = r0 / Ho, i = r0 % Ho;  // r's plane and row in it, advanced with r
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = xp + plane * H * W + i * kh * W;
    if (++i == Ho) {
      i = 0;
      ++plane;
    }
    for (int64_t j = 0; j < Wo; j += K) {  // K windows: input columns [2 j, 2 j + 2 K)
      const int64_t n = std::min(K, Wo - j);
      V m, best;
      for (int64_t a = 0; a < kh; ++a) {
        const auto [v0, v1] = load2_n(row + a * W + 2 * j, 2 * n);
        fold_window_row(v0, v1, a, m, best);
      }
      store_windows(yp + r * Wo + j, ip + r * Wo + j, m, best, n);
    }
  }
}

// The parts of output row r's input rows that no window covers, zeroed: the trailing odd column of its kh rows,
// and its plane's trailing rows with the plane's last output row (all-zero bits: +0.0 in every dtype).
template <typename scalar_t>
inline void zero_uncovered(scalar_t* dxp, int64_t r, int64_t H, int64_t W, int64_t Ho, int64_t kh) {
  scalar_t* rows = dxp + window_rows(r, H, W, Ho, kh);
  if (W % 2) {
    for (int64_t a = 0; a < kh; ++a) rows[a * W + W - 1] = scalar_t(0);
  }
  if (r % Ho == Ho - 1 && H > Ho * kh) {
    std::memset(static_cast<void*>(rows + kh * W), 0, sizeof(scalar_t) * (H - Ho * kh) * W);  // past the last window
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Lanes [lane, lane + n) of v stored as T at p (p[k] = v[lane + k]): a masked store to p - lane, whose masked-off
// lanes are never written. 16-bit values narrow exactly (they are dy's values or zero).
template <typename T>
inline void store_run(T* p, int64_t lane, int64_t n, __m512 v) {
  const __mmask16 k = static_cast<__mmask16>(((1u << n) - 1) << lane);
  T* base = reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) - lane * sizeof(T));
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(base, k, v);
  } else {
    const __m256i h = std::is_same_v<T, c10::BFloat16>
                          ? _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16))
                          : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(base, k, h);
  }
}

// The backward of fwd_rows_w2_packed's rows: 16 windows' dy and offsets, each window row's gradient interleaved
// back into 2 x 16 lanes that hold the input runs of 32 / L output rows, stored run by run at each row's pointer
// (every covered element written once); returns the first row left for bwd_rows_w2.
template <typename scalar_t>
int64_t bwd_rows_w2_packed(const scalar_t* dyp, const uint8_t* ip, scalar_t* dxp, int64_t r0, int64_t r1,
                           int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh) {
  using V = Vectorized<float>;
  const int64_t L = 2 * Wo, per = 16 / L, m_rows = 2 * per;
  scalar_t* rows[32];
  int64_t r = r0;
  for (; r + m_rows <= r1; r += m_rows) {
    for (int64_t q = 0; q < m_rows; ++q) rows[q] = dxp + window_rows(r + q, H, W, Ho, kh);
    const V d(load_run(_mm512_setzero_ps(), dyp + r * Wo, 0, 16));
    const V off(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(ip + r * Wo)))));
    for (int64_t a = 0; a < kh; ++a) {
      const V left = V::blendv(V(0), d, off == V(float(2 * a)));
      const V right = V::blendv(V(0), d, off == V(float(2 * a + 1)));
      const auto [lo, hi] = at::vec::interleave2(left, right);
      for (int64_t q = 0; q < per; ++q) {
        store_run(rows[q] + a * W, q * L, L, lo);
        store_run(rows[per + q] + a * W, q * L, L, hi);
      }
    }
    for (int64_t q = 0; q < m_rows; ++q) zero_uncovered(dxp, r + q, H, W, Ho, kh);
  }
  return r;
}
#endif

// Output rows [r0, r1) of the backward of 2-column windows: the kh input rows under each output row, written
// whole (their trailing odd column zeroed), and a plane's trailing rows zeroed with its last output row. Taken for
// rows of a vector of windows or more, or of the packed paths' lengths (other short rows cost less by the scalar
// scatter into a zeroed plane).
template <typename scalar_t>
void bwd_rows_w2(const scalar_t* dyp, const uint8_t* ip, scalar_t* dxp, int64_t r0, int64_t r1, int64_t H,
                 int64_t W, int64_t Ho, int64_t Wo, int64_t kh) {
  using A = acc_type<scalar_t>;
  using V = Vectorized<A>;
  constexpr int64_t K = V::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    if (packed_rows<scalar_t>(Wo)) r0 = bwd_rows_w2_packed(dyp, ip, dxp, r0, r1, H, W, Ho, Wo, kh);
  }
#endif
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* rows = dxp + window_rows(r, H, W, Ho, kh);
    for (int64_t j = 0; j < Wo; j += K) {
      const int64_t n = std::min(K, Wo - j);
      const V d = load2_n(dyp + r * Wo + j, n).first;
      alignas(64) A b[K] = {};
      for (int64_t k = 0; k < n; ++k) b[k] = static_cast<A>(ip[r * Wo + j + k]);
      const V off = V::loadu(b);
      for (int64_t a = 0; a < kh; ++a) {
        const V left = V::blendv(V(0), d, off == V(A(2 * a)));
        const V right = V::blendv(V(0), d, off == V(A(2 * a + 1)));
        const auto [lo, hi] = at::vec::interleave2(left, right);
        scalar_t* out = rows + a * W + 2 * j;
        if (n == K) {
          store2(out, lo, hi);
        } else {
          store_out(out, lo, std::min(2 * n, K), false);
          if (2 * n > K) store_out(out + K, hi, 2 * n - K, false);
        }
      }
    }
    zero_uncovered(dxp, r, H, W, Ho, kh);
  }
}

void check_x(const at::Tensor& x, int64_t kh, int64_t kw) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "max_pool2d: x must be a contiguous (planes, H, W) tensor, got ",
              x.sizes());
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 256, "max_pool2d: the window must have 1 to 256 elements, got ", kh,
              " x ", kw);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd(const at::Tensor& x, int64_t kh, int64_t kw) {
  check_x(x, kh, kw);
  const int64_t P = x.size(0), H = x.size(1), W = x.size(2), Ho = H / kh, Wo = W / kw;
  auto y = empty({P, Ho, Wo}, x.options());
  auto idx = empty({P, Ho, Wo}, x.options().dtype(at::kByte));
  if (y.numel() == 0) return {y, idx};
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_max_pool2d_fwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* ip = idx.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, P * Ho, row_grain(kh * W), [&](int64_t r0, int64_t r1) {
      if (kw == 2) {
        fwd_rows_w2(xp, yp, ip, r0, r1, H, W, Ho, Wo, kh);
        return;
      }
      for (int64_t r = r0; r < r1; ++r) {  // r: one output row (plane r / Ho, row r % Ho)
        const scalar_t* row = xp + window_rows(r, H, W, Ho, kh);
        scalar_t* yo = yp + r * Wo;
        uint8_t* io = ip + r * Wo;
        for (int64_t j = 0; j < Wo; ++j) {
          const scalar_t* win = row + j * kw;
          A m = -std::numeric_limits<A>::infinity();
          int64_t best = 0;
          for (int64_t a = 0; a < kh; ++a) {
            for (int64_t b = 0; b < kw; ++b) {
              const A v = static_cast<A>(win[a * W + b]);
              if (v > m || std::isnan(v)) {
                m = v;
                best = a * kw + b;
              }
            }
          }
          yo[j] = static_cast<scalar_t>(m);
          io[j] = static_cast<uint8_t>(best);
        }
      }
    });
  });
  return {y, idx};
}

at::Tensor max_pool2d_bwd(const at::Tensor& dy, const at::Tensor& idx, int64_t kh, int64_t kw, int64_t H,
                          int64_t W) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 256, "max_pool2d_bwd: the window must have 1 to 256 elements");
  TORCH_CHECK(dy.dim() == 3 && dy.is_contiguous() && dy.size(1) == H / kh && dy.size(2) == W / kw,
              "max_pool2d_bwd: dy must be a contiguous (planes, H / kh, W / kw) tensor, got ", dy.sizes());
  TORCH_CHECK(idx.sizes() == dy.sizes() && idx.is_contiguous() && idx.scalar_type() == at::kByte,
              "max_pool2d_bwd: idx must be a contiguous uint8 tensor of dy's shape");
  const int64_t P = dy.size(0), Ho = dy.size(1), Wo = dy.size(2);
  auto dx = empty({P, H, W}, dy.options());
  if (dx.numel() == 0) return dx;
  TRITIUM_DISPATCH_FLOATING(dy.scalar_type(), "tritium_max_pool2d_bwd", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (kw == 2 && (Wo >= VecIO<scalar_t>::kSize || packed_rows<scalar_t>(Wo)) && dy.numel() > 0) {
      at::parallel_for(0, P * Ho, row_grain(kh * W), [&](int64_t r0, int64_t r1) {
        bwd_rows_w2(dyp, ip, dxp, r0, r1, H, W, Ho, Wo, kh);
      });
      return;
    }
    at::parallel_for(0, P, row_grain(H * W), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* plane = dxp + p * H * W;
        std::memset(static_cast<void*>(plane), 0, sizeof(scalar_t) * H * W);  // all-zero bits: +0.0 in every dtype
        for (int64_t i = 0; i < Ho; ++i) {
          const scalar_t* d = dyp + (p * Ho + i) * Wo;
          const uint8_t* id = ip + (p * Ho + i) * Wo;
          scalar_t* row = plane + i * kh * W;
          for (int64_t j = 0; j < Wo; ++j) {
            const int64_t o = id[j];
            row[(o / kw) * W + j * kw + o % kw] = d[j];
          }
        }
      }
    });
  });
  return dx;
}

// `tritium info`: the path of 2-column windows (kw = 2) on rows shorter than a vector, forward and backward
const bool kPathsReported = cpu::register_paths([] {
#if defined(CPU_CAPABILITY_AVX512)
  const char* small = "rows of 1, 2, 4 or 8 windows packed several to a vector (AVX-512)";
#else
  const char* small = "a vector pass per row (lanes past the row unused)";
#endif
  return std::vector<std::pair<std::string, std::string>>{{"max_pool2d.short_rows", small}};
});

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("max_pool2d_fwd", &max_pool2d_fwd);
  m.impl("max_pool2d_bwd", &max_pool2d_bwd);
}

}  // namespace tritium
