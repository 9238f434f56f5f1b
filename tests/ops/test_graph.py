"""tritium.graph_aggregate and tritium.gat_aggregate (the C++ kernels) against a float64 dense-adjacency reference:
values and every gradient (x, the edge weights; x, a_src, a_dst) on odd-sized graphs with nodes without incoming
edges, self loops and duplicate edges, a bipartite graph, every dtype within twice the error of the eager
index_add / scatter formulation (tritium.reference) in that dtype; the transpose given or computed; bad inputs
raising errors that name the argument."""
import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium import reference
from tritium.ops.graph import graph_csc
from tests.util import CPU_DTYPES, assert_within_torch_error


def make_graph(nd: int, ns: int, edges: int, seed: int = 0):
    """A CSR graph (rowptr, col) with nd destinations over ns sources: random edges, every third destination
    (from node 1) without incoming edges, a self loop on each node i < min(nd, ns) that has edges, and the first
    edges repeated (duplicates)."""
    gen = torch.Generator().manual_seed(seed)
    has = torch.tensor([i % 3 != 1 for i in range(nd)])
    live = torch.nonzero(has)[:, 0]
    dst = live[torch.randint(len(live), (edges,), generator=gen)]
    src = torch.randint(ns, (edges,), generator=gen)
    loops = live[live < ns]
    dst = torch.cat([dst, loops, dst[:5]])
    src = torch.cat([src, loops, src[:5]])
    order = torch.argsort(dst * ns + src, stable=True)
    dst, src = dst[order], src[order]
    counts = torch.zeros(nd, dtype=torch.int64).index_add_(0, dst, torch.ones_like(dst))
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return rowptr, src


def dense_aggregate(x, rowptr, col, w, reduce):
    """The dense-adjacency form: A (nd, ns) with A[i, j] the summed weights of the edges j -> i (duplicates add),
    out = A x (mean: rows of A over the edge count); max: over a dense (nd, edges, features) incidence block."""
    nd, ns, E = rowptr.numel() - 1, x.shape[0], col.numel()
    dst = torch.repeat_interleave(torch.arange(nd), rowptr.diff())
    wv = torch.ones(E, dtype=x.dtype) if w is None else w
    deg = rowptr.diff()
    if reduce == "max":
        M = torch.full((nd, E, x.shape[1]), float("-inf"), dtype=x.dtype)
        M = M.index_put((dst, torch.arange(E)), wv[:, None] * x[col])
        return torch.where(deg[:, None] > 0, M.amax(1), torch.zeros((), dtype=x.dtype))
    A = torch.zeros(nd, ns, dtype=x.dtype).index_put((dst, col), wv, accumulate=True)
    if reduce == "mean":
        A = A / deg.clamp(min=1)[:, None].to(x.dtype)
    return A @ x


