// RMSNorm, LayerNorm and GroupNorm CPU kernels (forward and backward), registered for the CPU key of the tritium ops
// whose schemas python/tritium/ops/norms.py defines.
//
// Rows are independent: at::parallel_for splits rows across threads. Each row is read once from memory; a
// 16-bit row is converted to float once into a per-thread buffer (weight and bias once per thread), so the
// statistics and normalisation passes run on float vectors and re-read the row from L1/L2. Statistics
// (rstd, mean) are kept in the accumulation type (float for 16-bit inputs, double for double).
#include "cpu.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

// Row reductions are cascaded: vector accumulators over chunks of kChunk elements, each chunk's sum added to a
// double. A 65536-wide float row then sums with the error of a 1024-element sum, not of a 4096-term lane sum.
constexpr int64_t kChunk = 1024;

// sum(x) over a row (vector chunks added to a double, as below)
template <typename A>
double row_sum(const A* x, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  double s = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t stop = std::min(n, start + kChunk);
    Vec s0(0), s1(0);
    int64_t i = start;
    for (; i + 2 * K <= stop; i += 2 * K) {
      s0 = s0 + Vec::loadu(x + i);
      s1 = s1 + Vec::loadu(x + i + K);
    }
    A cs = hsum(s0 + s1);
    for (; i < stop; ++i) cs += x[i];
    s += cs;
  }
  return s;
}

// (sum(x - c), sum((x - c)^2)) over a row in one pass (SQUARES_ONLY: the first is not computed). The layer
// norm passes the row's mean (from row_sum, rounded to A) as c: the variance sum((x-c)^2)/n - (sum(x-c)/n)^2
// then has no cancellation at all (the second term is the mean's rounding error squared). A cheaper shift
// such as x[0] avoids the cancellation of the unshifted formula only when x[0] is near the mean; with x[0] a few
// standard deviations away its cancellation costs float rows several ulp of output.
template <bool SQUARES_ONLY, typename A>
std::pair<double, double> row_moments(const A* x, int64_t n, A c) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vc(c);
  double s = 0, q = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t stop = std::min(n, start + kChunk);
    Vec s0(0), s1(0), q0(0), q1(0);
    int64_t i = start;
    for (; i + 2 * K <= stop; i += 2 * K) {
      Vec v0 = Vec::loadu(x + i) - vc, v1 = Vec::loadu(x + i + K) - vc;
      if (!SQUARES_ONLY) {
        s0 = s0 + v0;
        s1 = s1 + v1;
      }
      q0 = at::vec::fmadd(v0, v0, q0);
      q1 = at::vec::fmadd(v1, v1, q1);
    }
    A cs = SQUARES_ONLY ? A(0) : hsum(s0 + s1), cq = hsum(q0 + q1);
    for (; i < stop; ++i) {
      A v = x[i] - c;
      cs += v;
      cq += v * v;
    }
    s += cs;
    q += cq;
  }
  return {s, q};
}

// y = (x - mean) * rstd (* w) (+ b); x, w, b in the accumulation type, y in T; stream: y written around the cache
// (stream_outputs: the caller fences at the end of its task)
template <bool HAS_W, bool HAS_B, typename T, typename A>
void row_normalize(const A* x, T* y, const A* w, const A* b, int64_t n, A mean, A rstd, bool stream = false) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vr(rstd);
  auto one = [&](int64_t i) {
    Vec v = (Vec::loadu(x + i) - vm) * vr;
    if constexpr (HAS_W) v = v * Vec::loadu(w + i);
    if constexpr (HAS_B) v = v + Vec::loadu(b + i);
    return v;
  };
  int64_t i = 0;
  if (stream) {
    for (; i + K <= n; i += K) store_out(y + i, one(i), K, true);
  } else {
    for (; i + 2 * K <= n; i += 2 * K) store2(y + i, one(i), one(i + K));
  }
  for (; i < n; ++i) {
    A v = (x[i] - mean) * rstd;
    if constexpr (HAS_W) v *= w[i];
    if constexpr (HAS_B) v += b[i];
    y[i] = static_cast<T>(v);
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// row_normalize for bfloat16 y on a CPU with AVX512-BF16 (called only where cpu::features().avx512_bf16 holds):
// two vectors rounded by one vcvtne2ps2bf16 (round to nearest even, as torch's) instead of ATen's integer rounding
// sequence, which otherwise bounds a 16-bit row's normalize pass; streamed where `stream` and the row is aligned
// for it. The intrinsics sit in this function's own body (its target attribute), not in a lambda.
template <bool HAS_W, bool HAS_B>
TRITIUM_BF16_DOT void row_normalize_bf16ins(const float* x, c10::BFloat16* y, const float* w, const float* b,
                                            int64_t n, float mean, float rstd, bool stream) {
  constexpr int64_t K = 16;
  const __m512 vm = _mm512_set1_ps(mean), vr = _mm512_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    __m512 lo = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vr);
    __m512 hi = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + K), vm), vr);
    if constexpr (HAS_W) {
      lo = _mm512_mul_ps(lo, _mm512_loadu_ps(w + i));
      hi = _mm512_mul_ps(hi, _mm512_loadu_ps(w + i + K));
    }
    if constexpr (HAS_B) {
      lo = _mm512_add_ps(lo, _mm512_loadu_ps(b + i));
      hi = _mm512_add_ps(hi, _mm512_loadu_ps(b + i + K));
    }
    store2_bf16ins(y + i, lo, hi, stream);
  }
  for (; i < n; ++i) {
    float v = (x[i] - mean) * rstd;
    if constexpr (HAS_W) v *= w[i];
    if constexpr (HAS_B) v += b[i];
    y[i] = static_cast<c10::BFloat16>(v);
  }
}
#endif

