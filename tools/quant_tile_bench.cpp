// The quantized-linear tile kernels (csrc/quant_kernel.h) outside the extension: a base version of the header and a
// candidate one, each compiled for every kernel set quant.cpp builds except AMX (avx2, avx512, avx512_vnni,
// avx512_bf16), run on the same packed weights and activations, their outputs compared and their times taken
// alternately. A kernel change can so be measured and checked in seconds, without rebuilding the extension (a full
// build takes minutes; the Python tests against the float64 references still decide, after the rebuild).
// tools/quant_tile_bench.sh compiles and runs it (the base: the header at a git revision).
//
// Cases: SmolLM2-135M's projections as the embedded GGUF stores them, at 1 and 16 rows of bfloat16 x (a decode step
// of one sequence, and of 16): the fused gate/up (3072 x 576) and the down projection (576 x 1536) in Q4_1 (4-bit,
// float16 scales and mins, groups of 32), and 8192 rows of the tied LM head (Q8_0: symmetric 8-bit, groups of 32).
// Each in every activation mode the set takes: float (0), one or two int8 terms (1, 2), and on avx512_bf16
// bfloat16 pair products (kBf16Tiles, 4-bit weights from kAmxRows rows, as quant.cpp's bf16_tiles).
// Per line: the set, the case, the mode, the rows, each version's thread CPU time (the least of the rounds: the
// machine may be shared) and GFLOP/s, and the largest |base - candidate| output difference against the largest
// output: 0 when the change keeps the arithmetic. First, where the CPU has them, the rates of the 512-bit dot-product
// instructions, the ceiling of the int8 and bfloat16 modes. On a shared machine the times are noisy (the least of the
// rounds of each version, the versions alternating, is what is printed): rerun before trusting a few percent.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace base_avx2 {
#define QK_ISA 1
#include QK_BASE
#undef QK_ISA
}  // namespace base_avx2
namespace cand_avx2 {
#define QK_ISA 1
#include QK_CAND
#undef QK_ISA
}  // namespace cand_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace base_avx512 {
#define QK_ISA 2
#include QK_BASE
#undef QK_ISA
}  // namespace base_avx512
namespace cand_avx512 {
#define QK_ISA 2
#include QK_CAND
#undef QK_ISA
}  // namespace cand_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace base_vnni {
#define QK_ISA 3
#include QK_BASE
#undef QK_ISA
}  // namespace base_vnni
namespace cand_vnni {
#define QK_ISA 3
#include QK_CAND
#undef QK_ISA
}  // namespace cand_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
namespace base_bf16 {
#define QK_ISA 3
#define QK_BF16 1
#include QK_BASE
#undef QK_BF16
#undef QK_ISA
}  // namespace base_bf16
namespace cand_bf16 {
#define QK_ISA 3
#define QK_BF16 1
#include QK_CAND
#undef QK_BF16
#undef QK_ISA
}  // namespace cand_bf16
#pragma GCC pop_options

