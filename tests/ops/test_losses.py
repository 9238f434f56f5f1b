"""Public loss functions against torch (the drop-ins) and their written-out formulas (focal, quantile,
contrastive, InfoNCE): values and gradients in float32/float64/bfloat16 at every reduction, weights, broadcasting
(torch's path), torch's errors, torch's OpInfo samples, gradcheck, torch.compile, the modules and patch."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db

import tritium
from tritium import reference
from tritium.ops import losses as losses_module
from tritium.ops.losses import LOSS_IDS
from tests.util import assert_within_torch_error, leaf, streamed_stores

REDUCTIONS = ("mean", "sum", "none")


def _signs(*shape):
    return torch.randint(0, 2, shape).double() * 2 - 1


# name -> (make(shape) -> (float inputs needing grad, other args), torch function, kwargs)
DROPINS = {
    "mse_loss": (lambda s: ([torch.randn(s), torch.randn(s)], []), F.mse_loss, {}),
    "l1_loss": (lambda s: ([torch.randn(s), torch.randn(s)], []), F.l1_loss, {}),
    "smooth_l1_loss": (lambda s: ([torch.randn(s), torch.randn(s)], []), F.smooth_l1_loss, {"beta": 0.4}),
    "huber_loss": (lambda s: ([torch.randn(s) * 2, torch.randn(s)], []), F.huber_loss, {"delta": 0.8}),
    "binary_cross_entropy": (lambda s: ([torch.rand(s) * 0.98 + 0.01], [torch.rand(s)]), F.binary_cross_entropy,
                             {}),
    "binary_cross_entropy_with_logits": (lambda s: ([torch.randn(s) * 3], [torch.rand(s)]),
                                         F.binary_cross_entropy_with_logits, {}),
    "soft_margin_loss": (lambda s: ([torch.randn(s)], [_signs(*s)]), F.soft_margin_loss, {}),
    "hinge_embedding_loss": (lambda s: ([torch.randn(s)], [_signs(*s)]), F.hinge_embedding_loss, {"margin": 0.7}),
    "margin_ranking_loss": (lambda s: ([torch.randn(s), torch.randn(s)], [_signs(*s)]), F.margin_ranking_loss,
                            {"margin": 0.2}),
    "multilabel_soft_margin_loss": (lambda s: ([torch.randn(s) * 2], [torch.randint(0, 2, s).double()]),
                                    F.multilabel_soft_margin_loss, {}),
    "multi_margin_loss": (lambda s: ([torch.randn(s)], [torch.randint(0, s[-1], s[:-1])]), F.multi_margin_loss,
                          {"p": 2, "margin": 0.8}),
    "triplet_margin_loss": (lambda s: ([torch.randn(s), torch.randn(s), torch.randn(s)], []),
                            F.triplet_margin_loss, {"margin": 0.9, "swap": True}),
    "cosine_embedding_loss": (lambda s: ([torch.randn(s), torch.randn(s)], [_signs(s[0])]),
                              F.cosine_embedding_loss, {"margin": 0.1}),
}
ROW_LOSSES = {"multilabel_soft_margin_loss", "multi_margin_loss", "triplet_margin_loss", "cosine_embedding_loss"}


def _call(fn, floats, others, dtype, kw):
    args = [leaf(t, dtype) for t in floats]
    rest = [o if o.dtype == torch.int64 else o.to(dtype) for o in others]
    return args, fn(*args, *rest, **kw)


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(DROPINS))
def test_dropin(name, reduction, dtype, streamed):
    """tritium's function against torch's in dtype and in float64 (inputs rounded to dtype): the value and the
    gradient of every floating input; `streamed`: outputs and gradients written around the cache as large calls
    write them (vec.h stream_outputs, here at any size)."""
    with streamed_stores(streamed):
        _dropin(name, reduction, dtype)


def _dropin(name, reduction, dtype):
    make, twin, kw = DROPINS[name]
    if name == "multi_margin_loss" and dtype == torch.bfloat16:  # torch has no 16-bit CPU kernel: its error stands
        x, t = torch.randn(3, 5, dtype=dtype), torch.tensor([0, 4, 1])
        with pytest.raises(NotImplementedError, match="not implemented for 'BFloat16'"):
            tritium.multi_margin_loss(x, t, reduction=reduction)
        return
    shape = (37, 123) if name in ROW_LOSSES else (5, 7, 123)
    floats, others = make(shape)
    floats = [t.to(dtype).double() for t in floats]
    others = [o if o.dtype == torch.int64 else o.to(dtype).double() for o in others]
    kw = dict(kw, reduction=reduction)
    args, out = _call(getattr(tritium, name), floats, others, dtype, kw)
    assert out.dtype == dtype
    dy = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, args, dy)
    res = {}
    for dt in (dtype, torch.float64):
        a, o = _call(twin, floats, others, dt, kw)
        res[dt] = (o.detach(), torch.autograd.grad(o, a, dy.to(dt)))
    assert_within_torch_error(out.detach(), res[dtype][0], res[torch.float64][0], f"{name} value")
    for k, g in enumerate(grads):
        assert_within_torch_error(g, res[dtype][1][k], res[torch.float64][1][k], f"{name} grad {k}")


# drop-in -> (the op its forward calls when a backward will follow, the op a backward calls to compute gradients)
ONE_PASS = {**{name: ("loss_fwd_grad", "loss_bwd") for name in DROPINS if name in LOSS_IDS},
            **{name: ("loss_rows_grad", "loss_rows_bwd")
               for name in ("triplet_margin_loss", "cosine_embedding_loss", "multi_margin_loss")}}


def _count(monkeypatch, name):
    calls = []
    real = getattr(losses_module, name)
    monkeypatch.setattr(losses_module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("name,dtype", [(name, dtype) for name in ONE_PASS
                                        for dtype in (torch.float32, torch.float64, torch.bfloat16)
                                        # torch has no 16-bit CPU multi_margin_loss (test_dropin checks its error)
                                        if not (name == "multi_margin_loss" and dtype == torch.bfloat16)])
def test_backward_of_the_loss_itself(monkeypatch, name, dtype, reduction):
    """loss.backward(): the gradients are the ones the forward wrote in its pass over the inputs (loss_fwd_grad,
    loss_rows_grad), with no second pass (the backward op is not called), within torch's error; further backwards
    through the retained graph, and a scaled loss's, compute their own (the first one's .grad, which they add to,
    is the forward's gradient itself)."""
    fused, backward = (_count(monkeypatch, op) for op in ONE_PASS[name])
    make, twin, kw = DROPINS[name]
    floats, others = make((37, 123) if name in ROW_LOSSES else (5, 7, 123))
    floats = [t.to(dtype).double() for t in floats]
    others = [o if o.dtype == torch.int64 else o.to(dtype).double() for o in others]
    kw = dict(kw, reduction=reduction)
    args, loss = _call(getattr(tritium, name), floats, others, dtype, kw)
    assert fused == [1]
    loss.backward(retain_graph=True)
    assert backward == []
    grads = [a.grad.clone() for a in args]
    res = {}
    for dt in (dtype, torch.float64):
        a, o = _call(twin, floats, others, dt, kw)
        res[dt] = torch.autograd.grad(o, a)
    for k, g in enumerate(grads):
        assert_within_torch_error(g, res[dtype][k], res[torch.float64][k], f"{name} grad {k}")
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    assert backward == [1, 1]
    (2 * loss).backward()
    assert backward == [1, 1, 1]
    for a, g in zip(args, grads):
        torch.testing.assert_close(a.grad, 5 * g)


