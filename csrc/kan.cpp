// Kolmogorov-Arnold network spline term (efficient-kan's KANLinear spline branch), CPU kernels registered for the
// tritium ops python/tritium/ops/kan.py defines.
//
//   y[b, o] = sum_i sum_c B_c(x[b, i]; t_i) W[i, c, o]
//
// x (B, I); knots t (I, NK) per input feature (NK = grid_size + 2k + 1, non-decreasing); weight_t (I, NB, O) with
// NB = NK - 1 - k bases of order k: the (out, in, NB) spline weight permuted, of any strides (tritium.kan_spline
// passes the permuted view itself; the products' own copy of the weight is made by tiled transposes).
// B_c is the Cox-de Boor recursion exactly as efficient-kan evaluates it (order 0: t_c <= x < t_{c+1}; order d:
// (x - t_c) / (t_{c+d} - t_c) B_{c,d-1} + (t_{c+d+1} - x) / (t_{c+d+1} - t_{c+1}) B_{c+1,d-1}), evaluated in the
// accumulation type on the k + 1 bases j - k .. j that can be nonzero in x's knot span [t_j, t_{j+1}).
//
// The product is a GEMM: a block of rows' bases P (rows, NB, I) times the weight permuted to (NB, I, O), viewed as
// (NB * I, O). In float / double that matrix is packed once into column panels and each L2-sized block of bases
// (kPanelBlockBytes) goes straight into tritium's panel GEMM (csrc/panel.h); in 16-bit types the blocks of at most
// kBlockElems basis values go to ATen's matrix product. Either way the whole basis tensor is never held. The k + 1
// nonzero bases of NB make this (NB / (k + 1)) times the multiply-adds of a sparse product, but at the GEMM's rate,
// which a scalar-times-row loop over the k + 1 weight rows of every (b, i) is far from. The bases are evaluated densely (all NB, by the full recursion) a vector of features at a time,
// which is why P's features are its fastest dimension: a span search and k + 1 bases per (b, i) in scalar code
// took as long as the GEMM. The exception is a forward of a few outputs in float / double (kFewOutputs): there
// each row's outputs are summed straight from the basis vectors, with no block and no GEMM.
//
// Backward, per block: dW (NB * I, O) += P^T dy (accumulated in float for 16-bit inputs, then rounded once);
// dx[b, i] = sum_c B'_c(x) G[b, c, i] with G = dy W^T (a GEMM) and
// B'_{c,k} = k (B_{c,k-1} / (t_{c+k} - t_c) - B_{c+1,k-1} / (t_{c+k+1} - t_{c+1})). G comes first (it needs no
// bases), then one pass evaluates each block's bases once with their derivatives and writes P and dx together. The
// products run in x's dtype (float16 in float: ATen has no fast float16 GEMM on CPU) and float64 stays float64.
#include "panel.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kMaxOrder = 7;

// The most basis values a block of rows holds at once (16 MiB in float32): whole batches of a KAN layer fit in one
// block, and a block larger than this would only trade cache for fewer GEMM calls.
constexpr int64_t kBlockElems = int64_t(1) << 22;
// The bases a float / double block holds for the panel GEMM: L2-sized
constexpr int64_t kPanelBlockBytes = 512 * 1024;

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

// The dtype the block products run in: x's, but float for float16.
inline at::ScalarType gemm_type(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// Rows of a block: as many as keep its bases within kBlockElems (at least one).
inline int64_t block_rows(int64_t rows, int64_t width) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, kBlockElems / std::max<int64_t>(1, width)));
}

// The knots feature-minor for the vector recursion: tT (NK, I) = t^T and rT (max(k, 1), NK, I) with
// rT[d - 1][c][i] = 1 / (t_i[c + d] - t_i[c]), 0 where that interval is empty (its basis of order d - 1 is zero, and
// the scalar recursion skips it: 0 * inf would be NaN).
template <typename A>
std::pair<at::Tensor, at::Tensor> knot_tables_t(const at::Tensor& grid, int64_t k) {
  const at::Tensor tT = grid.to(c10::CppTypeToScalarType<A>::value).t().contiguous();
  const int64_t NK = tT.size(0), I = tT.size(1);
  at::Tensor rT = at::zeros({std::max<int64_t>(k, 1), NK, I}, tT.options());
  const A* tp = tT.const_data_ptr<A>();
  A* rp = rT.mutable_data_ptr<A>();
  for (int64_t d = 1; d <= k; ++d)
    for (int64_t c = 0; c + d < NK; ++c)
      for (int64_t i = 0; i < I; ++i) {
        const A w = tp[(c + d) * I + i] - tp[c * I + i];
        rp[((d - 1) * NK + c) * I + i] = w == A(0) ? A(0) : A(1) / w;
      }
  return {tT, rT};
}

