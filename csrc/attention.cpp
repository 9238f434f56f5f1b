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
// Per key tile: score_tile (Q K^T), finish_scores (softcap, mask, window), online_softmax_update, accumulate_pv;
// then write_output. The QK^T and PV products run on one path per dtype (product_path: packed panels, oneDNN's
// brgemm, or BLAS per tile; 16-bit tiles accumulate in float, as torch's own CPU flash kernel does). The BLAS is
// the one libtorch ships with (MKL's sgemm_, dgemm_ and gemm_bf16bf16f32_/gemm_f16f16f32_, found at run time),
// falling back to at::matmul on tile views when a symbol is missing.
// Saves lse = m + log(l) per row (float; double for double); fully masked rows give 0 and lse = -inf.
//
// Backward: recompute P = exp(s - lse) tile by tile; tasks are (batch, query head); dQ is accumulated per
// query block, dK and dV per query head in float (then summed over the GQA group):
//   dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O)) [* (1 - tanh^2) with softcap];
//   dQ += scale * dS K;  dK += scale * dS^T Q.
//
// The BLAS products go through csrc/blas.h (TRITIUM_NO_BLAS=1 there: the at::matmul fallback).
#include "blas.h"
#include "cpu.h"
#include "panel.h"
#include "pool.h"
#include "vec.h"

#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace tritium {
namespace {

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
    const Vec e0 = fexp(at::vec::fmsub(Vec::loadu(x + i), vp, vm));
    const Vec e1 = fexp(at::vec::fmsub(Vec::loadu(x + i + K), vp, vm));
    store2<T>(p + i, e0, e1);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; i < n; i += K) {  // the rest a vector at a time, the last one partial (a causal row's end is anywhere)
    const int64_t c = std::min(K, n - i);
    const Vec e = Vec::set(Vec(0), fexp(at::vec::fmsub(Vec::loadu(x + i, c), vp, vm)), c);
    if constexpr (std::is_same_v<T, A>) {
      e.store(p + i, c);
    } else {
      at::vec::convert_from_float<T>(e, e).store(p + i, c);
    }
    acc0 = acc0 + e;
  }
  return hsum(acc0 + acc1);
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// exp_sum_store into bfloat16 on a CPU with AVX512-BF16 (the caller checks panel::has_bf16_dot): the rounding in one
// instruction (vcvtne2ps2bf16: round to nearest even, as the software conversion) instead of an integer sequence
// per vector, which costs as much as the exponential itself.
TRITIUM_BF16_DOT float exp_sum_store_bf16(float* x, c10::BFloat16* p, int64_t n, float m, float post) {
  using Vec = Vectorized<float>;
  constexpr int64_t K = Vec::size();
  const Vec vm(m), vp(post);
  Vec acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    const Vec e0 = fexp(at::vec::fmsub(Vec::loadu(x + i), vp, vm));
    const Vec e1 = fexp(at::vec::fmsub(Vec::loadu(x + i + K), vp, vm));
    _mm512_storeu_si512(static_cast<void*>(p + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  return hsum(acc0 + acc1) + exp_sum_store<c10::BFloat16, float>(x + i, p + i, n - i, m, post);
}
#endif

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

// A (batch, head, seq, dim) operand with a unit last stride: base pointer and the first three strides.
template <typename T>
struct Rows4 {
  T* p;
  int64_t sb, sh, sl;
  Rows4(T* p_, const at::Tensor& t) : p(p_), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t i = 0) const { return p + b * sb + h * sh + i * sl; }  // row i of (b, h)
};

// The optional additive mask (batch, head, L, S), any strides (broadcast masks are stride-0 views).
template <typename T>
struct Mask {
  const T* p = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  explicit Mask(const c10::optional<at::Tensor>& m) {
    if (!m.has_value()) return;
    p = m->const_data_ptr<T>();
    sb = m->stride(0), sh = m->stride(1), si = m->stride(2), sj = m->stride(3);
  }
  const T* at(int64_t b, int64_t h) const { return p ? p + b * sb + h * sh : nullptr; }
};

struct Geometry {
  int64_t B, H, Hk, L, S, D, Dv;
  int64_t offset, left, right;
  // the keys row i may see: [lo, hi)
  inline int64_t lo(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, S); }
  inline int64_t hi(int64_t i) const { return right < 0 ? S : std::clamp<int64_t>(i + offset + right + 1, 0, S); }
  // the keys any of the query rows [i0, i0 + m) may see: [first, last), first rounded down to a multiple of
  // align (the packed paths start key blocks on a packed piece; the extra keys are masked)
  std::pair<int64_t, int64_t> key_span(int64_t i0, int64_t m, int64_t align) const {
    int64_t jlo = S, jhi = 0;
    for (int64_t r = 0; r < m; ++r) {
      jlo = std::min(jlo, lo(i0 + r));
      jhi = std::max(jhi, hi(i0 + r));
    }
    return {jlo / align * align, jhi};
  }
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
// The products Q K^T and P V. Each dtype has one path:
//   float/double: K and V packed into column panels (csrc/panel.h) for panel_gemm: register-tiled outer
//     products with no library call per tile (a BLAS call per tile has a fixed overhead comparable to a small
//     tile's arithmetic);
//   bfloat16 on a CPU with AVX512-BF16: pair panels (panel::pack_bf16) for panel_gemm's dot-product tiles;
//   other 16-bit (even head dim, where oneDNN can pack): at::native::cpublas::brgemm (oneDNN's batch-reduce GEMM
//     micro-kernel: AMX or AVX512-BF16 where the CPU has them, as torch's own CPU flash attention uses) on
//     operands packed in the VNNI layout: pairs of consecutive K-dimension elements side by side, in column
//     pieces (kKeyPiece keys of K^T, kPiece columns of V) so every call has ld_b = the piece width;
//   otherwise: BLAS (or at::matmul) on the rows themselves, per tile.
// The backward recomputes scores on the forward's path where it packs K itself (the panels); its other products use
// BLAS, except bfloat16 on the pair-panel path, where all four run on pair panels too (V, K^T, Q^T and dO^T
// packed; P and dS transposed per tile): MKL's bfloat16 GEMM is far slower than the dot-product panels there.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kPiece = 64;
// Keys per score tile on the brgemm path, and K^T's pieces there: a tile's keys in one piece, so Q K^T is one brgemm
// call per tile (two when a tile straddles pieces; every call looks its kernel up and may reload the AMX tile
// configuration). Smaller than the other paths' tiles: on AMX the products are cheap next to the softmax between
// them, which then works on a tile that stays in L1/L2.
constexpr int64_t kKeyPiece = 256;

enum class Path { kBlas, kPanels, kBf16Panels, kBrgemm };

template <typename T>
Path product_path(int64_t D) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return Path::kPanels;
  } else {
    const bool brgemm = D % 2 == 0 && at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // AMX tiles (oneDNN's brgemm runs on them) multiply 16 x 32 bfloat16 pairs per instruction: several times
      // the AVX512-BF16 dot products of the pair panels
      if (brgemm && cpu::features().amx_bf16) return Path::kBrgemm;
      if (panel::has_bf16_dot()) return Path::kBf16Panels;
    }
    return brgemm ? Path::kBrgemm : Path::kBlas;
  }
}

