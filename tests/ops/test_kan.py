"""tritium.kan_spline, the public function: values and both gradients against efficient-kan's formulation in
float64 (tritium.reference.kan_spline), every dtype, leading batch dims, gradcheck, torch.compile(fullgraph=True),
the reference fallbacks (grid requiring grad, empty input, the reference backend) and bad inputs."""
import pytest
import torch

import tritium
from tritium import reference
from tests.util import KERNEL_DTYPES, assert_within_torch_error, torch_and_ref


def _grid(n_in, grid_size=4, order=3, dtype=torch.float32):
    g = torch.arange(-order, grid_size + order + 1, dtype=torch.float64) * (2.0 / grid_size) - 1.0
    return g.expand(n_in, -1).contiguous().to(dtype)


# (leading dims, in, out, grid size, order); the second takes the CPU forward's few-outputs path outside bfloat16
# (csrc/kan.cpp kFewOutputs = 12), the others the GEMM's, the last with rows spanning more than one of its blocks of
# bases (kBlockElems = 2**22 basis values: 2341 rows at 256 inputs of 7 bases)
SHAPES = [((3, 11), 7, 13, 4, 3), ((5,), 3, 1, 2, 1), ((2400,), 256, 40, 4, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}-g{s[3]}k{s[4]}")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + (torch.float64,), ids=lambda d: str(d)[6:])
def test_values_and_grads(dtype, shape):
    torch.manual_seed(0)
    lead, I, O, G, k = shape
    grid = _grid(I, G, k)
    x = (torch.rand(*lead, I, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    w = (torch.randn(O, I, G + k, dtype=torch.float64) * 0.3).to(dtype)
    dy = torch.randn(*lead, O, dtype=torch.float64).to(dtype)
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = tritium.kan_spline(xi, grid, wi, k)
    gx, gw = torch.autograd.grad(y, (xi, wi), dy)

    def fn(x_, w_):
        return reference.kan_spline(x_, grid.double() if x_.dtype == torch.float64 else grid, w_, k)

    (ty, (tgx, tgw)), (ry, (rgx, rgw)) = torch_and_ref(fn, [x, w], dy, dtype)
    assert_within_torch_error(y.detach(), ty, ry, "y")
    assert_within_torch_error(gx, tgx, rgx, "dx")
    assert_within_torch_error(gw, tgw, rgw, "dweight")


def test_gradcheck_and_compile():
    grid = _grid(3, 4, 2, torch.float64)
    x = (torch.rand(5, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    w = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: tritium.kan_spline(x, grid, w, 2), (x, w))
    # only the weight requires grad (the first layer of a KAN: x is data)
    gw, = torch.autograd.grad(tritium.kan_spline(x.detach(), grid, w, 2).sum(), (w,))
    gw_ref, = torch.autograd.grad(reference.kan_spline(x.detach(), grid, w, 2).sum(), (w,))
    torch.testing.assert_close(gw, gw_ref)

    def f(x, w):
        return tritium.kan_spline(x, grid.float(), w, 2).square().sum()

    xf, wf = x.float().detach().requires_grad_(), w.float().detach().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(xf, wf)
    torch.testing.assert_close(out, f(xf, wf))


def test_fallbacks():
    grid = _grid(3)
    x, w = torch.rand(4, 3) * 2 - 1, torch.randn(2, 3, 7)
    want = reference.kan_spline(x, grid, w, 3)
    torch.testing.assert_close(tritium.kan_spline(x, grid, w, 3), want)
    # a grid that requires grad goes to the reference (the kernels treat the knots as constants)
    g = grid.clone().requires_grad_()
    y = tritium.kan_spline(x, g, w, 3)
    torch.testing.assert_close(y, want)
    assert torch.autograd.grad(y.sum(), g)[0].shape == g.shape
    assert tritium.kan_spline(torch.empty(0, 3), grid, w, 3).shape == (0, 2)
    tritium.set_backend("reference")
    try:
        torch.testing.assert_close(tritium.kan_spline(x, grid, w, 3), want)
    finally:
        tritium.set_backend("kernels")


def test_outside_the_grid_is_zero():
    """x outside [t_0, t_last) has no basis (efficient-kan's semantics): the spline term is 0 and so is dx."""
    grid = _grid(2)
    x = torch.tensor([[-5.0, 3.0], [2.5, -2.5]], requires_grad=True)
    w = torch.randn(3, 2, 7)
    y = tritium.kan_spline(x, grid, w, 3)
    assert torch.count_nonzero(y) == 0
    assert torch.count_nonzero(torch.autograd.grad(y.sum(), x)[0]) == 0


@pytest.mark.parametrize("args,exc,match", [
    (lambda x, g, w: (x, g, w, 8), ValueError, "spline_order must be an int in"),
    (lambda x, g, w: (x, g, w, 2.0), ValueError, "spline_order must be an int"),
    (lambda x, g, w: (x, g[:2], w, 3), ValueError, r"grid must be \(in=3, knots\)"),
    (lambda x, g, w: (x, g, w[:, :, :5], 3), ValueError, r"weight must be \(out, in=3, knots - 1 - order=7\)"),
    (lambda x, g, w: (x, g[:, :4], w, 3), ValueError, "no basis of order 3"),
    (lambda x, g, w: (x, g, w.double(), 3), TypeError, "weight must have x's dtype"),
    (lambda x, g, w: (x.long(), g, w, 3), TypeError, "x must be floating point"),
    (lambda x, g, w: (x, [1.0], w, 3), TypeError, "grid must be a Tensor, got list"),
])
def test_bad_inputs(args, exc, match):
    x, g, w = torch.rand(4, 3), _grid(3), torch.randn(2, 3, 7)
    with pytest.raises(exc, match=match):
        tritium.kan_spline(*args(x, g, w))
