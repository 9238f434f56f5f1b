// Panel GEMM: y (M, N) = x (M, K) @ w (N, K)^T [+ c] with w packed once into column panels, for float and
// double. Used by tritium::linear_packed (csrc/linear.cpp: the serving path's projections with weights packed
// at load) and the LSTM/GRU scans (csrc/rnn.cpp: W_hh packed once per scan).
//
// Why a second kernel next to rowgemm.h: rowgemm reads torch's (N, K) layout as it is, so each output is a dot
// product whose 16 lanes must be reduced at the end (reduce_lanes: about 3 shuffles/adds per output), which at
// K = 512-576 costs 10-15% of the FMA time. Packed panels make the product an outer-product update instead:
// the panel holds, for each k, kPanel consecutive weight rows' k-th elements side by side
// (packed[p][k][c] = w[p * kPanel + c][k]), so a register tile of MR rows of x x kPanel outputs accumulates
// x[i][k] (broadcast) * panel[k][0:kPanel] (4 vector loads) for k = 0..K-1 and is stored as it is: no
// reduction, 4 + MR loads per 4 * MR FMAs, and the weight stream is one sequential run per panel.
//
// Blocking: x is taken in chunks of rows that fit in L2 (a chunk is read from L2 once per panel); the (chunk,
// panel) pairs are split between the threads; each panel is swept by MR = 6 row tiles (24 accumulators) while
// it sits in L2, and its stream is prefetched ahead of the first tile (the weights come from memory at decode
// shapes, from L3 for a long prompt's later chunks).
#pragma once
#include <cstring>

#include "vec.h"

namespace tritium {
namespace panel {

template <typename A>
constexpr int64_t width() {
  return 4 * Vectorized<A>::size();  // 64 floats / 32 doubles with AVX-512
}

constexpr int kMR = 6;                       // rows of x per register tile (6 x 4 accumulator vectors)
constexpr int64_t kChunkBytes = 256 * 1024;  // rows of x per sweep over the panels: this many bytes (in L2)
constexpr int64_t kPrefetchBytes = 4096;     // prefetch distance in the panel stream

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
      A* dst = out + p * K * NP;
      for (int64_t c = 0; c < NP; ++c) {
        const int64_t n = p * NP + c;
        if (n < N) {
          const A* src = w + n * ldw;
          for (int64_t k = 0; k < K; ++k) dst[k * NP + c] = src[k];
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * NP + c] = A(0);
        }
      }
    }
  });
}

// The panels of v^T for v (K, N) with rows of stride ldv (a product x @ v, e.g. attention's P V):
// packed[p][k][c] = v[k][p * NP + c], 0 for columns past N. Single-threaded (callers pack many small ones).
template <typename A>
void pack_cols(const A* v, int64_t ldv, int64_t K, int64_t N, A* out) {
  constexpr int64_t NP = width<A>();
  for (int64_t p = 0; p * NP < N; ++p) {
    const int64_t nc = std::min(NP, N - p * NP);
    for (int64_t k = 0; k < K; ++k) {
      A* dst = out + (p * K + k) * NP;
      std::memcpy(dst, v + k * ldv + p * NP, nc * sizeof(A));
      for (int64_t c = nc; c < NP; ++c) dst[c] = A(0);
    }
  }
}

