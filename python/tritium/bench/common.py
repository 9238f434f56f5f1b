"""Timing, machine facts and reporting shared by every bench suite."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from typing import Callable, Dict, List, Optional

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
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

    fn()  # warm-up (first-call allocations, lazy imports)
    # every core, as the user's process runs (torch.utils.benchmark.Timer defaults to ONE thread)
    m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """This machine's measured copy bandwidth in bytes/s (read + write of a preallocated 256 MiB buffer)."""
    if device not in _COPY_BW:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), min_run_time=0.5, device=device)
        _COPY_BW[device] = 2 * nbytes / t
    return _COPY_BW[device]


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
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    import tritium

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
