// What this CPU can do, detected once at run time, and the one place every kernel family asks which instructions
// it may use. The build compiles each path (target attributes, per-ISA namespaces); features() picks among them on
// the machine the code runs on, never on what the build machine had.
//
// Detection is torch's (cpuinfo, through at::cpu::get_cpu_capabilities); AMX also needs the OS's permission to use
// the tile data, requested through at::cpu::init_amx. TRITIUM_CPU_DISABLE=amx_bf16,avx512_bf16,... hides features
// by name ("all" hides every one): the paths of a lesser CPU, testable on a better one. Read once, at the first call.
#pragma once
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__)
// A function compiled for AVX512-BF16 whatever the build's flags (an AVX-512 build must still run on CPUs without it):
// called only where features().avx512_bf16 holds.
#define TRITIUM_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace tritium::cpu {

struct Features {
  bool avx2 = false;         // with FMA and F16C
  bool avx512 = false;       // F, BW, VL and DQ
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool amx_bf16 = false;     // AMX tiles with bfloat16 products (and the OS's permission)
  bool amx_int8 = false;
  // An Intel CPU: MKL, the BLAS libtorch ships with, runs its tuned kernels here (on other vendors' CPUs it takes
  // generic paths), so a family choosing between MKL and a kernel of its own asks this.
  bool intel = false;
};

const Features& features();

// (name, value) of every feature, in the order above: what `tritium info` prints.
std::vector<std::pair<std::string, bool>> feature_list();

// A kernel family reports the path it takes for each case (e.g. "attention.bfloat16" -> "brgemm (oneDNN, AMX)")
// by registering a reporter at load: `tritium info` prints them all (torch.ops.tritium_runtime.cpu_paths).
using PathReporter = std::vector<std::pair<std::string, std::string>> (*)();
bool register_paths(PathReporter reporter);

}  // namespace tritium::cpu