def test_only_a_reduced_loss_that_will_be_differentiated_writes_dx(monkeypatch):
    """The forward writes dx only for a reduced loss with an input that requires grad, in grad mode: not under
    no_grad, not for inputs that need no gradient, not for reduction='none' (whose upstream gradient is per
    element)."""
    calls = _count(monkeypatch, "loss_fwd_grad")
    x, y = torch.randn(8, 33), torch.randn(8, 33)
    tritium.mse_loss(x, y)
    tritium.mse_loss(x.requires_grad_(True), y, reduction="none")
    with torch.no_grad():
        tritium.mse_loss(x, y)
    assert calls == []
    tritium.mse_loss(x, y)
    tritium.mse_loss(y, x, reduction="sum")
    assert calls == [1, 1]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_weights(reduction):
    """bce and bce_with_logits: a full weight, a per-class weight, pos_weight (one per class, and one value)."""
    x, t = torch.randn(6, 9, 31, dtype=torch.float64), torch.rand(6, 9, 31, dtype=torch.float64)
    full, col, pw = torch.rand(6, 9, 31) + 0.5, torch.rand(31) + 0.5, torch.rand(31) * 2 + 0.1
    for dt in (torch.float32, torch.float64):
        for kw in ({"weight": full}, {"weight": col}, {"pos_weight": pw}, {"weight": col, "pos_weight": pw},
                   {"pos_weight": pw[:1]}):
            kw = {k: v.to(dt) for k, v in kw.items()}
            xi, xr = leaf(x, dt), leaf(x, dt)
            ours = tritium.binary_cross_entropy_with_logits(xi, t.to(dt), reduction=reduction, **kw)
            theirs = F.binary_cross_entropy_with_logits(xr, t.to(dt), reduction=reduction, **kw)
            torch.testing.assert_close(ours, theirs)
            dy = torch.ones_like(ours)
            torch.testing.assert_close(torch.autograd.grad(ours, xi, dy)[0], torch.autograd.grad(theirs, xr, dy)[0])
        for w in (full, col):
            p = torch.sigmoid(x).to(dt)
            pi, pr = leaf(p), leaf(p)
            ours = tritium.binary_cross_entropy(pi, t.to(dt), w.to(dt), reduction=reduction)
            theirs = F.binary_cross_entropy(pr, t.to(dt), w.to(dt), reduction=reduction)
            torch.testing.assert_close(ours, theirs)
            dy = torch.ones_like(ours)
            torch.testing.assert_close(torch.autograd.grad(ours, pi, dy)[0], torch.autograd.grad(theirs, pr, dy)[0])


def test_target_gradients():
    """Losses of input - target differentiate the target too (-dx); the others send a target that requires grad
    to torch, which differentiates it."""
    x, y = torch.randn(4, 33, dtype=torch.float64), torch.rand(4, 33, dtype=torch.float64)
    for name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits"):
        xi, yi, xr, yr = leaf(x), leaf(y), leaf(x), leaf(y)
        ours = getattr(tritium, name)(xi, yi)
        theirs = getattr(F, name)(xr, yr)
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(torch.autograd.grad(ours, (xi, yi)), torch.autograd.grad(theirs, (xr, yr))):
            torch.testing.assert_close(a, b)


