"""argparse types shared by the command line (tritium.cli) and the benchmark suites (tritium.bench), which may not
import each other's modules: a bad value is an ArgumentTypeError saying what was expected and what came, which
the parser reports as one line with exit status 2 (tritium.cli.errors). Imports nothing (cheap at start-up)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional, Sequence


def number(kind: type, low: float, high: Optional[float] = None, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite int (kind=int) or float in [low, high] ((low, high] with low_open; no upper
    bound when high is None). A bad value is an ArgumentTypeError saying what was expected and what was given."""
    what = "an integer" if kind is int else "a number"
    if high is not None:
        want = f"{what} in {'(' if low_open else '['}{low}, {high}]"
    else:
        want = f"{what} {'>' if low_open else '>='} {low}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if (kind is float and not math.isfinite(v)) or v < low or (low_open and v == low) or \
                (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v

    return parse


def comma_list(item: Callable[[str], object] = str, choices: Optional[Sequence[str]] = None) -> Callable[[str], list]:
    """An argparse ``type``: a non-empty comma-separated list, each item parsed by ``item`` (e.g. number(int, 1))
    or one of ``choices``."""

    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"takes {', '.join(choices)}, got {bad[0]!r}")
        return [item(x) for x in items]

    return parse


def validated(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse ``type`` that runs ``check`` on the text (a ValueError becomes the one-line usage error) and
    keeps the text as given."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse
