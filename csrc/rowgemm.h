// rowgemm: y = x @ w^T [+ c] for a weight matrix in torch's (out, in) layout, without BLAS or packing. Used by
// tritium::linear_small (csrc/linear.cpp: the serving path's projections when the weights are not packed;
// packed weights go to csrc/panel.h, whose register tiles reuse each loaded weight over more rows).
//
// A decode step's product is a stream over the weights (each weight read once per step from memory: the model is larger
// than the caches), so what decides its speed is whether the weight stream and the FMAs overlap. BLAS does not get
// there on this shape: it repacks the weight matrix on every call (a read and a write of all of it) and its GEMV leaves
// much of the read bandwidth unused. This kernel needs no packing because the weight layout (N, K) already gives
// contiguous rows: 4 weight rows x 4 rows of x per register tile (16 accumulator vectors, 8 loads per 16 FMAs), the 16
// dot products reduced at once with reduce_lanes, the weight tiles in memory order (one sequential region per thread,
// split over N) with the tile two ahead prefetched into L2 a line per k step, and x read in chunks that stay in L2.
#pragma once
#include "vec.h"

namespace tritium {
namespace rowgemm_detail {

constexpr int64_t kChunkBytes = 256 * 1024;  // rows of x per pass over the weights: this many bytes (in L2)
constexpr int64_t kPrefetchTiles = 2;         // prefetch distance in weight tiles (without it the stream stalls)

// out[4 i + j] = x row i . weight row j for 4 rows of x and 4 weight rows (rows past the end are clamped to the
// last one by the caller: computed and discarded). Each step also prefetches per_step lines of [pf, pf_end).
template <typename T>
inline void block_4x4(const acc_type<T>* const* xr, const T* const* wr, int64_t K, acc_type<T>* out,
                      const char*& pf, const char* pf_end, int per_step) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using A = acc_type<T>;
  constexpr int64_t V = IO::kSize;
  const int64_t Kv = K - K % V;
  Vec acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = Vec(0);
  for (int64_t k = 0; k < Kv; k += V) {
    Vec wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = IO::load(wr[j] + k);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    for (int l = 0; l < per_step && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
#endif
    for (int i = 0; i < 4; ++i) {
      const Vec xv = Vec::loadu(xr[i] + k);
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = at::vec::fmadd(xv, wv[j], acc[4 * i + j]);
    }
  }
  for (int64_t g = 0; g < 16; g += V) reduce_lanes(acc + g).store(out + g);
  if (Kv < K) {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        A t = 0;
        for (int64_t k = Kv; k < K; ++k) t += static_cast<A>(wr[j][k]) * xr[i][k];
        out[4 * i + j] += t;
      }
  }
}

// block_4x4 for one row of x (a decode step's single row): 4 accumulators instead of 16, so no FMA is spent on
// the clamped copies of that row.
template <typename T>
inline void block_1x4(const acc_type<T>* xr, const T* const* wr, int64_t K, acc_type<T>* out, const char*& pf,
                      const char* pf_end, int per_step) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using A = acc_type<T>;
  constexpr int64_t V = IO::kSize;
  const int64_t Kv = K - K % V;
  Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  for (int64_t k = 0; k < Kv; k += V) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    for (int l = 0; l < per_step && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
#endif
    const Vec xv = Vec::loadu(xr + k);
    for (int j = 0; j < 4; ++j) acc[j] = at::vec::fmadd(xv, IO::load(wr[j] + k), acc[j]);
  }
  for (int j = 0; j < 4; ++j) {
    A t = hsum(acc[j]);
    for (int64_t k = Kv; k < K; ++k) t += static_cast<A>(wr[j][k]) * xr[k];
    out[j] = t;
  }
}

