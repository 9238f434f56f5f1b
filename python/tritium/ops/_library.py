"""The torch.library plumbing every op family uses: one namespace, one way to define an op.

``define_op`` registers a schema in the ``tritium`` namespace, its fake (meta) kernel for torch.compile,
its CUDA kernel (a Triton launcher from ``tritium.kernels``, imported on first use so a CPU-only start never
imports triton) and optionally its autograd formula. The CPU kernels are C++ (``tritium._C``), registered by
the extension itself for the same schema names.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

NAMESPACE = "tritium"
_lib = torch.library.Library(NAMESPACE, "DEF")

# 16-bit and float32 kernels accumulate in float32; float64 in float64.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def define_op(
    schema: str,
    fake: Callable,
    triton_launcher: str,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
):
    """Define ``tritium::<schema>`` and register its fake kernel, CUDA kernel and autograd.

    triton_launcher: "module:function" inside tritium.kernels, called with the op's arguments.
    """
    name = schema.split("(", 1)[0]
    qualname = f"{NAMESPACE}::{name}"
    _lib.define(schema)
    torch.library.register_fake(qualname, fake, lib=_lib)

    module_name, fn_name = triton_launcher.split(":")

    def cuda_impl(*args):
        fn = getattr(importlib.import_module(f"tritium.kernels.{module_name}"), fn_name)
        return fn(*args)

    _lib.impl(name, cuda_impl, "CUDA")
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_lib)
    return getattr(torch.ops.tritium, name)


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View t as (rows, n) with a unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n <= 1 else t2.contiguous()
