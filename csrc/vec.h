// Shared helpers for the CPU kernels: load/store any floating dtype as vectors of its accumulation type
// (float for float/bfloat16/half, double for double), and the row-parallel loop every row kernel uses.
#pragma once
#include <cstring>
#include <atomic>
#include <cstdio>
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "cpu.h"

namespace tritium {

using at::vec::Vectorized;

// Per-vector helpers (the math below, the activations' and losses' formulas) are always inlined: left to itself the
// compiler calls the larger ones out of line, once per vector (the argument through memory, and no overlap between
// a loop's independent vectors), which cost a compute-bound loop such as a bfloat16 softmax row a third of its time.
#define TRITIUM_INLINE __attribute__((always_inline)) inline

template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;  // float for 16-bit inputs, the type itself otherwise
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();
  static inline Vec load(const T* p) { return Vec::loadu(p); }
  static inline void store(T* p, const Vec& v) { v.store(p); }
};

template <typename T16>
struct VecIO16 {
  using acc_t = float;
  using Vec = Vectorized<float>;
  static constexpr int64_t kSize = Vec::size();
  static inline Vec load(const T16* p) {
    Vec out;
    at::vec::load_to_float<T16>(p, out);
    return out;
  }
  static inline void store(T16* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    // one 256-bit store of the rounded halves (convert_from_float's vector of 32 would store half of itself
    // through a temporary buffer)
    if constexpr (std::is_same_v<T16, c10::BFloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(static_cast<__m512>(v)));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(static_cast<__m512>(v)));
    }
#else
    at::vec::convert_from_float<T16>(v, v).store(p, kSize);
#endif
  }
};
template <>
struct VecIO<c10::BFloat16> : VecIO16<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : VecIO16<c10::Half> {};

template <typename T>
using acc_type = typename VecIO<T>::acc_t;

// Store 2 * kSize elements from two accumulation-type vectors (one full-width conversion for 16-bit types).
template <typename T>
TRITIUM_INLINE void store2(T* p, const Vectorized<acc_type<T>>& a, const Vectorized<acc_type<T>>& b) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    a.store(p);
    b.store(p + Vectorized<T>::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Load 2 * kSize elements as two accumulation-type vectors.
template <typename T>
inline std::pair<Vectorized<acc_type<T>>, Vectorized<acc_type<T>>> load2(const T* p) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return {Vectorized<T>::loadu(p), Vectorized<T>::loadu(p + Vectorized<T>::size())};
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    return {a, b};
  }
}

// dst[0, n) = src[0, n) in the accumulation type A (a copy for float/double; 16-bit: one vector conversion per
// Vectorized<T>::size() elements)
template <typename T, typename A>
inline void to_acc(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(dst, src, n * sizeof(A));
  } else {
    constexpr int64_t K = Vectorized<T>::size();  // 16-bit lanes = 2 float vectors
    int64_t i = 0;
    for (; i + K <= n; i += K) {
      auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + K / 2);
    }
    for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
  }
}

// A row in the accumulation type: the row itself for float/double, else converted into buf (once, so that
// kernels making several passes over a row convert it a single time).
template <typename T>
inline const acc_type<T>* as_acc(const T* src, int64_t n, std::vector<acc_type<T>>& buf) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return src;
  } else {
    buf.resize(n);
    to_acc(src, buf.data(), n);
    return buf.data();
  }
}

// Ask for a row's bytes [p, p + bytes) into L2 ahead of its use: a row kernel calls it on the next row before the
// passes over this one, so that row streams in while this one computes (a row of a few KB is otherwise fetched
// by the first pass alone, the memory idle during the others).
inline void prefetch_l2(const void* p, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
#else
  (void)p;
  (void)bytes;
#endif
}

// Non-temporal (streaming) stores for outputs too large to stay in the cache: written around the cache, they
// skip the read-for-ownership of every output line (a plain store first reads the line from memory) and do not
// evict the inputs. Only where the kernel's working set exceeds the last-level cache (stream_outputs): an
// output that fits there is better left in it for its consumer.
// The last-level cache's size from Linux's sysfs (sysconf's figure can be far off inside a VM); 32 MiB, a server
// part's L3, where it is unknown.
inline int64_t llc_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int i = 0; i < 8; ++i) {
      char path[96];
      std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
      FILE* f = std::fopen(path, "r");
      if (!f) break;
      long v = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &v, &unit) >= 1) {
        const int64_t b = unit == 'M' ? int64_t(v) << 20 : unit == 'K' ? int64_t(v) << 10 : int64_t(v);
        best = std::max(best, b);
      }
      std::fclose(f);
    }
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// The working-set size above which kernels stream their outputs: the last-level cache's
// (tritium_runtime::set_stream_bytes changes it, so the tests reach both paths at small shapes).
inline std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> bytes{llc_bytes()};
  return bytes;
}