def test_fallbacks_match_torch():
    """Calls the kernels do not cover run torch: broadcasting (with torch's warning), legacy arguments, integer
    dtypes' errors, weighted mse (torch's mean divides by the weight's sum), empty inputs."""
    x, y = torch.randn(5, 7), torch.randn(7)
    with pytest.warns(UserWarning, match="target size"):
        out = tritium.mse_loss(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(out, F.mse_loss(x, y))
        torch.testing.assert_close(tritium.l1_loss(x, x * 2, size_average=False),
                                   F.l1_loss(x, x * 2, size_average=False))
    w = torch.rand(5, 7)
    torch.testing.assert_close(tritium.mse_loss(x, x * 0.5, weight=w), F.mse_loss(x, x * 0.5, weight=w))
    assert torch.isnan(tritium.mse_loss(torch.empty(0), torch.empty(0)))
    t, w51 = torch.rand(5, 7), torch.rand(5, 1)  # a weight broadcast along rows: torch's path
    torch.testing.assert_close(tritium.binary_cross_entropy_with_logits(x, t, weight=w51),
                               F.binary_cross_entropy_with_logits(x, t, weight=w51))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: tritium.mse_loss(torch.randn(3), torch.randn(3), reduction="avg"), ValueError, "is not a valid value"),
    (lambda: tritium.binary_cross_entropy(torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0])), RuntimeError,
     "all elements of input should be between 0 and 1"),
    (lambda: tritium.binary_cross_entropy(torch.rand(3), torch.rand(4)), ValueError, "different to the input size"),
    (lambda: tritium.binary_cross_entropy_with_logits(torch.rand(3), torch.rand(4)), ValueError,
     "must be the same as input size"),
    (lambda: tritium.smooth_l1_loss(torch.randn(3), torch.randn(3), beta=-1.0), RuntimeError, "negative values"),
    (lambda: tritium.huber_loss(torch.randn(3), torch.randn(3), delta=0.0), RuntimeError, "non-positive"),
    (lambda: tritium.mse_loss(torch.randint(0, 3, (3,)), torch.randint(0, 3, (3,))), RuntimeError, ""),
    (lambda: tritium.multi_margin_loss(torch.randn(2, 3), torch.tensor([0, 5])), RuntimeError, "target out of range"),
    (lambda: tritium.multi_margin_loss(torch.randn(2, 3), torch.tensor([0, 1]), p=3), ValueError,
     "only p == 1 and p == 2"),
    (lambda: tritium.triplet_margin_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), margin=0.0),
     ValueError, "margin"),
    (lambda: tritium.sigmoid_focal_loss(torch.randn(3), torch.rand(3), reduction="avg"), ValueError, "reduction"),
    (lambda: tritium.quantile_loss(torch.randn(4, 2), torch.randn(4), [0.1, 0.5, 0.9]), ValueError,
     "len\\(quantiles\\)"),
    (lambda: tritium.quantile_loss(torch.randn(4, 2), torch.randn(4), [0.1, 1.0]), ValueError, "in \\(0, 1\\)"),
    (lambda: tritium.quantile_loss(torch.randn(4, 2), torch.randn(5), [0.1, 0.9]), ValueError, "target"),
    (lambda: tritium.contrastive_loss(torch.randn(4, 2), torch.randn(3, 2), torch.ones(4)), ValueError, "input2"),
    (lambda: tritium.contrastive_loss(torch.randn(4, 2), torch.randn(4, 2), torch.ones(3)), ValueError, "target"),
    (lambda: tritium.info_nce(torch.randn(4, 2), torch.randn(3, 2)), ValueError, "query and key"),
    (lambda: tritium.info_nce(torch.randn(4, 2), torch.randn(4, 2), temperature=0.0), ValueError, "temperature"),
    (lambda: tritium.info_nce(torch.randn(4, 2), torch.randn(4, 2), negatives=torch.randn(3, 5)), ValueError,
     "negatives"),
])
def test_errors(call, exc, match):
    """Bad input raises what torch raises (the drop-ins) or a ValueError naming the argument."""
    with pytest.raises(exc, match=match):
        call()


def test_errors_are_torchs():
    """The drop-ins' errors are torch's own: same type and message."""
    bad = [(lambda f: f(torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0])), "binary_cross_entropy"),
           (lambda f: f(torch.randn(2, 3), torch.tensor([0, 5])), "multi_margin_loss"),
           (lambda f: f(torch.randn(3), torch.randn(3), reduction="bad"), "l1_loss")]
    for call, name in bad:
        with pytest.raises(Exception) as ours:
            call(getattr(tritium, name))
        with pytest.raises(Exception) as theirs:
            call(getattr(F, name))
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


# every drop-in of this family, and cross_entropy (tritium.cross_entropy: its z-loss and soft-capping options are
# off by default, so torch's samples must pass through it unchanged)
_OPINFO = {"nn.functional." + n: n for n in (*DROPINS, "cross_entropy")}
_OPINFO_OPS = [o for o in op_db if o.name in _OPINFO and o.variant_test_name == ""]


