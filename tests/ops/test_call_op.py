"""call_op's eager autograd path (ops/_library.py): a public function that records a backward applies the op's lean
autograd.Function, whose setup_context and backward are the very functions register_autograd was given. Checked
against the registered autograd (the same calls with the lean Functions taken away, so call_op calls the op through
register_autograd's wrapper): the same values and gradients bit for bit (the same kernels), double backward where
the formula allows it, gradcheck, and torch.compile graphs that still record the tritium ops."""
import pytest
import torch

import tritium
from tritium.ops import _library


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype).requires_grad_(True) for s in shapes]


def _graph(x, w):
    rowptr, col = torch.tensor([0, 2, 3, 3, 6]), torch.tensor([0, 4, 1, 2, 3, 4])
    return tritium.graph_aggregate(x, tritium.CSRGraph(rowptr, col, 5), weight=w)


# name -> factory of (fn, inputs): fn(*inputs) a tensor or a tuple of tensors; the float inputs that require grad
# are differentiated. One call per family shape of the op table: single and tuple outputs, integer outputs,
# None gradients for non-tensor and frozen arguments, materialize_grads off (fused_linear_cross_entropy), schema
# defaults left out (distill_fwd without a target).
CASES = {
    "silu": lambda: (tritium.silu, _leaves((5, 7))),
    "leaky_relu_strided": lambda: (lambda x: tritium.leaky_relu(x.t(), 0.2), _leaves((6, 4))),
    "swiglu_separate": lambda: (tritium.swiglu, _leaves((4, 6), (4, 6))),
    "glu": lambda: (tritium.glu, _leaves((3, 8))),
    "dyt": lambda: (tritium.dyt, _leaves((4, 6), (1,), (6,), (6,))),
    "prelu": lambda: (tritium.prelu, _leaves((2, 3, 5), (3,))),
    "swish_beta": lambda: (tritium.swish, _leaves((4, 5), (1,))),
    "batch_norm_act_residual": lambda: (
        lambda x, w, b, r: tritium.batch_norm_act(x, torch.zeros(3), torch.ones(3), w, b, 1e-5, "gelu", r),
        _leaves((2, 3, 4), (3,), (3,), (2, 3, 4))),
    "layer_norm": lambda: (lambda x, w, b: tritium.layer_norm(x, (6,), w, b), _leaves((3, 6), (6,), (6,))),
    "rms_norm_no_weight": lambda: (lambda x: tritium.rms_norm(x, (6,)), _leaves((3, 6))),
    "group_norm": lambda: (lambda x, w, b: tritium.group_norm(x, 2, w, b), _leaves((2, 4, 5), (4,), (4,))),
    "softmax": lambda: (lambda x: tritium.softmax(x, -1), _leaves((3, 9))),
    "log_softmax_dim0": lambda: (lambda x: tritium.log_softmax(x, 0), _leaves((4, 3))),
    "cross_entropy": lambda: (lambda x: tritium.cross_entropy(x, torch.tensor([1, 0, 4])), _leaves((3, 5))),
    "cross_entropy_z": lambda: (lambda x: tritium.cross_entropy(x, torch.tensor([1, 0, 4]), z_loss=1e-3),
                                _leaves((3, 5))),
    "kl_div": lambda: (lambda x, t: tritium.kl_div(x, t.softmax(-1), reduction="batchmean"), _leaves((3, 5), (3, 5))),
    "distill_no_target": lambda: (lambda s, t=torch.randn(3, 5): tritium.distillation_loss(s, t, 2.0),
                                  _leaves((3, 5))),
    "flce": lambda: (lambda h, w: tritium.fused_linear_cross_entropy(h, w, torch.tensor([1, 0, 6, 2])),
                     _leaves((4, 3), (7, 3))),
    "mse_loss": lambda: (tritium.mse_loss, _leaves((4, 5), (4, 5))),
    "triplet_margin_loss": lambda: (lambda a, p, n: tritium.triplet_margin_loss(a, p, n, margin=2.0),
                                    _leaves((5, 4), (5, 4), (5, 4))),
    "info_nce": lambda: (lambda q, k: tritium.info_nce(q, k, normalize=False), _leaves((6, 4), (6, 4))),
    "max_pool2d": lambda: (lambda x: tritium.max_pool2d(x, 2), _leaves((2, 3, 4, 6))),
    "kan_spline": lambda: (lambda x, w: tritium.kan_spline(x, torch.linspace(-2, 2, 9).repeat(3, 1), w),
                           _leaves((4, 3), (2, 3, 5))),
    "wavenet_gate": lambda: (tritium.wavenet_gate, _leaves((2, 6, 5), (2, 6, 5))),
    "graph_aggregate": lambda: (_graph, _leaves((5, 3), (6,))),
    "rope": lambda: (lambda q, k: tritium.rope(q, k, *tritium.rope_tables(8, 4), torch.tensor([3, 0, 7])),
                     _leaves((3, 2, 4), (3, 1, 4))),
    "flash_attention": lambda: (lambda q, k, v: tritium.flash_attention(q, k, v, causal=True),
                                _leaves((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8))),
}