const char* path_name(Path p, bool amx) {
  switch (p) {
    case Path::kPanels: return "panels";
    case Path::kBf16Panels: return "bf16 pair panels (AVX512-BF16)";
    case Path::kBrgemm: return amx ? "brgemm (oneDNN, AMX)" : "brgemm (oneDNN)";
    case Path::kBlas: return "BLAS per tile";
  }
  return "?";
}

// `tritium info`: the QK^T / PV product path per dtype (at an even head dim, the common case)
const bool kPathsReported = cpu::register_paths([] {
  return std::vector<std::pair<std::string, std::string>>{
      {"attention.float32", path_name(product_path<float>(64), false)},
      {"attention.bfloat16", path_name(product_path<c10::BFloat16>(64), cpu::features().amx_bf16)},
      {"attention.float16", path_name(product_path<c10::Half>(64), false)}};
});

// K^T of one (batch, kv head), S x D rows of stride ldk -> [ceil(S / kKeyPiece)][D / 2][kKeyPiece][2], zero
// padded: the B operand of Q K^T for keys [t * kKeyPiece + c, ...) starts at out + t * kKeyPiece * D + 2 c.
template <typename T>
void pack_kt(const T* k, int64_t ldk, int64_t S, int64_t D, T* out) {
  const int64_t pieces = (S + kKeyPiece - 1) / kKeyPiece, P = D / 2;
  for (int64_t t = 0; t < pieces; ++t) {
    uint32_t* o = reinterpret_cast<uint32_t*>(out + t * kKeyPiece * D);
    for (int64_t jj = 0; jj < kKeyPiece; ++jj) {
      const int64_t j = t * kKeyPiece + jj;
      if (j < S) {
        const T* kr = k + j * ldk;
        for (int64_t p = 0; p < P; ++p) std::memcpy(o + p * kKeyPiece + jj, kr + 2 * p, 4);
      } else {
        for (int64_t p = 0; p < P; ++p) o[p * kKeyPiece + jj] = 0;
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

// Where one (batch, kv head)'s keys are read from for Q K^T: its path's packing, or the rows themselves.
template <typename T>
struct Keys {
  const T* rows;  // S x D, row stride ld
  int64_t ld;
  const acc_type<T>* panels = nullptr;         // Path::kPanels: panel::pack
  const c10::BFloat16* bf16_panels = nullptr;  // Path::kBf16Panels: panel::pack_bf16
  const T* vnni = nullptr;                     // Path::kBrgemm: pack_kt
};

// Where one (batch, kv head)'s values are read from for P V.
template <typename T>
struct Values {
  const T* rows;  // S x Dv, row stride ld
  int64_t ld, S;
  const acc_type<T>* panels = nullptr;         // Path::kPanels: panel::pack_cols
  const c10::BFloat16* bf16_panels = nullptr;  // Path::kBf16Panels: panel::pack_cols_bf16
  const T* vnni = nullptr;                     // Path::kBrgemm: pack_v
};

// K and V of every (batch, kv head) packed once up front for the forward's path (O(seq) memory; nothing for
// Path::kBlas).
template <typename T>
class PackedKV {
  using A = acc_type<T>;

 public:
  PackedKV(const Rows4<const T>& k, const Rows4<const T>& v, const Geometry& g)
      : path_(product_path<T>(g.D)), k_(k), v_(v), S_(g.S), Hk_(g.Hk) {
    const int64_t Se = (g.S + 1) / 2 * 2, n = g.B * g.Hk;
    switch (path_) {
      case Path::kPanels:
        k_size_ = panel::packed_size<A>(g.S, g.D), v_size_ = panel::packed_size<A>(g.Dv, g.S);
        kf_ = scratch<A>(n * k_size_), vf_ = scratch<A>(n * v_size_);
        break;
      case Path::kBf16Panels:
        k_size_ = panel::packed_size_bf16(g.S, g.D), v_size_ = panel::packed_size_bf16(g.Dv, g.S);
        kb_ = scratch<c10::BFloat16>(n * k_size_), vb_ = scratch<c10::BFloat16>(n * v_size_);
        break;
      case Path::kBrgemm:
        k_size_ = (g.S + kKeyPiece - 1) / kKeyPiece * kKeyPiece * g.D;
        v_size_ = Se * ((g.Dv + kPiece - 1) / kPiece) * kPiece;
        kt_ = scratch<T>(n * k_size_), vt_ = scratch<T>(n * v_size_);
        break;
      case Path::kBlas:
        return;
    }
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / g.Hk, hk = bh % g.Hk;
        const T* kr = k.at(b, hk);
        const T* vr = v.at(b, hk);
        if constexpr (std::is_same_v<T, A>) {
          panel::pack<A>(kr, k.sl, g.S, g.D, kf_.get() + bh * k_size_);
          panel::pack_cols<A>(vr, v.sl, g.S, g.Dv, vf_.get() + bh * v_size_);
        } else {
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            if (path_ == Path::kBf16Panels) {
              panel::pack_bf16(kr, k.sl, g.S, g.D, kb_.get() + bh * k_size_);
              panel::pack_cols_bf16(vr, v.sl, g.S, g.Dv, vb_.get() + bh * v_size_);
              continue;
            }
          }
          pack_kt<T>(kr, k.sl, g.S, g.D, kt_.get() + bh * k_size_);
          pack_v<T>(vr, v.sl, g.S, g.Dv, vt_.get() + bh * v_size_);
        }
      }
    });
  }

  // key blocks start on a packed piece (kPiece is a multiple of every packing's column width)
  int64_t key_align() const { return path_ == Path::kBlas ? 1 : kPiece; }
  bool uses_brgemm() const { return path_ == Path::kBrgemm; }

  Keys<T> keys(int64_t b, int64_t hk) const {
    Keys<T> r{k_.at(b, hk), k_.sl};
    const int64_t off = (b * Hk_ + hk) * k_size_;
    if (kf_) r.panels = kf_.get() + off;
    if (kb_) r.bf16_panels = kb_.get() + off;
    if (kt_) r.vnni = kt_.get() + off;
    return r;
  }

  Values<T> values(int64_t b, int64_t hk) const {
    Values<T> r{v_.at(b, hk), v_.sl, S_};
    const int64_t off = (b * Hk_ + hk) * v_size_;
    if (vf_) r.panels = vf_.get() + off;
    if (vb_) r.bf16_panels = vb_.get() + off;
    if (vt_) r.vnni = vt_.get() + off;
    return r;
  }

 private:
  Path path_;
  Rows4<const T> k_, v_;
  int64_t S_, Hk_, k_size_ = 0, v_size_ = 0;
  std::unique_ptr<A[]> kf_, vf_;
  std::unique_ptr<c10::BFloat16[]> kb_, vb_;
  std::unique_ptr<T[]> kt_, vt_;
};

