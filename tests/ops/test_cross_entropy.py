"""cross_entropy, fused_linear_cross_entropy, kl_div and distillation_loss as drop-ins / against their unfused
torch compositions: values, every gradient, reductions, ignore_index, smoothing, weights, errors, compile."""
import sys

import pytest
import torch
import torch.nn.functional as F

import tritium
from tests.util import CPU_DTYPES, assert_within_torch_error, leaf, streamed_stores
from tritium.utils import cpu_has_bf16_dot

REDUCTIONS = ["mean", "sum", "none"]


def _compare(ours, theirs, tensors, dtype, grad_idx=(0,)):
    """ours vs torch (in dtype) vs torch in float64: value and the gradients of the tensors in grad_idx."""
    res = {}
    g = None
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]  # the reference sees the same inputs
    for name, fn, d in (("ours", ours, dtype), ("torch", theirs, dtype), ("ref", theirs, torch.float64)):
        ins = [leaf(t, d) if i in grad_idx else (t.to(d) if t.is_floating_point() else t)
               for i, t in enumerate(tensors)]
        y = fn(*ins)
        if g is None:  # rounded to dtype, as the inputs: the reference sees the same output gradient
            g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        res[name] = (y.detach(), torch.autograd.grad(y, [ins[i] for i in grad_idx], g.to(y.dtype)))
    assert_within_torch_error(res["ours"][0], res["torch"][0], res["ref"][0].double(), "value")
    for i, (a, b, c) in enumerate(zip(res["ours"][1], res["torch"][1], res["ref"][1])):
        assert_within_torch_error(a, b, c.double(), f"grad {i}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("shape", [(9, 13), (3, 13, 4), (2, 13, 3, 2), (13,)], ids=["2d", "3d", "4d", "1d"])
def test_index_targets_match_torch(dtype, reduction, weighted, smoothing, shape):
    c = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape) * 3
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, c, tshape)
    if t.dim():
        t.view(-1)[::4] = -100  # some ignored tokens
    w = torch.rand(c) + 0.5
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if weighted:
        _compare(lambda x_, w_: tritium.cross_entropy(x_, t, w_, **kw),
                 lambda x_, w_: F.cross_entropy(x_, t, w_, **kw), [x, w], dtype)
    else:
        _compare(lambda x_: tritium.cross_entropy(x_, t, **kw), lambda x_: F.cross_entropy(x_, t, **kw), [x], dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.15)], ids=["plain", "weight-smoothing"])
@pytest.mark.parametrize("classes", [64, 67], ids=["aligned", "odd"])
def test_streamed_gradient_rows(dtype, weighted, smoothing, classes):
    """The forward's gradient rows written around the cache (vec.h stream_outputs; here at any size) from a row
    buffer, the target's entry and a partial last vector after the fence: rows whose starts are aligned for a
    streamed vector and rows that are not, ignored rows among them."""
    x, t, w = torch.randn(7, classes) * 3, torch.randint(0, classes, (7,)), torch.rand(classes) + 0.5
    t[2] = -100
    kw = dict(label_smoothing=smoothing)
    with streamed_stores():
        if weighted:
            _compare(lambda x_, w_: tritium.cross_entropy(x_, t, w_, **kw),
                     lambda x_, w_: F.cross_entropy(x_, t, w_, **kw), [x, w], dtype)
        else:
            _compare(lambda x_: tritium.cross_entropy(x_, t, **kw), lambda x_: F.cross_entropy(x_, t, **kw), [x],
                     dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_targets_ignored(reduction, smoothing, weighted):
    """Mean over zero tokens is NaN with zero gradients, exactly as torch."""
    x = torch.randn(4, 6)
    t = torch.full((4,), 3)
    t[:] = 7
    w = torch.rand(6) if weighted else None
    a, b = leaf(x), leaf(x)
    la = tritium.cross_entropy(a, t, w, ignore_index=7, reduction=reduction, label_smoothing=smoothing)
    lb = F.cross_entropy(b, t, w, ignore_index=7, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(la, lb, equal_nan=True)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing,weighted", [(0.0, False), (0.1, True)])
def test_probability_targets_match_torch(dtype, reduction, smoothing, weighted):
    x = torch.randn(5, 11, 3)
    p = torch.softmax(torch.randn(5, 11, 3), 1)
    w = torch.rand(11) + 0.5
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if weighted:
        _compare(lambda x_, p_, w_: tritium.cross_entropy(x_, p_, w_, **kw),
                 lambda x_, p_, w_: F.cross_entropy(x_, p_, w_, **kw), [x, p, w], dtype, grad_idx=(0, 1))
    else:
        _compare(lambda x_, p_: tritium.cross_entropy(x_, p_, **kw),
                 lambda x_, p_: F.cross_entropy(x_, p_, **kw), [x, p], dtype, grad_idx=(0, 1))


def test_legacy_size_average_reduce():
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.warns(UserWarning):
        ours = tritium.cross_entropy(x, t, size_average=False)
    with pytest.warns(UserWarning):
        theirs = F.cross_entropy(x, t, size_average=False)
    torch.testing.assert_close(ours, theirs)


def test_gradcheck_float64():
    x = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4, 3))
    t[0, 0] = -100
    w = torch.rand(7, dtype=torch.float64)
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x_: tritium.cross_entropy(x_, t, w, reduction=red, label_smoothing=0.1), (x,))
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([1, 8, -100, 0, 4, 4])
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda h_, W_, b_: tritium.fused_linear_cross_entropy(h_, W_, tt, b_, reduction=red,
                                                                   label_smoothing=0.1, chunk_size=4), (h, W, b))


