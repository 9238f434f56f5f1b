"""The public causal_conv1d / causal_conv1d_update: values and gradients against tritium.reference (float64) and
against causal-conv1d's own reference functions (causal_conv1d_ref / causal_conv1d_update_ref, loaded by
tests/upstream.py), gradcheck, torch.compile(fullgraph=True), non-contiguous inputs, decoding step by step equal to
the whole sequence, bad inputs, and what goes to the reference."""
import pytest
import torch

import tritium
from tritium import reference
from tests.upstream import upstream
from tests.util import assert_within_torch_error, torch_and_ref

B, D = 2, 21


def _upstream(name):
    return upstream("causal-conv1d", "causal_conv1d/causal_conv1d_interface.py", name)


def _params(W, dtype=torch.float32, bias=True):
    w = (torch.randn(D, W, dtype=torch.float64) / W ** 0.5).to(dtype)
    return w, (torch.randn(D, dtype=torch.float64).to(dtype) if bias else None)


# ---- values and gradients ----
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("activation", (None, "silu", "swish"))
@pytest.mark.parametrize("init", (False, True), ids=["zeros", "init"])
def test_values_and_grads(dtype, activation, init):
    """out, the final states and the gradients of x, weight, bias, initial_states within 2x the reference's own
    error in dtype; the final states' gradient flows too."""
    L, W = 45, 4
    x = torch.randn(B, D, L, dtype=torch.float64).to(dtype)
    w, b = _params(W, dtype)
    i0 = torch.randn(B, D, W - 1, dtype=torch.float64).to(dtype) if init else None
    dy = torch.randn(B, D, L, dtype=torch.float64)
    dfinal = torch.randn(B, D, W - 1, dtype=torch.float64)
    args = [x, w, b] + ([i0] if init else [])

    def run(fn):
        def f(x_, w_, b_, *i_):
            out, final = fn(x_, w_, b_, i_[0] if i_ else None, return_final_states=True, activation=activation)
            return out, final
        return f

    ours = [t.detach().clone().requires_grad_() for t in args]
    out, final = run(tritium.causal_conv1d)(*ours)
    grads = torch.autograd.grad((out, final), ours, (dy.to(dtype), dfinal.to(dtype)))

    # the reference's own error: run in dtype and in float64 (torch_and_ref takes one output: the two joined)
    def joined(*ts):
        o, fs = run(reference.causal_conv1d)(*ts)
        return torch.cat([o, fs], -1)

    (ty, tg), (ry, rg) = torch_and_ref(joined, args, torch.cat([dy, dfinal], -1), dtype)
    assert_within_torch_error(out, ty[..., :L], ry[..., :L], "out")
    assert_within_torch_error(final, ty[..., L:], ry[..., L:], "final_states")
    for name, g, t, r in zip(["dx", "dweight", "dbias", "dinitial_states"], grads, tg, rg):
        assert_within_torch_error(g, t, r, name)