// Weight rows [begin, end) against all M rows of x: 4-row weight tiles in order (a weight tile stays in L1 while
// every 4-row block of x passes it), x in chunks of rows that fit in L2 (a chunk is read from L2 per tile; the
// weights are streamed once per chunk, from memory for the first and from L3 after it for long prompts).
template <typename T>
void tiles_range(const acc_type<T>* x, int64_t ldx, int64_t M, int64_t K, const T* w, int64_t begin, int64_t end,
                 T* y, int64_t ldy, const T* c, int64_t ldc) {
  using A = acc_type<T>;
  alignas(64) A out[16];
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / std::max<int64_t>(1, K * int64_t(sizeof(A))) / 4 * 4);
  const char* wend = reinterpret_cast<const char*>(w + end * K);
  const int64_t lines = (4 * K * int64_t(sizeof(T)) + 63) / 64;  // cache lines of one weight tile
  const int64_t ksteps = std::max<int64_t>(1, K / VecIO<T>::kSize);
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t c1 = std::min(M, c0 + chunk);
    const int64_t steps = (c1 - c0 + 3) / 4 * ksteps;
    const int per_step = static_cast<int>((lines + steps - 1) / steps);
    for (int64_t n0 = begin; n0 < end; n0 += 4) {
      const T* wr[4];
      for (int j = 0; j < 4; ++j) wr[j] = w + std::min(n0 + j, end - 1) * K;
      const int64_t nj = std::min<int64_t>(4, end - n0);
      // prefetch the tile kPrefetchTiles ahead (contiguous: the weight rows follow each other), spread over this
      // tile's k steps so the memory stream overlaps the FMAs
      const char* pf = reinterpret_cast<const char*>(w + std::min(n0 + 4 * kPrefetchTiles, end) * K);
      const char* pf_end = std::min(wend, pf + 4 * K * int64_t(sizeof(T)));
      for (int64_t m0 = c0; m0 < c1; m0 += 4) {
        const A* xr[4];
        for (int i = 0; i < 4; ++i) xr[i] = x + std::min(m0 + i, c1 - 1) * ldx;
        const int64_t mi = std::min<int64_t>(4, c1 - m0);
        if (mi == 1)
          block_1x4<T>(xr[0], wr, K, out, pf, pf_end, per_step);
        else
          block_4x4<T>(xr, wr, K, out, pf, pf_end, per_step);
        for (int i = 0; i < mi; ++i) {
          T* yr = y + (m0 + i) * ldy + n0;
          if (c) {
            const T* cr = c + (m0 + i) * ldc + n0;
            for (int j = 0; j < nj; ++j) yr[j] = static_cast<T>(out[4 * i + j] + static_cast<acc_type<T>>(cr[j]));
          } else {
            for (int j = 0; j < nj; ++j) yr[j] = static_cast<T>(out[4 * i + j]);
          }
        }
      }
    }
  }
}

}  // namespace rowgemm_detail


// y (M, N; row stride ldy) = x (M, K; row stride ldx; in the accumulation type) @ w (N, K; contiguous)^T [+ c],
// c null or (M, N) with row stride ldc (ldc = 0: one row added to every row, a bias). y may alias c. Splits N
// into one contiguous range of whole tiles per thread, so each thread streams its part of the weights.
template <typename T>
void rowgemm(const acc_type<T>* x, int64_t ldx, int64_t M, int64_t K, const T* w, int64_t N, T* y, int64_t ldy,
             const T* c = nullptr, int64_t ldc = 0) {
  if (M <= 0 || N <= 0) return;
  const int64_t tiles = (N + 3) / 4;
  const int64_t min_tiles = std::max<int64_t>(1, 65536 / std::max<int64_t>(4 * K * std::max<int64_t>(M, 4), 1));
  at::parallel_for(0, tiles, min_tiles, [&](int64_t t0, int64_t t1) {
    rowgemm_detail::tiles_range<T>(x, ldx, M, K, w, t0 * 4, std::min(N, t1 * 4), y, ldy, c, ldc);
  });
}

}  // namespace tritium
