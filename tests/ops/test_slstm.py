"""tritium.slstm / slstm_step (xLSTM's scalar-memory cell): the fused C++ scan against the float64 recurrence
(tritium.ops.slstm.slstm_reference) for values and every gradient, the decoding step against the sequence,
gradcheck, torch.compile, opcheck's schemas (tests/ops/test_opcheck.py), bad input."""
import pytest
import torch

import tritium
from tritium.ops.slstm import slstm_reference
from tests.util import CPU_DTYPES, assert_within_torch_error, leaf


def make_inputs(B, T, H, Dh, dtype, seed=0):
    """wx: input gates N(0, 2^2) (the stabiliser matters), forget gates around +1.5, z and o unit normals; R with
    entries N(0, 1 / Dh) (a recurrence of unit gain)."""
    gen = torch.Generator().manual_seed(seed)
    D = H * Dh
    wx = torch.randn(B, T, 4, D, generator=gen, dtype=torch.float64)
    wx[:, :, 0] *= 2
    wx[:, :, 1] += 1.5
    R = torch.randn(4, H, Dh, Dh, generator=gen, dtype=torch.float64) / Dh ** 0.5
    return wx.reshape(B, T, 4 * D).to(dtype), R


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 3, 5), (1, 129, 2, 17), (2, 9, 2, 64), (1, 5, 1, 33),
                                   (1, 3, 1, 130)], ids=str)
@pytest.mark.parametrize("has_h0", [False, True], ids=["zero-state", "h0"])
def test_values_and_gradients(dtype, shape, has_h0):
    """h, the final state and the gradient of wx, R and the initial state's h, c, n (through the outputs and the
    final state) within 2x the reference's own error in dtype (R and the state float32 for 16-bit inputs). Head
    sizes: one vector or less, a partial last vector (5, 17, 33), whole vectors (64: the register-blocked products
    at the widest), and 130 (past the registers: the products' memory-accumulator path)."""
    B, T, H, Dh = shape
    D = H * Dh
    wx, R = make_inputs(B, T, H, Dh, dtype)
    gen = torch.Generator().manual_seed(1)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    h0 = (rn(B, D), rn(B, D), 1 + rn(B, D).abs(), rn(B, D))
    dy, dT = rn(B, T, D).to(dtype).double(), (rn(B, D), rn(B, D), rn(B, D))   # dy rounded as the dtype runs see it
    res = {}
    for name, fn, d in (("ours", tritium.slstm, dtype), ("torch", slstm_reference, dtype),
                        ("ref", slstm_reference, torch.float64)):
        ins = [leaf(wx, d), leaf(R, _acc(d))]
        s0 = (*(leaf(x, _acc(d)) for x in h0[:3]), h0[3].to(_acc(d))) if has_h0 else None
        y, last = fn(*ins, initial_state=s0, output_final_state=True)
        leaves = ins + (list(s0[:3]) if has_h0 else [])
        gs = torch.autograd.grad((y, *last[:3]), leaves, (dy.to(y.dtype), *(x.to(last[0].dtype) for x in dT)))
        res[name] = ((y, *last), gs)
    for j, what in enumerate(["h", "final h", "final c", "final n", "final m"]):
        assert_within_torch_error(res["ours"][0][j].detach(), res["torch"][0][j].detach(),
                                  res["ref"][0][j].detach(), what, compute_dtype=dtype)
    for name, a, b, c in zip(["wx", "R", "h0", "c0", "n0"], res["ours"][1], res["torch"][1], res["ref"][1]):
        assert_within_torch_error(a, b, c, f"grad {name}")


def test_gradcheck_float64():
    wx, R = make_inputs(2, 5, 2, 3, torch.float64)
    gen = torch.Generator().manual_seed(2)
    h0 = [torch.randn(2, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    h0[2] = h0[2].abs() + 1
    m0 = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    ins = [leaf(wx), leaf(R)] + [leaf(x) for x in h0]

    def fn(wx, R, h, c, n):
        """h, and the final c and n unstabilised (exp(m) c, exp(m) n: the stabilised ones move with m, which takes
        no gradient by the op's convention)."""
        y, (hT, cT, nT, mT) = tritium.slstm(wx, R, initial_state=(h, c, n, m0), output_final_state=True)
        return y, hT, cT * mT.exp(), nT * mT.exp()

    assert torch.autograd.gradcheck(fn, ins)


def test_torch_compile_fullgraph():
    wx, R = make_inputs(2, 9, 2, 4, torch.float32)
    ins = [leaf(wx), leaf(R.float())]

    def fn(wx, R):
        return tritium.slstm(wx, R)[0]

    out = torch.compile(fn, fullgraph=True)(*ins)
    eager = fn(*ins)
    torch.testing.assert_close(out, eager)
    for a, b in zip(torch.autograd.grad(out.sum(), ins), torch.autograd.grad(eager.sum(), ins)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_steps_equal_the_sequence(dtype):
    B, T, H, Dh = 2, 11, 3, 5
    wx, R = make_inputs(B, T, H, Dh, dtype)
    R = R.to(_acc(dtype))
    y, last = tritium.slstm(wx, R, output_final_state=True)
    state, ys = None, []
    for t in range(T):
        h, state = tritium.slstm_step(wx[:, t], R, state)
        ys.append(h)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=0)
    for a, b in zip(state, last):
        torch.testing.assert_close(a, b)


def test_reference_backend(reference_backend):
    wx, R = make_inputs(2, 6, 2, 3, torch.float32)
    y, _ = tritium.slstm(wx, R.float())
    torch.testing.assert_close(y, slstm_reference(wx, R.float())[0])


def _bad_calls():
    wx, R = make_inputs(2, 5, 3, 4, torch.float32)
    s = tuple(torch.zeros(2, 12) for _ in range(4))
    return [
        (lambda: tritium.slstm(wx, R[:, :2]), ValueError, "wx must be (B, T, 4 H Dh) = (B, T, 32)"),
        (lambda: tritium.slstm(wx, R[..., :3]), ValueError, "R must be (4, H, Dh, Dh)"),
        (lambda: tritium.slstm(wx.long(), R), TypeError, "wx must be a floating point tensor"),
        (lambda: tritium.slstm(wx, "R"), TypeError, "R must be a tensor"),
        (lambda: tritium.slstm(wx, R, initial_state=s[:3]), TypeError, "initial_state must be a tuple (h, c, n, m)"),
        (lambda: tritium.slstm(wx, R, initial_state=(s[0], s[1][:, :5], s[2], s[3])), ValueError,
         "initial_state's c must be (B, D) = (2, 12)"),
        (lambda: tritium.slstm_step(wx, R), ValueError, "wx must be (B, 4 D)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_named(case):
    call, exc, text = _bad_calls()[case]
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        call()