// Whether a kernel touching `bytes` of inputs and outputs in one call should stream its outputs.
inline bool stream_outputs(int64_t bytes) { return bytes > stream_threshold().load(std::memory_order_relaxed); }

// p is aligned for stream_store<T> (one vector of the accumulation type stored as T: K * sizeof(T) bytes).
template <typename T>
inline bool stream_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (VecIO<T>::kSize * sizeof(T)) == 0;
}

// One accumulation-type vector stored as T at p (stream_aligned) around the cache; a plain store without x86
// vectors. A kernel that streams calls stream_fence() at the end of each task, before other threads read.
template <typename T>
TRITIUM_INLINE void stream_store(T* p, const Vectorized<acc_type<T>>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(static_cast<__m512>(v)));
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(static_cast<__m512>(v)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {  // the 8 floats rounded into the low half of a 16-lane vector: 16 bytes
    const __m256i h = at::vec::convert_from_float<T>(v, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(h));
  }
#else
  VecIO<T>::store(p, v);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// One vector's n (<= K) elements stored as T at p: streamed when `stream` and p is aligned for it, else a plain
// store (through a buffer for a partial vector).
template <typename T>
TRITIUM_INLINE void store_out(T* p, const Vectorized<acc_type<T>>& v, int64_t n, bool stream) {
  using IO = VecIO<T>;
  if (n == IO::kSize) {
    if (stream && stream_aligned(p)) {
      stream_store(p, v);
    } else {
      IO::store(p, v);
    }
  } else {
    T b[IO::kSize];
    IO::store(b, v);
    std::copy(b, b + n, p);
  }
}

// Whether T outputs are rounded by vcvtne2ps2bf16 (store2_bf16ins): bfloat16 on a CPU with AVX512-BF16, in the
// AVX-512 build.
template <typename T>
inline bool bf16ins() {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  return std::is_same_v<T, c10::BFloat16> && cpu::features().avx512_bf16;
#else
  return false;
#endif
}

// `tritium info`'s line for a family whose bfloat16 outputs go through store2_bf16ins where bf16ins holds
inline const char* bf16_output_path() {
  return bf16ins<c10::BFloat16>() ? "vcvtne2ps2bf16, two vectors a store (AVX512-BF16)"
                                  : "ATen's integer rounding, a vector at a time";
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// 32 bfloat16 at p from two float vectors (a's lanes first), rounded by one vcvtne2ps2bf16 (round to nearest even
// with NaN kept NaN, as torch's conversion) where VecIO's store takes ATen's integer rounding sequence per vector
// (about eight instructions, a third of a cheap activation's work); streamed when `stream` and p is 64-byte
// aligned. The instruction flushes subnormal floats to zero, torch keeps them (bfloat16 has the float's exponent
// range): a pair holding a subnormal lane (vfpclassps, rare) takes ATen's rounding. For TRITIUM_BF16_DOT functions
// only (the caller checked features().avx512_bf16): the intrinsic needs the target, and GCC inlines a function
// only into callers whose target includes its own.
TRITIUM_BF16_DOT TRITIUM_INLINE void store2_bf16ins(c10::BFloat16* p, __m512 a, __m512 b, bool stream) {
  constexpr int kSubnormal = 0x20;  // vfpclassps's category bit
  const __m512i o = (_mm512_fpclass_ps_mask(a, kSubnormal) | _mm512_fpclass_ps_mask(b, kSubnormal))
                        ? _mm512_inserti64x4(_mm512_castsi256_si512(at::vec::cvtfp32_bf16(a)),
                                             at::vec::cvtfp32_bf16(b), 1)
                        : reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  if (stream && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), o);
  } else {
    _mm512_storeu_si512(static_cast<void*>(p), o);
  }
}

