"""LoRA linear kernels (forward, backward), Triton (interpreter) and C++, against the float64 reference: odd sizes,
rank 1 to a rank past the 16-wide dot, with and without bias and a dropout mask, every gradient (dx, dA, dB),
row counts on both sides of the C++ kernel's path choices (concatenated operands and float32 panels from 64 / 256
rows), strided inputs, and the GPU compile check."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import lora
from tests.util import (assert_within_torch_error, check_gpu_compile, impl_cases, interpreter_bf16_dot, on_device,
                        torch_and_ref)

triton_lora = on_device(lora)
CASES, IDS = impl_cases(triton_lora)
K, N = 37, 29      # in and out features: several Triton blocks with masked tails
SCALE = 1.75


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    """bf16 dots in the interpreter as a GPU computes them (tests/util.py interpreter_bf16_dot)."""
    with interpreter_bf16_dot():
        yield


def _inputs(dtype, M, R, bias, mask, k=K, n=N):
    """x, weight, bias, lora_A, lora_B, mask (0/1), dy in dtype (None where absent)."""
    x = torch.randn(M, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, dtype=torch.float64) if bias else None
    a = torch.randn(R, k, dtype=torch.float64) / k ** 0.5
    bb = torch.randn(n, R, dtype=torch.float64)
    m = (torch.rand(M, k) > 0.25).double() if mask else None
    dy = torch.randn(M, n, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (x, w, b, a, bb, m, dy)]


def check_lora(impl, dtype, M, R, bias, mask, k=K, n=N, x=None):
    xi, w, b, a, bb, m, dy = _inputs(dtype, M, R, bias, mask, k, n)
    x = xi if x is None else x
    y, xs = impl.lora_linear_fwd(x, w, b, a, bb, m, SCALE)
    dx, da, db = impl.lora_linear_bwd(dy, x, w, a, bb, m, xs, SCALE, True)

    def fn(x_, a_, b_):
        xm = x_ if m is None else x_ * m.to(x_.dtype)
        return F.linear(x_, w.to(x_.dtype), None if b is None else b.to(x_.dtype)) + (xm @ a_.t() * SCALE) @ b_.t()

    (ty, tg), (ry, rg) = torch_and_ref(fn, [x, a, bb], dy, dtype)
    assert_within_torch_error(y, ty, ry, "y")
    assert_within_torch_error(xs, (x if m is None else x * m) @ a.t() * SCALE,
                              (x.double() if m is None else x.double() * m.double()) @ a.double().t() * SCALE, "xs")
    for name, o, t, r in zip(("dx", "dA", "dB"), (dx, da, db), tg, rg):
        assert_within_torch_error(o, t, r, name)
    _, da2, db2 = impl.lora_linear_bwd(dy, x, w, a, bb, m, xs, SCALE, False)   # no dx: only the adapter's
    torch.testing.assert_close(da2, da)
    torch.testing.assert_close(db2, db)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("M", (1, 45))
@pytest.mark.parametrize("R", (1, 5, 16, 19))
@pytest.mark.parametrize("variant", ["plain", "bias", "mask", "bias-mask"])
def test_lora(impl_name, impl, dtype, M, R, variant):
    check_lora(impl, dtype, M, R, "bias" in variant, "mask" in variant)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("R", (1, 19, 80))
def test_rows(impl_name, impl, dtype, R):
    """300 rows: several of the Triton kernels' row blocks with a tail; the C++ kernel's concatenated operands;
    rank 80: past the Triton kernels' 64 ranks per dot (two rank blocks, the second masked)."""
    check_lora(impl, dtype, 300, R, True, R != 1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=lambda d: str(d)[6:])
def test_cpp_paths(dtype):
    """The C++ kernel's row thresholds (float32 panels from 64 rows, 16-bit concatenated operands from 256), at
    a width past one panel (64 floats) with a tail."""
    for M in (63, 64, 255, 256, 700):
        check_lora(torch.ops.tritium, dtype, M, 7, True, False, k=131, n=150)
    check_lora(torch.ops.tritium, dtype, 300, 3, False, True, k=131, n=150)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_lora), ("cpp", torch.ops.tritium)])
def test_strided(impl_name, impl):
    """x as a column slice of a wider tensor (row stride past its width), weight and adapters as transposed views."""
    M, R = 40, 4
    x = torch.randn(M, 2 * K)[:, 3:3 + K]
    w, a, bb = torch.randn(K, N).t(), torch.randn(K, R).t(), torch.randn(R, N).t()
    dy = torch.randn(M, N)
    y, xs = impl.lora_linear_fwd(x, w, None, a, bb, None, SCALE)
    dx, da, db = impl.lora_linear_bwd(dy, x, w, a, bb, None, xs, SCALE, True)
    xc, wc, ac, bc = (t.contiguous() for t in (x, w, a, bb))
    y2, xs2 = impl.lora_linear_fwd(xc, wc, None, ac, bc, None, SCALE)
    for got, want in zip((y, xs) + tuple(impl.lora_linear_bwd(dy, xc, wc, ac, bc, None, xs2, SCALE, True)),
                         (y2, xs2, dx, da, db)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want = F.linear(xc, wc) + SCALE * (xc @ ac.t()) @ bc.t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every launch configuration the launchers pick (each dtype, rank 1, past 16 and past 64, bias and mask, the
    forward's and the backward's matmul) compiles for sm_80/sm_90 without spills."""
    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for R, bias, mask in ((1, True, False), (40, False, True), (80, False, False)):
                x, w, b, a, bb, m, dy = _inputs(dtype, 70, R, bias, mask, k=96, n=160)
                y, xs = lora.lora_linear_fwd(x, w, b, a, bb, m, SCALE)
                lora.lora_linear_bwd(dy, x, w, a, bb, m, xs, SCALE, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_lora_down_kernel", "_lora_matmul_kernel", "_lora_tgrad_kernel"}
