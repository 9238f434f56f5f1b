// Loss CPU kernels, registered for the CPU key of the tritium ops python/tritium/ops/losses.py defines.
//
// Elementwise losses (loss_fwd / loss_bwd): one table. Each loss id (the order of losses.py's ELEMENTWISE list)
// is one branch of point(), which gives the pointwise value l(x, y) and its derivative dl/dx together, on
// at::vec vectors of the accumulation type; the tail of a range goes through zero-padded buffers, so there is
// no scalar copy of any formula. The formulas are torch's (ATen/native/Loss.cpp, derivatives.yaml), so special
// points (|d| = beta, clamps at 0, NaN) give what torch gives. With d = x - y:
//   mse            d^2                                         2 d
//   l1             |d|                                         sign(d)          (0 at d = 0 and at NaN)
//   smooth_l1      |d| < a ? d^2 / (2a) : |d| - a/2            clamp(d / a, -1, 1), 0 at a = 0 inside
//   huber          |d| < a ? d^2 / 2 : a (|d| - a/2)           clamp(d, -a, a)
//   bce            (y-1) max(log1p(-x), -100) - y max(log x, -100)       (x - y) / max(x (1-x), 1e-12)
//   bce_logits     (1-y) x + lw softplus(-x), lw = 1 + (p-1) y            lw sigmoid(x) - p y  (p: pos_weight)
//   soft_margin    softplus(-y x)                              -y sigmoid(-y x)
//   hinge_emb      (y != 1) max(a - x, 0) + (y != -1) x        -(y != 1)(a - x >= 0) + (y != -1)
//   margin_rank    max(-y x + a, 0)   (x = x1 - x2)            (-y x + a >= 0) (-y)
//   focal          at ce(x, y) q^b, q = 1 - pt                 at ((s - y) q^b - ce b q^(b-1) s (1-s)(2y-1))
//                  (torchvision's sigmoid_focal_loss: s = sigmoid(x), pt = s y + (1-s)(1-y), alpha a, gamma b,
//                  at = a y + (1-a)(1-y) when a >= 0 else 1)
//   quantile       e >= 0 ? p e : (p-1) e, e = y - x           e >= 0 ? -p : 1 - p  (p: the column's quantile)
// then times the weight w (bce, bce_logits: none, one per element, or one per column).
// Tensors are flat and contiguous: x, y and a full weight of numel n; per-column vectors (weight, pos_weight,
// quantiles) of C, the length of the last dim. loss_fwd writes the weighted pointwise loss, or with `reduce` its
// sum times `scale` (1 for 'sum', 1/n for 'mean') in one pass: blocks of kBlock elements summed in the
// accumulation type, blocks summed in double, rounded once. loss_bwd writes dx = g scale w dl/dx, g the upstream
// gradient (0-d: the reduced loss's, whose scale the kernel applies in the accumulation type; or one per element).
//
// Row losses: one row kernel over rows of (N, D) inputs; loss_rows writes each row's loss and its statistics, an
// (N, 3) tensor in the accumulation dtype (triplet: d(a,p), d(a,n), d(p,n) (d(a,n) without swap); cosine: P = x1.x2,
// S1 = |x1|^2 + 1e-12, S2 = |x2|^2 + 1e-12; contrastive: d, 0, 0; multi_margin: zeros). loss_rows_bwd, given those
// statistics, reads them instead of recomputing them (without them it recomputes them: one more pass over the rows;
// the results are the same bits either way) and writes the asked-for gradient rows times the row's upstream
// gradient, in the inputs' dtype (one rounding; no gradient buffer between forward and backward):
//   triplet     a, p, n; d(u, v) = ||u - v + eps||_P (P = 1, 2, or any p > 0), dn = swap ? min(d(a,n), d(p,n)) : d(a,n);
//               max(d(a,p) - dn + margin, 0) (the swap's tie goes to d(a,n))
//   cosine      x1, x2, y; c = x1.x2 / sqrt((|x1|^2 + 1e-12)(|x2|^2 + 1e-12)); y == 1: 1 - c; y == -1: max(c - margin, 0)
//   contrastive x1, x2, y; d = ||x1 - x2 + eps||_2; y d^2 + (1 - y) max(margin - d, 0)^2, halved
//   multi_margin  x1 scores (N, C), y target classes, w per class; sum_{j != y} w_y max(margin - x_y + x_j, 0)^p / C
//               (only positive terms count, p = 1 or 2)
// The losses are in the accumulation dtype (float32 for 16-bit inputs).
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kBlock = 4096;  // elements per accumulation block of the sum (and per parallel task unit)

enum Loss : int64_t {
  MSE, L1, SMOOTH_L1, HUBER, BCE, BCE_LOGITS, SOFT_MARGIN, HINGE_EMBEDDING, MARGIN_RANKING, FOCAL, QUANTILE,
  NUM_LOSSES
};

template <typename V>
TRITIUM_INLINE V where(const V& mask, const V& a, const V& b) {
  return V::blendv(b, a, mask);
}

// (d > 0) - (d < 0): 0 at 0 and at NaN, as torch's sign / sgn
template <typename V>
TRITIUM_INLINE V sign(const V& d) {
  return d.gt(V(0)) - d.lt(V(0));
}

// The value l(x, y) and derivative dl/dx of loss L at x, y; p is the per-column parameter (pos_weight, quantile;
// 1 when absent), a and b the scalar parameters (gamma: b as a scalar, for focal's branches). The caller uses one or
// both (the unused one is dead code). A product added to another term is written as an explicit fmadd / fmsub:
// the compiler's own fusing depends on what else the caller computes, and loss_fwd_grad's dx (value and derivative
// together) must have the bits of loss_bwd's (derivative only).
template <int64_t L, typename V>
TRITIUM_INLINE void point(const V& x, const V& y, const V& p, const V& a, const V& b, double gamma, V& val, V& der) {
  const V zero(0), one(1);
  if constexpr (L == MSE) {
    const V d = x - y;
    val = d * d;
    der = d + d;
  } else if constexpr (L == L1) {
    const V d = x - y;
    val = d.abs();
    der = sign(d);
  } else if constexpr (L == SMOOTH_L1) {
    const V d = x - y, ad = d.abs(), in = ad < a;
    val = where(in, V(0.5) * d * d / a, ad - V(0.5) * a);
    // torch's order of tests (NaN falls through to d / a, giving NaN); beta = 0 is l1's sign (0 at NaN)
    der = where(d < a.neg(), one.neg(), where(d > a, one, where(a == zero, zero, d / a)));
  } else if constexpr (L == HUBER) {
    // c (|d| - c/2), c = min(|d|, a): |d|^2 / 2 inside (|d| - |d|/2 is exact: torch's one rounding), torch's
    // a (|d| - a/2) outside, NaN through the NaN-propagating minimum; no compare and blend
    const V d = x - y, ad = d.abs(), c = at::vec::minimum(ad, a);
    val = c * (ad - V(0.5) * c);
    der = where(d < a.neg(), a.neg(), where(d > a, a, d));
  } else if constexpr (L == BCE) {
    const V lo(-100);
    val = (y - one) * at::vec::maximum(flog1p(x.neg()), lo) - y * at::vec::maximum(flog(x), lo);
    der = (x - y) / at::vec::maximum((one - x) * x, V(1e-12));
  } else if constexpr (L == BCE_LOGITS) {
    const V lw = at::vec::fmadd(p - one, y, one);
    val = at::vec::fmadd(one - y, x, lw * softplus(x.neg()));
    der = at::vec::fmsub(lw, fsigmoid(x), p * y);  // one fused form in every pass (loss_fwd_grad's, loss_bwd's)
  } else if constexpr (L == SOFT_MARGIN) {
    const V z = (y * x).neg();
    val = softplus(z);
    der = y.neg() * fsigmoid(z);
  } else if constexpr (L == HINGE_EMBEDDING) {
    const V m = a - x, not_pos = y != one, not_neg = y != one.neg();
    val = where(not_pos, where(m < zero, zero, m), zero) + where(not_neg, x, zero);
    der = where(not_neg, one, zero) - where(not_pos & (m >= zero), one, zero);
  } else if constexpr (L == MARGIN_RANKING) {
    const V v = at::vec::fmadd(y.neg(), x, a);
    val = where(v < zero, zero, v);
    der = where(v >= zero, y.neg(), zero);
  } else if constexpr (L == FOCAL) {
    // one exp serves both: e = exp(-|x|), sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) below, and
    // softplus(-x) = max(-x, 0) + log1p(e)
    const V e = fexp(x.abs().neg()), r = one / (one + e);
    const V s = where(x >= zero, r, e * r);
    const V ce = at::vec::fmadd(one - y, x, add_log1p_unit(at::vec::maximum(x.neg(), zero), e));
    const V q = one - at::vec::fmadd(s, y, (one - s) * (one - y));
    V mod, dmod;                     // q^g and g q^(g-1)
    if (gamma == 0) {
      mod = one, dmod = zero;  // torch's pow backward gives 0 for the exponent 0
    } else if (gamma == 1) {
      mod = q, dmod = one;
    } else if (gamma == 2) {
      mod = q * q, dmod = q + q;
    } else {
      mod = q.pow(b), dmod = b * q.pow(b - one);
    }
    const V at = where(a >= zero, at::vec::fmadd(a, y, (one - a) * (one - y)), one);
    val = at * ce * mod;
    der = at * at::vec::fmsub(s - y, mod, ce * dmod * s * (one - s) * (y + y - one));
  } else if constexpr (L == QUANTILE) {
    const V e = y - x, ge = e >= zero;
    val = where(ge, p * e, (p - one) * e);
    der = where(ge, p.neg(), one - p);
  }
}