// row_normalize, or row_normalize_bf16ins for bfloat16 y where the CPU has AVX512-BF16 (bf16_ins)
template <bool HAS_W, bool HAS_B, typename T, typename A>
inline void row_normalize_pick(const A* x, T* y, const A* w, const A* b, int64_t n, A mean, A rstd, bool stream,
                               [[maybe_unused]] bool bf16_ins) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_ins) return row_normalize_bf16ins<HAS_W, HAS_B>(x, y, w, b, n, mean, rstd, stream);
  }
#endif
  row_normalize<HAS_W, HAS_B>(x, y, w, b, n, mean, rstd, stream);
}

// One row's normalize pass, the weight and bias terms compiled in where they are given.
template <typename T, typename A>
inline void row_normalize_out(const A* x, T* y, const A* w, const A* b, int64_t n, A mean, A rstd, bool stream,
                              bool bf16_ins) {
  if (w && b) return row_normalize_pick<true, true>(x, y, w, b, n, mean, rstd, stream, bf16_ins);
  if (w) return row_normalize_pick<true, false>(x, y, w, b, n, mean, rstd, stream, bf16_ins);
  if (b) return row_normalize_pick<false, true>(x, y, w, b, n, mean, rstd, stream, bf16_ins);
  return row_normalize_pick<false, false>(x, y, w, b, n, mean, rstd, stream, bf16_ins);
}

