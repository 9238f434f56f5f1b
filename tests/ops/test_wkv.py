"""tritium.wkv7 / wkv7_step and wkv6 / wkv6_step: the public functions against flash-linear-attention's naive
references (RWKV-7: fla.ops.generalized_delta_rule.dplr.naive.dplr_recurrence, which fla's rwkv7 ops delegate to;
RWKV-6: fla.ops.rwkv6.recurrent_naive.naive_recurrent_rwkv6) and against the float64 recurrences
(tritium.ops.wkv.wkv7_reference / wkv6_reference); every gradient, gradcheck, torch.compile, the decoding step,
layouts, bad input."""
import pytest
import torch

import tritium
from tritium.ops.wkv import wkv6_reference, wkv7_reference
from tests.kernels.test_wkv import NAMES, make_inputs
from tests.util import CPU_DTYPES, assert_within_torch_error, leaf, need


def dplr_recurrence():
    return need("fla.ops.generalized_delta_rule.dplr.naive").dplr_recurrence


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("has_h0", [False, True], ids=["zero-state", "h0"])
@pytest.mark.parametrize("shape", [(2, 7, 3, 16, 16), (1, 129, 2, 64, 64), (2, 33, 1, 7, 5)], ids=str)
def test_matches_fla_naive_reference(shape, has_h0):
    """float32 output and final state within 2x the error of fla's naive recurrence (against float64). fla's
    reference takes (B, H, T, K) and scales r by K ** -0.5 (fused_recurrent_rwkv7's default scale)."""
    B, T, H, K, V = shape
    t = make_inputs(B, T, H, K, V, torch.float32)
    h0 = torch.randn(B, H, K, V) if has_h0 else None
    o, last = tritium.wkv7(*(t[n] for n in NAMES), initial_state=h0, output_final_state=True)
    r, w, k, v, a, b = (t[n].transpose(1, 2) for n in NAMES)
    theirs, their_last = dplr_recurrence()(r, k, v, a, b, w, initial_state=h0, output_final_state=True)
    ref, ref_last = wkv7_reference(*(t[n].double() for n in NAMES), None,
                                   None if h0 is None else h0.double(), True)
    assert_within_torch_error(o, theirs.transpose(1, 2), ref, "o")
    assert_within_torch_error(last, their_last, ref_last, "final state")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 7, 3, 5, 9), (1, 129, 2, 17, 16)], ids=str)
@pytest.mark.parametrize("has_h0", [False, True], ids=["zero-state", "h0"])
def test_values_and_gradients(dtype, shape, has_h0):
    """o, the final state and the gradient of every input (initial state too, through the final state as well)
    within 2x the reference's own error in dtype."""
    B, T, H, K, V = shape
    t = make_inputs(B, T, H, K, V, dtype)
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    res = {}
    for name, fn, d in (("ours", tritium.wkv7, dtype), ("torch", wkv7_reference, dtype),
                        ("ref", wkv7_reference, torch.float64)):
        ins = [leaf(t[n], d) for n in NAMES]
        s0 = leaf(h0, _acc(d)) if has_h0 else None
        o, last = fn(*ins, scale=0.3, initial_state=s0, output_final_state=True)
        leaves = ins + ([s0] if has_h0 else [])
        gs = torch.autograd.grad((o, last), leaves, (do.to(o.dtype), dht.to(last.dtype)))
        res[name] = (o, last, gs)
    for i, what in enumerate(["o", "final state"]):
        assert_within_torch_error(res["ours"][i].detach(), res["torch"][i].detach(), res["ref"][i].detach(), what,
                                  compute_dtype=dtype)
    for name, a, b, c in zip(list(NAMES) + ["initial_state"], res["ours"][2], res["torch"][2], res["ref"][2]):
        assert_within_torch_error(a, b, c, f"grad {name}")