// s (m x n, row stride lds) = alpha * Q K^T for query rows Q (m x D, row stride ldq) and keys [j0, j0 + n).
// A packed product is computed unscaled; with fold_scale it stays so and alpha is returned, the scale still to
// apply (the forward folds it into its max and exponentials), otherwise the tile is scaled here. Returns 1 when
// the tile carries its scale. The forward and the backward both compute their scores here, so on the panel paths
// the backward's recomputed products equal the forward's bit for bit (BLAS sums q.k in another order, and at
// |s| ~ 50 that difference alone would exceed the gradient's tolerance).
template <typename T>
acc_type<T> score_tile(const T* Q, int64_t ldq, int64_t m, int64_t D, const Keys<T>& K, int64_t j0, int64_t n,
                       acc_type<T> alpha, bool fold_scale, acc_type<T>* s, int64_t lds) {
  using A = acc_type<T>;
  bool packed = false;
  if constexpr (std::is_same_v<T, A>) {
    if (K.panels) {
      constexpr int64_t NP = panel::width<A>();
      panel_gemm<A>(Q, ldq, m, D, K.panels + (j0 / NP) * D * NP, n, s, lds);
      packed = true;
    }
  } else {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (K.bf16_panels) {
        constexpr int64_t NP16 = panel::kWidth16;
        const int64_t D2 = (D + 1) / 2 * 2;
        panel_gemm(Q, ldq, m, D, K.bf16_panels + (j0 / NP16) * D2 * NP16, n, s, lds);
        packed = true;
      }
    }
    if (K.vnni) {
      for (int64_t t0 = 0; t0 < n;) {  // the stretch of keys [j0 + t0, ...) inside one piece
        const int64_t j = j0 + t0, c = j % kKeyPiece, len = std::min(kKeyPiece - c, n - t0);
        at::native::cpublas::brgemm(m, len, D, ldq, kKeyPiece, lds, false, Q, K.vnni + (j - c) * D + 2 * c, s + t0,
                                    true);
        t0 += len;
      }
      packed = true;
    }
  }
  if (!packed) {
    gemm<T>(false, true, m, n, D, alpha, Q, ldq, K.rows + j0 * K.ld, K.ld, A(0), s, lds);
    return A(1);
  }
  if (fold_scale) return alpha;
  for (int64_t r = 0; r < m; ++r)
    at::vec::map([alpha](Vectorized<A> x) { return x * Vectorized<A>(alpha); }, s + r * lds, s + r * lds, n);
  return A(1);
}

