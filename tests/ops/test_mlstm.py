"""tritium.mlstm / mlstm_step (xLSTM's matrix-memory cell): the chunkwise kernels against the float64 recurrence
(tritium.ops.mlstm.mlstm_reference) for values and every gradient, the decoding step against the sequence, gradcheck,
torch.compile, bad input."""
import pytest
import torch

import tritium
from tritium.ops.mlstm import mlstm_reference
from tests.util import CPU_DTYPES, assert_within_torch_error, leaf

NAMES = ("q", "k", "v", "i", "f")


def make_inputs(B, H, T, DK, DV, dtype, seed=0):
    """q, k, v unit normals; input gate preactivations spread wide (2 N(0, 1): exp(i) spans several orders, the
    stabiliser matters); forget preactivations around +1.5 (sigmoid ~0.8, xLSTM's initial forget bias range)."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    t = dict(q=rn(B, H, T, DK), k=rn(B, H, T, DK), v=rn(B, H, T, DV), i=2 * rn(B, H, T), f=1.5 + rn(B, H, T))
    return {n: x.to(dtype) for n, x in t.items()}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state(B, H, DK, DV, gen, dtype):
    return (torch.randn(B, H, DK, DV, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(B, H, DK, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 7, 5, 9), (1, 2, 129, 17, 16)], ids=str)
@pytest.mark.parametrize("has_h0", [False, True], ids=["zero-state", "h0"])
def test_values_and_gradients(dtype, shape, has_h0):
    """h, the final state and the gradient of every input (the initial state's C and n too, through the final state
    as well) within 2x the reference's own error in dtype."""
    B, H, T, DK, DV = shape
    t = make_inputs(B, H, T, DK, DV, dtype)
    gen = torch.Generator().manual_seed(1)
    h0 = _state(B, H, DK, DV, gen, torch.float64)
    # the output's gradient rounded to dtype first (tests/util.torch_and_ref's rule: the float64 reference sees what
    # the dtype runs see, so their error is their own and not dh's rounding)
    dh = torch.randn(B, H, T, DV, generator=gen, dtype=torch.float64).to(dtype).double()
    dC = torch.randn(B, H, DK, DV, generator=gen, dtype=torch.float64)
    dn = torch.randn(B, H, DK, generator=gen, dtype=torch.float64)
    res = {}
    for name, fn, d in (("ours", tritium.mlstm, dtype), ("torch", mlstm_reference, dtype),
                        ("ref", mlstm_reference, torch.float64)):
        ins = [leaf(t[n], d) for n in NAMES]
        s0 = (leaf(h0[0], _acc(d)), leaf(h0[1], _acc(d)), h0[2].to(_acc(d))) if has_h0 else None
        h, (C, n, m) = fn(*ins, scale=0.3, initial_state=s0, output_final_state=True)
        leaves = ins + (list(s0[:2]) if has_h0 else [])
        gs = torch.autograd.grad((h, C, n), leaves, (dh.to(h.dtype), dC.to(C.dtype), dn.to(n.dtype)))
        res[name] = ((h, C, n, m), gs)
    for j, what in enumerate(["h", "final C", "final n", "final m"]):
        assert_within_torch_error(res["ours"][0][j].detach(), res["torch"][0][j].detach(),
                                  res["ref"][0][j].detach(), what, compute_dtype=dtype)
    for name, a, b, c in zip(list(NAMES) + ["C0", "n0"], res["ours"][1], res["torch"][1], res["ref"][1]):
        assert_within_torch_error(a, b, c, f"grad {name}")


def test_several_chunks_and_large_gates():
    """T = 1000 (16 chunks) with input gates up to ~20 (exp(i) far past float32's exponent range without the
    stabiliser): float32 against the float64 recurrence."""
    t = make_inputs(1, 2, 1000, 8, 8, torch.float64, seed=3)
    t["i"] = t["i"] * 5
    ins = [leaf(t[n].float()) for n in NAMES]
    h, _ = tritium.mlstm(*ins)
    h.square().sum().backward()
    ref_ins = [leaf(t[n].float().double()) for n in NAMES]
    r, _ = mlstm_reference(*ref_ins)
    r.square().sum().backward()
    torch.testing.assert_close(h.double(), r, rtol=1e-4, atol=1e-4)
    for a, b, name in zip(ins, ref_ins, NAMES):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-3, atol=2e-3, msg=f"grad {name}")


def test_gradcheck_float64():
    """Against finite differences: h, and the final state unstabilised (exp(m) C, exp(m) n: the stabilised C and n
    move with m, which takes no gradient by the op's convention; their product with exp(m) does not)."""
    t = make_inputs(2, 2, 6, 3, 4, torch.float64)
    gen = torch.Generator().manual_seed(2)
    C0, n0, m0 = _state(2, 2, 3, 4, gen, torch.float64)
    ins = [leaf(t[n]) for n in NAMES] + [leaf(C0), leaf(n0)]

    def fn(q, k, v, i, f, C, n):
        h, (C1, n1, m1) = tritium.mlstm(q, k, v, i, f, scale=0.7, initial_state=(C, n, m0), output_final_state=True)
        return h, C1 * m1.exp()[..., None, None], n1 * m1.exp()[..., None]

    assert torch.autograd.gradcheck(fn, ins)


