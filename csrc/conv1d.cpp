// Mamba's causal depthwise conv1d CPU kernels (forward, backward, the decoding update), registered for the CPU key
// of the tritium ops whose schemas python/tritium/ops/conv1d.py defines.
//
// x: (batch, dim, L) with L contiguous, weight (dim, W), bias (dim,), initial_states (batch, dim, W - 1). With xp the
// row x padded on the left by its initial states (zeros without them), xp[j] = x[j - (W - 1)]:
//   z[t]   = bias + sum_k w[k] xp[t + k],  out[t] = z[t] (silu: z[t] sigmoid(z[t]))            t in [0, L)
// backward, dz[t] = dout[t] (silu: dout[t] s (1 + z (1 - s)), s = sigmoid(z[t]), z recomputed):
//   dxp[u] = sum_k w[k] dz[u - k]   (dx = dxp[W - 1 ..], d initial_states = dxp[.. W - 1])
//   dw[k]  = sum_{batch, t} dz[t] xp[t + k],  dbias = sum_{batch, t} dz[t]
// Rows (batch, channel) are independent: at::parallel_for over rows, each row vectorised along L and worked in
// chunks of kChunk positions through per-thread buffers in the accumulation type (float for 16-bit inputs, double
// for double): the padded input window (converted once) and dz. dw / dbias: one partial per row (its own slots,
// no races), summed over the batch afterwards.
//
// The update (decoding): per row the window win = [conv_state (state_len), x (seqlen)] in the accumulation type;
// out[t] = bias + sum_k w[k] win[state_len + t - (W - 1) + k]; conv_state becomes win's last state_len entries.
#include <cstring>

#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kMaxWidth = 8;   // the widths the kernels take (Mamba: 4); the public function checks it
constexpr int64_t kChunk = 2048;   // positions per pass over a row: its buffers (8-16 KB) stay in L1/L2

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// dst[i] = xp at position p0 + i - (W - 1) of x, i in [0, n): the initial states (zeros without them) before
// position 0, x itself in [0, L), zeros from L on.
template <typename T, typename A>
inline void fill_window(const T* x, const T* init, int64_t W1, int64_t L, int64_t p0, int64_t n, A* dst) {
  int64_t i = 0;
  for (; i < n && p0 + i < 0; ++i) dst[i] = init ? static_cast<A>(init[p0 + i + W1]) : A(0);
  const int64_t stop = std::min(n, L - p0);
  if (stop > i) {
    to_acc(x + p0 + i, dst + i, stop - i);
    i = stop;
  }
  for (; i < n; ++i) dst[i] = A(0);
}

template <typename A>
inline A silu_scalar(A z) {
  return z / (A(1) + std::exp(-z));
}

// silu(z) = z / (1 + exp(-z)) for vectors. With AVX2 floats the division is the estimate 1 / (1 + exp(-z)) and one
// Newton step (within 2 float ulp): the division's latency and throughput otherwise bound the forward. Where the
// step gives NaN (an infinite denominator: z = -inf, inf * 0) the estimate's 0 stands, so silu(-inf) is NaN as
// torch's. AVX-512 and double: frcp / the division (vec.h).
template <typename V>
inline V silu_vec(const V& z) {
  const V d = V(1) + fexp(z.neg());
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    const __m256 r0 = _mm256_rcp_ps(d);
    const __m256 r1 = _mm256_fmadd_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(1.f)), r0);
    return z * V(_mm256_blendv_ps(r1, r0, _mm256_cmp_ps(r1, r1, _CMP_UNORD_Q)));
  }
#endif
  return z * frcp(d);
}

// The row's weights: WC > 0 a compile-time width (the unrolled loops of widths 2, 3, 4), 0 the runtime `width`.
template <int WC, typename A>
struct Taps {
  using Vec = Vectorized<A>;
  int64_t W;
  A w[kMaxWidth];
  Vec wv[kMaxWidth];
  Taps(const A* src, int64_t width) : W(WC > 0 ? WC : width) {
    for (int64_t k = 0; k < W; ++k) {
      w[k] = src[k];
      wv[k] = Vec(src[k]);
    }
  }
  int64_t width() const { return WC > 0 ? WC : W; }
  // bias + sum_k w[k] p[k] (p: the window at the output's first position), as a vector and a scalar
  Vec conv(const A* p, const Vec& vb) const {
    Vec acc = vb;
    for (int64_t k = 0; k < width(); ++k) acc = at::vec::fmadd(wv[k], Vec::loadu(p + k), acc);
    return acc;
  }
  A conv1(const A* p, A b) const {
    A acc = b;
    for (int64_t k = 0; k < width(); ++k) acc += w[k] * p[k];
    return acc;
  }
};

