// Flash attention CPU kernels (forward and backward), registered for the CPU key of the tritium ops whose
// schemas python/tritium/ops/attention.py defines.
//
// One kernel covers torch's SDPA and flash_attention: query row i may attend key j when
//   (left < 0 or j >= i + offset - left) and (right < 0 or j <= i + offset + right)
// (causal: right = 0; offset = 0 is torch's top-left alignment, S - L flash-attn's bottom-right), scores are
// s = q.k * scale, optionally soft-capped (cap * tanh(s / cap)), plus an optional additive mask.
//
// Forward: tiled online softmax (FlashAttention-2). Tasks are (batch, head, query block); each keeps a
// BQ x BK score tile, a BQ x Dv float accumulator and row statistics, so memory is O(seq), never O(L * S).
// The QK^T and PV tiles are blocked matrix products done by the BLAS libtorch ships with (MKL's sgemm_,
// dgemm_ and gemm_bf16bf16f32_/gemm_f16f16f32_, found at run time; 16-bit tiles accumulate in float, as
// torch's own CPU flash kernel does), falling back to at::matmul on tile views when a symbol is missing.
// Saves lse = m + log(l) per row (float; double for double); fully masked rows give 0 and lse = -inf.
//
// Backward: recompute P = exp(s - lse) tile by tile; tasks are (batch, query head); dQ is accumulated per
// query block, dK and dV per query head in float (then summed over the GQA group):
//   dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O)) [* (1 - tanh^2) with softcap];
//   dQ += scale * dS K;  dK += scale * dS^T Q.
#include "panel.h"
#include "pool.h"
#include "vec.h"

#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace tritium {
namespace {

// ---------------------------------------------------------------------------------------------------------
// BLAS on row-major tiles
// ---------------------------------------------------------------------------------------------------------
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*, const int*);
using hgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*, const int*);

struct Blas {
  sgemm_t s = nullptr;
  dgemm_t d = nullptr;
  hgemm_t bf16 = nullptr;
  hgemm_t f16 = nullptr;
};

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    if (std::getenv("TRITIUM_NO_BLAS")) return r;  // exercise the at::matmul fallback (tests)
    void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return r;
    r.s = reinterpret_cast<sgemm_t>(dlsym(h, "sgemm_"));
    r.d = reinterpret_cast<dgemm_t>(dlsym(h, "dgemm_"));
    r.bf16 = reinterpret_cast<hgemm_t>(dlsym(h, "gemm_bf16bf16f32_"));
    r.f16 = reinterpret_cast<hgemm_t>(dlsym(h, "gemm_f16f16f32_"));
    return r;
  }();
  return b;
}

// C (M x N, ldc) = alpha * op(A) op(B) + beta * C, all row-major. op(A) is M x K: A stored M x K (lda), or
// K x M when ta. op(B) is K x N: B stored K x N (ldb), or N x K when tb. C is in the accumulation type.
// Column-major BLAS computes the transpose: C^T = op(B)^T op(A)^T, i.e. the operands swap.
template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, acc_type<T> alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, acc_type<T> beta, acc_type<T>* C, int64_t ldc) {
  using acc_t = acc_type<T>;
  if (M == 0 || N == 0) return;
  const char* tA = ta ? "T" : "N";
  const char* tB = tb ? "T" : "N";
  const int m = M, n = N, k = K, la = lda, lb = ldb, lc = ldc;
  const Blas& bl = blas();
  if constexpr (std::is_same_v<T, float>) {
    if (bl.s) return bl.s(tB, tA, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
  } else if constexpr (std::is_same_v<T, double>) {
    if (bl.d) return bl.d(tB, tA, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
  } else {
    hgemm_t f = std::is_same_v<T, c10::BFloat16> ? bl.bf16 : bl.f16;
    if (f)
      return f(tB, tA, &n, &m, &k, &alpha, reinterpret_cast<const uint16_t*>(B), &lb,
               reinterpret_cast<const uint16_t*>(A), &la, &beta, C, &lc);
  }
  // fallback: the same product through ATen on views of the tiles
  auto st = c10::CppTypeToScalarType<T>::value;
  auto at_ = c10::CppTypeToScalarType<acc_t>::value;
  auto opts = at::TensorOptions().dtype(st);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, at::TensorOptions().dtype(at_));
  at::Tensor prod = at::matmul(a.to(at_), b.to(at_)).mul_(alpha);
  if (beta == acc_t(0)) {
    c.copy_(prod);
  } else {
    c.mul_(beta).add_(prod);
  }
}

// ---------------------------------------------------------------------------------------------------------
// row helpers (float/double rows of the score tile)
// ---------------------------------------------------------------------------------------------------------
template <typename A>
A row_max(const A* x, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  A m = -std::numeric_limits<A>::infinity();
  int64_t i = 0;
  if (n >= K) {
    Vec vm = Vec::loadu(x);
    for (i = K; i + K <= n; i += K) vm = fmax_fast(vm, Vec::loadu(x + i));
    m = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return fmax_fast(a, b); }, vm);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);  // NaN in the tile: the max may skip it, the exp below yields NaN
  return m;
}

