// Activation CPU kernels: every elementwise activation, the gated units (GLU, SwiGLU, GeGLU), DyT and PReLU,
// forward and backward, registered for the CPU key of the tritium ops python/tritium/ops/activations.py
// defines.
//
// One table drives: each activation is a functor (forward f(x) and backward dy * f'(x) on at::vec vectors of
// the accumulation type, with up to three float parameters), and one templated loop per kernel shape
// (unary forward / in-place / backward, gated forward / backward) is instantiated for each functor by the
// TRITIUM_ACTIVATIONS list at the end. The formulas are torch's own (ATen/native/cpu/Activation.cpp), so
// special points (x = 0, thresholds, saturation, NaN) give what torch gives.
//
// Tensors arrive as 2-D (rows, cols) views with a unit column stride and any row stride; outputs are fresh
// contiguous tritium::empty() tensors (huge pages: at 8192 x 4096 the first touch of 4 KiB pages otherwise
// costs as much as the math). Work is split into chunks of up to kChunk elements of one row, so both one long
// row (a flattened contiguous tensor) and many short rows spread over the threads.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kChunk = 16384;

// f(row, begin, end) over chunks of every row, in parallel.
template <typename F>
void for_chunks(int64_t M, int64_t N, const F& f) {
  if (M == 0 || N == 0) return;
  const int64_t per_row = (N + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, kChunk / std::min(N, kChunk));
  at::parallel_for(0, M * per_row, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r = t / per_row, c0 = (t % per_row) * kChunk;
      f(r, c0, std::min(N, c0 + kChunk));
    }
  });
}

// out[j][i] = fn(in[0][i], ...) for i in [0, n): whole vectors, then the tail through zero-padded buffers so
// every functor only needs its vector form. With `stream` (the call's working set outgrows the last-level cache:
// stream_outputs) the whole vectors are written around the cache (vec.h store_out) and the chunk ends with a fence.
// Flattened: fn (an op's lambda) and everything it calls are inlined, not called once per vector.
template <typename T, int NI, int NO, typename F>
__attribute__((flatten)) inline void map_vec_plain(const T* const (&in)[NI], T* const (&out)[NO], int64_t n,
                                                   const F& fn, bool stream) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  Vec vi[NI], vo[NO];
  int64_t i = 0;
  // two vectors per iteration: their (long, transcendental) dependency chains interleave
  for (; i + 2 * K <= n; i += 2 * K) {
    Vec vi2[NI], vo2[NO];
    for (int j = 0; j < NI; ++j) {
      vi[j] = IO::load(in[j] + i);
      vi2[j] = IO::load(in[j] + i + K);
    }
    fn(vi, vo);
    fn(vi2, vo2);
    for (int j = 0; j < NO; ++j) {
      store_out(out[j] + i, vo[j], K, stream);
      store_out(out[j] + i + K, vo2[j], K, stream);
    }
  }
  for (; i + K <= n; i += K) {
    for (int j = 0; j < NI; ++j) vi[j] = IO::load(in[j] + i);
    fn(vi, vo);
    for (int j = 0; j < NO; ++j) store_out(out[j] + i, vo[j], K, stream);
  }
  if (i < n) {
    const int64_t rest = n - i;
    T buf[NI > NO ? NI : NO][K];
    for (int j = 0; j < NI; ++j) {
      for (int64_t k = 0; k < K; ++k) buf[j][k] = k < rest ? in[j][i + k] : T(0);
      vi[j] = IO::load(buf[j]);
    }
    fn(vi, vo);
    for (int j = 0; j < NO; ++j) {
      IO::store(buf[j], vo[j]);
      for (int64_t k = 0; k < rest; ++k) out[j][i + k] = buf[j][k];
    }
  }
  if (stream) stream_fence();
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// map_vec_plain for bfloat16 on a CPU with AVX512-BF16: the same loop, each output's two vectors rounded and
// stored by store2_bf16ins (fn inlines here: its default target is a subset of this function's); the tail (under
// two vectors) through map_vec_plain.
template <int NI, int NO, typename F>
TRITIUM_BF16_DOT __attribute__((flatten)) void map_vec_bf16ins(const c10::BFloat16* const (&in)[NI],
                                                               c10::BFloat16* const (&out)[NO], int64_t n, const F& fn,
                                                               bool stream) {
  using IO = VecIO<c10::BFloat16>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    Vec vi[NI], vi2[NI], vo[NO], vo2[NO];
    for (int j = 0; j < NI; ++j) {
      vi[j] = IO::load(in[j] + i);
      vi2[j] = IO::load(in[j] + i + K);
    }
    fn(vi, vo);
    fn(vi2, vo2);
    for (int j = 0; j < NO; ++j) store2_bf16ins(out[j] + i, vo[j], vo2[j], stream);
  }
  const c10::BFloat16* rin[NI];
  c10::BFloat16* rout[NO];
  for (int j = 0; j < NI; ++j) rin[j] = in[j] + i;
  for (int j = 0; j < NO; ++j) rout[j] = out[j] + i;
  map_vec_plain<c10::BFloat16, NI, NO>(rin, rout, n - i, fn, stream);  // ends with the fence when streaming
}
#endif

// map_vec_plain, or for bfloat16 on a CPU with AVX512-BF16 map_vec_bf16ins
template <typename T, int NI, int NO, typename F>
inline void map_vec(const T* const (&in)[NI], T* const (&out)[NO], int64_t n, const F& fn, bool stream = false) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16ins<T>()) return map_vec_bf16ins<NI, NO>(in, out, n, fn, stream);
  }
#endif
  map_vec_plain<T, NI, NO>(in, out, n, fn, stream);
}

template <typename V>
struct Prm {
  V a, b, c;
};

template <typename V>
TRITIUM_INLINE V sel(const V& mask, const V& if_true, const V& if_false) {
  return V::blendv(if_false, if_true, mask);
}

