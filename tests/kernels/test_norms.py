"""RMSNorm / LayerNorm / fused add+RMSNorm / GroupNorm (+ SiLU) kernels, Triton (interpreter) and C++, against the
reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import norms
from tests.util import (WIDTHS, assert_within_torch_error, check_gpu_compile, impl_cases, leaf,
                        on_device, torch_and_ref)

triton_norms = on_device(norms)
cpp = torch.ops.tritium
CASES, _ = impl_cases(triton_norms)
ROWS = 3
# More rows than the interpreter's 8 programs (kernels/_utils.py num_programs): each backward program then loops
# over several rows and sums their dW / dB, the path every GPU launch takes (19 = 6 programs of 3 rows, one of 1
# and one of none).
MANY_ROWS = 19


def _inputs(n, dtype, offset=0.0, rows=ROWS):
    x = torch.randn(rows, n, dtype=torch.float64) * 2 + offset
    w = torch.randn(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    dy = torch.randn(rows, n, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b, dy)]


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, _, d in CASES])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(impl_name, impl, dtype, n, with_weight):
    check_rms_norm(impl, dtype, n, with_weight)


def check_rms_norm(impl, dtype, n, with_weight, rows=ROWS):
    x, w, _, dy = _inputs(n, dtype, rows=rows)
    eps = 1e-6
    weight = w if with_weight else None
    y, rstd = impl.rms_norm_fwd(x, weight, eps)
    dx, dw = impl.rms_norm_bwd(dy, x, weight, rstd, None, with_weight)
    if with_weight:
        fn = lambda x_, w_: F.rms_norm(x_, (n,), w_, eps)  # noqa: E731
        (ty, tg), (ry, rg) = torch_and_ref(fn, [x, w], dy, dtype)
        assert_within_torch_error(dw, tg[1], rg[1], "dw")
    else:
        fn = lambda x_: F.rms_norm(x_, (n,), None, eps)  # noqa: E731
        (ty, tg), (ry, rg) = torch_and_ref(fn, [x], dy, dtype)
        assert dw.numel() == 0
    assert_within_torch_error(y, ty, ry, "y")
    assert_within_torch_error(dx, tg[0], rg[0], "dx")
    # rstd (kept in float32, float64 for float64): within 2x the error of torch's composition in that dtype
    ref_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
    assert_within_torch_error(rstd, torch.rsqrt(x.to(rstd.dtype).pow(2).mean(-1) + eps), ref_rstd, "rstd")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, _, d in CASES])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm(impl_name, impl, dtype, n, affine):
    check_layer_norm(impl, dtype, n, affine)


def check_layer_norm(impl, dtype, n, affine, rows=ROWS):
    # offset 3: a mean well away from zero exercises the variance computation
    x, w, b, dy = _inputs(n, dtype, offset=3.0, rows=rows)
    eps = 1e-5
    weight = w if "w" in affine else None
    bias = b if "b" in affine else None
    y, mean, rstd = impl.layer_norm_fwd(x, weight, bias, eps)
    dx, dw, db = impl.layer_norm_bwd(dy, x, weight, mean, rstd, weight is not None, bias is not None)
    params = [p for p in (weight, bias) if p is not None]

    def fn(x_, *ps):
        it = iter(ps)
        w_ = next(it) if weight is not None else None
        b_ = next(it) if bias is not None else None
        return F.layer_norm(x_, (n,), w_, b_, eps)

    (ty, tg), (ry, rg) = torch_and_ref(fn, [x] + params, dy, dtype)
    assert_within_torch_error(y, ty, ry, "y")
    assert_within_torch_error(dx, tg[0], rg[0], "dx")
    k = 1
    if weight is not None:
        assert_within_torch_error(dw, tg[k], rg[k], "dw")
        k += 1
    if bias is not None:
        assert_within_torch_error(db, tg[k], rg[k], "db")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, _, d in CASES])
@pytest.mark.parametrize("n", (7, 781, 65537))
def test_fused_add_rms_norm(impl_name, impl, dtype, n):
    check_fused_add_rms_norm(impl, dtype, n)


def check_fused_add_rms_norm(impl, dtype, n, rows=ROWS):
    x, w, _, dy = _inputs(n, dtype, rows=rows)
    res = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    dh = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    eps = 1e-6
    y, h, rstd = impl.fused_add_rms_norm_fwd(x, res, w, eps)
    torch.testing.assert_close(h, x + res, rtol=0, atol=0)  # the same rounding as the unfused add
    dx, dw = impl.rms_norm_bwd(dy, h, w, rstd, dh, True)

    outs = {}
    for d in (dtype, torch.float64):
        xi, ri, wi = leaf(x, d), leaf(res, d), leaf(w, d)
        hh = xi + ri
        yy = F.rms_norm(hh, (n,), wi, eps)
        g = torch.autograd.grad((yy, hh), (xi, ri, wi), (dy.to(d), dh.to(d)))
        outs[d] = (yy.detach(), g)
    (ty, tg), (ry, rg) = outs[dtype], outs[torch.float64]
    assert_within_torch_error(y, ty, ry, "y")
    assert_within_torch_error(dx, tg[0], rg[0], "dx")
    assert_within_torch_error(dw, tg[2], rg[2], "dw")


def check_many_rows(impl, dtype, n):
    """Every norm's weight / bias gradient summed over MANY_ROWS rows (the cross-row loop of the backward)."""
    check_rms_norm(impl, dtype, n, True, rows=MANY_ROWS)
    check_layer_norm(impl, dtype, n, "wb", rows=MANY_ROWS)
    check_fused_add_rms_norm(impl, dtype, n, rows=MANY_ROWS)


