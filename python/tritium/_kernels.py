"""Imports the build of the C++ CPU kernels this CPU runs: setup.py compiles them once per vector width
(tritium._C_avx512, tritium._C_avx2; tritium._C_default off x86-64), and the widest one the CPU executes, less
the widths TRITIUM_CPU_DISABLE hides, is the one imported (it registers the CPU kernels of every op). Inside it,
instructions beyond its width (VNNI, BF16, AMX) are chosen at run time (csrc/cpu.h)."""
import importlib
import os

import torch

# Widest first: (module suffix, whether this CPU executes it)
_WIDTHS = (
    ("avx512", torch.cpu._is_avx512_supported),
    ("avx2", torch.cpu._is_avx2_supported),
    ("default", lambda: True),
)


def _hidden() -> set:
    names = {n.strip() for n in os.environ.get("TRITIUM_CPU_DISABLE", "").split(",") if n.strip()}
    return {"avx512", "avx2"} if "all" in names else names


def _load():
    runnable = [name for name, ok in _WIDTHS if ok()]
    hidden = _hidden()
    # Widest runnable width not hidden; with every width hidden, the narrowest the CPU runs (its features are then
    # all off: the kernels that need one say so)
    order = [n for n in runnable if n not in hidden] + runnable[::-1]
    for name in order:
        try:
            return name, importlib.import_module(f"tritium._C_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tritium._C_{name}":
                raise
    raise ImportError(
        f"tritium's C++ kernels are not built for this CPU (it runs: {', '.join(runnable)}); build them with "
        "`make build` (or `pip install -e .`) on this machine")


WIDTH, module = _load()
