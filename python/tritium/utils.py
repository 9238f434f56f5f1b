"""Small helpers shared by the command line (tritium.cli) and the benchmarks (tritium.bench): dtype names, a
timing loop and the machine's copy bandwidth. Imports nothing else of tritium, so either side can use it."""
from __future__ import annotations

import functools
import time
from typing import Callable, Dict

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from its name ("float32", "bf16", ...)."""
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def time_fn(fn: Callable[[], object], min_run_time: float = 0.5, device: str = "cpu") -> float:
    """Median seconds per call: torch.utils.benchmark on CPU, triton.testing.do_bench on GPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    from torch.utils import benchmark

    start = time.perf_counter()
    fn()  # warm-up (first-call allocations, lazy imports)
    first = time.perf_counter() - start
    if first > max(1.0, min_run_time):
        # a call of seconds (an O(L^2) reference): blocked_autorange would spend two more calls sizing and timing
        # its block; one more call, timed alone, is the measurement
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    # every core, as the user's process runs (torch.utils.benchmark.Timer defaults to ONE thread)
    m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """This machine's measured copy bandwidth in bytes/s (read + write of a preallocated 256 MiB buffer), measured
    once per process and device."""
    if device not in _COPY_BW:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), min_run_time=0.5, device=device)
        _COPY_BW[device] = 2 * nbytes / t
    return _COPY_BW[device]


def cpu_features() -> list:
    """The CPU features tritium's kernels may use on this machine, by name (avx2, avx512, avx512_vnni, avx512_bf16,
    avx512_fp16, amx_bf16, amx_int8; intel: MKL's tuned kernels apply): csrc/cpu.h's run-time detection (torch's
    cpuinfo, AMX only with the OS's permission), less what TRITIUM_CPU_DISABLE hides."""
    return list(torch.ops.tritium_runtime.cpu_features())


_PY_PATHS: Dict[str, Callable[[], str]] = {}


def register_cpu_path(case: str, path: Callable[[], str]) -> None:
    """A choice made in Python by CPU (an op family picking torch's kernel or its own), reported by cpu_paths."""
    _PY_PATHS[case] = path


def cpu_paths() -> Dict[str, str]:
    """The path each kernel family takes on this machine's CPU, e.g. {"attention.bfloat16": "brgemm (oneDNN, AMX)"}:
    the C++ families' (csrc/cpu.h) and the choices registered in Python (register_cpu_path)."""
    paths = dict(p.split("=", 1) for p in torch.ops.tritium_runtime.cpu_paths())
    paths.update((case, fn()) for case, fn in _PY_PATHS.items())
    return paths


@functools.lru_cache(maxsize=None)
def cpu_has(feature: str) -> bool:
    """Whether cpu_features() lists feature (cached: the features are fixed for the process)."""
    return feature in cpu_features()


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 dot products or AMX tiles): the instructions
    tritium's and oneDNN's bfloat16 kernels use; without them bfloat16 products convert every element to float and
    gain nothing over float32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()))


def machine_kind(cpu_model: str) -> str:
    """A short name of this kind of machine for per-machine result files: the vendor and the widest matrix
    instructions, e.g. "amd-avx512", "intel-amx"."""
    vendor = next((v for v in ("amd", "intel", "arm") if v in cpu_model.lower()), "cpu")
    feats = set(cpu_features())
    tier = "amx" if "amx_bf16" in feats else "avx512" if "avx512" in feats else "avx2" if "avx2" in feats else "base"
    return f"{vendor}-{tier}"


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS of /proc/self/status; 0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_MADV_HUGEPAGE = 14   # Linux's madvise advice number
_HUGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of nbytes starting on a 2 MiB boundary, advised to the OS as transparent-huge-page
    memory (madvise MADV_HUGEPAGE; where there is no such call it is an ordinary buffer). Weights streamed once per
    step read faster from it: one TLB entry covers 2 MiB instead of 4 KiB, so a 100 MB stream walks the page
    tables some fifty times instead of some twenty-five thousand."""
    import ctypes

    raw = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE
    buf = raw[start:start + nbytes]
    try:
        libc = ctypes.CDLL(None)
        libc.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(-(-nbytes // _HUGE) * _HUGE), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
    return buf