def test_torch_compile_fullgraph():
    t = make_inputs(2, 2, 20, 8, 6, torch.float32)
    ins = [leaf(t[n]) for n in NAMES]

    def fn(q, k, v, i, f):
        h, (C, n, m) = tritium.mlstm(q, k, v, i, f, output_final_state=True)
        return h, C

    out, last = torch.compile(fn, fullgraph=True)(*ins)
    eager, eager_last = fn(*ins)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(last, eager_last)
    g1 = torch.autograd.grad(out.sum() + last.sum(), ins)
    g2 = torch.autograd.grad(eager.sum() + eager_last.sum(), ins)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_reference_backend(reference_backend):
    t = make_inputs(2, 2, 9, 5, 3, torch.float32)
    h, last = tritium.mlstm(*(t[n] for n in NAMES), output_final_state=True)
    rh, rlast = mlstm_reference(*(t[n] for n in NAMES), 5 ** -0.5, 1e-6, None, True)
    torch.testing.assert_close(h, rh)
    for a, b in zip(last, rlast):
        torch.testing.assert_close(a, b)


def test_strided_inputs():
    """q, k, v as head views of (B, T, H * D) projections (xLSTM's block layout: non-contiguous)."""
    B, T, H, D = 2, 11, 3, 4
    x = torch.randn(B, T, 3 * H * D + 2 * H)
    q, k, v = (x[..., j * H * D:(j + 1) * H * D].view(B, T, H, D).transpose(1, 2) for j in range(3))
    i, f = (x[..., 3 * H * D + j * H:3 * H * D + (j + 1) * H].transpose(1, 2) for j in range(2))
    h, _ = tritium.mlstm(q, k, v, i, f)
    ref, _ = mlstm_reference(*(y.double() for y in (q, k, v, i, f)))
    theirs, _ = mlstm_reference(q, k, v, i, f)
    assert_within_torch_error(h, theirs, ref, "h")


# ---- the decoding step ----
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_steps_equal_the_sequence(dtype):
    """T mlstm_step calls from an initial state give mlstm's outputs and final state (chunkwise == step by step)."""
    B, H, T, DK, DV = 2, 3, 77, 7, 5
    t = make_inputs(B, H, T, DK, DV, dtype)
    h0 = _state(B, H, DK, DV, torch.Generator().manual_seed(5), _acc(dtype))
    h, last = tritium.mlstm(*(t[n] for n in NAMES), initial_state=h0, output_final_state=True)
    state, ys = h0, []
    for j in range(T):
        y, state = tritium.mlstm_step(*(t[n][:, :, j] for n in NAMES), state)
        ys.append(y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(ys, 2), h, **tol)
    for a, b in zip(state, last):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_step_from_zero_state_and_differentiable():
    t = make_inputs(2, 2, 1, 4, 3, torch.float64)
    y, (C, n, m) = tritium.mlstm_step(*(t[x][:, :, 0] for x in NAMES))
    ref, (rC, rn, rm) = mlstm_reference(*(t[x] for x in NAMES), output_final_state=True)
    torch.testing.assert_close(y, ref[:, :, 0])
    torch.testing.assert_close(C, rC)
    ins = [leaf(t[x][:, :, 0]) for x in NAMES]
    assert torch.autograd.gradcheck(lambda *a: tritium.mlstm_step(*a, scale=0.5)[0], ins)


# ---- bad input: a ValueError / TypeError naming the argument, what was expected and what came ----
def _bad_calls():
    t = make_inputs(2, 3, 5, 4, 6, torch.float32)
    q, k, v, i, f = (t[n] for n in NAMES)
    s = (torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 4), torch.zeros(2, 3))
    return [
        (lambda: tritium.mlstm(q[0], k, v, i, f), ValueError, "q must be (B, H, T, DK)"),
        (lambda: tritium.mlstm(q, k[..., :3], v, i, f), ValueError, "k must be q's shape"),
        (lambda: tritium.mlstm(q, k, v[:, :, :4], i, f), ValueError, "v must be (B, H, T, DV)"),
        (lambda: tritium.mlstm(q, k, v, i[..., :4], f), ValueError, "i must be (2, 3, 5)"),
        (lambda: tritium.mlstm(q, k, v, i, f[None]), ValueError, "f must be (2, 3, 5)"),
        (lambda: tritium.mlstm(q, k.long(), v, i, f), TypeError, "k must be a floating point tensor"),
        (lambda: tritium.mlstm(q, k, v, i, "f"), TypeError, "f must be a tensor"),
        (lambda: tritium.mlstm(q, k, v, i, f, initial_state=s[:2]), TypeError, "initial_state must be a tuple"),
        (lambda: tritium.mlstm(q, k, v, i, f, initial_state=(s[0][:, :2], s[1], s[2])), ValueError,
         "initial_state's C must be (2, 3, 4, 6)"),
        (lambda: tritium.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], (s[0], s[1], s[2][0])),
         ValueError, "state's m must be (2, 3)"),
        (lambda: tritium.mlstm_step(q, k, v, i, f, s), ValueError, "q must be (B, H, DK)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_named(case):
    call, exc, text = _bad_calls()[case]
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        call()
