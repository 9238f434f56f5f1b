"""Timing, machine facts and reporting shared by every bench suite."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import statistics
from typing import List, Optional

import torch

# shared with the command line: they live in the neutral tritium.utils
from ..utils import copy_bandwidth, cpu_features, dtype_name, machine_kind, parse_dtype, time_fn  # noqa: F401


# How glibc's malloc treats large freed blocks while a suite runs (`tritium bench --malloc`). Under glibc's defaults
# a block above the mmap threshold (dynamic, at most 32 MiB) is mapped fresh on every allocation and unmapped when
# freed, so an eager or compiled call with 32-64 MiB outputs or temporaries pays the OS's zeroing of fresh pages on
# every call, while tritium's outputs come from its own pool (csrc/pool.cpp); a long process whose heap has grown
# serves the same allocations from the heap instead. "retain" (the default) makes every side reuse freed memory, so
# ratios measure the kernels and not the allocator's state; "default" leaves glibc as it starts.
MALLOC_MODES = ("retain", "default")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
_RETAIN = 2 ** 31 - 1                            # mallopt takes an int: the largest threshold it can express
_malloc = {"mode": "default"}


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (AttributeError, OSError):   # not glibc (no mallopt): the allocator stays as it is
        return False


def _apply(mode: str) -> bool:
    """Set both thresholds for `mode`: retain, the largest; default, glibc's initial ones (fixed rather than
    dynamic once set). False where mallopt is unavailable."""
    value = _RETAIN if mode == "retain" else 128 << 10
    return _mallopt(_M_MMAP_THRESHOLD, value) and _mallopt(_M_TRIM_THRESHOLD, value)


def set_malloc(mode: str) -> str:
    """Put glibc's malloc in one of MALLOC_MODES for the rest of the process; returns the mode in effect ("default"
    where mallopt is unavailable). Recorded by machine_info()."""
    if mode not in MALLOC_MODES:
        raise ValueError(f"malloc mode: expected one of {', '.join(MALLOC_MODES)}, got {mode!r}")
    if mode == "retain" and _apply("retain"):
        _malloc["mode"] = "retain"
    elif mode == "default" and _malloc["mode"] == "retain":   # never touched otherwise: glibc as it starts
        _apply("default")
        _malloc["mode"] = "default"
    return _malloc["mode"]


@contextlib.contextmanager
def released_memory():
    """Within the block, freed memory goes back to the OS at once and tritium's output pool is off, so the resident
    set's high-water mark counts every byte a call allocates (peak-memory measurements); restores the suite's malloc
    mode and the pool's limit on exit."""
    import tritium

    limit = tritium.pool_stats()["limit_bytes"]
    tritium.set_pool_limit(0)
    _mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    _mallopt(_M_TRIM_THRESHOLD, 0)
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
    try:
        yield
    finally:
        tritium.set_pool_limit(limit)
        _apply(_malloc["mode"])


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    info = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "copy_bandwidth_GBps": round(copy_bandwidth(device) / 1e9, 2),
        "malloc": _malloc["mode"],
    }
    import tritium  # the C++ extension the CPU queries below ask

    info["machine_kind"] = machine_kind(info["cpu"])
    info["cpu_features"] = " ".join(cpu_features())
    info["kernel_width"] = tritium._kernels.WIDTH  # the build of the C++ kernels imported (tritium/_kernels.py)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["tritium"] = tritium.__version__
    return info


def write_json(path: str, machine: dict, rows: List[dict], extra: Optional[dict] = None) -> None:
    payload = {"machine": machine, "rows": rows}
    if extra:
        payload.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def geomean(xs: List[float]) -> float:
    xs = [x for x in xs if x and x > 0]
    return statistics.geometric_mean(xs) if xs else float("nan")
