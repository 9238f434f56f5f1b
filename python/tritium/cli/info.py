"""``tritium info``: this machine, torch, triton and tritium (what every benchmark result records)."""
from __future__ import annotations

from .errors import ArgumentParser


def main(argv) -> int:
    ArgumentParser(prog="tritium info", description=__doc__.splitlines()[0]).parse_args(argv)
    import torch

    import tritium
    from ..bench.common import machine_info

    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    info["backend"] = tritium.get_backend()
    for k, v in info.items():
        print(f"{k:22s} {v}")
    return 0
