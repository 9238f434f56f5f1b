// Graph message passing CPU kernels, registered for the CPU key of the tritium ops python/tritium/ops/graph.py
// defines.
//
// The graph is CSR by destination: rowptr (Nd + 1) int64, col (E) int64 the source node of each edge, so the
// edges into destination i are e in [rowptr[i], rowptr[i + 1]). Its transpose (CSC: the same edges grouped by
// source) is csc_ptr (Ns + 1), csc_dst (E) the destination of each, csc_perm (E) the edge's index in CSR order;
// every backward that scatters to sources reads it, so each output row is written by one task (no atomics).
//
// graph_agg: out[i] = AGG_{e in row i} w_e x[col_e] over rows of x (Ns, F); AGG sum, mean (the sum over the
// row's edge count) or max (per feature, the first maximal edge saved in arg (Nd, F) int64 for the backward); w
// optional (1). A destination without edges gets 0 (arg -1). Backward: dx[j] = sum over the edges out of j of
// w_e s_i g[i] (s_i = 1, or 1 / deg(i) for mean; for max only the features whose arg is that edge), and
// dw_e = s_i <g[i], x[col_e]> (max: over the features whose arg is e).
//
// gat_fwd: GAT's edge softmax fused with the aggregation, per head h of x (Ns, H, C):
// z_e = a_src[col_e, h] + a_dst[i, h], s_e = leaky_relu(z_e), alpha_e = softmax over the row's edges of s,
// out[i, h] = sum_e alpha_e x[col_e, h]; the row's log-sum-exp lse (Nd, H) is saved (-inf without edges, out 0).
// gat_bwd: pass 1 over destinations recomputes alpha_e (from lse, renormalised), d alpha_e = <g[i, h], x[col_e, h]>, the row's
// delta = sum_e alpha_e d alpha_e, the score gradient ds_e = alpha_e (d alpha_e - delta) leaky'(z_e) and
// da_dst[i] = sum_e ds_e, keeping alpha and ds as (E, H) in the accumulation type (no (E, C) tensor);
// pass 2 over sources (the CSC) sums dx[j, h] = sum_e alpha_e g[i, h] and da_src[j, h] = sum_e ds_e.
// Accumulation is in float32 for 16-bit inputs (the accumulation type), rounded once per output.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

enum Agg : int64_t { SUM = 0, MEAN = 1, MAX = 2 };

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous 1-D int64 tensor, got ", t.dim(), "-D ", t.scalar_type());
}

void check_graph(const at::Tensor& rowptr, const at::Tensor& col) {
  check_index(rowptr, "rowptr");
  check_index(col, "col");
  TORCH_CHECK(rowptr.numel() >= 1, "rowptr must have at least one entry");
}

void check_csc(const at::Tensor& ptr, const at::Tensor& dst, const at::Tensor& perm, int64_t ns, int64_t e) {
  check_index(ptr, "csc_ptr");
  check_index(dst, "csc_dst");
  check_index(perm, "csc_perm");
  TORCH_CHECK(ptr.numel() == ns + 1, "csc_ptr must have num_src + 1 = ", ns + 1, " entries, got ", ptr.numel());
  TORCH_CHECK(dst.numel() == e && perm.numel() == e, "csc_dst and csc_perm must have one entry per edge (", e, ")");
}

// rows per parallel task: about 16K multiply-adds each
inline int64_t graph_grain(int64_t rows, int64_t edges, int64_t width) {
  const int64_t per_row = std::max<int64_t>(1, (edges / std::max<int64_t>(rows, 1) + 1) * width);
  return std::max<int64_t>(1, 16384 / per_row);
}

// acc[0, n) += a * x[0, n)
template <typename T>
inline void axpy(acc_type<T>* acc, acc_type<T> a, const T* x, int64_t n) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const V va(a);
  int64_t f = 0;
  for (; f + K <= n; f += K) at::vec::fmadd(va, IO::load(x + f), V::loadu(acc + f)).store(acc + f);
  for (; f < n; ++f) acc[f] += a * static_cast<acc_type<T>>(x[f]);
}