// The normal CDF Phi(x) = erfc(-x / sqrt(2)) / 2 by Abramowitz-Stegun 7.1.26 (the approximation ATen's own
// float erf uses, |error| < 1.5e-7), in its erfc form so the left tail keeps its relative accuracy instead of
// cancelling in 1 + erf: with z = |x| / sqrt(2), t = 1 / (1 + p z), q = t P(t) exp(-z^2) / 2, Phi is q for
// x < 0 and 1 - q otherwise. e = exp(-z^2) = exp(-x^2 / 2) is returned too: the GELU derivative's pdf reuses it.
template <typename V>
TRITIUM_INLINE V phi_fast(const V& x, V& e) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    const V p(0.3275911f), p1(0.254829592f), p2(-0.284496736f), p3(1.421413741f), p4(-1.453152027f),
        p5(1.061405429f);
    const V z = x.abs() * V(M_SQRT1_2);
    const V t = frcp(at::vec::fmadd(p, z, V(1)));
    const V r = at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(p5, t, p4), t, p3), t, p2), t, p1);
    e = fexp(x * x * V(-0.5f));
    const V q = V(0.5f) * r * t * e;
    return V::blendv(V(1) - q, q, x < V(0));
  } else {
    e = (x * x * V(-0.5)).exp();
    return V(0.5) * (V(1) + (x * V(M_SQRT1_2)).erf());
  }
}

// 16-bit forms. A gate g (the normal CDF Phi of GELU, the sigmoid of SiLU and sigmoid itself) is 1/2 + x P(x^2) on
// a bounded range x^2 <= u_max: degree-9 Chebyshev fits of (g(x) - 1/2) / x, evaluated in float32 to within 1e-6 of
// g (4e-5 relative, where the sigmoid is small). Phi's derivative, the pdf, is the same polynomial's (4e-6); the
// sigmoid's is s (1 - s) of the polynomial's s. That is far below half an ulp of a 16-bit result (2^-9 relative
// for bfloat16, 2^-12 for float16), so the 16-bit activations use them for vectors whose lanes all lie in range
// (about ten fused multiply-adds, where erfc or the sigmoid take an exponential, a reciprocal and their fix-ups);
// other vectors, NaN and inf included, take the full forms. float32 and float64 keep the full forms.
constexpr float kPhiUMax = 9.f, kSigmoidUMax = 16.f;
constexpr float kPhiP[10] = {-1.52848671e-11f, 9.63236713e-10f, -2.93980396e-08f, 5.9483574e-07f, -9.16321096e-06f,
                             0.000114722163f,  -0.00118623488f, 0.00997263659f,   -0.0664900318f, 0.398942232f};
// the pdf: sum (2k + 1) p_k u^k, the derivative of x P(x^2)
constexpr float kPdfP[10] = {-2.90412472e-10f, 1.6375024e-08f, -4.40970581e-07f, 7.73286501e-06f, -0.000100795318f,
                             0.00103249948f,   -0.00830364414f, 0.049863182f,    -0.199470103f,   0.398942232f};
constexpr float kSigmoidP[10] = {-8.79556736e-13f, 8.11263279e-11f, -3.35065242e-09f, 8.3122913e-08f,
                                 -1.42001102e-06f, 1.85236768e-05f, -0.000203923104f, 0.00207383954f,
                                 -0.0208273157f,   0.249998927f};

// g(x) = 1/2 + x P(x^2) into g, with u = x^2; false (g untouched) when a lane lies out of range
template <typename V>
TRITIUM_INLINE bool gate16(const V& x, float u_max, const float (&p)[10], V& u, V& g) {
  u = x * x;
  if (!all_le(u, u_max)) return false;
  g = at::vec::fmadd(x, horner(u, p), V(0.5f));
  return true;
}

// The full forms behind gate16's range test, kept out of line (noinline holds inside map_vec's flatten): a vector
// with a lane out of range is rare, and inlined its exp and reciprocal crowd the polynomial's registers (AVX2's 16
// ymm registers spilled: bfloat16 silu 6% slower).
template <typename Op, typename V>
__attribute__((noinline)) V fwd_full(const V& x, const Prm<V>& p) {
  return Op::fwd(x, p);
}
template <typename Op, typename V>
__attribute__((noinline)) void both_full(const V& x, const Prm<V>& p, V& f, V& df) {
  Op::both(x, p, f, df);
}