@pytest.mark.parametrize("call", [
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1])),                  # out of range
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, -2, 1])),                 # negative
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 9, 1]), label_smoothing=0.1),
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1], dtype=torch.int32)),
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1])),                      # batch mismatch
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.rand(4)),   # weight size
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg"),
    lambda f: f.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=1.5),
], ids=["oob", "negative", "oob-smooth", "int32", "batch", "weight", "reduction", "smoothing"])
def test_bad_input_raises_what_torch_raises(call):
    with pytest.raises(Exception) as theirs:
        call(F)
    with pytest.raises(type(theirs.value)) as ours:
        call(tritium)
    assert str(ours.value) == str(theirs.value)


def test_empty_batch_matches_torch():
    x, t = torch.randn(0, 5), torch.zeros(0, dtype=torch.long)
    for red in REDUCTIONS:
        torch.testing.assert_close(tritium.cross_entropy(x, t, reduction=red), F.cross_entropy(x, t, reduction=red),
                                   equal_nan=True)


def test_no_gradient_rows_without_grad():
    x, t = torch.randn(4, 50), torch.randint(0, 50, (4,))
    with torch.no_grad():
        torch.testing.assert_close(tritium.cross_entropy(x, t), F.cross_entropy(x, t))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, t, h, w):
        return (tritium.cross_entropy(x, t, label_smoothing=0.1)
                + tritium.fused_linear_cross_entropy(h, w, t, chunk_size=3))

    x = torch.randn(8, 10, requires_grad=True)
    h, w = torch.randn(8, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    y = torch.compile(f, fullgraph=True)(x, t, h, w)
    torch.testing.assert_close(y, f(x, t, h, w))
    gs = torch.autograd.grad(y, (x, h, w))
    gr = torch.autograd.grad(f(x, t, h, w), (x, h, w))
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b)


def test_module_is_a_drop_in():
    w = torch.rand(6)
    ours = tritium.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = torch.randn(5, 6), torch.randint(0, 6, (5,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))


# ---- fused linear + cross-entropy ----
def _flce_pair(bias, reduction, smoothing, chunk):
    def ours(h, w, *b):
        return tritium.fused_linear_cross_entropy(h, w, t_holder[0], b[0] if b else None, reduction=reduction,
                                                  label_smoothing=smoothing, chunk_size=chunk)

    def theirs(h, w, *b):
        logits = F.linear(h, w, b[0] if b else None)
        return F.cross_entropy(logits.flatten(0, -2), t_holder[0].flatten(), reduction=reduction,
                               label_smoothing=smoothing).view(t_holder[0].shape if reduction == "none" else ())
    return ours, theirs


