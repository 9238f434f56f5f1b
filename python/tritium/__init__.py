"""tritium: fused Triton (GPU) and C++ (CPU) kernels behind drop-in PyTorch ops."""
from ._backend import get_backend, set_backend  # noqa: F401
from .ops import *  # noqa: F401,F403
from .ops import fused_add_rms_norm, layer_norm, rms_norm  # noqa: F401
from . import nn  # noqa: F401,E402
from .nn import patch  # noqa: F401,E402

__version__ = "0.1.0"
