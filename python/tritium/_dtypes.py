"""The floating dtypes tritium's kernels implement and the dtype each accumulates in.

A leaf module (imports only torch) so that both the ops and ``tritium.reference`` use the one rule.
"""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the 16-bit ones


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit and float32 compute accumulate in float32; float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
