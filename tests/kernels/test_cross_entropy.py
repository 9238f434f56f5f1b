"""Cross-entropy kernels (fused loss + gradient rows, and the row-scaling backward), Triton (interpreter) and C++,
against torch and a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import cross_entropy
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_ce = on_device(cross_entropy)

cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_ce)
ROWS = 5


def _targets(c, ignore_index=-100):
    t = torch.randint(0, c, (ROWS,))
    t[1] = ignore_index
    return t


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("c", (1, 7, 123, 781, 4097, 65537))
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.25)],
                         ids=["plain", "weight", "smooth", "weight+smooth"])
def test_cross_entropy(impl_name, impl, dtype, c, weighted, smoothing):
    x = (torch.randn(ROWS, c, dtype=torch.float64) * 3).to(dtype)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    t = _targets(c)
    dloss = torch.randn(ROWS, dtype=torch.float64).to(dtype).double()  # rounded: every side sees the same values
    loss, grad, total = impl.cross_entropy_fwd(x, t, w, -100, smoothing, False, True)
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == adt and total.dtype == adt and grad.dtype == adt
    dx = impl.cross_entropy_bwd(grad, dloss.to(adt), dtype)
    outs = {}
    for d in (dtype, torch.float64):
        xi = leaf(x, d)
        ll = F.cross_entropy(xi, t, None if w is None else w.to(d), reduction="none", label_smoothing=smoothing)
        outs[d] = (ll.detach(), torch.autograd.grad(ll, xi, dloss.to(d))[0])
    assert_within_torch_error(loss.to(dtype), outs[dtype][0], outs[torch.float64][0], "loss")
    assert_within_torch_error(dx, outs[dtype][1], outs[torch.float64][1], "dx")
    expected_total = (w.double()[t[t != -100]].sum() if w is not None else (t != -100).sum().double())
    # the total weight: a float32 (float64) sum of ROWS exactly representable weights, within a few ulp
    torch.testing.assert_close(total.double(), expected_total, rtol=4 * torch.finfo(total.dtype).eps, atol=0)
    assert torch.all(grad[1] == 0) and loss[1] == 0  # the ignored row
    # 'mean': rows divided by the total weight, so they sum to torch's mean
    mloss, mgrad, _ = impl.cross_entropy_fwd(x, t, w, -100, smoothing, True, True)
    torch.testing.assert_close(mloss.double(), loss.double() / expected_total)
    torch.testing.assert_close(mgrad.double(), grad.double() / expected_total)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_ce), ("cpp", cpp)])
def test_mean_over_zero_rows_is_nan(impl_name, impl):
    x, t = torch.randn(3, 9), torch.full((3,), -100)
    loss, grad, total = impl.cross_entropy_fwd(x, t, None, -100, 0.1, True, True)
    assert total == 0 and torch.isnan(loss.sum()) and torch.all(grad == 0)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_ce), ("cpp", cpp)])
def test_no_grad_and_extremes(impl_name, impl):
    """need_grad=False writes no gradient; +-1e4 logits and a row starting with -inf are exact."""
    c = 5000
    x = torch.randn(3, c) * 1e4
    x[2, :4000] = float("-inf")
    t = torch.tensor([3, 4999, 4500])
    loss, grad, _ = impl.cross_entropy_fwd(x, t, None, -100, 0.0, False, False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="none"))


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_ce), ("cpp", cpp)])
def test_strided_rows(impl_name, impl):
    x = torch.randn(4, 300)[:, :257]
    t = torch.randint(0, 257, (8,))[::2]  # a strided target
    loss, grad, _ = impl.cross_entropy_fwd(x, t, None, -100, 0.0, False, True)
    xi = leaf(x.contiguous())
    ref = F.cross_entropy(xi, t, reduction="none")
    torch.testing.assert_close(loss, ref.detach())
    dloss = torch.randn(8)[::2]  # a strided upstream gradient
    torch.testing.assert_close(impl.cross_entropy_bwd(grad, dloss, x.dtype), torch.autograd.grad(ref, xi, dloss)[0])


def test_cpp_out_of_range_target_raises_index_error():
    x = torch.randn(3, 5)
    for bad in (5, -3):
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
            cpp.cross_entropy_fwd(x, torch.tensor([0, bad, 1]), None, -100, 0.0, False, True)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("c", (781, 65537))
def test_gpu_compile(c):
    """Every cross-entropy kernel configuration (single block / looped, weights, smoothing, no-grad) compiles."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, c, dtype=dtype)
            t = torch.tensor([1, -100])
            w = torch.rand(c, dtype=dtype)
            for weight in (None, w):
                for ls in (0.0, 0.1):
                    for mean, need in ((True, True), (False, True), (False, False)):
                        _, g, _ = triton_ce.cross_entropy_fwd(x, t, weight, -100, ls, mean, need)
            _, g, _ = triton_ce.cross_entropy_fwd(x, t, None, -100, 0.0, False, True)
            triton_ce.cross_entropy_bwd(g, torch.ones(2), dtype)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_ce_fwd_kernel", "_ce_bwd_kernel"}
