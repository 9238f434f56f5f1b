// xLSTM's mLSTM cell (matrix memory, stabilised exponential gating) on the CPU, in the chunkwise-parallel form:
// forward, backward and the decoding step, registered for the schemas python/tritium/ops/mlstm.py defines (the
// recurrence, the specification, is there). Per (batch, head), with q already scaled, logf = logsigmoid(f):
//
//   m_t = max(logf_t + m_{t-1}, i_t);  C_t = e^{logf_t + m_{t-1} - m_t} C_{t-1} + e^{i_t - m_t} k_t v_t^T
//   n_t likewise with k_t;             h_t = C_t^T q_t / (max(|n_t . q_t|, e^{-m_t}) + eps)
//
// Chunkwise: within a chunk of L steps (F_t the cumulative logf from the chunk's start, (C, n, m) the state before
// it), D_ts = F_t - F_s + i_s (s <= t), m_t = max(F_t + m, max_s D_ts) (the recurrence's m_t exactly),
//   num_t = g_t C^T q_t + sum_s P_ts v_s,  den_t = g_t n . q_t + sum_s P_ts,
//   g_t = e^{F_t + m - m_t},  P_ts = e^{D_ts - m_t} (q_t . k_s),
// and the state moves to the chunk's end by the same sums at t = L - 1 with its own maximum. The forward saves the
// state before every chunk (and the final one): (B, H, nchunks + 1, DK, DV), n (.., DK), m (..). The backward walks
// the chunks in reverse, recomputes one chunk from its saved state, and carries the adjoint (dC, dn) of the state
// between chunks. m is a stabiliser: no gradient flows through it (as NX-AI's chunkwise kernels), and the output
// does not depend on it but through eps.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "panel.h"
#include "vec.h"

namespace tritium {
namespace {

template <typename A>
inline A dotv(const A* a, const A* b, int64_t np) {
  using Vec = Vectorized<A>;
  Vec acc(0);
  for (int64_t j = 0; j < np; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  return hsum(acc);
}

// y[0, np) += alpha x[0, np)
template <typename A>
inline void axpy(A alpha, const A* x, A* y, int64_t np) {
  using Vec = Vectorized<A>;
  const Vec av(alpha);
  for (int64_t j = 0; j < np; j += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
}

// a . b[0, n) accumulated in double (four chains): the state's term g n . q of the normaliser den, whose
// cancellation (terms of either sign) the output's 1 / den amplifies
template <typename A>
inline double dot_wide(const A* a, const A* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += double(a[j]) * b[j], s1 += double(a[j + 1]) * b[j + 1];
    s2 += double(a[j + 2]) * b[j + 2], s3 += double(a[j + 3]) * b[j + 3];
  }
  for (; j < n; ++j) s0 += double(a[j]) * b[j];
  return (s0 + s1) + (s2 + s3);
}

// p[0, n) = exp(p[0, n) - c): by vectors (fexp) in float; double (float32 input's work type) by std::exp, which on
// these rows of at most a chunk's length measured faster than ATen's (Sleef) double vectors
template <typename A>
inline void exp_shifted(A* p, int64_t n, A c) {
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] - c);
  } else {
    using Vec = Vectorized<A>;
    const Vec vc(c);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) fexp(Vec::loadu(p + j) - vc).store(p + j);
    if (j < n) fexp(Vec::loadu(p + j, n - j) - vc).store(p + j, n - j);
  }
}

template <typename A>
inline A log_sigmoid(A x) {
  return std::min(x, A(0)) - std::log1p(std::exp(-std::abs(x)));
}

// The chunk's arithmetic type: double for float32 input (the chunkwise sums order the terms differently from the
// recurrence, and the output's 1 / den amplifies their rounding where den cancels), float for 16-bit input (den
// still summed in double), double for double. The saved states stay in the accumulation type (float32; float64
// for float64 input).
template <typename T>
using work_t = std::conditional_t<std::is_same_v<T, float>, double, acc_type<T>>;

// dst[0, n) = src[0, n) in the work type
template <typename T, typename A>
inline void widen(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, double>) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
  } else {
    to_acc(src, dst, n);
  }
}

template <typename T>
struct Mlstm {
  using A = work_t<T>;
  static constexpr int64_t W = Vectorized<A>::size();
  int64_t B, H, L, DK, DV, DKP, DVP, C, nchunks;
  A scale, eps;
  const T *q, *k, *v, *i, *f;  // contiguous (B, H, T, DK|DV) and (B, H, T)