// x[i0 .. i0 + n) of one row in the accumulation type, zeros past n: a vector load where the row is contiguous (a
// buffer filled element by element, which the compiler makes a rep movs, then loaded as a vector stalls on the
// store forwarding: a sixth of the forward's basis pass)
template <typename T, typename A>
inline Vectorized<A> x_vec(const T* xrow, int64_t sx1, int64_t i0, int64_t n) {
  using V = Vectorized<A>;
  if (sx1 == 1 && n == V::size()) return VecIO<T>::load(xrow + i0);
  A buf[V::size()];
  for (int64_t l = 0; l < n; ++l) buf[l] = static_cast<A>(xrow[(i0 + l) * sx1]);
  for (int64_t l = n; l < V::size(); ++l) buf[l] = A(0);
  return V::loadu(buf);
}

// The order-k bases of n <= V features i0 .. i0 + n of row b, densely: Bv[c] for c = 0 .. NB - 1 (zero outside
// [t_0, t_{NK-1}), NaN included), and with dBv their derivatives. Bv holds NK - 1 vectors (the order-0 indicators).
template <typename T, typename A>
inline void bases_vec(const T* xrow, int64_t sx1, int64_t i0, int64_t n, const A* tT, const A* rT, int64_t I,
                      int64_t NK, int64_t k, Vectorized<A>* Bv, Vectorized<A>* dBv) {
  using V = Vectorized<A>;
  const V x = x_vec<T, A>(xrow, sx1, i0, n);
  const V one(A(1)), zero(A(0));
  auto t = [&](int64_t c) { return V::loadu(tT + c * I + i0, n); };
  auto r = [&](int64_t d, int64_t c) { return V::loadu(rT + ((d - 1) * NK + c) * I + i0, n); };
  const V inside = (x >= t(0)) & (x < t(NK - 1));
  V lo = t(0);
  for (int64_t c = 0; c + 1 < NK; ++c) {
    const V hi = t(c + 1);
    Bv[c] = V::blendv(zero, one, (x >= lo) & (x < hi));
    lo = hi;
  }
  for (int64_t d = 1; d <= k; ++d) {
    const int64_t count = NK - 1 - d;  // order d has bases 0 .. count - 1
    if (d == k && dBv != nullptr)
      for (int64_t c = 0; c < count; ++c) dBv[c] = V(A(k)) * (Bv[c] * r(k, c) - Bv[c + 1] * r(k, c + 1));
    for (int64_t c = 0; c < count; ++c)  // upward in place: Bv[c + 1] still holds order d - 1
      Bv[c] = (x - t(c)) * r(d, c) * Bv[c] + (t(c + d + 1) - x) * r(d, c + 1) * Bv[c + 1];
  }
  const int64_t NB = NK - 1 - k;
  for (int64_t c = 0; c < NB; ++c) Bv[c] = V::blendv(zero, Bv[c], inside);
  if (dBv != nullptr) {
    if (k == 0)
      for (int64_t c = 0; c < NB; ++c) dBv[c] = zero;
    for (int64_t c = 0; c < NB; ++c) dBv[c] = V::blendv(zero, dBv[c], inside);
  }
}

// Rows per parallel task of a per-row loop over I features: at least ~4K features a task.
inline int64_t row_grain(int64_t I) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, I)); }

// P[r, c, i] = B_c(x[b0 + r, i]) for the rows b0 .. b0 + P.size(0) of x; P (rows, NB * I) of type P_t.
template <typename T, typename P_t>
void fill_bases(const at::Tensor& x, int64_t b0, const at::Tensor& tT, const at::Tensor& rT, int64_t k,
                at::Tensor& P) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  const int64_t rows = P.size(0), I = x.size(1), NK = tT.size(0), NB = NK - 1 - k;
  const T* xp = x.const_data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const A* tp = tT.const_data_ptr<A>();
  const A* rp = rT.const_data_ptr<A>();
  P_t* pp = P.mutable_data_ptr<P_t>();
  at::parallel_for(0, rows, row_grain(I), [&](int64_t r0, int64_t r1) {
    std::vector<V> Bv(NK - 1);
    A out[V::size()];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i0 = 0; i0 < I; i0 += V::size()) {
        const int64_t n = std::min<int64_t>(V::size(), I - i0);
        bases_vec<T, A>(xp + (b0 + r) * sx0, sx1, i0, n, tp, rp, I, NK, k, Bv.data(), nullptr);
        for (int64_t c = 0; c < NB; ++c) {
          P_t* dst = pp + (r * NB + c) * I + i0;
          if constexpr (std::is_same_v<P_t, A>) {
            Bv[c].store(dst, n);
          } else {
            Bv[c].store(out);
            for (int64_t l = 0; l < n; ++l) dst[l] = static_cast<P_t>(out[l]);
          }
        }
      }
    }
  });
}

