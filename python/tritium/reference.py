"""Plain-torch reference of every tritium op: the specification the kernels are tested against.

For a drop-in op the reference is torch's own function (its behaviour is the spec, errors included); for a
fused op it is the unfused composition of torch ops. Kernels fall back to these explicitly for inputs they
do not cover, and ``TRITIUM_BACKEND=reference`` routes every call here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

rms_norm = F.rms_norm
layer_norm = F.layer_norm


def fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                       eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    h = input + residual
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h