// p[i] = exp(x[i] * post - m), written in the gemm input type T (in place in x when T is the accumulation
// type); returns the sum. post is a scale the score tile does not carry yet (1 when it does). The exponentials
// are summed in A before rounding to T.
template <typename T, typename A>
A exp_sum_store(A* x, T* p, int64_t n, A m, A post = A(1)) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vm(m), vp(post);
  Vec acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    const Vec e0 = at::vec::fmsub(Vec::loadu(x + i), vp, vm).exp_u20();
    const Vec e1 = at::vec::fmsub(Vec::loadu(x + i + K), vp, vm).exp_u20();
    store2<T>(p + i, e0, e1);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; i < n; i += K) {  // the rest a vector at a time, the last one partial (a causal row's end is anywhere)
    const int64_t c = std::min(K, n - i);
    const Vec e = Vec::set(Vec(0), at::vec::fmsub(Vec::loadu(x + i, c), vp, vm).exp_u20(), c);
    if constexpr (std::is_same_v<T, A>) {
      e.store(p + i, c);
    } else {
      at::vec::convert_from_float<T>(e, e).store(p + i, c);
    }
    acc0 = acc0 + e;
  }
  return hsum(acc0 + acc1);
}

template <typename A>
A exp_sum(A* x, int64_t n, A m) {
  return exp_sum_store<A, A>(x, x, n, m);
}

// cap * tanh(x) in place; keeps 1 - tanh^2 in dt (for the backward) when dt is not null
template <typename A>
void softcap_row(A* x, int64_t n, A cap, A* dt) {
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec vc(cap), one(1);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    Vec t = ftanh(Vec::loadu(x + i));
    (t * vc).store(x + i);
    if (dt) (one - t * t).store(dt + i);
  }
  for (; i < n; ++i) {
    A t = std::tanh(x[i]);
    x[i] = cap * t;
    if (dt) dt[i] = A(1) - t * t;
  }
}

template <typename T, typename A>
void store_row(const A* x, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (x != y) std::copy(x, x + n, y);
  } else {
    using IO = VecIO<T>;
    constexpr int64_t K = IO::kSize;
    int64_t i = 0;
    for (; i + K <= n; i += K) IO::store(y + i, Vectorized<A>::loadu(x + i));
    for (; i < n; ++i) y[i] = static_cast<T>(x[i]);
  }
}

// uninitialised scratch (every element is written before it is read: the packings fill their padding)
template <typename X>
std::unique_ptr<X[]> scratch(int64_t n) {
  return std::unique_ptr<X[]>(new X[n]);
}

struct Geometry {
  int64_t B, H, Hk, L, S, D, Dv;
  int64_t offset, left, right;
  // the keys row i may see: [lo, hi)
  inline int64_t lo(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, S); }
  inline int64_t hi(int64_t i) const { return right < 0 ? S : std::clamp<int64_t>(i + offset + right + 1, 0, S); }
};

// score tile rows for query rows [i0, i0+m) and keys [j0, j0+n): softcap, mask, and -inf outside the window.
// Returns nothing; per row r, the visible columns are [clo[r], chi[r]) (outside them the tile is not read).
template <typename T>
void finish_scores(acc_type<T>* s, int64_t ld, int64_t i0, int64_t m, int64_t j0, int64_t n, const Geometry& g,
                   acc_type<T> cap, acc_type<T>* dtanh, const T* mask, int64_t msi, int64_t msj, int64_t* clo,
                   int64_t* chi) {
  using A = acc_type<T>;
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    A* row = s + r * ld;
    clo[r] = std::clamp<int64_t>(g.lo(i) - j0, 0, n);
    chi[r] = std::clamp<int64_t>(g.hi(i) - j0, 0, n);
    if (chi[r] <= clo[r]) continue;
    if (cap > A(0)) softcap_row<A>(row, n, cap, dtanh ? dtanh + r * ld : nullptr);
    if (mask) {
      const T* mr = mask + i * msi + j0 * msj;
      for (int64_t c = clo[r]; c < chi[r]; ++c) row[c] += static_cast<A>(mr[c * msj]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// packed 16-bit tiles for at::native::cpublas::brgemm (oneDNN's batch-reduce GEMM micro-kernel: AMX or
// AVX512-BF16 where the CPU has them, as torch's own CPU flash attention uses). B operands are packed once per
// (batch, kv head) in the VNNI layout: pairs of consecutive K-dimension elements side by side, in column
// pieces of kPiece so every call has ld_b = kPiece.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kPiece = 64;

// panel_gemm for float/double q/k/v (TRITIUM_NO_PANELS=1: MKL per tile, for comparison)
template <typename T>
bool use_panels() {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    static const bool off = std::getenv("TRITIUM_NO_PANELS") != nullptr;
    return !off;
  } else {
    return false;
  }
}

// panel_gemm on bfloat16 pair panels (AVX512-BF16 dot products) for bfloat16 q/k/v, where the CPU has them
template <typename T>
bool use_bf16_panels() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    static const bool on = std::getenv("TRITIUM_NO_PANELS") == nullptr && panel::has_bf16_dot();
    return on;
  } else {
    return false;
  }
}