t_holder = [None]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias,smoothing,chunk", [(False, 0.0, None), (True, 0.1, 5), (True, 0.0, 64)])
@pytest.mark.parametrize("seq", [11, 40], ids=["22rows", "120rows"])  # 120: the CPU float packed-weight path
def test_fused_linear_cross_entropy_small(dtype, reduction, bias, smoothing, chunk, seq):
    h, w, b = torch.randn(3 if seq == 40 else 2, seq, 16), torch.randn(37, 16) / 4, torch.randn(37)
    t = torch.randint(0, 37, h.shape[:2])
    t[0, ::3] = -100
    t_holder[0] = t
    ours, theirs = _flce_pair(bias, reduction, smoothing, chunk)
    args = [h, w, b] if bias else [h, w]
    _compare(ours, theirs, args, dtype, grad_idx=tuple(range(len(args))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("widen", [True, False], ids=["float32-panels", "16-bit-matmuls"])
def test_fused_linear_cross_entropy_16bit_ways(monkeypatch, widen, dtype):
    """Both ways of the CPU LM head for 16-bit inputs, whichever this CPU takes by default: the weight widened once
    to float32 panels (CPUs without bfloat16 dot products) and the 16-bit matmuls; values and every gradient within
    2x torch's own error of float64, with and without a bias, mean and per-row."""
    module = sys.modules["tritium.ops.cross_entropy"]  # (tritium.ops.cross_entropy is the function)
    monkeypatch.setattr(module, "_widen_16bit", lambda: widen)
    for bias, reduction in ((True, "mean"), (False, "none")):
        h, w, b = torch.randn(3, 40, 16), torch.randn(37, 16) / 4, torch.randn(37)
        t = torch.randint(0, 37, h.shape[:2])
        t[0, ::3] = -100
        t_holder[0] = t
        ours, theirs = _flce_pair(bias, reduction, 0.1, 64)
        args = [h, w, b] if bias else [h, w]
        _compare(ours, theirs, args, dtype, grad_idx=tuple(range(len(args))))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk", [5, 64], ids=["chunks", "one-chunk"])
def test_fused_linear_cross_entropy_frozen_head(dtype, bias, chunk):
    """A frozen LM head (weight and bias need no gradient, as under LoRA): the loss and grad_hidden within 2x
    torch's own error of float64 (the forward computes no weight gradient), and no gradient reaches the weight or
    bias."""
    h, w, b = torch.randn(3, 40, 16), torch.randn(37, 16) / 4, torch.randn(37)
    t = torch.randint(0, 37, h.shape[:2])
    t[0, ::3] = -100
    t_holder[0] = t
    ours, theirs = _flce_pair(bias, "mean", 0.1, chunk)
    _compare(ours, theirs, [h, w, b] if bias else [h, w], dtype, grad_idx=(0,))
    hi, wi, bi = leaf(h, dtype), w.to(dtype), b.to(dtype)
    tritium.fused_linear_cross_entropy(hi, wi, t, bi if bias else None, chunk_size=chunk).backward()
    assert hi.grad is not None and wi.grad is None and bi.grad is None
    outs = torch.ops.tritium.fused_linear_cross_entropy_fwd(hi.detach().flatten(0, 1), wi, t.flatten(),
                                                            bi if bias else None, -100, 0.0, chunk, True, True,
                                                            0.0, 0.0, False)
    assert outs[2].shape == hi.flatten(0, 1).shape and outs[3].numel() == 0 and outs[4].numel() == 0


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kept", ["few", "none", "all"])
def test_fused_linear_cross_entropy_ignored_rows(dtype, reduction, kept):
    """Rows whose target is ignore_index are left out of the CPU products (most of an SFT batch: its prompts and
    padding): with 9 of 101 rows labelled, with none and with every one, the value and the gradients of hidden,
    weight and bias within 2x torch's own error of float64 (the ignored rows' exactly zero), over several
    chunks."""
    h, w, b = torch.randn(101, 24), torch.randn(53, 24) / 4, torch.randn(53)
    t = torch.randint(0, 53, (101,))
    if kept != "all":
        labelled = torch.zeros(101, dtype=torch.bool)
        labelled[[3, 4, 5, 40, 41, 77, 78, 99, 100]] = kept == "few"
        t[~labelled] = -100
    t_holder[0] = t
    ours, theirs = _flce_pair(True, reduction, 0.1, 4)
    if kept == "none" and reduction == "mean":   # 0 / 0: NaN in both, as torch; the gradients are zero
        hi = leaf(h, dtype)
        loss = ours(hi, w.to(dtype), b.to(dtype))
        assert loss.isnan() and theirs(h, w, b).isnan()
        loss.backward()
        assert hi.grad.eq(0).all()
        return
    _compare(ours, theirs, [h, w, b], dtype, grad_idx=(0, 1, 2))
    hi = leaf(h, dtype)
    ours(hi, w.to(dtype), b.to(dtype)).sum().backward()
    assert hi.grad[t == -100].eq(0).all()


def _chunked_lm_loss(h, w, t, chunk=1024):
    """linear + cross_entropy ('mean') and its gradients, computed chunk by chunk with autograd (a float64
    reference that fits in memory at LM-head sizes)."""
    n = (t != -100).sum()
    loss = torch.zeros((), dtype=h.dtype)
    gh, gw = torch.empty_like(h), torch.zeros_like(w)
    for s in range(0, h.shape[0], chunk):
        hc, wc = leaf(h[s:s + chunk]), leaf(w)
        lc = F.cross_entropy(F.linear(hc, wc), t[s:s + chunk], reduction="sum") / n
        a, b = torch.autograd.grad(lc, (hc, wc))
        loss += lc.detach()
        gh[s:s + chunk] = a
        gw += b
    return loss, (gh, gw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_cross_entropy_lm_head_size(dtype):
    """(tokens 8192, hidden 576, vocab 49152): the SmolLM-sized LM head, value and all gradients against eager
    linear + cross_entropy in the same dtype, both measured against a float64 reference. bfloat16 on a CPU without
    bfloat16 dot products takes 256 tokens: torch's own bfloat16 matmuls there run on one thread converting element
    by element (the eager twin took 8 minutes at 1024 tokens), and the vocabulary-long reductions this test is for
    are as long at any token count."""
    T, H, V = 8192, 576, 49152
    if dtype == torch.bfloat16 and not cpu_has_bf16_dot():
        T = 256
    h = torch.randn(T, H).to(dtype)
    w = (torch.randn(V, H) / H ** 0.5).to(dtype)
    t = torch.randint(0, V, (T,))
    t[::7] = -100
    res = {}
    hi, wi = leaf(h), leaf(w)
    loss = tritium.fused_linear_cross_entropy(hi, wi, t)
    res["ours"] = (loss.detach(), torch.autograd.grad(loss, (hi, wi)))
    hi, wi = leaf(h), leaf(w)
    loss = F.cross_entropy(F.linear(hi, wi), t)
    res["torch"] = (loss.detach(), torch.autograd.grad(loss, (hi, wi)))
    del loss
    ref = _chunked_lm_loss(h.double(), w.double(), t)
    assert_within_torch_error(res["ours"][0], res["torch"][0], ref[0], "loss")
    for i in range(2):
        assert_within_torch_error(res["ours"][1][i], res["torch"][1][i], ref[1][i], f"grad {i}")


def test_fused_linear_cross_entropy_bad_input():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="agree on H"):
        tritium.fused_linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="target must have shape"):
        tritium.fused_linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="reduction"):
        tritium.fused_linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        tritium.fused_linear_cross_entropy(h, w, torch.tensor([0, 10, 1, 2]))