  // One chunk's inputs and recomputed forward quantities (rows padded to DKP / DVP with zeros), and the packed
  // operands of its products, which run as register-tile GEMMs (panel.h): Sp the state's column panels, Kp the
  // panels of K^T, Vp the column panels of V, Kt (DK, C) the gated K^T of the move to the chunk's end.
  struct Buf {
    std::vector<A> mem;
    A *Q, *K, *V, *F, *I, *mt, *g, *E, *P, *num, *den, *z, *Di, *Ni, *w, *Sp, *Kp, *Vp, *Kt;
    std::vector<double> dg;  // the state's share of den, in double
    A G, mnew;
  };
  static constexpr int64_t NP = panel::width<A>();
  static int64_t up(int64_t x) { return (x + NP - 1) / NP * NP; }

  void alloc(Buf& b) const {
    const int64_t n = C * (2 * DKP + 3 * DVP + 8) + 2 * C * C + up(DVP) * DK + up(C) * DK + up(DVP) * C + DK * C;
    b.mem.assign(n, A(0));
    A* p = b.mem.data();
    auto take = [&](int64_t m) { A* r = p; p += m; return r; };
    b.Q = take(C * DKP), b.K = take(C * DKP), b.V = take(C * DVP), b.num = take(C * DVP), b.Ni = take(C * DVP);
    b.F = take(C), b.I = take(C), b.mt = take(C), b.g = take(C), b.den = take(C), b.z = take(C), b.Di = take(C);
    b.w = take(C), b.E = take(C * C), b.P = take(C * C);
    b.Sp = take(up(DVP) * DK), b.Kp = take(up(C) * DK), b.Vp = take(up(DVP) * C), b.Kt = take(DK * C);
    b.dg.assign(C, 0.0);
  }