// brgemm for 16-bit q/k/v: bfloat16 or half, when oneDNN can pack them here and the head dim is even (and the
// bfloat16 panels are not used)
template <typename T>
bool use_brgemm(const Geometry& g) {
  if (use_bf16_panels<T>()) return false;
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    static const bool off = std::getenv("TRITIUM_NO_BRGEMM") != nullptr;
    return !off && g.D % 2 == 0 && at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
  } else {
    return false;
  }
}

// K^T of one (batch, kv head), S x D rows of stride ldk -> [ceil(S / kPiece)][D / 2][kPiece][2], zero padded:
// the B operand of Q K^T for keys [t * kPiece, (t + 1) * kPiece) starts at out + t * kPiece * D.
template <typename T>
void pack_kt(const T* k, int64_t ldk, int64_t S, int64_t D, T* out) {
  const int64_t pieces = (S + kPiece - 1) / kPiece, P = D / 2;
  for (int64_t t = 0; t < pieces; ++t) {
    uint32_t* o = reinterpret_cast<uint32_t*>(out + t * kPiece * D);
    for (int64_t jj = 0; jj < kPiece; ++jj) {
      const int64_t j = t * kPiece + jj;
      if (j < S) {
        const T* kr = k + j * ldk;
        for (int64_t p = 0; p < P; ++p) std::memcpy(o + p * kPiece + jj, kr + 2 * p, 4);
      } else {
        for (int64_t p = 0; p < P; ++p) o[p * kPiece + jj] = 0;
      }
    }
  }
}

