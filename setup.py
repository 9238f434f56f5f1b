"""Builds the C++ CPU kernels (csrc/*.cpp) with torch's cpp_extension, once per vector width.

On x86-64 the sources compile twice, into tritium._C_avx512 (AVX-512 F/BW/VL/DQ) and tritium._C_avx2 (AVX2, FMA,
F16C), whatever the build machine has; tritium/_kernels.py imports the widest one the running CPU can execute. Other
machines build tritium._C_default (ATen's portable vectors). Instructions beyond a module's width (VNNI, BF16,
AMX) are chosen inside it at run time (csrc/cpu.h). TRITIUM_CPU_CAPABILITY=AVX512|AVX2|DEFAULT builds that one
module only: a developer's faster rebuild on a machine of that width.
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


def _capabilities() -> list:
    forced = os.environ.get("TRITIUM_CPU_CAPABILITY")
    if forced:
        if forced.upper() not in _CAPABILITY_FLAGS:
            raise SystemExit(f"TRITIUM_CPU_CAPABILITY must be one of {', '.join(_CAPABILITY_FLAGS)}, got {forced!r}")
        return [forced.upper()]
    if platform.machine() in ("x86_64", "AMD64"):
        return ["AVX512", "AVX2"]
    return ["DEFAULT"]


def _extension(cap: str) -> CppExtension:
    flags = ["-O3", "-g0", "-fopenmp", "-std=c++20", f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return CppExtension(
        f"tritium._C_{cap.lower()}",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": flags + _CAPABILITY_FLAGS[cap]},
        extra_link_args=["-fopenmp"],
    )


class _BuildExtension(BuildExtension):
    """torch's build_ext with one temporary directory per extension: the widths compile the same sources with
    different flags, and shared object paths would make every rebuild recompile both."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    ext_modules=[_extension(cap) for cap in _capabilities()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
