"""``tritium bench [suite] ...``: the benchmark suites of tritium.bench (ops when no suite is named)."""
from __future__ import annotations

import importlib

from .errors import ArgumentParser


def main(argv) -> int:
    from ..bench import SUITES

    p = ArgumentParser(prog="tritium bench", description="benchmarks: tritium vs eager vs torch.compile")
    sub = p.add_subparsers(dest="suite")
    modules = {}
    for name, module_name in SUITES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        modules[name] = module
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None)
        module.add_arguments(sp)
    if not argv or argv[0] not in modules and not argv[0].startswith("-h"):
        argv = ["ops"] + list(argv)  # `tritium bench [--op ...]` means the ops suite
    args = p.parse_args(argv)
    modules[args.suite].run(args)
    return 0