// ---------------------------------------------------------------------------------------------------------
// The activations. fwd(x) = f(x); bwd(dy, x) = dy * f'(x), as torch computes them. Gate functors also give
// both(x) -> (f, f') for the gated units, sharing the transcendental between value and derivative.
// ---------------------------------------------------------------------------------------------------------
struct Relu {  // x <= 0 -> 0 (NaN stays NaN); gradient 0 at x = 0, dy at NaN (torch: threshold_backward on y)
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) { return sel(x <= V(0), V(0), x); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>&) {
    return sel(x <= V(0), V(0), dy);
  }
};
struct LeakyRelu {  // a: negative_slope; the slope applies at x = 0
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>& p) { return sel(x > V(0), x, x * p.a); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    return sel(x > V(0), dy, dy * p.a);
  }
};
struct Elu {  // a: alpha * scale, b: scale, c: input_scale (elu, selu and celu)
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>& p) {
    return sel(x >= V(0), x * p.b, fexpm1(x * p.c) * p.a);
  }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    return sel(x > V(0), dy * p.b, dy * p.c * p.a * fexp(x * p.c));  // NaN -> NaN, as torch
  }
};
struct Sigmoid {
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) { return fsigmoid(x); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>&) {
    V s = fsigmoid(x);
    return dy * s * (V(1) - s);
  }
  template <typename V> TRITIUM_INLINE static void both(const V& x, const Prm<V>&, V& f, V& df) {
    f = fsigmoid(x);
    df = f * (V(1) - f);
  }
  template <typename V> TRITIUM_INLINE static V fwd16(const V& x, const Prm<V>& p) {
    V u, s;
    return gate16(x, kSigmoidUMax, kSigmoidP, u, s) ? s : fwd_full<Sigmoid>(x, p);
  }
  template <typename V> TRITIUM_INLINE static void both16(const V& x, const Prm<V>& p, V& f, V& df) {
    V u;
    if (!gate16(x, kSigmoidUMax, kSigmoidP, u, f)) return both_full<Sigmoid>(x, p, f, df);
    df = f * (V(1) - f);
  }
};
struct Tanh {
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) { return ftanh(x); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>&) {
    V t = ftanh(x);
    return dy * (V(1) - t * t);
  }
};
struct Softplus {  // a: beta, b: threshold; linear above the threshold
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>& p) {
    V z = x * p.a;
    return sel(z > p.b, x, softplus(z) / p.a);
  }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    V z = x * p.a, e = fexp(z);
    return sel(z > p.b, dy, dy * e / (e + V(1)));
  }
};
struct Gelu {  // x * Phi(x), Phi the normal CDF; f' = Phi + x pdf
  template <typename V> TRITIUM_INLINE static void both(const V& x, const Prm<V>&, V& f, V& df) {
    V e, cdf = phi_fast(x, e);
    f = x * cdf;
    df = at::vec::fmadd(x * V(0.5 * M_2_SQRTPI * M_SQRT1_2), e, cdf);
  }
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) {
    V e;
    return x * phi_fast(x, e);
  }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    V f, df;
    both(x, p, f, df);
    return dy * df;
  }
  template <typename V> TRITIUM_INLINE static V fwd16(const V& x, const Prm<V>& p) {
    V u, g;
    return gate16(x, kPhiUMax, kPhiP, u, g) ? x * g : fwd_full<Gelu>(x, p);
  }
  template <typename V> TRITIUM_INLINE static void both16(const V& x, const Prm<V>& p, V& f, V& df) {
    V u, g;
    if (!gate16(x, kPhiUMax, kPhiP, u, g)) return both_full<Gelu>(x, p, f, df);
    f = x * g;
    df = at::vec::fmadd(x, horner(u, kPdfP), g);
  }
};
struct GeluTanh {  // 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): one exp, no tanh;
  // the derivative uses 1 - tanh(u)^2 = 4 s (1 - s) with s = sigmoid(2u)
  template <typename V> TRITIUM_INLINE static void both(const V& x, const Prm<V>&, V& f, V& df) {
    const V kBeta(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa(0.044715);
    V x2 = x * x;
    V s = fsigmoid(V(2) * kBeta * (x + kKappa * x2 * x));
    f = x * s;
    df = s + V(2) * x * s * (V(1) - s) * kBeta * (V(1) + V(3) * kKappa * x2);
  }
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) {
    const V kBeta(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa(0.044715);
    return x * fsigmoid(V(2) * kBeta * (x + kKappa * x * x * x));
  }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    V f, df;
    both(x, p, f, df);
    return dy * df;
  }
};
struct Silu {  // x * sigmoid(x)
  template <typename V> TRITIUM_INLINE static void both(const V& x, const Prm<V>&, V& f, V& df) {
    V s = fsigmoid(x);
    f = x * s;
    df = s * (V(1) + x * (V(1) - s));
  }
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) { return x / (V(1) + fexp(x.neg())); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    V f, df;
    both(x, p, f, df);
    return dy * df;
  }
  template <typename V> TRITIUM_INLINE static V fwd16(const V& x, const Prm<V>& p) {
    V u, s;
    return gate16(x, kSigmoidUMax, kSigmoidP, u, s) ? x * s : fwd_full<Silu>(x, p);
  }
  template <typename V> TRITIUM_INLINE static void both16(const V& x, const Prm<V>& p, V& f, V& df) {
    V u, s;
    if (!gate16(x, kSigmoidUMax, kSigmoidP, u, s)) return both_full<Silu>(x, p, f, df);
    f = x * s;
    df = s * (V(1) + x * (V(1) - s));
  }
};
struct Mish {  // x * tanh(softplus(x)), with one exp: tanh(log1p(e)) = n / (n + 2), n = e (e + 2), e = exp(x)
  // (exact algebra; above x = 20 the ratio is 1 in every dtype, and n would overflow). sigmoid(x) = e / (1 + e).
  template <typename V> TRITIUM_INLINE static V tsp(const V& x, const V& e) {
    V n = e * (e + V(2));
    return sel(x > V(20), V(1), n / (n + V(2)));
  }
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) { return x * tsp(x, fexp(x)); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>&) {
    V e = fexp(x), t = tsp(x, e), s = sel(x > V(20), V(1), e / (V(1) + e));
    return dy * (t + x * s * (V(1) - t * t));
  }
};
struct LogSigmoid {  // min(x, 0) - log1p(exp(-|x|))
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) {
    return V(0) - softplus(x.neg());
  }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>&) {
    V z = fexp(x.abs().neg()), neg = x < V(0);
    return dy * (sel(neg, V(1), V(0)) - sel(neg, V(1), V(-1)) * z / (V(1) + z));
  }
};
struct Hardswish {  // x * relu6(x + 3) / 6
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) {
    return x * at::vec::minimum(at::vec::maximum(x + V(3), V(0)), V(6)) * V(1.0 / 6);  // no vector division
  }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>&) {
    return sel(x <= V(-3), V(0), sel(x >= V(3), dy, dy * (x / V(3) + V(0.5))));  // torch: 0 at -3, dy at 3, NaN
  }
};
struct Swish {  // a: beta; x * sigmoid(beta * x)
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>& p) { return x * fsigmoid(x * p.a); }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V& x, const Prm<V>& p) {
    V s = fsigmoid(x * p.a);
    return dy * (s + p.a * x * s * (V(1) - s));
  }
};

template <typename V>
Prm<V> prm(double a, double b, double c) {
  using A = typename V::value_type;
  return {V(static_cast<A>(a)), V(static_cast<A>(b)), V(static_cast<A>(c))};
}

// The activation of storage type T: an op's fwd16 / both16 (a cheaper form accurate to well under a 16-bit ulp)
// where T is 16-bit and the op has one, else fwd / both; bwd is dy * f' from either.
template <typename T, typename Op, typename V>
TRITIUM_INLINE V act_fwd(const V& x, const Prm<V>& p) {
  if constexpr (sizeof(T) == 2 && requires { Op::fwd16(x, p); }) return Op::fwd16(x, p);
  else return Op::fwd(x, p);
}
template <typename T, typename Op, typename V>
TRITIUM_INLINE void act_both(const V& x, const Prm<V>& p, V& f, V& df) {
  if constexpr (sizeof(T) == 2 && requires { Op::both16(x, p, f, df); }) Op::both16(x, p, f, df);
  else Op::both(x, p, f, df);
}
template <typename T, typename Op, typename V>
TRITIUM_INLINE V act_bwd(const V& dy, const V& x, const Prm<V>& p) {
  if constexpr (sizeof(T) == 2 && requires(V f) { Op::both16(x, p, f, f); }) {
    V f, df;
    Op::both16(x, p, f, df);
    return dy * df;
  } else {
    return Op::bwd(dy, x, p);
  }
}