namespace {

using TileFn = void (*)(int, bool, int, const uint8_t*, const void*, const void*, int64_t, int64_t, int64_t,
                        const void*, int64_t, const float*, const float*, int64_t, float*);
using QuantizeFn = void (*)(const void*, int, int64_t, int64_t, int64_t, int, int8_t*, float*, int64_t, float*,
                           int64_t, float*);

struct Version {
  TileFn tile;
  QuantizeFn quantize_rows;
};

struct Set {
  const char* name;
  bool (*available)();
  Version base, cand;
  bool bf16;  // takes bfloat16 pair products (kBf16Tiles)
};

const Set kSets[] = {
    {"avx512_bf16", [] { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16"); },
     {&base_bf16::tile, &base_bf16::quantize_rows}, {&cand_bf16::tile, &cand_bf16::quantize_rows}, true},
    {"avx512_vnni", [] { return __builtin_cpu_supports("avx512vnni") != 0; },
     {&base_vnni::tile, &base_vnni::quantize_rows}, {&cand_vnni::tile, &cand_vnni::quantize_rows}, false},
    {"avx512", [] { return __builtin_cpu_supports("avx512bw") != 0; },
     {&base_avx512::tile, &base_avx512::quantize_rows}, {&cand_avx512::tile, &cand_avx512::quantize_rows}, false},
    {"avx2", [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); },
     {&base_avx2::tile, &base_avx2::quantize_rows}, {&cand_avx2::tile, &cand_avx2::quantize_rows}, false},
};

struct Case {
  const char* name;
  int bits;
  int64_t n, k;
  bool mins;
};

const Case kCases[] = {
    {"gate_up Q4_1", 4, 3072, 576, true},
    {"down Q4_1", 4, 576, 1536, true},
    {"head Q8_0", 8, 8192, 576, false},
};

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

uint16_t half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  // float16 of a normal value in range, round to nearest even (the scales here are far from float16's limits)
  const uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7FFFFF;
  const int32_t e = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(sign);
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// One case's packed weight and bfloat16 activations (random, fixed seed), as quant.cpp lays them out.
struct Data {
  int64_t tiles, kp, nb, bb;
  std::vector<uint8_t> q;
  std::vector<uint16_t> scales, mins, x;
  Data(const Case& c, int64_t rows) {
    tiles = (c.n + 15) / 16;
    kp = (c.k + 31) / 32 * 32;
    nb = kp / 32;
    bb = 16 * 32 * c.bits / 8;
    std::mt19937 g(17);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    q.resize(tiles * nb * bb);
    for (auto& b : q) b = static_cast<uint8_t>(g());
    scales.resize(tiles * nb * 16);
    mins.resize(tiles * nb * 16);
    for (auto& s : scales) s = half_bits(0.01f + 0.01f * std::fabs(u(g)));
    for (auto& m : mins) m = half_bits(0.1f * u(g));
    x.resize(rows * c.k);
    for (auto& v : x) {
      const float f = u(g);
      uint32_t b;
      std::memcpy(&b, &f, 4);
      v = static_cast<uint16_t>(b >> 16);
    }
  }
};

// y (rows, n) = x W^T through one version's quantize_rows and tile kernels, as quant.cpp's quant_linear calls them
// (one thread); returns the least thread CPU time of `rounds` runs.
double run(const Version& v, const Case& c, const Data& d, int mode, int64_t rows, int rounds, std::vector<float>& y) {
  const int64_t terms = mode == base_bf16::kBf16Tiles ? 1 : std::max(mode, 1), R = rows * terms, pass = 16 * terms;
  const int64_t Rp = mode > 0 ? (R + pass - 1) / pass * pass : R;
  std::vector<int8_t> xq(mode > 0 ? Rp * d.kp * 2 : 0);
  std::vector<float> xf(mode > 0 ? 0 : rows * d.kp), dx(Rp * d.nb * 2), sx16(Rp * 2 * d.nb), out(R * 16);
  y.assign(rows * c.n, 0.f);
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const double t0 = thread_seconds();
    v.quantize_rows(d.x.data(), 1, c.k, rows, c.k, mode, mode > 0 ? xq.data() : nullptr,
                    mode > 0 ? nullptr : xf.data(), d.kp, mode > 0 ? dx.data() : nullptr, 2 * Rp, sx16.data());
    for (int64_t t = 0; t < d.tiles; ++t) {
      v.tile(c.bits, true, mode, d.q.data() + t * d.nb * d.bb, d.scales.data() + t * d.nb * 16,
             c.mins ? d.mins.data() + t * d.nb * 16 : nullptr, d.nb, 1, R,
             mode > 0 ? static_cast<const void*>(xq.data()) : static_cast<const void*>(xf.data()), d.kp,
             mode > 0 ? dx.data() : nullptr, sx16.data(), d.nb, out.data());
      const int64_t cols = std::min<int64_t>(16, c.n - t * 16);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < cols; ++j)
          y[m * c.n + t * 16 + j] = out[m * terms * 16 + j] + (terms == 2 ? out[m * terms * 16 + 16 + j] : 0.f);
    }
    best = std::min(best, thread_seconds() - t0);
  }
  return best;
}