// weight_t viewing efficient-kan's (O, I, NB) spline weight, contiguous in that order: tritium.kan_spline passes the
// weight permuted without a copy (a contiguous weight_t, the other layout, wins where both hold: size-1 dims)
inline bool oin_layout(const at::Tensor& weight_t) {
  return !weight_t.is_contiguous() && weight_t.permute({2, 0, 1}).is_contiguous();
}

constexpr int64_t kTile = 16;  // the 16 x 16 tiles of the weight transposes (at::vec::transpose_mxn's register tile)

// f(o0, mo, k0, mk) over the tiles of a (O, K) matrix, the tile rows of O split between the threads
template <typename F>
void for_each_tile(int64_t O, int64_t K, const F& f) {
  at::parallel_for(0, (O + kTile - 1) / kTile, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t ob = b0; ob < b1; ++ob) {
      const int64_t o0 = ob * kTile;
      for (int64_t k0 = 0; k0 < K; k0 += kTile) f(o0, std::min(kTile, O - o0), k0, std::min(kTile, K - k0));
    }
  });
}

// The GEMM matrix's row (c * I + i) of column k = i * NB + c of the (O, I * NB) weight
inline int64_t gemm_row(int64_t k, int64_t I, int64_t NB) { return (k % NB) * I + k / NB; }

// g (NB * I, O) with row c * I + i = w[:, i, c], for w (O, I, NB) contiguous: w viewed as (O, K = I * NB) is
// transposed in tiles, and each transposed row k goes to its row gemm_row(k). ATen's copy of this permute gathers
// element by element at a stride of K: a third of the forward's time outside its product.
template <typename T>
void oin_to_gemm(const T* w, T* g, int64_t O, int64_t I, int64_t NB) {
  const int64_t K = I * NB;
  for_each_tile(O, K, [&](int64_t o0, int64_t mo, int64_t k0, int64_t mk) {
    T tile[kTile * kTile];
    at::vec::transpose_mxn<T>(w + o0 * K + k0, K, tile, kTile, int(mo), int(mk));  // tile[kk][oo]
    for (int64_t kk = 0; kk < mk; ++kk)
      std::memcpy(g + gemm_row(k0 + kk, I, NB) * O + o0, tile + kk * kTile, mo * sizeof(T));
  });
}

// The inverse of oin_to_gemm, rounding to T: w (O, I, NB) contiguous from g (NB * I, O) in the accumulation type.
template <typename T, typename A>
void gemm_to_oin(const A* g, T* w, int64_t O, int64_t I, int64_t NB) {
  const int64_t K = I * NB;
  for_each_tile(O, K, [&](int64_t o0, int64_t mo, int64_t k0, int64_t mk) {
    A tile[kTile * kTile], tr[kTile * kTile];
    for (int64_t kk = 0; kk < mk; ++kk)
      std::memcpy(tile + kk * kTile, g + gemm_row(k0 + kk, I, NB) * O + o0, mo * sizeof(A));
    at::vec::transpose_mxn<A>(tile, kTile, tr, kTile, int(mk), int(mo));  // tr[oo][kk]
    for (int64_t oo = 0; oo < mo; ++oo)
      for (int64_t kk = 0; kk < mk; ++kk) w[(o0 + oo) * K + k0 + kk] = static_cast<T>(tr[oo * kTile + kk]);
  });
}

// weight_t (I, NB, O) as the (NB * I, O) matrix the blocks multiply, in type gt (a copy)
inline at::Tensor gemm_weight(const at::Tensor& weight_t, at::ScalarType gt) {
  const int64_t I = weight_t.size(0), NB = weight_t.size(1), O = weight_t.size(2);
  if (!oin_layout(weight_t) || weight_t.scalar_type() != gt)
    return weight_t.permute({1, 0, 2}).to(gt).contiguous().view({NB * I, O});
  at::Tensor g = at::empty({NB * I, O}, weight_t.options());
  TRITIUM_DISPATCH_FLOATING(gt, "tritium_kan_gemm_weight", [&] {
    oin_to_gemm<scalar_t>(weight_t.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(), O, I, NB);
  });
  return g;
}