// ---------------------------------------------------------------------------------------------------------
// unary: y = f(x), x (M, N) rows; in place: x = f(x); backward dx = dy * f'(x)
// ---------------------------------------------------------------------------------------------------------
template <typename Op>
at::Tensor unary_fwd(const at::Tensor& x, double a, double b, double c) {
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty({M, N}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_act_fwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    const auto p = prm<V>(a, b, c);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    const bool nt = stream_outputs(2 * M * N * x.element_size());
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      const scalar_t* const in[1] = {xp + r * sx + c0};
      scalar_t* const out[1] = {yp + r * N + c0};
      map_vec<scalar_t, 1, 1>(
          in, out, c1 - c0, [&](const V (&v)[1], V (&o)[1]) { o[0] = act_fwd<scalar_t, Op>(v[0], p); }, nt);
    });
  });
  return y;
}

template <typename Op>
void unary_fwd_(at::Tensor x, double a, double b, double c) {
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1);
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_act_fwd_", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    const auto p = prm<V>(a, b, c);
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      scalar_t* row = xp + r * sx + c0;
      const scalar_t* const in[1] = {row};
      scalar_t* const out[1] = {row};
      map_vec<scalar_t, 1, 1>(in, out, c1 - c0,
                              [&](const V (&v)[1], V (&o)[1]) { o[0] = act_fwd<scalar_t, Op>(v[0], p); });
    });
  });
}

template <typename Op>
at::Tensor unary_bwd(const at::Tensor& dy, const at::Tensor& x, double a, double b, double c) {
  check_rows(dy, "grad_output");
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(dy.sizes() == x.sizes(), "grad_output must have the shape of input");
  auto dx = empty({M, N}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_act_bwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    const auto p = prm<V>(a, b, c);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int64_t sdy = dy.stride(0), sx = x.stride(0);
    const bool nt = stream_outputs(3 * M * N * x.element_size());
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      const scalar_t* const in[2] = {dyp + r * sdy + c0, xp + r * sx + c0};
      scalar_t* const out[1] = {dxp + r * N + c0};
      map_vec<scalar_t, 2, 1>(
          in, out, c1 - c0, [&](const V (&v)[2], V (&o)[1]) { o[0] = act_bwd<scalar_t, Op>(v[0], v[1], p); }, nt);
    });
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------------------
// gated: y = f(gate) * up. layout 0: x is gate (M, H), up (M, H) separate; layout 1: x (M, 2H) = [gate | up]
// (the fused gate+up projection); layout 2: x (M, 2H) = [up | gate] (F.glu: the second half is gated).
// backward: dgate = dy * up * f'(gate), dup = dy * f(gate), in one pass; fused layouts write one (M, 2H) dx.
// ---------------------------------------------------------------------------------------------------------
struct GateViews {
  int64_t M, H, goff, uoff, sg, su;  // element offsets of gate/up within their tensor's row, row strides
};

GateViews gate_views(const at::Tensor& x, const c10::optional<at::Tensor>& up, int64_t layout) {
  check_rows(x, "input");
  const int64_t M = x.size(0);
  if (layout == 0) {
    TORCH_CHECK(up.has_value(), "up is required for separate gate and up");
    check_rows(*up, "up");
    TORCH_CHECK(up->sizes() == x.sizes(), "up must have the shape of gate");
    return {M, x.size(1), 0, 0, x.stride(0), up->stride(0)};
  }
  TORCH_CHECK(layout == 1 || layout == 2, "layout must be 0, 1 or 2");
  TORCH_CHECK(x.size(1) % 2 == 0, "the fused gate/up dimension must be even");
  const int64_t H = x.size(1) / 2;
  return {M, H, layout == 1 ? 0 : H, layout == 1 ? H : 0, x.stride(0), x.stride(0)};
}

template <typename Op>
at::Tensor gated_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& up, int64_t layout) {
  const GateViews g = gate_views(x, up, layout);
  auto y = empty({g.M, g.H}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_gated_fwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    const auto p = prm<V>(0, 0, 0);
    const scalar_t* gp = x.const_data_ptr<scalar_t>() + g.goff;
    const scalar_t* up_ = (layout == 0 ? up->const_data_ptr<scalar_t>() : x.const_data_ptr<scalar_t>()) + g.uoff;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool nt = stream_outputs(3 * g.M * g.H * x.element_size());
    for_chunks(g.M, g.H, [&](int64_t r, int64_t c0, int64_t c1) {
      const scalar_t* const in[2] = {gp + r * g.sg + c0, up_ + r * g.su + c0};
      scalar_t* const out[1] = {yp + r * g.H + c0};
      map_vec<scalar_t, 2, 1>(
          in, out, c1 - c0, [&](const V (&v)[2], V (&o)[1]) { o[0] = act_fwd<scalar_t, Op>(v[0], p) * v[1]; }, nt);
    });
  });
  return y;
}

template <typename Op>
std::tuple<at::Tensor, at::Tensor> gated_bwd(const at::Tensor& dy, const at::Tensor& x,
                                             const c10::optional<at::Tensor>& up, int64_t layout) {
  const GateViews g = gate_views(x, up, layout);
  check_rows(dy, "grad_output");
  TORCH_CHECK(dy.size(0) == g.M && dy.size(1) == g.H, "grad_output must have the output's shape");
  at::Tensor dx = empty({g.M, layout == 0 ? g.H : 2 * g.H}, x.options());
  at::Tensor dup = layout == 0 ? empty({g.M, g.H}, x.options()) : at::empty({0}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_gated_bwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    const auto p = prm<V>(0, 0, 0);
    const scalar_t* gp = x.const_data_ptr<scalar_t>() + g.goff;
    const scalar_t* up_ = (layout == 0 ? up->const_data_ptr<scalar_t>() : x.const_data_ptr<scalar_t>()) + g.uoff;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dgp = dx.mutable_data_ptr<scalar_t>() + g.goff;
    scalar_t* dup_ = (layout == 0 ? dup.mutable_data_ptr<scalar_t>() : dx.mutable_data_ptr<scalar_t>()) + g.uoff;
    const int64_t sdx = dx.size(1), sdup = layout == 0 ? g.H : sdx, sdy = dy.stride(0);
    const bool nt = stream_outputs(5 * g.M * g.H * x.element_size());
    for_chunks(g.M, g.H, [&](int64_t r, int64_t c0, int64_t c1) {
      const scalar_t* const in[3] = {dyp + r * sdy + c0, gp + r * g.sg + c0, up_ + r * g.su + c0};
      scalar_t* const out[2] = {dgp + r * sdx + c0, dup_ + r * sdup + c0};
      map_vec<scalar_t, 3, 2>(
          in, out, c1 - c0,
          [&](const V (&v)[3], V (&o)[2]) {
            V f, df;
            act_both<scalar_t, Op>(v[1], p, f, df);
            o[0] = v[0] * v[2] * df;
            o[1] = v[0] * f;
          },
          nt);
    });
  });
  return {dx, dup};
}