// y[i, i + 16) = f(i) for i = 0, 16, ... over the whole pairs of vectors of [0, n), stored by store2_bf16ins; returns
// where it stopped (the caller's own loop takes the rest). f (a lambda of the default target) inlines here.
template <typename F>
TRITIUM_BF16_DOT inline int64_t store_pairs_bf16ins(c10::BFloat16* y, int64_t n, bool stream, const F& f) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) store2_bf16ins(y + i, f(i), f(i + 16), stream);
  return i;
}
#endif

// Fast float math for the elementwise kernels. Float vectors (also the accumulation type of bfloat16/half) get
// cheaper formulas whose error stays within a few float ulp; double vectors use ATen's (Sleef) functions.
// NaN propagates through all of them as through torch's.

// P(u) by Horner's rule, coefficients highest degree first: N - 1 fused multiply-adds (the loop unrolls: N and
// the coefficients are compile-time constants), the one form of every polynomial of the vector math
template <typename V, size_t N>
TRITIUM_INLINE V horner(const V& u, const float (&c)[N]) {
  V r(c[0]);
  for (size_t i = 1; i < N; ++i) r = at::vec::fmadd(r, u, V(c[i]));
  return r;
}

// exp for float vectors, inlined (ATen's exp_u20 member is large enough that the compiler calls it out of line, once
// per vector, which cost a softmax row as much as the polynomial itself). x = n ln(2) + r with n = round(x log2(e))
// and |r| <= ln(2) / 2 (ln(2) in two parts: n times the high part is exact), exp(r) by a degree-6 minimax polynomial
// (relative error 2e-9, 1/32 of a float ulp), then 2^n exp(r) in one rounding: results near FLT_MAX stay finite and
// those below FLT_MIN come out subnormal, as torch's (AVX-512: vscalefps; AVX2: n added to the exponent bits where
// every lane's result is normal, else times 2^a then 2^b, a + b = n, both normal powers, the first product exact).
// Clamping x to [-104, 89] keeps n finite: exp(-104) rounds to 0 and 89 overflows to inf as they should. At most ~1
// ulp from float64 (torch's Sleef exp: 1 ulp); NaN passes (min / max return their second operand on NaN, the rest
// keeps it). About twelve operations on AVX-512, fifteen on AVX2 (ATen's exp_u20, ~1e-6 relative error and results
// below FLT_MIN flushed, took twenty).
TRITIUM_INLINE Vectorized<float> exp_float(const Vectorized<float>& v) {
  constexpr float kE[] = {1.3836845755577087e-3f, 8.374815806746483e-3f, 4.166822507977486e-2f, 1.6666419804096222e-1f,
                          4.9999991059303284e-1f, 1.f, 1.f};
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), v));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068202862268e-6f), r);
  return _mm512_scalef_ps(horner(Vectorized<float>(r), kE), n);
#elif defined(CPU_CAPABILITY_AVX2)
  // |x| <= 87 in every lane (the common case: normal results, n in [-126, 126]): 2^n added into exp(r)'s exponent
  // bits. Else (NaN too) the clamp, and 2^n as two normal powers.
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.f), v);
  const bool wide = _mm256_movemask_ps(_mm256_cmp_ps(ax, _mm256_set1_ps(87.f), _CMP_NLE_UQ)) != 0;
  const __m256 x = wide ? _mm256_max_ps(_mm256_set1_ps(-104.f), _mm256_min_ps(_mm256_set1_ps(89.f), v)) : __m256(v);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068202862268e-6f), r);
  const __m256 p = horner(Vectorized<float>(r), kE);
  const __m256i ni = _mm256_cvtps_epi32(n);
  if (!wide) return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(ni, 23)));
  // n in [-150, 128] (NaN: any, p is NaN): a = floor(n / 2), b = n - a, both in [-75, 64]; p 2^a is exact
  const __m256i na = _mm256_srai_epi32(ni, 1), nb = _mm256_sub_epi32(ni, na);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(na, bias), 23));
  const __m256 pb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(nb, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, pa), pb);
#else
  return v.exp_u20();
#endif
}

// exp with NaN lanes passed through (as torch's exp): exp_float for float vectors, ATen's (Sleef) exp for double.
template <typename V>
TRITIUM_INLINE V fexp(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return exp_float(x);
  } else {
    return x.exp();
  }
}

