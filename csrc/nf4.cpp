// NF4 (QLoRA's NormalFloat4, bitsandbytes' layout) weight-only linear layers' CPU kernels
// (python/tritium/ops/nf4.py; the layout and the in-register decoding are csrc/nf4_kernel.h's header comment):
//   nf4_linear_fwd: y (M, N) = x (M, K) W^T + bias, W dequantised in the kernel;
//   nf4_linear_dx:  dx (M, K) = dy (M, N) W (the frozen base's input gradient);
//   nf4_dequantize: W (N, K) in float32 / bfloat16 / float16, bitsandbytes' dequantize_4bit value for value.
// Below kDecodeRows rows of x (a decode step) the forward decodes each weight row in registers and multiplies it
// into the rows' float32 accumulators (the weight is read once, as 4-bit bytes: the step is a weight stream). From
// kDecodeRows rows (a prefill, a training step) and for dx the product is compute-bound: W is dequantised once per
// call and the product is the house GEMM (float32: panel_mm_out, csrc/linear.cpp's panel GEMM; 16-bit: ATen's,
// oneDNN), not a GEMM of our own. The instruction set (AVX-512 or AVX2) is chosen at run time from csrc/cpu.h's
// features; torch.ops.tritium_runtime.nf4_isa(name) forces one (the tests run both).
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

#include "cpu.h"
#include "panel.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace nf4 {

// bitsandbytes' NF4 code values (python/tritium/ops/nf4.py NF4_CODE_VALUES), as float32
alignas(64) constexpr float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define NF4_ISA 1
#include "nf4_kernel.h"
#undef NF4_ISA
}  // namespace avx2
#pragma GCC pop_options

#if defined(CPU_CAPABILITY_AVX512)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define NF4_ISA 2
#include "nf4_kernel.h"
#undef NF4_ISA
}  // namespace avx512
#pragma GCC pop_options
#endif

using GemvFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, int64_t, int64_t, int64_t,
                        float*, int64_t);
using DequantFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
using DeintFn = void (*)(const float*, int64_t, int64_t, int64_t, float*);

struct Isa {
  const char* name;
  int run;  // elements per deinterleaved run (2 x the vector width)
  GemvFn gemv;
  DequantFn dequant;
  DeintFn deint;
  bool (*available)();
};

const Isa kIsas[] = {
#if defined(CPU_CAPABILITY_AVX512)
    {"avx512", avx512::RUN, &avx512::gemv, &avx512::dequant_rows, &avx512::deinterleave<float>,
     [] { return cpu::features().avx512; }},
#endif
    {"avx2", avx2::RUN, &avx2::gemv, &avx2::dequant_rows, &avx2::deinterleave<float>,
     [] { return cpu::features().avx2; }},
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

int best_isa() {
  for (int i = 0; i < kNumIsas; ++i)
    if (kIsas[i].available()) return i;
  return -1;
}

std::atomic<int> g_isa{-2};  // -2: not chosen yet

const Isa& isa(const char* what) {
  int i = g_isa.load(std::memory_order_relaxed);
  if (i == -2) {
    i = best_isa();
    g_isa.store(i, std::memory_order_relaxed);
  }
  TORCH_CHECK(i >= 0, what, ": this CPU has neither AVX-512 nor AVX2 + FMA");
  return kIsas[i];
}

}  // namespace nf4

namespace {

// from this many rows of x the forward dequantises W and runs a GEMM (ops/nf4.py: DECODE_ROWS)
constexpr int64_t kDecodeRows = 32;

std::string nf4_isa(const std::string& name) {
  using nf4::kIsas;
  if (name == "auto") {
    nf4::g_isa.store(nf4::best_isa());
  } else if (!name.empty()) {
    int found = -1;
    std::string names;
    for (int i = 0; i < nf4::kNumIsas; ++i) {
      names += std::string(i ? ", " : "") + kIsas[i].name;
      if (name == kIsas[i].name) found = i;
    }
    TORCH_CHECK(found >= 0, "nf4_isa: unknown kernel set '", name, "'; expected one of ", names, " or auto");
    TORCH_CHECK(kIsas[found].available(), "nf4_isa: this CPU lacks the instructions of '", name, "'");
    nf4::g_isa.store(found);
  }
  return nf4::isa("nf4_isa").name;
}

void check_weight(const char* fn, const at::Tensor& qweight, const at::Tensor& absmax, int64_t n, int64_t k,
                  int64_t bs) {
  TORCH_CHECK(bs >= 64 && bs <= 4096 && (bs & (bs - 1)) == 0, fn,
              ": blocksize must be a power of two in [64, 4096], got ", bs);
  TORCH_CHECK(n >= 0 && k > 0 && k % bs == 0, fn, ": in_features k must be a positive multiple of the blocksize ",
              bs, ", got n = ", n, ", k = ", k);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.numel() == n * k / 2, fn,
              ": qweight must be contiguous uint8 of n k / 2 = ", n * k / 2, " bytes, got ", qweight.scalar_type(),
              " ", qweight.sizes());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == n * k / bs, fn,
              ": absmax must be contiguous float32 of n k / blocksize = ", n * k / bs, " values, got ",
              absmax.scalar_type(), " ", absmax.sizes());
}

void check_float(const char* fn, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, fn, ": ", name,
              " must be float32, bfloat16 or float16, got ", st);
}

