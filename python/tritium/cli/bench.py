"""``tritium bench [suite] ...``: the benchmark suites of tritium.bench (ops when no suite is named)."""
from __future__ import annotations

import importlib

from .errors import ArgumentParser


def main(argv) -> int:
    from ..bench import SUITES
    from ..bench.common import MALLOC_MODES, set_malloc

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
        sp.add_argument("--malloc", choices=MALLOC_MODES, default="retain",
                        help="retain (default): glibc keeps freed memory for reuse, so no side pays fresh pages "
                             "per call; default: glibc as it starts (large blocks mapped and unmapped each call)")
    if not argv or argv[0] not in modules and not argv[0].startswith("-h"):
        argv = ["ops"] + list(argv)  # `tritium bench [--op ...]` means the ops suite
    args = p.parse_args(argv)
    set_malloc(args.malloc)
    modules[args.suite].run(args)
    return 0