# 123: one block per row (sums in registers); 20000 float32: rows looped in blocks (sums in the partial buffers)
@pytest.mark.parametrize("dtype,n", [(torch.float32, 123), (torch.bfloat16, 123), (torch.float32, 20000)],
                         ids=["float32-123", "bfloat16-123", "float32-20000"])
def test_triton_rows_past_programs(dtype, n):
    check_many_rows(triton_norms, dtype, n)


# GroupNorm shapes (N, C, spatial, groups): odd channels per group, odd spatial sizes, one sample, groups = 1 and
# groups = C, 2-D (no spatial dims) and 1-D/3-D spatial; (2, 64, 100) with one group loops over channel tiles and
# (2, 6, 1500) over spatial tiles in the Triton kernels (kernels/norms.py GN_TILE); (3, 16, (4, 4), 2) and
# (2, 10, (3, 3), 2) are small maps the C++ kernel takes as whole blocks (csrc/norms.cpp flat_blocks: vectors
# across channels, and a scalar tail), the others up to (2, 15, (7, 3), 5) too, (2, 64, (100,), 1) channel by channel.
GN_SHAPES = [(1, 7, (5,), 1), (3, 6, (3, 5), 6), (2, 9, (11,), 3), (2, 10, (), 5), (1, 4, (3, 2, 3), 2),
             (2, 15, (7, 3), 5), (2, 64, (100,), 1), (2, 6, (1500,), 3), (3, 16, (4, 4), 2), (2, 10, (3, 3), 2)]


def _gn_act(silu):
    return F.silu if silu else (lambda v: v)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, _, d in CASES])
@pytest.mark.parametrize("n,c,spatial,groups", GN_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_group_norm(impl_name, impl, dtype, n, c, spatial, groups, silu):
    check_group_norm(impl, dtype, n, c, spatial, groups, silu, affine="wb")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, _, d in CASES])
@pytest.mark.parametrize("affine", ["w", "none"])
def test_group_norm_without_bias(impl_name, impl, dtype, affine):
    check_group_norm(impl, dtype, 2, 9, (11,), 3, True, affine)
    check_group_norm(impl, dtype, 2, 9, (11,), 3, False, affine)