def _opinfo_grads(out, leaves, dy):
    return torch.autograd.grad(out, leaves, dy, allow_unused=True) if leaves and out.requires_grad else ()


def _to64(t):
    """A float sample argument as a float64 leaf of the same values (the reference's input); others as they are."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().double().requires_grad_(t.requires_grad)
    return t


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", _OPINFO_OPS, ids=lambda o: o.name)
def test_opinfo_samples(op, dtype):
    """torch's OpInfo samples for each drop-in, through tritium's function: values and the gradient of every input
    torch differentiates. float32 and float64: torch's values within torch.testing's tolerance; bfloat16 (where
    torch's CPU op has it): the tolerance rule against the samples computed in float64 (tritium's error at most 2x
    torch's own). multi_margin_loss has no bfloat16 CPU kernel in torch: its error for bfloat16 input stands
    (test_dropin)."""
    if dtype not in op.supported_dtypes("cpu"):
        assert op.name == "nn.functional.multi_margin_loss", f"{op.name} lacks {dtype} on CPU"
        return
    ours_fn = getattr(tritium, _OPINFO[op.name])
    n = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        args = [sample.input, *sample.args]
        kwargs = sample.kwargs
        theirs = op.op(*args, **kwargs)
        ours = ours_fn(*args, **kwargs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        leaves = [t for t in args + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
        dy = torch.randn(theirs.shape, dtype=torch.float64).to(dtype)
        g_ours, g_theirs = _opinfo_grads(ours, leaves, dy), _opinfo_grads(theirs, leaves, dy)
        if dtype != torch.bfloat16:
            torch.testing.assert_close(ours, theirs, equal_nan=True)
            for a, b in zip(g_ours, g_theirs):
                if b is None:
                    assert a is None or not a.abs().sum()
                else:
                    torch.testing.assert_close(a, b, equal_nan=True)
        else:
            args64 = [_to64(t) for t in args]
            kwargs64 = {k: _to64(v) for k, v in kwargs.items()}
            ref = op.op(*args64, **kwargs64)
            leaves64 = [t for t in args64 + list(kwargs64.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            g_ref = _opinfo_grads(ref, leaves64, dy.double())
            assert_within_torch_error(ours.detach(), theirs.detach(), ref.detach(), f"{op.name} value")
            for k, (a, b, r) in enumerate(zip(g_ours, g_theirs, g_ref)):
                if b is None:
                    assert a is None or not a.abs().sum()
                else:
                    assert_within_torch_error(a, b, r, f"{op.name} grad {k}")
        n += 1
    assert n > 0
    if dtype != torch.float32:
        return
    for sample in op.error_inputs("cpu") if op.error_inputs_func is not None else []:
        si = sample.sample_input
        with pytest.raises(sample.error_type, match=sample.error_regex):
            ours_fn(si.input, *si.args, **si.kwargs)


# ---- the losses torch lacks: written-out float64 formulas ----
def test_sigmoid_focal_loss():
    x, t = torch.randn(6, 50, dtype=torch.float64) * 2, torch.randint(0, 2, (6, 50)).double()
    for alpha, gamma in ((0.25, 2.0), (-1, 1.5), (0.5, 0.0)):
        for reduction in REDUCTIONS:
            xi, xr = leaf(x), leaf(x)
            ours = tritium.sigmoid_focal_loss(xi, t, alpha, gamma, reduction)
            p = torch.sigmoid(xr)
            ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
            pt = p * t + (1 - p) * (1 - t)
            ref = ce * (1 - pt) ** gamma * ((alpha * t + (1 - alpha) * (1 - t)) if alpha >= 0 else 1)
            ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
            torch.testing.assert_close(ours, ref)
            dy = torch.ones_like(ours)
            torch.testing.assert_close(torch.autograd.grad(ours, xi, dy)[0], torch.autograd.grad(ref, xr, dy)[0])


@pytest.mark.parametrize("target_shape", ["same", "no-q", "q1"])
def test_quantile_loss(target_shape):
    qs = [0.1, 0.5, 0.9]
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    t = {"same": torch.randn(5, 7, 3), "no-q": torch.randn(5, 7), "q1": torch.randn(5, 7, 1)}[target_shape].double()
    for reduction in REDUCTIONS:
        xi, xr = leaf(x), leaf(x)
        ours = tritium.quantile_loss(xi, t, qs, reduction)
        e = (t if target_shape == "same" else t.reshape(5, 7, 1)) - xr
        tau = torch.tensor(qs, dtype=torch.float64)
        ref = torch.maximum(tau * e, (tau - 1) * e)
        ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), xi)[0], torch.autograd.grad(ref.sum(), xr)[0])


def test_contrastive_loss():
    x1, x2 = torch.randn(40, 9, dtype=torch.float64), torch.randn(40, 9, dtype=torch.float64)
    y = torch.randint(0, 2, (40,)).double()
    for reduction in REDUCTIONS:
        a, b, ar, br = leaf(x1), leaf(x2), leaf(x1), leaf(x2)
        ours = tritium.contrastive_loss(a, b, y, margin=4.0, reduction=reduction)
        d = ((ar - br + 1e-6) ** 2).sum(1).sqrt()
        ref = 0.5 * (y * d ** 2 + (1 - y) * torch.clamp(4.0 - d, min=0) ** 2)
        ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
        torch.testing.assert_close(ours, ref)
        for g1, g2 in zip(torch.autograd.grad(ours.sum(), (a, b)), torch.autograd.grad(ref.sum(), (ar, br))):
            torch.testing.assert_close(g1, g2)


def _nce_formula(q, k, neg, temperature, symmetric, normalize):
    """InfoNCE written out in float64 from its definition (no cross_entropy)."""
    if normalize:
        q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
        neg = None if neg is None else neg / neg.norm(dim=1, keepdim=True)
    s = q @ k.t() / temperature
    full = s if neg is None else torch.cat([s, q @ neg.t() / temperature], 1)
    diag = torch.diagonal(s)
    loss = torch.log(torch.exp(full).sum(1)) - diag
    if symmetric:
        loss = (loss + torch.log(torch.exp(s).sum(0)) - diag) / 2
    return loss


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce(symmetric, with_negatives, normalize):
    """Blocks of 5 rows over 37 samples (the last block partial): the loss per row and every gradient."""
    n, d = 37, 16
    q, k = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    neg = torch.randn(11, d, dtype=torch.float64) if with_negatives else None
    for reduction in REDUCTIONS:
        leaves = [leaf(t) for t in (q, k, neg) if t is not None]
        refs = [leaf(t) for t in (q, k, neg) if t is not None]
        ours = tritium.info_nce(leaves[0], leaves[1], 0.2, symmetric, leaves[2] if with_negatives else None,
                                normalize, reduction, block_size=5)
        ref = _nce_formula(refs[0], refs[1], refs[2] if with_negatives else None, 0.2, symmetric, normalize)
        ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
        torch.testing.assert_close(ours, ref)
        dy = torch.randn_like(ref)
        for g1, g2 in zip(torch.autograd.grad(ours, leaves, dy), torch.autograd.grad(ref, refs, dy)):
            torch.testing.assert_close(g1, g2)
        theirs = reference.info_nce(*refs[:2], 0.2, symmetric, refs[2] if with_negatives else None, normalize,
                                    reduction)
        torch.testing.assert_close(ours, theirs)


def test_info_nce_offset():
    """The block statistics take exp(s - c) about a bound c on |s| (one exp per element) only where c is at most
    NCE_OFFSET_MAX: unit rows at T = 0.07, not at T = 0.01 nor for long rows; non-finite rows take the maxima's
    path, whose loss is NaN as torch's."""
    from tritium.ops.losses import NCE_OFFSET_MAX, _nce_offset
    q, k = F.normalize(torch.randn(40, 8), dim=1), F.normalize(torch.randn(40, 8), dim=1)
    c = _nce_offset(q, k, None, 1 / 0.07)
    assert c is not None and 1 / 0.07 <= c <= NCE_OFFSET_MAX
    assert _nce_offset(q, k, 3 * k, 1 / 0.07) is None  # the negatives' norms count
    assert _nce_offset(q, k, None, 1 / 0.01) is None
    assert _nce_offset(100 * q, k, None, 1.0) is None
    bad = q.clone()
    bad[3, 1] = float("nan")
    assert _nce_offset(bad, k, None, 1.0) is None
    for nan_in in (bad, k):
        ours = tritium.info_nce(nan_in, k if nan_in is bad else bad, 0.07, normalize=False, reduction="none")
        theirs = reference.info_nce(nan_in, k if nan_in is bad else bad, 0.07, normalize=False, reduction="none")
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_info_nce_normalisation(dtype):
    """info_nce's normalisation (unit_rows): F.normalize(x, dim=-1)'s values bit for bit, and its gradient within
    torch's error, with a row whose norm is below eps (the clamp passes no gradient) and a zero row."""
    from tritium.ops.losses import _normalize
    x = torch.randn(9, 3, 37, dtype=torch.float64)
    x[1, 0] *= 1e-14
    x[4, 2] = 0
    x = x.to(dtype)
    xi = leaf(x)
    y = _normalize(xi)
    assert torch.equal(y, F.normalize(x, dim=-1))
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    mine = torch.autograd.grad(y, xi, dy)[0]
    theirs = {dt: torch.autograd.grad(F.normalize(xr := leaf(x, dt), dim=-1), xr, dy.to(dt))[0]
              for dt in (dtype, torch.float64)}
    assert_within_torch_error(mine, theirs[dtype], theirs[torch.float64], "unit_rows grad")


@pytest.mark.parametrize("with_negatives", (False, True), ids=("pairs", "negatives"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_info_nce_dtypes(dtype, with_negatives):
    """float32 / bfloat16 inputs (on a CPU that multiplies bfloat16 natively the bfloat16 blocks multiply in
    bfloat16: tests/test_cpu_dispatch.py runs every path), with and without explicit negatives, against torch's
    materialised computation in that dtype and float64."""
    q, k, n = torch.randn(70, 24).to(dtype), torch.randn(70, 24).to(dtype), torch.randn(23, 24).to(dtype)
    names = ("dq", "dk", "dn") if with_negatives else ("dq", "dk")
    inputs = (q, k, n)[:len(names)]
    leaves = [leaf(t) for t in inputs]
    ours = tritium.info_nce(leaves[0], leaves[1], 0.07, negatives=leaves[2] if with_negatives else None,
                            block_size=16)
    grads = torch.autograd.grad(ours, leaves)
    res = {}
    for dt in (dtype, torch.float64):
        refs = [leaf(t, dt) for t in inputs]
        o = reference.info_nce(refs[0], refs[1], 0.07, negatives=refs[2] if with_negatives else None)
        res[dt] = (o.detach(), torch.autograd.grad(o, refs))
    assert_within_torch_error(ours.detach(), res[dtype][0], res[torch.float64][0], "info_nce")
    for i, name in enumerate(names):
        assert_within_torch_error(grads[i], res[dtype][1][i], res[torch.float64][1][i], name)


# ---- gradcheck, compile, reference backend, modules ----
def _gradcheck_cases():
    """name -> (fn of the float64 leaves a, b (5, 13), fixed non-differentiable arguments built once)."""
    t = torch.randn(5, 13, dtype=torch.float64)
    probs, signs, bits = t.sigmoid(), t.sign(), (t > 0).double()
    pw, neg = torch.rand(13, dtype=torch.float64) + 0.5, torch.randn(5, 13, dtype=torch.float64)
    pm = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    return {
        "mse_loss": lambda a, b: tritium.mse_loss(a, b),
        "smooth_l1_loss": lambda a, b: tritium.smooth_l1_loss(a, b, beta=0.5),
        "huber_loss": lambda a, b: tritium.huber_loss(a, b, reduction="sum", delta=0.5),
        "bce_with_logits": lambda a, b: tritium.binary_cross_entropy_with_logits(a, probs, pos_weight=pw) + b.sum(),
        "soft_margin": lambda a, b: tritium.soft_margin_loss(a, signs, reduction="none") + b,
        "focal": lambda a, b: tritium.sigmoid_focal_loss(a, bits, gamma=1.5, reduction="mean") + b.sum(),
        "quantile": lambda a, b: tritium.quantile_loss(a, t, [0.2] * 13) + b.sum(),
        "triplet": lambda a, b: tritium.triplet_margin_loss(a, b, neg, p=3),
        "cosine": lambda a, b: tritium.cosine_embedding_loss(a, b, pm, margin=-0.5),
        "multi_margin": lambda a, b: tritium.multi_margin_loss(a, torch.tensor([0, 3, 12, 5, 5]), p=2) + b.sum(),
        "contrastive": lambda a, b: tritium.contrastive_loss(a, b, bits[:, 0], margin=9.0),
        "info_nce": lambda a, b: tritium.info_nce(a, b, 0.5, block_size=2),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck(name):
    a, b = (torch.randn(5, 13, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradcheck(_gradcheck_cases()[name], (a, b))


def test_compile_fullgraph():
    """The elementwise, row and blocked ops trace through torch.compile(fullgraph=True) to eager's results."""
    def fn(x, y, t, lab):
        return (tritium.mse_loss(x, y) + tritium.binary_cross_entropy_with_logits(x, t, reduction="sum")
                + tritium.sigmoid_focal_loss(x, t, reduction="mean") + tritium.triplet_margin_loss(x, y, t)
                + tritium.cosine_embedding_loss(x, y, lab) + tritium.info_nce(x, y, block_size=3))

    x, y = torch.randn(7, 10, requires_grad=True), torch.randn(7, 10, requires_grad=True)
    t, lab = torch.rand(7, 10), torch.tensor([1.0, -1, 1, -1, 1, 1, -1])
    eager = fn(x, y, t, lab)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y, t, lab)
    torch.testing.assert_close(compiled, eager)
    for g1, g2 in zip(torch.autograd.grad(compiled, (x, y)), torch.autograd.grad(eager, (x, y))):
        torch.testing.assert_close(g1, g2)


def test_reference_backend(reference_backend):
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(tritium.mse_loss(x, y), F.mse_loss(x, y))
    assert torch.equal(tritium.info_nce(x, y), reference.info_nce(x, y))


MODULES = [
    (tritium.nn.MSELoss, torch.nn.MSELoss, {}, 2, None), (tritium.nn.L1Loss, torch.nn.L1Loss, {}, 2, None),
    (tritium.nn.SmoothL1Loss, torch.nn.SmoothL1Loss, {"beta": 0.3}, 2, None),
    (tritium.nn.HuberLoss, torch.nn.HuberLoss, {"delta": 0.5}, 2, None),
    (tritium.nn.BCELoss, torch.nn.BCELoss, {}, 1, "prob"),
    (tritium.nn.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, {"pos_weight": torch.rand(6)}, 1, "prob"),
    (tritium.nn.SoftMarginLoss, torch.nn.SoftMarginLoss, {}, 1, "sign"),
    (tritium.nn.HingeEmbeddingLoss, torch.nn.HingeEmbeddingLoss, {"margin": 0.5}, 1, "sign"),
    (tritium.nn.MarginRankingLoss, torch.nn.MarginRankingLoss, {"margin": 0.1}, 2, "sign"),
    (tritium.nn.MultiLabelSoftMarginLoss, torch.nn.MultiLabelSoftMarginLoss, {}, 1, "bits"),
    (tritium.nn.MultiMarginLoss, torch.nn.MultiMarginLoss, {"p": 2}, 1, "class"),
    (tritium.nn.TripletMarginLoss, torch.nn.TripletMarginLoss, {"swap": True}, 3, None),
    (tritium.nn.CosineEmbeddingLoss, torch.nn.CosineEmbeddingLoss, {"margin": 0.2}, 2, "row-sign"),
]


@pytest.mark.parametrize("ours,theirs,kw,n_in,target", MODULES, ids=[m[1].__name__ for m in MODULES])
def test_modules_and_patch(ours, theirs, kw, n_in, target):
    x = [torch.randn(4, 6) for _ in range(n_in)]
    if target == "prob":
        x[0] = torch.sigmoid(x[0]) if theirs is torch.nn.BCELoss else x[0]
    extra = {"prob": [torch.rand(4, 6)], "sign": [torch.randn(4, 6).sign()], "bits": [torch.randint(0, 2, (4, 6))
                                                                                      .float()],
             "class": [torch.randint(0, 6, (4,))], "row-sign": [torch.tensor([1.0, -1, -1, 1])], None: []}[target]
    m = theirs(**kw)
    expect = m(*x, *extra)
    assert issubclass(ours, theirs)
    model = torch.nn.Sequential(m)
    replaced = tritium.patch(model)
    assert replaced == [("0", theirs)] and type(model[0]) is ours
    torch.testing.assert_close(model[0](*x, *extra), expect)


def test_tritium_only_modules():
    x, t = torch.randn(3, 4), torch.rand(3, 4).round()
    torch.testing.assert_close(tritium.nn.SigmoidFocalLoss(0.5, 1.0, "sum")(x, t),
                               reference.sigmoid_focal_loss(x, t, 0.5, 1.0, "sum"))
    torch.testing.assert_close(tritium.nn.QuantileLoss([0.1, 0.5, 0.9, 0.99])(x, t[:, 0]),
                               reference.quantile_loss(x, t[:, 0], [0.1, 0.5, 0.9, 0.99]))
    torch.testing.assert_close(tritium.nn.ContrastiveLoss(2.0)(x, t, t[:, 0]),
                               reference.contrastive_loss(x, t, t[:, 0], 2.0))
    torch.testing.assert_close(tritium.nn.InfoNCELoss(0.3, symmetric=False)(x, t),
                               reference.info_nce(x, t, 0.3, symmetric=False))


# ---- routes (ops/_library.py's ROUTE_BELOW): small CPU calls of torch's losses go to torch's own ----
def _tritium_ops(fn, *args) -> set:
    """The tritium:: ops one call of fn runs (forward and, when its output requires grad, backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*args)
        if out.requires_grad:
            out.backward()
    return {e.key for e in prof.key_averages() if e.key.startswith("tritium::")}


@pytest.fixture
def routes_on():
    tritium.set_routes(True)
    yield
    tritium.set_routes(False)


@pytest.mark.parametrize("name", ("mse_loss", "huber_loss", "smooth_l1_loss"))
def test_routes_of_calls_with_a_gradient(routes_on, name):
    """The cheapest losses route a call that records a backward below their own size (ROUTE_BELOW["<name> (grad)"])
    to torch's loss, bit for bit, and the same call without a gradient to the kernel (it routes below the house
    default only); from the gradient route's size on, both reach the kernel."""
    from tritium.ops._library import ROUTE_BELOW, ROUTE_DEFAULT

    limit = ROUTE_BELOW[f"{name} (grad)"]
    assert limit == {"mse_loss": 1 << 19}.get(name, 1 << 20) and limit > ROUTE_DEFAULT
    ours, theirs = getattr(tritium, name), getattr(F, name)
    x, y = torch.randn(limit // 4), torch.randn(limit // 4)
    xg = x.clone().requires_grad_(True)
    assert _tritium_ops(ours, xg, y) == set()                        # with a gradient: torch's
    got, want = ours(xg, y), theirs(xg, y)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, xg)[0], torch.autograd.grad(want, xg)[0])
    assert _tritium_ops(ours, x, y) != set()                         # without: the kernel
    with torch.no_grad():
        assert _tritium_ops(ours, xg, y) != set()
    big = torch.randn(limit, requires_grad=True)
    assert _tritium_ops(ours, big, torch.randn(limit)) != set()     # from the limit on: the kernel
    small = torch.randn(ROUTE_DEFAULT - 1)
    assert _tritium_ops(ours, small, torch.randn(ROUTE_DEFAULT - 1)) == set()  # below the house default: torch's


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("name,kwargs", [("mse_loss", {}), ("l1_loss", {}), ("huber_loss", {"delta": 0.7}),
                                         ("smooth_l1_loss", {"beta": 0.6}), ("smooth_l1_loss", {"beta": 0.0})])
def test_routed_difference_losses_are_torch_bit_for_bit(routes_on, name, kwargs, reduction):
    """A routed call of a difference loss (torch's ATen op called directly, ops/losses.py's _torch_loss) gives
    F.<name>'s values and gradients bit for bit, with and without a gradient to record, at an odd shape; a
    __torch_function__ subclass still reaches torch's function (its override sees F.<name>)."""
    ours, theirs = getattr(tritium, name), getattr(F, name)
    x, y = torch.randn(7, 123, dtype=torch.float64).float(), torch.randn(7, 123)
    assert _tritium_ops(lambda a, b: ours(a, b, reduction=reduction, **kwargs), x, y) == set()
    with torch.no_grad():
        assert torch.equal(ours(x, y, reduction=reduction, **kwargs), theirs(x, y, reduction=reduction, **kwargs))
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    got, want = ours(xg, yg, reduction=reduction, **kwargs), theirs(xg, yg, reduction=reduction, **kwargs)
    assert torch.equal(got, want)
    dy = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, (xg, yg), dy), torch.autograd.grad(want, (xg, yg), dy)):
        assert torch.equal(g, w)

    seen = []

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    ours(x.as_subclass(Traced), y, reduction=reduction, **kwargs)
    assert theirs in seen


def test_routed_difference_loss_compiles_fullgraph(routes_on):
    """torch.compile(fullgraph=True) traces a routed call (torch's ATen op called directly): no graph break, torch's
    values and gradient."""
    x, y = torch.randn(7, 33, requires_grad=True), torch.randn(7, 33)
    f = torch.compile(lambda a, b: tritium.huber_loss(a, b, delta=0.5), fullgraph=True)
    got, want = f(x, y), F.huber_loss(x, y, delta=0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("name", ("mse_loss", "huber_loss", "smooth_l1_loss"))
def test_16bit_calls_with_a_gradient_route_at_the_house_default(routes_on, name, dtype):
    """A 16-bit call that records a backward routes below the house default only (torch's 16-bit loss converts
    through float32 op by op): from ROUTE_DEFAULT elements it takes the kernel, below it torch's loss."""
    from tritium.ops._library import ROUTE_BELOW, ROUTE_DEFAULT

    assert ROUTE_BELOW[f"{name} (grad)"] > ROUTE_DEFAULT
    ours = getattr(tritium, name)
    x = torch.randn(ROUTE_DEFAULT, dtype=dtype, requires_grad=True)
    assert _tritium_ops(ours, x, torch.randn(ROUTE_DEFAULT, dtype=dtype)) != set()
    small = torch.randn(ROUTE_DEFAULT - 1, dtype=dtype, requires_grad=True)
    assert _tritium_ops(ours, small, torch.randn(ROUTE_DEFAULT - 1, dtype=dtype)) == set()
    x32 = torch.randn(ROUTE_DEFAULT, requires_grad=True)                     # float32: the gradient route stands
    assert _tritium_ops(ours, x32, torch.randn(ROUTE_DEFAULT)) == set()


def test_triplet_routes_small_calls_with_a_gradient(routes_on):
    """triplet_margin_loss with a gradient to record goes to torch's below ROUTE_BELOW["triplet_margin_loss
    (grad)"] elements (bit for bit, values and the three gradients) and to the kernel from there on."""
    from tritium.ops._library import ROUTE_BELOW

    limit = ROUTE_BELOW["triplet_margin_loss (grad)"]
    small = [torch.randn(limit // 32 - 1, 32, requires_grad=True) for _ in range(3)]

    def ours(a, p, n):
        return tritium.triplet_margin_loss(a, p, n, margin=0.5)

    assert _tritium_ops(lambda a, p: ours(a, p, small[2]), small[0], small[1]) == set()
    got, want = ours(*small), F.triplet_margin_loss(*small, margin=0.5)
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, small), torch.autograd.grad(want, small)):
        assert torch.equal(g, w)
    big = [torch.randn(limit // 32, 32, requires_grad=True) for _ in range(3)]
    assert _tritium_ops(lambda a, p: ours(a, p, big[2]), big[0], big[1]) != set()


@pytest.mark.parametrize("negatives", (0, 1))
def test_info_nce_routes_by_its_similarities(routes_on, negatives):
    """info_nce goes to torch's formula (tritium.reference) below ROUTE_BELOW["info_nce"] similarities N x (N + M),
    bit for bit (the loss and every gradient), and to the blocked op from there on."""
    from tritium.ops._library import ROUTE_BELOW

    limit = ROUTE_BELOW["info_nce"]
    n = 64 if negatives else 256
    m = limit // n - n if negatives else 0   # n (n + m) == limit: the first size on the op

    def leaves(rows, extra):
        gen = torch.Generator().manual_seed(rows + extra)
        return [torch.randn(r, 5, generator=gen, requires_grad=True) for r in (rows, rows, extra) if r]

    def ours(q, k, *neg):
        return tritium.info_nce(q, k, 0.3, negatives=neg[0] if neg else None)

    small = leaves(n - 1, m + 1 if negatives else 0)  # (n - 1) (n + m) < limit
    assert _tritium_ops(ours, *small) == set()
    got = ours(*small)
    want = reference.info_nce(small[0], small[1], 0.3, negatives=small[2] if negatives else None)
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, small), torch.autograd.grad(want, small)):
        assert torch.equal(g, w)
    big = leaves(n, m)
    assert _tritium_ops(ours, *big) >= {"tritium::info_nce_fwd", "tritium::info_nce_bwd"}


def test_losses_without_a_torch_op_are_not_routed(routes_on):
    """sigmoid_focal_loss and quantile_loss have no torch op (their torch form is a chain of ops, slower at every
    size): even a small call with a gradient takes the kernel."""
    x, t = torch.randn(4, 8, requires_grad=True), torch.rand(4, 8).round()
    assert _tritium_ops(lambda a, b: tritium.sigmoid_focal_loss(a, b, reduction="mean"), x, t) != set()
    xq = torch.randn(4, 4, requires_grad=True)
    assert _tritium_ops(lambda a, b: tritium.quantile_loss(a, b, [0.2, 0.5, 0.7, 0.9]), xq, t[:, 0]) != set()