@pytest.mark.parametrize("L", (1, 2, 3, 50))
@pytest.mark.parametrize("init", (False, True), ids=["zeros", "init"])
@pytest.mark.parametrize("bias", (False, True), ids=["nobias", "bias"])
def test_vs_upstream(L, init, bias):
    """float32 against causal-conv1d's causal_conv1d_ref: out, final states (into final_states_out too), every
    gradient; L < width - 1 pads the final states with the initial states / zeros."""
    ref = _upstream("causal_conv1d_ref")
    W = 4
    x = torch.randn(B, D, L)
    w, b = _params(W, bias=bias)
    i0 = torch.randn(B, D, W - 1) if init else None
    dy, dfinal = torch.randn(B, D, L), torch.randn(B, D, W - 1)
    results = []
    for fn in (tritium.causal_conv1d, ref):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, i0) if t is not None]
        it = iter(leaves)
        xs, ws = next(it), next(it)
        bs = next(it) if bias else None
        ii = next(it) if init else None
        out, final = fn(xs, ws, bs, ii, True, None, "silu")
        results.append((out, final) + torch.autograd.grad((out, final), leaves, (dy, dfinal)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)
    # final_states_out: filled and returned
    buf = torch.full((B, D, W - 1), float("nan"))
    out, final = tritium.causal_conv1d(x, w, b, i0, return_final_states=True, final_states_out=buf)
    assert final is buf
    torch.testing.assert_close(buf, ref(x, w, b, i0, True)[1])
    torch.testing.assert_close(out, ref(x, w, b, i0))


@pytest.mark.parametrize("T", (1, 4), ids=["2d", "seqlen4"])
@pytest.mark.parametrize("extra", (0, 2), ids=["state-w1", "state-w1+2"])
@pytest.mark.parametrize("activation", (None, "silu"))
def test_update_vs_upstream(T, extra, activation):
    ref = _upstream("causal_conv1d_update_ref")
    W = 4
    x = torch.randn(B, D) if T == 1 else torch.randn(B, D, T)
    w, b = _params(W)
    state = torch.randn(B, D, W - 1 + extra)
    ours_state, their_state = state.clone(), state.clone()
    out = tritium.causal_conv1d_update(x, ours_state, w, b, activation)
    want = ref(x, their_state, w, b, activation)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(ours_state, their_state, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=lambda d: str(d)[6:])
def test_update_values(dtype):
    x = torch.randn(B, D, dtype=torch.float64).to(dtype)
    w, b = _params(3, dtype)
    state = torch.randn(B, D, 2, dtype=torch.float64).to(dtype)
    s1, s2 = state.clone(), state.clone()
    out = tritium.causal_conv1d_update(x, s1, w, b, "silu")
    theirs = reference.causal_conv1d_update(x, s2, w, b, "silu")
    ref = reference.causal_conv1d_update(x.double(), state.double(), w.double(), b.double(), "silu")
    assert_within_torch_error(out, theirs, ref, "out")
    assert torch.equal(s1, s2)


# ---- decoding: step by step equals the whole sequence ----
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("W", (2, 3, 4))
def test_steps_equal_full(dtype, W):
    """A prefill of P tokens (its final states become the conv state), then the rest one token at a time and in a
    chunk of 3: each output equals the whole sequence's. A longer state (zeros) decodes from the start too."""
    L, P = 12, 5
    x = torch.randn(B, D, L, dtype=dtype)
    w, b = _params(W, dtype)
    full = tritium.causal_conv1d(x, w, b, activation="silu")
    out, state = tritium.causal_conv1d(x[..., :P], w, b, return_final_states=True, activation="silu")
    torch.testing.assert_close(out, full[..., :P])
    state = state.clone()
    steps = [tritium.causal_conv1d_update(x[:, :, t], state, w, b, "silu") for t in range(P, L - 3)]
    steps.append(tritium.causal_conv1d_update(x[:, :, L - 3:], state, w, b, "silu"))
    got = torch.cat([s.unsqueeze(-1) for s in steps[:-1]] + [steps[-1]], -1)
    torch.testing.assert_close(got, full[..., P:])
    torch.testing.assert_close(state, x[..., L - (W - 1):])
    long_state = torch.zeros(B, D, W + 3, dtype=dtype)
    got = torch.stack([tritium.causal_conv1d_update(x[:, :, t], long_state, w, b, "silu") for t in range(L)], -1)
    torch.testing.assert_close(got, full)
    torch.testing.assert_close(long_state, x[..., L - (W + 3):])
    # the initial states continue a sequence: the second half with the first half's final states
    _, mid = tritium.causal_conv1d(x[..., :P], w, b, return_final_states=True, activation="silu")
    torch.testing.assert_close(tritium.causal_conv1d(x[..., P:], w, b, mid, activation="silu"), full[..., P:])


# ---- gradcheck, compile, layouts ----
@pytest.mark.parametrize("W", (2, 4))
@pytest.mark.parametrize("L", (2, 9))
def test_gradcheck(W, L):
    x = torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, W, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    i0 = torch.randn(2, 3, W - 1, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, i0):
        out, final = tritium.causal_conv1d(x, w, b, i0, return_final_states=True, activation="silu")
        return out, final

    assert torch.autograd.gradcheck(f, (x, w, b, i0))
    assert torch.autograd.gradcheck(lambda x, w: tritium.causal_conv1d(x, w), (x, w))


def test_compile_fullgraph():
    """Forward and backward of causal_conv1d, and a decoding step mutating its state, in one graph each, equal to
    eager."""
    x = torch.randn(B, D, 17, requires_grad=True)
    w, b = _params(4)
    w.requires_grad_()
    i0 = torch.randn(B, D, 3)

    def f(x, w, b, i0):
        out, final = tritium.causal_conv1d(x, w, b, i0, return_final_states=True, activation="silu")
        return out.square().sum() + final.sum()

    loss = torch.compile(f, fullgraph=True)(x, w, b, i0)
    gx, gw = torch.autograd.grad(loss, (x, w))
    eloss = f(x, w, b, i0)
    ex, ew = torch.autograd.grad(eloss, (x, w))
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)

    def step(x, state, w, b):
        return tritium.causal_conv1d_update(x, state, w, b, "silu") * 2

    xs = torch.randn(B, D)
    s1, s2 = torch.randn(B, D, 3), None
    s2 = s1.clone()
    with torch.no_grad():
        got = torch.compile(step, fullgraph=True)(xs, s1, w, b)
        want = step(xs, s2, w, b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s1, s2)


