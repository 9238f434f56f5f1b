// Kolmogorov-Arnold network spline term (efficient-kan's KANLinear spline branch), CPU kernels registered for the
// tritium ops python/tritium/ops/kan.py defines.
//
//   y[b, o] = sum_i sum_c B_c(x[b, i]; t_i) W[i, c, o]
//
// x (B, I); knots t (I, NK) per input feature (NK = grid_size + 2k + 1, non-decreasing); weight_t (I, NB, O) with
// NB = NK - 1 - k bases of order k (the (out, in, NB) spline weight permuted so a basis row is contiguous over out).
// B_c is the Cox-de Boor recursion exactly as efficient-kan evaluates it (order 0: t_c <= x < t_{c+1}; order d:
// (x - t_c) / (t_{c+d} - t_c) B_{c,d-1} + (t_{c+d+1} - x) / (t_{c+d+1} - t_{c+1}) B_{c+1,d-1}), but only on the
// k + 1 bases j - k .. j that can be nonzero in x's knot span [t_j, t_{j+1}): the (B, I, NB) basis tensor is
// never formed. The weight product then reads k + 1 contiguous rows of O weights per (b, i) instead of NB: a
// sparse-times-dense product whose FLOPs are (k + 1) / NB of the dense GEMM on the materialised bases.
//
// Backward: dx[b, i] = sum_c B'_c(x) <dy[b, :], W[i, c, :]> with B'_{c,k} = k (B_{c,k-1} / (t_{c+k} - t_c)
// - B_{c+1,k-1} / (t_{c+k+1} - t_{c+1})); dW[i, c, :] = sum_b B_c(x[b, i]) dy[b, :]. Both recompute the bases.
// Accumulation in float for 16-bit inputs (the weights and dy converted once), double for double.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kMaxOrder = 7;

// Items (rows or features) per task so that a task does at least ~32K multiply-adds: below that, one thread
// finishes before a parallel region would have started its second.
inline int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// x's knot span j (t_j <= x < t_{j+1}, -1 when x is outside [t_0, t_{NK-1}): all bases zero) and the order-k bases
// N[s] = B_{j-k+s,k}(x), s = 0..k (zero for indices outside [0, NK-1-k)). With dN, also their derivatives.
template <typename A>
inline int64_t spline_bases(A x, const A* t, const A* r, int64_t NK, int64_t k, A* N, A* dN) {
  const int64_t spans = NK - 1;
  if (!(x >= t[0] && x < t[spans])) return -1;
  int64_t j = 0;  // the largest j with t_j <= x (a few knots: a linear scan)
  while (j + 1 < spans && t[j + 1] <= x) ++j;
  // slot s holds index j - k + s of the current order; slot k + 1 is index j + 1, zero at every order below k
  // (its support starts at t_{j+1} > x)
  for (int64_t s = 0; s <= k + 1; ++s) N[s] = A(0);
  N[k] = A(1);
  for (int64_t d = 1; d <= k; ++d) {
    if (d == k && dN != nullptr) {  // the derivative from the order k - 1 bases
      for (int64_t s = 0; s <= k; ++s) {
        const int64_t c = j - k + s;
        if (c < 0 || c >= spans - k) {
          dN[s] = A(0);
          continue;
        }
        const A a = N[s] == A(0) ? A(0) : N[s] * r[(k - 1) * NK + c];
        const A b = N[s + 1] == A(0) ? A(0) : N[s + 1] * r[(k - 1) * NK + c + 1];
        dN[s] = A(k) * (a - b);
      }
    }
    const int64_t valid = spans - d;  // order d has indices 0 .. valid - 1
    for (int64_t s = k - d; s <= k; ++s) {  // in place upward: slot s + 1 still holds order d - 1
      const int64_t c = j - k + s;
      if (c < 0 || c >= valid) {
        N[s] = A(0);
        continue;
      }
      N[s] = (x - t[c]) * r[(d - 1) * NK + c] * N[s] + (t[c + d + 1] - x) * r[(d - 1) * NK + c + 1] * N[s + 1];
    }
  }
  if (k == 0 && dN != nullptr) dN[0] = A(0);
  return j;
}

