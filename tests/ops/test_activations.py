"""The public activation functions and modules as drop-ins: torch's results, gradients, in-place semantics,
errors, edge shapes, gradcheck, torch.compile, hypothesis shapes and tritium.patch."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import tritium
from tritium import reference
from tests.util import CPU_DTYPES, assert_within_torch_error, streamed_stores

# (name, tritium fn, torch twin) with non-default arguments where the function has any
DROP_INS = [
    ("relu", tritium.relu, F.relu),
    ("leaky_relu", tritium.leaky_relu, F.leaky_relu),
    ("leaky_relu_0.2", lambda x: tritium.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
    ("elu", lambda x: tritium.elu(x, alpha=0.8), lambda x: F.elu(x, alpha=0.8)),
    ("selu", tritium.selu, F.selu),
    ("celu", lambda x: tritium.celu(x, 1.0), lambda x: F.celu(x, 1.0)),
    ("sigmoid", tritium.sigmoid, torch.sigmoid),
    ("tanh", tritium.tanh, torch.tanh),
    ("softplus", tritium.softplus, F.softplus),
    ("softplus_b", lambda x: tritium.softplus(x, beta=2, threshold=5), lambda x: F.softplus(x, beta=2, threshold=5)),
    ("gelu", tritium.gelu, F.gelu),
    ("gelu_tanh", lambda x: tritium.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    ("silu", tritium.silu, F.silu),
    ("mish", tritium.mish, F.mish),
    ("logsigmoid", tritium.logsigmoid, F.logsigmoid),
    ("hardswish", tritium.hardswish, F.hardswish),
    ("swish", lambda x: tritium.swish(x, 0.6), lambda x: x * torch.sigmoid(0.6 * x)),
    ("glu", tritium.glu, F.glu),
    ("glu_dim1", lambda x: tritium.glu(x, 1), lambda x: F.glu(x, 1)),
    ("swiglu", tritium.swiglu, lambda x: F.silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1]),
    ("geglu", tritium.geglu, lambda x: F.gelu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1]),
    ("geglu_tanh", lambda x: tritium.geglu(x, approximate="tanh"),
     lambda x: F.gelu(x.chunk(2, -1)[0], approximate="tanh") * x.chunk(2, -1)[1]),
]
IDS = [d[0] for d in DROP_INS]
INPLACE = [("relu", F.relu), ("leaky_relu", F.leaky_relu), ("elu", F.elu), ("selu", F.selu), ("celu", F.celu),
           ("silu", F.silu), ("mish", F.mish), ("hardswish", F.hardswish)]


def _views(dtype):
    """Odd shapes and layouts: contiguous, 0-d, a column slice (strided rows), a transpose, one element."""
    base = torch.randn(6, 10, 14, dtype=torch.float64) * 3
    return {
        "contig": base.to(dtype),
        "slice": base.to(dtype)[:, :, 2:12],
        "transposed": base.to(dtype).transpose(0, 2),
        "rows": base.to(dtype)[::2],
        "single": base.to(dtype)[:1, :2, :2],
    }


def _check(fn, twin, x, what):
    xt = x.detach().clone().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    ty, ry, y = twin(xt), twin(xr), fn(xo)
    assert y.shape == ty.shape and y.dtype == ty.dtype
    dy = torch.randn_like(ry).to(x.dtype)  # rounded, as x: the float64 reference sees the same values
    (tg,), (rg,), (g,) = (torch.autograd.grad(o, i, dy.to(o.dtype)) for o, i in ((ty, xt), (ry, xr), (y, xo)))
    assert_within_torch_error(y.detach(), ty.detach(), ry.detach(), f"{what} y")
    assert_within_torch_error(g, tg, rg, f"{what} dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name,fn,twin", DROP_INS, ids=IDS)
def test_drop_in(name, fn, twin, dtype):
    for layout, x in _views(dtype).items():
        _check(fn, twin, x, f"{name} {layout}")


# one activation per kernel shape (unary, gated in each layout) for the streamed-store path
STREAMED = [d for d in DROP_INS if d[0] in ("relu", "gelu", "sigmoid", "glu", "swiglu", "geglu_tanh")] + [
    ("swiglu_separate", lambda x: tritium.swiglu(*x.chunk(2, -1)), lambda x: F.silu(x.chunk(2, -1)[0]) *
     x.chunk(2, -1)[1]),
    ("dyt", lambda x: tritium.dyt(x, torch.tensor([0.7], dtype=x.dtype), torch.linspace(-1, 1, x.shape[-1],
                                                                                        dtype=x.dtype),
                                  torch.linspace(0, 1, x.shape[-1], dtype=x.dtype)),
     lambda x: torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype) * torch.tanh(0.7 * x)
     + torch.linspace(0, 1, x.shape[-1], dtype=x.dtype)),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("name,fn,twin", STREAMED, ids=[d[0] for d in STREAMED])
def test_streamed_outputs(name, fn, twin, dtype):
    """Outputs written around the cache (vec.h stream_outputs; here at any size): rows whose starts are aligned for
    a streamed vector (width 128) and rows that are not, with a partial last vector (width 134: gated halves of 67),
    and a strided input; values and gradients as torch's."""
    base = torch.randn(5, 3, 268, dtype=torch.float64) * 3
    with streamed_stores():
        for what, x in (("aligned", base[..., :128]), ("odd", base[..., :134]), ("contig", base[..., :134].clone())):
            _check(fn, twin, x.to(dtype), f"{name} {what}")


