"""The torch.library plumbing every op family uses: one namespace, one way to define an op.

``define_op`` registers a schema in the ``tritium`` namespace with its fake (meta) kernel for torch.compile,
its kernels and optionally its autograd formula. Where each device's kernel comes from:

- CPU: C++ (``tritium._C_<width>``, imported by tritium._kernels), registered by the extension itself for the same
  schema name (``TORCH_LIBRARY_IMPL(tritium, CPU, m)``), unless the op is a ``composite``;
- CUDA: ``cuda="module:function"``, a Triton launcher in ``tritium.kernels`` (imported on the first call, so a
  CPU-only start never imports triton); or ``cuda=<callable>``, an implementation in torch ops (what cuBLAS
  already does well); or ``cuda=None``, no CUDA kernel (a CPU-only op);
- ``composite=<callable>``: one Python implementation, a composition of other ops, registered for both CPU
  and CUDA (each op it calls dispatches to its own kernel);
- ``cpu=<callable>``: a composition of other ops registered for CPU only, beside a Triton ``cuda`` kernel (an op
  whose CPU form is BLAS calls around C++ kernels, and whose GPU form is one fused Triton kernel).
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._backend import routes_on, use_reference
from ..utils import register_cpu_path
from .._dtypes import HALF_DTYPES, SUPPORTED_DTYPES, acc_dtype  # noqa: F401  (the ops import them from here)

NAMESPACE = "tritium"
_lib = torch.library.Library(NAMESPACE, "DEF")

# The CPU device, for the per-call device tests of kernel_ok and routed: a comparison with it costs next to nothing,
# where reading a tensor's device.type builds a string per call (some microseconds right after a backward pass)
CPU = torch.device("cpu")


def _triton_launcher(spec: str) -> Callable:
    module_name, fn_name = spec.split(":")

    def cuda_impl(*args):
        return getattr(importlib.import_module(f"tritium.kernels.{module_name}"), fn_name)(*args)

    return cuda_impl


def define_op(
    schema: str,
    fake: Callable,
    cuda: Union[str, Callable, None] = None,
    *,
    composite: Optional[Callable] = None,
    cpu: Optional[Callable] = None,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
):
    """Define ``tritium::<schema>``; register its fake kernel, its kernels and its autograd; return the op.

    cuda: "module:function" inside tritium.kernels (a Triton launcher called with the op's arguments), a
    callable (a torch implementation), or None (no CUDA kernel). composite: a callable registered for CPU and
    CUDA instead (then cuda must be None). cpu: a callable registered for CPU instead of a C++ kernel. Without
    composite or cpu the CPU kernel is the C++ one. backward / setup_context: torch.library.register_autograd's;
    without them the op has no autograd formula.
    """
    if composite is not None and cuda is not None:
        raise ValueError(f"define_op({schema!r}): a composite op has one implementation for every device; "
                         f"got cuda={cuda!r} too")
    if composite is not None and cpu is not None:
        raise ValueError(f"define_op({schema!r}): a composite op has one implementation for every device; "
                         f"got cpu={cpu!r} too")
    name = schema.split("(", 1)[0]
    qualname = f"{NAMESPACE}::{name}"
    _lib.define(schema)
    torch.library.register_fake(qualname, fake, lib=_lib)
    if composite is not None:
        for key in ("CPU", "CUDA"):
            _lib.impl(name, composite, key)
    elif cuda is not None:
        _lib.impl(name, _triton_launcher(cuda) if isinstance(cuda, str) else cuda, "CUDA")
    if cpu is not None:
        _lib.impl(name, cpu, "CPU")
    op = getattr(torch.ops.tritium, name)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_lib)
        lean = _lean_function(op, backward, setup_context)
        if lean is not None:
            _LEAN[op] = lean
    return op


# ---- the eager autograd path call_op takes ----
# register_autograd's wrapper (torch/_library/autograd.py) is Python the dispatcher calls at the Autograd key: per
# call it builds a metadata object, applies a generated autograd.Function through autograd.Function.apply's Python,
# redispatches the op below Autograd, fills the schema's defaults and trims needs_input_grad in backward. For the
# small calls of small models that is a large share of a call's cost. call_op applies instead, per op with a
# backward, an autograd.Function of its own whose forward is the op below Autograd and whose setup_context and
# backward are the very functions given to define_op: the same kernels, saved tensors and formulas, so the same
# values and gradients. The op stays what direct calls (torch.ops.tritium.x(...)), opcheck and torch.compile's
# graphs see.
_LEAN: dict = {}


# autograd.Function.apply's C++ half. The Python classmethod in front of it binds the arguments to forward's
# signature through inspect (every call, for a Function with setup_context; a lean forward takes *inputs, so there
# is nothing to bind), unwraps torch.func's dead wrappers and sends torch.func transforms elsewhere (call_op takes
# the op itself under those).
_apply_c = torch._C._FunctionBase.__dict__["apply"]


class _Lean:
    """An op's autograd.Function (fn), its C++ apply bound to it, and what call_op needs to call it as the wrapper
    calls the formulas: every schema argument given (the defaults of those left out), since setup_context reads them
    by position."""

    __slots__ = ("fn", "apply", "n", "defaults")

    def __init__(self, fn, n, defaults):
        self.fn, self.apply, self.n, self.defaults = fn, _apply_c.__get__(None, fn), n, defaults


def _no_context(ctx, inputs, output):
    pass


def _lean_function(op, backward: Callable, setup_context: Optional[Callable]) -> Optional[_Lean]:
    """The op's _Lean, or None where the wrapper does more than apply the formulas: keyword-only arguments (its
    setup_context takes them apart), tensor lists (the wrapper flattens them for autograd.Function), a mutated
    argument (register_autograd refuses those)."""
    overload = op.default
    schema = overload._schema
    args = schema.arguments
    if (any(a.kwarg_only or a.alias_info is not None or isinstance(a.type, torch.ListType) and
            a.type.getElementType().isSubtypeOf(torch.OptionalType.ofTensor()) for a in args)
            or any(isinstance(r.type, torch.ListType) for r in schema.returns)):
        return None

    def forward(*inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*inputs)

    def backward_fn(ctx, *grads):
        # as the wrapper's: a single gradient may come bare; the backward may leave out trailing Nones
        result = backward(ctx, *grads)
        if not isinstance(result, tuple):
            result = (result,)
        return result + (None,) * (len(ctx.needs_input_grad) - len(result))

    fn = type(f"Lean_{op._qualified_op_name.replace('::', '_')}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context or _no_context),
        "backward": staticmethod(backward_fn),
    })
    defaults = tuple(a.default_value if a.has_default_value() else None for a in args)
    return _Lean(fn, len(args), defaults)


# ---- the checks and layouts every family's public functions share ----
def kernel_ok(x: Tensor, *others: Tensor) -> bool:
    """True when the kernels can take x and the tensors that go with it: the backend is not the reference
    (TRITIUM_BACKEND=reference), x is a non-empty tensor of a dtype the kernels implement, on CPU (C++) or CUDA
    (Triton; float64 excluded, the Triton kernels accumulate in float32), and every other tensor has x's dtype
    and device (a caller leaves out optional tensors that are None). Everything a family needs beyond this
    (shapes, dims, arguments) is checked next to the call; what no check admits goes to tritium.reference."""
    if use_reference() or not isinstance(x, Tensor) or x.dtype not in SUPPORTED_DTYPES or x.numel() == 0:
        return False
    device = x.device
    return ((device == CPU or (x.is_cuda and x.dtype != torch.float64))
            and all(isinstance(t, Tensor) and t.dtype == x.dtype and t.device == device for t in others))


def check_linear_input(fn: str, x, bias, n: int, k: int, device) -> None:
    """The checks of a product x (*, k) @ W^T + bias with a frozen (out n, in k) weight on `device` that is not a
    tensor (NF4, int8/int4): x a floating-point tensor of k columns on the weight's device, bias None or (n,) in x's
    dtype. TypeError / ValueError naming fn and the argument."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must be (*, in_features) = (*, {k}), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{fn}: x is on {x.device} but weight on {device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"{fn}: bias must be (out_features,) = ({n},) or None, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{fn}: bias must have x's dtype {x.dtype}, got {bias.dtype}")


