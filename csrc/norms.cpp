// RMSNorm and LayerNorm CPU kernels (forward and backward), registered for the CPU key of the tritium ops
// whose schemas python/tritium/ops/norms.py defines.
//
// Rows are independent: at::parallel_for splits rows across threads; each row is read once from memory (its
// second and third reads come from L1/L2, a 4096-wide float row being 16 KiB) and written once.
// Statistics (rstd, mean) are kept in the accumulation type (float for 16-bit inputs, double for double).
#include "vec.h"

namespace tritium {
namespace {

template <typename T>
using acc_of = typename VecIO<T>::acc_t;

template <typename T>
inline acc_of<T> reduce(const typename VecIO<T>::Vec& v) {
  using Vec = typename VecIO<T>::Vec;
  return at::vec::vec_reduce_all<acc_of<T>>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Row reductions are cascaded: vector accumulators over chunks of kChunk elements, each chunk's sum added to a
// double. A 65536-wide float row then sums with the error of a 1024-element sum, not of a 4096-term lane sum.
constexpr int64_t kChunk = 1024;

// (sum(x - c), sum((x - c)^2)) over a row in one pass (SQUARES_ONLY: the first is not computed). With the
// shift c = x[0] the variance sum((x-c)^2)/n - (sum(x-c)/n)^2 does not suffer the cancellation of the
// unshifted formula when the mean is large against the spread (rows after a residual stream has drifted).
template <bool SQUARES_ONLY, typename T>
std::pair<double, double> row_moments(const T* x, int64_t n, acc_of<T> c) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec vc(c);
  double s = 0, q = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t stop = std::min(n, start + kChunk);
    Vec s0(0), s1(0), q0(0), q1(0);
    int64_t i = start;
    for (; i + 2 * K <= stop; i += 2 * K) {
      Vec v0 = IO::load(x + i) - vc, v1 = IO::load(x + i + K) - vc;
      if (!SQUARES_ONLY) {
        s0 = s0 + v0;
        s1 = s1 + v1;
      }
      q0 = at::vec::fmadd(v0, v0, q0);
      q1 = at::vec::fmadd(v1, v1, q1);
    }
    for (; i + K <= stop; i += K) {
      Vec v = IO::load(x + i) - vc;
      if (!SQUARES_ONLY) s0 = s0 + v;
      q0 = at::vec::fmadd(v, v, q0);
    }
    acc_of<T> cs = SQUARES_ONLY ? acc_of<T>(0) : reduce<T>(s0 + s1), cq = reduce<T>(q0 + q1);
    for (; i < stop; ++i) {
      acc_of<T> v = static_cast<acc_of<T>>(x[i]) - c;
      cs += v;
      cq += v * v;
    }
    s += cs;
    q += cq;
  }
  return {s, q};
}

// y = (x - mean) * rstd * w + b, with w and b optional (nullptr)
template <typename T>
void row_normalize(const T* x, T* y, const T* w, const T* b, int64_t n, acc_of<T> mean, acc_of<T> rstd) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec vm(mean), vr(rstd);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    Vec v = (IO::load(x + i) - vm) * vr;
    if (w) v = v * IO::load(w + i);
    if (b) v = v + IO::load(b + i);
    IO::store(y + i, v);
  }
  for (; i < n; ++i) {
    acc_of<T> v = (static_cast<acc_of<T>>(x[i]) - mean) * rstd;
    if (w) v *= static_cast<acc_of<T>>(w[i]);
    if (b) v += static_cast<acc_of<T>>(b[i]);
    y[i] = static_cast<T>(v);
  }
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
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty({M, N}, x.options());
  auto h = residual.has_value() ? empty({M, N}, x.options()) : at::Tensor();
  auto stat_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto rstd = at::empty({M}, stat_opts);
  auto mean = centered ? at::empty({M}, stat_opts) : at::Tensor();
  if (residual.has_value()) check_rows(*residual, "residual");
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_norm_fwd", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = opt_ptr<scalar_t>(residual);
    const scalar_t* wp = opt_ptr<scalar_t>(weight);
    const scalar_t* bp = opt_ptr<scalar_t>(bias);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* hp = rp ? h.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* rstd_p = rstd.mutable_data_ptr<acc_t>();
    acc_t* mean_p = centered ? mean.mutable_data_ptr<acc_t>() : nullptr;
    const int64_t sx = x.stride(0), sr = rp ? residual->stride(0) : 0;
    at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
      using IO = VecIO<scalar_t>;
      constexpr int64_t K = IO::kSize;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * sx;
        if (rp) {  // h = x + residual, rounded to the input dtype as the unfused add would be
          const scalar_t* rr = rp + r * sr;
          scalar_t* hr = hp + r * N;
          int64_t i = 0;
          for (; i + K <= N; i += K) IO::store(hr + i, IO::load(xr + i) + IO::load(rr + i));
          for (; i < N; ++i) hr[i] = static_cast<scalar_t>(static_cast<acc_t>(xr[i]) + static_cast<acc_t>(rr[i]));
          xr = hr;
        }
        acc_t mu = 0, var;
        if (centered) {
          const acc_t shift = static_cast<acc_t>(xr[0]);
          auto [s, q] = row_moments<false>(xr, N, shift);
          const double d = s / N;
          mu = static_cast<acc_t>(shift + d);
          var = static_cast<acc_t>(std::max(q / N - d * d, 0.0));
        } else {
          var = static_cast<acc_t>(row_moments<true>(xr, N, acc_t(0)).second / N);
        }
        acc_t rs = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        rstd_p[r] = rs;
        if (centered) mean_p[r] = mu;
        row_normalize(xr, yp + r * N, wp, bp, N, mu, rs);
      }
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
  const int64_t M = x.size(0), N = x.size(1);
  const bool centered = mean.has_value();
  need_dw = need_dw && weight.has_value();
  auto dx = empty({M, N}, x.options());
  const int64_t T = at::get_num_threads();
  auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto dw_part = need_dw ? at::zeros({T, N}, acc_opts) : at::Tensor();
  auto db_part = need_db ? at::zeros({T, N}, acc_opts) : at::Tensor();
  if (grad_residual.has_value()) check_rows(*grad_residual, "grad_residual");
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_norm_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = opt_ptr<scalar_t>(weight);
    const scalar_t* grp = opt_ptr<scalar_t>(grad_residual);
    const acc_t* mp = centered ? mean->const_data_ptr<acc_t>() : nullptr;
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    acc_t* dwp = need_dw ? dw_part.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* dbp = need_db ? db_part.mutable_data_ptr<acc_t>() : nullptr;
    const int64_t sdy = dy.stride(0), sx = x.stride(0), sgr = grp ? grad_residual->stride(0) : 0;
    at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      acc_t* dw_t = dwp ? dwp + tid * N : nullptr;
      acc_t* db_t = dbp ? dbp + tid * N : nullptr;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* dyr = dyp + r * sdy;
        const scalar_t* xr = xp + r * sx;
        const acc_t mu = mp ? mp[r] : acc_t(0), rs = rp[r];
        const Vec vmu(mu), vrs(rs);
        // pass 1: sum(g) and sum(g * xhat), accumulating dw/db on the way
        Vec sg(0), sgx(0);
        int64_t i = 0;
        for (; i + K <= N; i += K) {
          Vec d = IO::load(dyr + i), xh = (IO::load(xr + i) - vmu) * vrs;
          Vec g = wp ? d * IO::load(wp + i) : d;
          sg = sg + g;
          sgx = at::vec::fmadd(g, xh, sgx);
          if (dw_t) at::vec::fmadd(d, xh, Vec::loadu(dw_t + i)).store(dw_t + i);
          if (db_t) (Vec::loadu(db_t + i) + d).store(db_t + i);
        }
        acc_t s_g = reduce<scalar_t>(sg), s_gx = reduce<scalar_t>(sgx);
        for (int64_t j = i; j < N; ++j) {
          acc_t d = static_cast<acc_t>(dyr[j]), xh = (static_cast<acc_t>(xr[j]) - mu) * rs;
          acc_t g = wp ? d * static_cast<acc_t>(wp[j]) : d;
          s_g += g;
          s_gx += g * xh;
          if (dw_t) dw_t[j] += d * xh;
          if (db_t) db_t[j] += d;
        }
        const acc_t c1 = centered ? s_g / N : acc_t(0), c2 = s_gx / N;
        // pass 2: dx = rstd * (g - c1 - xhat * c2) (+ grad_residual)
        const Vec vc1(c1), vc2(c2);
        scalar_t* dxr = dxp + r * N;
        const scalar_t* grr = grp ? grp + r * sgr : nullptr;
        for (i = 0; i + K <= N; i += K) {
          Vec d = IO::load(dyr + i), xh = (IO::load(xr + i) - vmu) * vrs;
          Vec g = wp ? d * IO::load(wp + i) : d;
          Vec out = (g - vc1 - xh * vc2) * vrs;
          if (grr) out = out + IO::load(grr + i);
          IO::store(dxr + i, out);
        }
        for (; i < N; ++i) {
          acc_t d = static_cast<acc_t>(dyr[i]), xh = (static_cast<acc_t>(xr[i]) - mu) * rs;
          acc_t g = wp ? d * static_cast<acc_t>(wp[i]) : d;
          acc_t out = (g - c1 - xh * c2) * rs;
          if (grr) out += static_cast<acc_t>(grr[i]);
          dxr[i] = static_cast<scalar_t>(out);
        }
      }
    });
  });
  auto finish = [&](const at::Tensor& part) { return part.sum(0).to(x.scalar_type()); };
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

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("fused_add_rms_norm_fwd", &fused_add_rms_norm_fwd);
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace tritium