// acc[0, n) += sum_s a[s] rows[s][0, n) over m rows (one pass over acc for all k + 1 bases)
template <typename A>
inline void axpy_rows(A* acc, const A* a, const A* const* rows, int64_t m, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t K = V::size();
  int64_t o = 0;
  for (; o + K <= n; o += K) {
    V v = V::loadu(acc + o);
    for (int64_t s = 0; s < m; ++s) v = at::vec::fmadd(V(a[s]), V::loadu(rows[s] + o), v);
    v.store(acc + o);
  }
  for (; o < n; ++o) {
    A v = acc[o];
    for (int64_t s = 0; s < m; ++s) v += a[s] * rows[s][o];
    acc[o] = v;
  }
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t K = V::size();
  V v(A(0));
  int64_t o = 0;
  for (; o + K <= n; o += K) v = at::vec::fmadd(V::loadu(a + o), V::loadu(b + o), v);
  A r = at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, v);
  for (; o < n; ++o) r += a[o] * b[o];
  return r;
}

// The knots in the accumulation type and, per feature, the reciprocals of the knot differences the recursion
// divides by: r[i][(d - 1) * NK + c] = 1 / (t[i][c + d] - t[i][c]) for d = 1..k and c + d < NK (a multiply per
// term instead of a division: the divisions were the bases' critical path).
template <typename A>
std::pair<at::Tensor, at::Tensor> knot_tables(const at::Tensor& grid, int64_t k) {
  const at::Tensor t = grid.to(c10::CppTypeToScalarType<A>::value).contiguous();
  const int64_t I = t.size(0), NK = t.size(1);
  at::Tensor r = at::zeros({I, std::max<int64_t>(k, 1) * NK}, t.options());
  const A* tp = t.const_data_ptr<A>();
  A* rp = r.mutable_data_ptr<A>();
  for (int64_t i = 0; i < I; ++i)
    for (int64_t d = 1; d <= k; ++d)
      for (int64_t c = 0; c + d < NK; ++c)
        rp[i * k * NK + (d - 1) * NK + c] = A(1) / (tp[i * NK + c + d] - tp[i * NK + c]);
  return {t, r};
}

void check_args(const at::Tensor& x, const at::Tensor& grid, const at::Tensor& weight_t, int64_t order) {
  TORCH_CHECK(x.dim() == 2, "kan_spline: x must be (batch, in), got ", x.dim(), "-D");
  TORCH_CHECK(grid.dim() == 2 && grid.size(0) == x.size(1), "kan_spline: grid must be (in=", x.size(1),
              ", knots), got ", grid.sizes());
  TORCH_CHECK(order >= 0 && order <= kMaxOrder, "kan_spline: spline order must be in [0, ", kMaxOrder, "], got ",
              order);
  TORCH_CHECK(grid.size(1) >= order + 2, "kan_spline: ", grid.size(1), " knots give no basis of order ", order);
  TORCH_CHECK(weight_t.dim() == 3 && weight_t.size(0) == x.size(1) && weight_t.size(1) == grid.size(1) - 1 - order,
              "kan_spline: weight_t must be (in, knots - 1 - order, out) = (", x.size(1), ", ",
              grid.size(1) - 1 - order, ", out), got ", weight_t.sizes());
  TORCH_CHECK(weight_t.scalar_type() == x.scalar_type(), "kan_spline: weight_t must have x's dtype");
  TORCH_CHECK(grid.is_floating_point(), "kan_spline: grid must be floating point");
}

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& grid, const at::Tensor& weight_t, int64_t k, at::Tensor& y) {
  using A = acc_type<T>;
  const int64_t Bn = x.size(0), I = x.size(1), NK = grid.size(1), NB = NK - 1 - k, O = weight_t.size(2);
  const auto acc_kind = c10::CppTypeToScalarType<A>::value;
  at::Tensor t, r;
  std::tie(t, r) = knot_tables<A>(grid, k);
  const at::Tensor w = weight_t.to(acc_kind).contiguous();  // a copy for 16-bit weights only
  const A* tp = t.const_data_ptr<A>();
  const A* rp = r.const_data_ptr<A>();
  const A* wp = w.const_data_ptr<A>();
  const T* xp = x.const_data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, Bn, grain(I * (k + 1) * O),
                   [&](int64_t b0, int64_t b1) {
    std::vector<A> acc(O);
    A N[kMaxOrder + 2], a[kMaxOrder + 1];
    const A* rows[kMaxOrder + 1];
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t i = 0; i < I; ++i) {
        const int64_t j = spline_bases<A>(static_cast<A>(xp[b * sx0 + i * sx1]), tp + i * NK, rp + i * k * NK, NK, k,
                                          N, nullptr);
        if (j < 0) continue;
        int64_t m = 0;
        for (int64_t s = 0; s <= k; ++s) {
          const int64_t c = j - k + s;
          if (c < 0 || c >= NB) continue;
          a[m] = N[s];
          rows[m++] = wp + (i * NB + c) * O;
        }
        axpy_rows<A>(acc.data(), a, rows, m, O);
      }
      for (int64_t o = 0; o < O; ++o) yp[b * O + o] = static_cast<T>(acc[o]);
    }
  });
}