def dense_gat(x, a_src, a_dst, rowptr, col, slope):
    """The dense form of GAT's attention: scores leaky_relu(a_src[j] + a_dst[i]) over the (nd, ns) adjacency,
    each pair counted with its multiplicity (duplicate edges), softmax over each row's neighbours."""
    nd, ns, E = rowptr.numel() - 1, x.shape[0], col.numel()
    dst = torch.repeat_interleave(torch.arange(nd), rowptr.diff())
    cnt = torch.zeros(nd, ns, dtype=x.dtype).index_put((dst, col), torch.ones(E, dtype=x.dtype), accumulate=True)
    S = F.leaky_relu(a_src[None] + a_dst[:, None], slope).masked_fill(cnt[..., None] == 0, float("-inf"))
    m = S.amax(1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    P = cnt[..., None] * torch.exp(S - m)
    den = P.sum(1, keepdim=True)
    alpha = P / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("ijh,jhc->ihc", alpha, x)


def node_features(ns: int, feats: int, gen: torch.Generator, distinct: bool) -> torch.Tensor:
    """(ns, feats) float64 features; distinct: each column a shuffle of the half-integers (k + 1/2) / 4, exact in
    every dtype and never equal or zero within a column, so a max over a node's edges has one maximal source (at a
    tie torch splits the gradient between the sources where the kernels give it to the first maximal edge: a
    convention, not an error)."""
    if not distinct:
        return torch.randn(ns, feats, generator=gen, dtype=torch.float64)
    ranks = torch.argsort(torch.rand(ns, feats, generator=gen), dim=0).double()
    return (ranks - ns // 2 + 0.5) / 4


def edge_weights(num_edges: int, gen: torch.Generator, distinct: bool) -> torch.Tensor:
    """Per-edge float64 weights in [0.5, 1.5); distinct (for max): 1/2, 1 or 2 by the edge's index mod 3, so that
    with node_features' odd multiples of 1/8 no two products w x of a column are equal (nor two duplicate edges,
    adjacent in the CSR order, weighted alike)."""
    if distinct:
        return 2.0 ** (torch.arange(num_edges) % 3 - 1).double()
    return torch.rand(num_edges, generator=gen, dtype=torch.float64) + 0.5


GRAPHS = {"square": (37, 37, 151), "bipartite": (23, 41, 97), "tiny": (3, 2, 2)}


def _run(fn, args, dy):
    ins = [a.detach().requires_grad_(True) for a in args]
    y = fn(*ins)
    return y.detach(), torch.autograd.grad(y, ins, dy)


def _check(ours_fn, torch_fn, dense_fn, args64, dy64, dtype, what):
    args = [a.to(dtype) for a in args64]
    dy = dy64.to(dtype)
    ours = _run(ours_fn, args, dy)
    theirs = _run(torch_fn, args, dy)
    ref = _run(dense_fn, [a.double() for a in args], dy.double())
    assert_within_torch_error(ours[0], theirs[0], ref[0], f"{what} out")
    for k, (a, b, c) in enumerate(zip(ours[1], theirs[1], ref[1])):
        assert_within_torch_error(a, b, c, f"{what} grad {k}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("given_csc", [True, False], ids=["csc", "no-csc"])
def test_graph_aggregate(dtype, reduce, graph, weighted, given_csc):
    nd, ns, E = GRAPHS[graph]
    rowptr, col = make_graph(nd, ns, E, seed=nd)
    gen = torch.Generator().manual_seed(1)
    feats = 13
    x = node_features(ns, feats, gen, reduce == "max")
    w = edge_weights(col.numel(), gen, reduce == "max") if weighted else None
    dy = torch.randn(nd, feats, generator=gen, dtype=torch.float64)
    csc = graph_csc(rowptr, col, ns) if given_csc else None
    args = [x] + ([w] if weighted else [])

    def split(fn):
        return lambda x, *w: fn(x, w[0] if w else None)

    _check(split(lambda x, w: tritium.graph_aggregate(x, rowptr, col, w, reduce, csc=csc)),
           split(lambda x, w: reference.graph_aggregate(x, rowptr, col, w, reduce)),
           split(lambda x, w: dense_aggregate(x, rowptr, col, w, reduce)), args, dy, dtype, f"{reduce} {graph}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("heads,channels", [(1, 7), (3, 5), (2, 33)])
@pytest.mark.parametrize("given_csc", [True, False], ids=["csc", "no-csc"])
def test_gat_aggregate(dtype, graph, heads, channels, given_csc):
    nd, ns, E = GRAPHS[graph]
    rowptr, col = make_graph(nd, ns, E, seed=nd + 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(ns, heads, channels, generator=gen, dtype=torch.float64)
    a_src = torch.randn(ns, heads, generator=gen, dtype=torch.float64) * 2
    a_dst = torch.randn(nd, heads, generator=gen, dtype=torch.float64) * 2
    dy = torch.randn(nd, heads, channels, generator=gen, dtype=torch.float64)
    csc = graph_csc(rowptr, col, ns) if given_csc else None
    _check(lambda x, s, d: tritium.gat_aggregate(x, s, d, rowptr, col, 0.2, csc=csc),
           lambda x, s, d: reference.gat_aggregate(x, s, d, rowptr, col, 0.2),
           lambda x, s, d: dense_gat(x, s, d, rowptr, col, 0.2), [x, a_src, a_dst], dy, dtype, f"gat {graph}")


def test_isolated_nodes_are_zero():
    rowptr = torch.tensor([0, 0, 2, 2])
    col = torch.tensor([0, 1])
    x = torch.randn(2, 4)
    for reduce in ("sum", "mean", "max"):
        out = tritium.graph_aggregate(x, rowptr, col, reduce=reduce)
        assert out[0].eq(0).all() and out[2].eq(0).all()
    out = tritium.gat_aggregate(x.view(2, 2, 2), torch.randn(2, 2), torch.randn(3, 2), rowptr, col)
    assert out[0].eq(0).all() and out[2].eq(0).all()


def test_graph_csc():
    rowptr, col = make_graph(37, 37, 151)
    ptr, dst, perm = graph_csc(rowptr, col, 37)
    edst = torch.repeat_interleave(torch.arange(37), rowptr.diff())
    assert torch.equal(col[perm], torch.sort(col, stable=True).values)
    assert torch.equal(dst, edst[perm])
    assert torch.equal(ptr.diff(), torch.bincount(col, minlength=37))


def test_compile():
    rowptr, col = make_graph(37, 37, 151)
    x = torch.randn(37, 8, requires_grad=True)
    csc = graph_csc(rowptr, col, 37)
    f = torch.compile(lambda x: tritium.graph_aggregate(x, rowptr, col, reduce="mean", csc=csc).square().sum(),
                      fullgraph=False)
    (g,) = torch.autograd.grad(f(x), x)
    (g_ref,) = torch.autograd.grad(reference.graph_aggregate(x, rowptr, col, reduce="mean").square().sum(), x)
    torch.testing.assert_close(g, g_ref)


# ---- bad inputs: errors naming the argument ----
def _good():
    rowptr, col = make_graph(7, 7, 11)
    return torch.randn(7, 3), rowptr, col


@pytest.mark.parametrize("case,exc,match", [
    ("rowptr_decreasing", ValueError, "rowptr must be non-decreasing"),
    ("rowptr_end", ValueError, "rowptr must run from 0 to len"),
    ("rowptr_dtype", TypeError, "rowptr must be a 1-D int64"),
    ("col_range", ValueError, "col must index the 7 source"),
    ("col_negative", ValueError, "col must index"),
    ("col_dtype", TypeError, "col must be a 1-D int64"),
    ("x_int", TypeError, "x must be a floating-point"),
    ("x_dim", ValueError, "x must be 2-D"),
    ("weight_dtype", TypeError, "weight must have x's dtype"),
    ("weight_len", ValueError, "weight must have one entry per edge"),
    ("reduce", ValueError, "reduce must be one of"),
    ("csc_len", ValueError, "csc's csc_dst must have"),
])
def test_bad_inputs(case, exc, match):
    x, rowptr, col = _good()
    kw = {}
    if case == "rowptr_decreasing":
        rowptr = rowptr.clone()
        rowptr[3], rowptr[4] = rowptr[4] + 1, rowptr[3]
    elif case == "rowptr_end":
        rowptr = rowptr.clone()
        rowptr[-1] += 1
    elif case == "rowptr_dtype":
        rowptr = rowptr.int()
    elif case == "col_range":
        col = col.clone()
        col[2] = 7
    elif case == "col_negative":
        col = col.clone()
        col[0] = -1
    elif case == "col_dtype":
        col = col.float()
    elif case == "x_int":
        x = x.long()
    elif case == "x_dim":
        x = x[None]
    elif case == "weight_dtype":
        kw["weight"] = torch.ones(col.numel(), dtype=torch.float64)
    elif case == "weight_len":
        kw["weight"] = torch.ones(col.numel() + 1)
    elif case == "reduce":
        kw["reduce"] = "min"
    elif case == "csc_len":
        ptr, dst, perm = graph_csc(rowptr, col, 7)
        kw["csc"] = (ptr, dst[1:], perm)
    with pytest.raises(exc, match=match):
        tritium.graph_aggregate(x, rowptr, col, **kw)


def test_gat_bad_inputs():
    x, rowptr, col = _good()
    x3 = x.view(7, 1, 3)
    with pytest.raises(ValueError, match="a_dst must have shape"):
        tritium.gat_aggregate(x3, torch.randn(7, 1), torch.randn(6, 1), rowptr, col)
    with pytest.raises(TypeError, match="a_src must have x's dtype"):
        tritium.gat_aggregate(x3, torch.randn(7, 1, dtype=torch.float64), torch.randn(7, 1), rowptr, col)
    with pytest.raises(ValueError, match="x must be 3-D"):
        tritium.gat_aggregate(x, torch.randn(7, 1), torch.randn(7, 1), rowptr, col)
    bad = col.clone()
    bad[0] = 100
    with pytest.raises(ValueError, match="gat_aggregate: col must index"):
        tritium.gat_aggregate(x3, torch.randn(7, 1), torch.randn(7, 1), rowptr, bad)


# ---- CSRGraph: checked once, then no index reads per call ----
def test_csr_graph_matches_raw_tensors():
    rowptr, col = make_graph(37, 29, 151)
    g = tritium.CSRGraph(rowptr, col, 29)
    assert (g.num_src, g.num_dst, g.num_edges) == (29, 37, col.numel())
    assert all(torch.equal(a, b) for a, b in zip(g.csc, graph_csc(rowptr, col, 29)))
    x = torch.randn(29, 5, requires_grad=True)
    w = torch.rand(col.numel(), requires_grad=True)
    for reduce in ("sum", "mean", "max"):
        a = tritium.graph_aggregate(x, g, weight=w, reduce=reduce)
        b = tritium.graph_aggregate(x, rowptr, col, w, reduce)
        torch.testing.assert_close(a, b)
        ga = torch.autograd.grad(a.square().sum(), (x, w))
        gb = torch.autograd.grad(b.square().sum(), (x, w))
        torch.testing.assert_close(ga, gb)
    x3, s, d = torch.randn(29, 2, 3), torch.randn(29, 2), torch.randn(37, 2)
    torch.testing.assert_close(tritium.gat_aggregate(x3, s, d, g), tritium.gat_aggregate(x3, s, d, rowptr, col))


def test_csr_graph_reads_no_index_values(monkeypatch):
    """With a CSRGraph neither call checks the indices again (the check is what syncs on CUDA and breaks
    torch.compile's graph)."""
    rowptr, col = make_graph(7, 7, 11)
    g = tritium.CSRGraph(rowptr, col, 7)
    calls = []
    monkeypatch.setattr(tritium.ops.graph, "check_graph", lambda *a: calls.append(a))
    tritium.graph_aggregate(torch.randn(7, 3), g)
    tritium.gat_aggregate(torch.randn(7, 1, 3), torch.randn(7, 1), torch.randn(7, 1), g)
    assert calls == []
    tritium.graph_aggregate(torch.randn(7, 3), rowptr, col)  # raw tensors: checked on every call
    assert len(calls) == 1


def test_csr_graph_compiles_fullgraph():
    rowptr, col = make_graph(37, 37, 151)
    g = tritium.CSRGraph(rowptr, col, 37)
    x = torch.randn(37, 8, requires_grad=True)
    f = torch.compile(lambda x: tritium.graph_aggregate(x, g, reduce="mean").square().sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(f(x), x)
    (g_ref,) = torch.autograd.grad(reference.graph_aggregate(x, rowptr, col, reduce="mean").square().sum(), x)
    torch.testing.assert_close(grad, g_ref)


def test_csr_graph_bad_inputs():
    rowptr, col = make_graph(7, 7, 11)
    bad = rowptr.clone()
    bad[-1] += 1
    with pytest.raises(ValueError, match="CSRGraph: rowptr must run from 0 to len"):
        tritium.CSRGraph(bad, col, 7)
    with pytest.raises(ValueError, match="CSRGraph: col must index the 5 source"):
        tritium.CSRGraph(rowptr, col, 5)
    with pytest.raises(TypeError, match="CSRGraph: num_src must be an int >= 0, got 7.0"):
        tritium.CSRGraph(rowptr, col, 7.0)
    ptr, dst, perm = graph_csc(rowptr, col, 7)
    with pytest.raises(ValueError, match="CSRGraph: csc's csc_perm must have"):
        tritium.CSRGraph(rowptr, col, 7, csc=(ptr, dst, perm[1:]))
    g = tritium.CSRGraph(rowptr, col, 7)
    with pytest.raises(ValueError, match="graph_aggregate: the CSRGraph has 7 source nodes but x has 6 rows"):
        tritium.graph_aggregate(torch.randn(6, 3), g)
    with pytest.raises(TypeError, match="gat_aggregate: with a CSRGraph, col and csc must be omitted"):
        tritium.gat_aggregate(torch.randn(7, 1, 3), torch.randn(7, 1), torch.randn(7, 1), g, col)
    with pytest.raises(TypeError, match="graph_aggregate: col must be given with a raw rowptr"):
        tritium.graph_aggregate(torch.randn(7, 3), rowptr)
