"""Softmax / log-softmax / softmin kernels, Triton (interpreter) and C++, against torch and a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import softmax
from tests.util import WIDTHS, assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_softmax = on_device(softmax)

cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_softmax)
# (scale, log): softmax, log_softmax, softmin, a temperature
VARIANTS = [(1.0, False), (1.0, True), (-1.0, False), (0.5, True)]


def _torch_fn(scale, log, dim):
    return lambda x: (F.log_softmax if log else F.softmax)(x * scale, dim)


def _check(impl, x3, scale, log, dtype):
    """x3 (outer, N, inner): forward and backward of impl against torch in dtype and float64 (over dim 1)."""
    dy = torch.randn(x3.shape, dtype=torch.float64).to(dtype)
    y = impl.softmax_fwd(x3, scale, log)
    dx = impl.softmax_bwd(dy, y, scale, log)
    fn = _torch_fn(scale, log, 1)
    outs = {}
    for d in (dtype, torch.float64):
        xi = leaf(x3, d)
        yy = fn(xi)
        outs[d] = (yy.detach(), torch.autograd.grad(yy, xi, dy.to(d))[0])
    assert_within_torch_error(y, outs[dtype][0], outs[torch.float64][0], "y")
    assert_within_torch_error(dx, outs[dtype][1], outs[torch.float64][1], "dx")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("scale,log", VARIANTS, ids=["softmax", "log_softmax", "softmin", "temp_log"])
def test_softmax_rows(impl_name, impl, dtype, n, scale, log):
    x = (torch.randn(3, n, dtype=torch.float64) * 3).to(dtype)
    _check(impl, x.unsqueeze(-1), scale, log, dtype)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("n,inner", [(1, 5), (7, 3), (123, 9), (781, 2), (5, 300)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_inner_dim(impl_name, impl, dtype, n, inner, log):
    """A softmax over an earlier dim: (outer, N, inner) with N strided by inner (inner 300 spans two blocks)."""
    x = (torch.randn(2, n, inner, dtype=torch.float64) * 3).to(dtype)
    _check(impl, x, 1.0, log, dtype)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_softmax), ("cpp", cpp)])
@pytest.mark.parametrize("n", [7, 4097, 65537])
def test_extreme_values(impl_name, impl, n):
    """+-1e4 inputs, rows of all -inf (NaN, as torch), rows that start with a long -inf stretch (exact: the online
    softmax must not turn them into NaN), a NaN and a +inf entry: exactly what torch gives."""
    x = torch.randn(6, n) * 1e4
    x[1] = float("-inf")
    x[2, : n - 3] = float("-inf")
    x[3, n // 2] = float("nan")
    x[4, 0] = float("inf")
    x[5, ::2] = -1e4
    for log in (False, True):
        for scale in (1.0, -1.0):
            y = impl.softmax_fwd(x.unsqueeze(-1), scale, log).squeeze(-1)
            ref = _torch_fn(scale, log, -1)(x)
            torch.testing.assert_close(y, ref, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_exp_to_the_subnormal_range():
    """The C++ kernels' vector exp (vec.h exp_float, every float exp of the CPU kernels) over its whole range, seen
    through softmax rows [0, x, -inf, ...]: the second output is exp(x) / (1 + exp(x)), exactly the exp's own value
    where 1 + exp(x) rounds to 1. Within 2x torch's worst error in float32 ulp (subnormal spacing at the bottom), and
    no result below FLT_MIN flushed to zero as ATen's exp_u20 does (torch keeps them)."""
    x = torch.linspace(-103.9, 0, 100001)
    rows = torch.full((x.numel(), 32), float("-inf"))
    rows[:, 0] = 0
    rows[:, 1] = x
    ref = torch.softmax(rows.double(), -1)[:, 1]
    fi = torch.finfo(torch.float32)
    ulp = torch.exp2(torch.floor(torch.log2(ref.clamp_min(fi.tiny)))) * fi.eps
    ours = cpp.softmax_fwd(rows.unsqueeze(-1), 1.0, False).squeeze(-1)[:, 1]
    theirs = torch.softmax(rows, -1)[:, 1]
    bound = 2 * ((theirs.double() - ref).abs() / ulp).max()
    err = (ours.double() - ref).abs() / ulp
    assert err.max() <= bound, f"worst error {err.max():.2f} ulp at x = {x[err.argmax()]:.4f} (bound {bound:.2f})"
    assert (ours[ref > 2 ** -150] != 0).all(), "subnormal results flushed to zero"


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_softmax), ("cpp", cpp)])
def test_strided_rows_and_grads(impl_name, impl):
    """Rows with a stride larger than the row are read in place; so is a grad with an outer stride."""
    base = torch.randn(5, 300)
    x = base[:, :257].unsqueeze(-1)
    y = impl.softmax_fwd(x, 1.0, False)
    torch.testing.assert_close(y.squeeze(-1), F.softmax(x.squeeze(-1).contiguous(), -1))
    dy = torch.randn(5, 400)[:, :257].unsqueeze(-1)
    dx = impl.softmax_bwd(dy, y, 1.0, False)
    ys = y.squeeze(-1)
    ref = ys * (dy.squeeze(-1) - (dy.squeeze(-1) * ys).sum(-1, keepdim=True))
    torch.testing.assert_close(dx.squeeze(-1), ref)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("n", (781, 65537))
def test_gpu_compile(n):
    """Every softmax kernel configuration the launchers pick (single block, looped, inner dim, log/softmax)
    compiles for sm_80/90."""
    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for inner in (1, 3):
                x = torch.randn(2, n, inner, dtype=dtype)
                for log in (False, True):
                    y = triton_softmax.softmax_fwd(x, 1.0, log)
                    triton_softmax.softmax_bwd(x, y, 1.0, log)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_softmax_fwd_kernel", "_softmax_bwd_kernel"}