// h = x + r, rounded to T as the unfused add would round it.
template <typename T>
void row_add(const T* x, const T* r, T* h, int64_t n) {
  using A = acc_type<T>;
  constexpr int64_t K2 = 2 * Vectorized<A>::size();
  int64_t i = 0;
  for (; i + K2 <= n; i += K2) {
    auto [x0, x1] = load2(x + i);
    auto [r0, r1] = load2(r + i);
    store2(h + i, x0 + r0, x1 + r1);
  }
  for (; i < n; ++i) h[i] = static_cast<T>(static_cast<A>(x[i]) + static_cast<A>(r[i]));
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------------------
// forward: y = x * rstd * w (rms) or (x - mean) * rstd * w + b (layer), optionally on h = x + residual
// ---------------------------------------------------------------------------------------------------------
std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                 double eps, bool centered) {
  check_rows(x, "input");
  if (residual.has_value()) check_rows(*residual, "residual");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty({M, N}, x.options());
  auto h = residual.has_value() ? empty({M, N}, x.options()) : at::Tensor();
  auto stat_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto rstd = tritium::empty({M}, stat_opts);
  auto mean = centered ? tritium::empty({M}, stat_opts) : at::Tensor();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_norm_fwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = opt_ptr<scalar_t>(residual);
    const scalar_t* wp = opt_ptr<scalar_t>(weight);
    const scalar_t* bp = opt_ptr<scalar_t>(bias);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* hp = rp ? h.mutable_data_ptr<scalar_t>() : nullptr;
    A* rstd_p = rstd.mutable_data_ptr<A>();
    A* mean_p = centered ? mean.mutable_data_ptr<A>() : nullptr;
    const int64_t sx = x.stride(0), sr = rp ? residual->stride(0) : 0;
    // y around the cache when the call's rows outgrow it (the written lines are not read again here; h, the
    // fused add's sum, is: it stays in the cache)
    const bool nt = stream_outputs((rp ? 4 : 2) * M * N * x.element_size());
    [[maybe_unused]] const bool bf16_ins = cpu::features().avx512_bf16;
    at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
      std::vector<A> wbuf, bbuf, xbuf;
      const A* wf = wp ? as_acc(wp, N, wbuf) : nullptr;
      const A* bf = bp ? as_acc(bp, N, bbuf) : nullptr;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * sx;
        // 16-bit rows: the next row streams in while this one's float copy is worked on (float rows are read by
        // the passes themselves, which the hardware prefetcher follows: a software prefetch there only adds loads)
        if (!std::is_same_v<scalar_t, A> && r + 1 < end) {
          prefetch_l2(xr + sx, N * int64_t(sizeof(scalar_t)));
          if (rp) prefetch_l2(rp + (r + 1) * sr, N * int64_t(sizeof(scalar_t)));
        }
        if (rp) {
          row_add(xr, rp + r * sr, hp + r * N, N);
          xr = hp + r * N;  // normalise the rounded h, as the unfused pair does
        }
        const A* xf = as_acc(xr, N, xbuf);
        A mu = 0, var;
        if (centered) {
          const A c = static_cast<A>(row_sum(xf, N) / N);
          auto [s, q] = row_moments<false>(xf, N, c);
          const double d = s / N;
          mu = static_cast<A>(c + d);
          var = static_cast<A>(std::max(q / N - d * d, 0.0));
        } else {
          var = static_cast<A>(row_moments<true>(xf, N, A(0)).second / N);
        }
        const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
        rstd_p[r] = rs;
        if (centered) mean_p[r] = mu;
        row_normalize_out(xf, yp + r * N, wf, bf, N, mu, rs, nt, bf16_ins);
      }
      if (nt) stream_fence();
    });
  });
  if (centered) return {y, mean, rstd};
  if (residual.has_value()) return {y, h, rstd};
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                double eps) {
  auto out = norm_fwd(x, c10::nullopt, weight, c10::nullopt, eps, false);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd(const at::Tensor& x,
                                                                      const at::Tensor& residual,
                                                                      const c10::optional<at::Tensor>& weight,
                                                                      double eps) {
  auto out = norm_fwd(x, residual, weight, c10::nullopt, eps, false);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias, double eps) {
  auto out = norm_fwd(x, c10::nullopt, weight, bias, eps, true);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------------------------------------
// backward. With xhat = (x - mean) * rstd (mean = 0 for rms) and g = dy * w:
//   dx = rstd * (g - [centered] mean(g) - xhat * mean(g * xhat))  (+ grad_residual, the gradient reaching h
//   directly when the forward was fused_add_rms_norm)
//   dw = sum_rows dy * xhat,  db = sum_rows dy   (per-thread partial sums, then one reduction)
// ---------------------------------------------------------------------------------------------------------
std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                 const c10::optional<at::Tensor>& grad_residual, bool need_dw, bool need_db) {
  check_rows(dy, "grad_output");
  check_rows(x, "input");
  if (grad_residual.has_value()) check_rows(*grad_residual, "grad_residual");
  const int64_t M = x.size(0), N = x.size(1);
  const bool centered = mean.has_value();
  need_dw = need_dw && weight.has_value();
  auto dx = empty({M, N}, x.options());
  const int64_t T = at::get_num_threads();
  auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto dw_part = need_dw ? at::zeros({T, N}, acc_opts) : at::Tensor();
  auto db_part = need_db ? at::zeros({T, N}, acc_opts) : at::Tensor();
  std::atomic<bool> spread{false};  // a thread other than the caller's ran rows
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_norm_bwd", [&] {
    using A = acc_type<scalar_t>;
    using Vec = Vectorized<A>;
    constexpr int64_t K = Vec::size();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = opt_ptr<scalar_t>(weight);
    const scalar_t* grp = opt_ptr<scalar_t>(grad_residual);
    const A* mp = centered ? mean->const_data_ptr<A>() : nullptr;
    const A* rp = rstd.const_data_ptr<A>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    A* dwp = need_dw ? dw_part.mutable_data_ptr<A>() : nullptr;
    A* dbp = need_db ? db_part.mutable_data_ptr<A>() : nullptr;
    const int64_t sdy = dy.stride(0), sx = x.stride(0), sgr = grp ? grad_residual->stride(0) : 0;
    at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      if (tid != 0) spread.store(true, std::memory_order_relaxed);
      A* dw_t = dwp ? dwp + tid * N : nullptr;
      A* db_t = dbp ? dbp + tid * N : nullptr;
      std::vector<A> wbuf, dybuf, xbuf, ones;
      const A* wf = wp ? as_acc(wp, N, wbuf) : nullptr;
      if (!wf) {  // g = dy * 1: one code path for both
        ones.assign(N, A(1));
        wf = ones.data();
      }
      for (int64_t r = begin; r < end; ++r) {
        if (!std::is_same_v<scalar_t, A> && r + 1 < end) {  // as in the forward
          prefetch_l2(dyp + (r + 1) * sdy, N * int64_t(sizeof(scalar_t)));
          prefetch_l2(xp + (r + 1) * sx, N * int64_t(sizeof(scalar_t)));
          if (grp) prefetch_l2(grp + (r + 1) * sgr, N * int64_t(sizeof(scalar_t)));
        }
        const A* dyf = as_acc(dyp + r * sdy, N, dybuf);
        const A* xf = as_acc(xp + r * sx, N, xbuf);
        const A mu = mp ? mp[r] : A(0), rs = rp[r];
        const Vec vmu(mu), vrs(rs);
        // pass 1: sum(g) and sum(g * xhat), accumulating dw/db on the way
        Vec sg(0), sgx(0);
        int64_t i = 0;
        for (; i + K <= N; i += K) {
          Vec d = Vec::loadu(dyf + i), xh = (Vec::loadu(xf + i) - vmu) * vrs;
          Vec g = d * Vec::loadu(wf + i);
          sg = sg + g;
          sgx = at::vec::fmadd(g, xh, sgx);
          if (dw_t) at::vec::fmadd(d, xh, Vec::loadu(dw_t + i)).store(dw_t + i);
          if (db_t) (Vec::loadu(db_t + i) + d).store(db_t + i);
        }
        A s_g = hsum(sg), s_gx = hsum(sgx);
        for (; i < N; ++i) {
          A d = dyf[i], xh = (xf[i] - mu) * rs, g = d * wf[i];
          s_g += g;
          s_gx += g * xh;
          if (dw_t) dw_t[i] += d * xh;
          if (db_t) db_t[i] += d;
        }
        const A c1 = centered ? s_g / N : A(0), c2 = s_gx / N;
        if (centered && N == 1) {  // one element: y = b whatever x, so dx = 0 exactly; the formula below keeps
                                   // dy * w's rounding error (times rstd = 1/sqrt(eps)) where the compiler fuses
                                   // g's product into g - c1
          dxp[r * N] = scalar_t(0);
          continue;
        }
        // pass 2: dx = rstd * (g - c1 - xhat * c2) (+ grad_residual)
        const Vec vc1(c1), vc2(c2);
        scalar_t* dxr = dxp + r * N;
        const scalar_t* grr = grp ? grp + r * sgr : nullptr;
        auto one = [&](int64_t j) {
          Vec xh = (Vec::loadu(xf + j) - vmu) * vrs;
          return (Vec::loadu(dyf + j) * Vec::loadu(wf + j) - vc1 - xh * vc2) * vrs;
        };
        for (i = 0; i + 2 * K <= N; i += 2 * K) {
          Vec o0 = one(i), o1 = one(i + K);
          if (grr) {
            auto [g0, g1] = load2(grr + i);
            o0 = o0 + g0;
            o1 = o1 + g1;
          }
          store2(dxr + i, o0, o1);
        }
        for (; i < N; ++i) {
          A xh = (xf[i] - mu) * rs;
          A out = (dyf[i] * wf[i] - c1 - xh * c2) * rs;
          if (grr) out += static_cast<A>(grr[i]);
          dxr[i] = static_cast<scalar_t>(out);
        }
      }
    });
  });
  // one partial row per thread; where only the calling thread's row was written (rows run inline: a small call),
  // that row is dw / db itself, without the reduction, which costs more than a small call's rows
  auto finish = [&](const at::Tensor& part) {
    return (spread.load() ? part.sum(0) : part.select(0, 0)).to(x.scalar_type());
  };
  at::Tensor dw = need_dw ? finish(dw_part) : at::empty({0}, x.options());
  at::Tensor db = need_db ? finish(db_part) : at::empty({0}, x.options());
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                const c10::optional<at::Tensor>& grad_residual, bool need_dw) {
  auto out = norm_bwd(dy, x, weight, c10::nullopt, rstd, grad_residual, need_dw, false);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool need_dw, bool need_db) {
  auto out = norm_bwd(dy, x, weight, mean, rstd, c10::nullopt, need_dw, need_db);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------------------------------------
// group_norm: x viewed as (N * G, D, S) blocks (one per sample and group: D = C / G channels of S spatial
// elements each, the block contiguous, any stride between blocks). Per block: mean and rstd over its D * S
// elements, then per channel c (weight w, bias b): z = (x - mean) * rstd * w_c + b_c, y = z or silu(z).
// Backward, with dz = dy (or dy * silu'(z)), g = dz * w and xhat = (x - mean) * rstd:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the block;  dw_c = sum_{n,s} dz * xhat;  db_c = sum dz
// The block sums come from per-channel sums (sum_s dz, sum_s dz * (x - mean)), which are also the (n, c) terms of
// dw and db: they go to an (N, C) buffer summed over N at the end, so no per-thread partial rows are needed.
// Unlike the row norms' 16-bit rows, a block is not prefetched ahead: a block is tens of KiB, and its hundreds of
// prefetches issued at once stalled the passes (timed slower in both dtypes, both directions). Where x and the
// output outgrow the last-level cache, y and dx are stored around it (stream_outputs).
// ---------------------------------------------------------------------------------------------------------
inline void check_blocks(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D (N * groups, channels per group, spatial), got ", t.dim(), "-D");
  TORCH_CHECK((t.stride(2) == 1 || t.size(2) <= 1) && (t.stride(1) == t.size(2) || t.size(1) <= 1), name,
              " must have contiguous (channels per group, spatial) blocks");
}

// z * sigmoid(z) with vec.h's fsigmoid (its reciprocal estimate and Newton step, not a vector division: the
// division would be most of a 16-bit forward's time).
template <typename V>
inline V silu_vec(const V& z) {
  return z * fsigmoid(z);
}

template <typename A>
inline A silu_scalar(A z) {
  return z / (A(1) + std::exp(-z));
}

// The block kernels read x (and dy) in their own dtype on every pass: a 16-bit block of a few thousand elements
// stays in L1 between passes, where a float copy of it (twice the bytes) would not; a vector's widening is one
// shift. Sums are cascaded in chunks of kChunk elements added to a double, as row_sum / row_moments do.

// sum(x - c) and, unless SUM_ONLY, sum((x - c)^2) over n elements of T, in the accumulation type A.
template <bool SUM_ONLY, typename T, typename A>
std::pair<double, double> block_moments(const T* x, int64_t n, A c) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vc(c);
  double s = 0, q = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t stop = std::min(n, start + kChunk);
    Vec s0(0), s1(0), q0(0), q1(0);
    int64_t i = start;
    for (; i + 2 * K <= stop; i += 2 * K) {
      auto [a, b] = load2(x + i);
      a = a - vc;
      b = b - vc;
      s0 = s0 + a;
      s1 = s1 + b;
      if constexpr (!SUM_ONLY) {
        q0 = at::vec::fmadd(a, a, q0);
        q1 = at::vec::fmadd(b, b, q1);
      }
    }
    A cs = hsum(s0 + s1), cq = SUM_ONLY ? A(0) : hsum(q0 + q1);
    for (; i < stop; ++i) {
      const A v = static_cast<A>(x[i]) - c;
      cs += v;
      cq += v * v;
    }
    s += cs;
    q += cq;
  }
  return {s, q};
}

