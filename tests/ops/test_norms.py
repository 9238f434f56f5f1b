"""The public norm ops as drop-ins: torch's results, errors, autograd, compile, edge cases, modules, patch."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tritium
from tests.util import CPU_DTYPES, KERNEL_DTYPES, assert_within_torch_error, leaf


def _same_as_torch(ours_fn, torch_fn, args, dtype):
    """Values and all gradients of ours vs torch (in dtype) vs the float64 reference."""
    g = None
    results = {}
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]  # the reference sees the same inputs
    for name, fn, d in (("ours", ours_fn, dtype), ("torch", torch_fn, dtype), ("ref", torch_fn, torch.float64)):
        ins = [leaf(a, d) if isinstance(a, torch.Tensor) else a for a in args]
        y = fn(*ins)
        if g is None:  # rounded to dtype, as the inputs: the reference sees the same output gradient
            g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        tens = [t for t in ins if isinstance(t, torch.Tensor)]
        results[name] = (y.detach(), torch.autograd.grad(y, tens, g.to(d)))
    assert_within_torch_error(results["ours"][0], results["torch"][0], results["ref"][0].double(), "value")
    for i, (a, b, c) in enumerate(zip(results["ours"][1], results["torch"][1], results["ref"][1])):
        assert_within_torch_error(a, b, c.double(), f"grad {i}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized",
                         [((3, 5, 7), (7,)), ((3, 5, 7), (5, 7)), ((2, 3, 4, 9), 9), ((11,), (11,))])
def test_rms_norm_matches_torch(dtype, shape, normalized):
    nshape = (normalized,) if isinstance(normalized, int) else normalized
    x, w = torch.randn(shape), torch.randn(nshape)
    _same_as_torch(lambda x_, w_: tritium.rms_norm(x_, normalized, w_),
                   lambda x_, w_: F.rms_norm(x_, nshape, w_), [x, w], dtype)
    _same_as_torch(lambda x_: tritium.rms_norm(x_, normalized, eps=1e-3),
                   lambda x_: F.rms_norm(x_, nshape, eps=1e-3), [x], dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized", [((3, 5, 7), (7,)), ((3, 5, 7), (5, 7)), ((2, 3, 4, 9), 9)])
def test_layer_norm_matches_torch(dtype, shape, normalized):
    nshape = (normalized,) if isinstance(normalized, int) else normalized
    x, w, b = torch.randn(shape) + 2, torch.randn(nshape), torch.randn(nshape)
    _same_as_torch(lambda *a: tritium.layer_norm(a[0], normalized, a[1], a[2]),
                   lambda *a: F.layer_norm(a[0], nshape, a[1], a[2]), [x, w, b], dtype)
    _same_as_torch(lambda x_: tritium.layer_norm(x_, normalized, eps=1e-2),
                   lambda x_: F.layer_norm(x_, nshape, eps=1e-2), [x], dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_fused_add_rms_norm_matches_unfused(dtype):
    x, r, w = torch.randn(4, 6, 33), torch.randn(4, 6, 33), torch.randn(33)

    def ours(x_, r_, w_):
        y, h = tritium.fused_add_rms_norm(x_, r_, w_, 1e-6)
        return y * 1.5 + h  # both outputs feed the loss, so both gradient paths are checked

    def unfused(x_, r_, w_):
        h = x_ + r_
        return F.rms_norm(h, (33,), w_, 1e-6) * 1.5 + h

    _same_as_torch(ours, unfused, [x, r, w], dtype)


def test_gradcheck_float64():
    x = torch.randn(3, 2, 13, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_: tritium.rms_norm(x_, (13,), w_), (x, w))
    assert torch.autograd.gradcheck(lambda x_: tritium.rms_norm(x_, (2, 13)), (x,))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: tritium.layer_norm(x_, (13,), w_, b_), (x, w, b))
    assert torch.autograd.gradcheck(lambda x_, r_, w_: tritium.fused_add_rms_norm(x_, r_, w_), (x, r, w))


def test_only_requested_parameter_gradients():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16)  # frozen
    b = torch.randn(16, requires_grad=True)
    tritium.layer_norm(x, (16,), w, b).sum().backward()
    assert w.grad is None and b.grad is not None and x.grad is not None


class _Block(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.ln = tritium.nn.LayerNorm(n)
        self.rms = tritium.nn.RMSNorm(n)
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, r):
        y, h = tritium.fused_add_rms_norm(self.ln(x), r, self.w, 1e-6)
        return self.rms(y + h)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = _Block(24)
    x, r = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x, r)
    torch.testing.assert_close(y, m(x, r))
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(m(x, r).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_non_contiguous_inputs_and_grads():
    base = torch.randn(8, 40, 30)
    x = base.transpose(1, 2)[:, :, ::2]  # (8, 30, 20), last dim strided: copied once, correctly
    w = torch.randn(20)
    torch.testing.assert_close(tritium.rms_norm(x, (20,), w), F.rms_norm(x, (20,), w))
    rows = base[::2, :, :]  # leading dims strided, last dim contiguous: read in place
    torch.testing.assert_close(tritium.layer_norm(rows, (30,)), F.layer_norm(rows, (30,)))
    xl = leaf(x)
    tritium.rms_norm(xl, (20,), w).sum().backward()  # grad_output is an expanded (stride 0) tensor
    xr = leaf(x)
    F.rms_norm(xr, (20,), w).sum().backward()
    torch.testing.assert_close(xl.grad, xr.grad)


@pytest.mark.parametrize("case", ["empty_rows", "empty_row_width", "one_d", "mixed_dtype_rms",
                                  "half_weight_float_input"])
def test_edge_cases_behave_as_torch(case):
    fns = {
        "empty_rows": lambda f: f.layer_norm(torch.randn(0, 4), (4,)),
        "empty_row_width": lambda f: f.rms_norm(torch.randn(3, 0), (0,)),
        "one_d": lambda f: f.rms_norm(torch.randn(5), (5,)),
        "mixed_dtype_rms": lambda f: f.rms_norm(torch.randn(2, 4, dtype=torch.bfloat16), (4,), torch.randn(4)),
        "half_weight_float_input": lambda f: f.rms_norm(torch.randn(2, 4), (4,), torch.randn(4).half()),
    }
    torch.manual_seed(1)
    ours = fns[case](tritium)
    torch.manual_seed(1)
    theirs = fns[case](F)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("call", [
    lambda f: f.layer_norm(torch.randn(3, 4), (5,)),                       # normalized_shape mismatch
    lambda f: f.rms_norm(torch.randn(3, 4), (5,)),
    lambda f: f.layer_norm(torch.randn(3, 4), (4,), torch.randn(5)),       # weight shape mismatch
    lambda f: f.rms_norm(torch.randn(3, 4), (4,), torch.randn(5)),
    lambda f: f.layer_norm(torch.tensor(1.0), ()),                         # empty normalized_shape
    lambda f: f.rms_norm(torch.tensor(1.0), ()),
    lambda f: f.layer_norm(torch.arange(4), (4,)),                         # integer input
    lambda f: f.rms_norm(torch.arange(4), (4,)),
    lambda f: f.layer_norm(torch.randn(3, 4), (4,), torch.randn(4, dtype=torch.bfloat16)),  # dtype mismatch
    lambda f: f.layer_norm(torch.randn(3, 4), (4,), torch.randn(4, device="meta")),         # device mismatch
], ids=["ln-shape", "rms-shape", "ln-weight", "rms-weight", "ln-0d", "rms-0d", "ln-int", "rms-int", "ln-dtype",
        "ln-device"])
def test_bad_input_raises_what_torch_raises(call):
    with pytest.raises(Exception) as theirs:
        call(F)
    with pytest.raises(type(theirs.value)) as ours:
        call(tritium)
    assert str(ours.value) == str(theirs.value)


def test_fused_add_rms_norm_bad_input():
    with pytest.raises(ValueError, match="residual must have the shape"):
        tritium.fused_add_rms_norm(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="at least one dimension"):
        tritium.fused_add_rms_norm(torch.tensor(1.0), torch.tensor(1.0))


def test_modules_are_drop_ins():
    ref = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8, eps=1e-5))
    ours = torch.nn.Sequential(torch.nn.Linear(8, 8), tritium.nn.LayerNorm(8), tritium.nn.RMSNorm(8, eps=1e-5))
    assert isinstance(ours[1], torch.nn.LayerNorm) and isinstance(ours[2], torch.nn.RMSNorm)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), ref(x))


def test_patch_swaps_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                                torch.nn.Sequential(torch.nn.RMSNorm(8)))
    x = torch.randn(3, 8)
    before = model(x)
    params_before = [id(p) for p in model.parameters()]
    replaced = tritium.patch(model)
    assert replaced == [("0", torch.nn.Linear), ("1", torch.nn.LayerNorm), ("2.0", torch.nn.RMSNorm)]
    assert type(model[1]) is tritium.nn.LayerNorm and type(model[2][0]) is tritium.nn.RMSNorm
    assert [id(p) for p in model.parameters()] == params_before
    torch.testing.assert_close(model(x), before)
    assert tritium.patch(model) == []  # idempotent


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), n=st.integers(1, 300),
       affine=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_hypothesis_shapes(lead, n, affine, dtype):
    # seeded from the example (hypothesis replays a failure exactly), judged against float64 with torch's own
    # error as the budget: at n = 1 the exact layer_norm is 0, which tritium gives and torch's bf16 kernel
    # misses by a rounding step (x * rstd - mean * rstd), more than assert_close's bf16 atol
    g = torch.Generator().manual_seed(zlib.crc32(repr((lead, n, affine, dtype)).encode()))
    x = torch.randn(*lead, n, dtype=torch.float64, generator=g).to(dtype)
    w = torch.randn(n, dtype=torch.float64, generator=g).to(dtype) if affine else None
    w64 = None if w is None else w.double()
    assert_within_torch_error(tritium.rms_norm(x, (n,), w), F.rms_norm(x, (n,), w),
                              F.rms_norm(x.double(), (n,), w64), "rms_norm")
    assert_within_torch_error(tritium.layer_norm(x, (n,), w, w), F.layer_norm(x, (n,), w, w),
                              F.layer_norm(x.double(), (n,), w64, w64), "layer_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_layer_norm_accurate_when_first_element_is_an_outlier(dtype):
    """The variance is taken about the row's mean: a shift by x[0] (an earlier version) lost 5-15 ulp of float
    output on rows whose first element lay two standard deviations out (here: ten)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, dtype=torch.float64, generator=g)
    x[:, 0] = 10 + x[:, 0].abs()
    x = x.to(dtype)
    ref = F.layer_norm(x.double(), (300,))
    assert_within_torch_error(tritium.layer_norm(x, (300,)), F.layer_norm(x, (300,)), ref, "layer_norm")