// V of one (batch, kv head), S x Dv rows of stride ldv -> [ceil(Dv / kPiece)][Se / 2][kPiece][2] with Se = S
// rounded up to even (zero rows): the B operand of P V for keys from j0 (even) and value columns
// [c * kPiece, ...) starts at out + c * Se * kPiece + j0 * kPiece.
template <typename T>
void pack_v(const T* v, int64_t ldv, int64_t S, int64_t Dv, T* out) {
  const int64_t Se = (S + 1) / 2 * 2, pieces = (Dv + kPiece - 1) / kPiece;
  for (int64_t c = 0; c < pieces; ++c) {
    T* o = out + c * Se * kPiece;
    const int64_t n0 = c * kPiece, nc = std::min(kPiece, Dv - n0);
    for (int64_t jp = 0; jp < Se / 2; ++jp) {
      const T* r0 = v + 2 * jp * ldv + n0;
      const T* r1 = 2 * jp + 1 < S ? r0 + ldv : nullptr;
      T* oo = o + jp * 2 * kPiece;
      for (int64_t x = 0; x < kPiece; ++x) {
        oo[2 * x] = x < nc ? r0[x] : T(0);
        oo[2 * x + 1] = (x < nc && r1) ? r1[x] : T(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------------
int64_t env_or(const char* name, int64_t v) {
  const char* e = std::getenv(name);
  return e ? std::atoll(e) : v;
}
int64_t q_block(int64_t L) {
  static const int64_t big = env_or("TRITIUM_ATTN_BQ", 256), mid = env_or("TRITIUM_ATTN_BQM", 64);
  return L >= 768 ? big : (L >= 192 ? mid : 32);
}
static const int64_t kKeyBlock = env_or("TRITIUM_ATTN_BK", 512);

template <typename T>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
              at::Tensor& out, at::Tensor& lse, double scale_, const Geometry& g, double softcap_) {
  using A = acc_type<T>;
  constexpr bool k16 = !std::is_same_v<T, A>;
  const A scale = static_cast<A>(scale_), cap = static_cast<A>(softcap_);
  const int64_t BQ = std::min(q_block(g.L), g.L), BK = std::min(kKeyBlock, g.S);
  const int64_t nqb = (g.L + BQ - 1) / BQ, group = g.H / g.Hk;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* mp = mask.has_value() ? mask->const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  const int64_t osb = out.stride(0), osh = out.stride(1), osl = out.stride(2);
  A* lp = lse.mutable_data_ptr<A>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsl = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksl = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);
  int64_t msb = 0, msh = 0, msi = 0, msj = 0;
  if (mp) msb = mask->stride(0), msh = mask->stride(1), msi = mask->stride(2), msj = mask->stride(3);
  const A ninf = -std::numeric_limits<A>::infinity();

  // float/double: K and V of every (batch, kv head) packed once up front into column panels (csrc/panel.h) for
  // panel_gemm: Q K^T and P V as register-tiled outer products, no BLAS call per tile (MKL's small-GEMM
  // overhead made a 512-token causal prefill's attention run at a third of the FMA peak). O(seq) memory.
  const bool fpanel = use_panels<T>();
  constexpr int64_t NP = panel::width<A>();
  const int64_t kp_size = fpanel ? panel::packed_size<A>(g.S, g.D) : 0;
  const int64_t vp_size = fpanel ? panel::packed_size<A>(g.Dv, g.S) : 0;
  auto kp_buf = scratch<A>(fpanel ? g.B * g.Hk * kp_size : 0), vp_buf = scratch<A>(fpanel ? g.B * g.Hk * vp_size : 0);
  if constexpr (!k16) {
    if (fpanel) {
      at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / g.Hk, hk = bh % g.Hk;
          panel::pack<A>(kp + b * ksb + hk * ksh, ksl, g.S, g.D, kp_buf.get() + bh * kp_size);
          panel::pack_cols<A>(vp + b * vsb + hk * vsh, vsl, g.S, g.Dv, vp_buf.get() + bh * vp_size);
        }
      });
    }
  }

  // bfloat16 on AVX512-BF16: K and V packed once per (batch, kv head) into pair panels (panel::pack_bf16), the
  // scores and P V by panel_gemm's dot-product tiles into float
  const bool bpanel = use_bf16_panels<T>();
  constexpr int64_t NP16 = panel::kWidth16;
  const int64_t Se = (g.S + 1) / 2 * 2, D2 = (g.D + 1) / 2 * 2;
  const int64_t kb_size = bpanel ? panel::packed_size_bf16(g.S, g.D) : 0;
  const int64_t vb_size = bpanel ? panel::packed_size_bf16(g.Dv, g.S) : 0;
  auto kb_buf = scratch<c10::BFloat16>(g.B * g.Hk * kb_size), vb_buf = scratch<c10::BFloat16>(g.B * g.Hk * vb_size);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bpanel) {
      at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / g.Hk, hk = bh % g.Hk;
          panel::pack_bf16(kp + b * ksb + hk * ksh, ksl, g.S, g.D, kb_buf.get() + bh * kb_size);
          panel::pack_cols_bf16(vp + b * vsb + hk * vsh, vsl, g.S, g.Dv, vb_buf.get() + bh * vb_size);
        }
      });
    }
  }

  // brgemm path: K^T and V of every (batch, kv head) packed once up front (O(seq) memory)
  const bool packed = use_brgemm<T>(g);
  const int64_t kt_size = (g.S + kPiece - 1) / kPiece * kPiece * g.D;
  const int64_t v_size = Se * ((g.Dv + kPiece - 1) / kPiece) * kPiece;
  auto kt_buf = scratch<T>(packed ? g.B * g.Hk * kt_size : 0), v_buf = scratch<T>(packed ? g.B * g.Hk * v_size : 0);
  if (packed) {
    at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / g.Hk, hk = bh % g.Hk;
        pack_kt<T>(kp + b * ksb + hk * ksh, ksl, g.S, g.D, kt_buf.get() + bh * kt_size);
        pack_v<T>(vp + b * vsb + hk * vsh, vsl, g.S, g.Dv, v_buf.get() + bh * v_size);
      }
    });
  }

  at::parallel_for(0, g.B * g.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(BQ * BK), acc(BQ * g.Dv), mx(BQ), sum(BQ);
    const int64_t pld = (BK + 1) / 2 * 2;  // P rows (16-bit): even, so an odd last key pairs with a zero
    std::vector<T> p16(k16 ? BQ * pld : 0);
    std::vector<int64_t> clo(BQ), chi(BQ);
    for (int64_t task = begin; task < end; ++task) {
      // a head's query blocks in the order first, last, second, second last, ...: under a causal mask their costs
      // grow with qb, and this order gives each thread's contiguous range of tasks an equal share of the work
      const int64_t t = task % nqb, qb = t % 2 == 0 ? t / 2 : nqb - 1 - t / 2;
      const int64_t b = task / (g.H * nqb), h = (task / nqb) % g.H, hk = h / group;
      const int64_t i0 = qb * BQ, m = std::min(g.L, i0 + BQ) - i0;
      const T* Q = qp + b * qsb + h * qsh + i0 * qsl;
      const T* Kh = kp + b * ksb + hk * ksh;
      const T* Vh = vp + b * vsb + hk * vsh;
      const T* M = mp ? mp + b * msb + h * msh : nullptr;
      std::fill(acc.begin(), acc.begin() + m * g.Dv, A(0));
      std::fill(mx.begin(), mx.end(), ninf);
      std::fill(sum.begin(), sum.end(), A(0));
      int64_t jlo = g.S, jhi = 0;
      for (int64_t r = 0; r < m; ++r) {
        jlo = std::min(jlo, g.lo(i0 + r));
        jhi = std::max(jhi, g.hi(i0 + r));
      }
      if (packed || fpanel || bpanel) jlo = jlo / kPiece * kPiece;  // key blocks start on a packed piece (extra keys are masked)
      const T* KT = packed ? kt_buf.get() + (b * g.Hk + hk) * kt_size : nullptr;
      const T* VP = packed ? v_buf.get() + (b * g.Hk + hk) * v_size : nullptr;
      for (int64_t j0 = jlo; j0 < jhi; j0 += BK) {
        const int64_t n = std::min(jhi, j0 + BK) - j0;
        const A alpha = cap > A(0) ? scale / cap : scale;
        A post = A(1);  // scale still to apply to the score tile (> 0)
        // the packed paths compute unscaled scores: softcap and mask act on scaled ones, otherwise the scale is
        // folded into the max and the exponentials below
        auto scale_scores = [&] {
          if (cap > A(0) || M) {
            for (int64_t r = 0; r < m; ++r)
              at::vec::map([alpha](Vectorized<A> x) { return x * Vectorized<A>(alpha); }, s.data() + r * BK,
                           s.data() + r * BK, n);
          } else {
            post = alpha;
          }
        };
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (bpanel) {
            const c10::BFloat16* KB = kb_buf.get() + (b * g.Hk + hk) * kb_size;
            panel_gemm(Q, qsl, m, g.D, KB + (j0 / NP16) * D2 * NP16, n, s.data(), BK);
            scale_scores();
          }
        }
        if constexpr (k16) {
          if (packed) {
            for (int64_t t0 = 0; t0 < n; t0 += kPiece) {
              at::native::cpublas::brgemm(m, std::min(kPiece, n - t0), g.D, qsl, kPiece, BK, false, Q,
                                          KT + (j0 + t0) * g.D, s.data() + t0, true);
            }
            scale_scores();
          }
        } else {
          if (fpanel) {
            const A* KP = kp_buf.get() + (b * g.Hk + hk) * kp_size;
            panel_gemm<A>(Q, qsl, m, g.D, KP + (j0 / NP) * g.D * NP, n, s.data(), BK);
            scale_scores();
          }
        }
        if (!packed && !fpanel && !bpanel)
          gemm<T>(false, true, m, n, g.D, alpha, Q, qsl, Kh + j0 * ksl, ksl, A(0), s.data(), BK);
        finish_scores<T>(s.data(), BK, i0, m, j0, n, g, cap, nullptr, M, msi, msj, clo.data(), chi.data());
        for (int64_t r = 0; r < m; ++r) {
          A* row = s.data() + r * BK;
          const int64_t c0 = clo[r], c1 = chi[r];
          T* prow;
          if constexpr (k16) {
            prow = p16.data() + r * pld;
          } else {
            prow = row;
          }
          A new_m = c1 > c0 ? std::max(mx[r], post * row_max<A>(row + c0, c1 - c0)) : mx[r];
          if (new_m == ninf) {  // nothing visible yet in this row: a zero row of P
            std::fill(prow, prow + n, T(0));
          } else {
            const A corr = std::exp(mx[r] - new_m);  // 0 when mx was -inf
            const A ps = exp_sum_store<T, A>(row + c0, prow + c0, c1 - c0, new_m, post);
            std::fill(prow, prow + c0, T(0));
            std::fill(prow + c1, prow + n, T(0));
            sum[r] = sum[r] * corr + ps;
            mx[r] = new_m;
            if (corr != A(1)) {
              A* ar = acc.data() + r * g.Dv;
              at::vec::map([corr](Vectorized<A> x) { return x * Vectorized<A>(corr); }, ar, ar, g.Dv);
            }
          }
        }
        const T* P;
        if constexpr (k16) {
          P = p16.data();
        } else {
          P = s.data();
        }
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (bpanel) {  // keys from j0 (a multiple of 64): pair row j0 / 2 of V's panels
            const c10::BFloat16* VB = vb_buf.get() + (b * g.Hk + hk) * vb_size;
            panel_gemm(P, pld, m, n, VB + j0 * NP16, g.Dv, acc.data(), g.Dv, acc.data(), g.Dv, Se * NP16);
          }
        }
        if constexpr (k16) {
          if (packed) {
            const int64_t ne = (n + 1) / 2 * 2;  // the pair of an odd last key is a zero column of P
            if (ne != n)
              for (int64_t r = 0; r < m; ++r) p16[r * pld + n] = T(0);
            for (int64_t c0 = 0; c0 < g.Dv; c0 += kPiece) {
              at::native::cpublas::brgemm(m, std::min(kPiece, g.Dv - c0), ne, pld, kPiece, g.Dv, true, P,
                                          VP + c0 * Se + j0 * kPiece, acc.data() + c0, true);
            }
          }
        }
        if constexpr (!k16) {
          if (fpanel) {
            const A* VP = vp_buf.get() + (b * g.Hk + hk) * vp_size;
            panel_gemm<A>(P, BK, m, n, VP + j0 * NP, g.Dv, acc.data(), g.Dv, acc.data(), g.Dv, g.S * NP);
          }
        }
        if (!packed && !fpanel && !bpanel)
          gemm<T>(false, false, m, g.Dv, n, A(1), P, k16 ? pld : BK, Vh + j0 * vsl, vsl, A(1), acc.data(), g.Dv);
      }
      T* O = op + b * osb + h * osh + i0 * osl;
      A* Lr = lp + (b * g.H + h) * g.L + i0;
      for (int64_t r = 0; r < m; ++r) {
        A* ar = acc.data() + r * g.Dv;
        const A inv = sum[r] > A(0) ? A(1) / sum[r] : A(0);
        at::vec::map([inv](Vectorized<A> x) { return x * Vectorized<A>(inv); }, ar, ar, g.Dv);
        store_row<T, A>(ar, O + r * osl, g.Dv);
        Lr[r] = sum[r] > A(0) ? mx[r] + std::log(sum[r]) : ninf;
      }
    }
    if (packed) at::native::cpublas::brgemm_release(true);
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash_attn: q, k, v must be 4-D (batch, heads, seq, dim)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "flash_attn: q, k, v must have a contiguous last dimension");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "flash_attn: kv heads must divide query heads");
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t offset, int64_t left,
                  int64_t right) {
  return Geometry{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), offset, left, right};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const c10::optional<at::Tensor>& mask, double scale,
                                                  int64_t offset, int64_t left, int64_t right, double softcap) {
  check_qkv(q, k, v);
  Geometry g = geometry(q, k, v, offset, left, right);
  // (B, L, H, Dv) memory, as torch's CPU flash attention: the heads of a token side by side, so the caller's
  // out.transpose(1, 2).reshape(B, L, H * Dv) is a view, not a copy
  auto out = empty({g.B, g.L, g.H, g.Dv}, q.options()).transpose(1, 2);
  auto lse = at::empty({g.B, g.H, g.L}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_flash_attn_fwd", [&] {
    fwd_impl<scalar_t>(q, k, v, mask, out, lse, scale, g, softcap);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kBwdQBlock = 128, kBwdKBlock = 256;

template <typename T>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& dlse,
              const c10::optional<at::Tensor>& mask, double scale_,
              const Geometry& g, double softcap_, at::Tensor& dq, at::Tensor& dk_full, at::Tensor& dv_full) {
  using A = acc_type<T>;
  constexpr bool k16 = !std::is_same_v<T, A>;
  const A scale = static_cast<A>(scale_), cap = static_cast<A>(softcap_);
  const int64_t BQ = std::min(kBwdQBlock, g.L), BK = std::min(kBwdKBlock, g.S);
  const int64_t group = g.H / g.Hk, D = g.D, Dv = g.Dv;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* dop = dout.const_data_ptr<T>();
  const A* lp = lse.const_data_ptr<A>();
  const A* dlp = dlse.has_value() ? dlse->const_data_ptr<A>() : nullptr;
  const T* mp = mask.has_value() ? mask->const_data_ptr<T>() : nullptr;
  T* dqp = dq.mutable_data_ptr<T>();
  A* dkp = dk_full.mutable_data_ptr<A>();
  A* dvp = dv_full.mutable_data_ptr<A>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsl = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksl = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);
  const int64_t dsb = dout.stride(0), dsh = dout.stride(1), dsl = dout.stride(2);
  const int64_t osb = out.stride(0), osh = out.stride(1), osl = out.stride(2);
  int64_t msb = 0, msh = 0, msi = 0, msj = 0;
  if (mp) msb = mask->stride(0), msh = mask->stride(1), msi = mask->stride(2), msj = mask->stride(3);
  const A ninf = -std::numeric_limits<A>::infinity();

  const bool fpanel = use_panels<T>(), bpanel = use_bf16_panels<T>();
  constexpr int64_t NP = panel::width<A>(), NP16 = panel::kWidth16;
  const int64_t D2 = (D + 1) / 2 * 2;
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(BQ * BK), dp(BQ * BK), dt(cap > A(0) ? BQ * BK : 0), dqa(BQ * D), delta(BQ);
    std::vector<T> p16(k16 ? BQ * BK : 0), ds16(k16 ? BQ * BK : 0);
    std::vector<int64_t> clo(BQ), chi(BQ);
    // float/double: the scores are recomputed by the forward's kernel (panel_gemm on K's panels), so that they
    // equal the forward's bit for bit: P = exp(s - lse) then matches the lse the forward saved (BLAS sums the
    // q.k products in another order, and at |s| ~ 50 that difference alone exceeded the gradient's budget)
    // (bfloat16 on AVX512-BF16 likewise with the forward's pair panels)
    std::vector<A> kpk(fpanel ? panel::packed_size<A>(g.S, D) : 0);
    std::vector<c10::BFloat16> kpb(bpanel ? panel::packed_size_bf16(g.S, D) : 0);
    int64_t packed_bh = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.H, h = task % g.H, hk = h / group;
      const T* Kh = kp + b * ksb + hk * ksh;
      if constexpr (!k16) {
        if (fpanel && packed_bh != b * g.Hk + hk) {
          panel::pack<A>(Kh, ksl, g.S, D, kpk.data());
          packed_bh = b * g.Hk + hk;
        }
      }
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (bpanel && packed_bh != b * g.Hk + hk) {
          panel::pack_bf16(Kh, ksl, g.S, D, kpb.data());
          packed_bh = b * g.Hk + hk;
        }
      }
      const T* Vh = vp + b * vsb + hk * vsh;
      const T* M = mp ? mp + b * msb + h * msh : nullptr;
      A* dK = dkp + task * g.S * D;
      A* dV = dvp + task * g.S * Dv;
      std::fill(dK, dK + g.S * D, A(0));
      std::fill(dV, dV + g.S * Dv, A(0));
      for (int64_t i0 = 0; i0 < g.L; i0 += BQ) {
        const int64_t m = std::min(g.L, i0 + BQ) - i0;
        const T* Q = qp + b * qsb + h * qsh + i0 * qsl;
        const T* dO = dop + b * dsb + h * dsh + i0 * dsl;
        const T* O = op + b * osb + h * osh + i0 * osl;
        const A* Lr = lp + (b * g.H + h) * g.L + i0;
        for (int64_t r = 0; r < m; ++r) {
          A d = 0;
          for (int64_t c = 0; c < Dv; ++c) d += static_cast<A>(dO[r * dsl + c]) * static_cast<A>(O[r * osl + c]);
          // d lse / d s = P: a gradient reaching lse shifts the row's delta
          delta[r] = dlp ? d - dlp[(b * g.H + h) * g.L + i0 + r] : d;
        }
        std::fill(dqa.begin(), dqa.begin() + m * D, A(0));
        int64_t jlo = g.S, jhi = 0;
        for (int64_t r = 0; r < m; ++r) {
          jlo = std::min(jlo, g.lo(i0 + r));
          jhi = std::max(jhi, g.hi(i0 + r));
        }
        if (fpanel || bpanel) jlo = jlo / kPiece * kPiece;  // key blocks start on a panel (extra keys are masked)
        for (int64_t j0 = jlo; j0 < jhi; j0 += BK) {
          const int64_t n = std::min(jhi, j0 + BK) - j0;
          const A alpha = cap > A(0) ? scale / cap : scale;
          if constexpr (!k16) {
            if (fpanel) {
              panel_gemm<A>(Q, qsl, m, D, kpk.data() + (j0 / NP) * D * NP, n, s.data(), BK);
              for (int64_t r = 0; r < m; ++r)
                at::vec::map([alpha](Vectorized<A> x) { return x * Vectorized<A>(alpha); }, s.data() + r * BK,
                             s.data() + r * BK, n);
            }
          }
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            if (bpanel) {
              panel_gemm(Q, qsl, m, D, kpb.data() + (j0 / NP16) * D2 * NP16, n, s.data(), BK);
              for (int64_t r = 0; r < m; ++r)
                at::vec::map([alpha](Vectorized<A> x) { return x * Vectorized<A>(alpha); }, s.data() + r * BK,
                             s.data() + r * BK, n);
            }
          }
          if (!fpanel && !bpanel)
            gemm<T>(false, true, m, n, D, alpha, Q, qsl, Kh + j0 * ksl, ksl, A(0), s.data(), BK);
          finish_scores<T>(s.data(), BK, i0, m, j0, n, g, cap, cap > A(0) ? dt.data() : nullptr, M, msi, msj,
                           clo.data(), chi.data());
          // P = exp(s - lse) inside the window, 0 outside (and on rows that see nothing)
          for (int64_t r = 0; r < m; ++r) {
            A* row = s.data() + r * BK;
            const int64_t c0 = clo[r], c1 = chi[r];
            if (Lr[r] == ninf || c1 <= c0) {
              std::fill(row, row + n, A(0));
            } else {
              exp_sum<A>(row + c0, c1 - c0, Lr[r]);
              std::fill(row, row + c0, A(0));
              std::fill(row + c1, row + n, A(0));
            }
            if constexpr (k16) store_row<T, A>(row, p16.data() + r * BK, n);
          }
          const T* P;
          if constexpr (k16) {
            P = p16.data();
          } else {
            P = s.data();
          }
          // dV[j0:] += P^T dO
          gemm<T>(true, false, n, Dv, m, A(1), P, BK, dO, dsl, A(1), dV + j0 * Dv, Dv);
          // dP = dO V^T
          gemm<T>(false, true, m, n, Dv, A(1), dO, dsl, Vh + j0 * vsl, vsl, A(0), dp.data(), BK);
          // dS = P * (dP - delta) (* dtanh)
          for (int64_t r = 0; r < m; ++r) {
            using Vec = Vectorized<A>;
            A* pr = s.data() + r * BK;
            A* dr = dp.data() + r * BK;
            const Vec vd(delta[r]);
            if (cap > A(0)) {
              const A* tr = dt.data() + r * BK;
              at::vec::map3([vd](Vec p, Vec d, Vec t) { return p * (d - vd) * t; }, dr, pr, dr, tr, n);
            } else {
              at::vec::map2([vd](Vec p, Vec d) { return p * (d - vd); }, dr, pr, dr, n);
            }
            if constexpr (k16) store_row<T, A>(dr, ds16.data() + r * BK, n);
          }
          const T* dS;
          if constexpr (k16) {
            dS = ds16.data();
          } else {
            dS = dp.data();
          }
          // dQ += scale dS K;  dK[j0:] += scale dS^T Q
          gemm<T>(false, false, m, D, n, scale, dS, BK, Kh + j0 * ksl, ksl, A(1), dqa.data(), D);
          gemm<T>(true, false, n, D, m, scale, dS, BK, Q, qsl, A(1), dK + j0 * D, D);
        }
        T* dQ = dqp + ((b * g.H + h) * g.L + i0) * D;
        for (int64_t r = 0; r < m; ++r) store_row<T, A>(dqa.data() + r * D, dQ + r * D, D);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, const c10::optional<at::Tensor>& mask,
    double scale, int64_t offset, int64_t left, int64_t right, double softcap) {
  check_qkv(q, k, v);
  TORCH_CHECK(dout.stride(3) == 1 && out.stride(3) == 1, "flash_attn_bwd: dout, out need a contiguous last dim");
  TORCH_CHECK(lse.is_contiguous(), "flash_attn_bwd: lse must be contiguous");
  TORCH_CHECK(!dlse.has_value() || (dlse->is_contiguous() && dlse->scalar_type() == lse.scalar_type()),
              "flash_attn_bwd: dlse must be contiguous with lse's dtype");
  Geometry g = geometry(q, k, v, offset, left, right);
  auto acc = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto dq = empty({g.B, g.H, g.L, g.D}, q.options());
  auto dk_full = empty({g.B, g.H, g.S, g.D}, acc);
  auto dv_full = empty({g.B, g.H, g.S, g.Dv}, acc);
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_flash_attn_bwd", [&] {
    bwd_impl<scalar_t>(dout, q, k, v, out, lse, dlse, mask, scale, g, softcap, dq, dk_full, dv_full);
  });
  const int64_t group = g.H / g.Hk;
  auto reduce = [&](const at::Tensor& full, int64_t d) {
    at::Tensor r = group == 1 ? full : full.view({g.B, g.Hk, group, g.S, d}).sum(2);
    return r.to(q.scalar_type());
  };
  return {dq, reduce(dk_full, g.D), reduce(dv_full, g.Dv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd);
  m.impl("flash_attn_bwd", &flash_attn_bwd);
}

}  // namespace tritium