// acc (m x Dv, row stride Dv) += P V[j0, j0 + n) for P (m x n, row stride ldp, in the product's input type).
// brgemm pairs keys, so an odd last key gets a zero column n of P (ldp is even).
template <typename T>
void accumulate_pv(T* P, int64_t ldp, int64_t m, int64_t n, const Values<T>& V, int64_t j0, int64_t Dv,
                   acc_type<T>* acc) {
  using A = acc_type<T>;
  const int64_t Se = (V.S + 1) / 2 * 2;
  if constexpr (std::is_same_v<T, A>) {
    if (V.panels) {
      constexpr int64_t NP = panel::width<A>();
      panel_gemm<A>(P, ldp, m, n, V.panels + j0 * NP, Dv, acc, Dv, acc, Dv, V.S * NP);
      return;
    }
  } else {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (V.bf16_panels) {  // keys from j0 (a multiple of 64): pair row j0 / 2 of V's panels
        constexpr int64_t NP16 = panel::kWidth16;
        panel_gemm(P, ldp, m, n, V.bf16_panels + j0 * NP16, Dv, acc, Dv, acc, Dv, Se * NP16);
        return;
      }
    }
    if (V.vnni) {
      const int64_t ne = (n + 1) / 2 * 2;
      if (ne != n)
        for (int64_t r = 0; r < m; ++r) P[r * ldp + n] = T(0);
      for (int64_t c0 = 0; c0 < Dv; c0 += kPiece) {
        at::native::cpublas::brgemm(m, std::min(kPiece, Dv - c0), ne, ldp, kPiece, Dv, true, P,
                                    V.vnni + c0 * Se + j0 * kPiece, acc + c0, true);
      }
      return;
    }
  }
  gemm<T>(false, false, m, Dv, n, A(1), P, ldp, V.rows + j0 * V.ld, V.ld, A(1), acc, Dv);
}

// ---------------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------------
// Query rows per task: long sequences take big blocks (each K/V tile loaded is reused over more rows), shorter
// ones smaller blocks so that (batch, head, query block) still gives every thread several tasks.
int64_t q_block(int64_t L) { return L >= 768 ? 256 : (L >= 192 ? 64 : 32); }
constexpr int64_t kKeyBlock = 512;  // keys per score tile

