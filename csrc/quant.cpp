// Weight-only quantized linear layers on CPU (python/tritium/ops/quant.py; docs/quantization.md has the format and
// this layout): quant_pack / quant_unpack (the logical weight <-> 16-row interleaved tiles), quant_linear (x @ W^T
// with int8 or float activations), quant_linear_dx, quant_dequantize.
//
// The tile kernels (quant_kernel.h) are compiled five times in the AVX-512 build (tritium._C_avx512), for AMX (with
// AVX-512 VNNI), AVX-512 VNNI with AVX512-BF16, AVX-512 VNNI, AVX-512BW and AVX2, and once, for AVX2, in the others; which one runs is decided at
// run time from csrc/cpu.h's features (quant_isa overrides it, for tests).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu.h"
#include "panel.h"
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace quant {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define QK_ISA 1
#include "quant_kernel.h"
#undef QK_ISA
}  // namespace avx2
#pragma GCC pop_options

#if defined(CPU_CAPABILITY_AVX512)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define QK_ISA 2
#include "quant_kernel.h"
#undef QK_ISA
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace vnni {
#define QK_ISA 3
#include "quant_kernel.h"
#undef QK_ISA
}  // namespace vnni
#pragma GCC pop_options

// VNNI and AVX512-BF16 (AMD Zen 4, Intel Cooper Lake): the VNNI kernels, and bfloat16 activations of many rows
// multiplied exactly by vdpbf16ps (tile_bf16_dot) where the AMX set would use its bfloat16 tiles
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
namespace bf16dot {
#define QK_ISA 3
#define QK_BF16 1
#include "quant_kernel.h"
#undef QK_BF16
#undef QK_ISA
}  // namespace bf16dot
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8,amx-bf16")
namespace amx {
#define QK_ISA 4
#include "quant_kernel.h"
#undef QK_ISA
}  // namespace amx
#pragma GCC pop_options
#endif

using TileFn = void (*)(int, bool, int, const uint8_t*, const void*, const void*, int64_t, int64_t, int64_t,
                        const void*, int64_t, const float*, const float*, int64_t, float*);

using DequantFn = void (*)(int, bool, const uint8_t*, const void*, const void*, int64_t, int64_t, int64_t, float*,
                          int64_t);

using QuantizeFn = void (*)(const void*, int, int64_t, int64_t, int64_t, int, int8_t*, float*, int64_t, float*,
                           int64_t, float*);

using StoreFn = void (*)(const float*, int, int64_t, int, void*, int, int64_t);

struct Isa {
  const char* name;
  TileFn fn;
  DequantFn dequant_t;
  QuantizeFn quantize_rows;
  StoreFn store_rows;
  bool (*available)();
  void (*end)();  // after a thread's run of tiles: gives back what fn took (AMX: the tile configuration)
};

const Isa kIsas[] = {
#if defined(CPU_CAPABILITY_AVX512)
    {"amx_int8", &amx::tile, &amx::dequant_t, &amx::quantize_rows, &amx::store_rows,
     [] { return cpu::features().amx_int8 && cpu::features().avx512_vnni; }, &amx::amx_end},
    {"avx512_bf16", &bf16dot::tile, &bf16dot::dequant_t, &bf16dot::quantize_rows, &bf16dot::store_rows,
     [] { return cpu::features().avx512_vnni && cpu::features().avx512_bf16; }, nullptr},
    {"avx512_vnni", &vnni::tile, &vnni::dequant_t, &vnni::quantize_rows, &vnni::store_rows,
     [] { return cpu::features().avx512_vnni; }, nullptr},
    {"avx512", &avx512::tile, &avx512::dequant_t, &avx512::quantize_rows, &avx512::store_rows,
     [] { return cpu::features().avx512; }, nullptr},
#endif
    {"avx2", &avx2::tile, &avx2::dequant_t, &avx2::quantize_rows, &avx2::store_rows,
     [] { return cpu::features().avx2; }, nullptr},
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

int best_isa() {
  for (int i = 0; i < kNumIsas; ++i)
    if (kIsas[i].available()) return i;
  return -1;
}

std::atomic<int> g_isa{-2};  // -2: not chosen yet

int current_isa() {
  int i = g_isa.load(std::memory_order_relaxed);
  if (i == -2) {
    i = best_isa();
    g_isa.store(i, std::memory_order_relaxed);
  }
  return i;
}

}  // namespace quant