// 1 / d for float vectors. AVX-512: the 14-bit hardware estimate and one Newton step, within an ulp or two of the
// division at a third of its cost (a 512-bit division issues once per ~10 cycles), exact at powers of two (so
// sigmoid saturates to exactly 1); where the step gives NaN for d = 0 or +-inf (inf * 0) the estimate's exact inf
// or 0 stands. Elsewhere the division: AVX2's 12-bit estimate after one step misses 1 / 1 = 1 (sigmoid(inf) would
// not be exactly 1, and inf * (1 - s) not NaN as torch's) and flushes results below 2^-126 to zero.
template <typename V>
TRITIUM_INLINE V frcp(const V& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    const __m512 r0 = _mm512_rcp14_ps(d);
    const __m512 r1 = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(1.f)), r0);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r1, r1, _CMP_UNORD_Q), r1, r0);
  }
#endif
  return V(1) / d;
}

// log(1 + f) + e ln(2) for float f in [sqrt(1/2) - 1, sqrt(2) - 1] (flog's reduced argument, flog1p's small one)
template <typename V>
TRITIUM_INLINE V log1p_reduced(const V& f, const V& e) {
  constexpr float kL[] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                          -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                          2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
  const V z = f * f;
  V y = f * z * horner(f, kL);
  y = at::vec::fmadd(e, V(-2.12194440e-4f), y);
  y = at::vec::fnmadd(V(0.5f), z, y);
  return at::vec::fmadd(e, V(0.693359375f), f + y);
}

// Natural log for float vectors, inlined (ATen's Sleef log is called out of line once per vector). x = m 2^e with m
// in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), log(1 + f) = f - f^2 / 2 + f^3 P(f) with Cephes' degree-8 P (relative
// error below 1e-7 on that range), e ln(2) in two parts (e times the high part is exact) added last. Within ~1 ulp of
// float64 as torch's. AVX-512: m and e by vgetmantps / vgetexpps (subnormals exact; negative and NaN inputs give
// NaN; 0 and +inf take e = -inf / +inf itself). AVX2: m and e from the bits where every lane is a positive normal
// float or zero (0 -> -inf by a blend), else ATen's log for the vector. Double: ATen's.
template <typename V>
TRITIUM_INLINE V flog(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);
    __m512 e = _mm512_getexp_ps(x);
    const __mmask16 hi = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, hi, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, hi, e, _mm512_set1_ps(1.f));
    const __m512 r = log1p_reduced(V(_mm512_sub_ps(m, _mm512_set1_ps(1.f))), V(e));
    return _mm512_mask_mov_ps(r, _mm512_fpclass_ps_mask(x, 0x0e), e);  // +-0 -> -inf, +inf -> +inf
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 ok = _mm256_or_ps(
        _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_GE_OQ),
                      _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ)),
        _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
    if (_mm256_movemask_ps(ok) != 0xff) return x.log();
    const __m256i b = _mm256_castps_si256(x);
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)),
                                                   _mm256_set1_epi32(0x3f800000)));
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127)));
    const __m256 hi = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), hi);
    e = _mm256_add_ps(e, _mm256_and_ps(hi, _mm256_set1_ps(1.f)));
    const __m256 r = log1p_reduced(V(_mm256_sub_ps(m, _mm256_set1_ps(1.f))), V(e));
    return _mm256_blendv_ps(r, _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                            _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
#else
    return x.log();
#endif
  } else {
    return x.log();
  }
}

// log(1 + u) for float vectors: for u in [sqrt(1/2) - 1, sqrt(2) - 1] flog's polynomial on u itself (no rounding
// of 1 + u: small u keep their relative precision), elsewhere by flog: w = 1 + u rounded, log(w) - ((w - 1) - u) / w
// (w's rounding corrected to first order); w = 0 (-inf) and w = inf (inf) are log(w) itself, u < -1 and NaN give
// NaN. Double: ATen's.
template <typename V>
TRITIUM_INLINE V flog1p(const V& u) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    const V w = u + V(1);
    const V lw = flog(w);
    const V r = lw - ((w - V(1)) - u) * frcp(w);
    const V wide = V::blendv(r, lw, (w == V(0)) | (w == V(std::numeric_limits<float>::infinity())));
    return V::blendv(wide, log1p_reduced(u, V(0)), (u >= V(-0.29289322f)) & (u <= V(0.41421356f)));
  } else {
    return u.log1p();
  }
}