// One score tile's step of the online softmax (FlashAttention-2), per query row: the running max mx becomes
// max(mx, post * max of the visible scores), the running sum is rescaled by exp(old max - new max) and gains the
// tile's exponentials, and so is the row of acc (Dv wide). P (row stride ldp) gets exp(post * s - max) inside
// the row's visible columns [clo, chi) and 0 elsewhere; for float/double P is s itself.
template <typename T>
void online_softmax_update(acc_type<T>* s, int64_t lds, T* P, int64_t ldp, int64_t m, int64_t n, const int64_t* clo,
                           const int64_t* chi, acc_type<T> post, acc_type<T>* mx, acc_type<T>* sum, acc_type<T>* acc,
                           int64_t Dv) {
  using A = acc_type<T>;
  const A ninf = -std::numeric_limits<A>::infinity();
  [[maybe_unused]] const bool bf16_hw = panel::has_bf16_dot();
  for (int64_t r = 0; r < m; ++r) {
    A* row = s + r * lds;
    T* prow = P + r * ldp;
    const int64_t c0 = clo[r], c1 = chi[r];
    A new_m = c1 > c0 ? std::max(mx[r], post * row_max<A>(row + c0, c1 - c0)) : mx[r];
    if (new_m == ninf) {  // nothing visible yet in this row: a zero row of P
      std::fill(prow, prow + n, T(0));
    } else {
      const A corr = std::exp(mx[r] - new_m);  // 0 when mx was -inf
      A ps;
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        ps = bf16_hw ? exp_sum_store_bf16(row + c0, prow + c0, c1 - c0, new_m, post)
                     : exp_sum_store<T, A>(row + c0, prow + c0, c1 - c0, new_m, post);
      } else
#endif
      {
        ps = exp_sum_store<T, A>(row + c0, prow + c0, c1 - c0, new_m, post);
      }
      std::fill(prow, prow + c0, T(0));
      std::fill(prow + c1, prow + n, T(0));
      sum[r] = sum[r] * corr + ps;
      mx[r] = new_m;
      if (corr != A(1)) {
        A* ar = acc + r * Dv;
        at::vec::map([corr](Vectorized<A> x) { return x * Vectorized<A>(corr); }, ar, ar, Dv);
      }
    }
  }
}

// o = acc / sum per row into O (row stride ldo), lse = max + log(sum); rows that saw no key get 0 and -inf.
template <typename T>
void write_output(acc_type<T>* acc, const acc_type<T>* mx, const acc_type<T>* sum, int64_t m, int64_t Dv, T* O,
                  int64_t ldo, acc_type<T>* lse) {
  using A = acc_type<T>;
  for (int64_t r = 0; r < m; ++r) {
    A* ar = acc + r * Dv;
    const A inv = sum[r] > A(0) ? A(1) / sum[r] : A(0);
    at::vec::map([inv](Vectorized<A> x) { return x * Vectorized<A>(inv); }, ar, ar, Dv);
    store_row<T, A>(ar, O + r * ldo, Dv);
    lse[r] = sum[r] > A(0) ? mx[r] + std::log(sum[r]) : -std::numeric_limits<A>::infinity();
  }
}