namespace {

using quant::kIsas;
using quant::kNumIsas;
constexpr int64_t kBlock = 32, kTile = 16;
// From this many rows, float activations go through a dequantised weight and one GEMM (quant_linear), and so do
// two-term int8 activations of float32 x; two-term bfloat16 / float16 x from kGemmRows16 (ops/quant.py:
// FLOAT_ROWS, FLOAT_ROWS_16, activation_terms). Measured on a CPU without AMX (AVX512-VNNI/BF16), one projection of
// 16-bit x: the two integer passes took 0.6x the time of dequantise + GEMM at 32 rows, 0.9x at 64, 1.2x at 128; at
// 32 rows the GEMM path had made a 32-sequence decode step twice as slow as a 31-sequence one. Two terms lose
// nothing next to a 16-bit x's own rounding; float32 x keeps the exact GEMM from 32 rows (a batched prefill of
// short prompts) although the tiles were faster there too (float32 dequantisation + MKL's SGEMM on that CPU).
constexpr int64_t kGemmRows = 32, kGemmRows16 = 128;
constexpr int kBf16Tiles = quant::avx2::kBf16Tiles;  // the tile kernels' activation mode "bfloat16 on AMX tiles"
constexpr int64_t kAmxRows = quant::avx2::kAmxRows;   // from this many rows the AMX kernels run

// torch.ops.tritium_runtime.quant_isa(name): "" reports the kernel set in use; a name ("amx_int8", "avx512_vnni",
// "avx512", "avx2") switches to it (an error if this CPU lacks it); "auto" returns to the best this CPU has.
// Returns the set in use after the call.
std::string quant_isa(const std::string& name) {
  if (name == "auto") {
    quant::g_isa.store(quant::best_isa());
  } else if (!name.empty()) {
    int found = -1;
    std::string names;
    for (int i = 0; i < kNumIsas; ++i) {
      names += std::string(i ? ", " : "") + kIsas[i].name;
      if (name == kIsas[i].name) found = i;
    }
    TORCH_CHECK(found >= 0, "quant_isa: unknown kernel set '", name, "'; expected one of ", names, " or auto");
    TORCH_CHECK(kIsas[found].available(), "quant_isa: this CPU lacks the instructions of '", name, "'");
    quant::g_isa.store(found);
  }
  const int i = quant::current_isa();
  return i < 0 ? "none" : kIsas[i].name;
}

// `tritium info`: the kernel set quant_linear runs with
const bool kPathsReported = cpu::register_paths([] {
  return std::vector<std::pair<std::string, std::string>>{{"quant_linear", quant_isa("")}};
});

int64_t padded_k(int64_t k) { return (k + kBlock - 1) / kBlock * kBlock; }

// The layout's checks shared by every op: bits, group, the scales' dtype and the packed shapes.
void check_format(const char* fn, int64_t bits, int64_t group, bool has_mins) {
  TORCH_CHECK(bits == 4 || bits == 8, fn, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group == 16 || (group > 0 && group % kBlock == 0), fn,
              ": group must be 16 or a multiple of 32, got ", group);
  TORCH_CHECK(group != 16 || (bits == 8 && !has_mins), fn,
              ": group 16 is for symmetric 8-bit weights (GGUF Q6_K) only, got bits ", bits,
              has_mins ? " with mins" : "");
}

int64_t groups_of(int64_t k, int64_t group) {
  return group == 16 ? (padded_k(k) / 16) : (padded_k(k) + group - 1) / group;
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->numel() > 0; }

void check_packed(const char* fn, const at::Tensor& qdata, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t n, int64_t k) {
  check_format(fn, bits, group, has(mins));
  TORCH_CHECK(n > 0 && k > 0, fn, ": n and k must be positive, got ", n, " and ", k);
  TORCH_CHECK(group == 16 || padded_k(k) % group == 0, fn, ": group ", group, " must divide K = ", k,
              " (rounded up to a multiple of 32)");
  const int64_t tiles = (n + kTile - 1) / kTile, nb = padded_k(k) / kBlock, ng = groups_of(k, group);
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 3 && qdata.size(0) == tiles && qdata.size(1) == nb &&
                  qdata.size(2) == kTile * kBlock * bits / 8 && qdata.is_contiguous(),
              fn, ": qdata must be quant_pack's contiguous uint8 (", tiles, ", ", nb, ", ", kTile * kBlock * bits / 8,
              ") for n = ", n, ", k = ", k, ", bits = ", bits, ", got ", qdata.scalar_type(), " ", qdata.sizes());
  TORCH_CHECK((scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat) && scales.dim() == 3 &&
                  scales.size(0) == tiles && scales.size(1) == ng && scales.size(2) == kTile && scales.is_contiguous(),
              fn, ": scales must be quant_pack's contiguous float16/float32 (", tiles, ", ", ng, ", 16), got ",
              scales.scalar_type(), " ", scales.sizes());
  if (has(mins))
    TORCH_CHECK(mins->scalar_type() == scales.scalar_type() && mins->sizes() == scales.sizes() && mins->is_contiguous(),
                fn, ": mins must be like scales (", scales.scalar_type(), " ", scales.sizes(), "), got ",
                mins->scalar_type(), " ", mins->sizes());
}

