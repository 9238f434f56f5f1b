"""Triton kernels of tritium, one module per op family (installed as ``tritium.kernels``).

Each module holds its kernels, then its launchers. Launchers take torch tensors on any device Triton can
address: CUDA for real runs, CPU tensors under ``TRITON_INTERPRET=1`` for the tests.
"""

if __name__ == "kernels":
    # Imported as a top-level package: the repository root is on sys.path (pytest's rootdir, `python -m` or a
    # script run from the checkout), where this directory shadows the PyPI package `kernels` that transformers
    # imports. This directory is only ever tritium.kernels, so when that package is installed the import is handed
    # over to it (replacing this module in sys.modules makes the import statement return it).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
