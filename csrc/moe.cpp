// Mixture-of-experts CPU kernels (python/tritium/ops/moe.py): the experts' SwiGLU MLPs over tokens grouped by
// expert (dropless). The router, its top-k and the sort that groups the assignments stay in torch ops; these
// kernels take the grouped form:
//   x (T, D) tokens; w13 (E, 2F, D) each expert's fused [gate; up] weight; w2 (E, D, F) its down weight;
//   rows r = 0..R-1 (R = T k assignments) sorted by expert: tokens[r] the token of row r, weights[r] its routing
//   weight, offsets (E + 1) the first row of each expert (offsets[E] = R).
//   forward:  a_r = x[tokens[r]] W13_e^T (2F), h_r = silu(a_r[:F]) * a_r[F:], y[t] = sum_{r: tokens[r] = t}
//             weights[r] h_r W2_e^T; returns y (T, D) and a (R, 2F) (saved for the backward);
//             moe_experts_infer (no backward to come): y only, a never stored
//   backward: g_r = dy[tokens[r]] W2_e (F); dweights[r] = g_r . h_r; dh_r = weights[r] g_r;
//             dW2_e = dy[tok_e]^T (weights h)_e; da = swiglu'(a) dh; dW13_e = da_e^T x[tok_e];
//             dx[t] = sum_{r: tokens[r] = t} da_r W13_e
//
// Each expert's rows are contiguous, so its products are three GEMMs on a gathered (n_e, D) block: ATen's
// (oneDNN for 16-bit, BLAS) and, for float32/float64 from kPanelRows rows, tritium's panel GEMM (panel_mm_out,
// tritium.linear's) and its weight-gradient form (panel_gemm_tn, the threads splitting the gradient's rows).
// The forward's gate/up product, where F is a whole number of half panels, runs on panels packed for SwiGLU in
// the epilogue (panel_gemm<..., GLU>), which writes both a and h: no pass of its own. The elementwise parts
// (gather, SwiGLU and its backward) run over the expert's rows.
//
// The threads (expert_schedule): when the experts' rows split evenly between them, each thread runs whole experts,
// every product of an expert on that one thread (an expert's GEMMs then run at one core's full rate, with no
// synchronisation inside them); otherwise (a few experts hold most rows) the experts run one after another with
// every thread inside each product. Either way each expert writes its rows' outputs (the down product's, the
// input gradient's) into its own rows of an (R, D) block, and one pass per token then sums its k rows (weighted in
// the forward) in the accumulation type and rounds once (combine): no atomics, no float32 (T, D) accumulator.
#include <ATen/ThreadLocalState.h>

#include "panel.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

void check_args(const char* fn, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& weights) {
  TORCH_CHECK(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3, fn,
              ": x (T, D), w13 (E, 2F, D) and w2 (E, D, F) must be 2-D, 3-D and 3-D, got ", x.sizes(), ", ",
              w13.sizes(), ", ", w2.sizes());
  const int64_t D = x.size(1), E = w13.size(0), F2 = w13.size(1);
  TORCH_CHECK(F2 % 2 == 0 && w13.size(2) == D && w2.size(0) == E && w2.size(1) == D && w2.size(2) == F2 / 2, fn,
              ": shapes disagree: x ", x.sizes(), ", w13 ", w13.sizes(), " (E, 2F, D), w2 ", w2.sizes(), " (E, D, F)");
  TORCH_CHECK(w13.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type() &&
                  weights.scalar_type() == x.scalar_type(),
              fn, ": w13, w2 and weights must have x's dtype ", x.scalar_type(), ", got ", w13.scalar_type(), ", ",
              w2.scalar_type(), ", ", weights.scalar_type());
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.scalar_type() == at::kLong && offsets.size(0) == E + 1,
              fn, ": tokens must be (R,) int64 and offsets (E + 1,) = (", E + 1, ",) int64, got ", tokens.sizes(), " ",
              tokens.scalar_type(), " and ", offsets.sizes(), " ", offsets.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == tokens.size(0), fn, ": weights must be (R,) = (",
              tokens.size(0), ",), got ", weights.sizes());
}

