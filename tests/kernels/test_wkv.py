"""RWKV-7's and RWKV-6's wkv kernels (forward, backward, decoding step), Triton (interpreter) and C++, against
tritium.ops.wkv.wkv7_reference / wkv6_reference in float64 (every output and every gradient)."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import wkv
from tritium.ops.wkv import wkv6_reference, wkv7_reference, wkv_chunk
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_wkv = on_device(wkv)
CASES, IDS = impl_cases(triton_wkv)


def _acc(dtype):
    """The dtype of the states, the initial state and dht: float32 (float64 for float64 input)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strided(t):
    """The same values as a view with wider time and batch strides (a slice of a bigger (B, T, H, K) buffer)."""
    buf = torch.zeros(t.shape[0] + 1, t.shape[1] + 3, *t.shape[2:], dtype=t.dtype)
    buf[1:, 2:t.shape[1] + 2] = t
    return buf[1:, 2:t.shape[1] + 2]


def make_inputs(B, T, H, K, V, dtype, seed=0):
    """RWKV-7-like values: log decay w = -0.6065 sigmoid(.) (decays in [0.545, 1), RWKV-7's range), a = -kappa and
    b = kappa * iclr with kappa a unit key (the state-removal term), r, k, v unit normals."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    kappa = torch.nn.functional.normalize(rn(B, T, H, K), dim=-1)
    t = dict(r=rn(B, T, H, K), w=-0.6065 * torch.sigmoid(rn(B, T, H, K)), k=rn(B, T, H, K), v=rn(B, T, H, V),
             a=-kappa, b=kappa * torch.sigmoid(rn(B, T, H, K)))
    return {n: x.to(dtype) for n, x in t.items()}


NAMES = ("r", "w", "k", "v", "a", "b")


def _reference(args, scale, h0, dout, dht, dtype):
    """(o, final state, grads (r, w, k, v, a, b, h0)) of the reference run in dtype (torch's own error) and in
    float64 on the same values."""
    res = {}
    for run in (dtype, torch.float64):
        ins = [leaf(args[n], run) for n in NAMES]
        s0 = None if h0 is None else leaf(h0, _acc(run))
        o, last = wkv7_reference(*ins, scale, s0, True)
        leaves = ins + ([] if s0 is None else [s0])
        outs, gouts = [o], [dout.to(o.dtype)]
        if dht is not None:
            outs.append(last)
            gouts.append(dht.to(last.dtype))
        gs = torch.autograd.grad(outs, leaves, gouts, allow_unused=True)
        gs = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]
        res[run] = (o.detach(), last.detach(), gs)
    return res[dtype], res[torch.float64]


# (B, T, H, K, V, chunk (None: wkv_chunk), initial state, dht, strided inputs). The interpreter runs one program per
# (column block, batch, head) and step: the long and the wide cases keep programs few.
SHAPES = [
    (2, 1, 3, 5, 7, None, True, False, False),       # one step, odd dims
    (1, 7, 2, 3, 9, 3, False, True, True),            # chunk 3 does not divide 7, strided, dht
    (2, 7, 1, 1, 1, None, True, True, False),         # K = V = 1
    (1, 129, 1, 17, 16, 8, True, True, False),        # long: 16 chunks + 1
    (1, 9, 2, 64, 64, 4, True, True, True),           # RWKV-7's head size: several column blocks
]
SHAPE_IDS = [f"B{s[0]}-T{s[1]}-H{s[2]}-K{s[3]}-V{s[4]}" + (f"-chunk{s[5]}" if s[5] else "") + ("-h0" if s[6] else "")
             + ("-dht" if s[7] else "") + ("-strided" if s[8] else "") for s in SHAPES]
# the long sequence runs under the (slow) interpreter in float32 only
WKV_CASES = [pytest.param(*case, shape, id=f"{sid}-{cid}") for shape, sid in zip(SHAPES, SHAPE_IDS)
             for case, cid in zip(CASES, IDS) if not (case[0] == "triton" and shape[1] > 100
                                                      and case[2] != torch.float32)]


@pytest.mark.parametrize("impl_name,impl,dtype,shape", WKV_CASES)
def test_wkv7(impl_name, impl, dtype, shape):
    B, T, H, K, V, chunk, has_h0, has_dht, strided = shape
    chunk = chunk or wkv_chunk(K, V)
    acc, scale = _acc(dtype), K ** -0.5
    args = make_inputs(B, T, H, K, V, dtype)
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(acc) if has_h0 else None
    dout = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(acc) if has_dht else None
    call = [_strided(args[n]) if strided else args[n] for n in NAMES]
    o, states = impl.wkv7_fwd(*call, scale, h0, chunk)
    assert states.shape == (B, H, -(-T // chunk), K, V) and states.dtype == acc
    grads = impl.wkv7_bwd(_strided(dout) if strided else dout, *call, scale, h0, chunk, states, dht)
    (t_o, t_last, t_g), (r_o, r_last, r_g) = _reference(args, scale, h0, dout, dht, dtype)
    assert_within_torch_error(o, t_o, r_o, "o")
    # the state is float32 for 16-bit inputs: its tolerance is float32's beside the reference's 16-bit error
    assert_within_torch_error(states[:, :, -1], t_last, r_last, "final state")
    for name, g, tg, rg in zip(NAMES, grads, t_g, r_g):
        assert_within_torch_error(g, tg, rg, f"d{name}")
    if has_h0:
        assert_within_torch_error(grads[6], t_g[6], r_g[6], "dh0")
    elif has_dht:  # without an initial state, dh0 is still the adjoint before the first step
        assert grads[6].shape == (B, H, K, V)


# batch x heads enough for the C++ forward to run several heads of a batch row per task (csrc/wkv.cpp's fwd_group:
# on 2 threads groups of 3, 4 and 5 heads), with an initial state, dht, chunks, strides
GROUPED = [(8, 37, 3, 5, 7, 8, True, True, False), (16, 21, 4, 16, 16, None, False, False, True),
           (9, 19, 5, 3, 4, 4, True, False, False)]
CPP = [(c, i) for c, i in zip(CASES, IDS) if c[0] == "cpp"]


@pytest.mark.parametrize("impl_name,impl,dtype", [c for c, _ in CPP], ids=[i for _, i in CPP])
@pytest.mark.parametrize("shape", GROUPED, ids=[f"B{s[0]}-H{s[2]}" for s in GROUPED])
def test_wkv7_head_groups(impl_name, impl, dtype, shape):
    test_wkv7(impl_name, impl, dtype, shape)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("decay", ["strong", "mixed", "none"])
def test_wkv7_decay_extremes(impl_name, impl, dtype, decay):
    """Log decays far outside RWKV-7's range against the reference, values and gradients: down to -30 (a row's
    product of decays falls below any floor within a step or two: the C++ forward's renormalising steps), strong
    and none mixed within a head (rows renormalise at different times), and exactly 0 (no decay at all: scaled
    rows that never renormalise)."""
    B, T, H, K, V, chunk = 1, 40, 2, 16, 16, 8
    args = make_inputs(B, T, H, K, V, dtype, seed=3)
    w = args["w"].double()
    args["w"] = {"strong": 50 * w, "mixed": 50 * w * (torch.arange(K) % 2), "none": 0 * w}[decay].to(dtype)
    gen = torch.Generator().manual_seed(4)
    dout = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    o, states = impl.wkv7_fwd(*(args[n] for n in NAMES), K ** -0.5, None, chunk)
    grads = impl.wkv7_bwd(dout, *(args[n] for n in NAMES), K ** -0.5, None, chunk, states, None)
    (t_o, t_last, t_g), (r_o, r_last, r_g) = _reference(args, K ** -0.5, None, dout, None, dtype)
    assert_within_torch_error(o, t_o, r_o, "o")
    assert_within_torch_error(states[:, :, -1], t_last, r_last, "final state")
    for name, g, tg, rg in zip(NAMES, grads, t_g, r_g):
        assert_within_torch_error(g, tg, rg, f"d{name}")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_intermediate_states(impl_name, impl, dtype):
    """states[:, :, c] is the state after step min((c + 1) chunk, T) - 1 (the reference run on the prefix)."""
    B, T, H, K, V, chunk = 2, 11, 2, 4, 3, 4
    args = make_inputs(B, T, H, K, V, dtype)
    _, states = impl.wkv7_fwd(*(args[n] for n in NAMES), 0.5, None, chunk)
    for c in range(states.shape[2]):
        end = min((c + 1) * chunk, T)
        pre = [args[n][:, :end] for n in NAMES]
        _, t_last = wkv7_reference(*pre, 0.5, None, True)
        _, r_last = wkv7_reference(*(x.double() for x in pre), 0.5, None, True)
        assert_within_torch_error(states[:, :, c], t_last.to(states.dtype), r_last, f"state {c}")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_steps_equal_the_sequence(impl_name, impl, dtype):
    """T decoding steps from an initial state give the sequence kernel's outputs and final state."""
    B, T, H, K, V = 2, 9, 3, 5, 6
    args = make_inputs(B, T, H, K, V, dtype)
    h0 = torch.randn(B, H, K, V, dtype=torch.float64).to(_acc(dtype))
    o, states = impl.wkv7_fwd(*(args[n] for n in NAMES), 0.4, h0, 4)
    state = h0
    for t in range(T):
        y, state = impl.wkv7_step(state, *(args[n][:, t] for n in NAMES), 0.4)
        torch.testing.assert_close(y, o[:, t], msg=lambda m: f"step {t}: {m}")
    torch.testing.assert_close(state, states[:, :, -1])


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_empty_sequence(impl_name, impl, dtype):
    """T = 0: no output, no saved state; the backward passes dht through to dh0 (RWKV-7 and RWKV-6)."""
    args = make_inputs(2, 0, 3, 4, 5, dtype)
    dht = torch.randn(2, 3, 4, 5, dtype=_acc(dtype))
    o, states = impl.wkv7_fwd(*(args[n] for n in NAMES), 0.5, None, 4)
    assert o.shape == (2, 0, 3, 5) and states.shape == (2, 3, 0, 4, 5)
    grads = impl.wkv7_bwd(torch.zeros_like(o), *(args[n] for n in NAMES), 0.5, None, 4, states, dht)
    torch.testing.assert_close(grads[6], dht)
    u = torch.randn(3, 4, dtype=_acc(dtype))
    o, states = impl.wkv6_fwd(*(args[n] for n in NAMES6), u, 0.5, None, 4)
    assert o.shape == (2, 0, 3, 5) and states.shape == (2, 3, 0, 4, 5)
    grads = impl.wkv6_bwd(torch.zeros_like(o), *(args[n] for n in NAMES6), u, 0.5, None, 4, states, dht)
    torch.testing.assert_close(grads[5], dht)
    torch.testing.assert_close(grads[4], torch.zeros_like(u))


# ---- RWKV-6: r, k, v, w (log decay) and the bonus u (H, K) ----
NAMES6 = ("r", "k", "v", "w")


def _reference6(args, u, scale, h0, dout, dht, dtype):
    """(o, final state, grads (r, k, v, w, u, h0)) of wkv6_reference in dtype (u and h0 in the state dtype: the
    kernels take them so) and in float64 on the same values."""
    res = {}
    for run in (dtype, torch.float64):
        ins = [leaf(args[n], run) for n in NAMES6] + [leaf(u, _acc(run))]
        s0 = None if h0 is None else leaf(h0, _acc(run))
        o, last = wkv6_reference(*ins, scale, s0, True)
        leaves = ins + ([] if s0 is None else [s0])
        outs, gouts = [o], [dout.to(o.dtype)]
        if dht is not None:
            outs.append(last)
            gouts.append(dht.to(last.dtype))
        gs = torch.autograd.grad(outs, leaves, gouts, allow_unused=True)
        gs = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]
        res[run] = (o.detach(), last.detach(), gs)
    return res[dtype], res[torch.float64]


