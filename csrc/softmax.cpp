// Softmax / log-softmax CPU kernels (forward and backward), registered for the CPU key of the tritium ops whose
// schemas python/tritium/ops/softmax.py defines.
//
// Tensors are viewed as (outer, N, inner) with the softmax taken over N:
// - inner == 1 (the softmax dim is the last one): rows of N contiguous elements, split across threads by
//   at::parallel_for. Three passes per row (max; exp and sum; normalise): the row is read once from memory and
//   its later passes hit L1/L2 (a 32768-wide float row is 128 KiB). The outputs are tritium::empty (huge pages).
// - inner > 1 (an earlier dim): the inner elements are contiguous, so the passes run over N with vectors laid
//   across inner (ATen's own layout trick), in blocks of kInnerBlock inner elements per task.
// y = softmax(scale * x) or log_softmax(scale * x); scale is 1 (softmax), -1 (softmin) or 1/temperature.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kInnerBlock = 256;

// NaN-propagating scalar max (as at::vec::maximum and torch's max reduction)
template <typename A>
inline A smax(A a, A b) {
  return (a != a || a > b) ? a : b;
}

// max_j scale * x[j]
template <typename T>
acc_type<T> row_max(const T* x, int64_t n, acc_type<T> scale) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  const Vec vs(scale);
  Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    m0 = at::vec::maximum(m0, IO::load(x + i) * vs);
    m1 = at::vec::maximum(m1, IO::load(x + i + K) * vs);
  }
  for (; i + K <= n; i += K) m0 = at::vec::maximum(m0, IO::load(x + i) * vs);
  acc_t m = hmax(at::vec::maximum(m0, m1));
  for (; i < n; ++i) m = smax(m, static_cast<acc_t>(x[i]) * scale);
  return m;
}

// One row, inner == 1. buf: n accumulation-type elements (may alias y when T is the accumulation type and the
// output is not streamed). `stream`: y is written around the cache (vec.h store_out; the caller fences).
template <typename T>
void softmax_row(const T* x, T* y, acc_type<T>* buf, int64_t n, acc_type<T> scale, bool log, bool stream) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  const acc_t m = row_max(x, n, scale);
  const Vec vs(scale), vm(m);
  // pass 2: e = exp(scale * x - m), summed (and kept in buf for softmax)
  const acc_t s = [&] {
    Vec s0(0), s1(0);
    int64_t j = 0;
    for (; j + 2 * K <= n; j += 2 * K) {
      Vec e0 = fexp(at::vec::fmsub(IO::load(x + j), vs, vm));
      Vec e1 = fexp(at::vec::fmsub(IO::load(x + j + K), vs, vm));
      s0 = s0 + e0;
      s1 = s1 + e1;
      if (!log) {
        e0.store(buf + j);
        e1.store(buf + j + K);
      }
    }
    for (; j + K <= n; j += K) {
      Vec e = fexp(at::vec::fmsub(IO::load(x + j), vs, vm));
      s0 = s0 + e;
      if (!log) e.store(buf + j);
    }
    acc_t sum = hsum(s0 + s1);
    for (; j < n; ++j) {
      acc_t e = std::exp(static_cast<acc_t>(x[j]) * scale - m);
      sum += e;
      if (!log) buf[j] = e;
    }
    return sum;
  }();
  // pass 3: normalise (bfloat16 on a CPU with AVX512-BF16: two vectors a store, rounded by one instruction)
  int64_t i = 0;
  [[maybe_unused]] const bool ins = bf16ins<T>();
  if (log) {
    const acc_t ls = std::log(s);
    const Vec vls(ls);
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (ins) i = store_pairs_bf16ins(y, n, stream, [&](int64_t j) { return at::vec::fmsub(IO::load(x + j), vs, vm) - vls; });
    }
#endif
    for (; i + K <= n; i += K) store_out(y + i, at::vec::fmsub(IO::load(x + i), vs, vm) - vls, K, stream);
    for (; i < n; ++i) y[i] = static_cast<T>((static_cast<acc_t>(x[i]) * scale - m) - ls);
  } else {
    const acc_t r = acc_t(1) / s;
    const Vec vr(r);
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (ins) i = store_pairs_bf16ins(y, n, stream, [&](int64_t j) { return Vec::loadu(buf + j) * vr; });
    }
#endif
    for (; i + K <= n; i += K) store_out(y + i, Vec::loadu(buf + i) * vr, K, stream);
    for (; i < n; ++i) y[i] = static_cast<T>(buf[i] * r);
  }
}