# ---- routes to torch's own ops ----
# Below ROUTE_BELOW[op] elements of the input, on CPU, these public functions call torch's own op (their
# tritium.reference form) instead of the kernel, where torch finishes first (bench/results/routes.json, recorded with
# the routes off). Below ROUTE_DEFAULT that is every one of them: a custom op called from Python pays its dispatch,
# its autograd node and the argument checks. The larger entries are kernels that lose to torch's own
# at in-cache sizes on the machines measured (the Intel (AMX) kind: float32 layer_norm and relu forwards, gelu,
# softmax), until their tensors outgrow what torch's allocator recycles. TRITIUM_ROUTES=off /
# tritium.set_routes(False) turns the routes off (the kernel tests do); `tritium info` lists them.
ROUTE_DEFAULT = 1 << 16
ROUTE_BELOW = {"relu": 1 << 23, "gelu": 1 << 23, "layer_norm": 1 << 23,
               "softmax": 1 << 22, "log_softmax": 1 << 22, "softmin": 1 << 22,
               # tritium.linear: its size is the product's rows x in x out, not the input's elements; the rest of
               # its rule (which passes take the panels) is ops/linear.py's linear_plan
               "linear": 1 << 26,
               # the cheapest elementwise losses, called with a gradient to record (ops/losses.py's _routed): the
               # loss op's autograd wrapper and Python backward cost more than torch's whole formula and gradient
               "mse_loss (grad)": 1 << 19, "huber_loss (grad)": 1 << 20, "smooth_l1_loss (grad)": 1 << 20,
               # triplet_margin_loss (its three gradient rows) likewise below the crossover measured on these CPUs
               "triplet_margin_loss (grad)": 1 << 14,
               # group_norm: the op's autograd node, its backward's Python and the weight / bias reductions cost
               # some tens of microseconds a call more than torch's GroupNorm, which its passes win back from
               # about half a million elements forward, a million forward + backward (AMD EPYC, both dtypes)
               "group_norm": 1 << 19, "group_norm (grad)": 1 << 20,
               # info_nce: its size is the similarities N x (N + M); below it the blocked op's fixed cost (its Python
               # driver and the keys' packing, each way) exceeds torch's whole formula (one block of logits)
               "info_nce": 1 << 16}
