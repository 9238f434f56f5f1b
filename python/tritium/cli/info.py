"""``tritium info``: this machine, torch, triton and tritium (what every benchmark result records), then the CPU
path each C++ kernel family takes here."""
from __future__ import annotations

from .errors import ArgumentParser


def main(argv) -> int:
    ArgumentParser(prog="tritium info", description=__doc__.splitlines()[0]).parse_args(argv)
    import torch

    import tritium
    from ..bench.common import machine_info
    from ..utils import cpu_paths

    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    info["backend"] = tritium.get_backend()
    for k, v in info.items():
        print(f"{k:22s} {v}")
    print("CPU kernel paths")
    for case, path in sorted(cpu_paths().items()):
        print(f"  {case:20s} {path}")
    return 0