// inner > 1: x, y point at (o, 0, i0); the block covers w <= kInnerBlock inner elements, rows N apart by `inner`.
template <typename T>
void softmax_inner(const T* x, T* y, int64_t n, int64_t inner, int64_t w, acc_type<T> scale, bool log) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  acc_t m[kInnerBlock], s[kInnerBlock];
  const Vec vs(scale);
  std::fill(m, m + w, -std::numeric_limits<acc_t>::infinity());
  std::fill(s, s + w, acc_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* xj = x + j * inner;
    int64_t i = 0;
    for (; i + K <= w; i += K) at::vec::maximum(Vec::loadu(m + i), IO::load(xj + i) * vs).store(m + i);
    for (; i < w; ++i) m[i] = smax(m[i], static_cast<acc_t>(xj[i]) * scale);
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* xj = x + j * inner;
    int64_t i = 0;
    for (; i + K <= w; i += K)
      (Vec::loadu(s + i) + fexp(at::vec::fmsub(IO::load(xj + i), vs, Vec::loadu(m + i)))).store(s + i);
    for (; i < w; ++i) s[i] += std::exp(static_cast<acc_t>(xj[i]) * scale - m[i]);
  }
  for (int64_t i = 0; i < w; ++i) s[i] = log ? std::log(s[i]) : acc_t(1) / s[i];
  for (int64_t j = 0; j < n; ++j) {
    const T* xj = x + j * inner;
    T* yj = y + j * inner;
    int64_t i = 0;
    for (; i + K <= w; i += K) {
      Vec z = at::vec::fmsub(IO::load(xj + i), vs, Vec::loadu(m + i));
      IO::store(yj + i, log ? z - Vec::loadu(s + i) : fexp(z) * Vec::loadu(s + i));
    }
    for (; i < w; ++i) {
      acc_t z = static_cast<acc_t>(xj[i]) * scale - m[i];
      yj[i] = static_cast<T>(log ? z - s[i] : std::exp(z) * s[i]);
    }
  }
}

void check3(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D (outer, N, inner), got ", t.dim(), "-D");
  if (t.size(2) == 1) {
    TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, " must have unit stride along N when inner == 1");
  } else {
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name, " must have contiguous (N, inner) blocks");
  }
}

// y = (log_)softmax(scale * x) over dim 1 of x (outer, N, inner) -> y contiguous (outer, N, inner)
at::Tensor softmax_fwd(const at::Tensor& x, double scale, bool log) {
  check3(x, "input");
  const int64_t outer = x.size(0), N = x.size(1), inner = x.size(2);
  auto y = empty({outer, N, inner}, x.options());
  if (y.numel() == 0) return y;
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_softmax_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    const int64_t sx = x.stride(0);
    if (inner == 1) {
      // streamed, y is written once, from a row buffer that stays in L2; else float rows keep e in y itself
      const bool nt = stream_outputs(2 * y.numel() * x.element_size());
      const bool in_y = std::is_same_v<acc_t, scalar_t> && !nt;
      at::parallel_for(0, outer, row_grain(N), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> tmp;
        if (!log && !in_y) tmp.resize(N);
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* yr = yp + r * N;
          acc_t* buf = in_y ? reinterpret_cast<acc_t*>(yr) : tmp.data();
          softmax_row(xp + r * sx, yr, buf, N, sc, log, nt);
        }
        if (nt) stream_fence();
      });
    } else {
      const int64_t nb = (inner + kInnerBlock - 1) / kInnerBlock;
      at::parallel_for(0, outer * nb, std::max<int64_t>(1, row_grain(N * kInnerBlock)), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t o = t / nb, i0 = (t % nb) * kInnerBlock, w = std::min(kInnerBlock, inner - i0);
          softmax_inner(xp + o * sx + i0, yp + o * N * inner + i0, N, inner, w, sc, log);
        }
      });
    }
  });
  return y;
}

