"""How an op declares its benchmark: inputs, the three implementations, and its bytes formula.

Every op family has a module in tritium.bench.suites defining ``CASES = [OpCase(...), ...]``; the harness
finds them all. Adding an op is a declaration, never a new code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass
class OpCase:
    name: str
    # make(shape, dtype, device) -> tuple of positional args for tritium/eager (tensors and plain values)
    make: Callable[[Shape, torch.dtype, torch.device], tuple]
    tritium: Callable          # tritium's op
    eager: Callable            # the same computation as a user writes it in torch ops (what eager runs)
    bytes_fwd: Callable[[Shape, torch.dtype], float]            # bytes the forward must move
    bytes_fwdbwd: Optional[Callable[[Shape, torch.dtype], float]] = None  # forward + backward; None: fwd only
    flops_fwd: Optional[Callable[[Shape, torch.dtype], float]] = None     # for compute-bound ops (TFLOP/s)
    flops_fwdbwd: Optional[Callable[[Shape, torch.dtype], float]] = None
    # the first shape is the headline one (`tritium bench ops --headline`): put the bar shape first
    shapes: Sequence[Shape] = ((4096, 4096), (8192, 576), (1, 4096))
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)
    # indices into make()'s args that get gradients in fwd+bwd (default: every floating tensor)
    grad_args: Optional[Sequence[int]] = None
    # memory: also record peak extra bytes allocated during one call (CPU, via the profiler)
    track_memory: bool = False
    # fwdbwd's compile baseline where torch.compile(eager) cannot compile its backward (a loop too long to unroll):
    # a callable holding the compiled parts a user would compile instead (say the loop's body); None: compile eager
    compiled_fwdbwd: Optional[Callable] = None
    # the same for fwd where even the forward's compile of eager takes minutes; None: compile eager
    compiled_fwd: Optional[Callable] = None
    note: str = ""
    tags: Sequence[str] = field(default_factory=tuple)


def elems(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_COMPILED_STEPS: dict = {}


def compiled_step(step: Callable) -> Callable:
    """torch.compile(step, dynamic=False), made once per step function and reused: a reference's time-loop body
    compiled, the fwdbwd compile baseline (OpCase.compiled_fwdbwd) where compiling the whole loop cannot work
    (torch.compile unrolls every step, and at lengths in the thousands Inductor fails on the backward of that graph).
    One compiled function per step, so its cache (and the harness's torch._dynamo.reset) applies."""
    if step not in _COMPILED_STEPS:
        _COMPILED_STEPS[step] = torch.compile(step, dynamic=False)
    return _COMPILED_STEPS[step]