// y[0, S) = act((x - mean) * scale + shift) for one channel of a block.
template <bool SILU, typename T, typename A>
void channel_normalize(const T* x, T* y, int64_t S, A mean, A scale, A shift, bool stream = false) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vs(scale), vb(shift);
  auto act = [&](const Vec& v) {
    Vec z = at::vec::fmadd(v - vm, vs, vb);
    if constexpr (SILU) z = silu_vec(z);
    return z;
  };
  int64_t i = 0;
  if (stream) {
    for (; i + 2 * K <= S; i += 2 * K) {
      auto [a, b] = load2(x + i);
      store_out(y + i, act(a), K, true);
      store_out(y + i + K, act(b), K, true);
    }
  } else {
    for (; i + 2 * K <= S; i += 2 * K) {
      auto [a, b] = load2(x + i);
      store2(y + i, act(a), act(b));
    }
  }
  for (; i < S; ++i) {
    A z = (static_cast<A>(x[i]) - mean) * scale + shift;
    if constexpr (SILU) z = silu_scalar(z);
    y[i] = static_cast<T>(z);
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// A 16-bit forward's normalize pass is bound by its arithmetic, not by memory: per vector, the exp, the reciprocal's
// Newton step and the software rounding to bfloat16 (an integer sequence) cost several times the load and store. A
// 16-bit result needs less: vec.h's exp_float (about twelve operations on AVX-512), the reciprocal's 14-bit estimate
// alone (far below a float16's half ulp, 2^-11), and on a CPU with AVX512-BF16 the rounding to bfloat16 in one
// instruction (vcvtne2ps2bf16: round to nearest even, as torch's).
// silu(z) = z * sigmoid(z) to 16-bit precision (the reciprocal estimate; sigmoid(+inf) = 1 exactly, sigmoid(-inf) = 0)
inline __m512 silu16(__m512 z) {
  const __m512 e = exp_float(Vectorized<float>(z).neg());
  return _mm512_mul_ps(z, _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.f), e)));
}

