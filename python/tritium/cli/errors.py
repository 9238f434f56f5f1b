"""How every ``tritium`` command reports a user's mistake: one line on stderr, ``tritium: error: ...``.

Exit status 2 for a bad command line (argparse's own errors, the ``number`` argument types, ``UsageError``), 1 for
a failure while running (a missing or broken model file, a missing optional package, ...), 130 on Ctrl-C. The
traceback is printed only with ``--debug`` or ``TRITIUM_DEBUG=1`` (``run``). Commands check their arguments in
``type=`` functions or right after parsing, so a bad command line fails before any model is loaded.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional

from .._args import comma_list, number, validated  # noqa: F401  (the argument types every command uses)

DEBUG_HELP = "--debug (anywhere before a --) or TRITIUM_DEBUG=1: print the full traceback of an error"

# the optional package a missing module comes with: pip install 'tritium[<extra>]'
_EXTRAS = {"sklearn": "train", "gguf": "llm", "tokenizers": "llm", "safetensors": "llm", "jinja2": "llm",
           "matplotlib": "bench", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
           "openai": "serve", "httpx": "serve"}


class UsageError(Exception):
    """A bad command line found after parsing (an empty prompt, conflicting flags): exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line (``UsageError``) instead of the usage and a message; the
    help's epilog says how to see a traceback. Sub-parsers (add_subparsers) are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", DEBUG_HELP)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # "argument --top-k: must be ..." -> "--top-k: must be ..."
        raise UsageError(f"{re.sub(r'^argument ', '', message)} (see {self.prog} --help)")


def _one_line(e: BaseException) -> str:
    """The exception as one line: its message with whitespace runs (newlines included) folded to a space; a
    missing module says which extra installs it; an exception a user's mistake does not raise is named, with the
    way to see its traceback."""
    text = " ".join(str(e).split())
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in _EXTRAS:
        return f"{text} (pip install 'tritium[{_EXTRAS[e.name.split('.')[0]]}]')"
    if isinstance(e, (UsageError, ValueError, OSError, ImportError)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text} ({DEBUG_HELP})"


def run(command: Callable[[], Optional[int]], debug: bool) -> int:
    """command()'s exit status (None: 0), with any exception reported as one line on stderr: status 2 for a
    UsageError, 1 for anything else, 130 for Ctrl-C. debug: a failure (not a usage error) re-raises instead, so
    Python prints its traceback."""
    try:
        return command() or 0
    except UsageError as e:
        status = 2
        err: BaseException = e
    except KeyboardInterrupt:
        if debug:
            raise
        print(file=sys.stderr)   # end the line ^C was echoed on
        return 130
    except Exception as e:
        if debug:
            raise
        status, err = 1, e
    sys.stdout.flush()
    print(f"tritium: error: {_one_line(err)}", file=sys.stderr)
    return status
