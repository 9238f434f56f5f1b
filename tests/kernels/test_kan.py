"""KAN spline kernels (forward and backward), Triton (interpreter) and C++, against the float64 reference
(efficient-kan's b_splines then the linear map, tritium.reference.kan_spline): odd batch, feature and output counts,
spline orders 0 to 3 (and 5), uniform and non-uniform knots, inputs inside and outside the grid, every gradient,
every dtype, strided x, the weight as its permuted view (dW in its layout) and contiguous, and the GPU compile check."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import kan
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, on_device, torch_and_ref

triton_kan = on_device(kan)
CASES, IDS = impl_cases(triton_kan)
# (batch, in, out, grid_size, order): dyadic grid steps (2 / grid_size) keep the knots exact in 16-bit, so the
# kernels and torch in that dtype pick the same knot span for every x; outputs on both sides of the C++ forward's
# few-outputs bound (csrc/kan.cpp kFewOutputs = 12; bfloat16 always takes the GEMM)
SHAPES = [(37, 5, 19, 4, 3), (1, 1, 1, 2, 1), (130, 17, 70, 8, 2), (9, 3, 5, 4, 0), (21, 4, 33, 8, 5)]


def _grid(n_in, grid_size, order, uniform=True):
    h = 2.0 / grid_size
    g = torch.arange(-order, grid_size + order + 1, dtype=torch.float64) * h - 1.0
    g = g.expand(n_in, -1).clone()
    if not uniform:  # increasing knots with uneven steps per feature (as update_grid leaves them)
        steps = torch.rand(n_in, g.shape[1] - 1, dtype=torch.float64) * 0.8 + 0.2
        g = torch.cat([g[:, :1], g[:, :1] + torch.cumsum(steps * h, 1)], 1)
    return g.float()


def check(impl, dtype, B, I, O, G, k, uniform=True, x_strided=False, weight_view=True):
    """weight_view: weight_t is the (out, in, bases) weight's permuted view, as tritium.kan_spline passes it (dW
    must come back in that layout); else a contiguous (in, bases, out) copy."""
    torch.manual_seed(B * 7 + I)
    grid = _grid(I, G, k, uniform)
    lo, hi = grid[:, 0].min().item(), grid[:, -1].max().item()
    x = (torch.rand(B, I, dtype=torch.float64) * (hi - lo + 0.4) + lo - 0.2).to(dtype)  # some outside the grid
    w = (torch.randn(O, I, G + k, dtype=torch.float64) / (I * (k + 1)) ** 0.5).to(dtype)
    dy = torch.randn(B, O, dtype=torch.float64).to(dtype)
    xk = torch.stack([x, x], -1)[..., 0] if x_strided else x  # column stride 2
    wt = w.permute(1, 2, 0) if weight_view else w.permute(1, 2, 0).contiguous()
    y = impl.kan_spline_fwd(xk, grid, wt, k)
    dx, dwt = impl.kan_spline_bwd(dy, xk, grid, wt, k, True, True)
    assert dwt.stride() == torch.empty_like(wt).stride()

    def fn(x_, w_):
        return reference.kan_spline(x_, grid.to(x_.dtype) if x_.dtype == torch.float64 else grid, w_, k)

    def fn_mat(x_, w_):  # materialized gradients: order 0 has no path from x to y (zero gradient)
        return fn(x_, w_) + 0 * x_.sum()

    (ty, (tgx, tgw)), (ry, (rgx, rgw)) = torch_and_ref(fn_mat, [x, w], dy, dtype)
    assert_within_torch_error(y, ty, ry, "y")
    assert_within_torch_error(dx, tgx, rgx, "dx")
    assert_within_torch_error(dwt.permute(2, 0, 1), tgw, rgw, "dweight")
    if k == 0:
        assert torch.count_nonzero(dx) == 0


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("B,I,O,G,k", SHAPES)
def test_kernel(impl_name, impl, dtype, B, I, O, G, k):
    check(impl, dtype, B, I, O, G, k)


@pytest.mark.parametrize("impl_name,impl,dtype", [("triton", triton_kan, torch.float32),
                                                   ("cpp", torch.ops.tritium, torch.float32),
                                                   ("cpp", torch.ops.tritium, torch.float64)],
                         ids=["triton-float32", "cpp-float32", "cpp-float64"])
def test_nonuniform_knots_strided_x_contiguous_weight(impl_name, impl, dtype):
    check(impl, dtype, 45, 6, 11, 5, 3, uniform=False, x_strided=True, weight_view=False)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_kan), ("cpp", torch.ops.tritium)])
def test_backward_flags(impl_name, impl):
    """need_dx / need_dw: an empty tensor for the gradient not asked for, the other one unchanged."""
    grid = _grid(4, 4, 3)
    x, wt, dy = torch.rand(10, 4) * 2 - 1, torch.randn(4, 7, 6), torch.randn(10, 6)
    dx, dw = impl.kan_spline_bwd(dy, x, grid, wt, 3, True, True)
    dx1, e1 = impl.kan_spline_bwd(dy, x, grid, wt, 3, True, False)
    e2, dw2 = impl.kan_spline_bwd(dy, x, grid, wt, 3, False, True)
    assert e1.numel() == 0 and e2.numel() == 0
    torch.testing.assert_close(dx1, dx)
    torch.testing.assert_close(dw2, dw)


def test_cpp_errors():
    grid = _grid(4, 4, 3)
    x, wt = torch.rand(10, 4), torch.randn(4, 7, 6)
    with pytest.raises(RuntimeError, match="weight_t must be"):
        torch.ops.tritium.kan_spline_fwd(x, grid, wt[:, :5], 3)
    with pytest.raises(RuntimeError, match="spline order"):
        torch.ops.tritium.kan_spline_fwd(x, grid, wt, 9)
    with pytest.raises(RuntimeError, match="grid must be"):
        torch.ops.tritium.kan_spline_fwd(x, grid[:3], wt, 3)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """The launch configurations of the launchers (narrow and wide outputs, order 3 and 1, 16-bit) compile for
    sm_80/90 without spills."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for I, O, G, k in ((64, 64, 5, 3), (2, 8, 5, 3), (32, 256, 10, 1)):
                grid = _grid(I, G, k)
                x, wt = torch.rand(40, I, dtype=dtype), torch.randn(I, G + k, O, dtype=dtype)
                triton_kan.kan_spline_fwd(x, grid, wt, k)
                triton_kan.kan_spline_bwd(torch.randn(40, O, dtype=dtype), x, grid, wt, k, True, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dw_kernel"}