// True when every lane of u is <= c (false where a lane is NaN): the test for a path that holds on a bounded range.
template <typename V>
inline bool all_le(const V& u, typename V::value_type c) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>)
    return _mm512_cmp_ps_mask(u, _mm512_set1_ps(c), _CMP_LE_OQ) == 0xffff;
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>)
    return _mm256_movemask_ps(_mm256_cmp_ps(u, _mm256_set1_ps(c), _CMP_LE_OQ)) == 0xff;
#endif
  typename V::value_type b[V::size()];
  u.store(b);
  for (int i = 0; i < V::size(); ++i)
    if (!(b[i] <= c)) return false;
  return true;
}

// c + log1p(e) for e in [0, 1] (NaN passes): for float, log1p(e) = 2 atanh(s) with s = e / (2 + e) in [0, 1/3],
// its series s (1 + s^2/3 + ... + s^12/13) (the first term left out is below 2^-24 of the sum), a third of the
// operations of Sleef's log1p; s keeps e's relative precision, so tiny e (softplus of a large margin) stay exact;
// the last product and c's addition are one fmadd. Double: Sleef's.
template <typename V>
TRITIUM_INLINE V add_log1p_unit(const V& c, const V& e) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    constexpr float kP[] = {1.f / 13, 1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3, 1.f};
    const V s = e * frcp(V(2) + e);
    const V p = horner(s * s, kP);
    return at::vec::fmadd(s + s, p, c);
  } else {
    return c + e.log1p();
  }
}

// max(z, 0) + log1p(exp(-|z|)): log(1 + exp(z)) without overflow (NaN through the maximum)
template <typename V>
TRITIUM_INLINE V softplus(const V& z) {
  return add_log1p_unit(at::vec::maximum(z, V(0)), fexp(z.abs().neg()));
}

// expm1 for float vectors, inlined. AVX-512: one range reduction, x = n ln(2) + r with |r| <= ln(2) / 2 (ln(2) in
// two parts: r is exact to the float's last bits for every n), expm1(r) = r + r^2 P(r) with P the Taylor series to
// r^7 / 7! (the first term left out is below 2^-26 of the result), then expm1(x) = 2^n expm1(r) + (2^n - 1),
// evaluated as 2 (2^(n-1) expm1(r) + (2^(n-1) - 1/2)) so n = 128 stays finite where the result is (scalef: exact
// powers of two, 0 below 2^-149). n = 0 (|x| <= 0.34) is the series itself, so small x keep their relative
// precision; elsewhere |expm1(x)| > 0.29 and the last addition costs no bits. -1 below x = -104, inf above
// ln(FLT_MAX); NaN passes (min / max return their second operand on NaN). About sixteen operations. Elsewhere:
// |x| < 1/2 the series to x^8 / 8!, else exp_float(x) - 1 (|expm1(x)| >= 0.39 there: the subtraction costs under 1.5
// bits); NaN takes the series. Double: Sleef's expm1.
template <typename V>
TRITIUM_INLINE V fexpm1(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);  // ln(2)'s high part: n * it is exact
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068202862268e-6f), r);
    constexpr float kR[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f};
    const __m512 em = _mm512_fmadd_ps(_mm512_mul_ps(r, r), horner(V(r), kR), r);
    const __m512 h = _mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(n, _mm512_set1_ps(1.f)));  // 2^(n-1)
    const __m512 y = _mm512_fmadd_ps(h, em, _mm512_sub_ps(h, _mm512_set1_ps(0.5f)));
    return _mm512_add_ps(y, y);
#else
    constexpr float kP[] = {1.f / 40320, 1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f};
    const V p = horner(x, kP);
    const V series = at::vec::fmadd(x * x, p, x);
    return V::blendv(series, exp_float(x) - V(1), x.abs() >= V(0.5f));
#endif
  } else {
    return x.expm1();
  }
}

// sigmoid(x) = 1 / (1 + exp(-x)) with fexp; saturates to exactly 0 and 1 as torch's does.
template <typename V>
TRITIUM_INLINE V fsigmoid(const V& x) {
  return frcp(V(1) + fexp(x.neg()));
}

