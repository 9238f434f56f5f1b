"""Products with a weight matrix on CPU without BLAS's per-call repacking, and tritium.linear.

BLAS repacks the whole weight matrix on every call; at a decode step's few rows, with the weights cold in cache,
that repacking is most of the call. The ops here:

- ``linear_small(x, w)``: x (M, K) @ w (N, K)^T on the weights as torch stores them (csrc/rowgemm.h: 4 x 4
  register tiles, the next weight tiles prefetched, no packing step), which beats BLAS for float32 at every row
  count of a model's projections (bench/results/ has the runs), so float32 uses it at every row count; 16-bit
  weights for one row only (from two rows on oneDNN's AVX512-BF16 kernels win: they multiply in bf16, this
  kernel converts every weight vector to float).
- ``pack_linear(w)`` / ``linear_packed(x, packed, N, bias)``: the weights packed once into column panels
  (csrc/panel.h: outer-product register tiles, no lane reductions, so they also beat linear_small's row tiles
  from 16 rows up), what the serving path uses for float weights packed at load.
- ``mm_pooled(a, b, bias)``: a @ b (+ bias) into an output from tritium's CPU pool (no fresh pages per call),
  through panel_gemm for float from 64 rows: the RNN input projection and its input gradient.
- ``pack_linear_glu(w)`` / ``linear_packed_swiglu(x, packed, 2F)``: a gate/up weight packed with its gate and up
  rows interleaved per panel, SwiGLU computed in the product's epilogue (the serving path's MLP).
- ``linear_wgrad(dy, x, bias)``: the weight and bias gradients dy^T x and dy.sum(0) in one pass (csrc/panel.h's
  panel_gemm_tn for float from 512 rows: the column sums come from the same transposed chunks of dy, so the bias
  gradient costs no second pass over dy).
- ``linear(input, weight, bias)`` (public, ``tritium.linear``): the drop-in for F.linear; on CPU float each of its
  products goes where ``linear_plan`` says (the forward and input gradient through mm_pooled, the weight and bias
  gradients through linear_wgrad, or torch's own), a call with none on the panels is F.linear. ``project`` (the
  RNN input projection) takes tritium's kernels for every product.

On GPU the products are cuBLAS's job: the CUDA keys of linear_small, mm_pooled and linear_wgrad run torch's; the
packed pair is CPU only (nothing to pack for on GPU).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import routes_on, use_reference
from ..utils import register_cpu_path
from ._library import HALF_DTYPES, define_op, route_below

# Row counts up to which linear_small is the faster way on CPU (None: any; see the module docstring).
MAX_ROWS = {torch.float32: None, torch.float64: 3, torch.bfloat16: 1, torch.float16: 1}


def _fake_linear_small(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


linear_small = define_op("linear_small(Tensor x, Tensor weight) -> Tensor", _fake_linear_small,
                         cuda=lambda x, weight: torch.matmul(x, weight.t()))


def _fake_mm(a, b, bias=None):
    return a.new_empty((a.shape[0], b.shape[1]))


def _mm_cuda(a, b, bias=None):
    # no pool on CUDA: torch's caching allocator already reuses blocks
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


mm_pooled = define_op("mm_pooled(Tensor a, Tensor b, Tensor? bias=None) -> Tensor", _fake_mm, cuda=_mm_cuda)


def _fake_wgrad(dy, x, bias):
    return x.new_empty((dy.shape[1], x.shape[1])), dy.new_empty((dy.shape[1] if bias else 0,))


def _wgrad_cuda(dy, x, bias):
    return dy.t() @ x, dy.sum(0) if bias else dy.new_empty((0,))


linear_wgrad = define_op("linear_wgrad(Tensor dy, Tensor x, bool bias) -> (Tensor, Tensor)", _fake_wgrad,
                         cuda=_wgrad_cuda)


# c (float32) += a @ b for 16-bit a and b: the product rounded to their dtype (as torch's matmul), added into c in
# one vectorised pass (the chunked cross-entropy's weight gradient); float/double: c.addmm_(a, b)
def _fake_mm_acc(c, a, b):
    return None


def _mm_acc_cuda(c, a, b):
    c.addmm_(a.to(c.dtype), b.to(c.dtype))


mm_acc_ = define_op("mm_acc_(Tensor(a!) c, Tensor a, Tensor b) -> ()", _fake_mm_acc, cuda=_mm_acc_cuda)


# Packed weights (csrc/panel.h): pack_linear(w) once, then linear_packed(x, packed, N) per call. CPU only (the
# serving path packs at load; on GPU there is nothing to pack for).
@functools.lru_cache(maxsize=None)
def _panel_width(dtype: torch.dtype) -> int:
    """The CPU build's panel width (64 floats with AVX-512, 16 with AVX2: csrc/panel.h's kNV), asked of the kernel."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # a real call on a real 1 x 1 tensor, even while tracing
        return torch.ops.tritium.pack_linear(torch.zeros(1, 1, dtype=dtype)).shape[2]


