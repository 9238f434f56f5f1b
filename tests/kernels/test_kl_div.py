"""KL divergence and distillation kernels, Triton (interpreter) and C++, against torch and a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import cross_entropy, kl_div
from tests.util import WIDTHS, assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_ce, triton_kl = on_device(cross_entropy), on_device(kl_div)

cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_kl)


def _inputs(n, log_target, dtype):
    """log-probabilities x and a target (probabilities with some exact zeros, or log-probabilities)."""
    x = torch.log_softmax(torch.randn(n, dtype=torch.float64) * 2, 0)
    p = torch.softmax(torch.randn(n, dtype=torch.float64) * 2, 0) * n / 4
    p[::5] = 0.0
    t = (p + 1e-3).log() if log_target else p
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("n", (1, 7, 1000, 40961))
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log"])
def test_kl_div_values_and_grads(impl_name, impl, dtype, n, log_target):
    x, t = _inputs(n, log_target, dtype)
    dy = torch.randn(n, dtype=torch.float64).to(dtype).double()  # rounded: every side sees the same values
    # 'none': pointwise values, and both gradients from a per-element upstream gradient
    out = impl.kl_div_fwd(x, t, log_target, False, 1.0)
    dx, dt = impl.kl_div_bwd(dy.to(dtype), x, t, log_target, True, True)
    ref = {}
    for d in (dtype, torch.float64):
        xi, ti = leaf(x, d), leaf(t, d)
        y = F.kl_div(xi, ti, reduction="none", log_target=log_target)
        ref[d] = (y.detach(),) + torch.autograd.grad(y, (xi, ti), dy.to(d))
    for ours, what, i in ((out, "loss", 0), (dx, "dx", 1), (dt, "dt", 2)):
        finite = torch.isfinite(ref[torch.float64][i])  # dt at t == 0 is NaN in torch too (checked below)
        assert torch.equal(torch.isnan(ours), torch.isnan(ref[dtype][i])), what
        assert_within_torch_error(ours[finite], ref[dtype][i][finite], ref[torch.float64][i][finite], what)
    # reductions: the sum scaled, one rounding; gradients from a 0-d upstream gradient
    for scale in (1.0, 1.0 / n):
        s = impl.kl_div_fwd(x, t, log_target, True, scale)
        assert s.shape == () and s.dtype == dtype
        total = {d: F.kl_div(x.to(d), t.to(d), reduction="sum", log_target=log_target) * scale
                 for d in (dtype, torch.float64)}
        assert_within_torch_error(s, total[dtype], total[torch.float64], "sum")
    g = torch.tensor(0.75, dtype=dtype)
    dx, dt = impl.kl_div_bwd(g, x, t, log_target, True, False)
    assert dt.numel() == 0
    theirs = {}
    for d in (dtype, torch.float64):  # torch in dtype (its error) and the float64 reference
        xi = leaf(x, d)
        y = F.kl_div(xi, t.to(d), reduction="sum", log_target=log_target)
        theirs[d] = torch.autograd.grad(y, xi, torch.tensor(0.75, dtype=d))[0]
    assert_within_torch_error(dx, theirs[dtype], theirs[torch.float64], "dx, 0-d upstream gradient")


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_kl), ("cpp", cpp)])
def test_kl_div_special_values(impl_name, impl):
    """Exact zeros, negative and NaN targets, infinite inputs: the same values and NaNs as torch, in float32."""
    x = torch.tensor([-1.0, 0.0, float("-inf"), -2.0, float("nan"), -0.5, -3.0, 1.0, -1.0] * 3)
    t = torch.tensor([0.0, 0.5, 0.3, -0.2, 0.1, float("nan"), 0.0, 1.0, float("inf")] * 3)
    for log_target in (False, True):
        xi, ti = leaf(x), leaf(t)
        y = F.kl_div(xi, ti, reduction="none", log_target=log_target)
        gx, gt = torch.autograd.grad(y, (xi, ti), torch.ones_like(y))
        torch.testing.assert_close(impl.kl_div_fwd(x, t, log_target, False, 1.0), y.detach(), equal_nan=True)
        dx, dt = impl.kl_div_bwd(torch.ones_like(x), x, t, log_target, True, True)
        torch.testing.assert_close(dx, gx, equal_nan=True)
        torch.testing.assert_close(dt, gt, equal_nan=True)


def test_log_over_the_float_range():
    """The C++ kernels' vector log (vec.h flog) over the positive float range, subnormals included, seen through
    kl_div's pointwise loss at x = 0: t log(t). Within 2x torch's worst error in float32 ulp (subnormal spacing at
    the bottom); dense around t = 1, where log(t) is small and its relative error shows."""
    t = torch.cat([torch.logspace(-45, 36, 200001, dtype=torch.float64).float(), torch.linspace(0.5, 2, 100001),
                   1 + torch.arange(-2000, 2000) * torch.finfo(torch.float32).eps])
    x = torch.zeros_like(t)
    ref = F.kl_div(x.double(), t.double(), reduction="none")
    fi = torch.finfo(torch.float32)
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))) * fi.eps
    theirs = F.kl_div(x, t, reduction="none")
    ours = cpp.kl_div_fwd(x, t, False, False, 1.0)
    bound = 2 * ((theirs.double() - ref).abs() / ulp).max()
    err = (ours.double() - ref).abs() / ulp
    assert err.max() <= bound, f"worst error {err.max():.2f} ulp at t = {t[err.argmax()]:.6g} (bound {bound:.2f})"
    # the target's gradient log(t) + 1 - x at x = 1: log(t) plus a rounding at the scale of max(1, |log(t)|)
    _, dt = cpp.kl_div_bwd(torch.ones_like(t), x + 1, t, False, False, True)
    ti = leaf(t)
    theirs_dt = torch.autograd.grad(F.kl_div(x + 1, ti, reduction="sum"), ti)[0]
    ref_dt = t.double().log()
    scale = ref_dt.abs().clamp_min(1) * fi.eps
    bound = 2 * ((theirs_dt.double() - ref_dt).abs() / scale).max()
    err = (dt.double() - ref_dt).abs() / scale
    assert err.max() <= bound, f"dt: worst error {err.max():.2f} at t = {t[err.argmax()]:.6g} (bound {bound:.2f})"


def _distill_ref(s, u, k):
    """float64 per-row KL(softmax(u k) || softmax(s k)) and its gradient with respect to s, with 0 where the
    teacher's probability is 0."""
    s, u = leaf(s, torch.float64), u.double()
    lq = torch.log_softmax(u * k, -1)
    q = lq.exp()
    kl = torch.where(q > 0, q * (lq - torch.log_softmax(s * k, -1)), 0.0).sum(-1)
    return kl.detach(), s, kl


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("c", WIDTHS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distill(impl_name, impl, dtype, c, temperature):
    rows = 3
    s = (torch.randn(rows, c, dtype=torch.float64) * 3).to(dtype)
    u = (s.double() + torch.randn(rows, c, dtype=torch.float64)).to(dtype)  # a teacher close to the student
    k = 1.0 / temperature
    loss, grad = impl.distill_fwd(s, u, k, True)
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == adt and grad.dtype == adt and grad.shape == (rows, c)
    dloss = torch.randn(rows, dtype=torch.float64).to(dtype).double()  # rounded: every side sees the same values
    ds = (triton_ce if impl is triton_kl else cpp).cross_entropy_bwd(grad, dloss.to(adt), dtype)  # row scaling
    # torch's own composition in dtype (its error) and the float64 reference
    si = leaf(s)
    theirs = F.kl_div(torch.log_softmax(si * k, -1), torch.log_softmax(u * k, -1), reduction="none",
                      log_target=True).sum(-1)
    theirs_ds = torch.autograd.grad(theirs, si, dloss.to(dtype))[0]
    ref, s64, kl64 = _distill_ref(s, u, k)
    ref_ds = torch.autograd.grad(kl64, s64, dloss)[0]
    assert_within_torch_error(loss.to(dtype), theirs.detach(), ref, "kl rows")
    assert_within_torch_error(ds, theirs_ds, ref_ds, "ds")
    loss2, grad2 = impl.distill_fwd(s, u, k, False)
    assert grad2.numel() == 0
    torch.testing.assert_close(loss2, loss)


def _hard_targets(rows, c, ignore_index, pattern):
    """Targets in [0, c) (a strided view) with some rows (or every row) set to ignore_index."""
    t = torch.randint(0, c, (2 * rows,))[::2]
    if pattern == "all":
        t[:] = ignore_index
    else:
        t[::3] = ignore_index
    return t


def _distill_target_rows(s, u, t, k, wk, ce_weight, ignore_index):
    """Per-row wk KL + (ce_weight / n_valid) CE in s's dtype, torch's own composition (0 on ignored rows)."""
    n_valid = int((t != ignore_index).sum())
    kl = F.kl_div(torch.log_softmax(s * k, -1), torch.log_softmax(u * k, -1), reduction="none",
                  log_target=True).sum(-1)
    ce = F.cross_entropy(s, t, ignore_index=ignore_index, reduction="none")
    return wk * kl + ce * (ce_weight / n_valid)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("c", (7, 1000, 4097))
@pytest.mark.parametrize("alpha,temperature,ignore_index", [(0.0, 2.5, -100), (0.3, 1.0, 3), (0.7, 2.5, -100),
                                                            (1.0, 2.5, 3)])
def test_distill_with_target(impl_name, impl, dtype, c, alpha, temperature, ignore_index):
    """The fused hard-label term: per-row wk KL + (1 - alpha) / n_valid CE, and one gradient row for both
    (scaled by a per-row upstream gradient through cross_entropy_bwd), against torch in dtype and float64."""
    rows = 19
    s = (torch.randn(rows, c, dtype=torch.float64) * 3).to(dtype)
    u = (s.double() + torch.randn(rows, c, dtype=torch.float64)).to(dtype)
    t = _hard_targets(rows, c, ignore_index, "some")
    k, wk, wc = 1.0 / temperature, alpha * temperature ** 2 / rows, 1.0 - alpha
    loss, grad = impl.distill_fwd(s, u, k, True, t, ignore_index, wk, wc)
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == adt and grad.dtype == adt and grad.shape == (rows, c)
    dloss = torch.randn(rows, dtype=torch.float64).to(dtype).double()  # rounded: every side sees the same values
    ds = (triton_ce if impl is triton_kl else cpp).cross_entropy_bwd(grad, dloss.to(adt), dtype)
    theirs, ref = {}, {}
    for d, out in ((dtype, theirs), (torch.float64, ref)):
        si = leaf(s, d)
        y = _distill_target_rows(si, u.to(d), t, k, wk, wc, ignore_index)
        out["loss"], out["ds"] = y.detach(), torch.autograd.grad(y, si, dloss.to(d))[0]
    assert_within_torch_error(loss.to(dtype), theirs["loss"], ref["loss"], "loss rows")
    assert_within_torch_error(ds, theirs["ds"], ref["ds"], "ds")
    loss2, grad2 = impl.distill_fwd(s, u, k, False, t, ignore_index, wk, wc)
    assert grad2.numel() == 0
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_kl), ("cpp", cpp)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_distill_with_target_all_ignored(impl_name, impl, alpha):
    """Every target ignored: the cross-entropy's mean is 0/0, so every row's loss is NaN (torch's NaN), while the
    gradient rows are the KL term's alone."""
    rows, c, k = 5, 300, 0.5
    s, u = torch.randn(rows, c) * 2, torch.randn(rows, c) * 2
    t = _hard_targets(rows, c, -100, "all")
    wk = alpha * 4.0 / rows
    loss, grad = impl.distill_fwd(s, u, k, True, t, -100, wk, 1.0 - alpha)
    assert torch.isnan(loss).all()
    _, kl_grad = impl.distill_fwd(s, u, k, True)
    torch.testing.assert_close(grad, kl_grad * wk, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_kl), ("cpp", cpp)])