// ---------------------------------------------------------------------------------------------------------
// DyT: y = w * tanh(alpha * x) + b, x (M, N), alpha (1,), w and b (N,).
// backward with t = tanh(alpha x), g = dy * w * (1 - t^2): dx = alpha g, dalpha = sum(g x),
// dw = sum_rows dy t, db = sum_rows dy (per-thread partial rows, then one reduction).
// ---------------------------------------------------------------------------------------------------------
at::Tensor dyt_fwd(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& w, const at::Tensor& bias) {
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty({M, N}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_dyt_fwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    using acc_t = acc_type<scalar_t>;
    const V va(static_cast<acc_t>(*alpha.const_data_ptr<scalar_t>()));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    const bool nt = stream_outputs(2 * M * N * x.element_size());
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      const scalar_t* const in[3] = {xp + r * sx + c0, wp + c0, bp + c0};
      scalar_t* const out[1] = {yp + r * N + c0};
      map_vec<scalar_t, 3, 1>(
          in, out, c1 - c0,
          [&](const V (&v)[3], V (&o)[1]) { o[0] = at::vec::fmadd(v[1], ftanh(va * v[0]), v[2]); }, nt);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dyt_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& alpha, const at::Tensor& w,
                                                                   bool need_dalpha, bool need_dw, bool need_db) {
  check_rows(dy, "grad_output");
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1);
  auto dx = empty({M, N}, x.options());
  const int64_t T = at::get_num_threads();
  auto acc_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto dw_part = need_dw ? at::zeros({T, N}, acc_opts) : at::Tensor();
  auto db_part = need_db ? at::zeros({T, N}, acc_opts) : at::Tensor();
  std::vector<double> da_part(T, 0.0);
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_dyt_bwd", [&] {
    using IO = VecIO<scalar_t>;
    using V = typename IO::Vec;
    using acc_t = acc_type<scalar_t>;
    constexpr int64_t K = IO::kSize;
    const V va(static_cast<acc_t>(*alpha.const_data_ptr<scalar_t>()));
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    acc_t* dwp = need_dw ? dw_part.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* dbp = need_db ? db_part.mutable_data_ptr<acc_t>() : nullptr;
    const int64_t sdy = dy.stride(0), sx = x.stride(0);
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      const int64_t tid = at::get_thread_num();
      acc_t* dw_t = dwp ? dwp + tid * N : nullptr;
      acc_t* db_t = dbp ? dbp + tid * N : nullptr;
      const scalar_t* dyr = dyp + r * sdy;
      const scalar_t* xr = xp + r * sx;
      scalar_t* dxr = dxp + r * N;
      V da(0);
      int64_t i = c0;
      auto step = [&](const V& d, const V& xv, const V& wv, V& out, V& t) {
        // float: Sleef, as ftanh's small but one-signed error adds up in the dalpha sum; 16-bit: ftanh suffices
        t = std::is_same_v<scalar_t, float> ? (va * xv).tanh() : ftanh(va * xv);
        V g = d * wv * (V(1) - t * t);
        out = va * g;
        da = at::vec::fmadd(g, xv, da);
      };
      for (; i + K <= c1; i += K) {
        V d = IO::load(dyr + i), out, t;
        step(d, IO::load(xr + i), IO::load(wp + i), out, t);
        IO::store(dxr + i, out);
        if (dw_t) at::vec::fmadd(d, t, V::loadu(dw_t + i)).store(dw_t + i);
        if (db_t) (V::loadu(db_t + i) + d).store(db_t + i);
      }
      if (i < c1) {  // the tail through zero-padded buffers (dy = 0 there: no contribution to any sum)
        const int64_t rest = c1 - i;
        scalar_t bd[K], bx[K], bw[K], bo[K];
        acc_t aw[K], ab[K];
        for (int64_t k = 0; k < K; ++k) {
          bd[k] = k < rest ? dyr[i + k] : scalar_t(0);
          bx[k] = k < rest ? xr[i + k] : scalar_t(0);
          bw[k] = k < rest ? wp[i + k] : scalar_t(0);
          aw[k] = dw_t && k < rest ? dw_t[i + k] : acc_t(0);
          ab[k] = db_t && k < rest ? db_t[i + k] : acc_t(0);
        }
        V d = IO::load(bd), out, t;
        step(d, IO::load(bx), IO::load(bw), out, t);
        IO::store(bo, out);
        at::vec::fmadd(d, t, V::loadu(aw)).store(aw);
        (V::loadu(ab) + d).store(ab);
        for (int64_t k = 0; k < rest; ++k) {
          dxr[i + k] = bo[k];
          if (dw_t) dw_t[i + k] = aw[k];
          if (db_t) db_t[i + k] = ab[k];
        }
      }
      da_part[tid] += hsum(da);
    });
  });
  auto finish = [&](const at::Tensor& part) { return part.sum(0).to(x.scalar_type()); };
  double da = 0;
  for (double v : da_part) da += v;
  at::Tensor dalpha = need_dalpha ? at::full({1}, da, x.options()) : at::empty({0}, x.options());
  at::Tensor dw = need_dw ? finish(dw_part) : at::empty({0}, x.options());
  at::Tensor db = need_db ? finish(db_part) : at::empty({0}, x.options());
  return {dx, dalpha, dw, db};
}