template <typename T>
inline acc_type<T> dot(const T* a, const T* b, int64_t n) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  V s(0);
  int64_t f = 0;
  for (; f + K <= n; f += K) s = at::vec::fmadd(IO::load(a + f), IO::load(b + f), s);
  acc_type<T> r = hsum(s);
  for (; f < n; ++f) r += static_cast<acc_type<T>>(a[f]) * static_cast<acc_type<T>>(b[f]);
  return r;
}

// out[0, n) = scale * acc[0, n), rounded once to T
template <typename T>
inline void store_scaled(T* out, const acc_type<T>* acc, acc_type<T> scale, int64_t n) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  int64_t f = 0;
  for (; f + K <= n; f += K) IO::store(out + f, V::loadu(acc + f) * V(scale));
  for (; f < n; ++f) out[f] = static_cast<T>(acc[f] * scale);
}

std::tuple<at::Tensor, at::Tensor> graph_agg(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                                             const std::optional<at::Tensor>& w,
                                             const std::optional<at::Tensor>& csc_ptr,
                                             const std::optional<at::Tensor>& csc_dst,
                                             const std::optional<at::Tensor>& csc_perm, int64_t agg) {
  (void)csc_ptr, (void)csc_dst, (void)csc_perm;  // the backward's (saved by autograd)
  check_graph(rowptr, col);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor (nodes, features)");
  TORCH_CHECK(agg >= SUM && agg <= MAX, "graph_agg: agg must be 0 (sum), 1 (mean) or 2 (max), got ", agg);
  const bool has_w = w.has_value() && w->defined();
  if (has_w) {
    TORCH_CHECK(w->dim() == 1 && w->numel() == col.numel() && w->is_contiguous() &&
                w->scalar_type() == x.scalar_type(), "weight must be a contiguous 1-D tensor of x's dtype with one "
                "entry per edge");
  }
  const int64_t nd = rowptr.numel() - 1, F = x.size(1), E = col.numel();
  at::Tensor out = tritium::empty({nd, F}, x.options());
  at::Tensor arg = agg == MAX ? at::empty({nd, F}, x.options().dtype(at::kLong)) : at::empty({0}, x.options().dtype(at::kLong));
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_graph_agg", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* wp = has_w ? w->const_data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    int64_t* ap = agg == MAX ? arg.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, nd, graph_grain(nd, E, F), [&](int64_t begin, int64_t end) {
      std::vector<A> acc(F);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t e0 = rp[i], e1 = rp[i + 1];
        T* orow = op + i * F;
        if (agg == MAX) {
          int64_t* arow = ap + i * F;
          std::fill(acc.begin(), acc.end(), -std::numeric_limits<A>::infinity());
          std::fill(arow, arow + F, int64_t(-1));
          for (int64_t e = e0; e < e1; ++e) {
            const T* xr = xp + cp[e] * F;
            const A we = wp ? static_cast<A>(wp[e]) : A(1);
            for (int64_t f = 0; f < F; ++f) {
              const A v = we * static_cast<A>(xr[f]);
              if (v > acc[f] || arow[f] < 0) {
                acc[f] = v;
                arow[f] = e;
              }
            }
          }
          if (e0 == e1) std::fill(acc.begin(), acc.end(), A(0));
          store_scaled(orow, acc.data(), A(1), F);
        } else {
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t e = e0; e < e1; ++e) axpy(acc.data(), wp ? static_cast<A>(wp[e]) : A(1), xp + cp[e] * F, F);
          const A scale = (agg == MEAN && e1 > e0) ? A(1) / static_cast<A>(e1 - e0) : A(1);
          store_scaled(orow, acc.data(), scale, F);
        }
      }
    });
  });
  return {out, arg};
}