// Vectors of T loaded / stored count (<= K) elements at a time; the other lanes read 0. A partial vector of
// float / double is one masked load or store (ATen's loadu / store with a count); of a 16-bit type, a copy through
// a zeroed buffer.
template <typename T>
struct Lanes {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  static constexpr int64_t K = IO::kSize;
  static constexpr bool kWide = std::is_same_v<T, typename IO::acc_t>;  // float / double: no conversion
  TRITIUM_INLINE static Vec load(const T* p, int64_t count) {
    if (count == K) return IO::load(p);
    if constexpr (kWide) return Vec::loadu(p, count);
    T buf[K] = {};
    for (int64_t k = 0; k < count; ++k) buf[k] = p[k];
    return IO::load(buf);
  }
  // `stream`: whole vectors go around the cache where aligned (vec.h store_out; the caller fences)
  TRITIUM_INLINE static void store(T* p, const Vec& v, int64_t count, bool stream = false) {
    if (count == K) return store_out(p, v, K, stream);
    if constexpr (kWide) return v.store(p, count);
    T buf[K];
    IO::store(buf, v);
    for (int64_t k = 0; k < count; ++k) p[k] = buf[k];
  }
};

// The inputs of one elementwise call. The weight is either full (one per element) or per column; the column of
// flat element i is i % C (C = n when nothing is per column).
template <typename T>
struct Inputs {
  const T* x;
  const T* y;
  const T* w;  // null: no weight
  const T* p;  // per column; null: 1
  bool w_col;
  int64_t n, C;
};

// f(begin, end, col) over the pieces of [begin, end) that lie in one row, col the column of begin
template <typename F>
inline void row_pieces(int64_t begin, int64_t end, int64_t C, const F& f) {
  while (begin < end) {
    const int64_t col = begin % C, stop = std::min(end, begin - col + C);
    f(begin, stop, col);
    begin = stop;
  }
}

// f(i, count, val, der) for every vector of [begin, end): count valid lanes, val = w l, der = w dl/dx
template <int64_t L, typename T, typename F>
inline void for_points(const Inputs<T>& in, int64_t begin, int64_t end, double a, double b, const F& f) {
  using LV = Lanes<T>;
  using Vec = typename LV::Vec;
  constexpr int64_t K = LV::K;
  const Vec va(a), vb(b);
  row_pieces(begin, end, in.C, [&](int64_t i0, int64_t i1, int64_t col) {
    for (int64_t i = i0; i < i1; i += K) {
      const int64_t count = std::min(K, i1 - i), c = col + (i - i0);
      const Vec x = LV::load(in.x + i, count), y = LV::load(in.y + i, count);
      const Vec p = in.p ? LV::load(in.p + c, count) : Vec(1);
      Vec val, der;
      point<L>(x, y, p, va, vb, b, val, der);
      if (in.w) {
        const Vec w = LV::load(in.w + (in.w_col ? c : i), count);
        val = val * w;
        der = der * w;
      }
      f(i, count, val, der);
    }
  });
}

// The derivative sink of a sum that writes no gradient: sum_points' default, optimised away with the derivative.
struct NoDerivative {
  template <typename V>
  void operator()(int64_t, int64_t, const V&) const {}
};

// The sum of the (weighted) pointwise loss over [begin, end), in four vector chains (one chain would bind the loop to
// the add's latency); der(i, count, w dl/dx) receives each vector's derivative (loss_fwd_grad's one pass). Without a
// weight or a per-column vector (the common call) it is one straight loop over whole vectors, four at a time, and a
// masked tail: no per-vector tests of the optional inputs, the fewest instructions per element, so that a
// read-and-reduce pass runs at the memory's read rate on both cores; else for_points.
template <int64_t L, typename T, typename D = NoDerivative>
inline acc_type<T> sum_points(const Inputs<T>& in, int64_t begin, int64_t end, double a, double b,
                              const D& der_out = {}) {
  using LV = Lanes<T>;
  using Vec = typename LV::Vec;
  constexpr int64_t K = LV::K;
  Vec s0(0), s1(0), s2(0), s3(0);
  if (!in.w && !in.p) {
    const Vec va(a), vb(b), one(1);
    const T* x = in.x;
    const T* y = in.y;
    const auto term = [&](int64_t i, int64_t count, const Vec& xv, const Vec& yv) __attribute__((always_inline)) {
      Vec val, der;
      point<L>(xv, yv, one, va, vb, b, val, der);
      der_out(i, count, der);
      return val;
    };
    const auto whole = [&](int64_t i) __attribute__((always_inline)) {
      return term(i, K, LV::IO::load(x + i), LV::IO::load(y + i));
    };
    int64_t i = begin;
    for (; i + 4 * K <= end; i += 4 * K) {
      s0 = s0 + whole(i);
      s1 = s1 + whole(i + K);
      s2 = s2 + whole(i + 2 * K);
      s3 = s3 + whole(i + 3 * K);
    }
    for (; i < end; i += K) {
      const int64_t count = std::min(K, end - i);
      const Vec v = term(i, count, LV::load(x + i, count), LV::load(y + i, count));
      s0 = s0 + (count == K ? v : Vec::set(Vec(0), v, count));  // the padding's loss is not always 0
    }
  } else {
    for_points<L>(in, begin, end, a, b, [&](int64_t i, int64_t count, const Vec& val, const Vec& der) {
      s0 = s0 + (count == K ? val : Vec::set(Vec(0), val, count));
      der_out(i, count, der);
    });
  }
  return hsum((s0 + s1) + (s2 + s3));
}

