"""Integrations of tritium's kernels into other libraries' models, one module per library, each imported on first
use (they import that library): ``tritium.integrations.transformers`` patches Hugging Face transformers models."""
import importlib as _importlib

_LAZY_SUBMODULES = ("transformers",)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