// softmax: dx = scale * y * (dy - sum(dy * y));  log: dx = scale * (dy - exp(y) * sum(dy)).
// dy, y (outer, N, inner) -> dx contiguous (outer, N, inner)
at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale, bool log) {
  check3(dy, "grad_output");
  check3(y, "output");
  const int64_t outer = y.size(0), N = y.size(1), inner = y.size(2);
  auto dx = empty({outer, N, inner}, y.options());
  if (dx.numel() == 0) return dx;
  TRITIUM_DISPATCH_FLOATING(y.scalar_type(), "tritium_softmax_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    const Vec vsc(sc);
    const int64_t sdy = dy.stride(0), sy = y.stride(0);
    // the per-element gradient given the row's reduction c (sum(dy*y) or sum(dy))
    auto grad_v = [&](Vec d, Vec yv, Vec c) { return log ? (d - fexp(yv) * c) * vsc : yv * (d - c) * vsc; };
    auto grad_s = [&](acc_t d, acc_t yv, acc_t c) { return log ? (d - std::exp(yv) * c) * sc : yv * (d - c) * sc; };
    if (inner == 1) {
      const bool nt = stream_outputs(3 * dx.numel() * y.element_size());
      at::parallel_for(0, outer, row_grain(N), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* dyr = dyp + r * sdy;
          const scalar_t* yr = yp + r * sy;
          scalar_t* dxr = dxp + r * N;
          Vec a0(0), a1(0);
          int64_t i = 0;
          for (; i + 2 * K <= N; i += 2 * K) {
            Vec d0 = IO::load(dyr + i), d1 = IO::load(dyr + i + K);
            if (log) {
              a0 = a0 + d0;
              a1 = a1 + d1;
            } else {
              a0 = at::vec::fmadd(d0, IO::load(yr + i), a0);
              a1 = at::vec::fmadd(d1, IO::load(yr + i + K), a1);
            }
          }
          for (; i + K <= N; i += K) {
            Vec d = IO::load(dyr + i);
            a0 = log ? a0 + d : at::vec::fmadd(d, IO::load(yr + i), a0);
          }
          acc_t c = hsum(a0 + a1);
          for (; i < N; ++i) {
            acc_t d = static_cast<acc_t>(dyr[i]);
            c += log ? d : d * static_cast<acc_t>(yr[i]);
          }
          const Vec vc(c);
          for (i = 0; i + K <= N; i += K) store_out(dxr + i, grad_v(IO::load(dyr + i), IO::load(yr + i), vc), K, nt);
          for (; i < N; ++i)
            dxr[i] = static_cast<scalar_t>(grad_s(static_cast<acc_t>(dyr[i]), static_cast<acc_t>(yr[i]), c));
        }
        if (nt) stream_fence();
      });
    } else {
      const int64_t nb = (inner + kInnerBlock - 1) / kInnerBlock;
      at::parallel_for(0, outer * nb, std::max<int64_t>(1, row_grain(N * kInnerBlock)), [&](int64_t b, int64_t e) {
        acc_t c[kInnerBlock];
        for (int64_t t = b; t < e; ++t) {
          const int64_t o = t / nb, i0 = (t % nb) * kInnerBlock, w = std::min(kInnerBlock, inner - i0);
          const scalar_t* dyo = dyp + o * sdy + i0;
          const scalar_t* yo = yp + o * sy + i0;
          scalar_t* dxo = dxp + o * N * inner + i0;
          std::fill(c, c + w, acc_t(0));
          for (int64_t j = 0; j < N; ++j) {
            const scalar_t* dj = dyo + j * inner;
            const scalar_t* yj = yo + j * inner;
            int64_t i = 0;
            for (; i + K <= w; i += K) {
              Vec d = IO::load(dj + i);
              (log ? Vec::loadu(c + i) + d : at::vec::fmadd(d, IO::load(yj + i), Vec::loadu(c + i))).store(c + i);
            }
            for (; i < w; ++i) {
              acc_t d = static_cast<acc_t>(dj[i]);
              c[i] += log ? d : d * static_cast<acc_t>(yj[i]);
            }
          }
          for (int64_t j = 0; j < N; ++j) {
            const scalar_t* dj = dyo + j * inner;
            const scalar_t* yj = yo + j * inner;
            scalar_t* xj = dxo + j * inner;
            int64_t i = 0;
            for (; i + K <= w; i += K) IO::store(xj + i, grad_v(IO::load(dj + i), IO::load(yj + i), Vec::loadu(c + i)));
            for (; i < w; ++i)
              xj[i] = static_cast<scalar_t>(grad_s(static_cast<acc_t>(dj[i]), static_cast<acc_t>(yj[i]), c[i]));
          }
        }
      });
    }
  });
  return dx;
}

// `tritium info`: how the softmaxes round a bfloat16 output
const bool kPathsReported = cpu::register_paths([] {
  return std::vector<std::pair<std::string, std::string>>{{"softmax.bfloat16_output", bf16_output_path()}};
});
}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace tritium
