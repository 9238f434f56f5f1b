"""cross_entropy's and fused_linear_cross_entropy's z-loss and logit soft-capping options (z_loss=, softcap=):
values and gradients against the float64 reference at odd shapes and every CPU dtype, with weights, smoothing and
ignore_index; the reduction rule (Liger-Kernel's), defaults unchanged bit for bit, bad values, the modules,
gradcheck and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium import reference
from tests.ops.test_cross_entropy import _compare
from tests.util import CPU_DTYPES

REDUCTIONS = ["mean", "sum", "none"]
OPTIONS = [(0.0, 7.0), (1e-2, None), (2e-2, 30.0)]  # (z_loss, softcap)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("shape", [(9, 13), (3, 13, 4), (13,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("z_loss,softcap", OPTIONS, ids=["cap", "z", "z+cap"])
def test_index_targets_match_reference(dtype, reduction, weighted, smoothing, shape, z_loss, softcap):
    c = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape) * 6
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, c, tshape)
    if t.dim():
        t.view(-1)[1] = -100
    args = [x, torch.rand(c) + 0.5] if weighted else [x]

    def run(f):
        return lambda x_, *w: f(x_, t, w[0] if w else None, reduction=reduction, label_smoothing=smoothing,
                                z_loss=z_loss, softcap=softcap)

    _compare(run(tritium.cross_entropy), run(reference.cross_entropy), args, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_reference_rule(reduction, weighted):
    """The reduction rule, written out: CE of the capped logits reduced as torch's, plus z lse^2 per non-ignored
    row with no class weight, whose 'mean' divides by the number of non-ignored rows (Liger-Kernel's rule)."""
    x = torch.randn(6, 11, dtype=torch.float64) * 5
    t = torch.tensor([3, -100, 0, 10, -100, 7])
    w = torch.rand(11, dtype=torch.float64) + 0.5 if weighted else None
    z, cap = 0.05, 4.0
    y = cap * torch.tanh(x / cap)
    ce = F.cross_entropy(y, t, w, reduction=reduction, label_smoothing=0.1)
    lse = torch.logsumexp(y, 1)
    zl = torch.tensor([z * lse[i] ** 2 if t[i] != -100 else 0.0 for i in range(6)], dtype=torch.float64)
    expected = {"none": ce + zl, "sum": ce + zl.sum(), "mean": ce + zl.sum() / 4}[reduction]
    for f in (reference.cross_entropy, tritium.cross_entropy):
        got = f(x, t, w, reduction=reduction, label_smoothing=0.1, z_loss=z, softcap=cap)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_probability_targets_run_the_reference():
    x = torch.randn(5, 9, dtype=torch.float64) * 4
    p = torch.softmax(torch.randn(5, 9, dtype=torch.float64), 1)
    y = 3.0 * torch.tanh(x / 3.0)
    expected = F.cross_entropy(y, p) + 0.1 * (torch.logsumexp(y, 1) ** 2).mean()
    torch.testing.assert_close(tritium.cross_entropy(x, p, z_loss=0.1, softcap=3.0), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_defaults_are_bit_identical(dtype):
    """z_loss=0.0, softcap=None is the call without them, bit for bit, value and gradient."""
    x = (torch.randn(4, 7, 37) * 3).to(dtype)
    t = torch.randint(0, 7, (4, 37))
    t[0, :5] = -100
    w = (torch.rand(7) + 0.5).to(dtype)
    for red in REDUCTIONS:
        outs = []
        for kw in ({}, {"z_loss": 0.0, "softcap": None}):
            xi = x.clone().requires_grad_()
            y = tritium.cross_entropy(xi, t, w, reduction=red, label_smoothing=0.1, **kw)
            outs.append((y.detach(), torch.autograd.grad(y.sum(), xi)[0]))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # and the op the defaults run is the plain one: the same rows as cross_entropy_fwd
    x2, t2 = x.transpose(1, 2).reshape(-1, 7), t.reshape(-1)
    rows = torch.ops.tritium.cross_entropy_fwd(x2, t2, w, -100, 0.1, False, False)[0]
    assert torch.equal(tritium.cross_entropy(x2, t2, w, reduction="none", label_smoothing=0.1), rows.to(dtype))


@pytest.mark.parametrize("kw,name", [
    ({"z_loss": -1e-4}, "z_loss"), ({"z_loss": math.nan}, "z_loss"), ({"z_loss": math.inf}, "z_loss"),
    ({"softcap": 0.0}, "softcap"), ({"softcap": -3.0}, "softcap"), ({"softcap": math.nan}, "softcap"),
    ({"softcap": math.inf}, "softcap"),
], ids=["z-neg", "z-nan", "z-inf", "cap-0", "cap-neg", "cap-nan", "cap-inf"])
def test_bad_values_raise(kw, name):
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=f"cross_entropy: {name} must be"):
        tritium.cross_entropy(x, t, **kw)
    with pytest.raises(ValueError, match=f"CrossEntropyLoss: {name} must be"):
        tritium.nn.CrossEntropyLoss(**kw)


def test_module_takes_the_options():
    w = torch.rand(11) + 0.5
    m = tritium.nn.CrossEntropyLoss(w, ignore_index=-1, label_smoothing=0.05, z_loss=1e-3, softcap=10.0)
    assert m.state_dict().keys() == torch.nn.CrossEntropyLoss(w).state_dict().keys()
    x, t = torch.randn(6, 11) * 20, torch.tensor([1, -1, 3, 4, 10, 0])
    torch.testing.assert_close(m(x, t), tritium.cross_entropy(x, t, w, ignore_index=-1, label_smoothing=0.05,
                                                              z_loss=1e-3, softcap=10.0))
    plain = tritium.nn.CrossEntropyLoss(w)
    t0 = t.clamp(min=0)
    assert torch.equal(plain(x, t0), tritium.cross_entropy(x, t0, w))


def test_gradcheck_float64():
    x = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4, 3))
    t[0, 0] = -100
    w = torch.rand(7, dtype=torch.float64)
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x_: tritium.cross_entropy(x_, t, w, reduction=red, label_smoothing=0.1, z_loss=0.03,
                                             softcap=2.0), (x,))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, t):
        return tritium.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)

    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    y = torch.compile(f, fullgraph=True)(x, t)
    torch.testing.assert_close(y, f(x, t))
    torch.testing.assert_close(torch.autograd.grad(y, x)[0], torch.autograd.grad(f(x, t), x)[0])