// ---------------------------------------------------------------------------------------------------------
// Swish with a learnable beta (a one-element tensor): y = x s, s = sigmoid(beta x).
// backward: dx = dy s (1 + beta x (1 - s)), dbeta = sum dy x^2 s (1 - s) (per-thread partials, summed in double).
// ---------------------------------------------------------------------------------------------------------
at::Tensor swish_beta_fwd(const at::Tensor& x, const at::Tensor& beta) {
  TORCH_CHECK(beta.numel() == 1 && beta.scalar_type() == x.scalar_type(), "swish: beta must be one element of x's dtype");
  // the table's Swish with beta read from its tensor (a CPU scalar: no device sync; exact in double)
  return unary_fwd<Swish>(x, beta.item<double>(), 0, 0);
}

std::tuple<at::Tensor, at::Tensor> swish_beta_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& beta,
                                                  bool need_dbeta) {
  check_rows(dy, "grad_output");
  check_rows(x, "input");
  TORCH_CHECK(beta.numel() == 1 && beta.scalar_type() == x.scalar_type(), "swish: beta must be one element of x's dtype");
  const int64_t M = x.size(0), N = x.size(1);
  auto dx = empty({M, N}, x.options());
  std::vector<double> db_part(at::get_num_threads(), 0.0);
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_swish_beta_bwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    using acc_t = acc_type<scalar_t>;
    const V vb(static_cast<acc_t>(*beta.const_data_ptr<scalar_t>()));
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int64_t sdy = dy.stride(0), sx = x.stride(0);
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      V db(0);
      const scalar_t* const in[2] = {dyp + r * sdy + c0, xp + r * sx + c0};
      scalar_t* const out[1] = {dxp + r * N + c0};
      map_vec<scalar_t, 2, 1>(in, out, c1 - c0, [&](const V (&v)[2], V (&o)[1]) {
        const V s = fsigmoid(vb * v[1]), ds = s * (V(1) - s);  // padded lanes: dy = x = 0, no contribution
        o[0] = v[0] * at::vec::fmadd(vb * v[1], V(1) - s, V(1)) * s;
        if (need_dbeta) db = at::vec::fmadd(v[0] * v[1] * v[1], ds, db);
      });
      if (need_dbeta) db_part[at::get_thread_num()] += hsum(db);
    });
  });
  double db = 0;
  for (double v : db_part) db += v;
  return {dx, need_dbeta ? at::full({1}, db, x.options()) : at::empty({0}, x.options())};
}

// ---------------------------------------------------------------------------------------------------------
// PReLU with one slope per channel: x viewed as (M, N) rows; per_row: channel = row % C (channels before the
// contiguous inner dims), else channel = column (channels last). y = x > 0 ? x : w x.
// backward: dx = x > 0 ? dy : w dy;  dw[c] = sum over channel c of (x > 0 ? 0 : x dy).
// ---------------------------------------------------------------------------------------------------------
at::Tensor prelu_fwd(const at::Tensor& x, const at::Tensor& w, bool per_row) {
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1), C = w.numel();
  auto y = empty({M, N}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_prelu_fwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      scalar_t* const out[1] = {yp + r * N + c0};
      if (per_row) {
        const V s(static_cast<acc_t>(wp[r % C]));
        const scalar_t* const in[1] = {xp + r * sx + c0};
        map_vec<scalar_t, 1, 1>(in, out, c1 - c0,
                                [&](const V (&v)[1], V (&o)[1]) { o[0] = sel(v[0] > V(0), v[0], v[0] * s); });
      } else {
        const scalar_t* const in[2] = {xp + r * sx + c0, wp + c0};
        map_vec<scalar_t, 2, 1>(in, out, c1 - c0,
                                [&](const V (&v)[2], V (&o)[1]) { o[0] = sel(v[0] > V(0), v[0], v[0] * v[1]); });
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> prelu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                             bool per_row, bool need_dw) {
  check_rows(dy, "grad_output");
  check_rows(x, "input");
  const int64_t M = x.size(0), N = x.size(1), C = w.numel();
  auto dx = empty({M, N}, x.options());
  const int64_t T = at::get_num_threads();
  auto acc_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  // per-thread partials: per_row -> one per channel, else one per column (= channel)
  auto part = need_dw ? at::zeros({T, per_row ? C : N}, acc_opts) : at::Tensor();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_prelu_bwd", [&] {
    using IO = VecIO<scalar_t>;
    using V = typename IO::Vec;
    using acc_t = acc_type<scalar_t>;
    constexpr int64_t K = IO::kSize;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    acc_t* pp = need_dw ? part.mutable_data_ptr<acc_t>() : nullptr;
    const int64_t sdy = dy.stride(0), sx = x.stride(0), P = per_row ? C : N;
    for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
      acc_t* pt = pp ? pp + at::get_thread_num() * P : nullptr;
      const scalar_t* dyr = dyp + r * sdy;
      const scalar_t* xr = xp + r * sx;
      scalar_t* dxr = dxp + r * N;
      V acc(0);
      for (int64_t i = c0; i < c1; i += K) {
        const int64_t rest = std::min<int64_t>(K, c1 - i);
        scalar_t bd[K], bx[K], bw[K], bo[K];
        acc_t bp[K];
        const bool full = rest == K;
        const scalar_t *d_in = dyr + i, *x_in = xr + i, *w_in = wp + i;
        if (!full) {
          for (int64_t k = 0; k < K; ++k) {
            bd[k] = k < rest ? dyr[i + k] : scalar_t(0);
            bx[k] = k < rest ? xr[i + k] : scalar_t(0);
            bw[k] = (!per_row && k < rest) ? wp[i + k] : scalar_t(0);
          }
          d_in = bd, x_in = bx, w_in = bw;
        }
        V d = IO::load(d_in), xv = IO::load(x_in);
        V s = per_row ? V(static_cast<acc_t>(wp[r % C])) : IO::load(w_in);
        V pos = xv > V(0);
        V out = sel(pos, d, d * s);
        V contrib = sel(pos, V(0), xv * d);
        if (full) {
          IO::store(dxr + i, out);
        } else {
          IO::store(bo, out);
          for (int64_t k = 0; k < rest; ++k) dxr[i + k] = bo[k];
        }
        if (pt) {
          if (per_row) {
            acc = acc + contrib;
          } else if (full) {
            (V::loadu(pt + i) + contrib).store(pt + i);
          } else {
            contrib.store(bp);
            for (int64_t k = 0; k < rest; ++k) pt[i + k] += bp[k];
          }
        }
      }
      if (pt && per_row) pt[r % C] += hsum(acc);
    });
  });
  at::Tensor dw = need_dw ? part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dw};
}

}  // namespace

