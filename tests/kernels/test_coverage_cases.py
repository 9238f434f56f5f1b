"""Cases that execute the kernels/ lines and kernel branches the other kernel tests leave unexecuted (listed by
tools/kernel_coverage.py): the LSTM / GRU scans through time (the GRU backward's HAS_EXTRA branch), kl_div's
backward for the target alone, PReLU's backward without dW, batch_norm_act's backward without dz (no residual, no
affine gradients), and the empty-batch returns of the paged-attention and sampling launchers."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.ops.activations import ACT_NAMES
from tritium.kernels import activations, kl_div, paged, rnn, sampling
from tests.util import KERNEL_DTYPES, assert_within_torch_error, leaf, on_device, torch_and_ref

t_rnn, t_act, t_kl, t_paged, t_sampling = (on_device(m) for m in (rnn, activations, kl_div, paged, sampling))
DTYPE_IDS = [str(d)[6:] for d in KERNEL_DTYPES]
T, B, H = 4, 3, 7  # four steps: every step after the first reads the previous step's state (and, in backward, its
#                    output gradient: the GRU kernel's HAS_EXTRA path)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _order(reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _lstm_scan(xproj, w_hh, h0, c0, reverse):
    """hs (T, B, H) and the last processed step's c: the scan written in torch ops (one addmm + the cell)."""
    hs = [None] * T
    h, c = h0, c0
    for t in _order(reverse):
        i, f, g, o = torch.addmm(xproj[t], h, w_hh.t()).chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        hs[t] = h
    return torch.stack(hs), c


