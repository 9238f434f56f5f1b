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
// tiles; else beta = 1, a K = R product into the (M, K) gradient).
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
  auto gs = at::mm(dy, lora_B);  // (M, R)
  gs.mul_(scaling);
  auto dA = at::empty({R, K}, x.options());
  auto dB = at::empty({N, R}, x.options());
  at::mm_out(dA, gs.t(), masked(x, mask));
  if (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf)
    dB.copy_(at::mm(xs.t(), dy).t());  // dB^T = xs^T dy: oneDNN's 16-bit GEMM is slower on dy^T's orientation
  else
    at::mm_out(dB, dy.t(), xs);
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

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd);
  m.impl("lora_linear_bwd", &lora_linear_bwd);
}

}  // namespace tritium