# ---- the same options in the fused LM-head loss ----
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss,softcap", OPTIONS, ids=["cap", "z", "z+cap"])
@pytest.mark.parametrize("bias,smoothing,chunk,seq", [(False, 0.0, None, 11), (True, 0.1, 5, 11),
                                                      (True, 0.0, 64, 40)], ids=["22rows", "chunk5", "120rows"])
def test_fused_linear_matches_reference(dtype, reduction, z_loss, softcap, bias, smoothing, chunk, seq):
    """Loss and the gradients of hidden, weight and bias against reference.fused_linear_cross_entropy with the
    options (120 rows: the CPU float packed-weight path), logits large enough that the cap bends them."""
    h, w, b = torch.randn(3 if seq == 40 else 2, seq, 16), torch.randn(37, 16), torch.randn(37)
    t = torch.randint(0, 37, h.shape[:2])
    t[0, ::3] = -100

    def run(f, **kw):
        return lambda h_, w_, *b_: f(h_, w_, t, b_[0] if b_ else None, reduction=reduction,
                                     label_smoothing=smoothing, z_loss=z_loss, softcap=softcap, **kw)

    args = [h, w, b] if bias else [h, w]
    _compare(run(tritium.fused_linear_cross_entropy, chunk_size=chunk), run(reference.fused_linear_cross_entropy),
             args, dtype, grad_idx=tuple(range(len(args))))


def test_fused_linear_defaults_and_module():
    """No options: bit for bit the call without them; the module passes its options; bad values name the argument."""
    h, w, t = torch.randn(6, 8), torch.randn(10, 8) * 3, torch.tensor([1, -100, 3, 4, 9, 0])
    assert torch.equal(tritium.fused_linear_cross_entropy(h, w, t, z_loss=0.0, softcap=None),
                       tritium.fused_linear_cross_entropy(h, w, t))
    m = tritium.nn.FusedLinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4, z_loss=1e-3, softcap=5.0)
    assert "z_loss=0.001" in repr(m) and "softcap=5.0" in repr(m)
    torch.testing.assert_close(m(h, w, t), reference.fused_linear_cross_entropy(
        h, w, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0))
    for kw, name in (({"z_loss": -1.0}, "z_loss"), ({"softcap": 0.0}, "softcap")):
        with pytest.raises(ValueError, match=f"fused_linear_cross_entropy: {name} must be"):
            tritium.fused_linear_cross_entropy(h, w, t, **kw)
        with pytest.raises(ValueError, match=f"FusedLinearCrossEntropyLoss: {name} must be"):
            tritium.nn.FusedLinearCrossEntropyLoss(**kw)


def test_fused_linear_gradcheck_and_compile():
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 3, 4, 8, 0, 2])
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda h_, w_, b_: tritium.fused_linear_cross_entropy(
            h_, w_, t, b_, reduction=red, chunk_size=3, z_loss=0.05, softcap=2.0), (h, w, b))
    torch._dynamo.reset()

    def f(h_, w_):
        return tritium.fused_linear_cross_entropy(h_, w_, t, z_loss=1e-2, softcap=4.0)

    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = torch.compile(f, fullgraph=True)(hf, wf)
    torch.testing.assert_close(y, f(hf, wf))
    for a, e in zip(torch.autograd.grad(y, (hf, wf)), torch.autograd.grad(f(hf, wf), (hf, wf))):
        torch.testing.assert_close(a, e)
