// LoRA linear layers' CPU kernels (python/tritium/ops/lora.py): a frozen base weight W (N, K) and bias, a low-rank
// adapter A (R, K), B (N, R) with scale s, and the dropout on the adapter's input as a 0/1 mask m (M, K) in x's
// dtype (or none; the caller folds its 1 / (1 - p) into s):
//   forward:  xs = s (x * m) A^T (M, R), returned for the backward;  y = x W^T + bias + xs B^T (M, N)
//   backward: gs = s dy B (M, R);  dx = dy W + (gs A) * m;  dA = gs^T (x * m) (R, K);  dB = dy^T xs (N, R)
//
// The products are ATen's GEMMs (oneDNN for 16-bit, BLAS) and, for float32 from kPanelRows rows, tritium's panel
// GEMM (panel_mm_out, tritium.linear's: beats BLAS at these shapes; the base weight's two packings, for the
// forward and for dx, kept between calls by the cache of packed frozen weights), into outputs from tritium's pool. The
// low-rank term never takes a pass of its own over the (M, N) output:
// - 16-bit from kCatRows rows: one GEMM on concatenated operands, [x | xs | 1] @ [W | B | bias]^T (zero columns
//   pad the reduction to a multiple of 8), accumulated in float32 and rounded once (oneDNN's 16-bit GEMM with
//   beta = 1 computes into a temporary and adds: a pass more);
// - float32 from kPanelRows rows: the low-rank product joins the base product's register tiles (panel_mm_out's
//   second operand pair: xs with B's panels), no pass of its own;
// - float64, and the rest below those row counts: the low-rank product added into y by a second GEMM with
//   beta = 1 (c = y), no copy of x or of W.
// The backward's dx gets its low-rank term the same way (float32 without dropout: gs with A's panels in dx's
// tiles; else beta = 1, a K = R product into the (M, K) gradient). The bfloat16 backward's gs and dB take one pass
// over dy together on AVX512-BF16 (adapter_grads_bf16); elsewhere they are ATen's GEMMs.
#include "panel.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

// 16-bit forwards from this many rows concatenate [x | xs] (copying x, M K elements, and [W | B], N (K + R)):
// below it the copy of the weight outweighs the second GEMM's pass over y
constexpr int64_t kCatRows = 256;

void check_args(const char* fn, const at::Tensor& x, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && a.dim() == 2 && b.dim() == 2, fn,
              ": x (M, K), weight (N, K), lora_A (R, K) and lora_B (N, R) must be 2-D, got ", x.sizes(), ", ",
              w.sizes(), ", ", a.sizes(), ", ", b.sizes());
  const int64_t K = x.size(1), N = w.size(0), R = a.size(0);
  TORCH_CHECK(w.size(1) == K && a.size(1) == K && b.size(0) == N && b.size(1) == R, fn,
              ": shapes disagree: x ", x.sizes(), ", weight ", w.sizes(), ", lora_A ", a.sizes(), ", lora_B ",
              b.sizes());
  for (const auto* t : {&w, &a, &b})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), fn, ": every tensor must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  if (mask.has_value())
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->scalar_type() == x.scalar_type(), fn,
                ": mask must be like x ", x.sizes(), " ", x.scalar_type(), ", got ", mask->sizes(), " ",
                mask->scalar_type());
}

// The base weight's panels may come from the cache of packed frozen weights (panel_mm_out): a weight that needs no
// gradient, packed in place (a non-contiguous one is copied first: a new tensor on every call, nothing to reuse)
bool frozen(const at::Tensor& weight) { return !weight.requires_grad() && weight.is_contiguous(); }

