"""max_pool2d kernels (forward and backward), Triton (interpreter) and C++, against torch's max_pool2d: exact in
every dtype (a maximum rounds nothing, and the gradient goes to the same element: the first maximum of a window,
or its last NaN), at odd plane sizes (trailing rows and columns in no window, one window per plane, windows up to
the 256-element limit), with ties and NaN, and the GPU compile check."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import pooling
from tests.util import CPU_DTYPES, check_gpu_compile, impl_cases, on_device

triton_pooling = on_device(pooling)
CASES, IDS = impl_cases(triton_pooling)
# (planes, H, W, kh, kw)
SHAPES = [(1, 1, 1, 1, 1), (3, 8, 8, 2, 2), (5, 7, 9, 2, 3), (2, 5, 123, 3, 2), (4, 17, 17, 17, 1), (2, 16, 16, 16, 16)]
# The C++ vector path of 2-column windows (kw = 2): (planes, H, W, kh) with one window per row, rows shorter than a
# vector (the zoo's 8x8 maps), 16 and 32 windows (whole 8- and 16-lane float vectors, two and one 8-lane double),
# a whole vector and one window more, odd widths (a trailing column) and trailing rows, kh of 1 to 4; rows of 1, 2,
# 4 and 8 windows, which the AVX-512 build packs several to a vector (16 / (2 Wo) rows: plane ends and trailing rows
# inside a vector, a count of rows that leaves some to the per-row loop).
SHAPES_W2 = [(3, 2, 2, 2), (7, 8, 8, 2), (2, 6, 32, 2), (2, 4, 64, 1), (1, 5, 34, 3), (3, 9, 67, 2), (2, 11, 130, 4),
             (4, 3, 17, 1), (5, 4, 4, 2), (3, 7, 8, 2), (7, 5, 16, 1), (20, 2, 3, 2), (3, 9, 4, 3)]


def _torch(x, kh, kw, dy):
    """torch's output and input gradient in x's dtype."""
    x = x.detach().clone().requires_grad_(True)
    y = F.max_pool2d(x.unsqueeze(0), (kh, kw)).squeeze(0)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("P,H,W,kh,kw", SHAPES)
@pytest.mark.parametrize("values", ["randn", "ties"])
def test_kernel(impl_name, impl, dtype, P, H, W, kh, kw, values):
    torch.manual_seed(P + H + W + kh + kw)
    if values == "ties":  # few distinct values: most windows hold their maximum more than once
        x = torch.randint(-2, 3, (P, H, W)).to(dtype)
    else:
        x = torch.randn(P, H, W, dtype=torch.float64).to(dtype)
    y, idx = impl.max_pool2d_fwd(x, kh, kw)
    assert idx.dtype == torch.uint8
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    ty, tdx = _torch(x, kh, kw, dy)
    assert torch.equal(y, ty)
    assert torch.equal(impl.max_pool2d_bwd(dy, idx, kh, kw, H, W), tdx)


def _values(kind, shape, dtype):
    if kind == "ties":  # few distinct values: most windows hold their maximum more than once
        return torch.randint(-2, 3, shape).to(dtype)
    x = torch.randn(shape, dtype=torch.float64)
    if kind == "nan":  # NaN (some windows two or more: the last takes the gradient) and infinities
        u = torch.rand(shape)
        x[u < 0.15] = float("nan")
        x[(u >= 0.15) & (u < 0.2)] = float("inf")
        x[(u >= 0.2) & (u < 0.25)] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("P,H,W,kh", SHAPES_W2)
@pytest.mark.parametrize("values", ["randn", "ties", "nan"])
def test_cpp_two_columns(dtype, P, H, W, kh, values):
    """The vector path of kw = 2 against torch: the same values, and each window's gradient on the same element."""
    torch.manual_seed(P * H + W + kh)
    x = _values(values, (P, H, W), dtype)
    y, idx = torch.ops.tritium.max_pool2d_fwd(x, kh, 2)
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    ty, tdx = _torch(x, kh, 2, dy)
    torch.testing.assert_close(y, ty, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.ops.tritium.max_pool2d_bwd(dy, idx, kh, 2, H, W), tdx)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_pooling), ("cpp", torch.ops.tritium)])
def test_nan_and_inf(impl_name, impl):
    """A NaN in a window is its maximum (the last NaN's position takes the gradient, as in torch); a window of -inf
    gives -inf with its first element's position."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[[1.0, nan, -inf, -inf], [nan, 2.0, -inf, -inf]]])
    y, idx = impl.max_pool2d_fwd(x, 2, 2)
    dy = torch.tensor([[[5.0, 7.0]]])
    ty, tdx = _torch(x, 2, 2, dy)
    torch.testing.assert_close(y, ty, equal_nan=True)
    assert idx.tolist() == [[[2, 0]]]
    assert torch.equal(impl.max_pool2d_bwd(dy, idx, 2, 2, 2, 4), tdx)


def test_cpp_errors():
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.tritium.max_pool2d_fwd(torch.randn(2, 4), 2, 2)
    with pytest.raises(RuntimeError, match="window"):
        torch.ops.tritium.max_pool2d_fwd(torch.randn(1, 32, 32), 17, 16)
    with pytest.raises(RuntimeError, match="dy must be"):
        torch.ops.tritium.max_pool2d_bwd(torch.randn(1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.uint8), 2, 2, 8, 8)
    with pytest.raises(RuntimeError, match="idx must be"):
        torch.ops.tritium.max_pool2d_bwd(torch.randn(1, 4, 4), torch.zeros(1, 4, 4), 2, 2, 8, 8)


@pytest.mark.gpu_compile
def test_gpu_compile():
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(64, 8, 9, dtype=dtype)
            y, idx = triton_pooling.max_pool2d_fwd(x, 2, 2)
            triton_pooling.max_pool2d_bwd(torch.randn_like(y), idx, 2, 2, 8, 9)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_max_pool2d_fwd_kernel", "_max_pool2d_bwd_kernel"}