@pytest.mark.parametrize("name,fn,twin", [d for d in DROP_INS if not d[0].startswith(("glu", "swiglu", "geglu"))],
                         ids=[i for i in IDS if not i.startswith(("glu", "swiglu", "geglu"))])
def test_edge_shapes(name, fn, twin):
    for x in (torch.tensor(0.7), torch.tensor(-1.3), torch.empty(0), torch.empty(3, 0, 2), torch.randn(1)):
        y, ty = fn(x), twin(x)
        assert y.shape == ty.shape and y.dtype == ty.dtype
        torch.testing.assert_close(y, ty)
    xi = torch.arange(-3, 4)  # integer input: torch's own behaviour (a result or its error)
    try:
        expected = twin(xi)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            fn(xi)
    else:
        torch.testing.assert_close(fn(xi), expected)


@pytest.mark.parametrize("name,twin", INPLACE, ids=[n for n, _ in INPLACE])
def test_inplace(name, twin):
    fn = getattr(tritium, name)
    x = torch.randn(5, 33)
    for view in (lambda t: t, lambda t: t[:, 3:30], lambda t: t.t()):
        a, b = x.clone(), x.clone()
        out = fn(view(a), inplace=True)
        ref = twin(view(b), inplace=True)
        torch.testing.assert_close(a, b)  # written into the input (and only into the viewed part)
        torch.testing.assert_close(out, ref)
        assert out.data_ptr() == view(a).data_ptr()
    leaf = x.clone().requires_grad_(True)  # torch refuses in-place on a leaf that requires grad
    with pytest.raises(RuntimeError, match="leaf Variable"):
        twin(x.clone().requires_grad_(True), inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        fn(leaf, inplace=True)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)  # non-leaf: gradients as torch's
    ga, = torch.autograd.grad(fn(a * 2, inplace=True).sum(), a)
    gb, = torch.autograd.grad(twin(b * 2, inplace=True).sum(), b)
    torch.testing.assert_close(ga, gb)
    with torch.no_grad():  # no autograd: the kernel writes even into a leaf that requires grad
        c = x.clone().requires_grad_(True)
        fn(c, inplace=True)
        torch.testing.assert_close(c, twin(x))


