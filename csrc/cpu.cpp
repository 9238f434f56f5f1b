// csrc/cpu.h: run-time CPU features and the kernel paths each family takes, reported to Python as
// torch.ops.tritium_runtime.cpu_features() and cpu_paths() (printed by `tritium info`).
#include "cpu.h"

#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <sstream>

namespace tritium::cpu {
namespace {

// Every feature by name, in Features' order: what TRITIUM_CPU_DISABLE takes and cpu_features() reports
constexpr std::pair<const char*, bool Features::*> kFields[] = {
    {"avx2", &Features::avx2},         {"avx512", &Features::avx512},     {"avx512_vnni", &Features::avx512_vnni},
    {"avx512_bf16", &Features::avx512_bf16}, {"avx512_fp16", &Features::avx512_fp16},
    {"amx_bf16", &Features::amx_bf16}, {"amx_int8", &Features::amx_int8}, {"intel", &Features::intel}};

bool flag(const std::unordered_map<std::string, c10::IValue>& caps, const char* name) {
  auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// The names TRITIUM_CPU_DISABLE lists ("all": every feature).
std::vector<std::string> disabled() {
  std::vector<std::string> out;
  const char* env = std::getenv("TRITIUM_CPU_DISABLE");
  if (!env) return out;
  std::stringstream ss(env);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(_M_X64)
  const auto caps = at::cpu::get_cpu_capabilities();
  f.avx2 = flag(caps, "avx2") && flag(caps, "fma3") && flag(caps, "f16c");
  f.avx512 = flag(caps, "avx512_f") && flag(caps, "avx512_bw") && flag(caps, "avx512_vl") && flag(caps, "avx512_dq");
  f.avx512_vnni = f.avx512 && flag(caps, "avx512_vnni");
  f.avx512_bf16 = f.avx512 && flag(caps, "avx512_bf16");
  f.avx512_fp16 = f.avx512 && flag(caps, "avx512_fp16");
  const bool tiles = flag(caps, "amx_tile") && (flag(caps, "amx_bf16") || flag(caps, "amx_int8"));
  const bool permitted = tiles && at::cpu::init_amx();
  f.amx_bf16 = permitted && flag(caps, "amx_bf16");
  f.amx_int8 = permitted && flag(caps, "amx_int8");
  f.intel = __builtin_cpu_is("intel");
#endif
  for (const std::string& name : disabled()) {
    bool known = name == "all";
    std::string names;
    for (const auto& [n, field] : kFields) {
      if (name == "all" || name == n) {
        f.*field = false;
        known = true;
      }
      names += std::string(n) + ", ";
    }
    TORCH_CHECK(known, "TRITIUM_CPU_DISABLE: unknown feature '", name, "'; expected a comma-separated list of ",
                names, "or all");
  }
  // a feature needs the ones it extends; a build narrower than AVX-512 (tritium._C_avx2) holds no AVX-512 code
  if (!f.avx2) f.avx512 = false;
#if !defined(CPU_CAPABILITY_AVX512)
  f.avx512 = f.amx_bf16 = f.amx_int8 = false;
#endif
  if (!f.avx512) f.avx512_vnni = f.avx512_bf16 = f.avx512_fp16 = false;
  return f;
}

std::mutex g_mu;
std::vector<PathReporter>& reporters() {
  static std::vector<PathReporter> r;
  return r;
}

}  // namespace

const Features& features() {
  static const Features f = detect();
  return f;
}

std::vector<std::pair<std::string, bool>> feature_list() {
  const Features& f = features();
  std::vector<std::pair<std::string, bool>> out;
  for (const auto& [name, field] : kFields) out.emplace_back(name, f.*field);
  return out;
}

bool register_paths(PathReporter reporter) {
  std::lock_guard<std::mutex> lock(g_mu);
  reporters().push_back(reporter);
  return true;
}

TORCH_LIBRARY_FRAGMENT(tritium_runtime, m) {
  // the features this process uses, "name" for each one present
  m.def("cpu_features() -> str[]", [] {
    std::vector<std::string> out;
    for (const auto& [name, on] : feature_list())
      if (on) out.push_back(name);
    return out;
  });
  // "case=path" for every case a family reported
  m.def("cpu_paths() -> str[]", [] {
    std::vector<std::string> out;
    std::lock_guard<std::mutex> lock(g_mu);
    for (PathReporter r : reporters())
      for (const auto& [what, path] : r()) out.push_back(what + "=" + path);
    return out;
  });
}

}  // namespace tritium::cpu