// ---------------------------------------------------------------------------------------------------------
// forward, one row
// ---------------------------------------------------------------------------------------------------------
template <int WC, typename T, typename A>
void fwd_row(const T* x, const T* init, T* out, const Taps<WC, A>& taps, A b, int64_t L, bool silu, A* buf) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const int64_t W1 = taps.width() - 1;
  const Vec vb(b);
  auto one = [&](const A* p) {
    Vec z = taps.conv(p, vb);
    return silu ? silu_vec(z) : z;
  };
  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t n = std::min(kChunk, L - c0);
    fill_window(x, init, W1, L, c0 - W1, n + W1, buf);
    T* o = out + c0;
    int64_t i = 0;
    for (; i + 2 * K <= n; i += 2 * K) store2(o + i, one(buf + i), one(buf + i + K));
    for (; i < n; ++i) {
      const A z = taps.conv1(buf + i, b);
      o[i] = static_cast<T>(silu ? silu_scalar(z) : z);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// backward, one row: dx (and d initial_states), and the row's dw[k] / dbias partial sums
// ---------------------------------------------------------------------------------------------------------
template <int WC, typename T, typename A>
void bwd_row(const T* dout, const T* x, const T* init, T* dx, T* dinit, const Taps<WC, A>& taps, A b, int64_t L,
             bool silu, A* xbuf, A* dzbuf, A* dw_row, A* db_row) {
  using IO = VecIO<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const int64_t W = taps.width(), W1 = W - 1;
  const Vec vb(b), one(1);
  Vec dwv[kMaxWidth], dbv(0);
  A dws[kMaxWidth], dbs = 0;
  for (int64_t k = 0; k < W; ++k) {
    dwv[k] = Vec(0);
    dws[k] = 0;
  }
  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t n = std::min(kChunk, L - c0);
    const int64_t nz = std::min(n + W1, L - c0);  // dz at positions [c0, c0 + nz): the chunk and W - 1 past it
    fill_window(x, init, W1, L, c0 - W1, nz + W1, xbuf);
    // dz (zeros past L, so that dx reads zeros there)
    const T* d = dout + c0;
    int64_t i = 0;
    for (; i + K <= nz; i += K) {
      Vec g = IO::load(d + i);
      if (silu) {
        const Vec z = taps.conv(xbuf + i, vb), s = fsigmoid(z);
        g = g * s * at::vec::fmadd(z, one - s, one);
      }
      g.store(dzbuf + i);
    }
    for (; i < nz; ++i) {
      A g = static_cast<A>(d[i]);
      if (silu) {
        const A z = taps.conv1(xbuf + i, b), s = A(1) / (A(1) + std::exp(-z));
        g = g * s * (A(1) + z * (A(1) - s));
      }
      dzbuf[i] = g;
    }
    for (; i < n + W1; ++i) dzbuf[i] = A(0);
    // dx[c0 + i] = sum_k w[k] dz[c0 + i + W1 - k]; dw[k] += dz[c0 + i] xp[c0 + i + k]; dbias += dz[c0 + i]
    T* o = dx + c0;
    auto dxv = [&](int64_t j) {
      Vec acc(0);
      for (int64_t k = 0; k < W; ++k) acc = at::vec::fmadd(taps.wv[k], Vec::loadu(dzbuf + j + W1 - k), acc);
      return acc;
    };
    auto sums = [&](int64_t j) {
      const Vec g = Vec::loadu(dzbuf + j);
      for (int64_t k = 0; k < W; ++k) dwv[k] = at::vec::fmadd(g, Vec::loadu(xbuf + j + k), dwv[k]);
      dbv = dbv + g;
    };
    for (i = 0; i + 2 * K <= n; i += 2 * K) {
      store2(o + i, dxv(i), dxv(i + K));
      sums(i);
      sums(i + K);
    }
    for (; i < n; ++i) {
      A acc = 0;
      for (int64_t k = 0; k < W; ++k) acc += taps.w[k] * dzbuf[i + W1 - k];
      o[i] = static_cast<T>(acc);
      const A g = dzbuf[i];
      for (int64_t k = 0; k < W; ++k) dws[k] += g * xbuf[i + k];
      dbs += g;
    }
    if (c0 == 0 && dinit) {  // d initial_states[j] = dxp[j] = sum_{k <= j} w[k] dz[j - k]
      for (int64_t j = 0; j < W1; ++j) {
        A acc = 0;
        for (int64_t k = 0; k <= j; ++k) acc += taps.w[k] * dzbuf[j - k];
        dinit[j] = static_cast<T>(acc);
      }
    }
  }
  for (int64_t k = 0; k < W; ++k) dw_row[k] = hsum(dwv[k]) + dws[k];
  *db_row = hsum(dbv) + dbs;
}