// BCE's input and target must lie in [0, 1] (NaN does not): torch's checks and messages, one pass of compares
template <typename T>
void check_bce_range(const Inputs<T>& in) {
  using LV = Lanes<T>;
  using Vec = typename LV::Vec;
  // lanes in [0, 1] (the zero padding of a partial vector is): all K of them, or a bad element
  const auto in_range = [](const Vec& v) { return hsum(v.ge(Vec(0)) * v.le(Vec(1))) == LV::K; };
  at::parallel_for(0, in.n, 8 * kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += LV::K) {
      const int64_t count = std::min(LV::K, end - i);
      TORCH_CHECK(in_range(LV::load(in.x + i, count)), "all elements of input should be between 0 and 1");
      TORCH_CHECK(in_range(LV::load(in.y + i, count)), "all elements of target should be between 0 and 1");
    }
  });
}

template <typename T>
Inputs<T> inputs(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& w,
                 const std::optional<at::Tensor>& p) {
  const int64_t n = x.numel(), C = x.dim() == 0 ? 1 : x.size(-1);
  const bool w_col = w.has_value() && w->numel() != n;
  const bool per_col = w_col || p.has_value();
  return {x.const_data_ptr<T>(), y.const_data_ptr<T>(), w ? w->const_data_ptr<T>() : nullptr,
          p ? p->const_data_ptr<T>() : nullptr, w_col, n, per_col ? std::max<int64_t>(C, 1) : std::max<int64_t>(n, 1)};
}

void check_inputs(int64_t loss, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& w,
                  const std::optional<at::Tensor>& p) {
  TORCH_CHECK(loss >= 0 && loss < NUM_LOSSES, "loss: unknown loss id ", loss);
  TORCH_CHECK(x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(),
              "loss: target must have input's shape and dtype, got ", y.sizes(), " ", y.scalar_type());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "loss: input and target must be contiguous");
  const int64_t C = x.dim() == 0 ? 1 : x.size(-1);
  for (const auto* t : {&w, &p}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.is_contiguous(), "loss: weights must be contiguous in input's dtype");
    TORCH_CHECK((t == &w && v.sizes() == x.sizes()) || (v.dim() == 1 && v.size(0) == C),
                "loss: a weight must have input's shape or one value per column (", C, "), got ", v.sizes());
  }
}

// Whether an elementwise loss touching `elements` elements of T in one call writes its output around the cache:
// float and double only. For 16-bit types A/B runs on the AMD EPYC measured the streamed backward slower (mse and
// huber at 8192 x 4096: 0.8x) where the activations' gained; why is not known, so they keep plain stores.
template <typename T>
bool stream_losses(int64_t elements) {
  return sizeof(T) >= 4 && stream_outputs(elements * int64_t(sizeof(T)));
}

// loss_fwd's kernel; with `dx` (reduce only) the same pass also writes dx = scale w dl/dx, loss_bwd's result for an
// upstream gradient of 1 bit for bit (point's explicit fmadds); the reduced loss may differ from loss_fwd's without
// dx in its last bits (the compiler may fuse the sum's additions differently)
template <int64_t L>
at::Tensor fwd_impl(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& w,
                    const std::optional<at::Tensor>& p, double a, double b, double scale, bool reduce,
                    at::Tensor* dx = nullptr) {
  at::Tensor out = reduce ? tritium::empty({}, x.options()) : tritium::empty(x.sizes(), x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_loss_fwd", [&] {
    using LV = Lanes<scalar_t>;
    using Vec = typename LV::Vec;
    const Inputs<scalar_t> in = inputs<scalar_t>(x, y, w, p);
    if constexpr (L == BCE) check_bce_range(in);
    if (!reduce) {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const bool nt = stream_losses<scalar_t>(3 * in.n);  // x, y in; the loss out
      at::parallel_for(0, in.n, 8 * kBlock, [&](int64_t begin, int64_t end) {
        for_points<L>(in, begin, end, a, b, [&](int64_t i, int64_t count, const Vec& val, const Vec&) {
          LV::store(op + i, val, count, nt);
        });
        if (nt) stream_fence();
      });
      return;
    }
    // blocks of kBlock elements summed in the accumulation type, blocks in double; the block boundaries do not
    // depend on the thread count, so neither does the result (up to the order of the last double additions)
    const auto blocks = [&](const auto& der_out, bool fence) {
      return at::parallel_reduce(
          0, (in.n + kBlock - 1) / kBlock, 8, 0.0,
          [&](int64_t b0, int64_t b1, double acc) {
            for (int64_t blk = b0; blk < b1; ++blk) {
              acc += static_cast<double>(
                  sum_points<L>(in, blk * kBlock, std::min(in.n, (blk + 1) * kBlock), a, b, der_out));
            }
            if (fence) stream_fence();
            return acc;
          },
          std::plus<double>());
    };
    double total;
    if (dx == nullptr) {
      total = blocks(NoDerivative{}, false);
    } else {
      scalar_t* dp = dx->mutable_data_ptr<scalar_t>();
      const Vec vs(static_cast<acc_type<scalar_t>>(scale));
      const bool nt = stream_losses<scalar_t>(3 * in.n);  // x, y in; dx out
      total = blocks([&](int64_t i, int64_t count, const Vec& der) { LV::store(dp + i, der * vs, count, nt); }, nt);
    }
    out.fill_(total * scale);
  });
  return out;
}

template <int64_t L>
at::Tensor bwd_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& w,
                    const std::optional<at::Tensor>& p, double a, double b, double scale) {
  at::Tensor dx = tritium::empty(x.sizes(), x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_loss_bwd", [&] {
    using LV = Lanes<scalar_t>;
    using Vec = typename LV::Vec;
    const Inputs<scalar_t> in = inputs<scalar_t>(x, y, w, p);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const bool scalar_g = g.dim() == 0;
    using acc_t = acc_type<scalar_t>;
    const Vec g0(static_cast<acc_t>(gp[0]) * static_cast<acc_t>(scale)), vs(static_cast<acc_t>(scale));
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const bool nt = stream_losses<scalar_t>((scalar_g ? 3 : 4) * in.n);  // x, y (, g) in; dx out
    at::parallel_for(0, in.n, 8 * kBlock, [&](int64_t begin, int64_t end) {
      for_points<L>(in, begin, end, a, b, [&](int64_t i, int64_t count, const Vec&, const Vec& der) {
        LV::store(dp + i, der * (scalar_g ? g0 : LV::load(gp + i, count) * vs), count, nt);
      });
      if (nt) stream_fence();
    });
  });
  return dx;
}

// loss id -> its instantiation, for the fixed set of ids
template <typename F, int64_t... Ls>
auto by_id(int64_t loss, std::integer_sequence<int64_t, Ls...>, const F& f) {
  using R = decltype(f(std::integral_constant<int64_t, 0>{}));
  R out;
  ((loss == Ls ? (out = f(std::integral_constant<int64_t, Ls>{}), true) : false) || ...);
  return out;
}

at::Tensor loss_fwd(int64_t loss, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& w,
                    const std::optional<at::Tensor>& p, double a, double b, double scale, bool reduce) {
  check_inputs(loss, x, y, w, p);
  return by_id(loss, std::make_integer_sequence<int64_t, NUM_LOSSES>{},
               [&](auto L) { return fwd_impl<decltype(L)::value>(x, y, w, p, a, b, scale, reduce); });
}

// loss_fwd(..., reduce=true) and loss_bwd(1, ...) in one pass: the loss and dx = scale w dl/dx
std::tuple<at::Tensor, at::Tensor> loss_fwd_grad(int64_t loss, const at::Tensor& x, const at::Tensor& y,
                                                 const std::optional<at::Tensor>& w,
                                                 const std::optional<at::Tensor>& p, double a, double b,
                                                 double scale) {
  check_inputs(loss, x, y, w, p);
  at::Tensor dx = tritium::empty(x.sizes(), x.options());
  at::Tensor out = by_id(loss, std::make_integer_sequence<int64_t, NUM_LOSSES>{},
                         [&](auto L) { return fwd_impl<decltype(L)::value>(x, y, w, p, a, b, scale, true, &dx); });
  return {out, dx};
}