// q (N, K) uint8, scales (N, ng), mins (N, ng) or none -> (qdata, scales, mins) in the 16-row tiles.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_pack(const at::Tensor& q, const at::Tensor& scales,
                                                          const c10::optional<at::Tensor>& mins, int64_t bits,
                                                          int64_t group) {
  check_format("quant_pack", bits, group, has(mins));
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2 && q.size(0) > 0 && q.size(1) > 0,
              "quant_pack: q must be a non-empty uint8 (N, K) tensor, got ", q.scalar_type(), " ", q.sizes());
  const int64_t n = q.size(0), k = q.size(1), ng = groups_of(k, group);
  TORCH_CHECK(group == 16 || padded_k(k) % group == 0, "quant_pack: group ", group, " must divide K = ", k,
              " (rounded up to a multiple of 32)");
  TORCH_CHECK((scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat) && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == ng,
              "quant_pack: scales must be float16 or float32 (", n, ", ", ng, "), got ", scales.scalar_type(), " ",
              scales.sizes());
  if (has(mins))
    TORCH_CHECK(mins->scalar_type() == scales.scalar_type() && mins->sizes() == scales.sizes(),
                "quant_pack: mins must be like scales (", scales.scalar_type(), " ", scales.sizes(), "), got ",
                mins->scalar_type(), " ", mins->sizes());
  TORCH_CHECK(q.max().item<int64_t>() < (int64_t{1} << bits), "quant_pack: q holds values of ", bits + 1,
              " bits or more; ", bits, "-bit values are 0..", (1 << bits) - 1);
  const int64_t tiles = (n + kTile - 1) / kTile, nb = padded_k(k) / kBlock, bb = kTile * kBlock * bits / 8;
  auto qd = at::zeros({tiles, nb, bb}, q.options());
  const auto qc = q.contiguous();
  const uint8_t* src = qc.const_data_ptr<uint8_t>();
  uint8_t* dst = qd.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t r = 0; r < kTile && t * kTile + r < n; ++r) {
        const uint8_t* row = src + (t * kTile + r) * k;
        for (int64_t b = 0; b < nb; ++b) {
          uint8_t* blk = dst + (t * nb + b) * bb;
          auto at = [&](int64_t e) -> uint8_t { return kBlock * b + e < k ? row[kBlock * b + e] : 0; };
          for (int64_t c = 0; c < (bits == 8 ? 8 : 4); ++c)
            for (int64_t j = 0; j < 4; ++j)
              blk[c * 64 + r * 4 + j] = bits == 8 ? at(4 * c + j) : uint8_t(at(4 * c + j) | at(16 + 4 * c + j) << 4);
        }
      }
  });
  // scales and mins: (N, ng) -> (tiles, ng, 16), rows past N zero
  auto tile_rows = [&](const at::Tensor& s) {
    auto out = at::zeros({tiles * kTile, ng}, s.options());
    out.narrow(0, 0, n).copy_(s);
    return out.view({tiles, kTile, ng}).transpose(1, 2).contiguous();
  };
  return {qd, tile_rows(scales), has(mins) ? tile_rows(*mins) : at::empty({0}, scales.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_unpack(const at::Tensor& qdata, const at::Tensor& scales,
                                                            const c10::optional<at::Tensor>& mins, int64_t bits,
                                                            int64_t group, int64_t n, int64_t k) {
  check_packed("quant_unpack", qdata, scales, mins, bits, group, n, k);
  const int64_t nb = qdata.size(1), bb = qdata.size(2);
  auto q = at::empty({n, k}, qdata.options());
  const uint8_t* src = qdata.const_data_ptr<uint8_t>();
  uint8_t* dst = q.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / kTile, r = i % kTile;
      for (int64_t e = 0; e < k; ++e) {
        const int64_t b = e / kBlock, w = e % kBlock;
        const uint8_t* blk = src + (t * nb + b) * bb;
        if (bits == 8) {
          dst[i * k + e] = blk[(w / 4) * 64 + r * 4 + w % 4];
        } else {
          const int64_t lo = w % 16;
          const uint8_t v = blk[(lo / 4) * 64 + r * 4 + lo % 4];
          dst[i * k + e] = w < 16 ? (v & 0xF) : (v >> 4);
        }
      }
    }
  });
  auto untile = [&](const at::Tensor& s) { return s.transpose(1, 2).reshape({-1, s.size(1)}).narrow(0, 0, n).clone(); };
  return {q, untile(scales), has(mins) ? untile(*mins) : at::empty({0}, scales.options())};
}