// Register type of the micro-kernel. With AVX-512 the raw __m512/__m512d: GCC keeps an array of 24 of them in
// registers but not an array of at::vec::Vectorized (it stored every accumulator back to the stack each step,
// measured 77 GFLOPS instead of 200).
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
};
template <>
struct Reg<double> {
  using V = __m512d;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
#else
template <typename A>
struct Reg {
  using V = Vectorized<A>;
  static V zero() { return V(0); }
  static V load(const A* p) { return V::loadu(p); }
  static V set1(A a) { return V(a); }
  static V fma(V a, V b, V c) { return at::vec::fmadd(a, b, c); }
};
#endif

// y[i][0:ncols] = sum_k x[i][k] * b[k][0:ncols] (+ c[i][0:ncols]) for i < MR. PF: prefetch the panel stream.
template <typename A, int MR, bool PF>
inline void tile(const A* x, int64_t ldx, const A* b, int64_t K, A* y, int64_t ldy, int64_t ncols, const A* c,
                 int64_t ldc) {
  using Vec = Vectorized<A>;
  using R = Reg<A>;
  constexpr int64_t V = Vec::size(), NP = 4 * V;
  typename R::V acc[MR * 4];
  for (int i = 0; i < MR * 4; ++i) acc[i] = R::zero();
  for (int64_t k = 0; k < K; ++k) {
    const A* bk = b + k * NP;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (PF)  // every cache line of the panel row kPrefetchBytes ahead
      for (int64_t off = 0; off < int64_t(sizeof(A)) * NP; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(bk) + kPrefetchBytes + off, _MM_HINT_T0);
#endif
    const auto b0 = R::load(bk), b1 = R::load(bk + V), b2 = R::load(bk + 2 * V), b3 = R::load(bk + 3 * V);
    for (int i = 0; i < MR; ++i) {
      const auto a = R::set1(x[i * ldx + k]);
      acc[4 * i] = R::fma(a, b0, acc[4 * i]);
      acc[4 * i + 1] = R::fma(a, b1, acc[4 * i + 1]);
      acc[4 * i + 2] = R::fma(a, b2, acc[4 * i + 2]);
      acc[4 * i + 3] = R::fma(a, b3, acc[4 * i + 3]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    A* yr = y + i * ldy;
    const A* cr = c ? c + i * ldc : nullptr;
    if (ncols == NP) {
      for (int j = 0; j < 4; ++j) {
        Vec v(acc[4 * i + j]);
        if (cr) v = v + Vec::loadu(cr + j * V);
        v.store(yr + j * V);
      }
    } else {
      for (int j = 0; j < 4 && j * V < ncols; ++j) {
        const int64_t cnt = std::min<int64_t>(V, ncols - j * V);
        Vec v(acc[4 * i + j]);
        if (cr) v = v + Vec::loadu(cr + j * V, cnt);
        v.store(yr + j * V, cnt);
      }
    }
  }
}

template <typename A, bool PF>
inline void tile_rows(int mr, const A* x, int64_t ldx, const A* b, int64_t K, A* y, int64_t ldy, int64_t ncols,
                      const A* c, int64_t ldc) {
  switch (mr) {
    case 6: tile<A, 6, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 5: tile<A, 5, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 4: tile<A, 4, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 3: tile<A, 3, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    case 2: tile<A, 2, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
    default: tile<A, 1, PF>(x, ldx, b, K, y, ldy, ncols, c, ldc); break;
  }
}

}  // namespace panel

// y (M, N; row stride ldy) = x (M, K; row stride ldx) @ w^T [+ c] with w packed by panel::pack; c null or
// (M, N) with row stride ldc (ldc = 0: one row added to every row, a bias). y must not alias x; it may alias c.
// pstride: elements from one panel to the next (default K * width: pack's layout; a product over a sub-range
// of a longer packing's k passes the full packing's). Called inside a parallel region it runs on that thread.
template <typename A>
void panel_gemm(const A* x, int64_t ldx, int64_t M, int64_t K, const A* packed, int64_t N, A* y, int64_t ldy,
                const A* c = nullptr, int64_t ldc = 0, int64_t pstride = -1) {
  constexpr int64_t NP = panel::width<A>();
  if (M <= 0 || N <= 0) return;
  const int64_t panels = (N + NP - 1) / NP;
  const int64_t chunk = std::max<int64_t>(panel::kMR, panel::kChunkBytes / std::max<int64_t>(1, K * int64_t(sizeof(A))) /
                                                          panel::kMR * panel::kMR);
  // work items (chunk of x rows, panel), chunk-major, split into one contiguous range per thread: a small M is one
  // chunk (threads split the panels, each streaming its own part of the weights); a long prompt's chunks are
  // shared too, so N = 576 (9 panels) does not leave one thread with 5 panels and the other with 4
  const int64_t chunks = (M + chunk - 1) / chunk, items = chunks * panels;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, NP * K * std::min<int64_t>(M, chunk)));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r0 = (it / panels) * chunk, r1 = std::min(M, r0 + chunk), p = it % panels;
      const A* b = packed + p * (pstride < 0 ? K * NP : pstride);
      const int64_t ncols = std::min(NP, N - p * NP);
      for (int64_t m0 = r0; m0 < r1; m0 += panel::kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(panel::kMR, r1 - m0));
        const A* cm = c ? c + m0 * ldc + p * NP : nullptr;
        if (m0 == r0)  // the chunk's first sweep over the panel: it comes from memory (or L3 for later chunks)
          panel::tile_rows<A, true>(mr, x + m0 * ldx, ldx, b, K, y + m0 * ldy + p * NP, ldy, ncols, cm, ldc);
        else
          panel::tile_rows<A, false>(mr, x + m0 * ldx, ldx, b, K, y + m0 * ldy + p * NP, ldy, ncols, cm, ldc);
      }
    }
  });
}

}  // namespace tritium