at::Tensor loss_bwd(int64_t loss, const at::Tensor& g, const at::Tensor& x, const at::Tensor& y,
                    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& p, double a, double b,
                    double scale) {
  check_inputs(loss, x, y, w, p);
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && (g.dim() == 0 || (g.sizes() == x.sizes() && g.is_contiguous())),
              "loss_bwd: grad must be 0-d or contiguous of input's shape, in input's dtype, got ", g.sizes());
  return by_id(loss, std::make_integer_sequence<int64_t, NUM_LOSSES>{},
               [&](auto L) { return bwd_impl<decltype(L)::value>(g, x, y, w, p, a, b, scale); });
}

// ---- the row losses ----
enum RowLoss : int64_t { TRIPLET, TRIPLET_SWAP, COSINE, CONTRASTIVE, MULTI_MARGIN, NUM_ROW_LOSSES };

// Sum over a row of f(i, count) (one vector per call, the lanes past count zeroed before summing), in four chains:
// with one, every vector waits for the previous add, and a row's sum is bound by the add's latency, not by memory
template <typename V, typename F>
inline typename V::value_type row_sum(int64_t D, const F& f) {
  constexpr int64_t K = V::size();
  V s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * K <= D; i += 4 * K) {
    s0 = s0 + f(i, K);
    s1 = s1 + f(i + K, K);
    s2 = s2 + f(i + 2 * K, K);
    s3 = s3 + f(i + 3 * K, K);
  }
  for (; i < D; i += K) {
    const int64_t count = std::min(K, D - i);
    const V v = f(i, count);
    s0 = s0 + (count == K ? v : V::set(V(0), v, count));
  }
  return hsum((s0 + s1) + (s2 + s3));
}

// |v|^p summed for the p-norm (p = 1, 2 directly; else through pow)
template <typename V>
TRITIUM_INLINE V norm_term(const V& v, double p) {
  if (p == 2) return v * v;
  if (p == 1) return v.abs();
  return v.abs().pow(V(p));
}

template <typename A>
inline A norm_root(A s, double p) {
  return p == 2 ? std::sqrt(s) : p == 1 ? s : std::pow(s, A(1) / A(p));
}

// d||v||_p / dv given the norm n: sign(v) |v|^(p-1) / n^(p-1); 0 where n == 0 (torch's norm backward)
template <typename V>
TRITIUM_INLINE V norm_grad(const V& v, typename V::value_type n, double p) {
  using A = typename V::value_type;
  if (n == A(0)) return V(0);
  if (p == 2) return v * V(A(1) / n);
  if (p == 1) return sign(v);
  return sign(v) * (v.abs() / V(n)).pow(V(p - 1));
}