// x (M, K) -> the activations a tile kernel reads (the kernel set's quantize_rows). int8 (terms 1): xq (M, Kp)
// int8, dx (nb, M, 2) float (per block of 32: its scale absmax / 127, and scale * the sum of its xq), sx16 (M, 2 nb)
// float (scale * the sum of xq over each half block). Two terms (terms 2): each row of x becomes two int8 rows, 2m
// the row quantized as above and 2m + 1 what that left over (x - dx * xq, quantized the same way): their products
// add up to x's within ~1/127 of the int8 error, near float accuracy for twice the integer work. float (terms 0):
// xf (M, Kp) float, sx16 the sums of x over each half block. Rows zero padded to Kp.
// Buffers reused from call to call (a decode step makes a hundred small calls; fresh allocations would cost more
// than the activations' quantization itself).
struct Activations {
  std::vector<float> xf, dx, sx16;
  std::vector<int8_t> xq;
  const void* x() const { return xq.empty() ? static_cast<const void*>(xf.data()) : xq.data(); }
};

int dtype_code(at::ScalarType t) { return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : 2; }

const Activations& prepare(const at::Tensor& x, int64_t k, int64_t terms, int isa) {
  thread_local Activations tl;
  Activations& a = tl;  // the caller's buffers (a name in the lambda below would be the worker thread's own)
  const bool bf16 = terms == kBf16Tiles;
  // int8 rows per row of x (bfloat16 rows: one, of 2 bytes an element)
  const int64_t t = bf16 ? 1 : std::max<int64_t>(terms, 1), row_bytes = bf16 ? 2 : t;
  const int64_t M = x.size(0), kp = padded_k(k), nb = kp / kBlock, R = M * t;
  // int8 rows in whole passes of 16 rows of x (the AMX path reads 16 x terms at a time; the padding's products are
  // dropped)
  const int64_t pass = 16 * t, Rp = terms > 0 ? (R + pass - 1) / pass * pass : R;
  if (terms > 0) {
    a.xf.clear();
    a.xq.resize(Rp * kp * (bf16 ? 2 : 1));
    a.dx.resize(Rp * nb * 2);
  } else {
    a.xq.clear();
    a.xf.resize(M * kp);
  }
  a.sx16.resize(Rp * 2 * nb);
  const quant::QuantizeFn fn = kIsas[isa].quantize_rows;
  const int dtype = dtype_code(x.scalar_type());
  const int64_t xs = x.stride(0), es = x.element_size();
  const uint8_t* xp = static_cast<const uint8_t*>(x.const_data_ptr());
  // rows split over the threads from 4 rows (a batched decode step's, else serial while the other threads wait)
  at::parallel_for(0, M, M >= 4 ? 1 : M, [&](int64_t m0, int64_t m1) {
    fn(xp + m0 * xs * es, dtype, xs, m1 - m0, k, static_cast<int>(terms),
       terms > 0 ? a.xq.data() + m0 * row_bytes * kp : nullptr, terms > 0 ? nullptr : a.xf.data() + m0 * kp, kp,
       terms > 0 ? a.dx.data() + m0 * t * 2 : nullptr, 2 * Rp, a.sx16.data() + m0 * t * 2 * nb);
  });
  return a;
}

