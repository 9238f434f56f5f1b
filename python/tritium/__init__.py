"""tritium: fused Triton (GPU) and C++ (CPU) kernels behind drop-in PyTorch ops.

``tritium.<op>`` mirrors ``torch.nn.functional.<op>``; ``tritium.nn`` holds drop-in modules and
``tritium.patch(model)`` swaps them into an existing model.
"""
from ._backend import get_backend, set_backend  # noqa: F401
from .ops import *  # noqa: F401,F403
from . import nn  # noqa: F401,E402
from .nn import patch  # noqa: F401,E402

__version__ = "0.1.0"


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, **kwargs):
    """Generate for one or more prompts through tritium.inference.Engine (see tritium.models.generate)."""
    from .models import generate as _generate

    return _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)
