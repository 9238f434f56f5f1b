"""``tritium info``: this machine, torch, triton and tritium (what every benchmark result records), then the CPU
path each C++ kernel family takes here."""
from __future__ import annotations

from .errors import ArgumentParser


def main(argv) -> int:
    p = ArgumentParser(prog="tritium info", description=__doc__.splitlines()[0])
    p.add_argument("--kind", action="store_true",
                   help="print only this machine's kind (e.g. intel-amx), the suffix of its recorded result files")
    args = p.parse_args(argv)
    import torch

    import tritium
    from ..bench.common import cpu_model, machine_info
    from ..utils import cpu_paths, machine_kind

    if args.kind:
        print(machine_kind(cpu_model()))
        return 0

    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    info["backend"] = tritium.get_backend()
    for k, v in info.items():
        print(f"{k:22s} {v}")
    print("CPU kernel paths")
    paths = cpu_paths()
    width = max(map(len, paths), default=0)
    for case, path in sorted(paths.items()):
        print(f"  {case:{width}s}  {path}")
    return 0
