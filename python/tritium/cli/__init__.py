"""The ``tritium`` command: ``tritium bench | generate | chat | serve | train | finetune | info``.

One module per command (``tritium.cli.<command>``, each with ``main(argv)``), imported only when that command
runs, so ``tritium info`` does not load the model code and ``tritium generate`` does not load the benchmarks.
Every command runs through ``errors.run``: a user's mistake is one line on stderr, ``tritium: error: ...``, with
exit status 2 (bad command line) or 1 (failure while running); ``--debug`` or TRITIUM_DEBUG=1 shows tracebacks.
"""
from __future__ import annotations

import importlib
import os
import sys

from .errors import DEBUG_HELP, UsageError, run

# command -> its one-line description (the module tritium.cli.<command> runs it)
COMMANDS = {
    "bench": "benchmarks: tritium vs eager vs torch.compile",
    "generate": "stream a completion from the embedded SmolLM2-135M-Instruct (or --model)",
    "chat": "an interactive chat with the embedded model",
    "serve": "an OpenAI-compatible HTTP server for the embedded model (needs .[serve])",
    "train": "train a classic model on scikit-learn's digits (needs .[train]) or a byte LM (mamba, rwkv, gpt)",
    "finetune": "LoRA fine-tuning of the embedded model on chat or prompt/completion JSON Lines",
    "info": "this machine, torch, triton and tritium",
}


def _usage() -> str:
    return "usage: tritium [--debug] {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
        f"  {name:9s} {text}" for name, text in COMMANDS.items()) + f"\n\n{DEBUG_HELP}"


def _command(argv) -> int:
    if argv[0] not in COMMANDS:
        raise UsageError(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    return importlib.import_module(f"tritium.cli.{argv[0]}").main(argv[1:])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is taken out wherever it stands before a "--" (after it, it is a command's argument, e.g. a prompt)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("TRITIUM_DEBUG", "") not in ("", "0")
    argv = [a for i, a in enumerate(argv) if a != "--debug" or i >= end]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    return run(lambda: _command(argv), debug)


if __name__ == "__main__":
    sys.exit(main())