at::Tensor masked(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  return mask.has_value() ? x * *mask : x;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, const c10::optional<at::Tensor>& mask,
                                                   double scaling) {
  check_args("lora_linear_fwd", x, weight, lora_A, lora_B, mask);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                "lora_linear_fwd: bias must be (", N, ",) of x's dtype, got ", bias->sizes(), " ", bias->scalar_type());
  auto xs = empty({M, R}, x.options());
  at::mm_out(xs, masked(x, mask), lora_A.t());
  xs.mul_(scaling);
  auto y = empty({M, N}, x.options());
  if (M == 0 || N == 0) return {y, xs};
  const bool half = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  if (half && M >= kCatRows) {
    // [x | xs | 1 | 0 ...] (M, Kc) @ [W | B | bias | 0 ...]^T: the bias is one more reduction column (its product
    // with 1 is exact, added in the GEMM's float32 accumulator), and Kc rounds K + R (+ 1) up to a multiple of 8
    // with zero columns: oneDNN's 16-bit GEMM is faster on such a K than on K + R + 1, and than with a bias
    // epilogue (addmm). The rows are packed in one parallel pass.
    const int64_t Kb = K + R + (bias.has_value() ? 1 : 0), Kc = (Kb + 7) / 8 * 8;
    auto xc = empty({M, Kc}, x.options());
    const auto xx = x.contiguous();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "lora_linear_fwd_pack", [&] {
      const scalar_t* xp = xx.const_data_ptr<scalar_t>();
      const scalar_t* sp = xs.const_data_ptr<scalar_t>();
      scalar_t* cp = xc.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, M, row_grain(Kc), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = cp + r * Kc;
          std::memcpy(row, xp + r * K, K * sizeof(scalar_t));
          std::memcpy(row + K, sp + r * R, R * sizeof(scalar_t));
          for (int64_t c = K + R; c < Kc; ++c) row[c] = scalar_t(c < Kb ? 1.f : 0.f);
        }
      });
    });
    std::vector<at::Tensor> parts{weight, lora_B};
    if (bias.has_value()) parts.push_back(bias->unsqueeze(1));
    if (Kc > Kb) parts.push_back(at::zeros({N, Kc - Kb}, x.options()));
    at::mm_out(y, xc, at::cat(parts, 1).t());
    return {y, xs};
  }
  const auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto bt = lora_B.contiguous().t();
  if (x.scalar_type() == at::kFloat && panel_mm_out(x, weight.contiguous().t(), y,
                                                    bias.has_value() ? bc.const_data_ptr() : nullptr, 0,
                                                    frozen(weight), &xs, &bt))
    return {y, xs};
  if (bias.has_value())
    at::addmm_out(y, *bias, x, weight.t());
  else
    at::mm_out(y, x, weight.t());
  y.addmm_(xs, lora_B.t());
  return {y, xs};
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// bfloat16 backward's two adapter products in one pass over dy (on AVX512-BF16 dot products, 16 float lanes, each
// taking a pair of bfloat16 products): gs = s dy B (M, R) and dB^T = xs^T dy (R, N), R up to kFusedRank. dy is read
// in tiles of kTileRows rows, each tile used by both products while it sits in L2 (ATen's two GEMMs read all of dy
// twice, and oneDNN's bfloat16 GEMM is slow at N = R = 16 columns). Float accumulators; gs and dB rounded once.
constexpr int64_t kFusedRank = 64;
constexpr int64_t kTileRows = 64;

template <int RV, int MR, bool TAIL>
TRITIUM_BF16_DOT TRITIUM_INLINE void gs_step(__m512 (*acc)[RV], const c10::BFloat16* dy,
                                                                    int64_t ldd, const c10::BFloat16* bp,
                                                                    int64_t k2) {
  __m512bh b[RV];
  for (int v = 0; v < RV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bp + (k2 * RV + v) * 32);
  for (int i = 0; i < MR; ++i) {
    int32_t pair;
    if constexpr (TAIL) {
      pair = int32_t(dy[i * ldd + 2 * k2].x);  // the odd N's last column: its partner is not read
    } else {
      std::memcpy(&pair, dy + i * ldd + 2 * k2, 4);
    }
    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
  }
}

// gs rows [0, MR) of the tile: acc[i][v] (16 r each) += pair (dy[i][2 k2], dy[i][2 k2 + 1]) . Bp[k2][v] where
// Bp[k2][r][2] = (B[2 k2][r], B[2 k2 + 1][r]) (zero past N and past R)
template <int RV, int MR>
TRITIUM_BF16_DOT void gs_rows(const c10::BFloat16* dy, int64_t ldd, int64_t N, const c10::BFloat16* bp,
                              int64_t R, float s, c10::BFloat16* gs) {
  __m512 acc[MR][RV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t N2 = N / 2;
  for (int64_t k2 = 0; k2 < N2; ++k2) gs_step<RV, MR, false>(acc, dy, ldd, bp, k2);
  if (N & 1) gs_step<RV, MR, true>(acc, dy, ldd, bp, N2);
  const __m512 vs = _mm512_set1_ps(s);
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < RV && v * 16 < R; ++v) {
      const int64_t cnt = std::min<int64_t>(16, R - v * 16);
      const __mmask16 mk = __mmask16((1u << cnt) - 1);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][v], vs));
      _mm256_mask_storeu_epi16(gs + i * R + v * 16, mk, h);
    }
}