template <typename T>
void rows_impl(int64_t loss, const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& x3, const at::Tensor& y,
               const at::Tensor& w, double a, double b, double c, at::Tensor& out, at::Tensor& stats_out,
               const at::Tensor& stats_in, const at::Tensor& dloss, at::Tensor* g) {
  using LV = Lanes<T>;
  using Vec = typename LV::Vec;
  using A = acc_type<T>;
  const int64_t N = x1.size(0), D = x1.size(1);
  const T* p1 = x1.const_data_ptr<T>();
  const T* p2 = x2.defined() ? x2.const_data_ptr<T>() : nullptr;
  const T* p3 = x3.defined() ? x3.const_data_ptr<T>() : nullptr;
  const int64_t s1 = x1.stride(0), s2 = x2.defined() ? x2.stride(0) : 0, s3 = x3.defined() ? x3.stride(0) : 0;
  A* lp = out.defined() ? out.mutable_data_ptr<A>() : nullptr;        // the forward: the row losses
  const A* dl = dloss.defined() ? dloss.const_data_ptr<A>() : nullptr;  // the backward: the rows' upstream gradient
  const int64_t sdl = dloss.defined() ? dloss.stride(0) : 0;
  A* so = stats_out.defined() ? stats_out.mutable_data_ptr<A>() : nullptr;    // the forward: each row's statistics
  const A* si = stats_in.defined() ? stats_in.const_data_ptr<A>() : nullptr;  // the backward: the forward's, if given
  T* gp[3] = {nullptr, nullptr, nullptr};
  for (int k = 0; k < 3; ++k) gp[k] = g[k].defined() && g[k].numel() ? g[k].mutable_data_ptr<T>() : nullptr;
  const Vec veps(static_cast<A>(c));
  // float / double gradients around the cache where the rows and the gradients outgrow it (vec.h stream_outputs):
  // each gradient row is written once and read by none of this call's work. Not 16-bit ones: streamed, they timed
  // no faster than plain stores, half lines or whole (triplet, AMD EPYC).
  int64_t streams = (p1 != nullptr) + (p2 != nullptr) + (p3 != nullptr);
  for (int k = 0; k < 3; ++k) streams += gp[k] != nullptr;
  const bool nt = LV::kWide && dl && stream_outputs(streams * N * D * int64_t(sizeof(T)));
  at::parallel_for(0, N, row_grain(3 * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* u = p1 + r * s1;
      const T* v = p2 ? p2 + r * s2 : nullptr;
      const T* z = p3 ? p3 + r * s3 : nullptr;
      T* g0 = gp[0] ? gp[0] + r * D : nullptr;
      T* g1 = gp[1] ? gp[1] + r * D : nullptr;
      T* g2 = gp[2] ? gp[2] + r * D : nullptr;
      const A gs = dl ? dl[r * sdl] : A(0);  // the row's upstream gradient, folded into each gradient's factor
      auto ld = [&](const T* q, int64_t i, int64_t count) { return LV::load(q + i, count); };
      auto st = [&](T* q, int64_t i, int64_t count, const Vec& val) {  // a gradient not asked for: skipped
        if (q) LV::store(q + i, val, count, nt);
      };
      auto st2 = [&](T* q, int64_t i, const Vec& lo, const Vec& hi) {  // 2 K elements, one conversion (16-bit)
        if (q) store2(q + i, lo, hi);
      };
      if (loss == TRIPLET || loss == TRIPLET_SWAP) {  // u anchor, v positive, z negative; a margin, b p, c eps
        auto dist = [&](const T* q0, const T* q1) {
          return norm_root(row_sum<Vec>(D, [&](int64_t i, int64_t n) {
            return norm_term(ld(q0, i, n) - ld(q1, i, n) + veps, b); }), b);
        };
        A dap, dan, dpn;
        if (si) {  // the forward's distances: no pass over the rows
          dap = si[3 * r], dan = si[3 * r + 1], dpn = si[3 * r + 2];
        } else {
          // d(a, p) and d(a, n) in one pass over the three rows (the anchor loaded once), two chains each;
          // p = 2 (the default) as its own loop of one fused multiply-add per term, no test of p per vector
          Vec sp0(0), sp1(0), sn0(0), sn1(0);
          const auto pass = [&](auto p2) {
            constexpr bool P2 = decltype(p2)::value;
            const auto acc = [&](const Vec& t, const Vec& s) {
              if constexpr (P2) return at::vec::fmadd(t, t, s);
              else return s + norm_term(t, b);
            };
            int64_t i = 0;
            for (; i + 2 * LV::K <= D; i += 2 * LV::K) {
              const Vec a0 = LV::IO::load(u + i), a1 = LV::IO::load(u + i + LV::K);
              sp0 = acc(a0 - LV::IO::load(v + i) + veps, sp0);
              sp1 = acc(a1 - LV::IO::load(v + i + LV::K) + veps, sp1);
              sn0 = acc(a0 - LV::IO::load(z + i) + veps, sn0);
              sn1 = acc(a1 - LV::IO::load(z + i + LV::K) + veps, sn1);
            }
            for (; i < D; i += LV::K) {
              const int64_t n = std::min(LV::K, D - i);
              const Vec a0 = ld(u, i, n);
              const Vec tp = a0 - ld(v, i, n) + veps, tn = a0 - ld(z, i, n) + veps;
              // the padding's term (eps^p) is not 0: only the row's lanes are updated
              sp0 = n == LV::K ? acc(tp, sp0) : Vec::set(sp0, acc(tp, sp0), n);
              sn0 = n == LV::K ? acc(tn, sn0) : Vec::set(sn0, acc(tn, sn0), n);
            }
          };
          if (b == 2) {
            pass(std::true_type{});
          } else {
            pass(std::false_type{});
          }
          dap = norm_root(hsum(sp0 + sp1), b), dan = norm_root(hsum(sn0 + sn1), b);
          dpn = loss == TRIPLET_SWAP ? dist(v, z) : dan;
        }
        if (so) so[3 * r] = dap, so[3 * r + 1] = dan, so[3 * r + 2] = dpn;
        const bool use_pn = dpn < dan;  // swap: the closer of the two negatives' distances
        const A vv = dap - (use_pn ? dpn : dan) + static_cast<A>(a);
        if (lp) lp[r] = vv < A(0) ? A(0) : vv;
        if (!dl) continue;
        const A act = vv >= A(0) ? gs : A(0);
        const A dneg = use_pn ? dpn : dan;
        // the three gradients' vectors at i from gap = d dap / d(a - p) and gneg = d dneg / d(x - n), x = p (the
        // swapped negative) or a, each scaled by act
        const auto grad_rows = [&](const auto& gap_gneg) {
          const auto grads = [&](int64_t i, int64_t n, Vec* o) {
            const Vec xa = ld(u, i, n), xp = ld(v, i, n), xn = ld(z, i, n);
            const auto [gap, gneg] = gap_gneg(xa, xp, xn);
            o[0] = use_pn ? gap : gap - gneg;
            o[1] = use_pn ? gap.neg() - gneg : gap.neg();
            o[2] = gneg;
          };
          int64_t i = 0;
          if constexpr (!LV::kWide) {  // 16-bit: two vectors rounded and stored together
            for (; i + 2 * LV::K <= D; i += 2 * LV::K) {
              Vec lo[3], hi[3];
              grads(i, LV::K, lo);
              grads(i + LV::K, LV::K, hi);
              st2(g0, i, lo[0], hi[0]);
              st2(g1, i, lo[1], hi[1]);
              st2(g2, i, lo[2], hi[2]);
            }
          }
          for (; i < D; i += LV::K) {
            const int64_t n = std::min(LV::K, D - i);
            Vec o[3];
            grads(i, n, o);
            st(g0, i, n, o[0]);
            st(g1, i, n, o[1]);
            st(g2, i, n, o[2]);
          }
        };
        if (b == 2) {  // d||t||_2 / dt = t / ||t|| (0 at ||t|| = 0): one multiply by a factor set per row
          const auto scale = [&](A d) { return Vec(d == A(0) ? A(0) : act / d); };
          const Vec ka = scale(dap), kn = scale(dneg);
          grad_rows([&](const Vec& xa, const Vec& xp, const Vec& xn) {
            return std::pair<Vec, Vec>{(xa - xp + veps) * ka, ((use_pn ? xp : xa) - xn + veps) * kn};
          });
        } else {
          const Vec vact(act);
          grad_rows([&](const Vec& xa, const Vec& xp, const Vec& xn) {
            return std::pair<Vec, Vec>{vact * norm_grad(xa - xp + veps, dap, b),
                                       vact * norm_grad((use_pn ? xp : xa) - xn + veps, dneg, b)};
          });
        }
      } else if (loss == COSINE) {  // u, v; a margin; label y in {1, -1} (others: 0)
        const T* yv = y.const_data_ptr<T>();
        const A lab = static_cast<A>(yv[r * y.stride(0)]);
        A P, S1, S2;
        if (si) {  // the forward's sums: no pass over the rows
          P = si[3 * r], S1 = si[3 * r + 1], S2 = si[3 * r + 2];
        } else {
          Vec sp(0), su(0), sv(0);
          for (int64_t i = 0; i < D; i += LV::K) {
            const int64_t n = std::min(LV::K, D - i);
            const Vec xu = ld(u, i, n), xv = ld(v, i, n);  // zero-padded: no masking needed
            sp = at::vec::fmadd(xu, xv, sp);
            su = at::vec::fmadd(xu, xu, su);
            sv = at::vec::fmadd(xv, xv, sv);
          }
          P = hsum(sp), S1 = hsum(su) + A(1e-12), S2 = hsum(sv) + A(1e-12);
        }
        if (so) so[3 * r] = P, so[3 * r + 1] = S1, so[3 * r + 2] = S2;
        const A den = std::sqrt(S1 * S2), cs = P / den, neg = cs - static_cast<A>(a);
        if (lp) lp[r] = (lab == A(1) ? A(1) - cs : A(0)) + (lab == A(-1) ? (neg < A(0) ? A(0) : neg) : A(0));
        if (!dl) continue;
        const A dc = gs * (lab == A(1) ? A(-1) : (lab == A(-1) && neg >= A(0)) ? A(1) : A(0));
        const Vec k1(dc / den), c1(dc * cs / S1), c2(dc * cs / S2);
        for (int64_t i = 0; i < D; i += LV::K) {
          const int64_t n = std::min(LV::K, D - i);
          const Vec xu = ld(u, i, n), xv = ld(v, i, n);
          st(g0, i, n, xv * k1 - xu * c1);
          st(g1, i, n, xu * k1 - xv * c2);
        }
      } else if (loss == CONTRASTIVE) {  // u, v; a margin, c eps; label y (1 similar, 0 dissimilar)
        const T* yv = y.const_data_ptr<T>();
        const A lab = static_cast<A>(yv[r * y.stride(0)]);
        const A d = si ? si[3 * r] : std::sqrt(row_sum<Vec>(D, [&](int64_t i, int64_t n) {
          const Vec t = ld(u, i, n) - ld(v, i, n) + veps;
          return t * t; }));
        if (so) so[3 * r] = d, so[3 * r + 1] = A(0), so[3 * r + 2] = A(0);
        const A h = std::max(static_cast<A>(a) - d, A(0));
        if (lp) lp[r] = A(0.5) * (lab * d * d + (A(1) - lab) * h * h);
        if (!dl) continue;
        // d(d^2 / 2)/dv = v (autograd through sqrt: 0 at d = 0); d(h^2 / 2)/dv = -h v / d (0 at d = 0)
        const Vec k(d > A(0) ? gs * (lab - (A(1) - lab) * h / d) : A(0));
        for (int64_t i = 0; i < D; i += LV::K) {
          const int64_t n = std::min(LV::K, D - i);
          const Vec t = (ld(u, i, n) - ld(v, i, n) + veps) * k;
          st(g0, i, n, t);
          st(g1, i, n, t.neg());
        }
      } else {  // MULTI_MARGIN: u the row of scores, y the target class (int64), w per class; a margin, b p
        // (no statistics: its backward's one pass over the row computes what it needs)
        if (so) so[3 * r] = A(0), so[3 * r + 1] = A(0), so[3 * r + 2] = A(0);
        const int64_t t = y.const_data_ptr<int64_t>()[r * y.stride(0)];
        TORCH_CHECK(t >= 0 && t < D, "target out of range");
        const A wt = w.defined() ? static_cast<A>(w.const_data_ptr<T>()[t]) : A(1);
        const A xt = static_cast<A>(u[t]), inv = A(1) / static_cast<A>(D);
        const Vec base(static_cast<A>(a) - xt), zero(0);
        A total = 0, gsum = 0;
        for (int64_t i = 0; i < D; i += LV::K) {
          const int64_t n = std::min(LV::K, D - i);
          Vec zz = base + ld(u, i, n);
          Vec on = zz > zero;  // torch: only z > 0 contributes
          if (n < LV::K) on = Vec::set(zero, on, n);
          if (t >= i && t < i + n) {  // the target's own column does not count
            alignas(64) A m[LV::K];
            on.store(m);
            m[t - i] = A(0);
            on = Vec::loadu(m);
          }
          const Vec h = b == 2 ? zz * zz : zz;
          total += hsum(Vec::blendv(zero, h, on));
          if (g0) {
            const Vec gv = Vec::blendv(zero, b == 2 ? zz + zz : Vec(1), on) * Vec(gs * wt * inv);
            gsum += hsum(gv);
            st(g0, i, n, gv);  // 0 at the target's column, written next
          }
        }
        if (lp) lp[r] = total * wt * inv;
        if (g0) g0[t] = static_cast<T>(-gsum);
      }
    }
    if (nt) stream_fence();
  });
}

