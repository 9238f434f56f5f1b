// Skinny linear for decode: y (M, N) = x (M, K) @ w (N, K)^T with few rows M (a decode step's tokens), registered
// for the CPU key of tritium::linear_small (python/tritium/ops/linear.py).
//
// At a handful of rows the product is a stream over the weights (every weight read once per step), so its speed
// is the memory bandwidth it reaches. BLAS's GEMV reaches about half of it here (measured: MKL sgemv 11.6 GB/s,
// a plain reduction over the same bytes 20-26 GB/s), which makes it the whole cost of a decode step. This kernel
// streams weight rows in order (one sequential stream per thread, split over N), converts x to the accumulation
// type once, keeps MT rows of x against each weight row in registers (the weight row is read from memory once
// and from L1 for the further tiles of x), and reduces 16 weight rows' partial-sum vectors at once with
// reduce_lanes (one transpose-add tree instead of 16 horizontal sums).
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kRows = 16;  // weight rows per reduction group

// y[m, j0 + jj] for MT rows of x and nb <= kRows weight rows starting at j0: weight rows one after the other
// (one sequential stream: measured faster here than register-blocking several rows, which interleaves streams),
// two accumulator chains per x row.
template <typename T, int MT>
void rows_tile(const acc_type<T>* x, int64_t K, const T* w, int64_t j0, int64_t nb, T* y, int64_t ldy) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using A = acc_type<T>;
  constexpr int64_t V = IO::kSize;
  const int64_t Kv = K - K % V;
  Vec part[MT][kRows];
  A tail[MT][kRows];
  for (int64_t jj = 0; jj < nb; ++jj) {
    const T* wr = w + (j0 + jj) * K;
    Vec acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = Vec(0);
    int64_t k = 0;
    for (; k + 2 * V <= Kv; k += 2 * V) {
      const Vec w0 = IO::load(wr + k), w1 = IO::load(wr + k + V);
      for (int m = 0; m < MT; ++m) {
        acc0[m] = at::vec::fmadd(w0, Vec::loadu(x + m * K + k), acc0[m]);
        acc1[m] = at::vec::fmadd(w1, Vec::loadu(x + m * K + k + V), acc1[m]);
      }
    }
    for (; k < Kv; k += V) {
      const Vec w0 = IO::load(wr + k);
      for (int m = 0; m < MT; ++m) acc0[m] = at::vec::fmadd(w0, Vec::loadu(x + m * K + k), acc0[m]);
    }
    for (int m = 0; m < MT; ++m) {
      part[m][jj] = acc0[m] + acc1[m];
      A t = 0;
      for (int64_t kk = Kv; kk < K; ++kk) t += static_cast<A>(wr[kk]) * x[m * K + kk];
      tail[m][jj] = t;
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int64_t jj = nb; jj < kRows; ++jj) part[m][jj] = Vec(0);
    alignas(64) A out[kRows];
    if constexpr (V == kRows) {
      reduce_lanes(part[m]).store(out);
    } else {  // double vectors (8 lanes): one reduction per row
      for (int64_t jj = 0; jj < nb; ++jj)
        out[jj] = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, part[m][jj]);
    }
    T* yr = y + m * ldy + j0;
    for (int64_t jj = 0; jj < nb; ++jj) yr[jj] = static_cast<T>(out[jj] + tail[m][jj]);
  }
}

template <typename T>
void rows_range(const acc_type<T>* x, int64_t M, int64_t K, const T* w, int64_t begin, int64_t end, T* y,
                int64_t N) {
  for (int64_t j0 = begin; j0 < end; j0 += kRows) {
    const int64_t nb = std::min(kRows, end - j0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_tile<T, 4>(x + m * K, K, w, j0, nb, y + m * N, N);
    switch (M - m) {
      case 3: rows_tile<T, 3>(x + m * K, K, w, j0, nb, y + m * N, N); break;
      case 2: rows_tile<T, 2>(x + m * K, K, w, j0, nb, y + m * N, N); break;
      case 1: rows_tile<T, 1>(x + m * K, K, w, j0, nb, y + m * N, N); break;
      default: break;
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
    // split N into one contiguous range per thread (whole groups of kRows rows), so each thread streams its part
    const int64_t groups = (N + kRows - 1) / kRows;
    const int64_t min_groups = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * kRows, 1));
    at::parallel_for(0, groups, min_groups, [&](int64_t g0, int64_t g1) {
      rows_range<scalar_t>(xa, M, K, wp, g0 * kRows, std::min(N, g1 * kRows), yp, N);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("linear_small", &linear_small);
}

}  // namespace tritium