// The rows' expert boundaries, checked: non-decreasing from 0 to R.
std::vector<int64_t> read_offsets(const char* fn, const at::Tensor& offsets, int64_t R) {
  const auto oc = offsets.contiguous();
  std::vector<int64_t> off(oc.const_data_ptr<int64_t>(), oc.const_data_ptr<int64_t>() + oc.numel());
  TORCH_CHECK(off.front() == 0 && off.back() == R, fn, ": offsets must run from 0 to R = ", R, ", got ",
              off.front(), " to ", off.back());
  for (size_t e = 1; e < off.size(); ++e)
    TORCH_CHECK(off[e] >= off[e - 1], fn, ": offsets must be non-decreasing, got ", off[e - 1], " then ", off[e],
                " at expert ", e - 1);
  return off;
}

// The rows of each token: rows[first[t] .. first[t + 1]) are token t's rows in increasing order (so in expert
// order). Checks every token in [0, T) before any kernel reads x through it.
struct TokenRows {
  std::vector<int64_t> first, rows;
};

TokenRows rows_by_token(const char* fn, const int64_t* tok, int64_t R, int64_t T_) {
  TokenRows tr{std::vector<int64_t>(T_ + 1, 0), std::vector<int64_t>(R)};
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(tok[r] >= 0 && tok[r] < T_, fn, ": tokens must be in [0, ", T_, "), got ", tok[r]);
    ++tr.first[tok[r] + 1];
  }
  for (int64_t t = 0; t < T_; ++t) tr.first[t + 1] += tr.first[t];
  std::vector<int64_t> next(tr.first.begin(), tr.first.end() - 1);
  for (int64_t r = 0; r < R; ++r) tr.rows[next[tok[r]]++] = r;
  return tr;
}

// Which experts each thread runs whole (expert_schedule): the busiest thread's rows at most this many times an even
// share of all rows, else the experts run one at a time with the threads inside each product.
constexpr double kExpertSlack = 1.15;

// The experts with rows dealt to the threads, largest first, each to the thread with the fewest rows so far; empty
// (one expert at a time) on one thread, inside a parallel region, with fewer experts with rows than threads, or
// where the deal leaves a thread more than kExpertSlack times its share.
std::vector<std::vector<int64_t>> expert_schedule(const std::vector<int64_t>& off) {
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) busy.push_back(e);
  if (nt <= 1 || static_cast<int64_t>(busy.size()) < nt) return {};
  std::stable_sort(busy.begin(), busy.end(),
                   [&](int64_t a, int64_t b) { return off[a + 1] - off[a] > off[b + 1] - off[b]; });
  std::vector<std::vector<int64_t>> plan(nt);
  std::vector<int64_t> load(nt, 0);
  for (const int64_t e : busy) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    plan[t].push_back(e);
    load[t] += off[e + 1] - off[e];
  }
  const int64_t most = *std::max_element(load.begin(), load.end());
  if (static_cast<double>(most) * nt > kExpertSlack * static_cast<double>(off[E])) return {};
  return plan;
}

// body(e, slot) for every expert with rows: by the schedule, slot = the thread's index (its scratch buffers), or
// one after another in slot 0
template <typename Fn>
void for_experts(const std::vector<int64_t>& off, const std::vector<std::vector<int64_t>>& plan, const Fn& body) {
  if (plan.empty()) {
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(off.size()); ++e)
      if (off[e + 1] > off[e]) body(e, int64_t(0));
    return;
  }
  // the caller's thread-local state (the dispatch below autograd this kernel runs in) on every thread, for the
  // ATen GEMMs the other threads call
  const at::ThreadLocalState state;
  at::parallel_for(0, static_cast<int64_t>(plan.size()), 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = t0; t < t1; ++t)
      for (const int64_t e : plan[t]) body(e, t);
  });
}

// out (n, D) = x[tok[i]] rows (tokens checked by rows_by_token)
template <typename T>
void gather(const T* x, int64_t ldx, const int64_t* tok, int64_t n, int64_t D, T* out) {
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(out + i * D, x + tok[i] * ldx, D * sizeof(T));
  });
}