// ---------------------------------------------------------------------------------------------------------
// argument checks (the public function validated them; these guard direct op calls) and width dispatch
// ---------------------------------------------------------------------------------------------------------
void check_rows3(const at::Tensor& t, const char* name, int64_t B, int64_t D, int64_t n) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == D && t.size(2) == n, "causal_conv1d: ", name,
              " must be (", B, ", ", D, ", ", n, "), got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || n <= 1, "causal_conv1d: ", name, " must have a contiguous last dimension");
}

void check_params(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be (batch, dim, seqlen), got ", x.sizes());
  const int64_t D = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == D && weight.size(1) >= 1 && weight.size(1) <= kMaxWidth &&
                  weight.is_contiguous(),
              "causal_conv1d: weight must be a contiguous (", D, ", width <= ", kMaxWidth, ") tensor, got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "causal_conv1d: weight must have x's dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == D && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "causal_conv1d: bias must be a contiguous (", D, ",) tensor of x's dtype");
  }
}

// f(std::integral_constant<int, WC>) with WC the width for 2, 3, 4 and 0 (runtime) otherwise
template <typename F>
void by_width(int64_t width, F&& f) {
  switch (width) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// the weights (and bias) of every channel in the accumulation type
template <typename T, typename A>
std::vector<A> params_acc(const at::Tensor& t) {
  std::vector<A> out(t.numel());
  to_acc(t.const_data_ptr<T>(), out.data(), t.numel());
  return out;
}

at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& initial_states, bool silu) {
  check_params(x, weight, bias);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), W = weight.size(1);
  check_rows3(x, "x", B, D, L);
  if (initial_states.has_value()) check_rows3(*initial_states, "initial_states", B, D, W - 1);
  auto out = empty({B, D, L}, x.options());
  if (out.numel() == 0) return out;
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_causal_conv1d_fwd", [&] {
    using A = acc_type<scalar_t>;
    const auto wf = params_acc<scalar_t, A>(weight);
    const auto bf = bias.has_value() ? params_acc<scalar_t, A>(*bias) : std::vector<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ip = opt_ptr<scalar_t>(initial_states);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sxb = x.stride(0), sxd = x.stride(1);
    const int64_t sib = ip ? initial_states->stride(0) : 0, sid = ip ? initial_states->stride(1) : 0;
    by_width(W, [&](auto wc) {
      constexpr int WC = decltype(wc)::value;
      at::parallel_for(0, B * D, row_grain(L), [&](int64_t r0, int64_t r1) {
        std::vector<A> buf(std::min(kChunk, L) + kMaxWidth);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t bi = r / D, c = r % D;
          const Taps<WC, A> taps(wf.data() + c * W, W);
          fwd_row<WC>(xp + bi * sxb + c * sxd, ip ? ip + bi * sib + c * sid : nullptr, op + r * L, taps,
                      bf.empty() ? A(0) : bf[c], L, silu, buf.data());
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& initial_states, bool silu) {
  check_params(x, weight, bias);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), W = weight.size(1);
  check_rows3(x, "x", B, D, L);
  check_rows3(dout, "grad_output", B, D, L);
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), "causal_conv1d: grad_output must have x's dtype");
  const bool has_init = initial_states.has_value();
  if (has_init) check_rows3(*initial_states, "initial_states", B, D, W - 1);
  auto dx = empty({B, D, L}, x.options());
  auto dinit = has_init ? empty({B, D, W - 1}, x.options()) : at::empty({0}, x.options());
  auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto dw_part = at::zeros({B, D, W}, acc_opts);
  auto db_part = at::zeros({B, D}, acc_opts);
  if (L > 0 && B * D > 0) {
    TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_causal_conv1d_bwd", [&] {
      using A = acc_type<scalar_t>;
      const auto wf = params_acc<scalar_t, A>(weight);
      const auto bf = bias.has_value() ? params_acc<scalar_t, A>(*bias) : std::vector<A>();
      const scalar_t* gp = dout.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* ip = opt_ptr<scalar_t>(initial_states);
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      scalar_t* dip = has_init ? dinit.mutable_data_ptr<scalar_t>() : nullptr;
      A* dwp = dw_part.mutable_data_ptr<A>();
      A* dbp = db_part.mutable_data_ptr<A>();
      const int64_t sxb = x.stride(0), sxd = x.stride(1), sgb = dout.stride(0), sgd = dout.stride(1);
      const int64_t sib = ip ? initial_states->stride(0) : 0, sid = ip ? initial_states->stride(1) : 0;
      by_width(W, [&](auto wc) {
        constexpr int WC = decltype(wc)::value;
        at::parallel_for(0, B * D, row_grain(3 * L), [&](int64_t r0, int64_t r1) {
          const int64_t n = std::min(kChunk, L) + 2 * kMaxWidth;
          std::vector<A> xbuf(n), dzbuf(n);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t bi = r / D, c = r % D;
            const Taps<WC, A> taps(wf.data() + c * W, W);
            bwd_row<WC>(gp + bi * sgb + c * sgd, xp + bi * sxb + c * sxd, ip ? ip + bi * sib + c * sid : nullptr,
                        dxp + r * L, dip ? dip + r * (W - 1) : nullptr, taps, bf.empty() ? A(0) : bf[c], L, silu,
                        xbuf.data(), dzbuf.data(), dwp + r * W, dbp + r);
          }
        });
      });
    });
  } else if (has_init) {
    dinit.zero_();
  }
  auto dweight = dw_part.sum(0).to(x.scalar_type());
  auto dbias = bias.has_value() ? db_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias, dinit};
}

