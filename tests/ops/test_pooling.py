"""tritium.max_pool2d, the public function: equal to torch.nn.functional.max_pool2d (values and the input's
gradient, exactly: a maximum rounds nothing) in every dtype, (N, C, H, W) and (C, H, W) inputs, covered calls on the
kernels and every other call (padding, strides other than the window, dilation, ceil mode, indices, non-contiguous
input) on torch's own function, gradcheck, torch.compile(fullgraph=True), the errors torch raises, and the
reference backend."""
import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium import reference
from tests.util import KERNEL_DTYPES


def _both(fn_a, fn_b, x, dy_seed=0):
    outs = []
    for fn in (fn_a, fn_b):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=torch.float64).to(y.dtype)
        (dx,) = torch.autograd.grad(y, xi, dy)
        outs.append((y.detach(), dx))
    return outs


@pytest.fixture
def no_reference(monkeypatch):
    """Covered calls must not reach torch's function: reference.max_pool2d raises while this is on."""
    def boom(*a, **k):
        raise AssertionError("a covered call went to reference.max_pool2d")
    monkeypatch.setattr(reference, "max_pool2d", boom)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES + (torch.float64,), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,kernel,stride", [((4, 3, 8, 8), 2, None), ((2, 5, 9, 7), (3, 2), (3, 2)),
                                                 ((3, 11, 13), 3, 3), ((1, 1, 5, 5), [5], None)])
def test_covered_calls_equal_torch(no_reference, dtype, shape, kernel, stride):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    (y, dx), (ty, tdx) = _both(lambda t: tritium.max_pool2d(t, kernel, stride),
                               lambda t: F.max_pool2d(t, kernel, stride), x)
    assert y.shape == ty.shape and torch.equal(y, ty)
    assert torch.equal(dx, tdx)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2, stride=1), dict(kernel_size=3, padding=1),
                                    dict(kernel_size=2, dilation=2), dict(kernel_size=2, ceil_mode=True),
                                    dict(kernel_size=(2, 2), stride=(2, 1))])
def test_other_calls_equal_torch(kwargs):
    x = torch.randn(2, 3, 9, 9)
    (y, dx), (ty, tdx) = _both(lambda t: tritium.max_pool2d(t, **kwargs), lambda t: F.max_pool2d(t, **kwargs), x)
    assert torch.equal(y, ty) and torch.equal(dx, tdx)


def test_integer_input_is_torchs():
    x = torch.randint(-5, 5, (2, 3, 4, 4))
    assert torch.equal(tritium.max_pool2d(x, 2), F.max_pool2d(x, 2))


def test_indices_and_non_contiguous():
    x = torch.randn(2, 3, 8, 8)
    y, i = tritium.max_pool2d(x, 2, return_indices=True)
    ty, ti = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(y, ty) and torch.equal(i, ti)
    xt = x.transpose(2, 3)
    assert torch.equal(tritium.max_pool2d(xt, 2), F.max_pool2d(xt, 2))
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(tritium.max_pool2d(xc, 2), F.max_pool2d(xc, 2))


def test_gradcheck_and_compile(no_reference):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tritium.max_pool2d(t, 2), (x,))
    xf = x.float().detach()
    out = torch.compile(lambda t: tritium.max_pool2d(t, 2).square().sum(), fullgraph=True, backend="aot_eager")(xf)
    torch.testing.assert_close(out, F.max_pool2d(xf, 2).square().sum())


@pytest.mark.parametrize("args", [((torch.randn(2, 3, 4, 4), 5), {}), ((torch.randn(4, 4), 2), {}),
                                  ((torch.randn(2, 3, 4, 4), 0), {}), ((torch.randn(2, 3, 4, 4), 2), {"stride": 0}),
                                  ((torch.randn(2, 3, 4, 4), (2, 2, 2)), {}), ((torch.randn(2, 3, 4, 4), 2),
                                                                              {"padding": 2})])
def test_errors_are_torchs(args):
    a, k = args
    with pytest.raises(Exception) as theirs:
        F.max_pool2d(*a, **k)
    with pytest.raises(type(theirs.value)) as ours:
        tritium.max_pool2d(*a, **k)
    assert str(ours.value) == str(theirs.value)


def test_empty_and_reference_backend(monkeypatch):
    x = torch.randn(0, 3, 4, 4)
    assert tritium.max_pool2d(x, 2).shape == F.max_pool2d(x, 2).shape
    calls = []
    monkeypatch.setattr(reference, "max_pool2d", lambda *a, **k: calls.append(1) or F.max_pool2d(*a, **k))
    x = torch.randn(2, 3, 8, 8)
    previous = tritium.get_backend()
    tritium.set_backend("reference")
    try:
        assert torch.equal(tritium.max_pool2d(x, 2), F.max_pool2d(x, 2)) and calls == [1]
    finally:
        tritium.set_backend(previous)