// dB^T partial sums acc (RP, ldc floats; RP = R rounded up to 16) += xs^T dy over the tile's rows: pairs of rows, the
// two rows' 16 columns of dy interleaved into pairs, each r's (xs[m][r], xs[m + 1][r]) broadcast; 16 r at a time in
// registers (the r past R get zero xs and are dropped at the end)
TRITIUM_BF16_DOT void db_tile(const c10::BFloat16* dy, int64_t ldd, int64_t rows, int64_t N,
                              const c10::BFloat16* xs, int64_t R, int64_t RP, float* acc, int64_t ldc) {
  uint32_t xsp[kTileRows / 2 * kFusedRank];  // (xs[2 j][r], xs[2 j + 1][r]); zero past R and past the tile
  const int64_t pairs = (rows + 1) / 2;
  for (int64_t j = 0; j < pairs; ++j)
    for (int64_t r = 0; r < RP; ++r) {
      const bool in = r < R;
      const uint32_t lo = in ? xs[2 * j * R + r].x : 0, hi = in && 2 * j + 1 < rows ? xs[(2 * j + 1) * R + r].x : 0;
      xsp[j * RP + r] = lo | hi << 16;
    }
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, N - n0);
    const __mmask16 mk = cnt == 16 ? __mmask16(0xffff) : __mmask16((1u << cnt) - 1);
    for (int64_t r0 = 0; r0 < RP; r0 += 16) {
      __m512 a[16];
      for (int r = 0; r < 16; ++r) a[r] = _mm512_loadu_ps(acc + (r0 + r) * ldc + n0);
      for (int64_t j = 0; j < pairs; ++j) {
        const c10::BFloat16* d0 = dy + 2 * j * ldd + n0;
        const __m256i lo = _mm256_maskz_loadu_epi16(mk, d0);
        const __m256i hi = 2 * j + 1 < rows ? _mm256_maskz_loadu_epi16(mk, d0 + ldd) : _mm256_setzero_si256();
        const __m512bh d = (__m512bh)_mm512_permutexvar_epi16(
            idx, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        const uint32_t* xp = xsp + j * RP + r0;
        for (int r = 0; r < 16; ++r) a[r] = _mm512_dpbf16_ps(a[r], d, (__m512bh)_mm512_set1_epi32(int32_t(xp[r])));
      }
      for (int r = 0; r < 16; ++r) _mm512_storeu_ps(acc + (r0 + r) * ldc + n0, a[r]);
    }
  }
}

template <int RV>
TRITIUM_BF16_DOT void gs_tile(const c10::BFloat16* dy, int64_t ldd, int64_t rows, int64_t N,
                              const c10::BFloat16* bp, int64_t R, float s, c10::BFloat16* gs) {
  constexpr int MR = RV == 1 ? 8 : RV == 2 ? 4 : 2;
  int64_t i = 0;
  for (; i + MR <= rows; i += MR) gs_rows<RV, MR>(dy + i * ldd, ldd, N, bp, R, s, gs + i * R);
  for (; i < rows; ++i) gs_rows<RV, 1>(dy + i * ldd, ldd, N, bp, R, s, gs + i * R);
}

