"""Builds the C++ CPU kernels (csrc/*.cpp) into tritium._C with torch's cpp_extension.

The vector width follows the build machine (source builds, as llama.cpp does): AVX-512 where the CPU has it,
else AVX2, else ATen's portable vectors. TRITIUM_CPU_CAPABILITY=AVX512|AVX2|DEFAULT overrides the detection.
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def _cpu_capability() -> str:
    forced = os.environ.get("TRITIUM_CPU_CAPABILITY")
    if forced:
        return forced.upper()
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "DEFAULT"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


cap = _cpu_capability()
cxx_flags = ["-O3", "-fopenmp", "-std=c++20", f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
cxx_flags += _CAPABILITY_FLAGS[cap]

setup(
    ext_modules=[
        CppExtension(
            "tritium._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
