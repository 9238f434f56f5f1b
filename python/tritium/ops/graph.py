"""Graph message passing over a CSR graph: the aggregation of GCN / GraphSAGE-style layers and GAT's fused edge
softmax, without the (edges, features) message tensor eager PyTorch builds.

The graph is CSR by destination: ``rowptr`` (num_dst + 1) int64, non-decreasing from 0 to the number of edges,
and ``col`` (edges) int64, the source node of each edge, so the edges into node i are ``col[rowptr[i]:rowptr[i+1]]``
(self loops and duplicate edges allowed; a node may have none). Sources index the rows of x (num_src of them;
num_src = num_dst for an ordinary graph, any number for a bipartite one).

- ``graph_aggregate(x, rowptr, col, weight=None, reduce="sum")``: out[i] = AGG over the edges e into i of
  weight[e] * x[col[e]], AGG sum, mean (the sum over the edge count) or max (per feature); 0 for a node without
  edges. Gradients for x and the edge weights.
- ``gat_aggregate(x, a_src, a_dst, rowptr, col, negative_slope=0.2)``: per head h, alpha_e = softmax over the
  edges into i of leaky_relu(a_src[col[e], h] + a_dst[i, h]), out[i, h] = sum_e alpha_e x[col[e], h]; x
  (num_src, heads, channels). Gradients for x, a_src and a_dst. Only (edges, heads) intermediates, in the
  backward.

The backward scatters to the sources through the graph's transpose (CSC: ``graph_csc``), so every gradient row is
written by one task, without atomics. It is computed in the backward unless given as ``csc=graph_csc(...)``
(a model computes it once per graph).

Checking rowptr and col reads their values: on CUDA a host synchronisation, and under torch.compile data-dependent
branches that break the graph. A ``CSRGraph(rowptr, col, num_src)`` is checked once when built and holds its
transpose; passed in place of rowptr (``graph_aggregate(x, graph)``, ``gat_aggregate(x, a_src, a_dst, graph)``)
the calls check only shapes, dtypes and devices (no sync, no graph break). Raw rowptr / col are checked on every
call.

Ops: ``tritium::graph_agg`` / ``graph_agg_bwd`` and ``tritium::gat_fwd`` / ``gat_bwd`` (C++: csrc/graph.cpp;
Triton: kernels/graph.py). Calls the kernels do not cover (a dtype, a device, an empty x) go to
``tritium.reference``'s eager index_add / scatter formulation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ._library import acc_dtype, call_op, define_op, kernel_ok

AGGS = ("sum", "mean", "max")
AGG_IDS = {name: i for i, name in enumerate(AGGS)}   # csrc/graph.cpp's and kernels/graph.py's ids

CSC = Tuple[Tensor, Tensor, Tensor]


def graph_csc(rowptr: Tensor, col: Tensor, num_src: int) -> CSC:
    """The transpose of a CSR graph, (csc_ptr (num_src + 1), csc_dst (edges), csc_perm (edges)): the edges grouped
    by source (stable: in CSR order within a source), each with its destination and its index in the CSR order."""
    E = col.numel()
    dst = reference._edge_dst(rowptr, E)
    perm = torch.argsort(col, stable=True)
    counts = torch.zeros(num_src, dtype=torch.int64, device=col.device).index_add_(0, col, torch.ones_like(col))
    ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return ptr, dst[perm], perm


# ---- validation: every public call, errors naming the argument ----
def _index(t, name: str, fn: str) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        got = f"{t.dim()}-D {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{fn}: {name} must be a 1-D int64 tensor, got {got}")


def check_graph(rowptr: Tensor, col: Tensor, num_src: int, fn: str = "graph_aggregate") -> None:
    """rowptr and col describe a CSR graph over num_src source nodes (else a TypeError / ValueError naming the
    argument): 1-D int64, rowptr non-decreasing from 0 to len(col), every col in [0, num_src)."""
    _index(rowptr, "rowptr", fn)
    _index(col, "col", fn)
    if col.device != rowptr.device:
        raise ValueError(f"{fn}: rowptr and col must be on one device, got {rowptr.device} and {col.device}")
    if rowptr.numel() == 0:
        raise ValueError(f"{fn}: rowptr must have num_dst + 1 >= 1 entries, got none")
    first, last = int(rowptr[0]), int(rowptr[-1])
    if first != 0 or last != col.numel():
        raise ValueError(f"{fn}: rowptr must run from 0 to len(col) = {col.numel()}, got {first} to {last}")
    if rowptr.numel() > 1 and bool((rowptr[1:] < rowptr[:-1]).any()):
        i = int(torch.nonzero(rowptr[1:] < rowptr[:-1])[0, 0])
        raise ValueError(f"{fn}: rowptr must be non-decreasing, got rowptr[{i}] = {int(rowptr[i])} > "
                         f"rowptr[{i + 1}] = {int(rowptr[i + 1])}")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= num_src):
        bad = int(col.min()) if int(col.min()) < 0 else int(col.max())
        raise ValueError(f"{fn}: col must index the {num_src} source nodes (rows of x), got {bad}")


def _check_csc(csc, num_src: int, num_edges: int, fn: str):
    if csc is None:
        return None, None, None
    if not (isinstance(csc, (tuple, list)) and len(csc) == 3):
        raise TypeError(f"{fn}: csc must be graph_csc(rowptr, col, num_src)'s (csc_ptr, csc_dst, csc_perm), got "
                        f"{type(csc).__name__}")
    for t, name, n in zip(csc, ("csc_ptr", "csc_dst", "csc_perm"), (num_src + 1, num_edges, num_edges)):
        _index(t, f"csc's {name}", fn)
        if t.numel() != n:
            raise ValueError(f"{fn}: csc's {name} must have {n} entries, got {t.numel()}")
    return tuple(t.contiguous() for t in csc)


class CSRGraph:
    """A CSR graph by destination, checked once (``check_graph``) when built: rowptr (num_dst + 1) and col (edges)
    int64 over ``num_src`` source nodes, and its transpose ``csc`` (``graph_csc``'s, computed here unless given).
    graph_aggregate and gat_aggregate take it in place of rowptr and then read no index values: no host sync, and
    nothing torch.compile cannot trace."""

    def __init__(self, rowptr: Tensor, col: Tensor, num_src: int, csc: Optional[CSC] = None):
        if isinstance(num_src, bool) or not isinstance(num_src, int) or num_src < 0:
            raise TypeError(f"CSRGraph: num_src must be an int >= 0, got {num_src!r}")
        check_graph(rowptr, col, num_src, "CSRGraph")
        csc = graph_csc(rowptr, col, num_src) if csc is None else _check_csc(csc, num_src, col.numel(), "CSRGraph")
        self._set(rowptr.contiguous(), col.contiguous(), num_src, tuple(t.contiguous() for t in csc))

    def _set(self, rowptr: Tensor, col: Tensor, num_src: int, csc: CSC) -> None:
        self.rowptr, self.col, self.num_src, self.csc = rowptr, col, num_src, csc

    @property
    def num_dst(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def to(self, device) -> "CSRGraph":
        """The same graph on ``device`` (moving a checked graph needs no new check)."""
        out = CSRGraph.__new__(CSRGraph)
        out._set(self.rowptr.to(device), self.col.to(device), self.num_src, tuple(t.to(device) for t in self.csc))
        return out

    def __repr__(self) -> str:
        return f"CSRGraph(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges})"


def _graph_args(rowptr, col, csc, num_src: int, fn: str):
    """(rowptr, col, csc_ptr, csc_dst, csc_perm) of a call: from a CSRGraph (only its sizes and device against x's
    rows) or from raw rowptr / col (checked in full)."""
    if isinstance(rowptr, CSRGraph):
        g = rowptr
        if col is not None or csc is not None:
            raise TypeError(f"{fn}: with a CSRGraph, col and csc must be omitted (the graph holds them), got "
                            f"col={type(col).__name__}, csc={type(csc).__name__}")
        if g.num_src != num_src:
            raise ValueError(f"{fn}: the CSRGraph has {g.num_src} source nodes but x has {num_src} rows")
        return (g.rowptr, g.col, *g.csc)
    if col is None:
        raise TypeError(f"{fn}: col must be given with a raw rowptr (or pass a CSRGraph as rowptr), got None")
    check_graph(rowptr, col, num_src, fn)
    return (rowptr.contiguous(), col.contiguous(), *_check_csc(csc, num_src, col.numel(), fn))


def _check_float(t, name: str, fn: str, dim: int, like: Optional[Tensor] = None) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {got}")
    if t.dim() != dim:
        raise ValueError(f"{fn}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        raise TypeError(f"{fn}: {name} must have x's dtype {like.dtype} and device {like.device}, got {t.dtype} on "
                        f"{t.device}")


# ---- graph_agg ----
def _fake_agg(x, rowptr, col, w, csc_ptr, csc_dst, csc_perm, agg):
    nd = rowptr.shape[0] - 1
    return x.new_empty((nd, x.shape[1])), x.new_empty((nd, x.shape[1]) if agg == 2 else (0,), dtype=torch.int64)


def _fake_agg_bwd(g, x, rowptr, col, w, arg, csc_ptr, csc_dst, csc_perm, agg, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)),
            x.new_empty((col.shape[0],) if need_w and w is not None else (0,)))


graph_agg_bwd = define_op(
    "graph_agg_bwd(Tensor g, Tensor x, Tensor rowptr, Tensor col, Tensor? w, Tensor arg, Tensor csc_ptr,"
    " Tensor csc_dst, Tensor csc_perm, int agg, bool need_x, bool need_w) -> (Tensor, Tensor)",
    _fake_agg_bwd, "graph:graph_agg_bwd")


def _agg_setup(ctx, inputs, output):
    x, rowptr, col, w, cp, cd, cq, agg = inputs
    ctx.agg = agg
    ctx.save_for_backward(x, rowptr, col, w, output[1], cp, cd, cq)


def _csc_of(cp, cd, cq, rowptr, col, num_src) -> CSC:
    return (cp, cd, cq) if cp is not None else graph_csc(rowptr, col, num_src)


def _agg_backward(ctx, g, _g_arg):
    x, rowptr, col, w, arg, cp, cd, cq = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if ctx.needs_input_grad[4] or ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
        raise NotImplementedError("tritium::graph_agg: the graph has no gradient")
    cp, cd, cq = _csc_of(cp, cd, cq, rowptr, col, x.shape[0])
    dx, dw = graph_agg_bwd(g.contiguous(), x, rowptr, col, w, arg, cp, cd, cq, ctx.agg, need_x, need_w)
    return (dx if need_x else None), None, None, (dw if need_w else None), None, None, None, None


graph_agg = define_op(
    "graph_agg(Tensor x, Tensor rowptr, Tensor col, Tensor? w, Tensor? csc_ptr, Tensor? csc_dst, Tensor? csc_perm,"
    " int agg) -> (Tensor, Tensor)", _fake_agg, "graph:graph_agg", backward=_agg_backward, setup_context=_agg_setup)


# ---- gat ----
def _fake_gat(x, a_src, a_dst, rowptr, col, csc_ptr, csc_dst, csc_perm, slope):
    nd = rowptr.shape[0] - 1
    return x.new_empty((nd, x.shape[1], x.shape[2])), x.new_empty((nd, x.shape[1]), dtype=acc_dtype(x.dtype))


def _fake_gat_bwd(g, x, a_src, a_dst, rowptr, col, lse, csc_ptr, csc_dst, csc_perm, slope):
    return x.new_empty(x.shape), a_src.new_empty(a_src.shape), a_dst.new_empty(a_dst.shape)


gat_bwd = define_op(
    "gat_bwd(Tensor g, Tensor x, Tensor a_src, Tensor a_dst, Tensor rowptr, Tensor col, Tensor lse, Tensor csc_ptr,"
    " Tensor csc_dst, Tensor csc_perm, float slope) -> (Tensor, Tensor, Tensor)", _fake_gat_bwd, "graph:gat_bwd")


def _gat_setup(ctx, inputs, output):
    x, a_src, a_dst, rowptr, col, cp, cd, cq, slope = inputs
    ctx.slope = slope
    ctx.save_for_backward(x, a_src, a_dst, rowptr, col, output[1], cp, cd, cq)


def _gat_backward(ctx, g, _g_lse):
    x, a_src, a_dst, rowptr, col, lse, cp, cd, cq = ctx.saved_tensors
    cp, cd, cq = _csc_of(cp, cd, cq, rowptr, col, x.shape[0])
    dx, ds, dd = gat_bwd(g.contiguous(), x, a_src, a_dst, rowptr, col, lse, cp, cd, cq, ctx.slope)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (ds if need[1] else None), (dd if need[2] else None), *([None] * 6)


gat_fwd = define_op(
    "gat_fwd(Tensor x, Tensor a_src, Tensor a_dst, Tensor rowptr, Tensor col, Tensor? csc_ptr, Tensor? csc_dst,"
    " Tensor? csc_perm, float slope) -> (Tensor, Tensor)", _fake_gat, "graph:gat_fwd", backward=_gat_backward,
    setup_context=_gat_setup)


# ---- public API ----
def graph_aggregate(x: Tensor, rowptr, col: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                    reduce: str = "sum", csc: Optional[CSC] = None) -> Tensor:
    """Message passing over a CSR graph: out[i] = AGG_{e in rowptr[i]:rowptr[i+1]} weight[e] * x[col[e]].

    x (num_src, features); rowptr (num_dst + 1) int64; col (edges) int64 source indices; weight (edges) or None
    (1); reduce "sum", "mean" (over the node's edge count) or "max" (per feature; the gradient goes to the first
    maximal edge); a node without edges gets 0. csc: ``graph_csc(rowptr, col, x.shape[0])``, else computed in
    the backward. rowptr may be a ``CSRGraph`` instead (col and csc omitted: checked once, its transpose held).
    Returns (num_dst, features) in x's dtype."""
    fn = "graph_aggregate"
    if reduce not in AGG_IDS:
        raise ValueError(f"{fn}: reduce must be one of {AGGS}, got {reduce!r}")
    _check_float(x, "x", fn, 2)
    rowptr, col, cp, cd, cq = _graph_args(rowptr, col, csc, x.shape[0], fn)
    if weight is not None:
        _check_float(weight, "weight", fn, 1, x)
        if weight.shape[0] != col.numel():
            raise ValueError(f"{fn}: weight must have one entry per edge ({col.numel()}), got {weight.shape[0]}")
    if not (kernel_ok(x, *([] if weight is None else [weight])) and rowptr.device == x.device):
        return reference.graph_aggregate(x, rowptr, col, weight, reduce)
    w = None if weight is None else weight.contiguous()
    return call_op(graph_agg, x.contiguous(), rowptr, col, w, cp, cd, cq, AGG_IDS[reduce])[0]


def gat_aggregate(x: Tensor, a_src: Tensor, a_dst: Tensor, rowptr, col: Optional[Tensor] = None,
                  negative_slope: float = 0.2, csc: Optional[CSC] = None) -> Tensor:
    """GAT's attention aggregation, the edge softmax fused with the weighted sum: for each destination i and head
    h, alpha_e = softmax over the edges e into i of leaky_relu(a_src[col[e], h] + a_dst[i, h], negative_slope),
    out[i, h] = sum_e alpha_e x[col[e], h].

    x (num_src, heads, channels); a_src (num_src, heads) and a_dst (num_dst, heads) the per-node attention
    scores (<x_j, att_src> and <x_i, att_dst> in GAT); a node without edges gets 0. rowptr may be a ``CSRGraph``
    (col and csc omitted). Returns (num_dst, heads, channels) in x's dtype."""
    fn = "gat_aggregate"
    _check_float(x, "x", fn, 3)
    _check_float(a_src, "a_src", fn, 2, x)
    _check_float(a_dst, "a_dst", fn, 2, x)
    rowptr, col, cp, cd, cq = _graph_args(rowptr, col, csc, x.shape[0], fn)
    nd, H = rowptr.numel() - 1, x.shape[1]
    if tuple(a_src.shape) != (x.shape[0], H):
        raise ValueError(f"{fn}: a_src must have shape (num_src, heads) = {(x.shape[0], H)}, got {tuple(a_src.shape)}")
    if tuple(a_dst.shape) != (nd, H):
        raise ValueError(f"{fn}: a_dst must have shape (num_dst, heads) = {(nd, H)}, got {tuple(a_dst.shape)}")
    if not (kernel_ok(x, a_src, a_dst) and rowptr.device == x.device):
        return reference.gat_aggregate(x, a_src, a_dst, rowptr, col, negative_slope)
    return call_op(gat_fwd, x.contiguous(), a_src.contiguous(), a_dst.contiguous(), rowptr, col, cp, cd, cq,
                   float(negative_slope))[0]


__all__ = ["CSRGraph", "graph_aggregate", "gat_aggregate", "graph_csc"]
