"""``tritium bench | generate | chat | info``."""
from __future__ import annotations

import argparse
import importlib
import sys


def _bench(argv):
    from .bench import SUITES

    p = argparse.ArgumentParser(prog="tritium bench", description="benchmarks: tritium vs eager vs torch.compile")
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


def _info(argv):
    import torch

    import tritium
    from .bench.common import machine_info

    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    info["backend"] = tritium.get_backend()
    for k, v in info.items():
        print(f"{k:22s} {v}")


COMMANDS = {
    "bench": _bench,
    "info": _info,
}


def _lazy(module_name):
    def run(argv):
        return importlib.import_module(module_name).main(argv)
    return run


# generate/chat live with the models (tritium.models.cli); registered lazily so `tritium info` stays light.
COMMANDS["generate"] = _lazy("tritium.models.cli_generate")
COMMANDS["chat"] = _lazy("tritium.models.cli_chat")
COMMANDS["train"] = _lazy("tritium.models.train")  # classic models on the digits (needs .[train])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: tritium {" + ",".join(COMMANDS) + "} ...")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