// channel_normalize for 16-bit T; the tail as channel_normalize's.
template <bool SILU, typename T>
inline void channel_normalize16_tail(const T* x, T* y, int64_t i, int64_t S, float mean, float scale, float shift) {
  for (; i < S; ++i) {
    float z = (static_cast<float>(x[i]) - mean) * scale + shift;
    if constexpr (SILU) z = silu_scalar(z);
    y[i] = static_cast<T>(z);
  }
}

template <bool SILU, typename T>
void channel_normalize16(const T* x, T* y, int64_t S, float mean, float scale, float shift) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    using Vec = Vectorized<float>;
    constexpr int64_t K = Vec::size();
    const __m512 vm = _mm512_set1_ps(mean), vs = _mm512_set1_ps(scale), vb = _mm512_set1_ps(shift);
    int64_t i = 0;
    for (; i + 2 * K <= S; i += 2 * K) {
      auto [a, b] = load2(x + i);
      __m512 za = _mm512_fmadd_ps(_mm512_sub_ps(a, vm), vs, vb), zb = _mm512_fmadd_ps(_mm512_sub_ps(b, vm), vs, vb);
      if constexpr (SILU) za = silu16(za), zb = silu16(zb);
      store2(y + i, Vec(za), Vec(zb));
    }
    channel_normalize16_tail<SILU>(x, y, i, S, mean, scale, shift);
  }
}

// The same for bfloat16 on a CPU with AVX512-BF16 (called only where cpu::features().avx512_bf16 holds): the
// rounding in vcvtne2ps2bf16, which must sit in this function's own body (its target attribute), not a lambda's.
template <bool SILU>
TRITIUM_BF16_DOT void channel_normalize_bf16ins(const c10::BFloat16* x, c10::BFloat16* y, int64_t S, float mean,
                                                float scale, float shift) {
  constexpr int64_t K = Vectorized<float>::size();
  const __m512 vm = _mm512_set1_ps(mean), vs = _mm512_set1_ps(scale), vb = _mm512_set1_ps(shift);
  int64_t i = 0;
  for (; i + 2 * K <= S; i += 2 * K) {
    auto [a, b] = load2(x + i);
    __m512 za = _mm512_fmadd_ps(_mm512_sub_ps(a, vm), vs, vb), zb = _mm512_fmadd_ps(_mm512_sub_ps(b, vm), vs, vb);
    if constexpr (SILU) za = silu16(za), zb = silu16(zb);
    store2_bf16ins(y + i, za, zb, false);
  }
  channel_normalize16_tail<SILU>(x, y, i, S, mean, scale, shift);
}
#endif

// Small spatial sizes: with S under a few vectors the per-channel loops above would run mostly in their scalar
// tails (all of it at 4x4 and 2x2 maps), so a block is taken as one run of M = D * S elements instead, each
// element's channel weight and bias read from (C, S)-expanded copies (we, be: built once per call, C * S values).
template <typename A>
inline bool flat_blocks(int64_t S) {
  return S > 0 && S < 4 * int64_t(Vectorized<A>::size());
}

// (C, S): v[c] (or fill without v) repeated over the S positions of channel c.
template <typename A>
std::vector<A> expand_channels(const A* v, A fill, int64_t C, int64_t S) {
  std::vector<A> out(C * S);
  for (int64_t c = 0; c < C; ++c) std::fill(out.begin() + c * S, out.begin() + (c + 1) * S, v ? v[c] : fill);
  return out;
}