# the Triton kernels take no float64
@pytest.mark.parametrize("impl,dtype", [("cpp", d) for d in CPU_DTYPES] + [("triton", d) for d in KERNEL_DTYPES],
                         ids=str)
def test_layer_norm_over_one_element(impl, dtype):
    """normalized_shape (1,): the output is the bias whatever x is (x - mean(x) = 0), so the input gradient
    is exactly 0, the weight gradient 0 and the bias gradient sum(dy)."""
    x, dy = ((torch.randn(6, 1, dtype=torch.float64) * 100).to(dtype) for _ in range(2))
    w, b = (torch.randn(1, dtype=torch.float64) * 100).to(dtype), torch.randn(1, dtype=torch.float64).to(dtype)
    if impl == "cpp":
        xl, wl, bl = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = tritium.layer_norm(xl, (1,), wl, bl)
        dx, dw, db = torch.autograd.grad(y, (xl, wl, bl), dy)
    else:
        from tritium.kernels import norms as triton_norms

        y, mean, rstd = triton_norms.layer_norm_fwd(x, w, b, 1e-5)
        dx, dw, db = triton_norms.layer_norm_bwd(dy, x, w, mean, rstd, True, True)
    assert torch.equal(y.detach(), b.expand(6, 1))
    assert torch.equal(dx, torch.zeros_like(x))
    assert torch.equal(dw, torch.zeros_like(w))
    torch.testing.assert_close(db, dy.double().sum(0).to(dtype))