// gs (M, R) and dB (N, R), both bfloat16: the fused pass above, the tiles shared among the threads, each thread's
// dB^T partial sums in its own float buffer, added in thread order at the end
void adapter_grads_bf16(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& xs, double scaling,
                        at::Tensor& gs, at::Tensor& dB) {
  const int64_t M = dy.size(0), N = dy.size(1), R = lora_B.size(1), ldd = dy.stride(0);
  const int64_t RV = (R + 15) / 16, N2 = (N + 1) / 2, ldc = (N + 15) / 16 * 16;
  const auto bf = dy.options();
  at::Tensor bp = at::zeros({N2, RV * 16, 2}, bf);  // Bp[k2][r][2] = B[2 k2 + (0, 1)][r], zero past N and past R
  const auto b = lora_B.contiguous();
  const c10::BFloat16* src = b.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* bo = bp.mutable_data_ptr<c10::BFloat16>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < R; ++r) bo[((n / 2) * RV * 16 + r) * 2 + (n & 1)] = src[n * R + r];
  const int64_t T = at::get_num_threads(), tiles = (M + kTileRows - 1) / kTileRows;
  at::Tensor part = at::zeros({T, RV * 16, ldc}, bf.dtype(at::kFloat));
  const c10::BFloat16* d = dy.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* bpp = bp.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* xp = xs.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* g = gs.mutable_data_ptr<c10::BFloat16>();
  float* pp = part.mutable_data_ptr<float>();
  const float s = static_cast<float>(scaling);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    float* acc = pp + at::get_thread_num() * RV * 16 * ldc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * kTileRows, rows = std::min(kTileRows, M - m0);
      const c10::BFloat16* dt = d + m0 * ldd;
      switch (RV) {
        case 1: gs_tile<1>(dt, ldd, rows, N, bpp, R, s, g + m0 * R); break;
        case 2: gs_tile<2>(dt, ldd, rows, N, bpp, R, s, g + m0 * R); break;
        case 3: gs_tile<3>(dt, ldd, rows, N, bpp, R, s, g + m0 * R); break;
        default: gs_tile<4>(dt, ldd, rows, N, bpp, R, s, g + m0 * R); break;
      }
      db_tile(dt, ldd, rows, N, xp + m0 * R, R, RV * 16, acc, ldc);
    }
  });
  // dB[n][r] = sum over the threads' partials of acc[r][n]
  dB.copy_(part.sum(0).narrow(0, 0, R).narrow(1, 0, N).t());
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& lora_A,
                                                               const at::Tensor& lora_B,
                                                               const c10::optional<at::Tensor>& mask,
                                                               const at::Tensor& xs, double scaling, bool need_dx) {
  check_args("lora_linear_bwd", x, weight, lora_A, lora_B, mask);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == N && dy.scalar_type() == x.scalar_type(),
              "lora_linear_bwd: dy must be (", M, ", ", N, ") of x's dtype, got ", dy.sizes(), " ", dy.scalar_type());
  TORCH_CHECK(xs.dim() == 2 && xs.size(0) == M && xs.size(1) == R && xs.scalar_type() == x.scalar_type(),
              "lora_linear_bwd: xs must be (", M, ", ", R, ") of x's dtype, got ", xs.sizes(), " ", xs.scalar_type());
  auto dA = at::empty({R, K}, x.options());
  auto dB = at::empty({N, R}, x.options());
  at::Tensor gs;
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if (x.scalar_type() == at::kBFloat16 && panel::has_bf16_dot() && R <= kFusedRank && M > 0 && N > 0 &&
      dy.stride(1) == 1) {
    gs = at::empty({M, R}, x.options());
    adapter_grads_bf16(dy, lora_B, xs.contiguous(), scaling, gs, dB);
  }
#endif
  if (!gs.defined()) {
    gs = at::mm(dy, lora_B);  // (M, R)
    gs.mul_(scaling);
    if (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf)
      dB.copy_(at::mm(xs.t(), dy).t());  // dB^T = xs^T dy: oneDNN's 16-bit GEMM is slower on dy^T's orientation
    else
      at::mm_out(dB, dy.t(), xs);
  }
  at::mm_out(dA, gs.t(), masked(x, mask));
  if (!need_dx) return {at::empty({0}, x.options()), dA, dB};
  auto dx = empty({M, K}, x.options());
  if (M == 0 || K == 0) return {dx, dA, dB};
  if (N == 0) {
    dx.zero_();
  } else if (!mask.has_value() && x.scalar_type() == at::kFloat) {
    const auto ac = lora_A.contiguous();
    if (panel_mm_out(dy, weight.contiguous(), dx, nullptr, 0, frozen(weight), &gs, &ac)) return {dx, dA, dB};
    at::mm_out(dx, dy, weight);
  } else if (!(x.scalar_type() == at::kFloat && panel_mm_out(dy, weight.contiguous(), dx, nullptr, 0,
                                                             frozen(weight)))) {
    at::mm_out(dx, dy, weight);  // (the panels: dy @ W on W's column panels)
  }
  if (mask.has_value())
    dx.addcmul_(at::mm(gs, lora_A), *mask);
  else
    dx.addmm_(gs, lora_A);
  return {dx, dA, dB};
}

const bool kPathsReported = cpu::register_paths([] {
  const bool fused = panel::has_bf16_dot();
  return std::vector<std::pair<std::string, std::string>>{
      {"lora_linear.bfloat16.backward",
       fused ? "gs and dB in one pass over dy (AVX512-BF16) up to r = 64; ATen's GEMMs past it" : "ATen's GEMMs"}};
});

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd);
  m.impl("lora_linear_bwd", &lora_linear_bwd);
}

}  // namespace tritium