def _nodes(outs):
    """The type names of every autograd node behind the tensors outs."""
    seen, names, todo = set(), set(), [t.grad_fn for t in outs if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def _run(fn, inputs, cotangents=None, create_graph=False):
    out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    if cotangents is None:
        g = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    need = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(outs, need, cotangents, create_graph=create_graph)
    return outs, grads, cotangents


def _without_lean(monkeypatch):
    monkeypatch.setattr(_library, "_LEAN", {})


@pytest.mark.parametrize("case", list(CASES))
def test_lean_matches_registered_autograd(case, monkeypatch):
    fn, inputs = CASES[case]()
    outs, grads, cot = _run(fn, inputs)
    lean_nodes = _nodes(outs)
    assert any(n.startswith("Lean_tritium_") for n in lean_nodes), lean_nodes
    assert not any(n.startswith("GeneratedBackwardFor_tritium_") for n in lean_nodes), lean_nodes

    _without_lean(monkeypatch)
    outs_r, grads_r, _ = _run(fn, inputs, cot)
    registered_nodes = _nodes(outs_r)
    assert any(n.startswith("GeneratedBackwardFor_tritium_") for n in registered_nodes), registered_nodes
    assert not any(n.startswith("Lean_") for n in registered_nodes), registered_nodes
    for a, b in zip(outs + list(grads), outs_r + list(grads_r)):
        assert torch.equal(a, b)


def test_lean_covers_every_op_with_autograd():
    """Every op define_op gave a backward has a lean Function (none of them takes keyword-only arguments, tensor
    lists or a mutated argument, which would keep them on the wrapper)."""
    with_autograd = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("tritium::")
                     and torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")}
    assert "tritium::silu_fwd" in with_autograd
    assert {op._qualified_op_name for op in _library._LEAN} == with_autograd


def test_no_grad_goes_below_autograd():
    x = torch.randn(4, 5, requires_grad=True)
    with torch.no_grad():
        assert tritium.silu(x).grad_fn is None
    assert tritium.silu(x.detach()).grad_fn is None


def test_double_backward_matches(monkeypatch):
    """rope's backward is its forward op rotated back, itself differentiable: second derivatives through the lean
    Function equal the registered autograd's."""
    def second(fn, inputs):
        outs, grads, _ = _run(fn, inputs, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), inputs)

    fn, inputs = CASES["rope"]()

    def squared(q, k):  # rope is linear: the square gives its gradient a derivative in q and k
        return tuple(o * o for o in fn(q, k))

    lean = second(squared, inputs)
    _without_lean(monkeypatch)
    registered = second(squared, inputs)
    for a, b in zip(lean, registered):
        assert torch.equal(a, b)


def test_gradcheck_through_lean():
    x, w, b = _leaves((3, 6), (6,), (6,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: tritium.layer_norm(x_, (6,), w_, b_), (x, w, b))
    q, k = _leaves((3, 2, 4), (3, 1, 4), dtype=torch.float64)
    cos, sin = (t.double() for t in tritium.rope_tables(8, 4))
    pos = torch.tensor([3, 0, 7])
    assert torch.autograd.gradgradcheck(lambda q_, k_: tritium.rope(q_, k_, cos, sin, pos), (q, k))


def test_autocast_through_lean(monkeypatch):
    """Under CPU autocast tritium.mse_loss computes in float32 (torch's policy for its twin) through the lean
    Function, as through the registered autograd."""
    def run():
        x, t = (torch.randn(4, 5, generator=torch.Generator().manual_seed(i)).bfloat16().requires_grad_(True)
                for i in (0, 1))
        with torch.autocast("cpu", torch.bfloat16):
            loss = tritium.mse_loss(x, t)
        return loss, _nodes([loss]), torch.autograd.grad(loss, (x, t))

    loss, nodes, grads = run()
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    assert "Lean_tritium_loss_fwd_gradBackward" in nodes, nodes
    _without_lean(monkeypatch)
    loss_r, nodes_r, grads_r = run()
    assert "GeneratedBackwardFor_tritium_loss_fwd_grad_defaultBackward" in nodes_r, nodes_r
    assert torch.equal(loss, loss_r) and all(torch.equal(a, b) for a, b in zip(grads, grads_r))


def test_reference_backend_records_no_lean(reference_backend):
    x = torch.randn(4, 5, requires_grad=True)
    assert not any(n.startswith("Lean_") for n in _nodes([tritium.silu(x)]))


def test_compiled_graph_records_the_ops():
    """Under torch.compile(fullgraph=True) call_op calls the op itself: the graph holds tritium::silu_fwd and
    tritium::layer_norm_fwd (whose autograd is then register_autograd's, traced by AOTAutograd), and the compiled
    gradients equal eager's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def f(x, w, b):
        return tritium.layer_norm(tritium.silu(x), (6,), w, b).sum()

    torch._dynamo.reset()
    inputs = _leaves((3, 6), (6,), (6,))
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out_c = compiled(*inputs)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("tritium.silu_fwd" in t for t in targets), targets
    assert any("tritium.layer_norm_fwd" in t for t in targets), targets
    out = f(*inputs)
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(torch.autograd.grad(out_c, inputs), torch.autograd.grad(out, inputs))