def _gru_scan(xproj, w_hh, b_hh, h0, reverse):
    """hs (T, B, H) and each step's hg = h_prev W_hh^T + b_hh (whose gradients the kernel returns as dq)."""
    hs, hgs = [None] * T, [None] * T
    h = h0
    for t in _order(reverse):
        hg = torch.addmm(b_hh, h, w_hh.t())
        xr, xz, xn = xproj[t].chunk(3, 1)
        hr, hz, hn = hg.chunk(3, 1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        h = (1 - z) * (xn + r * hn).tanh() + z * h
        hs[t], hgs[t] = h, hg
    return torch.stack(hs), hgs


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
def test_lstm_scan(dtype, reverse):
    xproj, w_hh = _rand(T, B, 4 * H, dtype=dtype, scale=2.0), _rand(4 * H, H, dtype=dtype, scale=0.5)
    h0, c0 = _rand(B, H, dtype=dtype), _rand(B, H, dtype=dtype)
    dhs, dcT = _rand(T, B, H, dtype=dtype), _rand(B, H, dtype=dtype)
    hs, cs, acts = t_rnn.lstm_scan_fwd(xproj, w_hh, h0, c0, reverse)
    dgates, dh0, dc0 = t_rnn.lstm_scan_bwd(dhs, dcT, w_hh, h0, c0, cs, acts, reverse)
    res = {}
    for d in (dtype, torch.float64):
        ins = [leaf(a, d) for a in (xproj, w_hh, h0, c0)]
        out, c_last = _lstm_scan(*ins, reverse)
        gs = torch.autograd.grad((out, c_last), [ins[0], ins[2], ins[3]], (dhs.to(d), dcT.to(d)))
        res[d] = (out.detach(), c_last.detach(), gs)
    (t_hs, t_c, t_g), (r_hs, r_c, r_g) = res[dtype], res[torch.float64]
    assert_within_torch_error(hs, t_hs, r_hs, "hs")
    assert_within_torch_error(cs[0 if reverse else -1], t_c, r_c, "c_T")
    assert_within_torch_error(dgates, t_g[0], r_g[0], "dgates")
    assert_within_torch_error(dh0, t_g[1], r_g[1], "dh0")
    assert_within_torch_error(dc0, t_g[2], r_g[2], "dc0")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
def test_gru_scan(dtype, reverse):
    xproj, w_hh = _rand(T, B, 3 * H, dtype=dtype, scale=2.0), _rand(3 * H, H, dtype=dtype, scale=0.5)
    b_hh, h0, dhs = _rand(3 * H, dtype=dtype), _rand(B, H, dtype=dtype), _rand(T, B, H, dtype=dtype)
    hs, saved = t_rnn.gru_scan_fwd(xproj, w_hh, b_hh, h0, reverse)
    dx, dq, dh0 = t_rnn.gru_scan_bwd(dhs, w_hh, h0, hs, saved, reverse)
    res = {}
    for d in (dtype, torch.float64):
        ins = [leaf(a, d) for a in (xproj, w_hh, b_hh, h0)]
        out, hgs = _gru_scan(*ins, reverse)
        gs = torch.autograd.grad(out, [ins[0], ins[3], *hgs], dhs.to(d))
        res[d] = (out.detach(), gs[0], gs[1], torch.stack(gs[2:]))
    (t_hs, t_dx, t_dh0, t_dq), (r_hs, r_dx, r_dh0, r_dq) = res[dtype], res[torch.float64]
    assert_within_torch_error(hs, t_hs, r_hs, "hs")
    assert_within_torch_error(dx, t_dx, r_dx, "dx")
    assert_within_torch_error(dq, t_dq, r_dq, "dq")
    assert_within_torch_error(dh0, t_dh0, r_dh0, "dh0")


def _rnn_scan(xproj, w_hh, h0, reverse, relu):
    """hs (T, B, H): the Elman scan written in torch ops (one addmm + the activation per step)."""
    hs = [None] * T
    h = h0
    for t in _order(reverse):
        p = torch.addmm(xproj[t], h, w_hh.t())
        h = p.relu() if relu else p.tanh()
        hs[t] = h
    return torch.stack(hs)


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
def test_rnn_scan(dtype, reverse, relu):
    xproj, w_hh = _rand(T, B, H, dtype=dtype, scale=2.0), _rand(H, H, dtype=dtype, scale=0.5)
    h0, dhs = _rand(B, H, dtype=dtype), _rand(T, B, H, dtype=dtype)
    hs = t_rnn.rnn_scan_fwd(xproj, w_hh, h0, reverse, relu)
    dpre, dh0 = t_rnn.rnn_scan_bwd(dhs, w_hh, h0, hs, reverse, relu)
    res = {}
    for d in (dtype, torch.float64):
        ins = [leaf(a, d) for a in (xproj, w_hh, h0)]
        out = _rnn_scan(*ins, reverse, relu)
        gs = torch.autograd.grad(out, [ins[0], ins[2]], dhs.to(d))
        res[d] = (out.detach(), gs)
    (t_hs, t_g), (r_hs, r_g) = res[dtype], res[torch.float64]
    assert_within_torch_error(hs, t_hs, r_hs, "hs")
    assert_within_torch_error(dpre, t_g[0], r_g[0], "dpre")
    assert_within_torch_error(dh0, t_g[1], r_g[1], "dh0")


def test_gru_scan_without_bias():
    """b_hh None: the scan's plain mm branch, equal to the scan with a zero bias."""
    xproj, w_hh = _rand(T, B, 3 * H, dtype=torch.float32), _rand(3 * H, H, dtype=torch.float32, scale=0.5)
    h0 = _rand(B, H, dtype=torch.float32)
    hs, saved = t_rnn.gru_scan_fwd(xproj, w_hh, None, h0, False)
    hs0, saved0 = t_rnn.gru_scan_fwd(xproj, w_hh, torch.zeros(3 * H), h0, False)
    torch.testing.assert_close(hs, hs0, rtol=0, atol=0)
    torch.testing.assert_close(saved, saved0, rtol=0, atol=0)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
def test_kl_div_target_grad_only(dtype, log_target):
    """need_input False: the kernel stores dt only (its NEED_X branch not taken) and dx comes back empty."""
    x = torch.randn(5, 123, dtype=torch.float64).log_softmax(-1).to(dtype)
    t = torch.randn(5, 123, dtype=torch.float64).softmax(-1)
    t = (t.log() if log_target else t).to(dtype)
    dy = _rand(5, 123, dtype=dtype)
    dx, dt = t_kl.kl_div_bwd(dy, x, t, log_target, False, True)
    assert dx.shape == (0,)
    fn = lambda x_, t_: F.kl_div(x_, t_, reduction="none", log_target=log_target)  # noqa: E731
    (_, tg), (_, rg) = torch_and_ref(fn, [x, t], dy, dtype)
    assert_within_torch_error(dt, tg[1], rg[1], "dt")


@pytest.mark.parametrize("per_row", [False, True], ids=["per_column", "per_row"])
def test_prelu_bwd_without_dw(per_row):
    """need_dw False: dx alone (the kernel's NEED_DW branches not taken), dw empty."""
    C, n = 5, 123
    m, cols = (2 * C, n) if per_row else (19, C)
    x, dy, w = _rand(m, cols, dtype=torch.float32), _rand(m, cols, dtype=torch.float32), _rand(C, dtype=torch.float32)
    dx, dw = t_act.prelu_bwd(dy, x, w, per_row, False)
    assert dw.shape == (0,)
    fn = (lambda x_, w_: F.prelu(x_.view(2, C, n), w_).view(m, n)) if per_row else F.prelu  # noqa: E731
    (_, tg), (_, rg) = torch_and_ref(fn, [x, w], dy, torch.float32)
    assert_within_torch_error(dx, tg[0], rg[0], "dx")


@pytest.mark.parametrize("per_row", [False, True], ids=["per_column", "per_row"])
def test_batch_norm_act_bwd_dx_only(per_row):
    """No residual and need_affine False: dz is not stored (the kernel's STORE_DZ branch not taken), dx alone."""
    C, n = 3, 123
    m, cols = (2 * C, n) if per_row else (4, C)
    x, dy = _rand(m, cols, dtype=torch.float32), _rand(m, cols, dtype=torch.float32)
    scale, shift = _rand(C, dtype=torch.float32, scale=0.5), _rand(C, dtype=torch.float32, scale=0.5)
    dx, dres, dscale, dshift = t_act.batch_norm_act_bwd(dy, x, scale, shift, None, per_row, ACT_NAMES.index("silu"),
                                                        0.0, 0.0, 0.0, False)
    assert dres.shape == dscale.shape == dshift.shape == (0,)

    def fn(x_):
        s_, t_ = (scale[:, None], shift[:, None]) if per_row else (scale, shift)
        z = (x_.view(2, C, n) if per_row else x_) * s_.to(x_.dtype) + t_.to(x_.dtype)
        return F.silu(z).view(m, cols)

    (_, tg), (_, rg) = torch_and_ref(fn, [x], dy, torch.float32)
    assert_within_torch_error(dx, tg[0], rg[0], "dx")


def test_empty_batches():
    """Zero tokens / zero sequences / zero rows: no launch, outputs of the right shape, pools untouched."""
    k_pool, v_pool = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    k0, v0 = k_pool.clone(), v_pool.clone()
    empty = torch.empty(0, 2, 8)
    t_paged.append_kv(empty, empty, k_pool, v_pool, torch.empty(0, dtype=torch.int64))
    assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0)
    out = t_paged.paged_attention_decode(torch.empty(0, 4, 8), k_pool, v_pool, torch.zeros(0, 2, dtype=torch.int32),
                                         torch.zeros(0, dtype=torch.int32), 0.125, 0.0, None)
    assert out.shape == (0, 4, 8) and out.dtype == torch.float32
    tokens, logprobs = t_sampling.sample_fwd(torch.empty(0, 11), torch.empty(0), torch.empty(0, 7), None, None, None)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64
    assert logprobs.shape == (0,) and logprobs.dtype == torch.float32