// A packed weight's tiles as the tile kernels take them: tile t's blocks, its (groups, 16) scales and mins.
struct Tiles {
  const uint8_t* q;
  const uint8_t* s;
  const uint8_t* m;  // nullptr: symmetric
  int64_t count, nb, bb, ng, group_blocks;
  bool half;
  Tiles(const at::Tensor& qdata, const at::Tensor& scales, const c10::optional<at::Tensor>& mins, int64_t group)
      : q(qdata.const_data_ptr<uint8_t>()), s(static_cast<const uint8_t*>(scales.const_data_ptr())),
        m(has(mins) ? static_cast<const uint8_t*>(mins->const_data_ptr()) : nullptr), count(qdata.size(0)),
        nb(qdata.size(1)), bb(qdata.size(2)), ng(scales.size(1)), group_blocks(group == 16 ? 0 : group / kBlock),
        half(scales.scalar_type() == at::kHalf) {}
  int64_t scale_bytes() const { return ng * kTile * (half ? 2 : 4); }
  const uint8_t* blocks(int64_t t) const { return q + t * nb * bb; }
  const uint8_t* scales(int64_t t) const { return s + t * scale_bytes(); }
  const uint8_t* mins(int64_t t) const { return m ? m + t * scale_bytes() : nullptr; }
};

// Whether quant_linear multiplies x exactly on AMX-BF16 tiles (tile_bf16_amx) or by AVX512-BF16 pair products
// (tile_bf16_dot) with int8_act: the AMX kernel set on a CPU with AMX-BF16 (or the avx512_bf16 set: 4-bit weights,
// int8_act 0 and 2, see there), bfloat16 x, weights in groups of 32 or more; 4-bit weights whatever int8_act says (the tiles
// are faster than either int8 mode there), 8-bit ones for int8_act 0 and 2 (with one int8 term the int8 tiles are
// faster: one tdpbssd per block against two tdpbf16ps). It does from kAmxRows rows up to kBf16TileRows, from
// where one GEMM on the dequantised weight is faster (its dequantisation amortised over the rows). The Python
// mirror is tritium.ops.quant.bf16_tiles.
constexpr int64_t kBf16TileRows = 384;

bool bf16_tiles(int isa, const at::Tensor& x, int64_t bits, int64_t group, int64_t int8_act) {
#if defined(CPU_CAPABILITY_AVX512)
  if (x.scalar_type() != at::kBFloat16 || group == 16) return false;
  if (kIsas[isa].fn == &quant::amx::tile) return cpu::features().amx_bf16 && (bits == 4 || int8_act != 1);
  // vdpbf16ps: faster than two int8 terms and than float activations on 4-bit weights; one VNNI int8 term is
  // faster still, and 8-bit weights take two products per pair (their nibbles), slower than VNNI's one
  return kIsas[isa].fn == &quant::bf16dot::tile && bits == 4 && int8_act != 1;
#else
  return false;  // no AMX code in this build
#endif
}

int checked_isa(const char* what) {
  const int isa = quant::current_isa();
  TORCH_CHECK(isa >= 0, what, ": this CPU has neither AVX-512 nor AVX2 + FMA + F16C");
  return isa;
}