// tanh for float: the odd/even rational approximation (degree 13 / 6 in x) Eigen and XLA use on [-7.905, 7.905]
// (outside, tanh is +-1 in float), x itself below |x| = 4e-4; max error 4e-7 against float64 (Sleef's u10 tanh,
// which torch uses, spends far more operations on accuracy float does not need here). NaN stays NaN through the clamp.
template <typename V>
TRITIUM_INLINE V ftanh(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    const V c(7.90531110763549805f);
    const V xc = at::vec::clamp(x, c.neg(), c), x2 = xc * xc;
    constexpr float kP[] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                            5.12229709037114e-08f,  1.48572235717979e-05f, 6.37261928875436e-04f,
                            4.89352455891786e-03f};
    constexpr float kQ[] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                            4.89352518554385e-03f};
    const V p = horner(x2, kP), q = horner(x2, kQ);
    return V::blendv(xc * p / q, x, x.abs() < V(0.0004f));
  } else {
    return x.tanh();
  }
}

// max without NaN propagation (one instruction with AVX-512 floats; at::vec::maximum also checks for NaN):
// for running maxima whose NaN is caught downstream anyway.
template <typename A>
inline Vectorized<A> fmax_fast(const Vectorized<A>& a, const Vectorized<A>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return _mm512_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

// The sum of a vector's lanes (one horizontal reduction).
template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}

// The max of a vector's lanes, NaN-propagating as at::vec::maximum and torch's max reduction.
template <typename A>
inline A hmax(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
}

// out[j] = sum of the lanes of v[j], for Vec::size() vectors v (a vector of dot products from their partial-sum
// vectors). With AVX-512 floats it is a transpose-and-add tree (45 shuffles/adds for 16 sums, instead of a
// horizontal reduction per vector); elsewhere one reduction per vector.
template <typename A>
inline Vectorized<A> reduce_lanes(const Vectorized<A>* v) {
  constexpr int64_t K = Vectorized<A>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    __m512 r[8], w[4];
    for (int i = 0; i < 8; ++i) {
      const __m512 a = v[2 * i], b = v[2 * i + 1];
      r[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int i = 0; i < 4; ++i) {
      const __m512 c = r[2 * i], d = r[2 * i + 1];
      w[i] = _mm512_add_ps(_mm512_shuffle_ps(c, d, 0x44), _mm512_shuffle_ps(c, d, 0xEE));
    }
    const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    const __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u, z, 0x88), _mm512_shuffle_f32x4(u, z, 0xDD));
  }
#endif
  alignas(64) A out[K];
  for (int64_t j = 0; j < K; ++j) out[j] = hsum(v[j]);
  return Vectorized<A>::loadu(out);
}

// max of a row in the accumulation type, NaN-propagating as torch's max reduction (two vector chains)
template <typename T>
acc_type<T> row_max_acc(const T* x, int64_t n) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    m0 = at::vec::maximum(m0, IO::load(x + i));
    m1 = at::vec::maximum(m1, IO::load(x + i + K));
  }
  for (; i + K <= n; i += K) m0 = at::vec::maximum(m0, IO::load(x + i));
  acc_t m = hmax(at::vec::maximum(m0, m1));
  for (; i < n; ++i) {
    acc_t v = static_cast<acc_t>(x[i]);
    m = (v != v || v > m) ? v : m;
  }
  return m;
}

// Rows per task so that one task touches at least ~16K elements (keeps parallel_for overhead small for narrow
// rows while still splitting 2 rows across 2 cores when rows are wide).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// The dispatch every kernel uses: float32, float64, bfloat16, float16.
#define TRITIUM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, " must have a contiguous last dimension");
}

// The class-index targets of a row loss over `rows` rows of C classes: checked before any row is touched, with
// torch's nll_loss error (an IndexError naming the target) for a value outside [0, C) that is not ignore_index;
// f(t) is called for each non-ignored target t, in row order (cross_entropy sums the total weight with it,
// distill counts the rows). target: 1-D int64, any stride.
template <typename F>
inline void for_valid_targets(const at::Tensor& target, int64_t rows, int64_t C, int64_t ignore_index, F&& f) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, "target must be 1-D with one entry per row");
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64");
  const int64_t* tp = target.const_data_ptr<int64_t>();
  const int64_t st = target.stride(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = tp[r * st];
    if (t == ignore_index) continue;
    TORCH_CHECK_INDEX(t >= 0 && t < C, "Target ", t, " is out of bounds.");
    f(t);
  }
}

}  // namespace tritium