_routed_once: set = set()
_log = logging.getLogger("tritium")


def route_below(op: str) -> int:
    return ROUTE_BELOW.get(op, ROUTE_DEFAULT)


def grad_route(op: str, *tensors) -> str:
    """The route name of this call of `op`: "<op> (grad)" when the call records a backward through any of tensors
    and ROUTE_BELOW has that entry (the size from which the kernel's forward + backward wins), else op."""
    name = f"{op} (grad)"
    if name in ROUTE_BELOW and torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in tensors):
        return name
    return op


def routed(op: str, x: Tensor, size: Optional[int] = None) -> bool:
    """True when this call of the public function `op` goes to torch's own op: routes on, x a CPU tensor with
    fewer elements (or `size`, where the op's cost is not its input's size) than route_below(op). The first route
    of each op is logged (logger "tritium", DEBUG)."""
    if not routes_on() or x.device != CPU or (x.numel() if size is None else size) >= route_below(op):
        return False
    if op not in _routed_once and not torch.compiler.is_compiling():  # (a traced graph logs nothing)
        _routed_once.add(op)
        _log.debug("%s: inputs below %d elements on CPU go to torch's own op (ROUTE_BELOW)", op, route_below(op))
    return True


def _route_path() -> str:
    """What runs for small CPU inputs, for `tritium info` (utils.cpu_paths)."""
    if not routes_on():
        return "the kernels (routes off: TRITIUM_ROUTES=off)"
    larger = ", ".join(f"{op} below {n}" for op, n in ROUTE_BELOW.items())
    return (f"torch's own op below {ROUTE_DEFAULT} elements (the activations, softmax, norms and torch's losses); "
            f"{larger}")


register_cpu_path("routes", _route_path)


def call_op(op, *args):
    """op(*args) for an op define_op registered with an autograd formula, at the least per-call cost with the same
    semantics. A call that records a backward (grad mode on, a tensor argument requiring grad) applies the op's
    lean autograd.Function (_lean_function: the op below Autograd, define_op's setup_context and backward) instead
    of going through register_autograd's Python wrapper. A call that records none goes below the Autograd key: the
    wrapper would only find there is nothing to record. While torch.compile traces, and under torch.func's
    transforms, the op itself (the graph records it as written)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        lean = _LEAN.get(op)
        if lean is None or torch._C._are_functorch_transforms_active():
            return op(*args)
        if len(args) < lean.n:
            args = args + lean.defaults[len(args):]
        return lean.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def unit_last(t: Tensor) -> Tensor:
    """t with a unit stride along its last dim, the layout every kernel reads (other dims: any strides). t itself
    when it has one; a view when that dim has one element (its stride is never used, but the kernels' checks
    ask for 1); else a contiguous copy (e.g. an expanded gradient from a sum)."""
    if t.stride(-1) == 1 or t.shape[-1] == 0:
        return t
    if t.shape[-1] == 1:
        return t.squeeze(-1).unsqueeze(-1)  # a new last dim of size 1 gets stride 1
    return t.contiguous()


def rows(t: Tensor, n: int) -> Tensor:
    """View t as (rows, n) with a unit column stride; copies only when no such view exists. A t that is (rows, n)
    already comes back itself: a view would add a node to the autograd graph of every call."""
    return unit_last(t if t.dim() == 2 and t.shape[1] == n else t.reshape(-1, n))


def shaped(t: Tensor, shape) -> Tensor:
    """t viewed as `shape` (a kernel's (rows, n) output as its input's shape); t itself when it has that shape
    already, for rows()' reason."""
    return t if t.shape == shape else t.view(shape)
