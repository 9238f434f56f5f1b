"""tritium: fused Triton (GPU) and C++ (CPU) kernels behind drop-in PyTorch ops.

``tritium.<op>`` mirrors ``torch.nn.functional.<op>``; ``tritium.nn`` holds drop-in modules and
``tritium.patch(model)`` swaps them into an existing model. The sub-packages load on first use, so
``import tritium`` stays cheap (no model loaders, serving engine, benchmarks or triton):

    model, tokenizer = tritium.models.load()              # SmolLM2-135M-Instruct
    print(tritium.generate(model, tokenizer, ["Hello"], max_new_tokens=20)[0].text)
"""
import importlib as _importlib

from ._backend import get_backend, set_backend, set_routes  # noqa: F401
from .ops import *  # noqa: F401,F403
from . import nn  # noqa: F401,E402
from .nn import patch, quantize_  # noqa: F401,E402

__version__ = "0.1.0"

# sub-packages reachable as attributes of tritium, imported on first access (module __getattr__, PEP 562)
_LAZY_SUBMODULES = ("models", "inference", "reference", "bench", "cli", "utils", "kernels", "integrations", "optim",
                     "lora", "finetune", "distributed")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, **kwargs):
    """One result per prompt (GenerationResult: text, token_ids, ...), all prompts run together through
    tritium.inference.Engine. kwargs: sampling (temperature=0.0, top_k, top_p, min_p, seed, ...), stop,
    num_beams, length_penalty; see tritium.inference.engine.generate."""
    from .inference.engine import generate as _generate

    return _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)


def empty_cache() -> None:
    """Return every cached block of tritium's CPU output pool to the system (like torch.cuda.empty_cache).

    Large CPU outputs (2 MiB and up) of tritium kernels come from a pool of freed blocks on huge pages, so a
    loop does not pay the OS's zeroing of fresh pages on every call. The pool keeps at most 2 GiB of free
    blocks by default; ``TRITIUM_CPU_POOL_MB`` sets that limit (0 turns the pool off). Also drops the cache of
    packed frozen weights (pack_cache_stats).
    """
    import torch

    torch.ops.tritium_runtime.empty_cache()
    if hasattr(torch.ops.tritium_runtime, "pack_cache_clear"):   # absent from builds made before the cache
        torch.ops.tritium_runtime.pack_cache_clear()


def pack_cache_stats() -> dict:
    """The cache of packed frozen weights (csrc/linear.cpp): LoRA's float32 base weights keep their GEMM panels
    between calls until the weight changes in place (its version counter; a write through ``.data`` is not seen,
    as autograd does not see it). ``TRITIUM_PACK_CACHE_MB`` sets the limit (default 1024; 0 turns it off)."""
    import torch

    entries, nbytes, limit, hits, misses = torch.ops.tritium_runtime.pack_cache_stats()
    return {"entries": entries, "bytes": nbytes, "limit_bytes": limit, "hits": hits, "misses": misses}


def pool_stats() -> dict:
    """Tritium's CPU output pool: bytes cached, the limit, and allocations served from the cache or fresh."""
    import torch

    cached, limit, hits, misses = torch.ops.tritium_runtime.pool_stats()
    return {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses}


def set_pool_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed output blocks cached (0 disables the cache); trims at once."""
    import torch

    torch.ops.tritium_runtime.set_pool_limit(int(nbytes))
