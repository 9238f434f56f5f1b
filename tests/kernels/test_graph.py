"""Graph message passing kernels, Triton (interpreter) and C++, called through their launchers / ops directly:
graph_agg (sum, mean, max; with and without edge weights) and graph_agg_bwd (dx, dw), gat_fwd and gat_bwd, on
odd-sized graphs with isolated destinations, self loops and duplicate edges, against the float64 dense-adjacency
reference within twice the eager index_add / scatter formulation's error in each dtype; and the GPU compile check
of every launch for sm_80/sm_90."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import graph
from tritium.ops.graph import AGG_IDS, graph_csc
from tests.ops.test_graph import dense_aggregate, dense_gat, edge_weights, make_graph, node_features
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, on_device

triton_graph = on_device(graph)
CASES, IDS = impl_cases(triton_graph)


def _grads(fn, args, dy):
    ins = [a.detach().requires_grad_(True) for a in args]
    y = fn(*ins)
    return y.detach(), torch.autograd.grad(y, ins, dy)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("feats", [1, 13, 200])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_graph_agg(impl_name, impl, dtype, reduce, feats, weighted):
    nd, ns = 19, 23
    rowptr, col = make_graph(nd, ns, 61, seed=feats)
    csc = graph_csc(rowptr, col, ns)
    gen = torch.Generator().manual_seed(3)
    x64 = node_features(ns, feats, gen, reduce == "max")
    w64 = edge_weights(col.numel(), gen, reduce == "max") if weighted else None
    dy64 = torch.randn(nd, feats, generator=gen, dtype=torch.float64)
    x, dy = x64.to(dtype), dy64.to(dtype)
    w = None if w64 is None else w64.to(dtype)
    agg = AGG_IDS[reduce]
    out, arg = impl.graph_agg(x, rowptr, col, w, *csc, agg)
    dx, dw = impl.graph_agg_bwd(dy, x, rowptr, col, w, arg, *csc, agg, True, weighted)

    args = [x] + ([w] if weighted else [])
    ref = _grads(lambda x, *w: dense_aggregate(x, rowptr, col, w[0] if w else None, reduce),
                 [a.double() for a in args], dy.double())
    eager = _grads(lambda x, *w: reference.graph_aggregate(x, rowptr, col, w[0] if w else None, reduce), args, dy)
    assert_within_torch_error(out, eager[0], ref[0], "out")
    assert_within_torch_error(dx, eager[1][0], ref[1][0], "dx")
    if weighted:
        assert_within_torch_error(dw, eager[1][1], ref[1][1], "dw")
    else:
        assert dw.numel() == 0
    if reduce == "max":  # the saved edge is a maximal one of the row (-1 without edges)
        deg = rowptr.diff()
        assert (arg[deg == 0] == -1).all()
        live = arg[deg > 0]
        assert (live >= 0).all()
        rows = torch.nonzero(deg > 0)[:, 0]
        assert (live >= rowptr[rows, None]).all() and (live < rowptr[rows + 1, None]).all()


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("heads,channels", [(1, 1), (3, 7), (2, 65)])
def test_gat(impl_name, impl, dtype, heads, channels):
    nd, ns = 21, 17
    rowptr, col = make_graph(nd, ns, 57, seed=channels)
    csc = graph_csc(rowptr, col, ns)
    gen = torch.Generator().manual_seed(4)
    args64 = [torch.randn(ns, heads, channels, generator=gen, dtype=torch.float64),
              torch.randn(ns, heads, generator=gen, dtype=torch.float64) * 2,
              torch.randn(nd, heads, generator=gen, dtype=torch.float64) * 2]
    dy = torch.randn(nd, heads, channels, generator=gen, dtype=torch.float64).to(dtype)
    x, a_src, a_dst = (a.to(dtype) for a in args64)
    out, lse = impl.gat_fwd(x, a_src, a_dst, rowptr, col, *csc, 0.2)
    dx, da_src, da_dst = impl.gat_bwd(dy, x, a_src, a_dst, rowptr, col, lse, *csc, 0.2)

    args = [x, a_src, a_dst]
    ref = _grads(lambda x, s, d: dense_gat(x, s, d, rowptr, col, 0.2), [a.double() for a in args], dy.double())
    eager = _grads(lambda x, s, d: reference.gat_aggregate(x, s, d, rowptr, col, 0.2), args, dy)
    assert_within_torch_error(out, eager[0], ref[0], "out")
    for name, ours, k in (("dx", dx, 0), ("da_src", da_src, 1), ("da_dst", da_dst, 2)):
        assert_within_torch_error(ours, eager[1][k], ref[1][k], name)
    deg = rowptr.diff()
    assert torch.isinf(lse[deg == 0]).all() and torch.isfinite(lse[deg > 0]).all()


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every launch (each aggregation, weighted or not, the backward kernels, GAT's three) compiles for sm_80 and
    sm_90 without spills."""
    rowptr, col = make_graph(9, 9, 20)
    csc = graph_csc(rowptr, col, 9)

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            x, g = torch.randn(9, 200, dtype=dtype), torch.randn(9, 200, dtype=dtype)
            w = torch.rand(col.numel(), dtype=dtype)
            for agg in range(3):
                for wt in (None, w):
                    _, arg = graph.graph_agg(x, rowptr, col, wt, *csc, agg)
                    graph.graph_agg_bwd(g, x, rowptr, col, wt, arg, *csc, agg, True, wt is not None)
            x3, g3 = torch.randn(9, 4, 64, dtype=dtype), torch.randn(9, 4, 64, dtype=dtype)
            a = torch.randn(9, 4, dtype=dtype)
            _, lse = graph.gat_fwd(x3, a, a, rowptr, col, *csc, 0.2)
            graph.gat_bwd(g3, x3, a, a, rowptr, col, lse, *csc, 0.2)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_agg_fwd_kernel", "_agg_dx_kernel", "_agg_dw_kernel", "_gat_fwd_kernel",
                                        "_gat_bwd_dst_kernel", "_gat_bwd_src_kernel"}