// y[0, M) = act((x - mean) * (rstd * we) + be) over one block.
template <bool SILU, typename T, typename A>
void block_normalize(const T* x, T* y, int64_t M, A mean, A rstd, const A* we, const A* be) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vr(rstd);
  auto act = [&](const Vec& v, const Vec& w, const Vec& b) {
    Vec z = at::vec::fmadd(v - vm, vr * w, b);
    if constexpr (SILU) z = silu_vec(z);
    return z;
  };
  int64_t i = 0;
  for (; i + 2 * K <= M; i += 2 * K) {
    auto [a, b] = load2(x + i);
    auto [w0, w1] = load2(we + i);
    auto [b0, b1] = load2(be + i);
    store2(y + i, act(a, w0, b0), act(b, w1, b1));
  }
  for (; i < M; ++i) {
    A z = (static_cast<A>(x[i]) - mean) * (rstd * we[i]) + be[i];
    if constexpr (SILU) z = silu_scalar(z);
    y[i] = static_cast<T>(z);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t num_groups, double eps, bool silu) {
  check_blocks(x, "input");
  const int64_t R = x.size(0), D = x.size(1), S = x.size(2), M = D * S, G = num_groups;
  TORCH_CHECK(G > 0 && R % G == 0, "group_norm_fwd: the block count ", R, " must be a multiple of num_groups ", G);
  auto y = empty({R, D, S}, x.options());
  auto stat_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto mean = tritium::empty({R}, stat_opts), rstd = tritium::empty({R}, stat_opts);
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_group_norm_fwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = opt_ptr<scalar_t>(weight);
    const scalar_t* bp = opt_ptr<scalar_t>(bias);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    A* mean_p = mean.mutable_data_ptr<A>();
    A* rstd_p = rstd.mutable_data_ptr<A>();
    const int64_t sx = x.stride(0), C = G * D;
    const bool flat = flat_blocks<A>(S);
    // y written around the cache where x and y outgrow it (stream_outputs)
    const bool nt = stream_outputs(2 * R * M * x.element_size());
    [[maybe_unused]] const bool bf16_ins = cpu::features().avx512_bf16;
    std::vector<A> wexp, bexp;
    if (flat) {
      std::vector<A> wbuf, bbuf;
      wexp = expand_channels<A>(wp ? as_acc(wp, C, wbuf) : nullptr, A(1), C, S);
      bexp = expand_channels<A>(bp ? as_acc(bp, C, bbuf) : nullptr, A(0), C, S);
    }
    at::parallel_for(0, R, row_grain(M), [&](int64_t begin, int64_t end) {
      std::vector<A> wbuf, bbuf;
      const A* wf = wp ? as_acc(wp, C, wbuf) : nullptr;
      const A* bf = bp ? as_acc(bp, C, bbuf) : nullptr;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * sx;
        // the variance about the block's mean, as the layer norm takes it (no cancellation)
        const A c = static_cast<A>(block_moments<true>(xr, M, A(0)).first / M);
        auto [s, q] = block_moments<false>(xr, M, c);
        const double d = s / M;
        const A mu = static_cast<A>(c + d);
        const A rs = A(1) / std::sqrt(static_cast<A>(std::max(q / M - d * d, 0.0)) + static_cast<A>(eps));
        mean_p[r] = mu;
        rstd_p[r] = rs;
        const int64_t ch0 = (r % G) * D;
        scalar_t* yr = yp + r * M;
        if (flat) {
          const A* we = wexp.data() + ch0 * S;
          const A* be = bexp.data() + ch0 * S;
          if (silu) {
            block_normalize<true>(xr, yr, M, mu, rs, we, be);
          } else {
            block_normalize<false>(xr, yr, M, mu, rs, we, be);
          }
          continue;
        }
        for (int64_t j = 0; j < D; ++j) {
          const A scale = wf ? rs * wf[ch0 + j] : rs, shift = bf ? bf[ch0 + j] : A(0);
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
          if constexpr (!std::is_same_v<scalar_t, A>) {  // 16-bit: the arithmetic-light pass above
            if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
              if (bf16_ins) {
                if (silu) {
                  channel_normalize_bf16ins<true>(reinterpret_cast<const c10::BFloat16*>(xr + j * S),
                                                  reinterpret_cast<c10::BFloat16*>(yr + j * S), S, mu, scale, shift);
                } else {
                  channel_normalize_bf16ins<false>(reinterpret_cast<const c10::BFloat16*>(xr + j * S),
                                                   reinterpret_cast<c10::BFloat16*>(yr + j * S), S, mu, scale, shift);
                }
                continue;
              }
            }
            if (silu) {
              channel_normalize16<true>(xr + j * S, yr + j * S, S, mu, scale, shift);
            } else {
              channel_normalize16<false>(xr + j * S, yr + j * S, S, mu, scale, shift);
            }
            continue;
          }
#endif
          if (silu) {
            channel_normalize<true>(xr + j * S, yr + j * S, S, mu, scale, shift, nt);
          } else {
            channel_normalize<false>(xr + j * S, yr + j * S, S, mu, scale, shift, nt);
          }
        }
      }
      if (nt) stream_fence();
    });
  });
  return {y, mean, rstd};
}

// Pass 1 over one channel: (sum_s dz, sum_s dz * (x - mean)); with SILU dz = dy * silu'(z) is written to dz_out
// (pass 2 reads it instead of recomputing the exp).
template <bool SILU, typename T, typename A>
std::pair<A, A> channel_grad_sums(const T* dy, const T* x, A* dz_out, int64_t S, A mean, A scale, A shift) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vs(scale), vb(shift), one(1);
  Vec sa0(0), sb0(0), sa1(0), sb1(0);
  auto step = [&](Vec dz, const Vec& xv, int64_t at, Vec& sa, Vec& sb) {
    const Vec xc = xv - vm;
    if constexpr (SILU) {
      const Vec z = at::vec::fmadd(xc, vs, vb);
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
      // 16-bit: the gradient goes out in 16 bits, so sigmoid to silu16's precision (the reciprocal estimate)
      Vec sg;
      if constexpr (!std::is_same_v<T, A>) {
        sg = _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.f), exp_float(z.neg())));
      } else {
        sg = fsigmoid(z);
      }
#else
      const Vec sg = fsigmoid(z);