// y (M, N) = a (M, K) @ b (K, N): the panels for float32/float64 where they apply, else ATen
void mm_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& y) {
  if (!panel_mm_out(a, b, y, nullptr, 0)) at::mm_out(y, a, b);
}

// y (P, Q) = a (n, P)^T @ b (n, Q) for contiguous a, b, y: panel_gemm_tn_rows for float/double with many rows (the
// threads split y's rows: an expert's weight gradient is large against its rows).
void mm_tn_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& y) {
  const int64_t n = a.size(0), P = a.size(1), Q = b.size(1);
  if ((a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) && n >= 2 * kTnChunk && P > 0 && Q > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tritium_moe_tn", [&] {
      panel_gemm_tn_rows<scalar_t>(a.const_data_ptr<scalar_t>(), P, b.const_data_ptr<scalar_t>(), Q, n, P, Q,
                                   y.mutable_data_ptr<scalar_t>(), Q, false);
    });
    return;
  }
  at::mm_out(y, a.t(), b);
}

// The experts' gate/up weights packed for the panels' SwiGLU epilogue (panel_gemm<..., GLU>): panel p holds gate
// rows [p H, (p + 1) H) then the same up rows, H = half a panel (linear.cpp's pack_linear_glu layout, here
// straight from w (2F, D) without a reordered copy). F % H == 0.
template <typename A>
void pack_glu(const A* w, int64_t F, int64_t D, A* out) {
  constexpr int64_t NP = panel::width<A>(), H = NP / 2;
  at::parallel_for(0, F / H, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      A* dst = out + p * D * NP;
      for (int64_t k0 = 0; k0 < D; k0 += 1024) {  // transpose_mxn takes int extents
        const int kk = static_cast<int>(std::min<int64_t>(1024, D - k0));
        at::vec::transpose_mxn<A>(w + p * H * D + k0, D, dst + k0 * NP, NP, static_cast<int>(H), kk);
        at::vec::transpose_mxn<A>(w + (F + p * H) * D + k0, D, dst + k0 * NP + H, NP, static_cast<int>(H), kk);
      }
    }
  });
}

// Whether the forward's gate/up product of n rows runs on the panels with SwiGLU in its epilogue: float/double,
// enough rows to pay for packing the expert's weights, and F a whole number of half panels.
template <typename T>
bool glu_panels(int64_t n, int64_t F, int64_t D) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return n >= kPanelRows && F > 0 && D > 0 && F % (panel::width<T>() / 2) == 0;
  } else {
    return false;
  }
}

template <typename V>
inline V silu_of(const V& g) {
  return g * fsigmoid(g);
}

// h (n, F) = silu(a[:, :F]) * a[:, F:] for a (n, 2F)
template <typename T>
void swiglu_rows(const T* a, int64_t n, int64_t F, T* h) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* g = a + i * 2 * F;
      const T* u = g + F;
      T* hi = h + i * F;
      int64_t j = 0;
      for (; j + L <= F; j += L)
        VecIO<T>::store(hi + j, silu_of(VecIO<T>::load(g + j)) * VecIO<T>::load(u + j));
      for (; j < F; ++j) {
        const A gv = static_cast<A>(g[j]);
        hi[j] = static_cast<T>(gv / (A(1) + std::exp(-gv)) * static_cast<A>(u[j]));
      }
    }
  });
}

// out[t] (D) = sum of w[r] o[r] over token t's rows r (w null: 1), in increasing r, in the accumulation type,
// rounded once; 0 for a token without rows
template <typename T>
void combine(const T* o, int64_t D, const TokenRows& tr, const T* w, int64_t T_, T* out) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, T_, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t* rows = tr.rows.data() + tr.first[t];
      const int64_t cnt = tr.first[t + 1] - tr.first[t];
      T* dst = out + t * D;
      int64_t j = 0;
      for (; j + L <= D; j += L) {
        V s(A(0));
        for (int64_t i = 0; i < cnt; ++i) {
          const int64_t r = rows[i];
          s = s + V(w == nullptr ? A(1) : static_cast<A>(w[r])) * VecIO<T>::load(o + r * D + j);
        }
        VecIO<T>::store(dst + j, s);
      }
      for (; j < D; ++j) {
        A s = A(0);
        for (int64_t i = 0; i < cnt; ++i) {
          const int64_t r = rows[i];
          s += (w == nullptr ? A(1) : static_cast<A>(w[r])) * static_cast<A>(o[r * D + j]);
        }
        dst[j] = static_cast<T>(s);
      }
    }
  });
}