@pytest.mark.parametrize("name,fn,twin", DROP_INS, ids=IDS)
def test_gradcheck(name, fn, twin):
    x = (torch.randn(3, 4, 6, dtype=torch.float64) * 2).requires_grad_(True)
    # keep clear of the kinks, where finite differences are meaningless
    with torch.no_grad():
        x[(x.abs() < 0.05) | ((x.abs() - 3).abs() < 0.05)] += 0.2
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_params():
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(tritium.dyt, (x, alpha, w, b))
    pw = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tritium.prelu, (x, pw))                    # channels before inner dims
    assert torch.autograd.gradcheck(tritium.prelu, (x[:, :, 0].contiguous(), pw))  # channels last
    assert torch.autograd.gradcheck(tritium.prelu, (x, pw[:1]))                # one slope
    g, u = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(tritium.swiglu, (g, u))
    assert torch.autograd.gradcheck(lambda a, c: tritium.geglu(a, c, approximate="tanh"), (g, u))
    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tritium.swish, (x, beta))
    assert "swish_beta" in tritium.swish(x, beta).grad_fn.next_functions[0][0].name()  # the kernel ran
    per_channel = torch.rand(1, 5, 1, dtype=torch.float64, requires_grad=True)  # broadcast: torch's composition
    assert torch.autograd.gradcheck(tritium.swish, (x, per_channel))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_swish_learnable_beta_matches_torch(dtype):
    x = torch.randn(3, 4, 33, dtype=torch.float64)[..., ::2]   # non-contiguous
    for beta0 in (torch.tensor(1.4), torch.tensor([0.3])):
        outs = {}
        for d in (dtype, torch.float64):
            # inputs rounded to dtype first: the float64 reference sees the values the dtype run sees
            xi, bi = x.to(dtype).to(d).requires_grad_(), beta0.to(dtype).to(d).requires_grad_()
            for name, fn in (("ours", tritium.swish), ("torch", lambda a, b: a * torch.sigmoid(b * a))):
                if name == "ours" and d == torch.float64 and dtype != torch.float64:
                    continue
                y = fn(xi, bi)
                outs[name, d] = (y.detach(), *torch.autograd.grad(y, (xi, bi), torch.ones_like(y)))
        for i, what in enumerate(("y", "dx", "dbeta")):
            assert outs["ours", dtype][i].shape == outs["torch", dtype][i].shape
            assert_within_torch_error(outs["ours", dtype][i], outs["torch", dtype][i],
                                      outs["torch", torch.float64][i].double(), what)


def test_params_match_torch():
    x = torch.randn(4, 6, 10)
    for C in (1, 6):
        w = torch.rand(C)
        torch.testing.assert_close(tritium.prelu(x, w), F.prelu(x, w))
    xt, w10 = x.transpose(1, 2), torch.rand(10)  # strided channels: the reference
    torch.testing.assert_close(tritium.prelu(xt, w10), F.prelu(xt, w10))
    a, wt, bt = torch.tensor([0.5]), torch.randn(10), torch.randn(10)
    torch.testing.assert_close(tritium.dyt(x, a, wt, bt), wt * torch.tanh(0.5 * x) + bt)
    torch.testing.assert_close(tritium.dyt(x, a.reshape(()), wt, bt), wt * torch.tanh(0.5 * x) + bt)
    up = torch.randn(4, 6, 10)
    torch.testing.assert_close(tritium.swiglu(x, up), F.silu(x) * up)
    torch.testing.assert_close(tritium.swiglu(x, up[:1]), F.silu(x) * up[:1])  # broadcasting: torch's
    torch.testing.assert_close(tritium.geglu(x, up), F.gelu(x) * up)


