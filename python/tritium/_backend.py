"""Which implementation runs: the kernels (default) or the plain-torch reference.

``TRITIUM_BACKEND=reference`` forces the reference everywhere (debugging, A/B runs). It is read at import;
``set_backend`` changes it at run time (the tests use it).

``TRITIUM_ROUTES=off`` (or ``set_routes(False)``) turns off the routes to torch's own ops (ops/_library.py's
ROUTE_BELOW: the small CPU inputs for which torch is faster than a kernel call); the kernel tests run with them
off, so that small test shapes exercise the kernels.
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


_routes = os.environ.get("TRITIUM_ROUTES", "on").lower()
if _routes not in ("on", "off"):
    raise ValueError(f"TRITIUM_ROUTES must be 'on' or 'off', got {_routes!r}")
_routes_on = _routes == "on"


def routes_on() -> bool:
    return _routes_on


def set_routes(on: bool) -> None:
    """Whether small CPU inputs go to torch's own ops (ops/_library.py's ROUTE_BELOW); returns nothing."""
    global _routes_on
    _routes_on = bool(on)