@pytest.mark.parametrize("impl_name,impl,dtype,shape", WKV_CASES)
def test_wkv6(impl_name, impl, dtype, shape):
    B, T, H, K, V, chunk, has_h0, has_dht, strided = shape
    chunk = chunk or wkv_chunk(K, V)
    acc, scale = _acc(dtype), K ** -0.5
    args = make_inputs(B, T, H, K, V, dtype)
    args["w"] = torch.nn.functional.logsigmoid(args["r"].double() - 2).to(dtype)  # RWKV-6-like decays, near 1
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(H, K, generator=gen, dtype=torch.float64).to(acc)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(acc) if has_h0 else None
    dout = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(acc) if has_dht else None
    call = [_strided(args[n]) if strided else args[n] for n in NAMES6]
    o, states = impl.wkv6_fwd(*call, u, scale, h0, chunk)
    assert states.shape == (B, H, -(-T // chunk), K, V) and states.dtype == acc
    grads = impl.wkv6_bwd(_strided(dout) if strided else dout, *call, u, scale, h0, chunk, states, dht)
    (t_o, t_last, t_g), (r_o, r_last, r_g) = _reference6(args, u, scale, h0, dout, dht, dtype)
    assert_within_torch_error(o, t_o, r_o, "o")
    assert_within_torch_error(states[:, :, -1], t_last, r_last, "final state")
    for name, g, tg, rg in zip(list(NAMES6) + ["u"], grads, t_g, r_g):
        assert_within_torch_error(g, tg, rg, f"d{name}")
    if has_h0:
        assert_within_torch_error(grads[5], t_g[5], r_g[5], "dh0")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_wkv6_steps_equal_the_sequence(impl_name, impl, dtype):
    B, T, H, K, V = 2, 9, 3, 5, 6
    args = make_inputs(B, T, H, K, V, dtype)
    u = torch.randn(H, K, dtype=_acc(dtype))
    h0 = torch.randn(B, H, K, V, dtype=torch.float64).to(_acc(dtype))
    o, states = impl.wkv6_fwd(*(args[n] for n in NAMES6), u, 0.4, h0, 4)
    state = h0
    for t in range(T):
        y, state = impl.wkv6_step(state, *(args[n][:, t] for n in NAMES6), u, 0.4)
        torch.testing.assert_close(y, o[:, t], msg=lambda m: f"step {t}: {m}")
    torch.testing.assert_close(state, states[:, :, -1])


@pytest.mark.gpu_compile
def test_gpu_compile():
    """The forward, backward and step of RWKV-7 and RWKV-6 compile for sm_80/90 without spills at head sizes 64 and
    128 (and an odd one), with and without the initial state and dht, in float32 and bfloat16."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for K, V, on in ((64, 64, True), (64, 64, False), (128, 128, True), (17, 33, True)):
                B, T, H = 1, 40, 2
                ins = [torch.randn(B, T, H, K, dtype=dtype) for _ in range(3)]
                v = torch.randn(B, T, H, V, dtype=dtype)
                a, b = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
                h0 = torch.randn(B, H, K, V) if on else None
                chunk = wkv_chunk(K, V)
                o, states = triton_wkv.wkv7_fwd(*ins, v, a, b, 0.125, h0, chunk)
                triton_wkv.wkv7_bwd(o, *ins, v, a, b, 0.125, h0, chunk, states, torch.randn(B, H, K, V) if on else None)
                triton_wkv.wkv7_step(torch.zeros(B, H, K, V), *(x[:, 0] for x in ins), v[:, 0], a[:, 0], b[:, 0], 0.125)
                r, k, w = ins
                u = torch.randn(H, K)
                o, states = triton_wkv.wkv6_fwd(r, k, v, w, u, 0.125, h0, chunk)
                triton_wkv.wkv6_bwd(o, r, k, v, w, u, 0.125, h0, chunk, states, torch.randn(B, H, K, V) if on else None)
                triton_wkv.wkv6_step(torch.zeros(B, H, K, V), r[:, 0], k[:, 0], v[:, 0], w[:, 0], u, 0.125)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_wkv_fwd_kernel", "_wkv_bwd_kernel"}