void check_row_inputs(int64_t loss, const at::Tensor& x1, const std::optional<at::Tensor>& x2,
                      const std::optional<at::Tensor>& x3, const std::optional<at::Tensor>& y,
                      const std::optional<at::Tensor>& w, double b) {
  TORCH_CHECK(loss >= 0 && loss < NUM_ROW_LOSSES, "loss_rows: unknown loss id ", loss);
  check_rows(x1, "x1");
  const int64_t N = x1.size(0), D = x1.size(1);
  const bool mm = loss == MULTI_MARGIN;
  for (const auto* t : {&x2, &x3}) {
    if (!t->has_value()) continue;
    check_rows(**t, "x2/x3");
    TORCH_CHECK((*t)->sizes() == x1.sizes() && (*t)->scalar_type() == x1.scalar_type(),
                "loss_rows: the inputs must share x1's shape and dtype");
  }
  TORCH_CHECK(mm || x2.has_value(), "loss_rows: this loss needs x2");
  TORCH_CHECK(!(loss == TRIPLET || loss == TRIPLET_SWAP) || x3.has_value(), "loss_rows: triplet needs x3");
  if (loss == COSINE || loss == CONTRASTIVE || mm) {
    TORCH_CHECK(y.has_value() && y->dim() == 1 && y->size(0) == N, "loss_rows: y must be (rows,)");
    TORCH_CHECK(y->scalar_type() == (mm ? at::kLong : x1.scalar_type()), "loss_rows: y has the wrong dtype");
  }
  if (w.has_value()) {
    TORCH_CHECK(w->dim() == 1 && w->size(0) == D && w->is_contiguous() && w->scalar_type() == x1.scalar_type(),
                "loss_rows: w must be contiguous (cols,) in x1's dtype");
  }
  TORCH_CHECK(!mm || b == 1 || b == 2, "loss_rows: multi_margin takes p = 1 or 2");
}

// the row losses (N,) and the rows' statistics (N, 3), both in the accumulation dtype
std::tuple<at::Tensor, at::Tensor> loss_rows(int64_t loss, const at::Tensor& x1, const std::optional<at::Tensor>& x2,
                     const std::optional<at::Tensor>& x3, const std::optional<at::Tensor>& y,
                     const std::optional<at::Tensor>& w, double a, double b, double c) {
  check_row_inputs(loss, x1, x2, x3, y, w, b);
  const auto adt = x1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = tritium::empty({x1.size(0)}, x1.options().dtype(adt));
  at::Tensor stats = tritium::empty({x1.size(0), 3}, x1.options().dtype(adt));
  at::Tensor g[3];
  const at::Tensor none;
  TRITIUM_DISPATCH_FLOATING(x1.scalar_type(), "tritium_loss_rows", [&] {
    rows_impl<scalar_t>(loss, x1, x2 ? *x2 : none, x3 ? *x3 : none, y ? *y : none, w ? *w : none, a, b, c, out,
                        stats, none, none, g);
  });
  return {out, stats};
}

// loss_rows_bwd's gradient tensors: (rows, cols) in the inputs' dtype for the inputs asked for (need: x1, x2, x3;
// present), else empty, after the check of the upstream gradient dloss ((rows,) in the accumulation dtype)
void row_grads(const char* op, const at::Tensor& dloss, const at::Tensor& x1, const std::optional<at::Tensor>& x2,
               const std::optional<at::Tensor>& x3, bool need1, bool need2, bool need3, at::Tensor* g) {
  const auto adt = x1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dloss.dim() == 1 && dloss.size(0) == x1.size(0) && dloss.scalar_type() == adt, op,
              ": dloss must be (rows,) in the accumulation dtype");
  const bool need[3] = {need1, need2 && x2.has_value(), need3 && x3.has_value()};
  for (int k = 0; k < 3; ++k) g[k] = need[k] ? tritium::empty(x1.sizes(), x1.options()) : at::empty({0}, x1.options());
}

// the gradients of sum_r dloss[r] loss_r for the inputs asked for (need: x1, x2, x3), in the inputs' dtype (an
// input not asked for, or absent: an empty tensor); the rows' statistics are loss_rows' stats when given (not
// multi_margin's: it has none), else recomputed
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_rows_bwd(
    int64_t loss, const at::Tensor& dloss, const at::Tensor& x1, const std::optional<at::Tensor>& x2,
    const std::optional<at::Tensor>& x3, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& w,
    double a, double b, double c, bool need1, bool need2, bool need3, const std::optional<at::Tensor>& stats) {
  check_row_inputs(loss, x1, x2, x3, y, w, b);
  const auto adt = x1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(!stats.has_value() || (stats->sizes() == at::IntArrayRef{x1.size(0), 3} && stats->is_contiguous() &&
                                     stats->scalar_type() == adt),
              "loss_rows_bwd: stats must be loss_rows' contiguous (rows, 3) statistics in the accumulation dtype");
  const at::Tensor st = stats.has_value() && loss != MULTI_MARGIN ? *stats : at::Tensor();
  at::Tensor g[3];
  row_grads("loss_rows_bwd", dloss, x1, x2, x3, need1, need2, need3, g);
  at::Tensor none;
  TRITIUM_DISPATCH_FLOATING(x1.scalar_type(), "tritium_loss_rows_bwd", [&] {
    rows_impl<scalar_t>(loss, x1, x2 ? *x2 : none, x3 ? *x3 : none, y ? *y : none, w ? *w : none, a, b, c, none,
                        none, st, dloss, g);
  });
  return {g[0], g[1], g[2]};
}

// loss_rows and loss_rows_bwd(dloss) in one pass over the rows: the row losses, their statistics and the gradients
// (the same loop, so the same bits as the two calls)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_rows_grad(
    int64_t loss, const at::Tensor& dloss, const at::Tensor& x1, const std::optional<at::Tensor>& x2,
    const std::optional<at::Tensor>& x3, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& w,
    double a, double b, double c, bool need1, bool need2, bool need3) {
  check_row_inputs(loss, x1, x2, x3, y, w, b);
  const auto adt = x1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = tritium::empty({x1.size(0)}, x1.options().dtype(adt));
  at::Tensor stats = tritium::empty({x1.size(0), 3}, x1.options().dtype(adt));
  at::Tensor g[3];
  row_grads("loss_rows_grad", dloss, x1, x2, x3, need1, need2, need3, g);
  const at::Tensor none;
  TRITIUM_DISPATCH_FLOATING(x1.scalar_type(), "tritium_loss_rows_grad", [&] {
    rows_impl<scalar_t>(loss, x1, x2 ? *x2 : none, x3 ? *x3 : none, y ? *y : none, w ? *w : none, a, b, c, out,
                        stats, none, dloss, g);
  });
  return {out, stats, g[0], g[1], g[2]};
}