// y and, with save_a, the pre-activations a (R, 2F) for the backward (moe_experts_fwd); without (moe_experts_infer:
// no backward to come) a is (0, 2F): the SwiGLU-epilogue path never writes pre-activations, the path with a SwiGLU
// pass puts each expert's in a scratch block
std::tuple<at::Tensor, at::Tensor> experts_forward(const char* fn, const at::Tensor& x, const at::Tensor& w13,
                                                   const at::Tensor& w2, const at::Tensor& tokens,
                                                   const at::Tensor& offsets, const at::Tensor& weights, bool save_a) {
  check_args(fn, x, w13, w2, tokens, offsets, weights);
  const int64_t T_ = x.size(0), D = x.size(1), E = w13.size(0), F = w13.size(1) / 2, R = tokens.size(0);
  const auto off = read_offsets(fn, offsets, R);
  const auto tc = tokens.contiguous();
  const auto tr = rows_by_token(fn, tc.const_data_ptr<int64_t>(), R, T_);
  auto a = empty({save_a ? R : 0, 2 * F}, x.options());
  auto y = empty({T_, D}, x.options());
  if (R == 0 || D == 0) {
    y.zero_();
    return {y, a};
  }
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const auto wc = weights.contiguous();
  const auto w13c = w13.contiguous(), w2c = w2.contiguous();
  const auto plan = expert_schedule(off);
  const int64_t slots = plan.empty() ? 1 : static_cast<int64_t>(plan.size());
  int64_t most = 0, glu_size = 0;
  bool any_glu = false, any_pass = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tritium_moe_glu", [&] {
    glu_size = panel::packed_size<acc_type<scalar_t>>(2 * F, D);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = off[e + 1] - off[e];
      most = std::max(most, n);
      if (n == 0) continue;
      (glu_panels<scalar_t>(n, F, D) ? any_glu : any_pass) = true;
    }
  });
  // each slot's scratch: the gathered rows, h, the packed gate/up weights (SwiGLU-epilogue path), the
  // pre-activations when a is not returned (the path with a SwiGLU pass)
  std::vector<at::Tensor> xe_buf(slots), h_buf(slots), glu_buf(slots), a_buf(slots);
  for (int64_t s = 0; s < slots; ++s) {
    xe_buf[s] = empty({most, D}, x.options());
    h_buf[s] = empty({most, F}, x.options());
    if (any_glu) glu_buf[s] = empty({glu_size}, x.options());
    if (any_pass && !save_a) a_buf[s] = empty({most, 2 * F}, x.options());
  }
  auto o = empty({R, D}, x.options());  // each row's down-product output, summed per token by combine
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tritium_moe_experts_fwd", [&] {
    using A = acc_type<scalar_t>;
    for_experts(off, plan, [&](int64_t e, int64_t s) {
      const int64_t r0 = off[e], n = off[e + 1] - r0;
      const int64_t* tok = tc.const_data_ptr<int64_t>() + r0;
      auto xe = xe_buf[s].narrow(0, 0, n);
      gather<scalar_t>(xc.const_data_ptr<scalar_t>(), xc.stride(0), tok, n, D, xe.mutable_data_ptr<scalar_t>());
      auto he = h_buf[s].narrow(0, 0, n);
      if (glu_panels<scalar_t>(n, F, D)) {
        // a and h from one product: SwiGLU in the panels' epilogue, which also stores the pre-activations
        if constexpr (std::is_same_v<scalar_t, A>) {
          pack_glu<A>(w13c[e].const_data_ptr<A>(), F, D, glu_buf[s].mutable_data_ptr<A>());
          panel_gemm<A, A, true>(xe.const_data_ptr<A>(), D, n, D, glu_buf[s].const_data_ptr<A>(), 2 * F,
                                 he.mutable_data_ptr<A>(), F, nullptr, 0, -1,
                                 save_a ? a.mutable_data_ptr<A>() + r0 * 2 * F : nullptr, 2 * F);
        }
      } else {
        auto ae = save_a ? a.narrow(0, r0, n) : a_buf[s].narrow(0, 0, n);
        mm_into(xe, w13c[e].t(), ae);
        swiglu_rows<scalar_t>(ae.const_data_ptr<scalar_t>(), n, F, he.mutable_data_ptr<scalar_t>());
      }
      auto oe = o.narrow(0, r0, n);
      mm_into(he, w2c[e].t(), oe);
    });
    combine<scalar_t>(o.const_data_ptr<scalar_t>(), D, tr, wc.const_data_ptr<scalar_t>(), T_,
                      y.mutable_data_ptr<scalar_t>());
  });
  return {y, a};
}