def test_errors_match_torch():
    cases = [
        (lambda: tritium.glu(torch.randn(3, 5)), lambda: F.glu(torch.randn(3, 5))),
        (lambda: tritium.glu(torch.tensor(1.0)), lambda: F.glu(torch.tensor(1.0))),
        (lambda: tritium.glu(torch.randn(4, 4), 2), lambda: F.glu(torch.randn(4, 4), 2)),
        (lambda: tritium.gelu(torch.randn(3), approximate="fast"), lambda: F.gelu(torch.randn(3), approximate="fast")),
        (lambda: tritium.celu(torch.randn(3), 0.0), lambda: F.celu(torch.randn(3), 0.0)),
        (lambda: tritium.prelu(torch.randn(3, 4), torch.rand(3)), lambda: F.prelu(torch.randn(3, 4), torch.rand(3))),
        (lambda: tritium.relu("x"), lambda: F.relu("x")),
    ]
    for ours, theirs in cases:
        with pytest.raises(Exception) as expected:
            theirs()
        with pytest.raises(expected.type):
            ours()
    with pytest.raises(ValueError, match="even"):
        tritium.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="even"):
        tritium.geglu(torch.randn(3, 5))


def test_fused_layout_one_gradient():
    """swiglu/geglu on [gate | up]: one output of half width, one gradient of the input's shape, equal to the
    unfused computation's."""
    x = torch.randn(4, 3, 22, requires_grad=True)
    y = tritium.swiglu(x)
    assert y.shape == (4, 3, 11)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(F.silu(xr[..., :11]) * xr[..., 11:], xr, dy)
    torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_backward_from_output(name, dtype):
    """A 16-bit sigmoid or tanh on the CPU differentiates from its saved output with torch's backward (dy y (1 - y),
    dy (1 - y^2)) bit for bit, under torch.compile too; float32 recomputes from x with tritium's backward op."""
    fn = getattr(tritium, name)
    x = (torch.randn(3, 70) * 3).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 70).to(dtype)
    y = fn(x)
    (g,) = torch.autograd.grad(y, x, dy)
    if dtype == torch.float32:
        expect = getattr(torch.ops.tritium, f"{name}_bwd")(dy, x.detach(), 0, 0, 0)
    else:
        expect = getattr(torch.ops.aten, f"{name}_backward")(dy, y.detach())
    assert torch.equal(g, expect)
    (gc,) = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), x, dy)
    assert torch.equal(gc, expect)


def test_compile_fullgraph():
    def f(x, gu, a, w, b):
        h = tritium.gelu(x) + tritium.silu(x) + tritium.relu(x) + tritium.dyt(x, a, w, b)
        return h.sum() + tritium.swiglu(gu).sum() + tritium.glu(gu).sum()

    args = [torch.randn(5, 8), torch.randn(5, 16), torch.tensor([0.5]), torch.randn(8), torch.randn(8)]
    args = [a.requires_grad_(True) for a in args]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, out_c = f(*args), compiled(*args)
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(torch.autograd.grad(out_c, args), torch.autograd.grad(out, args))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 37), min_size=1, max_size=3), half=st.integers(1, 19),
       name=st.sampled_from(["gelu", "silu", "mish", "tanh", "softplus", "leaky_relu"]))
def test_hypothesis_shapes(shape, half, name):
    x = torch.randn(*shape)
    torch.testing.assert_close(getattr(tritium, name)(x), getattr(F, name)(x), rtol=2e-6, atol=1e-6)
    gu = torch.randn(*shape[:-1], 2 * half)
    torch.testing.assert_close(tritium.swiglu(gu), F.silu(gu[..., :half]) * gu[..., half:])
    torch.testing.assert_close(tritium.glu(gu), F.glu(gu))


def test_modules_and_patch():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.GELU(approximate="tanh"), torch.nn.SiLU(),
        torch.nn.Mish(), torch.nn.LeakyReLU(0.1), torch.nn.ELU(0.7), torch.nn.SELU(), torch.nn.CELU(2.0),
        torch.nn.Softplus(2.0, 4.0), torch.nn.Sigmoid(), torch.nn.Tanh(), torch.nn.Hardswish(),
        torch.nn.LogSigmoid(), torch.nn.PReLU(8), torch.nn.Linear(8, 16), torch.nn.GLU())
    x = torch.randn(3, 8)
    ref = model(x)
    replaced = tritium.patch(model)
    assert len(replaced) == 17  # the 15 activations and both Linears (tritium.nn.Linear)
    assert isinstance(model[1], tritium.nn.ReLU) and isinstance(model[1], torch.nn.ReLU)
    torch.testing.assert_close(model(x), ref)
    assert "approximate='tanh'" in repr(model[2])