// ---- info_nce's row-block statistics (the blocks' matmuls are BLAS calls in python/tritium/ops/losses.py) ----
// nce_block_fwd: s (B, N) one block of similarities (rows of queries i0.., all N keys), sn (B, M) or empty: the
// block's similarities with the explicit negatives (contiguous; float32 / float64, or bfloat16 / float16 where the
// blocks' matmuls round them as eager's 16-bit matmul does: read in the accumulation dtype A). Returns the rows'
// log-sum-exp over [s | sn] (B,), and (symmetric) the running column max and exp-sum over the rows seen so far
// updated with this block: m' = max(m, max_i s_ij), e' = e exp(m - m') + sum_i exp(s_ij - m'); all in A.
// offset c (the caller's bound on |s|, at most kNceOffsetMax: see nce_fixed_rows): one exp per element, one pass
// over the block instead of four, no maxima: lse_i = c + log sum_j exp(s_ij - c), m' = c,
// e' = e exp(m - c) + sum_i exp(s_ij - c).
template <typename T>
acc_type<T> row_lse(const T* x, int64_t n, acc_type<T> m) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  using A = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  const V vm(m);
  V acc(0);
  int64_t i = 0;
  for (; i + K <= n; i += K) acc = acc + fexp(IO::load(x + i) - vm);
  A sum = hsum(acc);
  for (; i < n; ++i) sum += std::exp(static_cast<A>(x[i]) - m);
  return sum;
}

void check_nce_block(const at::Tensor& s, const char* op) {
  const auto t = s.scalar_type();
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous() &&
              (t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf),
              op, ": s must be a contiguous (B, N) float32/float64/bfloat16/float16 block");
}

// The fixed-offset statistics: with |s| <= c <= kNceOffsetMax every s - c lies in [-2c, 0], so exp(s - c) is
// a normal float (>= e^-64) and no sum can overflow; the inputs are then finite (NaN-free), so the inlined exp.
constexpr double kNceOffsetMax = 32.0;