  // y (rows, ncols of ldy) [= c +] x (rows, K of ldx) @ the column panels bp (panel stride ps), by tiles of kMR
  // rows; kr(m0, mr): the reduction's range {k0, k1} for the tile of rows [m0, m0 + mr) (x's columns and the panels'
  // rows outside it are zeros of a triangular factor), cols(m0, mr): its columns
  template <typename KF, typename CF>
  static void gemm(int64_t rows, const A* x, int64_t ldx, const A* bp, int64_t ps, A* y, int64_t ldy, const A* c,
                   KF kr, CF cols) {
    for (int64_t m0 = 0; m0 < rows; m0 += panel::kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(panel::kMR, rows - m0));
      const auto [k0, k1] = kr(m0, mr);
      const int64_t nc = cols(m0, mr);
      for (int64_t p = 0; p * NP < nc; ++p)
        panel::tile_rows<A, false>(mr, x + m0 * ldx + k0, ldx, bp + p * ps + k0 * NP, k1 - k0,
                                   y + m0 * ldy + p * NP, ldy, std::min(NP, nc - p * NP),
                                   c ? c + m0 * ldy + p * NP : nullptr, ldy);
    }
  }
  // the usual ranges: everything, the lower triangle's columns/reduction (s <= t: up to the tile's last row), the
  // upper triangle's reduction (t >= s: from the tile's first row)
  static auto all(int64_t K) {
    return [K](int64_t, int64_t) { return std::pair<int64_t, int64_t>(0, K); };
  }
  static auto upto(int64_t n) {
    return [n](int64_t m0, int64_t mr) { return std::pair<int64_t, int64_t>(0, std::min(n, m0 + mr)); };
  }
  static auto from(int64_t n) {
    return [n](int64_t m0, int64_t) { return std::pair<int64_t, int64_t>(m0, n); };
  }
  static auto ncols(int64_t N) {
    return [N](int64_t, int64_t) { return N; };
  }
  static auto tril_cols(int64_t n) {
    return [n](int64_t m0, int64_t mr) { return std::min(n, m0 + mr); };
  }

  // the chunk [t0, t0 + n) of item (batch * H + head) from the state (S (DK, DVP), nv (DKP), m) before it:
  // Ni = diag(g) Q S, P = E o tril(Q K^T), num = Ni + P V as GEMMs; den's sums in double
  void chunk(Buf& b, int64_t item, int64_t t0, int64_t n, const A* S, const A* nv, A m) const {
    const int64_t base = item * L + t0;
    for (int64_t j = 0; j < n; ++j) {
      A* qj = b.Q + j * DKP;
      widen(q + (base + j) * DK, qj, DK);
      for (int64_t d = 0; d < DK; ++d) qj[d] *= scale;
      widen(k + (base + j) * DK, b.K + j * DKP, DK);
      widen(v + (base + j) * DV, b.V + j * DVP, DV);
      b.F[j] = (j ? b.F[j - 1] : A(0)) + log_sigmoid(static_cast<A>(f[base + j]));
      b.I[j] = static_cast<A>(i[base + j]);
    }
    double* dg = b.dg.data();
    for (int64_t t = 0; t < n; ++t) {
      A* Et = b.E + t * C;
      A mx = b.F[t] + m;
      for (int64_t s = 0; s <= t; ++s) Et[s] = b.F[t] - b.F[s] + b.I[s], mx = std::max(mx, Et[s]);
      b.mt[t] = mx;
      b.g[t] = std::exp(b.F[t] + m - mx);
      exp_shifted(Et, t + 1, mx);
      dg[t] = double(b.g[t]) * dot_wide(b.Q + t * DKP, nv, DK);
      b.Di[t] = static_cast<A>(dg[t]);
    }
    panel::pack_cols<A>(S, DVP, DK, DV, b.Sp);
    gemm(n, b.Q, DKP, b.Sp, DK * NP, b.Ni, DVP, nullptr, all(DK), ncols(DV));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < DVP; ++j) b.Ni[t * DVP + j] *= b.g[t];
    panel::pack<A>(b.K, DKP, n, DK, b.Kp);
    gemm(n, b.Q, DKP, b.Kp, DK * NP, b.P, C, nullptr, all(DK), tril_cols(n));
    for (int64_t t = 0; t < n; ++t) {
      A* Pt = b.P + t * C;
      const A* Et = b.E + t * C;
      double den = dg[t];
      for (int64_t s = 0; s <= t; ++s) Pt[s] *= Et[s], den += Pt[s];
      std::fill(Pt + t + 1, Pt + C, A(0));
      b.den[t] = static_cast<A>(den);
      b.z[t] = std::max(std::abs(b.den[t]), std::exp(-b.mt[t])) + eps;
    }
    panel::pack_cols<A>(b.V, DVP, n, DV, b.Vp);
    gemm(n, b.P, C, b.Vp, n * NP, b.num, DVP, b.Ni, upto(n), ncols(DV));
    // the move to the chunk's end: G for the state before, w_s for step s
    const A FL = b.F[n - 1];
    A mnew = FL + m;
    for (int64_t s = 0; s < n; ++s) mnew = std::max(mnew, FL - b.F[s] + b.I[s]);
    b.mnew = mnew, b.G = std::exp(FL + m - mnew);
    for (int64_t s = 0; s < n; ++s) b.w[s] = std::exp(FL - b.F[s] + b.I[s] - mnew);
  }

  // S, nv <- the state at the chunk's end (after chunk(), whose V panels it reuses): S <- G S + (w o K)^T V
  void advance(const Buf& b, int64_t n, A* S, A* nv) const {
    at::vec::transpose_mxn<A>(b.K, DKP, b.Kt, C, static_cast<int>(n), static_cast<int>(DK));
    for (int64_t d = 0; d < DK; ++d)
      for (int64_t s = 0; s < n; ++s) b.Kt[d * C + s] *= b.w[s];
    for (int64_t j = 0; j < DK * DVP; ++j) S[j] *= b.G;
    gemm(DK, b.Kt, C, b.Vp, n * NP, S, DVP, S, all(n), ncols(DV));
    for (int64_t d = 0; d < DKP; ++d) nv[d] *= b.G;
    for (int64_t s = 0; s < n; ++s) axpy(b.w[s], b.K + s * DKP, nv, DKP);
  }

  template <typename S_>
  void load_state(const S_* src, A* S) const {
    std::fill(S, S + DK * DVP, A(0));
    for (int64_t d = 0; d < DK; ++d) std::copy(src + d * DV, src + d * DV + DV, S + d * DVP);
  }
  template <typename S_>
  void store_state(const A* S, S_* dst) const {
    for (int64_t d = 0; d < DK; ++d) std::copy(S + d * DVP, S + d * DVP + DV, dst + d * DV);
  }
};