def test_gated_mlp_blocks():
    dim, hidden = 8, 12
    gate, up, down = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
    x = torch.randn(2, 5, dim)
    block = tritium.nn.SwiGLU(dim, hidden, bias=True).load_projections(gate, up, down)
    torch.testing.assert_close(block(x), down(F.silu(gate(x)) * up(x)))
    block = tritium.nn.GeGLU(dim, hidden, bias=True, approximate="tanh").load_projections(gate, up, down)
    torch.testing.assert_close(block(x), down(F.gelu(gate(x), approximate="tanh") * up(x)))
    dyt = tritium.nn.DyT(dim, alpha_init=0.7)
    y = dyt(x)
    torch.testing.assert_close(y, torch.tanh(0.7 * x))
    y.sum().backward()
    assert all(p.grad is not None for p in dyt.parameters())
    sw = tritium.nn.Swish(1.5, learnable=True)
    sw(x).sum().backward()
    assert sw.beta.grad is not None


# ---- batch_norm_act: BatchNorm in inference + residual + activation ----
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "nc11"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", [None, "relu", "gelu_tanh", "mish"], ids=str)
def test_batch_norm_act_matches_composition(dtype, layout, residual, activation):
    """Values and gradients (input, residual, weight, bias) within 2x torch's own error of
    act(F.batch_norm(training=False) + residual), against that composition in float64."""
    shape = {"nchw": (2, 3, 5, 7), "channels_last": (2, 3, 5, 7), "2d": (9, 3), "nc11": (4, 3, 1, 1)}[layout]
    _check_batch_norm_act(dtype, shape, layout, residual, activation)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape", [("nchw", (2, 3, 8, 9)), ("nchw", (3, 3, 4, 16)), ("nchw", (2, 3, 5, 7)),
                                          ("channels_last", (2, 3, 8, 9)), ("2d", (37, 3))], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_batch_norm_act_streamed_outputs(dtype, layout, shape, residual):
    """The path of large tensors (outputs streamed around the cache: whole vectors at aligned addresses, the rest
    stored plainly), taken here at small shapes: rows of 72 and 64 elements start at aligned and unaligned
    addresses and end in partial vectors. Same values and gradients as the composition."""
    with streamed_stores():
        _check_batch_norm_act(dtype, shape, layout, residual, "relu")


def _check_batch_norm_act(dtype, shape, layout, residual, activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    mean, var = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    w, b = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    stat = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # torch's CPU BN: float stats
    # every input exactly representable in the dtype under test: the float64 reference sees the same values
    x, r, dy = (t.to(dtype).double() for t in (x, r, dy))
    mean, var, w, b = (t.to(stat).double() for t in (mean, var, w, b))
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    res = {}
    for name, fn, d in (("ours", tritium.batch_norm_act, dtype), ("torch", reference.batch_norm_act, dtype),
                        ("ref", reference.batch_norm_act, torch.float64)):
        sd = stat if d != torch.float64 else torch.float64
        xi = x.to(d).contiguous(memory_format=mf).requires_grad_(True)
        ri = r.to(d).contiguous(memory_format=mf).requires_grad_(True) if residual else None
        wi, bi = w.to(sd).requires_grad_(True), b.to(sd).requires_grad_(True)
        y = fn(xi, mean.to(sd), var.to(sd), wi, bi, 1e-5, activation, ri)
        ins = [xi, wi, bi] + ([ri] if residual else [])
        gs = torch.autograd.grad(y, ins, dy.to(d).contiguous(memory_format=mf))
        res[name] = [y.detach()] + list(gs)
    if layout == "channels_last":
        assert res["ours"][0].is_contiguous(memory_format=torch.channels_last)
    for i, (o, t, rf) in enumerate(zip(res["ours"], res["torch"], res["ref"])):
        assert_within_torch_error(o, t.to(o.dtype), rf, f"output/grad {i}")


def test_batch_norm_act_fallbacks_and_errors():
    x, mean, var = torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="activation must be one of"):
        tritium.batch_norm_act(x, mean, var, activation="swish")
    # a channel-count mismatch raises torch's own error (the composition runs)
    with pytest.raises(RuntimeError):
        tritium.batch_norm_act(x, torch.zeros(4), torch.ones(4))
    # strided input, empty input, no affine: the composition's values
    xs = torch.randn(2, 3, 4, 8)[..., ::2]
    torch.testing.assert_close(tritium.batch_norm_act(xs, mean, var), reference.batch_norm_act(xs, mean, var))
    e = torch.randn(0, 3, 4, 4)
    assert tritium.batch_norm_act(e, mean, var).shape == e.shape
    torch.testing.assert_close(tritium.batch_norm_act(x, mean, var, activation=None),
                               F.batch_norm(x, mean, var, training=False))


