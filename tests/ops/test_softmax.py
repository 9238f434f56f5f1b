"""softmax / log_softmax / softmin as drop-ins: torch's values, gradients, warnings, errors, compile, modules."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tritium
from tests.util import CPU_DTYPES, assert_within_torch_error, leaf, streamed_stores

FNS = [(tritium.softmax, F.softmax), (tritium.log_softmax, F.log_softmax), (tritium.softmin, F.softmin)]
FN_IDS = ["softmax", "log_softmax", "softmin"]


def _same_as_torch(ours, theirs, x, dtype):
    res = {}
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)  # rounded, as x: the reference sees the same values
    for name, fn, d in (("ours", ours, dtype), ("torch", theirs, dtype), ("ref", theirs, torch.float64)):
        xi = leaf(x.to(dtype), d)
        y = fn(xi)
        res[name] = (y.detach(), torch.autograd.grad(y, xi, g.to(y.dtype))[0])
    assert_within_torch_error(res["ours"][0], res["torch"][0], res["ref"][0].double(), "value")
    assert_within_torch_error(res["ours"][1], res["torch"][1], res["ref"][1].double(), "grad")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("fns", FNS, ids=FN_IDS)
@pytest.mark.parametrize("shape,dim", [((3, 5, 7), -1), ((3, 5, 7), 1), ((3, 5, 7), 0), ((2, 3, 4, 9), 1),
                                       ((11,), 0), ((4, 33), -2)])
def test_matches_torch(dtype, fns, shape, dim):
    ours, theirs = fns
    _same_as_torch(lambda x: ours(x, dim), lambda x: theirs(x, dim), torch.randn(shape) * 3, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("fns", FNS, ids=FN_IDS)
@pytest.mark.parametrize("width", [64, 67], ids=["aligned", "odd"])
def test_streamed_outputs(dtype, fns, width):
    """Rows over the last dim written around the cache (vec.h stream_outputs; here at any size), forward and
    backward: rows whose starts are aligned for a streamed vector and rows that are not, with a partial last
    vector (NaN and infinities: test_extremes_match_torch)."""
    ours, theirs = fns
    x = torch.randn(6, width) * 3
    with streamed_stores():
        _same_as_torch(lambda x_: ours(x_, -1), lambda x_: theirs(x_, -1), x, dtype)


@pytest.mark.parametrize("fns", FNS, ids=FN_IDS)
def test_dtype_argument(fns):
    """dtype casts the input before the op, as torch (a bfloat16 input, a float32 result and float32 grads
    flowing back to bfloat16)."""
    ours, theirs = fns
    x = torch.randn(4, 37, dtype=torch.bfloat16)
    a, b = leaf(x), leaf(x)
    ya, yb = ours(a, -1, dtype=torch.float32), theirs(b, -1, dtype=torch.float32)
    assert ya.dtype == yb.dtype == torch.float32
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("fns", FNS, ids=FN_IDS)
@pytest.mark.parametrize("ndim,expected_dim", [(1, 0), (2, 1), (3, 0), (4, 1)])
def test_implicit_dim_legacy(fns, ndim, expected_dim):
    """dim=None: torch's deprecated implicit choice (0 for 0-, 1- and 3-D inputs, else 1) with its warning."""
    ours, theirs = fns
    x = torch.randn(*([3] * ndim))
    with pytest.warns(UserWarning, match="Implicit dimension choice") as rec:
        y = ours(x)
    assert rec[0].filename == __file__  # _stacklevel points at the caller, as torch's
    torch.testing.assert_close(y, theirs(x, expected_dim))


def test_gradcheck_float64():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    for f, _ in FNS:
        for dim in (-1, 1):
            assert torch.autograd.gradcheck(lambda x_: f(x_, dim), (x,))


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
def test_extremes_match_torch(streamed):
    x = torch.randn(5, 70000)
    x[0] = float("-inf")
    x[1, :69000] = float("-inf")
    x[2] *= 1e4
    x[3, 7] = float("nan")
    with streamed_stores(streamed):
        for ours, theirs in FNS:
            torch.testing.assert_close(ours(x, -1), theirs(x, -1), equal_nan=True)


@pytest.mark.parametrize("case", ["empty", "zero_d", "empty_dim", "non_contig", "expanded", "int_dtype_arg"])
def test_edge_cases_behave_as_torch(case):
    make = {
        "empty": lambda: (torch.randn(0, 4), -1),
        "zero_d": lambda: (torch.tensor(2.0), 0),
        "empty_dim": lambda: (torch.randn(3, 0), 1),
        "non_contig": lambda: (torch.randn(6, 8, 10).transpose(0, 2)[::2], 1),
        "expanded": lambda: (torch.randn(1, 9).expand(4, 9), -1),
        "int_dtype_arg": lambda: (torch.arange(12).view(3, 4), -1),
    }
    x, dim = make[case]()
    for ours, theirs in FNS:
        kw = {"dtype": torch.float64} if case == "int_dtype_arg" else {}
        a, b = ours(x, dim, **kw), theirs(x, dim, **kw)
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call", [
    lambda f: f.softmax(torch.randn(3, 4), 2),                 # dim out of range
    lambda f: f.log_softmax(torch.randn(3, 4), -3),
    lambda f: f.softmin(torch.arange(4), 0),                   # integer input
    lambda f: f.softmax(torch.arange(4), 0),
], ids=["dim", "dim-neg", "int-softmin", "int-softmax"])
def test_bad_input_raises_what_torch_raises(call):
    with pytest.raises(Exception) as theirs:
        call(F)
    with pytest.raises(type(theirs.value)) as ours:
        call(tritium)
    assert str(ours.value) == str(theirs.value)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x):
        return tritium.softmax(x, -1) * tritium.log_softmax(x, 1).sum() + tritium.softmin(x, 0)

    x = torch.randn(5, 24, requires_grad=True)
    y = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(y, f(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_modules_are_drop_ins():
    for ours, theirs in ((tritium.nn.Softmax(dim=1), torch.nn.Softmax(dim=1)),
                         (tritium.nn.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1)),
                         (tritium.nn.Softmin(dim=0), torch.nn.Softmin(dim=0))):
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        x = torch.randn(3, 8, 5)
        torch.testing.assert_close(ours(x), theirs(x))
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softmax(-1))
    assert tritium.patch(m) == [("0", torch.nn.Linear), ("1", torch.nn.Softmax)]
    assert type(m[1]) is tritium.nn.Softmax


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_hypothesis_shapes(shape, data, dtype):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(*shape, dtype=dtype)
    for ours, theirs in FNS:  # the tolerance rule: bfloat16 results are rounded once here, stepwise in torch
        assert_within_torch_error(ours(x, dim), theirs(x, dim), theirs(x.double(), dim), "value")