template <typename T>
Mlstm<T> make_mlstm(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& i,
                    const at::Tensor& f, double scale, double eps, int64_t chunk) {
  using M = Mlstm<T>;
  M s;
  s.B = q.size(0), s.H = q.size(1), s.L = q.size(2), s.DK = q.size(3), s.DV = v.size(3);
  s.DKP = (s.DK + M::W - 1) / M::W * M::W, s.DVP = (s.DV + M::W - 1) / M::W * M::W;
  s.C = chunk, s.nchunks = (s.L + chunk - 1) / chunk;
  s.scale = static_cast<work_t<T>>(scale), s.eps = static_cast<work_t<T>>(eps);
  s.q = q.const_data_ptr<T>(), s.k = k.const_data_ptr<T>(), s.v = v.const_data_ptr<T>();
  s.i = i.const_data_ptr<T>(), s.f = f.const_data_ptr<T>();
  return s;
}

void check_mlstm(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& i,
                 const at::Tensor& f, int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be a contiguous (B, H, T, DK) tensor, got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && k.is_contiguous() && k.scalar_type() == q.scalar_type(),
              "k must be like q ", q.sizes(), ", got ", k.sizes(), " ", k.scalar_type());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2) &&
                  v.is_contiguous() && v.scalar_type() == q.scalar_type(),
              "v must be a contiguous (B, H, T, DV) tensor like q, got ", v.sizes(), " ", v.scalar_type());
  for (const auto* p : {&i, &f})
    TORCH_CHECK(p->sizes() == q.sizes().slice(0, 3) && p->is_contiguous() && p->scalar_type() == q.scalar_type(),
                "i and f must be contiguous (B, H, T) tensors like q, got ", p->sizes(), " ", p->scalar_type());
  TORCH_CHECK(chunk > 0, "chunk must be positive, got ", chunk);
}

void check_state(const at::Tensor& q, const at::Tensor& v, const at::Tensor* C, const at::Tensor* n,
                 const at::Tensor* m, const char* what) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), DK = q.size(-1), DV = v.size(-1);
  if (C)
    TORCH_CHECK(C->sizes() == at::IntArrayRef({B, H, DK, DV}) && C->is_contiguous() && C->scalar_type() == acc,
                what, " C must be a contiguous (B, H, DK, DV) ", acc, " tensor, got ", C->sizes(), " ",
                C->scalar_type());
  if (n)
    TORCH_CHECK(n->sizes() == at::IntArrayRef({B, H, DK}) && n->is_contiguous() && n->scalar_type() == acc, what,
                " n must be a contiguous (B, H, DK) ", acc, " tensor, got ", n->sizes(), " ", n->scalar_type());
  if (m)
    TORCH_CHECK(m->sizes() == at::IntArrayRef({B, H}) && m->is_contiguous() && m->scalar_type() == acc, what,
                " m must be a contiguous (B, H) ", acc, " tensor, got ", m->sizes(), " ", m->scalar_type());
}

// ---------------------------------------------------------------------------------------------------------
// forward: one item = (batch, head)
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlstm_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& i, const at::Tensor& f,
    double scale, double eps, const c10::optional<at::Tensor>& C0, const c10::optional<at::Tensor>& n0,
    const c10::optional<at::Tensor>& m0, int64_t chunk) {
  check_mlstm(q, k, v, i, f, chunk);
  TORCH_CHECK(C0.has_value() == n0.has_value() && C0.has_value() == m0.has_value(),
              "the initial state's C, n and m must come together");
  if (C0) check_state(q, v, &*C0, &*n0, &*m0, "initial_state");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), DK = q.size(3), DV = v.size(3);
  const int64_t nc = (L + chunk - 1) / chunk;
  const auto acc = at::toOpMathType(q.scalar_type());
  auto h = at::empty({B, H, L, DV}, q.options());
  auto Cs = at::empty({B, H, nc + 1, DK, DV}, q.options().dtype(acc));
  auto ns = at::empty({B, H, nc + 1, DK}, q.options().dtype(acc));
  auto ms = at::empty({B, H, nc + 1}, q.options().dtype(acc));
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_mlstm_fwd", [&] {
    using A = work_t<scalar_t>;
    using S_ = acc_type<scalar_t>;
    const auto s = make_mlstm<scalar_t>(q, k, v, i, f, scale, eps, chunk);
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    S_ *cp = Cs.mutable_data_ptr<S_>(), *np = ns.mutable_data_ptr<S_>(), *mp = ms.mutable_data_ptr<S_>();
    const S_ *c0 = C0 ? C0->const_data_ptr<S_>() : nullptr, *n0p = n0 ? n0->const_data_ptr<S_>() : nullptr;
    const S_* m0p = m0 ? m0->const_data_ptr<S_>() : nullptr;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      typename Mlstm<scalar_t>::Buf b;
      s.alloc(b);
      std::vector<A> S(DK * s.DVP), nv(s.DKP);
      for (int64_t item = begin; item < end; ++item) {
        std::fill(S.begin(), S.end(), A(0));
        std::fill(nv.begin(), nv.end(), A(0));
        A m = 0;
        if (c0) {
          s.load_state(c0 + item * DK * DV, S.data());
          std::copy(n0p + item * DK, n0p + item * DK + DK, nv.begin());
          m = m0p[item];
        }
        for (int64_t c = 0; c <= nc; ++c) {
          s.store_state(S.data(), cp + (item * (nc + 1) + c) * DK * DV);
          std::copy(nv.begin(), nv.begin() + DK, np + (item * (nc + 1) + c) * DK);
          mp[item * (nc + 1) + c] = static_cast<S_>(m);
          if (c == nc) break;
          const int64_t t0 = c * chunk, n = std::min(chunk, L - t0);
          s.chunk(b, item, t0, n, S.data(), nv.data(), m);
          for (int64_t t = 0; t < n; ++t) {
            scalar_t* o = hp + (item * L + t0 + t) * DV;
            const A rz = A(1) / b.z[t];
            for (int64_t j = 0; j < DV; ++j) o[j] = static_cast<scalar_t>(b.num[t * s.DVP + j] * rz);
          }
          s.advance(b, n, S.data(), nv.data());
          m = b.mnew;
        }
      }
    });
  });
  return {h, Cs, ns, ms};
}

