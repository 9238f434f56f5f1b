"""tritium ops: schemas, fake kernels, autograd, validation, and the public functional API."""
from .norms import fused_add_rms_norm, layer_norm, rms_norm  # noqa: F401

from .. import _C  # noqa: F401,E402  (registers the C++ CPU kernels for the schemas defined above)