std::tuple<at::Tensor, at::Tensor> graph_agg_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& rowptr,
                                                 const at::Tensor& col, const std::optional<at::Tensor>& w,
                                                 const at::Tensor& arg, const at::Tensor& csc_ptr,
                                                 const at::Tensor& csc_dst, const at::Tensor& csc_perm, int64_t agg,
                                                 bool need_x, bool need_w) {
  check_graph(rowptr, col);
  const int64_t nd = rowptr.numel() - 1, ns = x.size(0), F = x.size(1), E = col.numel();
  check_csc(csc_ptr, csc_dst, csc_perm, ns, E);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == nd && g.size(1) == F && g.is_contiguous() &&
              g.scalar_type() == x.scalar_type(), "grad must be a contiguous (num_dst, features) tensor of x's dtype");
  TORCH_CHECK(agg != MAX || (arg.dim() == 2 && arg.size(0) == nd && arg.size(1) == F && arg.is_contiguous()),
              "arg must be the forward's (num_dst, features) argmax");
  const bool has_w = w.has_value() && w->defined();
  at::Tensor dx = need_x ? tritium::empty({ns, F}, x.options()) : at::empty({0}, x.options());
  at::Tensor dw = need_w && has_w ? at::empty({E}, x.options()) : at::empty({0}, x.options());
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  const int64_t* tp = csc_ptr.const_data_ptr<int64_t>();
  const int64_t* td = csc_dst.const_data_ptr<int64_t>();
  const int64_t* tq = csc_perm.const_data_ptr<int64_t>();
  const int64_t* ap = agg == MAX ? arg.const_data_ptr<int64_t>() : nullptr;
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_graph_agg_bwd", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    const T* wp = has_w ? w->const_data_ptr<T>() : nullptr;
    if (need_x) {
      T* dxp = dx.data_ptr<T>();
      at::parallel_for(0, ns, graph_grain(ns, E, F), [&](int64_t begin, int64_t end) {
        std::vector<A> acc(F);
        for (int64_t j = begin; j < end; ++j) {
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t t = tp[j]; t < tp[j + 1]; ++t) {
            const int64_t i = td[t], e = tq[t];
            A c = wp ? static_cast<A>(wp[e]) : A(1);
            if (agg == MEAN) c /= static_cast<A>(rp[i + 1] - rp[i]);
            const T* grow = gp + i * F;
            if (agg == MAX) {
              const int64_t* arow = ap + i * F;
              for (int64_t f = 0; f < F; ++f) {
                if (arow[f] == e) acc[f] += c * static_cast<A>(grow[f]);
              }
            } else {
              axpy(acc.data(), c, grow, F);
            }
          }
          store_scaled(dxp + j * F, acc.data(), A(1), F);
        }
      });
    }
    if (need_w && has_w) {
      T* dwp = dw.data_ptr<T>();
      at::parallel_for(0, nd, graph_grain(nd, E, F), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t e0 = rp[i], e1 = rp[i + 1];
          const T* grow = gp + i * F;
          const A scale = agg == MEAN ? A(1) / static_cast<A>(std::max<int64_t>(e1 - e0, 1)) : A(1);
          for (int64_t e = e0; e < e1; ++e) {
            const T* xr = xp + cp[e] * F;
            A s = 0;
            if (agg == MAX) {
              const int64_t* arow = ap + i * F;
              for (int64_t f = 0; f < F; ++f) {
                if (arow[f] == e) s += static_cast<A>(grow[f]) * static_cast<A>(xr[f]);
              }
            } else {
              s = dot(grow, xr, F);
            }
            dwp[e] = static_cast<T>(s * scale);
          }
        }
      });
    }
  });
  return {dx, dw};
}

void check_gat(const at::Tensor& x, const at::Tensor& a_src, const at::Tensor& a_dst, int64_t nd) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous 3-D tensor (nodes, heads, channels)");
  const int64_t ns = x.size(0), H = x.size(1);
  TORCH_CHECK(a_src.dim() == 2 && a_src.size(0) == ns && a_src.size(1) == H && a_src.is_contiguous() &&
              a_src.scalar_type() == x.scalar_type(), "a_src must be a contiguous (num_src, heads) tensor of x's dtype");
  TORCH_CHECK(a_dst.dim() == 2 && a_dst.size(0) == nd && a_dst.size(1) == H && a_dst.is_contiguous() &&
              a_dst.scalar_type() == x.scalar_type(), "a_dst must be a contiguous (num_dst, heads) tensor of x's dtype");
}