// ---------------------------------------------------------------------------------------------------------
// backward: chunks in reverse, each recomputed from the state saved before it; (dC, dn) the adjoint of the state
// at the chunk's end (dCT, dnT after the last chunk), carried to the chunk's start
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlstm_bwd(
    const at::Tensor& dh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& i,
    const at::Tensor& f, double scale, double eps, const at::Tensor& Cs, const at::Tensor& ns, const at::Tensor& ms,
    int64_t chunk, const c10::optional<at::Tensor>& dCT, const c10::optional<at::Tensor>& dnT) {
  check_mlstm(q, k, v, i, f, chunk);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), DK = q.size(3), DV = v.size(3);
  const int64_t nc = (L + chunk - 1) / chunk;
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(dh.sizes() == v.sizes() && dh.is_contiguous() && dh.scalar_type() == q.scalar_type(),
              "dh must be a contiguous tensor like v ", v.sizes(), ", got ", dh.sizes(), " ", dh.scalar_type());
  TORCH_CHECK(Cs.sizes() == at::IntArrayRef({B, H, nc + 1, DK, DV}) && Cs.is_contiguous() && Cs.scalar_type() == acc &&
                  ns.sizes() == at::IntArrayRef({B, H, nc + 1, DK}) && ns.is_contiguous() &&
                  ns.scalar_type() == acc && ms.sizes() == at::IntArrayRef({B, H, nc + 1}) &&
                  ms.is_contiguous() && ms.scalar_type() == acc,
              "Cs, ns and ms must be the forward's states, got ", Cs.sizes(), ", ", ns.sizes(), ", ", ms.sizes());
  check_state(q, v, dCT ? &*dCT : nullptr, dnT ? &*dnT : nullptr, nullptr, "the final state's gradient");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto di = at::empty_like(i), df = at::empty_like(f);
  auto dC0 = at::empty({B, H, DK, DV}, q.options().dtype(acc));
  auto dn0 = at::empty({B, H, DK}, q.options().dtype(acc));
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_mlstm_bwd", [&] {
    using T = scalar_t;
    using A = work_t<T>;
    using S_ = acc_type<T>;
    using M = Mlstm<T>;
    constexpr int64_t NP = M::NP;
    const auto s = make_mlstm<T>(q, k, v, i, f, scale, eps, chunk);
    const int64_t DKP = s.DKP, DVP = s.DVP, C = chunk;
    const T* dhp = dh.const_data_ptr<T>();
    const S_ *cp = Cs.const_data_ptr<S_>(), *np = ns.const_data_ptr<S_>(), *mp = ms.const_data_ptr<S_>();
    const S_ *dct = dCT ? dCT->const_data_ptr<S_>() : nullptr, *dnt = dnT ? dnT->const_data_ptr<S_>() : nullptr;
    T *dqp = dq.mutable_data_ptr<T>(), *dkp = dk.mutable_data_ptr<T>(), *dvp = dv.mutable_data_ptr<T>();
    T *dip = di.mutable_data_ptr<T>(), *dfp = df.mutable_data_ptr<T>();
    S_ *dc0 = dC0.mutable_data_ptr<S_>(), *dn0p = dn0.mutable_data_ptr<S_>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      typename Mlstm<T>::Buf b;
      s.alloc(b);
      std::vector<A> S(DK * DVP), nv(DKP), dC(DK * DVP), dn(DKP), dCa(DK * DVP), dna(DKP);
      std::vector<A> dQ(C * DKP), dK(C * DKP), dV(C * DVP), dnum(C * DVP), dden(C), dF(C), dI(C), dhb(DVP);
      // the GEMMs' operands: dP (C, C), a transpose Tr (max(C, DK), C), X (C, DKP), Kw = diag(w) K, and panels
      std::vector<A> dP(C * C), Tr(std::max(C, DK) * C), X(C * DKP), Kw(C * DKP);
      std::vector<A> Vt(M::up(C) * DV), Kc(M::up(DK) * C), Qc(M::up(DK) * C), Nc(M::up(DV) * C);
      std::vector<A> St(M::up(DK) * DV), Cc(M::up(DV) * DK);
      for (int64_t item = begin; item < end; ++item) {
        std::fill(dC.begin(), dC.end(), A(0));
        std::fill(dn.begin(), dn.end(), A(0));
        if (dct) s.load_state(dct + item * DK * DV, dC.data());
        if (dnt) std::copy(dnt + item * DK, dnt + item * DK + DK, dn.begin());
        for (int64_t c = nc - 1; c >= 0; --c) {
          const int64_t t0 = c * chunk, n = std::min(chunk, L - t0);
          s.load_state(cp + (item * (nc + 1) + c) * DK * DV, S.data());
          std::fill(nv.begin(), nv.end(), A(0));
          std::copy(np + (item * (nc + 1) + c) * DK, np + (item * (nc + 1) + c) * DK + DK, nv.begin());
          const A m = mp[item * (nc + 1) + c];
          s.chunk(b, item, t0, n, S.data(), nv.data(), m);
          std::fill(dF.begin(), dF.end(), A(0));
          std::fill(dI.begin(), dI.end(), A(0));
          std::fill(dna.begin(), dna.end(), A(0));
          // the output's adjoint: h = num / z, z = max(|den|, e^{-m_t}) + eps
          for (int64_t t = 0; t < n; ++t) {
            std::fill(dhb.begin(), dhb.end(), A(0));
            widen(dhp + (item * L + t0 + t) * DV, dhb.data(), DV);
            const A z = b.z[t], den = b.den[t];
            A* dnt_ = dnum.data() + t * DVP;
            for (int64_t j = 0; j < DVP; ++j) dnt_[j] = dhb[j] / z;
            const A dz = -dotv(dhb.data(), b.num + t * DVP, DVP) / (z * z);
            dden[t] = std::abs(den) >= std::exp(-b.mt[t]) ? (den >= 0 ? dz : -dz) : A(0);
          }
          // within the chunk, as GEMMs on packed panels (as the forward): dP = dnum V^T + dden (s <= t),
          // dS = dP o E, dD = dP o P; dQ = dS K, dK = dS^T Q, dV = P^T dnum
          panel::pack<A>(b.V, DVP, n, DV, Vt.data());
          M::gemm(n, dnum.data(), DVP, Vt.data(), DV * NP, dP.data(), C, nullptr, M::all(DV), M::tril_cols(n));
          for (int64_t t = 0; t < n; ++t) {
            A* dPt = dP.data() + t * C;
            const A* Pt = b.P + t * C;
            const A* Et = b.E + t * C;
            A row = 0;
            for (int64_t s_ = 0; s_ <= t; ++s_) {
              const A dp = dPt[s_] + dden[t], dD = dp * Pt[s_];
              dI[s_] += dD, dF[s_] -= dD, row += dD;
              dPt[s_] = dp * Et[s_];
            }
            dF[t] += row;
            std::fill(dPt + t + 1, dPt + n, A(0));
          }
          panel::pack_cols<A>(b.K, DKP, n, DK, Kc.data());
          M::gemm(n, dP.data(), C, Kc.data(), n * NP, dQ.data(), DKP, nullptr, M::upto(n), M::ncols(DK));
          at::vec::transpose_mxn<A>(dP.data(), C, Tr.data(), C, static_cast<int>(n), static_cast<int>(n));
          panel::pack_cols<A>(b.Q, DKP, n, DK, Qc.data());
          M::gemm(n, Tr.data(), C, Qc.data(), n * NP, dK.data(), DKP, nullptr, M::from(n), M::ncols(DK));
          at::vec::transpose_mxn<A>(b.P, C, Tr.data(), C, static_cast<int>(n), static_cast<int>(n));
          panel::pack_cols<A>(dnum.data(), DVP, n, DV, Nc.data());
          M::gemm(n, Tr.data(), C, Nc.data(), n * NP, dV.data(), DVP, nullptr, M::from(n), M::ncols(DV));
          // the state before the chunk: dQ_t += g_t (S dnum_t + dden_t n), dF_t += dnum_t . Ni_t + dden_t Di_t,
          // dCa = (diag(g) Q)^T dnum, dna = sum_t g_t dden_t q_t
          panel::pack<A>(S.data(), DVP, DK, DV, St.data());
          M::gemm(n, dnum.data(), DVP, St.data(), DV * NP, X.data(), DKP, nullptr, M::all(DV), M::ncols(DK));
          for (int64_t t = 0; t < n; ++t) {
            const A g = b.g[t], dd = dden[t];
            A* dQt = dQ.data() + t * DKP;
            const A* Xt = X.data() + t * DKP;
            for (int64_t d = 0; d < DK; ++d) dQt[d] += g * (Xt[d] + dd * nv[d]);
            dF[t] += dotv(dnum.data() + t * DVP, b.Ni + t * DVP, DVP) + dd * b.Di[t];
            axpy(g * dd, b.Q + t * DKP, dna.data(), DKP);
          }
          at::vec::transpose_mxn<A>(b.Q, DKP, Tr.data(), C, static_cast<int>(n), static_cast<int>(DK));
          for (int64_t d = 0; d < DK; ++d)
            for (int64_t t = 0; t < n; ++t) Tr[d * C + t] *= b.g[t];
          M::gemm(DK, Tr.data(), C, Nc.data(), n * NP, dCa.data(), DVP, nullptr, M::all(n), M::ncols(DV));
          // the move to the chunk's end: C' = G C + sum_s w_s k_s v_s^T, n' = G n + sum_s w_s k_s; with
          // X_s = dC v_s: da_s = w_s k_s . (X_s + dn), dk_s += w_s (X_s + dn), dV += diag(w) K dC
          A cc = dotv(dn.data(), nv.data(), DKP);
          for (int64_t d = 0; d < DK; ++d) cc += dotv(dC.data() + d * DVP, S.data() + d * DVP, DVP);
          A dFL = b.G * cc;
          panel::pack<A>(dC.data(), DVP, DK, DV, St.data());
          M::gemm(n, b.V, DVP, St.data(), DV * NP, X.data(), DKP, nullptr, M::all(DV), M::ncols(DK));
          for (int64_t s_ = 0; s_ < n; ++s_) {
            const A* Ks = b.K + s_ * DKP;
            A* Xs = X.data() + s_ * DKP;
            const A w = b.w[s_];
            for (int64_t d = 0; d < DKP; ++d) Xs[d] += dn[d];
            const A da = w * dotv(Ks, Xs, DKP);
            for (int64_t d = 0; d < DKP; ++d) dK[s_ * DKP + d] += w * Xs[d];
            for (int64_t d = 0; d < DKP; ++d) Kw[s_ * DKP + d] = w * Ks[d];
            dI[s_] += da, dFL += da, dF[s_] -= da;
          }
          panel::pack_cols<A>(dC.data(), DVP, DK, DV, Cc.data());
          M::gemm(n, Kw.data(), DKP, Cc.data(), DK * NP, dV.data(), DVP, dV.data(), M::all(DK), M::ncols(DV));
          dF[n - 1] += dFL;
          for (int64_t j = 0; j < DK * DVP; ++j) dC[j] = b.G * dC[j] + dCa[j];
          for (int64_t j = 0; j < DKP; ++j) dn[j] = b.G * dn[j] + dna[j];
          // F_t = sum_{r <= t} logf_r: dlogf_r = sum_{t >= r} dF_t; dlogsigmoid(f) / df = sigmoid(-f)
          A run = 0;
          for (int64_t t = n - 1; t >= 0; --t) {
            run += dF[t];
            const int64_t at_ = item * L + t0 + t;
            const A fv = static_cast<A>(s.f[at_]);
            dfp[at_] = static_cast<T>(run / (A(1) + std::exp(fv)));
            dip[at_] = static_cast<T>(dI[t]);
            for (int64_t d = 0; d < DK; ++d) {
              dqp[at_ * DK + d] = static_cast<T>(dQ[t * DKP + d] * s.scale);
              dkp[at_ * DK + d] = static_cast<T>(dK[t * DKP + d]);
            }
            for (int64_t j = 0; j < DV; ++j) dvp[at_ * DV + j] = static_cast<T>(dV[t * DVP + j]);
          }
        }
        s.store_state(dC.data(), dc0 + item * DK * DV);
        std::copy(dn.begin(), dn.begin() + DK, dn0p + item * DK);
      }
    });
  });
  return {dq, dk, dv, di, df, dC0, dn0};
}