#endif
      dz = dz * sg * at::vec::fmadd(z, one - sg, one);
      dz.store(dz_out + at);
    }
    sa = sa + dz;
    sb = at::vec::fmadd(dz, xc, sb);
  };
  int64_t i = 0;
  for (; i + 2 * K <= S; i += 2 * K) {
    auto [d0, d1] = load2(dy + i);
    auto [x0, x1] = load2(x + i);
    step(d0, x0, i, sa0, sb0);
    step(d1, x1, i + K, sa1, sb1);
  }
  A a = hsum(sa0 + sa1), b = hsum(sb0 + sb1);
  for (; i < S; ++i) {
    const A xc = static_cast<A>(x[i]) - mean;
    A dz = static_cast<A>(dy[i]);
    if constexpr (SILU) {
      const A z = xc * scale + shift, sg = A(1) / (A(1) + std::exp(-z));
      dz = dz * sg * (A(1) + z * (A(1) - sg));
      dz_out[i] = dz;
    }
    a += dz;
    b += dz * xc;
  }
  return {a, b};
}

// Pass 2 over one channel: dx = dz * p + (x - mean) * q + o; dz is dy (T) or the SiLU pass's float buffer.
template <typename T, typename Z, typename A>
void channel_dx(const Z* dz, const T* x, T* dx, int64_t S, A mean, A p, A q, A o, bool stream = false) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vp(p), vq(q), vo(o);
  auto one = [&](const Vec& d, const Vec& xv) { return at::vec::fmadd(d, vp, at::vec::fmadd(xv - vm, vq, vo)); };
  int64_t i = 0;
  if (stream) {
    for (; i + 2 * K <= S; i += 2 * K) {
      auto [d0, d1] = load2(dz + i);
      auto [x0, x1] = load2(x + i);
      store_out(dx + i, one(d0, x0), K, true);
      store_out(dx + i + K, one(d1, x1), K, true);
    }
  } else {
    for (; i + 2 * K <= S; i += 2 * K) {
      auto [d0, d1] = load2(dz + i);
      auto [x0, x1] = load2(x + i);
      store2(dx + i, one(d0, x0), one(d1, x1));
    }
  }
  for (; i < S; ++i) dx[i] = static_cast<T>(static_cast<A>(dz[i]) * p + ((static_cast<A>(x[i]) - mean) * q + o));
}

// The flat path's pass 1 over one block (see flat_blocks): dz = dy (or dy * silu'(z)) into dz_out and
// dz * (x - mean) into gx_out, for the per-channel sums that follow.
template <bool SILU, typename T, typename A>
void block_grad(const T* dy, const T* x, A* dz_out, A* gx_out, int64_t M, A mean, A rstd, const A* we,
                const A* be) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vr(rstd), one(1);
  auto step = [&](Vec dz, const Vec& xv, int64_t at) {
    const Vec xc = xv - vm;
    if constexpr (SILU) {
      const Vec z = at::vec::fmadd(xc, vr * Vec::loadu(we + at), Vec::loadu(be + at)), sg = fsigmoid(z);
      dz = dz * sg * at::vec::fmadd(z, one - sg, one);
    }
    dz.store(dz_out + at);
    (dz * xc).store(gx_out + at);
  };
  int64_t i = 0;
  for (; i + 2 * K <= M; i += 2 * K) {
    auto [d0, d1] = load2(dy + i);
    auto [x0, x1] = load2(x + i);
    step(d0, x0, i);
    step(d1, x1, i + K);
  }
  for (; i < M; ++i) {
    const A xc = static_cast<A>(x[i]) - mean;
    A dz = static_cast<A>(dy[i]);
    if constexpr (SILU) {
      const A z = xc * (rstd * we[i]) + be[i], sg = A(1) / (A(1) + std::exp(-z));
      dz = dz * sg * (A(1) + z * (A(1) - sg));
    }
    dz_out[i] = dz;
    gx_out[i] = dz * xc;
  }
}