// The elementwise table (names match python/tritium/ops/activations.py ACTIVATIONS).
#define TRITIUM_ACTIVATIONS(X)                                                                      \
  X(relu, Relu) X(leaky_relu, LeakyRelu) X(elu, Elu) X(sigmoid, Sigmoid) X(tanh, Tanh)             \
  X(softplus, Softplus) X(gelu, Gelu) X(gelu_tanh, GeluTanh) X(silu, Silu) X(mish, Mish)           \
  X(logsigmoid, LogSigmoid) X(hardswish, Hardswish) X(swish, Swish)

// Gate functions of the gated units.
#define TRITIUM_GATES(X) X(glu, Sigmoid) X(swiglu, Silu) X(geglu, Gelu) X(geglu_tanh, GeluTanh)

namespace {
// ---------------------------------------------------------------------------------------------------------
// BatchNorm in inference + activation: y = f(x * scale[c] + shift[c] (+ residual)), x as (M, N) rows with the
// channel found as PReLU's (per_row: c = row % C, channels before contiguous inner dims; else c = column).
// scale / shift come in the accumulation type (float for 16-bit x): BatchNorm's w / sqrt(var + eps) and
// b - mean * scale, folded by the caller. act: -1 identity, else the TRITIUM_ACTIVATIONS index (ACT_IDS).
// backward (z recomputed): dz = dy f'(z); dx = dz scale[c]; dres = dz; dscale[c] = sum dz x, dshift[c] = sum dz.
// ---------------------------------------------------------------------------------------------------------
struct Identity {
  template <typename V> TRITIUM_INLINE static V fwd(const V& x, const Prm<V>&) { return x; }
  template <typename V> TRITIUM_INLINE static V bwd(const V& dy, const V&, const Prm<V>&) { return dy; }
};

template <typename F>
void with_act(int64_t act, const F& f) {
  int64_t id = 0;
#define TRITIUM_ACT_CASE(name, Op) \
  if (act == id++) return f(Op{});
  TRITIUM_ACTIVATIONS(TRITIUM_ACT_CASE)
#undef TRITIUM_ACT_CASE
  TORCH_CHECK(act == -1, "batch_norm_act: unknown activation id ", act);
  f(Identity{});
}

// The rows' elements [c0, c1) of x / res / scale / shift (per_row: one channel for the row) as vectors of the
// accumulation type, K at a time; the last partial vector goes through zero-padded buffers. fn(i, n, x, z)
// gets the offset, the count, x and z = x * scale + shift (+ res).
template <typename T, typename F>
inline void bn_rows(const T* xr, const T* rr, const acc_type<T>* sp, const acc_type<T>* tp, bool per_row, int64_t ch,
                    int64_t c0, int64_t c1, const F& fn) {
  using IO = VecIO<T>;
  using V = typename IO::Vec;
  using A = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  const V s1(per_row ? sp[ch] : A(0)), t1(per_row ? tp[ch] : A(0));
  for (int64_t i = c0; i < c1; i += K) {
    const int64_t n = std::min<int64_t>(K, c1 - i);
    V xv, s = s1, t = t1, rv(0);
    if (n == K) {
      xv = IO::load(xr + i);
      if (rr) rv = IO::load(rr + i);
      if (!per_row) s = V::loadu(sp + i), t = V::loadu(tp + i);
    } else {
      T bx[K], br[K];
      for (int64_t k = 0; k < K; ++k) bx[k] = k < n ? xr[i + k] : T(0), br[k] = (rr && k < n) ? rr[i + k] : T(0);
      xv = IO::load(bx);
      if (rr) rv = IO::load(br);
      if (!per_row) s = V::loadu(sp + i, n), t = V::loadu(tp + i, n);
    }
    V z = at::vec::fmadd(xv, s, t);
    if (rr) z = z + rv;
    fn(i, n, xv, z);
  }
}

void check_bn(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
              const c10::optional<at::Tensor>& res, bool per_row) {
  check_rows(x, "input");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.dim() == 1 && shift.sizes() == scale.sizes() && scale.is_contiguous() && shift.is_contiguous() &&
                  scale.scalar_type() == acc && shift.scalar_type() == acc,
              "batch_norm_act: scale and shift must be contiguous (C,) tensors of ", acc, ", got ", scale.sizes(), " ",
              scale.scalar_type(), " and ", shift.sizes(), " ", shift.scalar_type());
  TORCH_CHECK(per_row || scale.numel() == x.size(1), "batch_norm_act: ", scale.numel(), " channels for ", x.size(1),
              " columns");
  TORCH_CHECK(!res.has_value() || (res->sizes() == x.sizes() && res->scalar_type() == x.scalar_type() &&
                                   res->stride(1) == 1),
              "batch_norm_act: residual must match input ", x.sizes(), " with a unit column stride");
}

at::Tensor bn_act_fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& res, bool per_row, int64_t act, double a, double b, double c) {
  check_bn(x, scale, shift, res, per_row);
  const int64_t M = x.size(0), N = x.size(1), C = scale.numel();
  auto y = empty({M, N}, x.options());
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_bn_act_fwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    using A = acc_type<scalar_t>;
    const auto p = prm<V>(a, b, c);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.has_value() ? res->const_data_ptr<scalar_t>() : nullptr;
    const A* sp = scale.const_data_ptr<A>();
    const A* tp = shift.const_data_ptr<A>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t sx = x.stride(0), sr = rp ? res->stride(0) : 0;
    const bool nt = stream_outputs((rp ? 3 : 2) * M * N * x.element_size());
    with_act(act, [&](auto op) {
      using Op = decltype(op);
      for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
        scalar_t* yr = yp + r * N;
        bn_rows<scalar_t>(xp + r * sx, rp ? rp + r * sr : nullptr, sp, tp, per_row, r % C, c0, c1,
                          [&](int64_t i, int64_t n, const V&, const V& z) {
                            store_out(yr + i, act_fwd<scalar_t, Op>(z, p), n, nt);
                          });
        if (nt) stream_fence();
      });
    });
  });
  return y;
}