// The dot-product instructions' rate on this core, for the kernels' GFLOP/s to be read against: 16 rows' independent
// accumulators against 16 weight vectors, the activations broadcast from memory (the tile kernels' inner loop
// without their scaling and widening). 16 chains hide the instructions' latency (with 8, vdpbf16ps ran at its
// latency on the AMD EPYC: 4.5 G/s against 6.5). Returns instructions per second.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")
alignas(64) int32_t g_x[16][16];
alignas(64) int32_t g_w[16][16];
template <bool BF16>
__attribute__((noinline)) double dot_rate() {
  constexpr long kIters = 400000;
  __m512i w[16];
  for (int p = 0; p < 16; ++p) w[p] = _mm512_load_si512(g_w[p]);
  __m512 af[16];
  __m512i ai[16];
  for (int m = 0; m < 16; ++m) {
    af[m] = _mm512_setzero_ps();
    ai[m] = _mm512_setzero_si512();
  }
  const double t0 = thread_seconds();
  for (long i = 0; i < kIters; ++i) {
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p)
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m) {
        if constexpr (BF16)
          af[m] = _mm512_dpbf16_ps(af[m], reinterpret_cast<__m512bh>(_mm512_set1_epi32(g_x[m][p])),
                                   reinterpret_cast<__m512bh>(w[p]));
        else
          ai[m] = _mm512_dpbusd_epi32(ai[m], w[p], _mm512_set1_epi32(g_x[m][p]));
      }
    asm volatile("" : : "r"(g_x) : "memory");  // the activations may change: reload them every pass
  }
  const double t = thread_seconds() - t0;
  float sink = 0;
  for (int m = 0; m < 16; ++m)
    sink += _mm512_reduce_add_ps(af[m]) + static_cast<float>(_mm512_reduce_add_epi32(ai[m]));
  asm volatile("" : : "x"(sink));
  return kIters * 256.0 / t;
}
#pragma GCC pop_options

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  if (__builtin_cpu_supports("avx512vnni")) {
    const double r = dot_rate<false>();
    std::printf("vpdpbusd (512-bit): %.2f G/s, %.0f GOP/s (the ceiling of one int8 term, 64 products an "
                "instruction; two terms: half)\n", r * 1e-9, r * 128e-9);
  }
  if (__builtin_cpu_supports("avx512bf16")) {
    const double r = dot_rate<true>();
    std::printf("vdpbf16ps (512-bit): %.2f G/s, %.0f GFLOP/s (the ceiling of bfloat16 pair products, 32 an "
                "instruction)\n", r * 1e-9, r * 64e-9);
  }
  std::printf("%-12s %-13s %-5s %4s %12s %9s %12s %9s %7s %s\n", "set", "case", "mode", "rows", "base us", "GFLOP/s",
              "cand us", "GFLOP/s", "speedup", "max|diff| / max|y|");
  for (const Set& s : kSets) {
    if (!s.available()) {
      std::printf("%-12s (this CPU lacks it)\n", s.name);
      continue;
    }
    for (const Case& c : kCases)
      for (int64_t rows : {1, 16}) {
        const Data d(c, rows);
        for (int mode : {0, 1, 2, base_bf16::kBf16Tiles}) {
          if (mode == base_bf16::kBf16Tiles && !(s.bf16 && c.bits == 4 && rows >= base_bf16::kAmxRows)) continue;
          std::vector<float> yb, yc;
          double tb = 1e30, tc = 1e30;
          for (int a = 0; a < 2; ++a) {  // alternate, so a slow spell of a shared machine hits both
            tb = std::min(tb, run(s.base, c, d, mode, rows, rounds, yb));
            tc = std::min(tc, run(s.cand, c, d, mode, rows, rounds, yc));
          }
          double diff = 0, ymax = 0;
          for (size_t i = 0; i < yb.size(); ++i) {
            diff = std::max(diff, static_cast<double>(std::fabs(yb[i] - yc[i])));
            ymax = std::max(ymax, static_cast<double>(std::fabs(yb[i])));
          }
          const double flop = 2.0 * rows * c.n * c.k;
          static const char* kModes[] = {"float", "int8", "int8x2", "bf16"};
          std::printf("%-12s %-13s %-5s %4ld %12.1f %9.1f %12.1f %9.1f %7.2f %.2e / %.2e\n", s.name, c.name,
                      kModes[mode], static_cast<long>(rows), tb * 1e6, flop / tb * 1e-9, tc * 1e6, flop / tc * 1e-9,
                      tb / tc, diff, ymax);
        }
      }
  }
  return 0;
}
