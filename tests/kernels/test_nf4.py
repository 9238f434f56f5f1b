"""NF4 linear kernels (forward y = x W^T + bias, input gradient dx = dy W, dequantisation), Triton (interpreter) and
C++, against the float64 reference of the same NF4 weight (tritium.ops.nf4.dequantize_nf4_reference): N odd (tails
of every tile), K several runs and blocks, blocksizes 64 to 256, rows for decode and for the GEMM paths, every kernel
dtype; the dequantised weight exactly; and the GPU compile check for sm_80 / sm_90."""
import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium.kernels import nf4
from tritium.ops.nf4 import dequantize_nf4_reference
from tests.util import (KERNEL_DTYPES, assert_within_torch_error, check_gpu_compile, interpreter_bf16_dot, on_device,
                        torch_and_ref)

triton_nf4 = on_device(nf4)
IMPLS = [("triton", triton_nf4), ("cpp", torch.ops.tritium)]
CASES = [(name, impl, dt) for name, impl in IMPLS for dt in KERNEL_DTYPES]
IDS = [f"{name}-{str(dt)[6:]}" for name, _, dt in CASES]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    with interpreter_bf16_dot():
        yield


def _weight(n, k, bs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = tritium.quantize_nf4(torch.randn(n, k, generator=gen) * 0.05, bs)
    return q, dequantize_nf4_reference(q)


def check(impl, dtype, m, n, k, bs, bias):
    q, w64 = _weight(n, k, bs, seed=m + n)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    b = torch.randn(n, dtype=torch.float64).to(dtype) if bias else None
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    qd, am = q.data.view(-1), q.absmax
    y = impl.nf4_linear_fwd(x, qd, am, b, n, k, bs)
    dx = impl.nf4_linear_dx(dy, qd, am, n, k, bs)

    def fn(x_):
        return F.linear(x_, w64.to(x_.dtype), None if b is None else b.to(x_.dtype))

    (ty, (tdx,)), (ry, (rdx,)) = torch_and_ref(fn, [x], dy, dtype)
    what = f"{m}x{n}x{k} bs{bs}"
    assert_within_torch_error(y, ty, ry, f"y {what}")
    assert_within_torch_error(dx, tdx, rdx, f"dx {what}")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("m", (1, 16, 45))
@pytest.mark.parametrize("bias", (False, True), ids=("plain", "bias"))
def test_linear(impl_name, impl, dtype, m, bias):
    """M 1 and 16 (a decode step: one 16-row tile, the C++ register decode), 45 (two tiles with a tail; the C++
    GEMM path); N = 37 and K = 192 (3 runs of 64, 3 blocks)."""
    check(impl, dtype, m, 37, 192, 64, bias)


@pytest.mark.parametrize("impl_name,impl", IMPLS, ids=[n for n, _ in IMPLS])
@pytest.mark.parametrize("bs", (128, 256))
def test_blocksizes(impl_name, impl, bs):
    """Blocks of several runs, a row of two blocks, N past two 32-row tiles."""
    check(impl, torch.float32, 3, 70, 512, bs, True)
    check(impl, torch.bfloat16, 20, 70, 512, bs, False)


@pytest.mark.parametrize("impl_name,impl", IMPLS, ids=[n for n, _ in IMPLS])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_dequantize(impl_name, impl, dtype):
    q, w64 = _weight(37, 384, 128)
    out = impl.nf4_dequantize(q.data.view(-1), q.absmax, 37, 384, 128, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, w64.float().to(dtype))


@pytest.mark.parametrize("impl_name,impl", IMPLS, ids=[n for n, _ in IMPLS])
def test_strided_x(impl_name, impl):
    """x and dy as column slices of wider tensors (row stride past their width)."""
    q, w64 = _weight(21, 128, 64)
    x = torch.randn(5, 200)[:, 7:135]
    dy = torch.randn(5, 40)[:, 3:24]
    y = impl.nf4_linear_fwd(x, q.data.view(-1), q.absmax, None, 21, 128, 64)
    dx = impl.nf4_linear_dx(dy, q.data.view(-1), q.absmax, 21, 128, 64)
    torch.testing.assert_close(y, (x.double() @ w64.t()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, (dy.double() @ w64).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every launch configuration the launchers pick (each dtype, decode and prefill tiles, bias, dx and the
    dequantisation) compiles for sm_80/sm_90 without spills."""
    def run():
        q, _ = _weight(160, 192, 64)
        qd, am = q.data.view(-1), q.absmax
        for dtype in KERNEL_DTYPES:
            for m, bias in ((1, True), (70, False)):
                x = torch.randn(m, 192).to(dtype)
                nf4.nf4_linear_fwd(x, qd, am, torch.randn(160).to(dtype) if bias else None, 160, 192, 64)
                nf4.nf4_linear_dx(torch.randn(m, 160).to(dtype), qd, am, 160, 192, 64)
            nf4.nf4_dequantize(qd, am, 160, 192, 64, dtype)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_fwd_kernel", "_dx_kernel", "_dequant_kernel"}
