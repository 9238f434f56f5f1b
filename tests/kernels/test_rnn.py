"""Fused LSTM / GRU cell kernels, Triton (interpreter) and C++, against the cell written in torch ops."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import rnn
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_rnn = on_device(rnn)

cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_rnn)
HIDDEN = (1, 7, 123, 781)
B = 3


def _lstm_cell(gates, c):
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cn = f * c + i * g
    return o * cn.tanh(), cn


def _gru_cell(xg, hg, h):
    xr, xz, xn = xg.chunk(3, 1)
    hr, hz, hn = hg.chunk(3, 1)
    r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return (1 - z) * n + z * h


def _torch_and_ref(fn, args, grad_outs, dtype):
    """fn's outputs and input gradients in dtype (torch's own error) and in float64 (the reference)."""
    res = {}
    for d in (dtype, torch.float64):
        ins = [leaf(a, d) for a in args]
        outs = fn(*ins)
        gs = torch.autograd.grad(outs, ins, [g.to(d) for g in grad_outs])
        res[d] = ([o.detach() for o in outs], gs)
    return res[dtype], res[torch.float64]


def _strided(t):
    """The same values as a view with a row stride wider than the row (a slice of a bigger buffer)."""
    buf = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
    buf[:, :t.shape[1]] = t
    return buf[:, :t.shape[1]]


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("H", HIDDEN)
def test_lstm_cell(impl_name, impl, dtype, H):
    gates = (torch.randn(B, 4 * H, dtype=torch.float64) * 2).to(dtype)
    c = torch.randn(B, H, dtype=torch.float64).to(dtype)
    dh, dc = (torch.randn(B, H, dtype=torch.float64).to(dtype) for _ in range(2))
    h, cn, act = impl.lstm_cell_fwd(_strided(gates), c)
    dgates, dc_prev = impl.lstm_cell_bwd(dh, dc, act, cn, c)
    (t_out, t_g), (r_out, r_g) = _torch_and_ref(_lstm_cell, [gates, c], [dh, dc], dtype)
    assert_within_torch_error(h, t_out[0], r_out[0], "h")
    assert_within_torch_error(cn, t_out[1], r_out[1], "c_new")
    assert_within_torch_error(dgates, t_g[0], r_g[0], "dgates")
    assert_within_torch_error(dc_prev, t_g[1], r_g[1], "dc_prev")
    # the saved activations (i, f, g, o): within 2x the error of torch's own sigmoid/tanh in dtype
    def acts(g):
        i, f, gg, o = g.chunk(4, 1)
        return torch.cat([i.sigmoid(), f.sigmoid(), gg.tanh(), o.sigmoid()], 1)

    assert_within_torch_error(act, acts(gates), acts(gates.double()), "activations")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("H", HIDDEN)
def test_gru_cell(impl_name, impl, dtype, H):
    xg = (torch.randn(B, 3 * H, dtype=torch.float64) * 2).to(dtype)
    hg = (torch.randn(B, 3 * H, dtype=torch.float64) * 2).to(dtype)
    h = torch.randn(B, H, dtype=torch.float64).to(dtype)
    dh = torch.randn(B, H, dtype=torch.float64).to(dtype)
    hn, saved = impl.gru_cell_fwd(_strided(xg), _strided(hg), h)
    dxg, dhg, dh_direct = impl.gru_cell_bwd(dh, saved, h)
    (t_out, t_g), (r_out, r_g) = _torch_and_ref(lambda a, b, c: (_gru_cell(a, b, c),), [xg, hg, h], [dh], dtype)
    assert_within_torch_error(hn, t_out[0], r_out[0], "h_new")
    assert_within_torch_error(dxg, t_g[0], r_g[0], "dxg")
    assert_within_torch_error(dhg, t_g[1], r_g[1], "dhg")
    assert_within_torch_error(dh_direct, t_g[2], r_g[2], "dh_direct")


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_rnn), ("cpp", cpp)])
def test_extreme_preactivations(impl_name, impl):
    """Saturated gates (|x| up to 1e4, where exp overflows) give exact 0/1/-1 activations, never NaN."""
    H = 5
    gates = torch.tensor([[-1e4, 1e4, -100.0, 100.0, 0.0]] * 4).reshape(1, 4 * H)
    c = torch.ones(1, H)
    h, cn, act = impl.lstm_cell_fwd(gates, c)
    ref_h, ref_c = _lstm_cell(gates, c)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(cn, ref_c)
    assert torch.isfinite(act).all()


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every cell kernel configuration the launchers pick compiles for sm_80/90."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for H in (123, 2048):
                gates, c = torch.randn(2, 4 * H, dtype=dtype), torch.randn(2, H, dtype=dtype)
                h, cn, act = triton_rnn.lstm_cell_fwd(gates, c)
                triton_rnn.lstm_cell_bwd(h, c, act, cn, c)
                hn, saved = triton_rnn.gru_cell_fwd(gates[:, :3 * H], gates[:, H:], c)
                triton_rnn.gru_cell_bwd(hn, saved, c)
                for relu in (False, True):   # the Elman scan's two kernels, over two steps
                    w = torch.randn(H, H, dtype=dtype)
                    hs = triton_rnn.rnn_scan_fwd(torch.randn(2, 2, H, dtype=dtype), w, c, False, relu)
                    triton_rnn.rnn_scan_bwd(hs, w, c, hs, False, relu)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_lstm_fwd_kernel", "_lstm_bwd_kernel", "_gru_fwd_kernel", "_gru_bwd_kernel",
                                        "_rnn_act_kernel", "_rnn_bwd_kernel"}
