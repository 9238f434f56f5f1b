"""Benchmarks of the graph message passing: a GCN layer and a GAT layer, forward + backward, on a random graph of
N nodes with 9 random in-edges and a self loop each (10 N edges: 100k at the headline N = 10000), features F.

Both sides compute the layer's Linear with the same torch matmul (x @ W), so the rows compare the message
passing: tritium.graph_aggregate / tritium.gat_aggregate (the transpose given, as the models do) against the eager
index_add / scatter formulation (tritium.reference: the (edges, features) messages x[col] * w then index_add_;
GAT: scatter amax, exp, index_add of the softmax sums and of the (edges, heads, channels) messages), and against
torch.compile of it. Bytes: the rows of x (or h) gathered once per edge plus the output rows, the edge's index
and weight; forward + backward about three times that (the transpose pass over g, the edge weight or score pass).
"""
import torch

import tritium
from tritium import reference
from tritium.bench.case import OpCase, esize

IN_DEGREE = 9      # random in-edges per node, plus its self loop
HEADS, CHANNELS = 4, 16


def _graph(n, device):
    from tritium.models.zoo import build_graph

    gen = torch.Generator().manual_seed(0)
    dst = torch.arange(n).repeat_interleave(IN_DEGREE)
    src = torch.randint(n, (n * IN_DEGREE,), generator=gen)
    return build_graph(src, dst, n).to(device)


def _gcn_args(shape, dtype, device):
    n, f = shape
    g = _graph(n, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, f, generator=gen).to(device, dtype)
    w = (torch.randn(f, f, generator=gen) / f ** 0.5).to(device, dtype)
    return x, w, g.rowptr, g.col, g.gcn_weight.to(dtype), g.dst, *g.csc


def _gcn_tritium(x, w, rowptr, col, norm, dst, cp, cd, cq):
    return tritium.graph_aggregate(x @ w, rowptr, col, norm, "sum", csc=(cp, cd, cq))


def _gcn_eager(x, w, rowptr, col, norm, dst, cp, cd, cq):
    return reference.graph_aggregate(x @ w, rowptr, col, norm, "sum", dst=dst)


def _gat_args(shape, dtype, device):
    n, f = shape
    g = _graph(n, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, f, generator=gen).to(device, dtype)
    w = (torch.randn(f, HEADS * CHANNELS, generator=gen) / f ** 0.5).to(device, dtype)
    att = [(torch.randn(HEADS, CHANNELS, generator=gen) / CHANNELS ** 0.5).to(device, dtype) for _ in range(2)]
    return x, w, *att, g.rowptr, g.col, g.dst, *g.csc


def _gat_scores(x, w, att_src, att_dst):
    h = (x @ w).view(x.shape[0], HEADS, CHANNELS)
    return h, (h * att_src).sum(-1), (h * att_dst).sum(-1)


def _gat_tritium(x, w, att_src, att_dst, rowptr, col, dst, cp, cd, cq):
    return tritium.gat_aggregate(*_gat_scores(x, w, att_src, att_dst), rowptr, col, 0.2, csc=(cp, cd, cq))


def _gat_eager(x, w, att_src, att_dst, rowptr, col, dst, cp, cd, cq):
    return reference.gat_aggregate(*_gat_scores(x, w, att_src, att_dst), rowptr, col, 0.2, dst=dst)


def _edges(n):
    return n * (IN_DEGREE + 1)


def _gcn_bytes(k):
    return lambda s, d: k * ((_edges(s[0]) + s[0]) * s[1] * esize(d) + _edges(s[0]) * (8 + esize(d)))


def _gat_bytes(k):
    return lambda s, d: k * ((_edges(s[0]) + s[0]) * HEADS * CHANNELS * esize(d) + _edges(s[0]) * (8 + 4 * HEADS))


CASES = [
    OpCase("gcn_layer", _gcn_args, _gcn_tritium, _gcn_eager, _gcn_bytes(1), _gcn_bytes(3),
           shapes=((10000, 64), (10000, 16)), grad_args=(0, 1),
           note="shape = nodes x features; 10 in-edges per node (100k edges at 10000 nodes), GCN's normalised sum "
                "after x @ W; eager: x[col] * w, index_add_"),
    OpCase("gat_layer", _gat_args, _gat_tritium, _gat_eager, _gat_bytes(1), _gat_bytes(3),
           shapes=((10000, 64),), grad_args=(0, 1, 2, 3),
           note=f"shape = nodes x in-features; 10 in-edges per node, {HEADS} heads x {CHANNELS} channels; eager: "
                f"PyG's scatter softmax and index_add_ of the (edges, heads, channels) messages"),
]