std::tuple<at::Tensor, at::Tensor> moe_experts_fwd(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                                                   const at::Tensor& tokens, const at::Tensor& offsets,
                                                   const at::Tensor& weights) {
  return experts_forward("moe_experts_fwd", x, w13, w2, tokens, offsets, weights, true);
}

at::Tensor moe_experts_infer(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                             const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& weights) {
  return std::get<0>(experts_forward("moe_experts_infer", x, w13, w2, tokens, offsets, weights, false));
}

// Per row of one expert, from g = dy W2_e (n, F, overwritten by weights * h) and a (n, 2F):
//   dweights[i] = g_i . h_i;  dh = weights[i] g_i;  da = [dh u silu'(gate), dh silu(gate)] (n, 2F)
template <typename T>
void swiglu_bwd_rows(T* g, const T* a, const T* w, int64_t n, int64_t F, T* da, T* dw) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* ga = a + i * 2 * F;
      const T* ua = ga + F;
      T* gi = g + i * F;
      T* dg = da + i * 2 * F;
      T* du = dg + F;
      const A wi = static_cast<A>(w[i]);
      const V wv(wi);
      V dots(A(0));
      A dot = A(0);
      int64_t j = 0;
      for (; j + L <= F; j += L) {
        const V gate = VecIO<T>::load(ga + j), up = VecIO<T>::load(ua + j), gg = VecIO<T>::load(gi + j);
        const V s = fsigmoid(gate);
        const V sl = gate * s;
        const V h = sl * up;
        dots = at::vec::fmadd(gg, h, dots);
        const V dh = wv * gg;
        VecIO<T>::store(dg + j, dh * up * s * (V(1) + gate * (V(1) - s)));
        VecIO<T>::store(du + j, dh * sl);
        VecIO<T>::store(gi + j, wv * h);
      }
      for (; j < F; ++j) {
        const A gate = static_cast<A>(ga[j]), up = static_cast<A>(ua[j]), gg = static_cast<A>(gi[j]);
        const A s = A(1) / (A(1) + std::exp(-gate));
        const A sl = gate * s;
        const A h = sl * up;
        dot += gg * h;
        const A dh = wi * gg;
        dg[j] = static_cast<T>(dh * up * s * (A(1) + gate * (A(1) - s)));
        du[j] = static_cast<T>(dh * sl);
        gi[j] = static_cast<T>(wi * h);
      }
      dw[i] = static_cast<T>(dot + hsum(dots));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& tokens,
    const at::Tensor& offsets, const at::Tensor& weights, const at::Tensor& a, bool need_dx) {
  const char* fn = "moe_experts_bwd";
  check_args(fn, x, w13, w2, tokens, offsets, weights);
  const int64_t T_ = x.size(0), D = x.size(1), E = w13.size(0), F = w13.size(1) / 2, R = tokens.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == T_ && dy.size(1) == D && dy.scalar_type() == x.scalar_type(), fn,
              ": dy must be (", T_, ", ", D, ") of x's dtype, got ", dy.sizes(), " ", dy.scalar_type());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == R && a.size(1) == 2 * F && a.scalar_type() == x.scalar_type(), fn,
              ": a must be (", R, ", ", 2 * F, ") of x's dtype, got ", a.sizes(), " ", a.scalar_type());
  const auto off = read_offsets(fn, offsets, R);
  const auto tc = tokens.contiguous();
  const auto tr = rows_by_token(fn, tc.const_data_ptr<int64_t>(), R, T_);
  auto dw13 = empty({E, 2 * F, D}, x.options());
  auto dw2 = empty({E, D, F}, x.options());
  auto dweights = at::empty({R}, x.options());
  auto dx = need_dx ? empty({T_, D}, x.options()) : at::empty({0}, x.options());
  if (R == 0 || D == 0 || F == 0) {  // no products: every gradient is zero
    for (auto* t : {&dw13, &dw2, &dweights, &dx}) t->zero_();
    return {dx, dw13, dw2, dweights};
  }
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] == off[e]) {
      dw13[e].zero_();
      dw2[e].zero_();
    }
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const auto dyc = dy.stride(1) == 1 ? dy : dy.contiguous();
  const auto wc = weights.contiguous();
  const auto ac = a.contiguous();
  const auto w13c = w13.contiguous(), w2c = w2.contiguous();
  const auto plan = expert_schedule(off);
  const int64_t slots = plan.empty() ? 1 : static_cast<int64_t>(plan.size());
  int64_t most = 0;
  for (int64_t e = 0; e < E; ++e) most = std::max(most, off[e + 1] - off[e]);
  // each slot's scratch: the gathered rows of x and dy, g = dy W2_e, da
  std::vector<at::Tensor> xe_buf(slots), dye_buf(slots), g_buf(slots), da_buf(slots);
  for (int64_t s = 0; s < slots; ++s) {
    xe_buf[s] = empty({most, D}, x.options());
    dye_buf[s] = empty({most, D}, x.options());
    g_buf[s] = empty({most, F}, x.options());
    da_buf[s] = empty({most, 2 * F}, x.options());
  }
  // each row's input gradient da_r W13_e, summed per token by combine
  auto dxr = need_dx ? empty({R, D}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tritium_moe_experts_bwd", [&] {
    for_experts(off, plan, [&](int64_t e, int64_t s) {
      const int64_t r0 = off[e], n = off[e + 1] - r0;
      const int64_t* tok = tc.const_data_ptr<int64_t>() + r0;
      auto dye = dye_buf[s].narrow(0, 0, n);
      gather<scalar_t>(dyc.const_data_ptr<scalar_t>(), dyc.stride(0), tok, n, D, dye.mutable_data_ptr<scalar_t>());
      auto g = g_buf[s].narrow(0, 0, n);
      mm_into(dye, w2c[e], g);  // dy W2_e (n, F)
      auto dae = da_buf[s].narrow(0, 0, n);
      swiglu_bwd_rows<scalar_t>(g.mutable_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>() + r0 * 2 * F,
                                wc.const_data_ptr<scalar_t>() + r0, n, F, dae.mutable_data_ptr<scalar_t>(),
                                dweights.mutable_data_ptr<scalar_t>() + r0);
      auto dw2e = dw2[e];
      mm_tn_into(dye, g, dw2e);  // dy^T (weights h) (D, F)
      auto xe = xe_buf[s].narrow(0, 0, n);
      gather<scalar_t>(xc.const_data_ptr<scalar_t>(), xc.stride(0), tok, n, D, xe.mutable_data_ptr<scalar_t>());
      auto dw13e = dw13[e];
      mm_tn_into(dae, xe, dw13e);  // da^T x (2F, D)
      if (need_dx) {
        auto dxe = dxr.narrow(0, r0, n);
        mm_into(dae, w13c[e], dxe);  // da W13_e (n, D)
      }
    });
    if (need_dx)
      combine<scalar_t>(dxr.const_data_ptr<scalar_t>(), D, tr, nullptr, T_, dx.mutable_data_ptr<scalar_t>());
  });
  return {dx, dw13, dw2, dweights};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("moe_experts_fwd", &moe_experts_fwd);
  m.impl("moe_experts_bwd", &moe_experts_bwd);
  m.impl("moe_experts_infer", &moe_experts_infer);
}

}  // namespace tritium