def test_gradcheck_float64():
    t = make_inputs(2, 6, 2, 3, 4, torch.float64)
    ins = [leaf(t[n]) for n in NAMES] + [leaf(torch.randn(2, 2, 3, 4, dtype=torch.float64))]

    def fn(r, w, k, v, a, b, h0):
        return tritium.wkv7(r, w, k, v, a, b, scale=0.7, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(fn, ins)


def test_torch_compile_fullgraph():
    t = make_inputs(2, 20, 2, 8, 6, torch.float32)
    ins = [leaf(t[n]) for n in NAMES] + [leaf(torch.randn(2, 2, 8, 6))]

    def fn(r, w, k, v, a, b, h0):
        return tritium.wkv7(r, w, k, v, a, b, initial_state=h0, output_final_state=True)

    compiled = torch.compile(fn, fullgraph=True)
    out, last = compiled(*ins)
    eager, eager_last = fn(*ins)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(last, eager_last)
    g1 = torch.autograd.grad(out.sum() + last.sum(), ins)
    g2 = torch.autograd.grad(eager.sum() + eager_last.sum(), ins)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_projection_layouts_and_defaults():
    """RWKV-7's block takes r, k, v, ... as views of (B, T, H * K) projections (non-contiguous heads); the
    defaults are scale K ** -0.5, no initial state and no final state."""
    B, T, H, K = 2, 11, 3, 4
    x = torch.randn(B, T, 6 * H * K)
    r, w, k, v, a, b = (x[..., i * H * K:(i + 1) * H * K].view(B, T, H, K) for i in range(6))
    w = -torch.sigmoid(w) * 0.6
    o, last = tritium.wkv7(r, w, k, v, a, b)
    assert last is None
    ref, _ = wkv7_reference(*(y.double() for y in (r, w, k, v, a, b)), K ** -0.5)
    theirs, _ = wkv7_reference(r, w, k, v, a, b, K ** -0.5)
    assert_within_torch_error(o, theirs, ref, "o")


def test_reference_backend(reference_backend):
    t = make_inputs(2, 9, 2, 5, 3, torch.float32)
    o, last = tritium.wkv7(*(t[n] for n in NAMES), output_final_state=True)
    ro, rlast = wkv7_reference(*(t[n] for n in NAMES), 5 ** -0.5, None, True)
    torch.testing.assert_close(o, ro)
    torch.testing.assert_close(last, rlast)


# ---- the decoding step ----
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_steps_equal_the_sequence(dtype):
    """T wkv7_step calls from an initial state give wkv7's outputs and final state."""
    B, T, H, K, V = 2, 13, 3, 7, 5
    t = make_inputs(B, T, H, K, V, dtype)
    h0 = torch.randn(B, H, K, V, dtype=_acc(dtype))
    o, last = tritium.wkv7(*(t[n] for n in NAMES), initial_state=h0, output_final_state=True)
    state, ys = h0, []
    for i in range(T):
        y, state = tritium.wkv7_step(*(t[n][:, i] for n in NAMES), state)
        ys.append(y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(ys, 1), o, **tol)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_step_is_differentiable():
    """With gradients required the step runs the one-step sequence op: its gradients are the sequence's."""
    t = make_inputs(2, 1, 2, 4, 3, torch.float64)
    ins = [leaf(t[n][:, 0]) for n in NAMES] + [leaf(torch.randn(2, 2, 4, 3, dtype=torch.float64))]
    assert torch.autograd.gradcheck(lambda *a: tritium.wkv7_step(*a[:6], a[6], scale=0.5), ins)


# ---- bad input: a ValueError / TypeError naming the argument, what was expected and what came ----
def _bad_calls():
    t = make_inputs(2, 5, 3, 4, 6, torch.float32)
    r, w, k, v, a, b = (t[n] for n in NAMES)
    s = torch.zeros(2, 3, 4, 6)
    return [
        (lambda: tritium.wkv7(r[0], w, k, v, a, b), ValueError, "r must be (B, T, H, K)"),
        (lambda: tritium.wkv7(r, w[..., :3], k, v, a, b), ValueError, "w must be r's shape"),
        (lambda: tritium.wkv7(r, w, k, v, a, b[:, :4]), ValueError, "b must be r's shape"),
        (lambda: tritium.wkv7(r, w, k, v[:, :4], a, b), ValueError, "v must be (B, T, H, V)"),
        (lambda: tritium.wkv7(r, w, k.long(), v, a, b), TypeError, "k must be a floating point tensor"),
        (lambda: tritium.wkv7(r, w, k, v, a, "b"), TypeError, "b must be a tensor"),
        (lambda: tritium.wkv7(r, w, k, v, a, b, initial_state=s[:, :2]), ValueError,
         "initial_state must be (B, H, K, V) = (2, 3, 4, 6)"),
        (lambda: tritium.wkv7_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], s[..., :5]), ValueError,
         "state must be (B, H, K, V)"),
        (lambda: tritium.wkv7_step(r, w, k, v, a, b, s), ValueError, "r must be (B, H, K)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_named(case):
    call, exc, text = _bad_calls()[case]
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        call()


# ---- RWKV-6 ----
NAMES6 = ("r", "k", "v", "w")


def _inputs6(B, T, H, K, V, dtype, seed=0):
    """RWKV-6-like values: w = logsigmoid(.) (decays in (0, 1)), u the per-head bonus (H, K)."""
    t = make_inputs(B, T, H, K, V, torch.float64, seed)
    t["w"] = torch.nn.functional.logsigmoid(t["r"] - 2 + t["w"])
    t["u"] = torch.randn(H, K, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    return {n: x.to(dtype) for n, x in t.items()}


@pytest.mark.parametrize("has_h0", [False, True], ids=["zero-state", "h0"])
@pytest.mark.parametrize("shape", [(2, 7, 3, 16, 16), (1, 129, 2, 64, 64), (2, 33, 1, 7, 5)], ids=str)
def test_wkv6_matches_fla_naive_reference(shape, has_h0):
    """float32 output and final state within 2x the error of fla's naive_recurrent_rwkv6 (against float64); fla's
    reference takes (B, H, T, K)."""
    naive = need("fla.ops.rwkv6.recurrent_naive").naive_recurrent_rwkv6
    B, T, H, K, V = shape
    t = _inputs6(B, T, H, K, V, torch.float32)
    h0 = torch.randn(B, H, K, V) if has_h0 else None
    o, last = tritium.wkv6(*(t[n] for n in NAMES6), t["u"], initial_state=h0, output_final_state=True)
    r, k, v, w = (t[n].transpose(1, 2) for n in NAMES6)
    theirs, their_last = naive(r, k, v, w, t["u"], initial_state=h0, output_final_state=True)
    ref, ref_last = wkv6_reference(*(t[n].double() for n in NAMES6), t["u"].double(), None,
                                   None if h0 is None else h0.double(), True)
    assert_within_torch_error(o, theirs.transpose(1, 2), ref, "o")
    assert_within_torch_error(last, their_last, ref_last, "final state")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 7, 3, 5, 9), (1, 129, 2, 17, 16)], ids=str)