// W^T (K, N) in dtype (float32, or x's 16-bit type for a GEMM in 16 bits), a view (row stride: the tiles' padded
// width) of a pooled buffer: the tile kernels' dequantisation (tile_dequant_t, vectorised), for the products that
// run as one GEMM on the dequantised weight. A 16-bit W^T is rounded tile by tile from a float scratch (the same
// values as the float W^T's .to(dtype), without the float (K, N) copy and the second pass over it).
at::Tensor dequantize_t(const at::Tensor& qdata, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                        int64_t bits, int64_t group, int64_t n, int64_t k, at::ScalarType dtype = at::kFloat) {
  const quant::DequantFn dq = kIsas[checked_isa("quantized products")].dequant_t;
  const Tiles w(qdata, scales, mins, group);
  const int64_t ld = w.count * kTile;
  auto wt = empty({k, ld}, scales.options().dtype(dtype));
  if (dtype == at::kFloat) {
    at::parallel_for(0, w.count, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        dq(static_cast<int>(bits), w.half, w.blocks(t), w.scales(t), w.mins(t), w.nb, w.group_blocks, k,
           wt.mutable_data_ptr<float>() + t * kTile, ld);
    });
  } else {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "quant_dequantize_t", [&] {
      scalar_t* out = wt.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, w.count, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> tile(k * kTile);
        for (int64_t t = t0; t < t1; ++t) {
          dq(static_cast<int>(bits), w.half, w.blocks(t), w.scales(t), w.mins(t), w.nb, w.group_blocks, k,
             tile.data(), kTile);
          for (int64_t e = 0; e < k; ++e) at::vec::convert(tile.data() + e * kTile, out + e * ld + t * kTile, kTile);
        }
      });
    });
  }
  return wt.narrow(1, 0, n);
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t n, int64_t k,
                        int64_t int8_act) {
  check_packed("quant_linear", qdata, scales, mins, bits, group, n, k);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "quant_linear: x must be (M, ", k, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "quant_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(int8_act >= 0 && int8_act <= 2, "quant_linear: int8_act must be 0 (float activations), 1 or 2 (int8 "
              "terms), got ", int8_act);
  const int isa = checked_isa("quant_linear");
  const int64_t M = x.size(0);
  auto y = empty({M, n}, x.options());
  if (M == 0) return y;
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const bool tiles = bf16_tiles(isa, xc, bits, group, int8_act);
  const bool bf16 = tiles && M >= kAmxRows && M < kBf16TileRows;
  const int64_t gemm_rows = int8_act == 2 && x.scalar_type() != at::kFloat ? kGemmRows16 : kGemmRows;
  if (!bf16 && M >= gemm_rows && (int8_act != 1 || tiles)) {
    // float activations, many rows (a prefill): the weight dequantised once into W^T (K, N) in x's dtype, then
    // one GEMM (MKL / oneDNN, whose 16-bit kernels multiply in 16 bits as the float model's do); the tile kernel
    // would widen every weight once per 4 rows. Two int8 terms exist to approach float accuracy at decode's
    // weight-streaming cost; with this many rows the product is compute-bound, and the GEMM on float
    // activations is both faster than two integer passes and exact
    // (float32: tritium's panel GEMM where W^T's rows are dense, as tritium.linear's and the NF4 forward's)
    const auto wt = dequantize_t(qdata, scales, mins, bits, group, n, k, x.scalar_type());
    if (!(x.scalar_type() == at::kFloat && panel_mm_out(xc, wt, y, nullptr, 0))) at::mm_out(y, xc, wt);
    return y;
  }
  const Tiles w(qdata, scales, mins, group);
  const int64_t mode = bf16 ? kBf16Tiles : int8_act;  // the activations the tile kernel takes
  const Activations& act = prepare(xc, k, mode, isa);
  const quant::Isa& set = kIsas[isa];
  const int64_t kp = padded_k(k), terms = bf16 ? 1 : std::max<int64_t>(int8_act, 1), R = M * terms;
  const int dtype = dtype_code(x.scalar_type());
  uint8_t* yp = static_cast<uint8_t*>(y.mutable_data_ptr());
  // tiles per task: enough weight bytes x rows that a small product (a decode step's tiny layers) stays on one
  // thread instead of paying for a parallel region it cannot use
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, w.nb * w.bb * R));
  at::parallel_for(0, w.count, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) float out_small[16 * kTile];
    std::vector<float> out_big(R > 16 ? R * kTile : 0);
    float* out = R > 16 ? out_big.data() : out_small;
    for (int64_t t = t0; t < t1; ++t) {
      set.fn(static_cast<int>(bits), w.half, static_cast<int>(mode), w.blocks(t), w.scales(t), w.mins(t), w.nb,
             w.group_blocks, R, act.x(), kp, mode ? act.dx.data() : nullptr, act.sx16.data(), w.nb, out);
      set.store_rows(out, static_cast<int>(terms), M, static_cast<int>(std::min(kTile, n - t * kTile)),
                     yp + t * kTile * y.element_size(), dtype, n);
    }
    if (set.end) set.end();
  });
  return y;
}