template <typename T, bool COLS>
void nce_fixed_rows(const T* sp, const T* np, int64_t N, int64_t M, int64_t b0, int64_t b1, acc_type<T> c,
                    acc_type<T>* lp, acc_type<T>* cs) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  using A = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  const V vc(c);
  // rows two at a time: each column sum is loaded and stored once per pair
  for (int64_t r = b0; r < b1; r += 2) {
    const int64_t nr = std::min<int64_t>(2, b1 - r);
    const T* row0 = sp + r * N;
    const T* row1 = row0 + (nr == 2 ? N : 0);
    V acc0(0), acc1(0);
    int64_t j = 0;
    for (; j + K <= N; j += K) {
      const V e0 = fexp(IO::load(row0 + j) - vc);
      const V e1 = nr == 2 ? fexp(IO::load(row1 + j) - vc) : V(0);
      acc0 = acc0 + e0;
      acc1 = acc1 + e1;
      if constexpr (COLS) (V::loadu(cs + j) + e0 + e1).store(cs + j);
    }
    A sum0 = hsum(acc0), sum1 = hsum(acc1);
    for (; j < N; ++j) {
      const A e0 = std::exp(static_cast<A>(row0[j]) - c), e1 = nr == 2 ? std::exp(static_cast<A>(row1[j]) - c) : A(0);
      sum0 += e0;
      sum1 += e1;
      if constexpr (COLS) cs[j] += e0 + e1;
    }
    for (int64_t i = 0; i < nr; ++i) {
      const A sum = (i == 0 ? sum0 : sum1) + (np ? row_lse(np + (r + i) * M, M, c) : A(0));
      lp[r + i] = c + std::log(sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_block_fwd(const at::Tensor& s, const std::optional<at::Tensor>& sn,
                                                             const at::Tensor& m_col, const at::Tensor& e_col,
                                                             bool symmetric, std::optional<double> offset) {
  check_nce_block(s, "nce_block_fwd");
  const auto adt = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = s.size(0), N = s.size(1), M = sn ? sn->size(1) : 0;
  if (sn) {
    TORCH_CHECK(sn->dim() == 2 && sn->size(0) == B && sn->is_contiguous() && sn->scalar_type() == s.scalar_type(),
                "nce_block_fwd: sn must be a contiguous (B, M) block of s's dtype");
  }
  if (symmetric) {
    TORCH_CHECK(m_col.sizes() == at::IntArrayRef{N} && e_col.sizes() == at::IntArrayRef{N} && m_col.is_contiguous() &&
                e_col.is_contiguous() && m_col.scalar_type() == adt && e_col.scalar_type() == adt,
                "nce_block_fwd: m_col and e_col must be contiguous (N,) in s's accumulation dtype");
  }
  const auto aopt = s.options().dtype(adt);
  at::Tensor lse = at::empty({B}, aopt);
  at::Tensor m_new = symmetric ? at::empty({N}, aopt) : at::empty({0}, aopt);
  at::Tensor e_new = symmetric ? at::empty({N}, aopt) : at::empty({0}, aopt);
  if (offset) {
    TORCH_CHECK(*offset >= 0 && *offset <= kNceOffsetMax, "nce_block_fwd: offset must be in [0, ", kNceOffsetMax,
                "], got ", *offset);
    // one column-sum row per thread (zeros for a thread that runs no rows), summed into e' after the pass
    const int64_t nt = symmetric ? at::get_num_threads() : 0;
    at::Tensor part = at::zeros({nt, N}, aopt);
    TRITIUM_DISPATCH_FLOATING(s.scalar_type(), "tritium_nce_block_fwd_fixed", [&] {
      using T = scalar_t;
      using A = acc_type<T>;
      const A c = static_cast<A>(*offset);
      const T* sp = s.const_data_ptr<T>();
      const T* np = sn ? sn->const_data_ptr<T>() : nullptr;
      A* lp = lse.mutable_data_ptr<A>();
      A* pp = part.mutable_data_ptr<A>();
      at::parallel_for(0, B, row_grain(N + M), [&](int64_t b0, int64_t b1) {
        if (symmetric) {
          nce_fixed_rows<T, true>(sp, np, N, M, b0, b1, c, lp, pp + at::get_thread_num() * N);
        } else {
          nce_fixed_rows<T, false>(sp, np, N, M, b0, b1, c, lp, nullptr);
        }
      });
      if (!symmetric) return;
      const A* mo = m_col.const_data_ptr<A>();
      const A* eo = e_col.const_data_ptr<A>();
      A* mn = m_new.mutable_data_ptr<A>();
      A* en = e_new.mutable_data_ptr<A>();
      for (int64_t j = 0; j < N; ++j) {
        A e = eo[j] == A(0) ? A(0) : mo[j] == c ? eo[j] : eo[j] * std::exp(mo[j] - c);
        for (int64_t t = 0; t < nt; ++t) e += pp[t * N + j];
        mn[j] = c;
        en[j] = e;
      }
    });
    return {lse, m_new, e_new};
  }
  TRITIUM_DISPATCH_FLOATING(s.scalar_type(), "tritium_nce_block_fwd", [&] {
    using T = scalar_t;
    using IO = VecIO<T>;
    using A = acc_type<T>;
    using V = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const T* sp = s.const_data_ptr<T>();
    const T* np = sn ? sn->const_data_ptr<T>() : nullptr;
    A* lp = lse.mutable_data_ptr<A>();
    at::parallel_for(0, B, row_grain(N + M), [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r) {
        const T* row = sp + r * N;
        const T* nrow = np ? np + r * M : nullptr;
        A m = row_max_acc(row, N);
        if (nrow) m = std::max(m, row_max_acc(nrow, M));
        const A mm = std::isinf(m) ? A(0) : m;  // an all -inf row: log(0) = -inf, not NaN
        A sum = row_lse(row, N, mm) + (nrow ? row_lse(nrow, M, mm) : A(0));
        lp[r] = mm + std::log(sum);
      }
    });
    if (!symmetric) return;
    // columns in chunks of 64 (4 AVX-512 float vectors): the chunk's max over the block's rows, then its exp-sums
    const A* mo = m_col.const_data_ptr<A>();
    const A* eo = e_col.const_data_ptr<A>();
    A* mn = m_new.mutable_data_ptr<A>();
    A* en = e_new.mutable_data_ptr<A>();
    constexpr int64_t kCols = 64;
    at::parallel_for(0, (N + kCols - 1) / kCols, std::max<int64_t>(1, 4096 / std::max<int64_t>(B, 1)),
                     [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kCols, j1 = std::min(N, j0 + kCols);
        alignas(64) A mx[kCols], ex[kCols];
        for (int64_t j = j0; j < j1; ++j) mx[j - j0] = mo[j];
        for (int64_t r = 0; r < B; ++r) {
          const T* row = sp + r * N;
          int64_t j = j0;
          for (; j + K <= j1; j += K) at::vec::maximum(V::loadu(mx + j - j0), IO::load(row + j)).store(mx + j - j0);
          for (; j < j1; ++j) mx[j - j0] = std::max(mx[j - j0], static_cast<A>(row[j]));
        }
        for (int64_t j = j0; j < j1; ++j) {
          const A m = std::isinf(mx[j - j0]) ? A(0) : mx[j - j0];
          mx[j - j0] = m;
          ex[j - j0] = eo[j] == A(0) ? A(0) : eo[j] * std::exp(mo[j] - m);
        }
        for (int64_t r = 0; r < B; ++r) {
          const T* row = sp + r * N;
          int64_t j = j0;
          for (; j + K <= j1; j += K) {
            (V::loadu(ex + j - j0) + fexp(IO::load(row + j) - V::loadu(mx + j - j0))).store(ex + j - j0);
          }
          for (; j < j1; ++j) ex[j - j0] += std::exp(static_cast<A>(row[j]) - mx[j - j0]);
        }
        for (int64_t j = j0; j < j1; ++j) {
          mn[j] = mx[j - j0];
          en[j] = ex[j - j0];
        }
      }
    });
  });
  return {lse, m_new, e_new};
}

// nce_block_bwd_: the gradient of the block's similarities, ds_ij = wq_i exp(s_ij - lse_row_i)
// + wk_j exp(s_ij - lse_col_j) (the second term when lse_col is given), minus wq_i + wk_j on the positives'
// diagonal j = diag + i (diag < 0: none, e.g. for the negatives' block). Computed in the accumulation dtype A (the
// dtype of lse_row, wq, lse_col, wk) and written in s's dtype (a 16-bit ds goes into 16-bit matmuls as is).
// offset c (as nce_block_fwd's, with the column term): one exp per element, ds_ij = exp(s_ij - c) (a_i + b_j) with
// a_i = wq_i exp(c - lse_row_i), b_j = wk_j exp(c - lse_col_j) (each lse >= -c, so the factors stay below e^64).
// Written over s (the backward's loop then holds one block instead of two): each element is read before it is
// written, the diagonal's element before its row.
void nce_block_bwd_(const at::Tensor& s, const at::Tensor& lse_row, const at::Tensor& wq,
                    const std::optional<at::Tensor>& lse_col, const std::optional<at::Tensor>& wk, int64_t diag,
                    std::optional<double> offset) {
  check_nce_block(s, "nce_block_bwd_");
  const auto adt = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = s.size(0), N = s.size(1);
  TORCH_CHECK(lse_row.sizes() == at::IntArrayRef{B} && wq.sizes() == at::IntArrayRef{B} && lse_row.is_contiguous() &&
              wq.is_contiguous() && lse_row.scalar_type() == adt && wq.scalar_type() == adt,
              "nce_block_bwd_: lse_row and wq must be contiguous (B,) in s's accumulation dtype");
  TORCH_CHECK(lse_col.has_value() == wk.has_value(), "nce_block_bwd_: lse_col and wk come together");
  if (lse_col) {
    TORCH_CHECK(lse_col->sizes() == at::IntArrayRef{N} && wk->sizes() == at::IntArrayRef{N} && lse_col->is_contiguous() &&
                wk->is_contiguous() && lse_col->scalar_type() == adt && wk->scalar_type() == adt,
                "nce_block_bwd_: lse_col and wk must be contiguous (N,) in s's accumulation dtype");
  }
  TORCH_CHECK(!offset || (*offset >= 0 && *offset <= kNceOffsetMax), "nce_block_bwd_: offset must be in [0, ",
              kNceOffsetMax, "], got ", offset.value_or(0));
  // the column factors b_j of the fixed-offset form (computed once per block, N exps)
  const bool fixed = offset && lse_col;
  at::Tensor bcol = fixed ? at::exp(-(*lse_col - *offset)).mul_(*wk) : at::Tensor();
  TRITIUM_DISPATCH_FLOATING(s.scalar_type(), "tritium_nce_block_bwd_", [&] {
    using T = scalar_t;
    using IO = VecIO<T>;
    using A = acc_type<T>;
    using V = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const T* sp = s.const_data_ptr<T>();
    const A* lr = lse_row.const_data_ptr<A>();
    const A* wqp = wq.const_data_ptr<A>();
    const A* lc = lse_col ? lse_col->const_data_ptr<A>() : nullptr;
    const A* wkp = wk ? wk->const_data_ptr<A>() : nullptr;
    T* dp = s.mutable_data_ptr<T>();
    at::parallel_for(0, B, row_grain(N), [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r) {
        const T* row = sp + r * N;
        T* out = dp + r * N;
        const V vl(lr[r]), vw(wqp[r]);
        // the diagonal's element: its value (in A) with the positive's term subtracted, stored after the row
        const int64_t d = diag + r;
        const bool has_d = diag >= 0 && d < N;
        A dval = A(0);
        if (has_d) {
          const A x = static_cast<A>(row[d]);
          dval = std::exp(x - lr[r]) * wqp[r] + (lc ? std::exp(x - lc[d]) * wkp[d] : A(0)) - (wqp[r] + (wkp ? wkp[d] : A(0)));
        }
        int64_t j = 0;
        if (fixed) {
          const A c = static_cast<A>(*offset), a = wqp[r] * std::exp(c - lr[r]);
          const A* bp = bcol.const_data_ptr<A>();
          const V vc(c), va(a);
          for (; j + K <= N; j += K)
            IO::store(out + j, fexp(IO::load(row + j) - vc) * (va + V::loadu(bp + j)));
          for (; j < N; ++j) out[j] = static_cast<T>(std::exp(static_cast<A>(row[j]) - c) * (a + bp[j]));
        } else if (lc) {
          for (; j + K <= N; j += K) {
            const V x = IO::load(row + j);
            IO::store(out + j, fexp(x - vl) * vw + fexp(x - V::loadu(lc + j)) * V::loadu(wkp + j));
          }
          for (; j < N; ++j) {
            const A x = static_cast<A>(row[j]);
            out[j] = static_cast<T>(std::exp(x - lr[r]) * wqp[r] + std::exp(x - lc[j]) * wkp[j]);
          }
        } else {
          for (; j + K <= N; j += K) IO::store(out + j, fexp(IO::load(row + j) - vl) * vw);
          for (; j < N; ++j) out[j] = static_cast<T>(std::exp(static_cast<A>(row[j]) - lr[r]) * wqp[r]);
        }
        if (has_d) out[d] = static_cast<T>(dval);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("loss_fwd", &loss_fwd);
  m.impl("loss_fwd_grad", &loss_fwd_grad);
  m.impl("loss_bwd", &loss_bwd);
  m.impl("loss_rows", &loss_rows);
  m.impl("loss_rows_bwd", &loss_rows_bwd);
  m.impl("loss_rows_grad", &loss_rows_grad);
  m.impl("nce_block_fwd", &nce_block_fwd);
  m.impl("nce_block_bwd_", &nce_block_bwd_);
}

}  // namespace tritium