def test_batch_norm_act_compiles():
    x, mean, var, w, b = torch.randn(2, 3, 4, 4), torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3)
    r = torch.randn(2, 3, 4, 4)
    fn = torch.compile(lambda x, r: tritium.batch_norm_act(x, mean, var, w, b, 1e-5, "relu", r), fullgraph=True)
    torch.testing.assert_close(fn(x, r), reference.batch_norm_act(x, mean, var, w, b, 1e-5, "relu", r))


# ---- the activation list's three copies (Python table, C++ macro, Triton ids) agree in order ----
def test_activation_lists_have_one_order():
    """batch_norm_act passes an activation as its position in the list; the Python table, the C++ macro
    TRITIUM_ACTIVATIONS (csrc/activations.cpp) and the Triton ids must list the same names in the same order,
    and the gated ops must name the same gate function in all three."""
    import pathlib
    import re

    from tritium.kernels import activations as triton_act
    from tritium.ops.activations import ACT_NAMES, GATES

    src = (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "activations.cpp").read_text()
    acts = re.search(r"#define TRITIUM_ACTIVATIONS\(X\)((?:[^\n]*\\\n)*[^\n]*)", src).group(1)
    gates = re.search(r"#define TRITIUM_GATES\(X\)((?:[^\n]*\\\n)*[^\n]*)", src).group(1)
    cpp_acts = re.findall(r"X\((\w+),\s*(\w+)\)", acts)
    assert [name for name, _ in cpp_acts] == ACT_NAMES
    assert list(triton_act.ACT_ORDER) == ACT_NAMES
    assert triton_act.ACT_IDS == {name: i for i, name in enumerate(ACT_NAMES)}
    functor = dict(cpp_acts)
    assert {g: functor[fn] for g, fn in GATES.items()} == dict(re.findall(r"X\((\w+),\s*(\w+)\)", gates))
    assert {g: ACT_NAMES.index(fn) for g, fn in GATES.items()} == triton_act.GATE_IDS


@pytest.mark.parametrize("impl_name", ["cpp", "triton"])
def test_batch_norm_act_ids_mean_the_named_activations(impl_name):
    """batch_norm_act_fwd with id i and scale 1, shift 0 is the elementwise op ACT_NAMES[i] (for every row of
    the table, not only the activations batch_norm_act exposes), in the C++ and the Triton kernels."""
    from tritium.kernels import activations as triton_act
    from tritium.ops.activations import ACT_NAMES

    impl = torch.ops.tritium if impl_name == "cpp" else triton_act
    x = torch.randn(4, 37) * 3
    one, zero = torch.ones(37), torch.zeros(37)
    for i, name in enumerate(ACT_NAMES):
        params = (0.7, 1.3, 0.9)  # read by the parameterised rows (leaky_relu, elu, softplus, swish), else unused
        y = impl.batch_norm_act_fwd(x, one, zero, None, False, i, *params)
        torch.testing.assert_close(y, getattr(impl, f"{name}_fwd")(x, *params), msg=lambda m: f"{name}: {m}")
