"""Which implementation runs: the kernels (default) or the plain-torch reference.

``TRITIUM_BACKEND=reference`` forces the reference everywhere (debugging, A/B runs). It is read at import;
``set_backend`` changes it at run time (the tests use it).
"""
import os

_VALID = ("kernels", "reference")
_backend = os.environ.get("TRITIUM_BACKEND", "kernels").lower()
if _backend not in _VALID:
    raise ValueError(f"TRITIUM_BACKEND must be one of {_VALID}, got {_backend!r}")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    _backend = name


def use_reference() -> bool:
    return _backend == "reference"