// W (n, k) dequantised into a (pooled) tensor of dtype: rows decoded to float32 by the ISA's kernel, 16-bit
// dtypes rounded from a per-thread row buffer
at::Tensor dequantize_to(const at::Tensor& qweight, const at::Tensor& absmax, int64_t n, int64_t k, int64_t bs,
                         at::ScalarType dtype) {
  const auto& set = nf4::isa("nf4_dequantize");
  auto w = empty({n, k}, at::TensorOptions().dtype(dtype));
  const uint8_t* q = qweight.const_data_ptr<uint8_t>();
  const float* am = absmax.const_data_ptr<float>();
  if (dtype == at::kFloat) {
    float* out = w.mutable_data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) { set.dequant(q, am, k, bs, n0, n1, out + n0 * k, k); });
    return w;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "nf4_dequantize", [&] {
    scalar_t* out = w.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> row(k);
      for (int64_t r = n0; r < n1; ++r) {
        set.dequant(q, am, k, bs, r, r + 1, row.data(), k);
        at::vec::convert(row.data(), out + r * k, k);
      }
    });
  });
  return w;
}

at::Tensor nf4_dequantize(const at::Tensor& qweight, const at::Tensor& absmax, int64_t n, int64_t k, int64_t bs,
                          at::ScalarType dtype) {
  check_weight("nf4_dequantize", qweight, absmax, n, k, bs);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "nf4_dequantize: dtype must be float32, bfloat16 or float16, got ", dtype);
  return dequantize_to(qweight, absmax, n, k, bs, dtype);
}

at::Tensor nf4_linear_fwd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& bias, int64_t n, int64_t k, int64_t bs) {
  const char* fn = "nf4_linear_fwd";
  check_weight(fn, qweight, absmax, n, k, bs);
  check_float(fn, "x", x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, fn, ": x must be (M, ", k, "), got ", x.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == x.scalar_type(), fn,
                ": bias must be (", n, ",) of x's dtype ", x.scalar_type(), ", got ", bias->sizes(), " ",
                bias->scalar_type());
  const int64_t M = x.size(0);
  auto y = empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (M >= kDecodeRows) {
    const auto w = dequantize_to(qweight, absmax, n, k, bs, x.scalar_type());
    if (x.scalar_type() == at::kFloat &&
        panel_mm_out(x, w.t(), y, bias.has_value() ? bc.const_data_ptr() : nullptr, 0))
      return y;
    if (bias.has_value())
      at::addmm_out(y, bc, x, w.t());
    else
      at::mm_out(y, x, w.t());
    return y;
  }
  const auto& set = nf4::isa(fn);
  // x as float32, deinterleaved per run (nf4_kernel.h), and float32 products
  const auto xf = x.to(at::kFloat).contiguous();
  std::vector<float> xd(M * k);
  set.deint(xf.const_data_ptr<float>(), k, M, k, xd.data());
  const bool f32 = x.scalar_type() == at::kFloat;
  auto yf = f32 ? y : at::empty({M, n}, x.options().dtype(at::kFloat));
  float* yp = yf.mutable_data_ptr<float>();
  const uint8_t* q = qweight.const_data_ptr<uint8_t>();
  const float* am = absmax.const_data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) { set.gemv(xd.data(), M, k, q, am, bs, n0, n1, yp, n); });
  if (bias.has_value()) yf.add_(bc.to(at::kFloat));
  if (!f32) y.copy_(yf);
  return y;
}

at::Tensor nf4_linear_dx(const at::Tensor& dy, const at::Tensor& qweight, const at::Tensor& absmax, int64_t n,
                         int64_t k, int64_t bs) {
  const char* fn = "nf4_linear_dx";
  check_weight(fn, qweight, absmax, n, k, bs);
  check_float(fn, "dy", dy);
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == n, fn, ": dy must be (M, ", n, "), got ", dy.sizes());
  const int64_t M = dy.size(0);
  auto dx = empty({M, k}, dy.options());
  if (M == 0) return dx;
  if (n == 0) return dx.zero_();
  // dy @ W on the dequantised weight: the GEMM reads W's rows as they are (panel_mm_out packs its column panels)
  const auto w = dequantize_to(qweight, absmax, n, k, bs, dy.scalar_type());
  if (!(dy.scalar_type() == at::kFloat && panel_mm_out(dy, w, dx, nullptr, 0))) at::mm_out(dx, dy, w);
  return dx;
}

const bool kPathsReported = cpu::register_paths([] {
  // the report never raises: without a kernel set (no AVX2 + FMA) the op says so when called, the report "none"
  int i = nf4::g_isa.load(std::memory_order_relaxed);
  if (i == -2) i = nf4::best_isa();
  const std::string path = i < 0 ? std::string("none")
                                 : std::string("decode in registers (") + nf4::kIsas[i].name +
                                       ") below 32 rows; dequantise + GEMM from 32";
  return std::vector<std::pair<std::string, std::string>>{{"nf4_linear", path}};
});

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("nf4_linear_fwd", &nf4_linear_fwd);
  m.impl("nf4_linear_dx", &nf4_linear_dx);
  m.impl("nf4_dequantize", &nf4_dequantize);
}

TORCH_LIBRARY_FRAGMENT(tritium_runtime, m) { m.def("nf4_isa(str name=\"\") -> str", &nf4_isa); }

}  // namespace tritium