def test_fused_linear_cross_entropy_module():
    h, w, t = torch.randn(6, 8), torch.randn(10, 8), torch.randint(0, 10, (6,))
    m = tritium.nn.FusedLinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
    torch.testing.assert_close(m(h, w, t), F.cross_entropy(h @ w.t(), t, label_smoothing=0.1))


# ---- kl_div and distillation ----
KL_REDUCTIONS = ["mean", "batchmean", "sum", "none"]


def _kl_inputs(shape, log_target):
    x = torch.log_softmax(torch.randn(shape, dtype=torch.float64), -1)
    p = torch.softmax(torch.randn(shape, dtype=torch.float64), -1)
    return x, ((p + 0.01).log() if log_target else p)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log"])
@pytest.mark.parametrize("shape", [(4, 9), (3, 5, 33), (17,)], ids=["2d", "3d", "1d"])
def test_kl_div_matches_torch(dtype, reduction, log_target, shape):
    """Values and the gradients of input and target, against torch in dtype and in float64."""
    x, t = _kl_inputs(shape, log_target)
    _compare(lambda a, b: tritium.kl_div(a, b, reduction=reduction, log_target=log_target),
             lambda a, b: F.kl_div(a, b, reduction=reduction, log_target=log_target), [x, t], dtype,
             grad_idx=(0, 1))


