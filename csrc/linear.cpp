// Linear without BLAS for the serving path: y (M, N) = x (M, K) @ w (N, K)^T, registered for the CPU key of
// tritium::linear_small (python/tritium/ops/linear.py).
//
// A decode step's product is a stream over the weights (each weight read once per step from memory: the model
// is larger than the caches), so what decides its speed is whether the weight stream and the FMAs overlap. BLAS
// does not get there on this shape: it repacks the weight matrix on every call (a read and a write of all of it)
// and its GEMV reaches about half of the read bandwidth (measured on the 2-core CPU, SmolLM2-135M's 30 layers +
// head in float32, cold weights: MKL 47 / 70 / 95 ms per step at 1 / 16 / 32 rows, this kernel 20 / 33 / 53 ms;
// 875 vs 790 ms at 512 rows). This kernel needs no packing because the weight layout (N, K) already gives
// contiguous rows: 4 weight rows x 4 rows of x per register tile (16 accumulator vectors, 8 loads per 16 FMAs),
// the 16 dot products reduced at once with reduce_lanes, the weight tiles in memory order (one sequential region
// per thread, split over N) with the tile two ahead prefetched into L2 a line per k step, and x read in chunks
// that stay in L2.
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kChunkBytes = 256 * 1024;  // rows of x per pass over the weights: this many bytes (in L2)
constexpr int64_t kPrefetchTiles = 2;         // prefetch distance in weight tiles (measured: 1-4 equal, none 1.4x slower)

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

// Weight rows [begin, end) against all M rows of x: 4-row weight tiles in order (a weight tile stays in L1 while
// every 4-row block of x passes it), x in chunks of rows that fit in L2 (a chunk is read from L2 per tile; the
// weights are streamed once per chunk, from memory for the first and from L3 after it for long prompts).
template <typename T>
void tiles_range(const acc_type<T>* x, int64_t M, int64_t K, const T* w, int64_t begin, int64_t end, T* y,
                 int64_t N) {
  using A = acc_type<T>;
  alignas(64) A out[16];
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / (K * int64_t(sizeof(A))) / 4 * 4);
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
        for (int i = 0; i < 4; ++i) xr[i] = x + std::min(m0 + i, c1 - 1) * K;
        block_4x4<T>(xr, wr, K, out, pf, pf_end, per_step);
        const int64_t mi = std::min<int64_t>(4, c1 - m0);
        for (int i = 0; i < mi; ++i)
          for (int j = 0; j < nj; ++j) y[(m0 + i) * N + n0 + j] = static_cast<T>(out[4 * i + j]);
      }
    }
  }
}

at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_small: x must be (M, K) and weight (N, K), got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "linear_small: x (M, K) and weight (N, K) must agree on K, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear_small: weight must have x's dtype ", x.scalar_type(),
              ", got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), "linear_small: weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_linear_small", [&] {
    using A = acc_type<scalar_t>;
    // x contiguous in the accumulation type (read in place for float/double, converted once otherwise)
    const auto xc = x.contiguous();
    std::vector<A> buf;
    const A* xa = as_acc(xc.const_data_ptr<scalar_t>(), M * K, buf);
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    // split N into one contiguous range per thread (whole tiles), so each thread streams its part of the weights
    const int64_t tiles = (N + 3) / 4;
    const int64_t min_tiles = std::max<int64_t>(1, 65536 / std::max<int64_t>(4 * K * std::max<int64_t>(M, 4), 1));
    at::parallel_for(0, tiles, min_tiles, [&](int64_t t0, int64_t t1) {
      tiles_range<scalar_t>(xa, M, K, wp, t0 * 4, std::min(N, t1 * 4), yp, N);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("linear_small", &linear_small);
}

}  // namespace tritium
