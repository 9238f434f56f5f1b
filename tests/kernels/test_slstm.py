"""The sLSTM kernels (forward, backward, decoding step), Triton (interpreter) and C++, against
tritium.ops.slstm.slstm_reference in float64 (every output and every gradient)."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import slstm
from tritium.ops.slstm import slstm_reference
from tests.ops.test_slstm import make_inputs
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_slstm = on_device(slstm)
CASES, IDS = impl_cases(triton_slstm)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference(wx, R, h0, dy, dT, dtype):
    """(y, final (h, c, n, m), grads (wx, R[, h0, c0, n0])) of the reference in dtype (torch's own error; R and the
    state in the accumulation dtype, as the kernels take them) and in float64 on the same values."""
    res = {}
    for run in (dtype, torch.float64):
        ins = [leaf(wx, run), leaf(R, _acc(run))]
        s0 = None if h0 is None else (*(leaf(x, _acc(run)) for x in h0[:3]), h0[3].to(_acc(run)))
        y, last = slstm_reference(*ins, s0, True)
        leaves = ins + ([] if s0 is None else list(s0[:3]))
        outs, gouts = [y], [dy.to(y.dtype)]
        if dT is not None:
            outs += list(last[:3])
            gouts += [x.to(last[0].dtype) for x in dT]
        gs = torch.autograd.grad(outs, leaves, gouts)
        res[run] = (y.detach(), [x.detach() for x in last], gs)
    return res[dtype], res[torch.float64]


# (B, T, H, Dh, initial state, final-state gradient); the interpreter runs one program per (batch, head)
SHAPES = [
    (2, 1, 3, 5, True, False),      # one step, odd head size
    (1, 7, 2, 3, False, True),      # the default state
    (2, 7, 1, 1, True, True),       # Dh = 1
    (1, 129, 2, 17, True, True),    # long, a head size just past a power of two
    (1, 9, 2, 64, True, True),      # xLSTM-size heads
]
SHAPE_IDS = [f"B{s[0]}-T{s[1]}-H{s[2]}-Dh{s[3]}" + ("-h0" if s[4] else "") + ("-dT" if s[5] else "") for s in SHAPES]
# the long sequence runs under the (slow) interpreter in float32 only
SLSTM_CASES = [pytest.param(*case, shape, id=f"{sid}-{cid}") for shape, sid in zip(SHAPES, SHAPE_IDS)
               for case, cid in zip(CASES, IDS) if not (case[0] == "triton" and shape[1] > 100
                                                        and case[2] != torch.float32)]


@pytest.mark.parametrize("impl_name,impl,dtype,shape", SLSTM_CASES)
def test_slstm(impl_name, impl, dtype, shape):
    B, T, H, Dh, has_h0, has_dT = shape
    D, acc = H * Dh, _acc(dtype)
    wx, R = make_inputs(B, T, H, Dh, dtype)
    gen = torch.Generator().manual_seed(1)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    h0 = (rn(B, D), rn(B, D), 1 + rn(B, D).abs(), rn(B, D)) if has_h0 else None
    dy = rn(B, T, D).to(dtype)
    dT = (rn(B, D), rn(B, D), rn(B, D)) if has_dT else None
    init = [None] * 4 if h0 is None else [x.to(acc) for x in h0]
    Ra = R.to(acc)
    y, states, gates = impl.slstm_fwd(wx, Ra, *init)
    assert states.shape == (B, T, 4, D) and gates.shape == (B, T, 5, D)
    dwx, dR, dh0, dc0, dn0 = impl.slstm_bwd(dy, wx, Ra, *init, states, gates,
                                            *([None] * 3 if dT is None else [x.to(acc) for x in dT]))
    (t_y, t_last, t_g), (r_y, r_last, r_g) = _reference(wx, R, h0, dy, dT, dtype)
    assert_within_torch_error(y, t_y, r_y, "y")
    for j, what in enumerate("hcnm"):
        assert_within_torch_error(states[:, -1, j], t_last[j], r_last[j], f"final {what}", compute_dtype=dtype)
    names = ["wx", "R"] + (["h0", "c0", "n0"] if has_h0 else [])
    for name, g, tg, rg in zip(names, (dwx, dR, dh0, dc0, dn0), t_g, r_g):
        assert_within_torch_error(g, tg, rg, f"d{name}", compute_dtype=dtype)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_steps_equal_the_sequence(impl_name, impl, dtype):
    B, T, H, Dh = 2, 9, 2, 5
    acc = _acc(dtype)
    wx, R = make_inputs(B, T, H, Dh, dtype)
    R = R.to(acc)
    gen = torch.Generator().manual_seed(4)
    state = [torch.randn(B, H * Dh, generator=gen).to(acc) for _ in range(4)]
    state[2] = state[2].abs() + 1
    y, states, _ = impl.slstm_fwd(wx, R, *state)
    ys = []
    for t in range(T):
        if impl_name == "triton":
            out, *state = impl.slstm_step(wx[:, t].contiguous(), R, *state)
        else:  # the C++ step is the scan on a one-step sequence
            out, st, _ = impl.slstm_fwd(wx[:, t:t + 1].contiguous(), R, *state)
            out, state = out[:, 0], [st[:, 0, j].contiguous() for j in range(4)]
        ys.append(out)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=0)
    for j in range(4):
        torch.testing.assert_close(state[j], states[:, -1, j], rtol=0, atol=0)


def test_empty_batch():
    """No program to launch: the Triton launchers return empty outputs and a zero dR (no step contributes)."""
    wx, R = torch.zeros(0, 3, 4 * 2 * 5), torch.randn(4, 2, 5, 5)
    y, states, gates = triton_slstm.slstm_fwd(wx, R, None, None, None, None)
    assert y.shape == (0, 3, 10) and states.shape == (0, 3, 4, 10) and gates.shape == (0, 3, 5, 10)
    dwx, dR, dh0, dc0, dn0 = triton_slstm.slstm_bwd(y, wx, R, None, None, None, None, states, gates, None, None, None)
    assert dwx.shape == wx.shape and dh0.shape == dc0.shape == dn0.shape == (0, 10)
    torch.testing.assert_close(dR, torch.zeros_like(R), rtol=0, atol=0)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """The forward, backward and step compile for sm_80/90 without spills at xLSTM's head sizes and an odd one,
    with and without the initial state and the final state's gradient, in float32 and bfloat16."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for Dh, on in ((64, True), (64, False), (128, True), (17, True)):
                B, T, H = 1, 5, 2
                wx = torch.randn(B, T, 4 * H * Dh, dtype=dtype)
                R = torch.randn(4, H, Dh, Dh)
                s = [torch.zeros(B, H * Dh) for _ in range(4)]
                init = s if on else [None] * 4
                y, states, gates = triton_slstm.slstm_fwd(wx, R, *init)
                triton_slstm.slstm_bwd(y, wx, R, *init, states, gates, *(s[:3] if on else [None] * 3))
                triton_slstm.slstm_step(wx[:, 0].contiguous(), R, *s)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_slstm_fwd_kernel", "_slstm_bwd_kernel"}