std::tuple<at::Tensor, at::Tensor> gat_fwd(const at::Tensor& x, const at::Tensor& a_src, const at::Tensor& a_dst,
                                           const at::Tensor& rowptr, const at::Tensor& col,
                                           const std::optional<at::Tensor>& csc_ptr,
                                           const std::optional<at::Tensor>& csc_dst,
                                           const std::optional<at::Tensor>& csc_perm, double slope) {
  (void)csc_ptr, (void)csc_dst, (void)csc_perm;  // the backward's (saved by autograd)
  check_graph(rowptr, col);
  const int64_t nd = rowptr.numel() - 1, E = col.numel();
  check_gat(x, a_src, a_dst, nd);
  const int64_t H = x.size(1), C = x.size(2), HC = H * C;
  at::Tensor out = tritium::empty({nd, H, C}, x.options());
  const auto adt = at::toOpMathType(x.scalar_type());
  at::Tensor lse = at::empty({nd, H}, x.options().dtype(adt));
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_gat_fwd", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* sp = a_src.const_data_ptr<T>();
    const T* dp = a_dst.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    A* lp = lse.data_ptr<A>();
    const A sl = static_cast<A>(slope);
    at::parallel_for(0, nd, graph_grain(nd, E, HC), [&](int64_t begin, int64_t end) {
      std::vector<A> acc(HC), m(H), s(H), p;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t e0 = rp[i], e1 = rp[i + 1];
        p.resize((e1 - e0) * H);
        std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
        for (int64_t e = e0; e < e1; ++e) {  // the scores and their row maximum per head
          for (int64_t h = 0; h < H; ++h) {
            const A z = static_cast<A>(sp[cp[e] * H + h]) + static_cast<A>(dp[i * H + h]);
            const A v = z > A(0) ? z : z * sl;
            p[(e - e0) * H + h] = v;
            m[h] = std::max(m[h], v);
          }
        }
        std::fill(s.begin(), s.end(), A(0));
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t e = e0; e < e1; ++e) {
          const T* xr = xp + cp[e] * HC;
          for (int64_t h = 0; h < H; ++h) {
            const A q = std::exp(p[(e - e0) * H + h] - m[h]);
            s[h] += q;
            axpy(acc.data() + h * C, q, xr + h * C, C);
          }
        }
        for (int64_t h = 0; h < H; ++h) {
          const bool any = e1 > e0;
          store_scaled(op + i * HC + h * C, acc.data() + h * C, any ? A(1) / s[h] : A(0), C);
          lp[i * H + h] = any ? m[h] + std::log(s[h]) : -std::numeric_limits<A>::infinity();
        }
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gat_bwd(const at::Tensor& g, const at::Tensor& x,
                                                       const at::Tensor& a_src, const at::Tensor& a_dst,
                                                       const at::Tensor& rowptr, const at::Tensor& col,
                                                       const at::Tensor& lse, const at::Tensor& csc_ptr,
                                                       const at::Tensor& csc_dst, const at::Tensor& csc_perm,
                                                       double slope) {
  check_graph(rowptr, col);
  const int64_t nd = rowptr.numel() - 1, E = col.numel();
  check_gat(x, a_src, a_dst, nd);
  const int64_t ns = x.size(0), H = x.size(1), C = x.size(2), HC = H * C;
  check_csc(csc_ptr, csc_dst, csc_perm, ns, E);
  TORCH_CHECK(g.sizes() == at::IntArrayRef({nd, H, C}) && g.is_contiguous() && g.scalar_type() == x.scalar_type(),
              "grad must be a contiguous (num_dst, heads, channels) tensor of x's dtype");
  const auto adt = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({nd, H}) && lse.is_contiguous() && lse.scalar_type() == adt,
              "lse must be the forward's (num_dst, heads) log-sum-exp");
  at::Tensor dx = tritium::empty({ns, H, C}, x.options());
  at::Tensor da_src = at::empty({ns, H}, x.options());
  at::Tensor da_dst = at::empty({nd, H}, x.options());
  at::Tensor alpha = at::empty({E, H}, x.options().dtype(adt));
  at::Tensor dscore = at::empty({E, H}, x.options().dtype(adt));
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  const int64_t* tp = csc_ptr.const_data_ptr<int64_t>();
  const int64_t* td = csc_dst.const_data_ptr<int64_t>();
  const int64_t* tq = csc_perm.const_data_ptr<int64_t>();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_gat_bwd", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    const T* sp = a_src.const_data_ptr<T>();
    const T* dp = a_dst.const_data_ptr<T>();
    const A* lp = lse.const_data_ptr<A>();
    A* al = alpha.data_ptr<A>();
    A* ds = dscore.data_ptr<A>();
    const A sl = static_cast<A>(slope);
    // pass 1, by destination: alpha, the score gradients, da_dst
    at::parallel_for(0, nd, graph_grain(nd, E, HC), [&](int64_t begin, int64_t end) {
      std::vector<A> delta(H), asum(H);
      T* ddp = da_dst.data_ptr<T>();
      for (int64_t i = begin; i < end; ++i) {
        const int64_t e0 = rp[i], e1 = rp[i + 1];
        std::fill(delta.begin(), delta.end(), A(0));
        std::fill(asum.begin(), asum.end(), A(0));
        for (int64_t e = e0; e < e1; ++e) {
          for (int64_t h = 0; h < H; ++h) {
            const A z = static_cast<A>(sp[cp[e] * H + h]) + static_cast<A>(dp[i * H + h]);
            const A a = std::exp((z > A(0) ? z : z * sl) - lp[i * H + h]);
            al[e * H + h] = a;
            asum[h] += a;
          }
        }
        // alpha renormalised to sum 1 (removes the rounding of the saved log-sum-exp, common to the row)
        for (int64_t h = 0; h < H; ++h) asum[h] = A(1) / asum[h];
        for (int64_t e = e0; e < e1; ++e) {
          const T* xr = xp + cp[e] * HC;
          for (int64_t h = 0; h < H; ++h) {
            const A a = al[e * H + h] * asum[h];
            const A da = dot(gp + i * HC + h * C, xr + h * C, C);
            al[e * H + h] = a;
            ds[e * H + h] = da;
            delta[h] += a * da;
          }
        }
        for (int64_t h = 0; h < H; ++h) {
          A sum = 0;
          for (int64_t e = e0; e < e1; ++e) {
            const A z = static_cast<A>(sp[cp[e] * H + h]) + static_cast<A>(dp[i * H + h]);
            const A v = al[e * H + h] * (ds[e * H + h] - delta[h]) * (z > A(0) ? A(1) : sl);
            ds[e * H + h] = v;
            sum += v;
          }
          ddp[i * H + h] = static_cast<T>(sum);
        }
      }
    });
    // pass 2, by source (the CSC): dx and da_src
    at::parallel_for(0, ns, graph_grain(ns, E, HC), [&](int64_t begin, int64_t end) {
      std::vector<A> acc(HC), asum(H);
      T* dxp = dx.data_ptr<T>();
      T* dsp = da_src.data_ptr<T>();
      for (int64_t j = begin; j < end; ++j) {
        std::fill(acc.begin(), acc.end(), A(0));
        std::fill(asum.begin(), asum.end(), A(0));
        for (int64_t t = tp[j]; t < tp[j + 1]; ++t) {
          const int64_t i = td[t], e = tq[t];
          for (int64_t h = 0; h < H; ++h) {
            axpy(acc.data() + h * C, al[e * H + h], gp + i * HC + h * C, C);
            asum[h] += ds[e * H + h];
          }
        }
        store_scaled(dxp + j * HC, acc.data(), A(1), HC);
        for (int64_t h = 0; h < H; ++h) dsp[j * H + h] = static_cast<T>(asum[h]);
      }
    });
  });
  return {dx, da_src, da_dst};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("graph_agg", &graph_agg);
  m.impl("graph_agg_bwd", &graph_agg_bwd);
  m.impl("gat_fwd", &gat_fwd);
  m.impl("gat_bwd", &gat_bwd);
}

}  // namespace tritium