def test_kl_div_runs_the_kernel():
    """The kernel path is taken (a graph with tritium::kl_div_fwd), and 'mean' warns as torch does."""
    x, t = _kl_inputs((4, 9), False)
    y = tritium.kl_div(leaf(x), t, reduction="batchmean")
    assert "kl_div_fwd" in y.grad_fn.name()
    with pytest.warns(UserWarning, match="batchmean"):
        tritium.kl_div(x, t, reduction="mean")


@pytest.mark.parametrize("call", ["noncontig", "0d", "empty", "broadcast", "mixed", "legacy", "log"])
def test_kl_div_edge_cases_match_torch(call):
    x, t = _kl_inputs((6, 8), False)
    args = {
        "noncontig": (x.t(), t.t(), dict(reduction="sum")),
        "0d": (x[0, 0], t[0, 0], dict(reduction="batchmean")),
        "empty": (x[:0], t[:0], dict(reduction="batchmean")),
        "broadcast": (x, t[:1], dict(reduction="sum")),
        "mixed": (x.float(), t, dict(reduction="sum")),
        "legacy": (x, t, dict(size_average=False)),
        "log": (x, t, dict(reduction="batchmean", log_target=True)),
    }[call]
    a, b, kw = args
    torch.testing.assert_close(tritium.kl_div(a, b, **kw), F.kl_div(a, b, **kw), equal_nan=True)


def test_kl_div_bad_reduction_raises_what_torch_raises():
    x, t = _kl_inputs((2, 3), False)
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        F.kl_div(x, t, reduction="avg")
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        tritium.kl_div(x, t, reduction="avg")


def test_kl_div_gradcheck_and_compile():
    x, t = _kl_inputs((3, 7), True)
    x, t = leaf(x), leaf(t)
    for red in ("batchmean", "none"):
        assert torch.autograd.gradcheck(lambda a, b: tritium.kl_div(a, b, reduction=red, log_target=True), (x, t))
    torch._dynamo.reset()
    f = lambda a, b: tritium.kl_div(a, b, reduction="batchmean") + tritium.distillation_loss(a, b, 2.0)  # noqa
    xf, tf = leaf(x.float()), leaf(t.float().exp())
    y = torch.compile(f, fullgraph=True)(xf, tf)
    torch.testing.assert_close(y, f(xf, tf))
    for a, b in zip(torch.autograd.grad(y, (xf, tf)), torch.autograd.grad(f(xf, tf), (xf, tf))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 200), (19, 1000), (2, 4100)], ids=["3d", "19x1000", "2x4100"])
@pytest.mark.parametrize("with_target,alpha", [(False, 0.7), (True, 0.7), (True, 0.0), (True, 1.0)],
                         ids=["kl", "target", "target-alpha0", "target-alpha1"])