def test_non_contiguous():
    """Channel-last x (Mamba-2's layout), a channel slice of a wider projection, transposed weight, a strided
    state: values and gradients equal the reference's."""
    L, W = 19, 4
    x_cl = torch.randn(B, L, D).transpose(1, 2)                 # (B, D, L), channel stride 1
    x_half = torch.randn(B, 2 * D, L)[:, D:]                   # (B, D, L), batch stride 2 D L
    w = torch.randn(W, D).t()                                   # (D, W) non-contiguous
    b = torch.randn(2 * D)[::2]
    i0 = torch.randn(B, W - 1, D).transpose(1, 2)
    for x in (x_cl, x_half):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, i0)]
        refs = [t.clone().requires_grad_() for t in (x, w, b, i0)]
        out = tritium.causal_conv1d(*leaves, activation="silu")
        want = reference.causal_conv1d(*refs, activation="silu")
        torch.testing.assert_close(out, want)
        dy = torch.randn(B, D, L)
        for g, e in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(want, refs, dy)):
            torch.testing.assert_close(g, e)
    # an expanded output gradient (from a sum): the backward takes it as it comes
    leaves = [t.clone().requires_grad_() for t in (x_cl, w)]
    g = torch.autograd.grad(tritium.causal_conv1d(*leaves).sum(), leaves)
    refs = [t.clone().requires_grad_() for t in (x_cl, w)]
    e = torch.autograd.grad(reference.causal_conv1d(*refs).sum(), refs)
    for a, c in zip(g, e):
        torch.testing.assert_close(a, c)
    # a state with a non-unit last stride goes to the reference, and is still updated in place
    state = torch.randn(B, 3, D).transpose(1, 2)
    want_state = state.clone()
    xs = torch.randn(B, D)
    torch.testing.assert_close(tritium.causal_conv1d_update(xs, state, w, b),
                               reference.causal_conv1d_update(xs, want_state, w, b))
    torch.testing.assert_close(state, want_state)


def test_edges():
    """Empty batch / length (the reference), width 1 (no state), L shorter than the state."""
    w, b = _params(4)
    for x in (torch.randn(0, D, 5), torch.randn(B, D, 0)):
        out, final = tritium.causal_conv1d(x, w, b, return_final_states=True, activation="silu")
        assert out.shape == x.shape and final.shape == (x.shape[0], D, 3)
        assert not final.any()
    x = torch.randn(B, D, 6)
    w1 = torch.randn(D, 1)
    out, final = tritium.causal_conv1d(x, w1, return_final_states=True)
    torch.testing.assert_close(out, x * w1)
    assert final.shape == (B, D, 0)


