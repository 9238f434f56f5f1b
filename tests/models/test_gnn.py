"""tritium.models.zoo's graph networks (issue 26): GCN and GAT on tritium's graph kernels against their eager
index_add / scatter twins (same state_dict, same outputs and parameter gradients in float32), the stochastic block
model generator and the Graph builder, and the training recipes reaching a stated held-out node accuracy."""
import pytest
import torch

from tritium.models.zoo import GAT, GCN, build_graph, gnn_step, node_accuracy, stochastic_block_model
from tests.models.test_zoo import _assert_grads, _pair
from tests.util import need


def _data(n=157, seed=3):
    x, y, src, dst = stochastic_block_model(num_nodes=n, num_classes=3, avg_degree=5, feat_dim=11, seed=seed)
    # one node left without any edge: only its self loop remains
    keep = (src != 0) & (dst != 0)
    return x, y, build_graph(src[keep], dst[keep], n)


@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_gnn_twin_outputs_and_grads(name):
    x, y, graph = _data()
    if name == "gcn":
        ours, twin = _pair(lambda impl: GCN(11, 19, 3, impl=impl))
    else:
        ours, twin = _pair(lambda impl: GAT(11, 7, 3, heads=3, impl=impl))
    for m in (ours, twin):
        m.eval()  # no dropout: the same function
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    oa, ob = ours(xa, graph), twin(xb, graph)
    torch.testing.assert_close(oa, ob, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(oa)
    (oa * dy).sum().backward()
    (ob * dy).sum().backward()
    _assert_grads(ours, twin)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_gnn_compiles_fullgraph(name):
    """The tritium GCN / GAT under torch.compile(fullgraph=True): one graph (the Graph's checked CSRGraph leaves no
    data-dependent check to break it), the eager outputs and gradients."""
    x, y, graph = _data()
    model = GCN(11, 19, 3) if name == "gcn" else GAT(11, 7, 3, heads=3)
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    oa, ob = compiled(xa, graph), model(xb, graph)
    torch.testing.assert_close(oa, ob, rtol=1e-4, atol=1e-5)
    ga = torch.autograd.grad(oa.square().sum(), [xa, *model.parameters()])
    gb = torch.autograd.grad(ob.square().sum(), [xb, *model.parameters()])
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_gnn_twin_training_steps_agree(name):
    """Three Adam steps with dropout: the same seeds give both twins the same masks, losses and weights."""
    x, y, graph = _data()
    idx = torch.arange(0, len(y), 3)
    factory = (lambda impl: GCN(11, 19, 3, impl=impl)) if name == "gcn" else (lambda impl: GAT(11, 7, 3, 2, impl=impl))
    ours, twin = _pair(factory)
    losses = []
    for m in (ours, twin):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        torch.manual_seed(5)
        losses.append([float(gnn_step(m, opt, x, graph, y, idx)) for _ in range(3)])
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(ours.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_stochastic_block_model():
    x, y, src, dst = stochastic_block_model(num_nodes=600, num_classes=4, avg_degree=10, within=0.75, seed=7)
    x2, y2, src2, dst2 = stochastic_block_model(num_nodes=600, num_classes=4, avg_degree=10, within=0.75, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(src, src2) and torch.equal(dst, dst2)
    assert x.shape == (600, 32) and x.dtype == torch.float32 and y.max() == 3
    assert (src != dst).all()                                       # no self loops
    key = src * 600 + dst
    assert torch.equal(torch.unique(key), torch.sort(key).values)   # no duplicates
    assert torch.equal(torch.sort(key).values, torch.sort(dst * 600 + src).values)  # undirected
    assert 8 <= src.numel() / 600 <= 10.5                           # the mean degree (minus dropped pairs)
    assert 0.7 <= (y[src] == y[dst]).float().mean() <= 0.8          # the share of edges within a block


def test_build_graph():
    src, dst = torch.tensor([2, 0, 1, 2]), torch.tensor([0, 1, 0, 1])
    g = build_graph(src, dst, 4)
    assert g.rowptr.tolist() == [0, 3, 6, 7, 8]                       # node 0: 0 (loop), 1, 2; node 3: its loop
    assert g.col.tolist() == [0, 1, 2, 0, 1, 2, 2, 3]
    assert g.dst.tolist() == [0, 0, 0, 1, 1, 1, 2, 3]
    deg = torch.tensor([3.0, 3, 1, 1])
    torch.testing.assert_close(g.gcn_weight, (deg[g.col] * deg[g.dst]).rsqrt())


@pytest.mark.parametrize("name,steps,floor", [("gcn", 60, 0.95), ("gat", 60, 0.95)])
def test_gnn_recipe_accuracy(name, steps, floor):
    """A short run of the recipe (60 of its 200 steps) classifies the held-out 90% of the nodes at least 95%
    right, above the node features alone by a margin (the graph's share)."""
    need("sklearn")
    from tritium.cli.train import train_gnn

    r = train_gnn(name, "tritium", epochs=steps)
    assert r["accuracy"] >= floor and r["accuracy"] >= r["features_only"] + 0.15, r


def test_node_accuracy_uses_eval_mode():
    x, y, graph = _data()
    model = GCN(11, 19, 3, dropout=0.9)
    model.train()
    a = node_accuracy(model, x, graph, y, torch.arange(len(y)))
    assert not model.training and a == node_accuracy(model, x, graph, y, torch.arange(len(y)))


def test_train_command_line(capfd):
    """tritium train --model gcn runs the recipe (a few steps here) and prints the held-out accuracy; a bad option
    is status 2 and one error line naming it."""
    from tritium.cli import main

    assert main(["train", "--model", "gat", "--epochs", "0"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tritium: error: ") and "--epochs" in err[0], err
    need("sklearn")
    assert main(["train", "--model", "gcn", "--epochs", "3", "--impl", "torch"]) == 0
    out = capfd.readouterr().out
    assert "gcn (torch): held-out node accuracy" in out and "after 3 steps" in out, out