template <typename T>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
              at::Tensor& out, at::Tensor& lse, double scale_, const Geometry& g, double softcap_) {
  using A = acc_type<T>;
  constexpr bool k16 = !std::is_same_v<T, A>;
  const A scale = static_cast<A>(scale_), cap = static_cast<A>(softcap_);
  const A alpha = cap > A(0) ? scale / cap : scale;  // the scale of q.k before softcap's tanh
  const Rows4<const T> Qr(q.const_data_ptr<T>(), q), Kr(k.const_data_ptr<T>(), k), Vr(v.const_data_ptr<T>(), v);
  const Rows4<T> Or(out.mutable_data_ptr<T>(), out);
  const Mask<T> mk(mask);
  A* lp = lse.mutable_data_ptr<A>();
  const PackedKV<T> kv(Kr, Vr, g);
  const int64_t BQ = std::min(q_block(g.L), g.L), BK = std::min(kv.uses_brgemm() ? kKeyPiece : kKeyBlock, g.S);
  const int64_t nqb = (g.L + BQ - 1) / BQ, group = g.H / g.Hk;

  at::parallel_for(0, g.B * g.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(BQ * BK), acc(BQ * g.Dv), mx(BQ), sum(BQ);
    const int64_t pld = (BK + 1) / 2 * 2;  // P rows (16-bit): even, so an odd last key pairs with a zero
    std::vector<T> p16(k16 ? BQ * pld : 0);
    std::vector<int64_t> clo(BQ), chi(BQ);
    T* P;
    int64_t ldp;
    if constexpr (k16) {
      P = p16.data(), ldp = pld;
    } else {
      P = s.data(), ldp = BK;
    }
    for (int64_t task = begin; task < end; ++task) {
      // a head's query blocks in the order first, last, second, second last, ...: under a causal mask their costs
      // grow with qb, and this order gives each thread's contiguous range of tasks an equal share of the work
      const int64_t t = task % nqb, qb = t % 2 == 0 ? t / 2 : nqb - 1 - t / 2;
      const int64_t b = task / (g.H * nqb), h = (task / nqb) % g.H, hk = h / group;
      const int64_t i0 = qb * BQ, m = std::min(g.L, i0 + BQ) - i0;
      const T* Q = Qr.at(b, h, i0);
      const T* M = mk.at(b, h);
      const Keys<T> keys = kv.keys(b, hk);
      const Values<T> values = kv.values(b, hk);
      std::fill(acc.begin(), acc.begin() + m * g.Dv, A(0));
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<A>::infinity());
      std::fill(sum.begin(), sum.end(), A(0));
      const auto [jlo, jhi] = g.key_span(i0, m, kv.key_align());
      for (int64_t j0 = jlo; j0 < jhi; j0 += BK) {
        const int64_t n = std::min(jhi, j0 + BK) - j0;
        // softcap and mask act on scaled scores; without them the scale is folded into the max and exponentials
        const A post = score_tile<T>(Q, Qr.sl, m, g.D, keys, j0, n, alpha, !(cap > A(0) || M), s.data(), BK);
        finish_scores<T>(s.data(), BK, i0, m, j0, n, g, cap, nullptr, M, mk.si, mk.sj, clo.data(), chi.data());
        online_softmax_update<T>(s.data(), BK, P, ldp, m, n, clo.data(), chi.data(), post, mx.data(), sum.data(),
                                 acc.data(), g.Dv);
        accumulate_pv<T>(P, ldp, m, n, values, j0, g.Dv, acc.data());
      }
      write_output<T>(acc.data(), mx.data(), sum.data(), m, g.Dv, Or.at(b, h, i0), Or.sl,
                      lp + (b * g.H + h) * g.L + i0);
    }
    if (kv.uses_brgemm()) at::native::cpublas::brgemm_release(true);
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
  auto lse = tritium::empty({g.B, g.H, g.L}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_flash_attn_fwd", [&] {
    fwd_impl<scalar_t>(q, k, v, mask, out, lse, scale, g, softcap);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kBwdQBlock = 128, kBwdKBlock = 256;

// delta[r] = sum_c dO[r][c] O[r][c], minus dlse[r] when a gradient reaches lse (d lse / d s = P shifts the
// row's delta).
template <typename T>
void row_deltas(const T* dO, int64_t lddo, const T* O, int64_t ldo, int64_t m, int64_t Dv, const acc_type<T>* dlse,
                acc_type<T>* delta) {
  using A = acc_type<T>;
  for (int64_t r = 0; r < m; ++r) {
    A d = 0;
    for (int64_t c = 0; c < Dv; ++c) d += static_cast<A>(dO[r * lddo + c]) * static_cast<A>(O[r * ldo + c]);
    delta[r] = dlse ? d - dlse[r] : d;
  }
}

// P = exp(s - lse) in place in the score tile inside each row's visible columns [clo, chi), 0 outside them and
// on rows that saw no key; 16-bit inputs also get P rounded into p16 (row stride lds) for the products.
template <typename T>
void probabilities_from_lse(acc_type<T>* s, int64_t lds, int64_t m, int64_t n, const int64_t* clo, const int64_t* chi,
                            const acc_type<T>* lse, T* p16) {
  using A = acc_type<T>;
  for (int64_t r = 0; r < m; ++r) {
    A* row = s + r * lds;
    const int64_t c0 = clo[r], c1 = chi[r];
    if (lse[r] == -std::numeric_limits<A>::infinity() || c1 <= c0) {
      std::fill(row, row + n, A(0));
    } else {
      exp_sum<A>(row + c0, c1 - c0, lse[r]);
      std::fill(row, row + c0, A(0));
      std::fill(row + c1, row + n, A(0));
    }
    if constexpr (!std::is_same_v<T, A>) store_row<T, A>(row, p16 + r * lds, n);
  }
}

// dS = P * (dP - delta) [* (1 - tanh^2) with softcap], in place in dp (row stride ld); 16-bit inputs also get it
// rounded into ds16.
template <typename T>
void score_gradient(const acc_type<T>* prob, acc_type<T>* dp, const acc_type<T>* dtanh, const acc_type<T>* delta,
                    int64_t m, int64_t n, int64_t ld, T* ds16) {
  using A = acc_type<T>;
  using Vec = Vectorized<A>;
  for (int64_t r = 0; r < m; ++r) {
    const A* pr = prob + r * ld;
    A* dr = dp + r * ld;
    const Vec vd(delta[r]);
    if (dtanh) {
      at::vec::map3([vd](Vec p, Vec d, Vec t) { return p * (d - vd) * t; }, dr, pr, dr, dtanh + r * ld, n);
    } else {
      at::vec::map2([vd](Vec p, Vec d) { return p * (d - vd); }, dr, pr, dr, n);
    }
    if constexpr (!std::is_same_v<T, A>) store_row<T, A>(dr, ds16 + r * ld, n);
  }
}

// dst (n x m, row stride ldd) = src (m x n, row stride lds) transposed, in blocks of 32 (at::vec's vectorised
// bfloat16 transpose where the build has one)
inline void transpose_bf16(const c10::BFloat16* src, int64_t lds, int64_t m, int64_t n, c10::BFloat16* dst,
                           int64_t ldd) {
  for (int64_t r0 = 0; r0 < m; r0 += 32)
    for (int64_t c0 = 0; c0 < n; c0 += 32)
      at::vec::transpose_mxn<c10::BFloat16>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd,
                                            static_cast<int>(std::min<int64_t>(32, m - r0)),
                                            static_cast<int>(std::min<int64_t>(32, n - c0)));
}

// Tasks are (batch, query head); each walks its query blocks, and each query block its visible key blocks:
// recompute the scores and P, then dV += P^T dO, dS, dQ += scale dS K and dK += scale dS^T Q (dK and dV per query
// head in the accumulation type, summed over the GQA group by the caller).
template <typename T>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& dlse,
              const c10::optional<at::Tensor>& mask, double scale_,
              const Geometry& g, double softcap_, at::Tensor& dq, at::Tensor& dk_full, at::Tensor& dv_full) {
  using A = acc_type<T>;
  constexpr bool k16 = !std::is_same_v<T, A>;
  const A scale = static_cast<A>(scale_), cap = static_cast<A>(softcap_);
  const A alpha = cap > A(0) ? scale / cap : scale;  // the scale of q.k before softcap's tanh
  const int64_t BQ = std::min(kBwdQBlock, g.L), BK = std::min(kBwdKBlock, g.S);
  const int64_t group = g.H / g.Hk, D = g.D, Dv = g.Dv;
  const Rows4<const T> Qr(q.const_data_ptr<T>(), q), Kr(k.const_data_ptr<T>(), k), Vr(v.const_data_ptr<T>(), v);
  const Rows4<const T> Or(out.const_data_ptr<T>(), out), dOr(dout.const_data_ptr<T>(), dout);
  const Mask<T> mk(mask);
  const A* lp = lse.const_data_ptr<A>();
  const A* dlp = dlse.has_value() ? dlse->const_data_ptr<A>() : nullptr;
  T* dqp = dq.mutable_data_ptr<T>();
  A* dkp = dk_full.mutable_data_ptr<A>();
  A* dvp = dv_full.mutable_data_ptr<A>();

  // the scores are recomputed on the forward's panels (score_tile), K packed here per (batch, kv head)
  const Path path = product_path<T>(D);
  const bool fpanel = path == Path::kPanels, bpanel = path == Path::kBf16Panels;
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(BQ * BK), dp(BQ * BK), dt(cap > A(0) ? BQ * BK : 0), dqa(BQ * D), delta(BQ);
    std::vector<T> p16(k16 ? BQ * BK : 0), ds16(k16 ? BQ * BK : 0);
    std::vector<int64_t> clo(BQ), chi(BQ);
    std::vector<A> kpk(fpanel ? panel::packed_size<A>(g.S, D) : 0);
    std::vector<c10::BFloat16> kpb(bpanel ? panel::packed_size_bf16(g.S, D) : 0);
    // the other products on pair panels too (bfloat16 on AVX512-BF16): V as rows for dP = dO V^T, K as columns
    // for dQ += dS K (per (batch, kv head)); this query block's Q and dO as columns for dK += dS^T Q and
    // dV += P^T dO, whose A operands are the transposed tiles pT, dsT
    const int64_t Se = (g.S + 1) / 2 * 2, BQe = (BQ + 1) / 2 * 2;
    std::vector<c10::BFloat16> vpb(bpanel ? panel::packed_size_bf16(g.S, Dv) : 0),
        kcb(bpanel ? panel::packed_size_bf16(D, g.S) : 0), qcb(bpanel ? panel::packed_size_bf16(D, BQ) : 0),
        docb(bpanel ? panel::packed_size_bf16(Dv, BQ) : 0), pT(bpanel ? BK * BQe : 0), dsT(bpanel ? BK * BQe : 0);
    const T* P;
    const T* dS;
    if constexpr (k16) {
      P = p16.data(), dS = ds16.data();
    } else {
      P = s.data(), dS = dp.data();
    }
    int64_t packed_bh = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.H, h = task % g.H, hk = h / group;
      Keys<T> keys{Kr.at(b, hk), Kr.sl};
      if constexpr (!k16) {
        if (fpanel && packed_bh != b * g.Hk + hk) {
          panel::pack<A>(keys.rows, keys.ld, g.S, D, kpk.data());
          packed_bh = b * g.Hk + hk;
        }
        if (fpanel) keys.panels = kpk.data();
      }
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (bpanel && packed_bh != b * g.Hk + hk) {
          panel::pack_bf16(keys.rows, keys.ld, g.S, D, kpb.data());
          panel::pack_bf16(Vr.at(b, hk), Vr.sl, g.S, Dv, vpb.data());
          panel::pack_cols_bf16(keys.rows, keys.ld, g.S, D, kcb.data());
          packed_bh = b * g.Hk + hk;
        }
        if (bpanel) keys.bf16_panels = kpb.data();
      }
      const T* Vh = Vr.at(b, hk);
      const T* M = mk.at(b, h);
      A* dK = dkp + task * g.S * D;
      A* dV = dvp + task * g.S * Dv;
      std::fill(dK, dK + g.S * D, A(0));
      std::fill(dV, dV + g.S * Dv, A(0));
      for (int64_t i0 = 0; i0 < g.L; i0 += BQ) {
        const int64_t m = std::min(g.L, i0 + BQ) - i0;
        const T* Q = Qr.at(b, h, i0);
        const T* dO = dOr.at(b, h, i0);
        const A* Lr = lp + (b * g.H + h) * g.L + i0;
        row_deltas<T>(dO, dOr.sl, Or.at(b, h, i0), Or.sl, m, Dv, dlp ? dlp + (b * g.H + h) * g.L + i0 : nullptr,
                      delta.data());
        std::fill(dqa.begin(), dqa.begin() + m * D, A(0));
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (bpanel) {
            panel::pack_cols_bf16(Q, Qr.sl, m, D, qcb.data());
            panel::pack_cols_bf16(dO, dOr.sl, m, Dv, docb.data());
          }
        }
        const auto [jlo, jhi] = g.key_span(i0, m, fpanel || bpanel ? kPiece : 1);
        for (int64_t j0 = jlo; j0 < jhi; j0 += BK) {
          const int64_t n = std::min(jhi, j0 + BK) - j0;
          score_tile<T>(Q, Qr.sl, m, D, keys, j0, n, alpha, /*fold_scale=*/false, s.data(), BK);
          finish_scores<T>(s.data(), BK, i0, m, j0, n, g, cap, cap > A(0) ? dt.data() : nullptr, M, mk.si, mk.sj,
                           clo.data(), chi.data());
          probabilities_from_lse<T>(s.data(), BK, m, n, clo.data(), chi.data(), Lr, p16.data());
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            if (bpanel) {  // the four products on pair panels; dQ and dK unscaled here, scaled once at the end
              constexpr int64_t NP16 = panel::kWidth16;
              transpose_bf16(p16.data(), BK, m, n, pT.data(), BQe);
              panel_gemm(pT.data(), BQe, n, m, docb.data(), Dv, dV + j0 * Dv, Dv, dV + j0 * Dv, Dv);
              panel_gemm(dO, dOr.sl, m, Dv, vpb.data() + (j0 / NP16) * ((Dv + 1) / 2 * 2) * NP16, n, dp.data(), BK);
              score_gradient<T>(s.data(), dp.data(), cap > A(0) ? dt.data() : nullptr, delta.data(), m, n, BK,
                                ds16.data());
              transpose_bf16(ds16.data(), BK, m, n, dsT.data(), BQe);
              panel_gemm(ds16.data(), BK, m, n, kcb.data() + j0 * NP16, D, dqa.data(), D, dqa.data(), D, Se * NP16);
              panel_gemm(dsT.data(), BQe, n, m, qcb.data(), D, dK + j0 * D, D, dK + j0 * D, D);
              continue;
            }
          }
          // dV[j0:] += P^T dO;  dP = dO V^T
          gemm<T>(true, false, n, Dv, m, A(1), P, BK, dO, dOr.sl, A(1), dV + j0 * Dv, Dv);
          gemm<T>(false, true, m, n, Dv, A(1), dO, dOr.sl, Vh + j0 * Vr.sl, Vr.sl, A(0), dp.data(), BK);
          score_gradient<T>(s.data(), dp.data(), cap > A(0) ? dt.data() : nullptr, delta.data(), m, n, BK,
                            ds16.data());
          // dQ += scale dS K;  dK[j0:] += scale dS^T Q
          gemm<T>(false, false, m, D, n, scale, dS, BK, keys.rows + j0 * keys.ld, keys.ld, A(1), dqa.data(), D);
          gemm<T>(true, false, n, D, m, scale, dS, BK, Q, Qr.sl, A(1), dK + j0 * D, D);
        }
        T* dQ = dqp + ((b * g.H + h) * g.L + i0) * D;
        if (bpanel)  // the pair-panel products left dQ unscaled
          at::vec::map([scale](Vectorized<A> x) { return x * Vectorized<A>(scale); }, dqa.data(), dqa.data(), m * D);
        for (int64_t r = 0; r < m; ++r) store_row<T, A>(dqa.data() + r * D, dQ + r * D, D);
      }
      if (bpanel) at::vec::map([scale](Vectorized<A> x) { return x * Vectorized<A>(scale); }, dK, dK, g.S * D);
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