def test_distill_without_target_unchanged(impl_name, impl):
    """No target (the defaults): the plain per-row KL and its k (p - q) rows, bit for bit what the weights 1 and
    0 give spelled out."""
    s, u = torch.randn(4, 777) * 2, torch.randn(4, 777) * 2
    a = impl.distill_fwd(s, u, 0.5, True)
    b = impl.distill_fwd(s, u, 0.5, True, None, -100, 1.0, 0.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref, s64, kl64 = _distill_ref(s, u, 0.5)
    torch.testing.assert_close(a[0].double(), ref, rtol=1e-5, atol=1e-6)


def test_distill_target_out_of_bounds_cpp():
    """A target outside [0, C) that is not ignore_index: cross_entropy's IndexError, before any row is computed."""
    s = torch.randn(3, 5)
    for bad in (5, -2):
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            cpp.distill_fwd(s, s, 1.0, True, torch.tensor([0, bad, -100]), -100, 0.5, 0.5)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_kl), ("cpp", cpp)])
def test_distill_extremes(impl_name, impl):
    """A teacher with -inf logits (probability 0) contributes 0 there; +-1e4 logits stay finite and exact;
    a NaN in the student gives NaN."""
    c = 5000
    s = torch.randn(3, c) * 1e4
    u = torch.randn(3, c) * 1e4
    u[1, :4000] = float("-inf")
    loss, grad = impl.distill_fwd(s, u, 0.5, True)
    ref, s64, kl64 = _distill_ref(s, u, 0.5)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(kl64.sum(), s64)[0], rtol=1e-5, atol=1e-6)
    s[2, 7] = float("nan")
    loss, _ = impl.distill_fwd(s, u, 0.5, False)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every kl_div and distillation kernel configuration compiles for sm_80/sm_90."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            x, t = _inputs(3000, False, dtype)
            for log_target in (False, True):
                triton_kl.kl_div_fwd(x, t, log_target, False, 1.0)
                triton_kl.kl_div_fwd(x, t, log_target, True, 0.5)
                triton_kl.kl_div_bwd(torch.ones_like(x), x, t, log_target, True, True)
                triton_kl.kl_div_bwd(torch.tensor(1.0, dtype=dtype), x, t, log_target, True, False)
            for c in (781, 65537):
                s = torch.randn(2, c, dtype=dtype)
                t = torch.tensor([1, -100])
                triton_kl.distill_fwd(s, s, 0.5, True)
                triton_kl.distill_fwd(s, s, 0.5, False)
                triton_kl.distill_fwd(s, s, 0.5, True, t, -100, 0.25, 0.5)
                triton_kl.distill_fwd(s, s, 0.5, False, t, -100, 0.25, 0.5)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_kl_fwd_kernel", "_kl_bwd_kernel", "_distill_fwd_kernel"}
