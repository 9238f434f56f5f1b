"""cross_entropy_z_fwd (cross-entropy with z-loss and logit soft-capping), Triton (interpreter) and C++, against
torch's cross-entropy of the capped logits plus z lse^2 in float64 (tritium.reference.cross_entropy)."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import cross_entropy
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_ce = on_device(cross_entropy)
cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_ce)
ROWS = 5
OPTIONS = [(0.0, 5.0), (1e-2, 0.0), (3e-2, 30.0)]  # (z_loss, softcap): cap only, z only, both


def ref_rows(x, t, w, smoothing, z_loss, cap, mean):
    """The kernel's per-row losses, composed independently of reference.cross_entropy's z-loss: torch's
    cross-entropy of the capped logits (over the total weight for 'mean') + z_loss lse^2 (over the non-ignored
    count for 'mean'), 0 on ignored rows."""
    ce = reference.cross_entropy(x, t, w, reduction="none", label_smoothing=smoothing, softcap=cap)
    y = cap * torch.tanh(x / cap) if cap else x
    valid = t != -100
    z = torch.where(valid, z_loss * torch.logsumexp(y, 1) ** 2, 0.0)
    if mean:
        ce = ce / (w[t[valid]].sum() if w is not None else valid.sum().to(x.dtype))
        z = z / valid.sum().to(x.dtype)
    return ce + z


def _targets(c):
    t = torch.randint(0, c, (ROWS,))
    t[1] = -100
    return t


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("c", (1, 7, 123, 781, 4097, 65537))
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.25)],
                         ids=["plain", "weight", "smooth", "weight+smooth"])
@pytest.mark.parametrize("z_loss,softcap", OPTIONS, ids=["cap", "z", "z+cap"])
def test_cross_entropy_z(impl_name, impl, dtype, c, weighted, smoothing, z_loss, softcap):
    x = (torch.randn(ROWS, c, dtype=torch.float64) * 8).to(dtype)  # * 8: the cap's saturation is exercised
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    t = _targets(c)
    dloss = torch.randn(ROWS, dtype=torch.float64).to(dtype).double()
    cap = softcap or None
    for mean in (False, True):
        loss, grad, total = impl.cross_entropy_z_fwd(x, t, w, -100, smoothing, mean, True, z_loss, softcap)
        adt = torch.float64 if dtype == torch.float64 else torch.float32
        assert loss.dtype == adt and grad.dtype == adt
        assert torch.all(grad[1] == 0) and loss[1] == 0  # the ignored row
        dx = impl.cross_entropy_bwd(grad, dloss.to(adt), dtype)
        outs = {}
        for d in (dtype, torch.float64):
            xi = leaf(x, d)
            ll = ref_rows(xi, t, None if w is None else w.to(d), smoothing, z_loss, cap, mean)
            outs[d] = (ll.detach(), torch.autograd.grad(ll, xi, dloss.to(d))[0])
        assert_within_torch_error(loss.to(dtype), outs[dtype][0], outs[torch.float64][0], f"loss mean={mean}")
        assert_within_torch_error(dx, outs[dtype][1], outs[torch.float64][1], f"dx mean={mean}")


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_ce), ("cpp", cpp)])
@pytest.mark.parametrize("c", (7, 4097))
def test_off_is_bit_identical(impl_name, impl, c):
    """z_loss 0 and softcap 0 are cross_entropy_fwd, bit for bit."""
    x, w, t = torch.randn(ROWS, c) * 3, torch.rand(c) + 0.5, _targets(c)
    for weight, ls, mean in ((None, 0.0, True), (w, 0.1, False), (w, 0.0, True)):
        a = impl.cross_entropy_fwd(x, t, weight, -100, ls, mean, True)
        b = impl.cross_entropy_z_fwd(x, t, weight, -100, ls, mean, True, 0.0, 0.0)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_ce), ("cpp", cpp)])
def test_mean_over_zero_rows_is_nan(impl_name, impl):
    x, t = torch.randn(3, 9), torch.full((3,), -100)
    loss, grad, _ = impl.cross_entropy_z_fwd(x, t, None, -100, 0.1, True, True, 1e-3, 10.0)
    assert torch.isnan(loss.sum()) and torch.all(grad == 0)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_ce), ("cpp", cpp)])
def test_no_grad_and_extremes(impl_name, impl):
    """need_grad=False writes no gradient; +-1e4 logits (capped to +-c) and a row starting with -inf."""
    c = 5000
    x = torch.randn(3, c) * 1e4
    x[2, :4000] = float("-inf")
    t = torch.tensor([3, 4999, 4500])
    loss, grad, _ = impl.cross_entropy_z_fwd(x, t, None, -100, 0.0, False, False, 1e-4, 50.0)
    assert grad.numel() == 0
    ref = reference.cross_entropy(x.double(), t, reduction="none", z_loss=1e-4, softcap=50.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("c", (781, 65537))
def test_gpu_compile(c):
    """The z-loss / soft-capping configurations of the forward kernel compile (single block and looped)."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, c, dtype=dtype)
            t = torch.tensor([1, -100])
            w = torch.rand(c, dtype=dtype)
            for weight, ls in ((None, 0.0), (w, 0.1)):
                for z, cap in OPTIONS:
                    for mean, need in ((True, True), (False, False)):
                        triton_ce.cross_entropy_z_fwd(x, t, weight, -100, ls, mean, need, z, cap)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_ce_fwd_kernel"}