// ---------------------------------------------------------------------------------------------------------
// the decoding update: x (batch, dim, seqlen), conv_state (batch, dim, state_len >= W - 1) updated in place
// ---------------------------------------------------------------------------------------------------------
at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, bool silu) {
  check_params(x, weight, bias);
  const int64_t B = x.size(0), D = x.size(1), T = x.size(2), W = weight.size(1);
  check_rows3(x, "x", B, D, T);
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(0) == B && conv_state.size(1) == D &&
                  conv_state.size(2) >= W - 1 && (conv_state.stride(2) == 1 || conv_state.size(2) <= 1),
              "causal_conv1d_update: conv_state must be (", B, ", ", D, ", state_len >= ", W - 1,
              ") with a contiguous last dimension, got ", conv_state.sizes());
  TORCH_CHECK(conv_state.scalar_type() == x.scalar_type(), "causal_conv1d_update: conv_state must have x's dtype");
  const int64_t S = conv_state.size(2);
  auto out = empty({B, D, T}, x.options());
  if (B * D == 0) return out;
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_causal_conv1d_update", [&] {
    using A = acc_type<scalar_t>;
    const auto wf = params_acc<scalar_t, A>(weight);
    const auto bf = bias.has_value() ? params_acc<scalar_t, A>(*bias) : std::vector<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* sp = conv_state.mutable_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sxb = x.stride(0), sxd = x.stride(1), ssb = conv_state.stride(0), ssd = conv_state.stride(1);
    at::parallel_for(0, B * D, row_grain(4 * (S + T)), [&](int64_t r0, int64_t r1) {
      // z of the task's rows (consecutive in out) first, a row at a time in scalars (a decoding row is a few
      // elements); then the activation and the conversion to out in one vector pass over them
      std::vector<A> z((r1 - r0) * T);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t bi = r / D, c = r % D;
        scalar_t* st = sp + bi * ssb + c * ssd;
        const scalar_t* xr = xp + bi * sxb + c * sxd;
        const A* w = wf.data() + c * W;
        A* zr = z.data() + (r - r0) * T;
        for (int64_t t = 0; t < T; ++t) {
          A acc = bf.empty() ? A(0) : bf[c];
          for (int64_t k = 0; k < W; ++k) {
            const int64_t j = S + t - (W - 1) + k;  // window position: the state before S, x from S on
            acc += w[k] * static_cast<A>(j < S ? st[j] : xr[j - S]);
          }
          zr[t] = acc;
        }
        // the state shifted left by T, x appended (the in-place shift reads ahead of what it writes)
        if (T < S) {
          for (int64_t i = 0; i < S - T; ++i) st[i] = st[i + T];
          for (int64_t i = S - T; i < S; ++i) st[i] = xr[i - (S - T)];
        } else {
          for (int64_t i = 0; i < S; ++i) st[i] = xr[T - S + i];
        }
      }
      using Vec = Vectorized<A>;
      constexpr int64_t K = Vec::size();
      const int64_t n = (r1 - r0) * T;
      const A* zp = z.data();
      scalar_t* o = op + r0 * T;
      auto act = [&](const Vec& v) { return silu ? silu_vec(v) : v; };
      int64_t i = 0;
      for (; i + 2 * K <= n; i += 2 * K) store2(o + i, act(Vec::loadu(zp + i)), act(Vec::loadu(zp + i + K)));
      for (; i < n; ++i) o[i] = static_cast<scalar_t>(silu ? silu_scalar(zp[i]) : zp[i]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.impl("causal_conv1d_update", &causal_conv1d_update);
}

}  // namespace tritium