// -> dx, dz (the residual's gradient; empty without a residual), dscale, dshift (accumulation type; empty unless
// need_affine)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const c10::optional<at::Tensor>& res, bool per_row, int64_t act, double a, double b, double c, bool need_affine) {
  check_bn(x, scale, shift, res, per_row);
  check_rows(dy, "grad_output");
  const int64_t M = x.size(0), N = x.size(1), C = scale.numel();
  auto dx = empty({M, N}, x.options());
  auto dz = res.has_value() ? empty({M, N}, x.options()) : at::empty({0}, x.options());
  const int64_t T = at::get_num_threads();
  // per-thread partials of sum dz x and sum dz: per_row -> one per channel, else one per column (= channel)
  auto part = need_affine ? at::zeros({2, T, C}, scale.options()) : at::Tensor();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_bn_act_bwd", [&] {
    using V = typename VecIO<scalar_t>::Vec;
    using A = acc_type<scalar_t>;
    constexpr int64_t K = V::size();
    const auto p = prm<V>(a, b, c);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.has_value() ? res->const_data_ptr<scalar_t>() : nullptr;
    const A* sp = scale.const_data_ptr<A>();
    const A* tp = shift.const_data_ptr<A>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dzp = rp ? dz.mutable_data_ptr<scalar_t>() : nullptr;
    A* pp = need_affine ? part.mutable_data_ptr<A>() : nullptr;
    const int64_t sx = x.stride(0), sr = rp ? res->stride(0) : 0, sdy = dy.stride(0);
    const bool nt = stream_outputs((rp ? 5 : 3) * M * N * x.element_size());
    with_act(act, [&](auto op) {
      using Op = decltype(op);
      for_chunks(M, N, [&](int64_t r, int64_t c0, int64_t c1) {
        const int64_t ch = r % C;
        A* px = pp ? pp + at::get_thread_num() * C : nullptr;  // sum dz x
        A* pz = pp ? pp + (T + at::get_thread_num()) * C : nullptr;  // sum dz
        const scalar_t* dyr = dyp + r * sdy;
        V acc_x(0), acc_z(0);
        bn_rows<scalar_t>(xp + r * sx, rp ? rp + r * sr : nullptr, sp, tp, per_row, ch, c0, c1,
                          [&](int64_t i, int64_t n, const V& xv, const V& z) {
                            V d;
                            if (n == K) {
                              d = VecIO<scalar_t>::load(dyr + i);
                            } else {
                              scalar_t bd[K];
                              for (int64_t k = 0; k < K; ++k) bd[k] = k < n ? dyr[i + k] : scalar_t(0);
                              d = VecIO<scalar_t>::load(bd);
                            }
                            // the padded lanes: dy = 0 there, so dz = 0 (f'(z) finite at z = shift)
                            const V g = act_bwd<scalar_t, Op>(d, z, p);
                            const V s = per_row ? V(sp[ch]) : (n == K ? V::loadu(sp + i) : V::loadu(sp + i, n));
                            store_out(dxp + r * N + i, g * s, n, nt);
                            if (dzp) store_out(dzp + r * N + i, g, n, nt);
                            if (!px) return;
                            const V gx = V::set(V(0), g * xv, n), gz = V::set(V(0), g, n);
                            if (per_row) {
                              acc_x = acc_x + gx;
                              acc_z = acc_z + gz;
                            } else {
                              A bx[K], bz[K];
                              gx.store(bx);
                              gz.store(bz);
                              for (int64_t k = 0; k < n; ++k) px[i + k] += bx[k], pz[i + k] += bz[k];
                            }
                          });
        if (px && per_row) {
          px[ch] += hsum(acc_x);
          pz[ch] += hsum(acc_z);
        }
        if (nt) stream_fence();
      });
    });
  });
  at::Tensor dscale, dshift;
  if (need_affine) {
    dscale = part[0].sum(0), dshift = part[1].sum(0);  // the schema's outputs do not share storage
  } else {
    dscale = at::empty({0}, scale.options()), dshift = at::empty({0}, scale.options());
  }
  return {dx, dz, dscale, dshift};
}

// `tritium info`: how the elementwise activations round a bfloat16 output
const bool kPathsReported = cpu::register_paths([] {
  return std::vector<std::pair<std::string, std::string>>{{"activations.bfloat16_output", bf16_output_path()}};
});
}  // namespace

// The streaming-store threshold of vec.h (stream_outputs): set_stream_bytes(b) -> the previous one.
TORCH_LIBRARY_FRAGMENT(tritium_runtime, m) {
  m.def("set_stream_bytes(int bytes) -> int", [](int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_stream_bytes: bytes must be >= 0, got ", bytes);
    return stream_threshold().exchange(bytes);
  });
}

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("batch_norm_act_fwd", &bn_act_fwd);
  m.impl("batch_norm_act_bwd", &bn_act_bwd);
#define TRITIUM_REG_ACT(name, Op)                  \
  m.impl(#name "_fwd", &unary_fwd<Op>);            \
  m.impl(#name "_fwd_", &unary_fwd_<Op>);          \
  m.impl(#name "_bwd", &unary_bwd<Op>);
  TRITIUM_ACTIVATIONS(TRITIUM_REG_ACT)
#undef TRITIUM_REG_ACT
#define TRITIUM_REG_GATE(name, Op)        \
  m.impl(#name "_fwd", &gated_fwd<Op>);   \
  m.impl(#name "_bwd", &gated_bwd<Op>);
  TRITIUM_GATES(TRITIUM_REG_GATE)
#undef TRITIUM_REG_GATE
  m.impl("swish_beta_fwd", &swish_beta_fwd);
  m.impl("swish_beta_bwd", &swish_beta_bwd);
  m.impl("dyt_fwd", &dyt_fwd);
  m.impl("dyt_bwd", &dyt_bwd);
  m.impl("prelu_fwd", &prelu_fwd);
  m.impl("prelu_bwd", &prelu_bwd);
}

}  // namespace tritium