// The flat path's pass 2: dx = dz * (rstd * we) + (x - mean) * q + o over one block.
template <typename T, typename A>
void block_dx(const A* dz, const T* x, T* dx, int64_t M, A mean, A rstd, const A* we, A q, A o) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(mean), vr(rstd), vq(q), vo(o);
  auto one = [&](const Vec& d, const Vec& xv, const Vec& w) {
    return at::vec::fmadd(d, vr * w, at::vec::fmadd(xv - vm, vq, vo));
  };
  int64_t i = 0;
  for (; i + 2 * K <= M; i += 2 * K) {
    auto [d0, d1] = load2(dz + i);
    auto [x0, x1] = load2(x + i);
    auto [w0, w1] = load2(we + i);
    store2(dx + i, one(d0, x0, w0), one(d1, x1, w1));
  }
  for (; i < M; ++i) {
    dx[i] = static_cast<T>(dz[i] * (rstd * we[i]) + ((static_cast<A>(x[i]) - mean) * q + o));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool need_dw, bool need_db) {
  check_blocks(dy, "grad_output");
  check_blocks(x, "input");
  const int64_t R = x.size(0), D = x.size(1), S = x.size(2), M = D * S, G = num_groups;
  TORCH_CHECK(G > 0 && R % G == 0, "group_norm_bwd: the block count ", R, " must be a multiple of num_groups ", G);
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_bwd: grad_output must have the input's shape");
  const int64_t N = R / G, C = G * D;
  need_dw = need_dw && weight.has_value();
  auto dx = empty({R, D, S}, x.options());
  auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  // (n, c) terms of dw and db, each written once (the sum over n follows)
  auto dw_part = need_dw ? at::empty({N, C}, acc_opts) : at::Tensor();
  auto db_part = need_db ? at::empty({N, C}, acc_opts) : at::Tensor();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_group_norm_bwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = opt_ptr<scalar_t>(weight);
    const scalar_t* bp = opt_ptr<scalar_t>(bias);
    const A* mp = mean.const_data_ptr<A>();
    const A* rp = rstd.const_data_ptr<A>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    A* dwp = need_dw ? dw_part.mutable_data_ptr<A>() : nullptr;
    A* dbp = need_db ? db_part.mutable_data_ptr<A>() : nullptr;
    const int64_t sdy = dy.stride(0), sx = x.stride(0);
    const bool flat = flat_blocks<A>(S);
    const bool nt = stream_outputs(3 * R * M * x.element_size());  // dx around the cache, as the forward's y
    std::vector<A> wexp, bexp;
    if (flat) {
      std::vector<A> wbuf, bbuf;
      wexp = expand_channels<A>(wp ? as_acc(wp, C, wbuf) : nullptr, A(1), C, S);
      bexp = expand_channels<A>(bp ? as_acc(bp, C, bbuf) : nullptr, A(0), C, S);
    }
    at::parallel_for(0, R, row_grain(M), [&](int64_t begin, int64_t end) {
      std::vector<A> wbuf, bbuf, dzbuf(silu || flat ? M : 0), gxbuf(flat ? M : 0);
      const A* wf = wp ? as_acc(wp, C, wbuf) : nullptr;
      const A* bf = bp ? as_acc(bp, C, bbuf) : nullptr;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* dyr = dyp + r * sdy;
        const scalar_t* xr = xp + r * sx;
        const A mu = mp[r], rs = rp[r];
        const int64_t n = r / G, ch0 = (r % G) * D;
        scalar_t* dxr = dxp + r * M;
        if (flat) {
          const A* we = wexp.data() + ch0 * S;
          if (silu) {
            block_grad<true>(dyr, xr, dzbuf.data(), gxbuf.data(), M, mu, rs, we, bexp.data() + ch0 * S);
          } else {
            block_grad<false>(dyr, xr, dzbuf.data(), gxbuf.data(), M, mu, rs, we, bexp.data() + ch0 * S);
          }
          double s_g = 0, s_gx = 0;
          for (int64_t j = 0; j < D; ++j) {
            A a = 0, b = 0;
            for (int64_t i = j * S; i < (j + 1) * S; ++i) {
              a += dzbuf[i];
              b += gxbuf[i];
            }
            const A w = we[j * S];
            s_g += double(w) * a;
            s_gx += double(w) * b;
            if (dwp) dwp[n * C + ch0 + j] = b * rs;
            if (dbp) dbp[n * C + ch0 + j] = a;
          }
          if (M == 1) {  // as below
            dxr[0] = scalar_t(0);
            continue;
          }
          const A c1 = static_cast<A>(s_g / M), c2 = static_cast<A>(s_gx * rs / M);
          block_dx(dzbuf.data(), xr, dxr, M, mu, rs, we, -rs * rs * c2, -rs * c1);
          continue;
        }
        // pass 1: per-channel sums, and from them sum(g) and sum(g * xhat) over the block
        double s_g = 0, s_gx = 0;
        for (int64_t j = 0; j < D; ++j) {
          const A w = wf ? wf[ch0 + j] : A(1);
          const A scale = rs * w, shift = bf ? bf[ch0 + j] : A(0);
          auto [a, b] = silu ? channel_grad_sums<true>(dyr + j * S, xr + j * S, dzbuf.data() + j * S, S, mu, scale,
                                                       shift)
                             : channel_grad_sums<false>(dyr + j * S, xr + j * S, static_cast<A*>(nullptr), S, mu,
                                                        scale, shift);
          s_g += double(w) * a;
          s_gx += double(w) * b;
          if (dwp) dwp[n * C + ch0 + j] = b * rs;
          if (dbp) dbp[n * C + ch0 + j] = a;
        }
        if (M == 1) {  // one element: y = b whatever x, so dx = 0 exactly (as the layer norm's one-element rows)
          dxr[0] = scalar_t(0);
          continue;
        }
        // pass 2: dx = rstd * (w * dz - c1 - (x - mean) * rstd * c2)
        const A c1 = static_cast<A>(s_g / M), c2 = static_cast<A>(s_gx * rs / M);
        const A q = -rs * rs * c2, o = -rs * c1;
        for (int64_t j = 0; j < D; ++j) {
          const A p = wf ? rs * wf[ch0 + j] : rs;
          if (silu) {
            channel_dx(dzbuf.data() + j * S, xr + j * S, dxr + j * S, S, mu, p, q, o, nt);
          } else {
            channel_dx(dyr + j * S, xr + j * S, dxr + j * S, S, mu, p, q, o, nt);
          }
        }
      }
      if (nt) stream_fence();
    });
  });
  auto finish = [&](const at::Tensor& part) { return part.sum(0).to(x.scalar_type()); };
  at::Tensor dw = need_dw ? finish(dw_part) : at::empty({0}, x.options());
  at::Tensor db = need_db ? finish(db_part) : at::empty({0}, x.options());
  return {dx, dw, db};
}

// `tritium info`: how the forwards round a bfloat16 output (the row norms' normalize pass, group_norm's)
const bool kPathsReported = cpu::register_paths([] {
  return std::vector<std::pair<std::string, std::string>>{{"norms.bfloat16_output", bf16_output_path()}};
});

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("fused_add_rms_norm_fwd", &fused_add_rms_norm_fwd);
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("group_norm_fwd", &group_norm_fwd);
  m.impl("group_norm_bwd", &group_norm_bwd);
}

}  // namespace tritium