# ---- bad inputs ----
def _bad_cases():
    x, w, b = torch.randn(B, D, 8), torch.randn(D, 4), torch.randn(D)
    c = tritium.causal_conv1d
    u = tritium.causal_conv1d_update
    s = torch.randn(B, D, 3)
    return [
        ("x 2-D", lambda: c(x[0], w), ValueError, r"x must be \(batch, dim, seqlen\), got shape \(21, 8\)"),
        ("x not a tensor", lambda: c([1.0], w), TypeError, "x must be a Tensor"),
        ("x integer", lambda: c(x.long(), w), TypeError, "x must be a floating-point tensor, got torch.int64"),
        ("weight dim", lambda: c(x, torch.randn(D + 1, 4)), ValueError,
         r"weight must be \(dim, width\) = \(21, width >= 1\).*got shape \(22, 4\)"),
        ("weight 3-D", lambda: c(x, w.unsqueeze(1)), ValueError, r"weight must be \(dim, width\).*\(21, 1, 4\)"),
        ("bias shape", lambda: c(x, w, torch.randn(D, 1)), ValueError, r"bias must be \(dim,\) = \(21,\)"),
        ("bias length", lambda: c(x, w, torch.randn(D - 1)), ValueError, r"bias must be .*got shape \(20,\)"),
        ("initial_states", lambda: c(x, w, b, torch.randn(B, D, 4)), ValueError,
         r"initial_states must be \(batch, dim, width - 1\) = \(2, 21, 3\) or None, got shape \(2, 21, 4\)"),
        ("final_states_out", lambda: c(x, w, return_final_states=True, final_states_out=torch.empty(B, D, 2)),
         ValueError, r"final_states_out must be \(batch, dim, width - 1\) = \(2, 21, 3\)"),
        ("activation", lambda: c(x, w, activation="relu"), ValueError,
         "activation must be None, 'silu' or 'swish', got 'relu'"),
        ("activation type", lambda: c(x, w, activation=True), ValueError, "activation must be"),
        ("update x", lambda: u(torch.randn(D), s, w), ValueError,
         r"x must be \(batch, dim\) or \(batch, dim, seqlen\), got shape \(21,\)"),
        ("update state short", lambda: u(x[..., 0], torch.randn(B, D, 2), w), ValueError,
         r"conv_state must be \(batch, dim, state_len >= width - 1\) = \(2, 21, >= 3\), got shape \(2, 21, 2\)"),
        ("update state batch", lambda: u(x[..., 0], torch.randn(B + 1, D, 3), w), ValueError, "conv_state must be"),
        ("update weight", lambda: u(x[..., 0], s, torch.randn(D, 4, 1)), ValueError, "weight must be"),
        ("update activation", lambda: u(x[..., 0], s, w, b, "gelu"), ValueError, "activation must be"),
        ("update state dtype", lambda: u(x[..., 0], s.int(), w), TypeError, "conv_state must be a floating-point"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("i", range(len(BAD)), ids=[case[0] for case in BAD])
def test_bad_inputs(i):
    _, call, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        call()


# ---- what goes to the reference ----
def test_reference_backend(reference_backend, monkeypatch):
    """TRITIUM_BACKEND=reference: no kernel runs, the results are the reference's (bit for bit)."""
    def no_kernel(*args):
        raise AssertionError("a kernel ran under the reference backend")

    import tritium.ops.conv1d as mod
    monkeypatch.setattr(mod, "causal_conv1d_fwd", no_kernel)
    monkeypatch.setattr(mod, "_update_op", no_kernel)
    x, i0 = torch.randn(B, D, 9), torch.randn(B, D, 3)
    w, b = _params(4)
    got = tritium.causal_conv1d(x, w, b, i0, True, activation="silu")
    want = reference.causal_conv1d(x, w, b, i0, True, activation="silu")
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    s1, s2 = i0.clone(), i0.clone()
    assert torch.equal(tritium.causal_conv1d_update(x[..., 0], s1, w, b, "silu"),
                       reference.causal_conv1d_update(x[..., 0], s2, w, b, "silu"))
    assert torch.equal(s1, s2)


def test_uncovered_go_to_reference(monkeypatch):
    """Mixed dtypes (float32 weight with bfloat16 x, as causal-conv1d allows), widths past MAX_WIDTH, and an update
    that must be differentiable go to the reference."""
    import tritium.ops.conv1d as mod

    def no_kernel(*args):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(mod, "causal_conv1d_fwd", no_kernel)
    monkeypatch.setattr(mod, "_update_op", no_kernel)
    x = torch.randn(B, D, 9)
    w, b = _params(4)
    torch.testing.assert_close(tritium.causal_conv1d(x.bfloat16(), w, b), reference.causal_conv1d(x.bfloat16(), w, b))
    w9 = torch.randn(D, mod.MAX_WIDTH + 1)
    torch.testing.assert_close(tritium.causal_conv1d(x, w9), reference.causal_conv1d(x, w9))
    wg = w.clone().requires_grad_()
    out = tritium.causal_conv1d_update(x[..., 0], torch.randn(B, D, 3), wg, b)
    assert out.requires_grad


# ---- torch.library.opcheck of the three ops (the samples tests/ops/test_opcheck.py's SAMPLES needs) ----
def _g(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


OPCHECK = {
    "causal_conv1d_fwd": lambda: [(_g(2, 5, 7), _g(5, 4), _g(5), _g(2, 5, 3), True),
                                  (_g(2, 5, 7), _g(5, 3), None, None, False),
                                  (_g(1, 3, 2, dtype=torch.float64), _g(3, 4, dtype=torch.float64), None,
                                   _g(1, 3, 3, dtype=torch.float64), True)],
    "causal_conv1d_bwd": lambda: [(torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randn(5, 4), torch.randn(5),
                                   torch.randn(2, 5, 3), True),
                                  (torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randn(5, 2), None, None, False)],
    "causal_conv1d_update": lambda: [(torch.randn(2, 5, 1), torch.randn(2, 5, 3), torch.randn(5, 4), torch.randn(5),
                                      True),
                                     (torch.randn(2, 5, 4), torch.randn(2, 5, 5), torch.randn(5, 4), None, False)],
}


@pytest.mark.parametrize("name", sorted(OPCHECK))
def test_opcheck(name):
    op = getattr(torch.ops.tritium, name).default
    for args in OPCHECK[name]():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))