@pytest.mark.parametrize("has_h0", [False, True], ids=["zero-state", "h0"])
def test_wkv6_values_and_gradients(dtype, shape, has_h0):
    """o, the final state and the gradient of every input (u and the initial state too) within 2x the
    reference's own error in dtype (u and the state in float32 for 16-bit inputs, as the kernels take them)."""
    B, T, H, K, V = shape
    t = _inputs6(B, T, H, K, V, torch.float64)
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    res = {}
    for name, fn, d in (("ours", tritium.wkv6, dtype), ("torch", wkv6_reference, dtype),
                        ("ref", wkv6_reference, torch.float64)):
        ins = [leaf(t[n].to(dtype), d) for n in NAMES6] + [leaf(t["u"], _acc(d))]
        s0 = leaf(h0, _acc(d)) if has_h0 else None
        o, last = fn(*ins, scale=0.3, initial_state=s0, output_final_state=True)
        leaves = ins + ([s0] if has_h0 else [])
        gs = torch.autograd.grad((o, last), leaves, (do.to(o.dtype), dht.to(last.dtype)))
        res[name] = (o, last, gs)
    for i, what in enumerate(["o", "final state"]):
        assert_within_torch_error(res["ours"][i].detach(), res["torch"][i].detach(), res["ref"][i].detach(), what,
                                  compute_dtype=dtype)
    for name, a, b, c in zip(list(NAMES6) + ["u", "initial_state"], res["ours"][2], res["torch"][2], res["ref"][2]):
        assert_within_torch_error(a, b, c, f"grad {name}")


def test_wkv6_gradcheck_and_compile():
    t = _inputs6(2, 6, 2, 3, 4, torch.float64)
    ins = [leaf(t[n]) for n in NAMES6] + [leaf(t["u"]), leaf(torch.randn(2, 2, 3, 4, dtype=torch.float64))]

    def fn(r, k, v, w, u, h0):
        return tritium.wkv6(r, k, v, w, u, scale=0.7, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(fn, ins)
    f32 = [leaf(x.float()) for x in ins]
    out, last = torch.compile(fn, fullgraph=True)(*f32)
    eager, eager_last = fn(*f32)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(last, eager_last)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_wkv6_steps_equal_the_sequence(dtype):
    B, T, H, K, V = 2, 13, 3, 7, 5
    t = _inputs6(B, T, H, K, V, dtype)
    u = t["u"].to(_acc(dtype))
    h0 = torch.randn(B, H, K, V, dtype=_acc(dtype))
    o, last = tritium.wkv6(*(t[n] for n in NAMES6), u, initial_state=h0, output_final_state=True)
    state, ys = h0, []
    for i in range(T):
        y, state = tritium.wkv6_step(*(t[n][:, i] for n in NAMES6), u, state)
        ys.append(y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(ys, 1), o, **tol)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def _bad_calls6():
    t = _inputs6(2, 5, 3, 4, 6, torch.float32)
    r, k, v, w, u = (t[n] for n in ("r", "k", "v", "w", "u"))
    return [
        (lambda: tritium.wkv6(r, k, v, w, u[:, :3]), ValueError, "u must be (H, K) = (3, 4)"),
        (lambda: tritium.wkv6(r, k, v, w[:, :2], u), ValueError, "w must be r's shape"),
        (lambda: tritium.wkv6(r, k, v, w, u.long()), TypeError, "u must be a floating point tensor"),
        (lambda: tritium.wkv6_step(r[:, 0], k[:, 0], v[:, 0], w[:, 0], u, torch.zeros(2, 3, 4)), ValueError,
         "state must be (B, H, K, V)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls6())))
def test_wkv6_bad_input_is_named(case):
    call, exc, text = _bad_calls6()[case]
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        call()