def test_distillation_loss(dtype, shape, with_target, alpha):
    from tritium import reference
    s, te = torch.randn(shape, dtype=torch.float64) * 2, torch.randn(shape, dtype=torch.float64) * 2
    t = None
    if with_target:
        t = torch.randint(0, shape[-1], shape[:-1])
        t.view(-1)[1::3] = -100  # some ignored rows
    _compare(lambda a, b: tritium.distillation_loss(a, b, temperature=2.0, alpha=alpha, target=t),
             lambda a, b: reference.distillation_loss(a, b, temperature=2.0, alpha=alpha, target=t), [s, te], dtype)
    y = tritium.distillation_loss(leaf(s.to(dtype)), te.to(dtype), 2.0, alpha, t)
    names = _graph_names(y.grad_fn)
    assert y.dtype == dtype and "distill_fwd" in names  # the fused kernel ran
    assert "cross_entropy_fwd" not in names  # and the hard-label term with it, not a cross_entropy of its own


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (3, 4, 200), (2, 4100)], ids=["5x37", "3d", "2x4100"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("streamed", [False, True], ids=["stored", "streamed"])
def test_distillation_loss_temperatures(dtype, shape, temperature, streamed):
    """The kernel's three forms of the student's exp at temperature 1 (T = 1: the same exp; T = 2: the square of
    the exp at T; other T: its own exp), with the gradient rows and the backward's rows stored plainly or
    streamed around the cache (the large-tensor path, taken here at small shapes): values and gradient within
    2x torch's error, with and without a target."""
    from tritium import reference
    s, te = torch.randn(shape, dtype=torch.float64) * 3, torch.randn(shape, dtype=torch.float64) * 3
    for t in (None, torch.randint(0, shape[-1], shape[:-1])):
        if t is not None:
            t.view(-1)[::3] = -100
        with streamed_stores(streamed):
            _compare(lambda a, b: tritium.distillation_loss(a, b, temperature, 0.4, t),
                     lambda a, b: reference.distillation_loss(a, b, temperature, 0.4, t), [s, te], dtype)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_distillation_loss_all_targets_ignored(alpha):
    """Every target ignored: the loss is NaN (torch's 0/0 mean cross-entropy, whatever alpha), the student's
    gradient is the KL term's alone, as torch's."""
    from tritium import reference
    s, te = torch.randn(6, 300), torch.randn(6, 300)
    t = torch.full((6,), 7)
    a, b = leaf(s), leaf(s)
    ours = tritium.distillation_loss(a, te, 2.0, alpha, t, ignore_index=7)
    theirs = reference.distillation_loss(b, te, 2.0, alpha, t, ignore_index=7)
    assert torch.isnan(ours) and torch.isnan(theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_fused_equals_composition(alpha):
    """float64: the fused op's value and gradient are those of the composition it replaces (the KL kernel's rows
    scaled and summed, plus (1 - alpha) times cross_entropy), to rounding."""
    from tritium.ops.cross_entropy import distill_fwd
    s, te = torch.randn(19, 1000, dtype=torch.float64) * 2, torch.randn(19, 1000, dtype=torch.float64) * 2
    t = torch.randint(0, 1000, (19,))
    t[::4] = -100
    T = 2.0

    def composed(x):
        kl_rows, _ = distill_fwd(x, te, 1.0 / T, True)
        return kl_rows.sum() * (alpha * T ** 2 / 19) + (1 - alpha) * tritium.cross_entropy(x, t)

    a, b = leaf(s), leaf(s)
    ours, theirs = tritium.distillation_loss(a, te, T, alpha, t), composed(b)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(ours, a)[0], torch.autograd.grad(theirs, b)[0], rtol=1e-12,
                               atol=1e-17)


def test_distillation_loss_with_target_compiles():
    s, te, t = leaf(torch.randn(5, 33)), torch.randn(5, 33), torch.tensor([1, -100, 32, 0, 5])
    f = lambda a: tritium.distillation_loss(a, te, 1.5, 0.4, t)  # noqa: E731
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True)(s)
    torch.testing.assert_close(y, f(s))
    torch.testing.assert_close(torch.autograd.grad(y, s)[0], torch.autograd.grad(f(s), s)[0])


def _graph_names(fn) -> str:
    names, todo = [], [fn]
    while todo:
        f = todo.pop()
        if f is not None:
            names.append(f.name())
            todo.extend(g for g, _ in f.next_functions)
    return " ".join(names)


def test_distillation_loss_teacher_with_masked_classes():
    """-inf teacher logits: those classes contribute 0 (the unfused composition gives NaN there)."""
    s, te = torch.randn(5, 50), torch.randn(5, 50)
    te[:, 40:] = float("-inf")
    ours = tritium.distillation_loss(s, te, temperature=1.5, alpha=1.0)
    lq = torch.log_softmax(te.double() / 1.5, -1)
    q = lq.exp()
    kl = torch.where(q > 0, q * (lq - torch.log_softmax(s.double() / 1.5, -1)), 0.0).sum() / 5 * 1.5 ** 2
    torch.testing.assert_close(ours.double(), kl, rtol=1e-5, atol=1e-6)


def test_distillation_loss_bad_input():
    s = torch.randn(4, 10)
    with pytest.raises(ValueError, match="temperature must be positive"):
        tritium.distillation_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        tritium.distillation_loss(s, s[:, :9])
    with pytest.raises(ValueError, match="target must have shape"):
        tritium.distillation_loss(s, s, target=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="0-d"):
        tritium.distillation_loss(s[0, 0], s[0, 0])
    from tritium import reference
    for bad in (10, -2):  # a target out of range: the IndexError torch's cross_entropy raises
        t = torch.tensor([0, bad, -100, 3])
        with pytest.raises(IndexError) as theirs:
            reference.distillation_loss(s, s, 2.0, 0.5, t)
        with pytest.raises(IndexError) as ours:
            tritium.distillation_loss(s, s, 2.0, 0.5, t)
        assert str(ours.value) == str(theirs.value) == f"Target {bad} is out of bounds."