def _fake_pack(weight):
    p = _panel_width(weight.dtype)
    return weight.new_empty((-(-weight.shape[0] // p), weight.shape[1], p))


def _fake_linear_packed(x, packed, n, bias=None):
    return x.new_empty((x.shape[0], n))


pack_linear = define_op("pack_linear(Tensor weight) -> Tensor", _fake_pack)
linear_packed = define_op("linear_packed(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor",
                          _fake_linear_packed)


# SwiGLU in the product's epilogue: pack_linear_glu(w_gate_up) interleaves the gate and up rows panel by panel
# (F must be a multiple of half the panel width: glu_pack_ok), then linear_packed_swiglu(x, packed, 2F) returns
# silu(x @ gate^T) * (x @ up^T) (M, F) without writing the (M, 2F) projection.
def _fake_linear_packed_swiglu(x, packed, n):
    return x.new_empty((x.shape[0], n // 2))


pack_linear_glu = define_op("pack_linear_glu(Tensor weight) -> Tensor", _fake_pack)
linear_packed_swiglu = define_op("linear_packed_swiglu(Tensor x, Tensor packed, int n) -> Tensor",
                                 _fake_linear_packed_swiglu)


def glu_pack_ok(w: Tensor) -> bool:
    """True when pack_linear_glu can pack w (2F, K): float32/float64 on CPU, F a multiple of half a panel."""
    return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and w.dim() == 2
            and w.shape[0] % 2 == 0 and (w.shape[0] // 2) % (_panel_width(w.dtype) // 2) == 0)


def small_rows_ok(x: Tensor, w: Tensor) -> bool:
    """True when linear_small is the faster way to compute x @ w.T (CPU, few rows, same dtype, w contiguous)."""
    return (x.dim() == 2 and x.device == w.device and x.device.type == "cpu"
            and _small_rows(x.shape[0], x.dtype, w))


def _small_rows(rows: int, dtype: torch.dtype, w: Tensor) -> bool:
    limit = MAX_ROWS.get(dtype, 0)
    return (0 < rows and (limit is None or rows <= limit) and w.dtype == dtype and w.dim() == 2
            and w.is_contiguous())

_ALL_PANELS = (True, True, True)


class _Project(torch.autograd.Function):
    """y (M, N) = x (M, K) @ w (N, K)^T [+ b]. plan (linear_plan's): which of the three products run on tritium's
    kernels: the forward and the input gradient through mm_pooled (panel_gemm for float from 64 rows, into pooled
    outputs), the weight and bias gradients through linear_wgrad (dy^T x on transposed chunks of dy, the column
    sums from the same chunks); the others through torch's own (addmm, mm, sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], plan: Tuple[bool, bool, bool] = _ALL_PANELS):
        ctx.save_for_backward(x, w)
        ctx.has_bias, ctx.plan = b is not None, plan
        return mm_pooled(x, w.t(), b) if plan[0] else F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        _, dgrad, wgrad = ctx.plan
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = mm_pooled(dy, w) if dgrad else dy.mm(w)
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            if wgrad:
                dw, db = linear_wgrad(dy, x, want_b)
            else:
                dw = dy.t().mm(x)
        if want_b and db is None:
            db = dy.sum(0)
        return dx, dw, db if want_b else None, None


def project(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """x (M, K) @ w (N, K)^T [+ b] with autograd, every product through tritium's kernels (mm_pooled, linear_wgrad)
    (internal: the RNN input projection; any dtype, shapes already checked)."""
    return _Project.apply(x, w, b, _ALL_PANELS)


# From 64 rows the packed panels can be reused by enough rows to beat BLAS's product; below that mm_pooled calls
# BLAS anyway
_MIN_ROWS = 64
# tritium.linear's rule with the routes on (linear_plan). The panels pay off only where their gain outweighs the
# Python autograd wrapper's fixed cost and BLAS's own threading is at its weakest: many rows. A product onto n
# columns reducing over k takes the panels only with a long enough reduction and whole panels (a partial last
# panel computes its padding too: a product onto 96 columns does the work of 128). The weight gradient (dy^T x,
# reducing over the rows) gains only on large weights. Below PLAN_ROWS rows, or ROUTE_BELOW["linear"]
# multiply-adds, the whole call is F.linear. The rule holds on both builds (the AVX2 build's 6 x 2 register tile
# fits its 16 vector registers; its narrower panels make more column counts whole).
PLAN_ROWS = 4096
PLAN_MIN_K = 128
PLAN_WGRAD_ELEMS = 1 << 18


def _whole_panels(cols: int, width: int) -> bool:
    """True when `cols` output columns fill their panels of `width` (or waste under 1/16 of the work in the last)."""
    return cols % width == 0 or cols >= 16 * width


def linear_plan(rows: int, k: int, n: int, dtype: torch.dtype = torch.float32) -> Tuple[bool, bool, bool]:
    """Which products of tritium.linear on CPU (float32/float64, rows x k @ (n x k)^T) run on tritium's panel GEMM:
    (forward, input gradient, weight and bias gradients); the others are torch's own, and with none on the panels
    the call is F.linear. The one place the rule lives. TRITIUM_ROUTES=off: every product from 64 rows on the
    panels (the tests exercise the kernels at their small shapes)."""
    if rows < _MIN_ROWS or k == 0 or n == 0:
        return (False, False, False)
    if not routes_on():
        return _ALL_PANELS
    if rows < PLAN_ROWS or rows * k * n < route_below("linear"):
        return (False, False, False)
    width = _panel_width(dtype)

    def product(red: int, cols: int) -> bool:
        return red >= PLAN_MIN_K and _whole_panels(cols, width)

    return (product(k, n), product(n, k),
            k * n >= PLAN_WGRAD_ELEMS and _whole_panels(k, width) and n >= width)


def _linear_path() -> str:
    """tritium.linear's rule for `tritium info` (utils.cpu_paths)."""
    if not routes_on():
        return f"panel GEMM for every product from {_MIN_ROWS} rows (routes off: TRITIUM_ROUTES=off)"
    return (f"F.linear below {PLAN_ROWS} rows or {route_below('linear')} rows x in x out; else per product: panel "
            f"GEMM with a reduction of {PLAN_MIN_K} or more onto whole panels (the weight gradient: weights of "
            f"{PLAN_WGRAD_ELEMS} elements or more), torch's otherwise")


register_cpu_path("linear", _linear_path)


def _linear_plan(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[bool, bool, bool]:
    """linear_plan for a call tritium's kernels can take, else (False, False, False) (F.linear)."""
    no = (False, False, False)
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)) or use_reference():
        return no
    if input.dtype not in (torch.float32, torch.float64) or weight.dtype != input.dtype:
        return no
    if input.device.type != "cpu" or weight.device != input.device or input.dim() < 2 or weight.dim() != 2:
        return no
    n, k = weight.shape
    if input.shape[-1] != k or k == 0 or n == 0 or not weight.is_contiguous():
        return no
    if bias is not None and not (isinstance(bias, Tensor) and bias.dtype == input.dtype and bias.dim() == 1
                                 and bias.shape[0] == n and bias.device == input.device):
        return no
    return linear_plan(input.numel() // k, k, n, input.dtype)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Drop-in for torch.nn.functional.linear: input (*, in) @ weight (out, in)^T + bias. On CPU in float32 /
    float64 the products linear_plan picks run on tritium's panel GEMM (csrc/panel.h) into pooled outputs (the
    forward and input gradient: mm_pooled; the weight and bias gradients in one pass: linear_wgrad), the others
    on torch's; every other case is torch's F.linear itself (same values, same errors)."""
    if routes_on() and isinstance(input, Tensor) and input.numel() < PLAN_ROWS * input.shape[-1:].numel():
        return F.linear(input, weight, bias)   # too few rows for any panel product (linear_plan), checked first
    plan = _linear_plan(input, weight, bias)
    if any(plan):
        k = weight.shape[1]
        return _Project.apply(input.reshape(-1, k), weight, bias, plan).view(*input.shape[:-1], weight.shape[0])
    return F.linear(input, weight, bias)


__all__: List[str] = ["linear"]


# ---------------------------------------------------------------------------------------------------------
# PackedLinear: how a serving path computes x @ W^T for one weight (the one place that chooses the CPU GEMM)
# ---------------------------------------------------------------------------------------------------------
from .activations import swiglu as _swiglu  # noqa: E402  (activations is defined before linear in tritium.ops)


def _onednn_linear_ok(weight: Tensor) -> bool:
    """True when torch's oneDNN linear ops can serve this 16-bit CPU weight in oneDNN's blocked layout.

    torch exposes them only as private ops (``torch.ops.mkldnn._reorder_linear_weight`` packs a weight once,
    ``torch.ops.mkldnn._linear_pointwise`` multiplies by the packed copy; torch.compile's CPU inductor uses the
    same pair): this module is the one place tritium calls them, so a torch that renames them breaks one file."""
    if not (weight.device.type == "cpu" and weight.dtype in HALF_DTYPES
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    # oneDNN's 16-bit linear needs the CPU's 16-bit support (AVX-512 BW/VL/DQ or AVX-NE-CONVERT for bfloat16,
    # AVX512-FP16 or AMX-FP16 for float16); an AVX2 CPU takes the plain way
    supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported if weight.dtype == torch.bfloat16
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported)
    return bool(supported())


class PackedLinear:
    """``pl(x)``: x (M, in) @ weight (out, in)^T for a serving path (inference, no autograd), computed the way
    that suits this weight on its device and dtype; it owns the packed copy that way needs.

    The choice, made once per weight (``kind``):

    - ``"panels"``: float32/float64 on CPU. The weight packed once into column panels (pack_linear; per call
      linear_packed): register tiles that accumulate outer products with no lane reductions, and no per-call
      repacking as BLAS does.
    - ``"panels_swiglu"``: as "panels" for a fused [gate | up] weight when ``swiglu=True`` and ffn_dim is a
      multiple of half a panel (glu_pack_ok): gate and up rows interleaved per panel (pack_linear_glu), SwiGLU
      computed in the product's epilogue (linear_packed_swiglu), so the (M, 2F) projection is never written.
    - ``"onednn"``: 16-bit on CPU when torch has oneDNN: the weight reordered once into oneDNN's blocked layout,
      whose AVX512-BF16/AMX kernels multiply in 16 bits. A single row goes to linear_small instead (at one row
      the product only streams the weight, which linear_small does as stored).
    - ``"plain"``: no copy (``pack=False``, other devices, or no oneDNN): linear_small for the few rows where it
      is the better way (small_rows_ok: rowgemm on the weight as stored), otherwise torch.matmul.

    ``swiglu=True``: the weight is a fused [gate | up] projection (2F, in) and the call returns
    silu(x @ gate^T) * (x @ up^T) (M, F) whatever the kind. The packed copy is taken from the weight's values at
    construction: build a new PackedLinear after changing them.
    """

    def __init__(self, weight: Tensor, swiglu: bool = False, pack: bool = True):
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"PackedLinear: weight must be a 2-D (out, in) tensor, got "
                             f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
        if swiglu and weight.shape[0] % 2:
            raise ValueError(f"PackedLinear: a swiglu weight needs an even number of rows, got {weight.shape[0]}")
        w = weight.detach()
        self.weight, self.swiglu, self.out_features = w, swiglu, w.shape[0]
        self.kind, self.packed = "plain", None
        if not pack or w.device.type != "cpu":
            return
        with torch.no_grad():
            if w.dtype in (torch.float32, torch.float64):
                if swiglu and glu_pack_ok(w):
                    self.kind, self.packed = "panels_swiglu", pack_linear_glu(w)
                else:
                    self.kind, self.packed = "panels", pack_linear(w)
            elif _onednn_linear_ok(w):
                self.kind, self.packed = "onednn", torch.ops.mkldnn._reorder_linear_weight(w, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "panels_swiglu":
            return linear_packed_swiglu(x, self.packed, self.out_features)
        y = self._product(x)
        return _swiglu(y) if self.swiglu else y

    def _way(self, rows: int, dtype: torch.dtype, device: torch.device) -> str:
        """How a product of `rows` rows of `dtype` on `device` is computed: the kind for "panels" /
        "panels_swiglu", else "onednn" (packed, more than linear_small's rows), "small" (linear_small) or
        "matmul". __call__ and decode_plan both follow it."""
        if self.kind.startswith("panels"):
            return self.kind
        small = device == self.weight.device and device.type == "cpu" and _small_rows(rows, dtype, self.weight)
        if self.kind == "onednn" and not small:
            return "onednn"
        return "small" if small else "matmul"

    def _product(self, x: Tensor) -> Tensor:
        way = self._way(x.shape[0] if x.dim() == 2 else 0, x.dtype, x.device)   # 0 rows: never linear_small
        if way == "panels":
            return linear_packed(x, self.packed, self.out_features)
        if way == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if way == "small":
            return linear_small(x, self.weight)
        return torch.matmul(x, self.weight.t())

    def decode_plan(self, rows: int) -> tuple:
        """How serve_decode (tritium.ops.serve) computes this product for `rows` rows of the weight's dtype:
        (kind, three tensors, five ints), the way __call__ takes (_way). SwiGLU is applied by serve_decode for a
        swiglu weight whose kind does not (every kind but "panels_swiglu")."""
        from .serve import KIND, no_tensor

        e = no_tensor(self.weight)
        way = self._way(rows, self.weight.dtype, self.weight.device)
        if way.startswith("panels"):
            return KIND[way], (self.packed, e, e), (self.out_features, 0, 0, 0, 0)
        return KIND[way], (self.packed if way == "onednn" else self.weight, e, e), (0,) * 5

    def __repr__(self) -> str:
        n, k = self.weight.shape
        return f"PackedLinear({k} -> {n}, {self.weight.dtype}, kind={self.kind!r}{', swiglu' if self.swiglu else ''})"