at::Tensor kan_spline_fwd(const at::Tensor& x, const at::Tensor& grid, const at::Tensor& weight_t, int64_t order) {
  check_args(x, grid, weight_t, order);
  auto y = empty({x.size(0), weight_t.size(2)}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_kan_spline_fwd",
                            [&] { fwd_impl<scalar_t>(x, grid, weight_t, order, y); });
  return y;
}

template <typename T>
void bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grid, const at::Tensor& weight_t,
              int64_t k, at::Tensor* dx, at::Tensor* dw) {
  using A = acc_type<T>;
  const int64_t Bn = x.size(0), I = x.size(1), NK = grid.size(1), NB = NK - 1 - k, O = weight_t.size(2);
  const auto acc_kind = c10::CppTypeToScalarType<A>::value;
  at::Tensor t, r;
  std::tie(t, r) = knot_tables<A>(grid, k);
  const at::Tensor g = dy.to(acc_kind).contiguous();
  const A* tp = t.const_data_ptr<A>();
  const A* rp = r.const_data_ptr<A>();
  const A* gp = g.const_data_ptr<A>();
  const T* xp = x.const_data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  if (dx != nullptr) {
    const at::Tensor w = weight_t.to(acc_kind).contiguous();
    const A* wp = w.const_data_ptr<A>();
    T* dxp = dx->mutable_data_ptr<T>();
    at::parallel_for(0, Bn, grain(I * (k + 1) * O),
                     [&](int64_t b0, int64_t b1) {
      A N[kMaxOrder + 2], dN[kMaxOrder + 1];
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < I; ++i) {
          const int64_t j =
              spline_bases<A>(static_cast<A>(xp[b * sx0 + i * sx1]), tp + i * NK, rp + i * k * NK, NK, k, N, dN);
          A acc = A(0);
          if (j >= 0) {
            for (int64_t s = 0; s <= k; ++s) {
              const int64_t c = j - k + s;
              if (c < 0 || c >= NB || dN[s] == A(0)) continue;
              acc += dN[s] * dot<A>(gp + b * O, wp + (i * NB + c) * O, O);
            }
          }
          dxp[b * I + i] = static_cast<T>(acc);
        }
      }
    });
  }
  if (dw != nullptr) {
    // each task owns a range of input features (its rows of dW: no races); the batch in the outer loop so that a
    // dy row is read once per task
    at::Tensor acc = at::zeros({I, NB, O}, dy.options().dtype(acc_kind));
    A* ap = acc.mutable_data_ptr<A>();
    at::parallel_for(0, I, grain(Bn * (k + 1) * O), [&](int64_t i0, int64_t i1) {
      A N[kMaxOrder + 2];
      for (int64_t b = 0; b < Bn; ++b) {
        const A* grow = gp + b * O;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t j = spline_bases<A>(static_cast<A>(xp[b * sx0 + i * sx1]), tp + i * NK, rp + i * k * NK, NK,
                                            k, N, nullptr);
          if (j < 0) continue;
          for (int64_t s = 0; s <= k; ++s) {
            const int64_t c = j - k + s;
            if (c < 0 || c >= NB || N[s] == A(0)) continue;
            A* row = ap + (i * NB + c) * O;
            const A* src[1] = {grow};
            axpy_rows<A>(row, &N[s], src, 1, O);
          }
        }
      }
    });
    *dw = std::is_same_v<A, T> ? acc : acc.to(x.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> kan_spline_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grid,
                                                  const at::Tensor& weight_t, int64_t order, bool need_dx,
                                                  bool need_dw) {
  check_args(x, grid, weight_t, order);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == weight_t.size(2),
              "kan_spline_bwd: dy must be (batch, out)");
  at::Tensor dx = need_dx ? empty({x.size(0), x.size(1)}, x.options()) : at::empty({0}, x.options());
  at::Tensor dw = at::empty({0}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_kan_spline_bwd", [&] {
    bwd_impl<scalar_t>(dy, x, grid, weight_t, order, need_dx ? &dx : nullptr, need_dw ? &dw : nullptr);
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("kan_spline_fwd", &kan_spline_fwd);
  m.impl("kan_spline_bwd", &kan_spline_bwd);
}

}  // namespace tritium