// ---------------------------------------------------------------------------------------------------------
// the decoding step: q, k (B, H, DK), v (B, H, DV), i, f (B, H); the state (C, n, m) in, the new one out
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlstm_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& i, const at::Tensor& f,
    const at::Tensor& C, const at::Tensor& n, const at::Tensor& m, double scale, double eps) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (B, H, DK) tensor, got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && k.is_contiguous() && k.scalar_type() == q.scalar_type(),
              "k must be like q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.is_contiguous() &&
                  v.scalar_type() == q.scalar_type(),
              "v must be a contiguous (B, H, DV) tensor like q, got ", v.sizes());
  for (const auto* p : {&i, &f})
    TORCH_CHECK(p->sizes() == q.sizes().slice(0, 2) && p->is_contiguous() && p->scalar_type() == q.scalar_type(),
                "i and f must be contiguous (B, H) tensors like q, got ", p->sizes());
  check_state(q, v, &C, &n, &m, "state");
  const int64_t B = q.size(0), H = q.size(1), DK = q.size(2), DV = v.size(2);
  auto h = at::empty({B, H, DV}, q.options());
  auto C1 = at::empty_like(C), n1 = at::empty_like(n), m1 = at::empty_like(m);
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_mlstm_step", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    using Vec = Vectorized<A>;
    constexpr int64_t W = Vec::size();
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T *ip = i.const_data_ptr<T>(), *fp = f.const_data_ptr<T>();
    const A *Cp = C.const_data_ptr<A>(), *np = n.const_data_ptr<A>(), *mp = m.const_data_ptr<A>();
    T* hp = h.mutable_data_ptr<T>();
    A *C1p = C1.mutable_data_ptr<A>(), *n1p = n1.mutable_data_ptr<A>(), *m1p = m1.mutable_data_ptr<A>();
    const int64_t DVP = (DV + W - 1) / W * W;
    at::parallel_for(0, B * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(DK * DV, 1)), [&](int64_t b0, int64_t b1) {
      std::vector<A> qa(DK), ka(DK), va(DVP, A(0)), num(DVP), row(DVP, A(0));
      for (int64_t it = b0; it < b1; ++it) {
        to_acc(qp + it * DK, qa.data(), DK);
        to_acc(kp + it * DK, ka.data(), DK);
        to_acc(vp + it * DV, va.data(), DV);
        const A lf = log_sigmoid(static_cast<A>(fp[it])), iv = static_cast<A>(ip[it]), mo = mp[it];
        const A mn = std::max(lf + mo, iv), fg = std::exp(lf + mo - mn), ig = std::exp(iv - mn);
        std::fill(num.begin(), num.end(), A(0));
        A den = 0;
        for (int64_t d = 0; d < DK; ++d) {
          std::copy(Cp + (it * DK + d) * DV, Cp + (it * DK + d) * DV + DV, row.begin());
          const A kd = ig * ka[d];
          for (int64_t j = 0; j < DVP; j += W)
            at::vec::fmadd(Vec(fg), Vec::loadu(row.data() + j), Vec(kd) * Vec::loadu(va.data() + j)).store(row.data() + j);
          std::copy(row.begin(), row.begin() + DV, C1p + (it * DK + d) * DV);
          const A qd = qa[d] * static_cast<A>(scale);
          axpy(qd, row.data(), num.data(), DVP);
          const A nn = fg * np[it * DK + d] + kd;
          n1p[it * DK + d] = nn;
          den += qd * nn;
        }
        m1p[it] = mn;
        const A z = std::max(std::abs(den), std::exp(-mn)) + static_cast<A>(eps);
        for (int64_t j = 0; j < DV; ++j) hp[it * DV + j] = static_cast<T>(num[j] / z);
      }
    });
  });
  return {h, C1, n1, m1};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("mlstm_fwd", &mlstm_fwd);
  m.impl("mlstm_bwd", &mlstm_bwd);
  m.impl("mlstm_step", &mlstm_step);
}

}  // namespace tritium
