"""Timing, machine facts and reporting shared by every bench suite."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from typing import List, Optional

import torch

# shared with the command line: they live in the neutral tritium.utils
from ..utils import copy_bandwidth, cpu_features, dtype_name, machine_kind, parse_dtype, time_fn  # noqa: F401


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
