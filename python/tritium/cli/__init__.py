"""The ``tritium`` command: ``tritium bench | generate | chat | train | info``.

One module per command (``tritium.cli.<command>``, each with ``main(argv)``), imported only when that command
runs, so ``tritium info`` does not load the model code and ``tritium generate`` does not load the benchmarks.
"""
from __future__ import annotations

import importlib
import sys

# command -> its one-line description (the module tritium.cli.<command> runs it)
COMMANDS = {
    "bench": "benchmarks: tritium vs eager vs torch.compile",
    "generate": "stream a completion from the embedded SmolLM2-135M-Instruct (or --model)",
    "chat": "an interactive chat with the embedded model",
    "train": "train a classic model on scikit-learn's digits (needs .[train])",
    "info": "this machine, torch, triton and tritium",
}


def _usage() -> str:
    return "usage: tritium {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
        f"  {name:9s} {text}" for name, text in COMMANDS.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"tritium: unknown command {argv[0]!r}\n{_usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"tritium.cli.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