def check_group_norm(impl, dtype, n, c, spatial, groups, silu, affine):
    eps = 1e-5
    g64 = torch.Generator().manual_seed(n * 1000 + c)
    # offset 3: a mean well away from zero exercises the variance computation
    x = (torch.randn(n, c, *spatial, dtype=torch.float64, generator=g64) * 2 + 3).to(dtype)
    w, b = (torch.randn(c, dtype=torch.float64, generator=g64).to(dtype) for _ in range(2))
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g64).to(dtype)
    weight = w if "w" in affine else None
    bias = b if "b" in affine else None
    s = math.prod(spatial)
    blocks = (n * groups, c // groups, s)
    y, mean, rstd = impl.group_norm_fwd(x.reshape(blocks), weight, bias, groups, eps, silu)
    dx, dw, db = impl.group_norm_bwd(dy.reshape(blocks), x.reshape(blocks), weight, bias, mean, rstd, groups, silu,
                                     weight is not None, bias is not None)
    params = [p for p in (weight, bias) if p is not None]

    def fn(x_, *ps):
        it = iter(ps)
        w_ = next(it) if weight is not None else None
        b_ = next(it) if bias is not None else None
        return _gn_act(silu)(F.group_norm(x_, groups, w_, b_, eps))

    (ty, tg), (ry, rg) = torch_and_ref(fn, [x] + params, dy, dtype)
    assert_within_torch_error(y.reshape(x.shape), ty, ry, "y")
    assert_within_torch_error(dx.reshape(x.shape), tg[0], rg[0], "dx")
    k = 1
    if weight is not None:
        assert_within_torch_error(dw, tg[k], rg[k], "dw")
        k += 1
    else:
        assert dw.numel() == 0
    if bias is not None:
        assert_within_torch_error(db, tg[k], rg[k], "db")
    else:
        assert db.numel() == 0
    # the statistics (float32, float64 for float64) within 2x torch's error in that dtype
    xb = x.reshape(n * groups, -1)
    for stat, fn_ in ((mean, lambda t: t.mean(-1)), (rstd, lambda t: torch.rsqrt(t.var(-1, correction=0) + eps))):
        assert_within_torch_error(stat, fn_(xb.to(stat.dtype)), fn_(xb.double()), "stat")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_group_norm_silu_saturates_like_torch(dtype):
    """The C++ forward at SiLU's ends and on NaN, in 16 bits its own exponential and reciprocal: channels scaled so
    z reaches +-1e4 (exp(-z) overflows and underflows) give torch's silu of them (z and -0), a channel of
    infinities gives torch's NaN and a NaN stays NaN; the other channels keep 16-bit accuracy. S = 96: the
    vectorized channel loop and its tail."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 96, generator=g).to(dtype)
    x[1, 3, 7] = float("nan")
    w = torch.tensor([1e4, -1e4, 1.0, 2.0]).to(dtype)
    b = torch.tensor([0.0, 0.0, 0.5, -1.0]).to(dtype)
    y, _, _ = cpp.group_norm_fwd(x.reshape(8, 1, 96), w, b, 4, 1e-5, True)
    want = F.silu(F.group_norm(x.float(), 4, w.float(), b.float(), 1e-5)).to(dtype)
    y = y.reshape(x.shape)
    assert torch.isnan(y[1, 3]).all() and not torch.isnan(y[:, :3]).any() and not torch.isnan(y[0]).any()
    # the scaled channels: z (up to +1e4) and -0 at the far ends, within a bfloat16 ulp of torch's (the scale of
    # 1e4 multiplies xhat's rounding too)
    torch.testing.assert_close(y[:, :2], want[:, :2], rtol=8e-3, atol=0)
    assert torch.equal(torch.signbit(y[:, :2]), torch.signbit(want[:, :2]))
    torch.testing.assert_close(y[0, 2:], want[0, 2:])
    torch.testing.assert_close(y[1, 2], want[1, 2])


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_norms), ("cpp", cpp)])
def test_strided_rows(impl_name, impl):
    """Rows with a stride larger than the row (a slice of a wider tensor) are read in place; so are GroupNorm
    blocks."""
    base = torch.randn(5, 300)
    x = base[:, :257]
    w = torch.randn(257)
    y, _ = impl.rms_norm_fwd(x, w, 1e-6)
    torch.testing.assert_close(y, F.rms_norm(x.contiguous(), (257,), w, 1e-6))
    y, _, _ = impl.layer_norm_fwd(x, w, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x.contiguous(), (257,), w, None, 1e-5))
    # GroupNorm with one group: each sample is a block, every other sample of a batch of 8 (block stride 84)
    xs, dy = torch.randn(8, 6, 7)[::2], torch.randn(8, 6, 7)[::2]
    assert xs.stride(0) == 84
    gw, gb = torch.randn(6), torch.randn(6)
    y, mean, rstd = impl.group_norm_fwd(xs, gw, gb, 1, 1e-5, True)
    torch.testing.assert_close(y, F.silu(F.group_norm(xs, 1, gw, gb, 1e-5)))
    dx, _, _ = impl.group_norm_bwd(dy, xs, gw, gb, mean, rstd, 1, True, False, False)
    xl = xs.clone().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(F.silu(F.group_norm(xl, 1, gw, gb, 1e-5)), xl, dy)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("n", (781, 65537))
def test_gpu_compile(n):
    """Every norm kernel configuration the launchers pick (single block and looped) compiles for sm_80/90."""
    x = torch.randn(4, n)
    w, b = torch.randn(n), torch.randn(n)

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            y, rstd = triton_norms.rms_norm_fwd(xd, wd, 1e-6)
            triton_norms.rms_norm_bwd(xd, xd, wd, rstd, xd, True)
            _, h, rstd = triton_norms.fused_add_rms_norm_fwd(xd, xd, wd, 1e-6)
            y, mean, rstd = triton_norms.layer_norm_fwd(xd, wd, bd, 1e-5)
            triton_norms.layer_norm_bwd(xd, xd, wd, mean, rstd, True, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_norm_fwd_kernel", "_norm_bwd_kernel"}


@pytest.mark.gpu_compile
@pytest.mark.parametrize("d,s", [(8, 1024), (16, 49), (64, 1)], ids=["tile-of-spatial", "odd-spatial", "2d"])
def test_group_norm_gpu_compile(d, s):
    """Every group_norm tile shape the launchers pick (wide spatial, a few rows of odd spatial, channels only),
    with and without SiLU, compiles for sm_80/90 without spills."""
    x = torch.randn(4, d, s)
    w, b = torch.randn(2 * d), torch.randn(2 * d)

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            for silu in (False, True):
                y, mean, rstd = triton_norms.group_norm_fwd(xd, wd, bd, 2, 1e-5, silu)
                triton_norms.group_norm_bwd(xd, xd, wd, bd, mean, rstd, 2, silu, True, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_group_norm_fwd_kernel", "_group_norm_bwd_kernel"}