// W (N, K) in float32 (rows: only those rows, in that order), from the tiles: scales * q + mins per group (or
// scales * (q - offset)), the weight docs/quantization.md defines. Each tile a row lies in is dequantised by the
// same vectorised code as dequantize_t (into a (K, 16) scratch), and the row's column copied out.
at::Tensor dequantize_f32(const at::Tensor& qdata, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                          int64_t bits, int64_t group, int64_t n, int64_t k, const at::Tensor& rows) {
  const quant::DequantFn dq = kIsas[checked_isa("quant_dequantize")].dequant_t;
  const Tiles w(qdata, scales, mins, group);
  const int64_t R = rows.defined() ? rows.numel() : n;
  auto out = at::empty({R, k}, scales.options().dtype(at::kFloat));
  const auto rc = rows.defined() ? rows.to(at::kLong).contiguous() : at::Tensor();
  const int64_t* rp = rows.defined() ? rc.const_data_ptr<int64_t>() : nullptr;
  if (rp)
    for (int64_t i = 0; i < R; ++i)
      TORCH_CHECK(rp[i] >= 0 && rp[i] < n, "quant_dequantize: rows must index the weight's ", n, " rows, got ", rp[i]);
  float* op = out.mutable_data_ptr<float>();
  // work items: output rows in runs that share a tile (all 16 rows of a tile when rows is None)
  const int64_t items = rp ? R : w.count;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> tile(k * kTile);
    int64_t have = -1;  // the tile in scratch
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = rp ? rp[i] / kTile : i;
      if (t != have) {
        dq(static_cast<int>(bits), w.half, w.blocks(t), w.scales(t), w.mins(t), w.nb, w.group_blocks, k,
           tile.data(), kTile);
        have = t;
      }
      const int64_t r0 = rp ? rp[i] % kTile : 0, r1 = rp ? r0 + 1 : std::min(kTile, n - t * kTile);
      for (int64_t r = r0; r < r1; ++r) {
        float* dst = op + (rp ? i : t * kTile + r) * k;
        for (int64_t e = 0; e < k; ++e) dst[e] = tile[e * kTile + r];
      }
    }
  });
  return out;
}

at::Tensor quant_dequantize(const at::Tensor& qdata, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                            int64_t bits, int64_t group, int64_t n, int64_t k, at::ScalarType dtype,
                            const c10::optional<at::Tensor>& rows) {
  check_packed("quant_dequantize", qdata, scales, mins, bits, group, n, k);
  TORCH_CHECK(!rows.has_value() || (rows->dim() == 1 && (rows->scalar_type() == at::kLong ||
                                                          rows->scalar_type() == at::kInt)),
              "quant_dequantize: rows must be a 1-D int64 or int32 tensor of row indices");
  auto w = dequantize_f32(qdata, scales, mins, bits, group, n, k, rows.has_value() ? *rows : at::Tensor());
  return dtype == at::kFloat ? w : w.to(dtype);
}

// dy (M, N) @ W (N, K): the input gradient (a training step's product: compute-bound), the weight dequantised per
// call into W^T (dequantize_t) in dy's dtype for 16-bit dy (a 16-bit GEMM, as the float model's own input gradient;
// widening dy to float32 for an SGEMM costs more than the product), else float32 (tritium's panel GEMM where W^T's
// rows are dense, else BLAS), then one GEMM.
at::Tensor quant_linear_dx(const at::Tensor& dy, const at::Tensor& qdata, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group, int64_t n, int64_t k) {
  check_packed("quant_linear_dx", qdata, scales, mins, bits, group, n, k);
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == n, "quant_linear_dx: dy must be (M, ", n, "), got ", dy.sizes());
  const auto st = dy.scalar_type();
  const auto ct = st == at::kBFloat16 || st == at::kHalf ? st : at::kFloat;
  const auto wt = dequantize_t(qdata, scales, mins, bits, group, n, k, ct);
  auto out = empty({dy.size(0), k}, dy.options().dtype(ct));
  const auto dyc = dy.to(ct);
  if (!(ct == at::kFloat && panel_mm_out(dyc, wt.t(), out, nullptr, 0))) at::mm_out(out, dyc, wt.t());
  return st == ct ? out : out.to(st);
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("quant_pack", &quant_pack);
  m.impl("quant_unpack", &quant_unpack);
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_dx", &quant_linear_dx);
  m.impl("quant_dequantize", &quant_dequantize);
}

TORCH_LIBRARY_FRAGMENT(tritium_runtime, m) { m.def("quant_isa(str name=\"\") -> str", &quant_isa); }

}  // namespace tritium