// Outputs up to this many: a forward whose products run in float or double sums y straight from the basis vectors
// (few_outputs_fwd) instead of a GEMM. A classifier head's handful of columns (MKL's sgemm at 8-10 columns takes
// longer than at 16) costs that GEMM twice the direct sums; from 16 columns, and with bfloat16's dot products, the
// GEMM wins (bench/results/).
constexpr int64_t kFewOutputs = 12;

// y for O <= kFewOutputs: each row's O sums accumulated from its basis vectors (a vector accumulator per output,
// reduced once per row) against the weight laid out (O, NB, I) with the features fastest; no block of bases.
template <typename T>
void few_outputs_fwd(const at::Tensor& x, const at::Tensor& tT, const at::Tensor& rT, int64_t k,
                     const at::Tensor& weight_t, at::Tensor& y) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  const int64_t Bn = x.size(0), I = x.size(1), NK = tT.size(0), NB = NK - 1 - k, O = weight_t.size(2);
  // features padded to whole vectors with zero weights: the padded lanes' bases (of x = 0) then add nothing
  const int64_t Ip = (I + V::size() - 1) / V::size() * V::size();
  at::Tensor wd = at::zeros({O, NB, Ip}, tT.options());
  wd.narrow(2, 0, I).copy_(weight_t.permute({2, 1, 0}));
  const A* wp = wd.const_data_ptr<A>();
  const T* xp = x.const_data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const A* tp = tT.const_data_ptr<A>();
  const A* rp = rT.const_data_ptr<A>();
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, Bn, row_grain(I), [&](int64_t r0, int64_t r1) {
    std::vector<V> Bv(NK - 1), acc(O);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), V(A(0)));
      for (int64_t i0 = 0; i0 < I; i0 += V::size()) {
        bases_vec<T, A>(xp + r * sx0, sx1, i0, std::min<int64_t>(V::size(), I - i0), tp, rp, I, NK, k, Bv.data(),
                        nullptr);
        for (int64_t o = 0; o < O; ++o) {
          const A* wo = wp + o * NB * Ip + i0;
          V a = acc[o];
          for (int64_t c = 0; c < NB; ++c) a = at::vec::fmadd(Bv[c], V::loadu(wo + c * Ip), a);
          acc[o] = a;
        }
      }
      for (int64_t o = 0; o < O; ++o) yp[r * O + o] = static_cast<T>(hsum(acc[o]));
    }
  });
}

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& grid, const at::Tensor& weight_t, int64_t k, at::Tensor& y) {
  using A = acc_type<T>;
  const int64_t Bn = x.size(0), I = x.size(1), NK = grid.size(1), NB = NK - 1 - k;
  const at::ScalarType gt = gemm_type(x.scalar_type());
  at::Tensor tT, rT;
  std::tie(tT, rT) = knot_tables_t<A>(grid, k);
  if (weight_t.size(2) <= kFewOutputs && gt != at::kBFloat16) return few_outputs_fwd<T>(x, tT, rT, k, weight_t, y);
  const at::Tensor w = gemm_weight(weight_t, gt);
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    // float / double: the (NB * I, O) matrix packed once into column panels; then per block of rows that stays in
    // L2 (kPanelBlockBytes of bases) the bases and the panel GEMM into y's rows (no large block of bases streamed
    // to memory and back, no packing per product)
    const int64_t K = NB * I, O = w.size(1);
    std::vector<T> packed(panel::packed_size<T>(O, K));
    panel::pack_cols<T>(w.const_data_ptr<T>(), O, K, O, packed.data());
    const int64_t rows = std::max<int64_t>(panel::kMR, kPanelBlockBytes / int64_t(sizeof(T)) / K);
    at::Tensor P = at::empty({std::min(rows, Bn), K}, x.options());
    for (int64_t b0 = 0; b0 < Bn; b0 += rows) {
      const int64_t n = std::min(rows, Bn - b0);
      at::Tensor Pn = P.narrow(0, 0, n);
      fill_bases<T, T>(x, b0, tT, rT, k, Pn);
      panel_gemm<T, T>(Pn.const_data_ptr<T>(), K, n, K, packed.data(), O, y.mutable_data_ptr<T>() + b0 * O, O);
    }
    return;
  }
  // the products write y's rows in place, or a float block result rounded into them (float16)
  const bool direct = gt == x.scalar_type();
  const int64_t rows = block_rows(Bn, I * NB);
  for (int64_t b0 = 0; b0 < Bn; b0 += rows) {
    const int64_t n = std::min(rows, Bn - b0);
    at::Tensor P = at::empty({n, NB * I}, x.options().dtype(gt));
    if (direct) {
      fill_bases<T, T>(x, b0, tT, rT, k, P);
      at::Tensor out = y.narrow(0, b0, n);
      at::mm_out(out, P, w);
    } else {
      fill_bases<T, float>(x, b0, tT, rT, k, P);
      y.narrow(0, b0, n).copy_(at::mm(P, w));
    }
  }
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
  using V = Vectorized<A>;
  const int64_t Bn = x.size(0), I = x.size(1), NK = grid.size(1), NB = NK - 1 - k, O = weight_t.size(2);
  const auto acc_kind = c10::CppTypeToScalarType<A>::value;
  const at::ScalarType gt = gemm_type(x.scalar_type());
  at::Tensor tT, rT;
  std::tie(tT, rT) = knot_tables_t<A>(grid, k);
  const A* tp = tT.const_data_ptr<A>();
  const A* rp = rT.const_data_ptr<A>();
  const T* xp = x.const_data_ptr<T>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  // dW in the accumulation type over the blocks (one rounding to x's dtype at the end)
  at::Tensor acc = dw != nullptr ? at::zeros({NB * I, O}, dy.options().dtype(acc_kind)) : at::Tensor();
  const at::Tensor w = dx != nullptr ? gemm_weight(weight_t, gt) : at::Tensor();
  const int64_t rows = block_rows(Bn, I * NB);
  for (int64_t b0 = 0; b0 < Bn; b0 += rows) {
    const int64_t n = std::min(rows, Bn - b0);
    at::Tensor P = dw != nullptr ? at::empty({n, NB * I}, x.options().dtype(acc_kind)) : at::Tensor();
    if (dx == nullptr) {
      fill_bases<T, A>(x, b0, tT, rT, k, P);
    } else {
      // G = dy W^T does not depend on the bases: one pass after it evaluates each vector of bases once, with
      // their derivatives, writing P's block (when dW is asked for too) and dx together
      const at::Tensor G = at::mm(dy.narrow(0, b0, n).to(gt), w.t()).to(acc_kind);  // (n, NB * I)
      const A* gp = G.const_data_ptr<A>();
      A* pp = dw != nullptr ? P.mutable_data_ptr<A>() : nullptr;
      T* dxp = dx->mutable_data_ptr<T>();
      at::parallel_for(0, n, row_grain(I), [&](int64_t r0, int64_t r1) {
        std::vector<V> Bv(NK - 1), dBv(NK - 1);
        A out[V::size()];
        for (int64_t rr = r0; rr < r1; ++rr) {
          const int64_t b = b0 + rr;
          for (int64_t i0 = 0; i0 < I; i0 += V::size()) {
            const int64_t m = std::min<int64_t>(V::size(), I - i0);
            bases_vec<T, A>(xp + b * sx0, sx1, i0, m, tp, rp, I, NK, k, Bv.data(), dBv.data());
            V s_acc(A(0));
            for (int64_t c = 0; c < NB; ++c) {
              s_acc = s_acc + dBv[c] * V::loadu(gp + (rr * NB + c) * I + i0, m);
              if (pp != nullptr) Bv[c].store(pp + (rr * NB + c) * I + i0, m);
            }
            s_acc.store(out);
            for (int64_t l = 0; l < m; ++l) dxp[b * I + i0 + l] = static_cast<T>(out[l]);
          }
        }
      });
    }
    if (dw != nullptr) acc.addmm_(P.t(), dy.narrow(0, b0, n).to(acc_kind));
  }
  if (dw != nullptr) {
    // dW in weight_t's layout where weight_t is dense (the weight's own, as tritium.kan_spline passes it: its
    // gradient then needs no copy to become the weight's .grad), else contiguous: empty_like's rule, which the
    // fake kernel and the Triton launcher follow too
    *dw = at::empty_like(weight_t);
    if (oin_layout(weight_t))
      gemm_to_oin<T, A>(acc.const_data_ptr<A>(), dw->mutable_data_ptr<T>(), O, I, NB);
    else
      dw->copy_(acc.view({NB, I, O}).permute({1, 0, 2}));
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
