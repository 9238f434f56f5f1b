"""Causal depthwise conv1d kernels (forward, backward, decoding update), Triton (interpreter) and C++, against the
float64 reference: odd lengths and channel counts, widths 2/3/4 (and the other widths the kernels take), with and
without bias, initial states and silu, every gradient, strided inputs, and the GPU compile check."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import conv1d
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, on_device, torch_and_ref

triton_conv1d = on_device(conv1d)
cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_conv1d)
B, D = 2, 37  # 37 channels: several Triton channel blocks with a masked tail (rows up to 129 positions)
LENGTHS = (1, 7, 129, 1000)
# (bias, initial_states, silu)
VARIANTS = {"plain": (False, False, False), "bias-silu": (True, False, True), "all": (True, True, True),
            "init-bias": (True, True, False)}


def _inputs(dtype, L, W, bias, init, batch=B, dim=D):
    """x, weight, bias, initial_states, dout in dtype (None where absent)."""
    x = torch.randn(batch, dim, L, dtype=torch.float64)
    w = torch.randn(dim, W, dtype=torch.float64) / W ** 0.5
    b = torch.randn(dim, dtype=torch.float64) if bias else None
    i0 = torch.randn(batch, dim, W - 1, dtype=torch.float64) if init else None
    dout = torch.randn(batch, dim, L, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (x, w, b, i0, dout)]


def check_conv(impl, dtype, L, W, bias, init, silu, batch=B, dim=D, x=None):
    xi, w, b, i0, dout = _inputs(dtype, L, W, bias, init, batch, dim)
    x = xi if x is None else x
    out = impl.causal_conv1d_fwd(x, w, b, i0, silu)
    dx, dw, db, di = impl.causal_conv1d_bwd(dout, x, w, b, i0, silu)
    present = [t for t in (x, w, b, i0) if t is not None]

    def fn(*ts):
        it = iter(ts)
        x_, w_ = next(it), next(it)
        b_ = next(it) if b is not None else None
        i_ = next(it) if i0 is not None else None
        return reference.causal_conv1d(x_, w_, b_, i_, activation="silu" if silu else None)

    (ty, tg), (ry, rg) = torch_and_ref(fn, present, dout, dtype)
    assert_within_torch_error(out, ty, ry, "out")
    ours = [dx, dw] + ([db] if b is not None else []) + ([di] if i0 is not None else [])
    for name, o, t, r in zip(["dx", "dweight", "dbias" if b is not None else "dinit", "dinit"], ours, tg, rg):
        assert_within_torch_error(o, t, r, name)
    if b is None:
        assert db.numel() == 0
    if i0 is None:
        assert di.numel() == 0


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("W", (2, 3, 4))
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv(impl_name, impl, dtype, W, L, variant):
    # at L = 1000, 5 channels (two Triton blocks of 4, the second masked) keep the interpreter's runs short
    check_conv(impl, dtype, L, W, *VARIANTS[variant], dim=D if L <= 129 else 5)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_conv1d), ("cpp", cpp)])
@pytest.mark.parametrize("W", (1, 5, 8))
def test_other_widths(impl_name, impl, W):
    """The widths past Mamba's: 1 (no state), 5 and 8 (the C++ kernel's runtime-width path)."""
    check_conv(impl, torch.float32, 129, W, True, True, True)
    check_conv(impl, torch.float32, 3, W, False, True, False)  # L < width - 1: the states reach every output


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("L", (2049, 5000))
def test_cpp_chunks(dtype, L):
    """Rows longer than the C++ kernel's chunk of 2048 positions: the halos between chunks."""
    check_conv(cpp, dtype, L, 4, True, True, True, batch=1, dim=3)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_conv1d), ("cpp", cpp)])
def test_strided(impl_name, impl):
    """x and initial_states read in place at any batch / channel strides (x as Mamba's half of the in-projection,
    the states sliced out of a wider cache); dout too."""
    L, W = 33, 4
    xz = torch.randn(B, 2 * D, L)
    x = xz[:, :D]
    w, b = torch.randn(D, W), torch.randn(D)
    cache = torch.randn(B, D, W + 2)
    i0 = cache[:, :, 1:W]
    dout = torch.randn(B, 3 * D, L)[:, D:2 * D]
    out = impl.causal_conv1d_fwd(x, w, b, i0, True)
    grads = impl.causal_conv1d_bwd(dout, x, w, b, i0, True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, i0)]
    ref = reference.causal_conv1d(*leaves[:3], leaves[3], activation="silu")
    torch.testing.assert_close(out, ref)
    for name, g, r in zip(["dx", "dw", "db", "dinit"], grads, torch.autograd.grad(ref, leaves, dout)):
        torch.testing.assert_close(g, r, msg=name)


def check_update(impl, dtype, W, S, T, bias, silu):
    x = torch.randn(B, D, T, dtype=torch.float64).to(dtype)
    state = torch.randn(B, D, S, dtype=torch.float64).to(dtype)
    w = (torch.randn(D, W, dtype=torch.float64) / W ** 0.5).to(dtype)
    b = torch.randn(D, dtype=torch.float64).to(dtype) if bias else None
    act = "silu" if silu else None
    ours_state = state.clone()
    out = impl.causal_conv1d_update(x, ours_state, w, b, silu)
    torch_state = state.clone()
    torch_out = reference.causal_conv1d_update(x, torch_state, w, b, act)
    ref_out = reference.causal_conv1d_update(x.double(), state.double(), w.double(),
                                             None if b is None else b.double(), act)
    assert_within_torch_error(out, torch_out, ref_out, "out")
    assert torch.equal(ours_state, torch_state), "conv_state"


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("W", (2, 3, 4))
@pytest.mark.parametrize("S,T", [(0, 1), (0, 5), (3, 1), (3, 20)], ids=["state-w1-T1", "state-w1-T5",
                                                                         "state-w2-T1", "state-w2-T20"])
@pytest.mark.parametrize("bias,silu", [(False, False), (True, True)], ids=["plain", "bias-silu"])
def test_update(impl_name, impl, dtype, W, S, T, bias, silu):
    """state_len = width - 1 (+ S); seqlen 1 (decoding) and more than one step, 20 past the Triton block of 16."""
    check_update(impl, dtype, W, W - 1 + S, T, bias, silu)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_conv1d), ("cpp", cpp)])
def test_update_strided_and_width1(impl_name, impl):
    """conv_state a slice of a wider cache (any batch / channel stride) is updated in place; width 1 has an empty
    state."""
    W, S = 4, 3
    cache = torch.randn(2 * B, D + 3, S)
    state = cache[::2, 1:D + 1]
    x = torch.randn(B, 2 * D, 1)[:, ::2]  # channel stride 2
    w, b = torch.randn(D, W), torch.randn(D)
    want_state = state.clone()
    want = reference.causal_conv1d_update(x, want_state, w, b, "silu")
    before = cache.clone()
    out = impl.causal_conv1d_update(x, state, w, b, True)
    torch.testing.assert_close(out, want)
    assert torch.equal(state, want_state)
    untouched = torch.ones_like(cache, dtype=torch.bool)
    untouched[::2, 1:D + 1] = False
    assert torch.equal(cache[untouched], before[untouched]), "wrote outside conv_state"
    x1, w1 = torch.randn(B, D, 3), torch.randn(D, 1)
    empty = torch.empty(B, D, 0)
    torch.testing.assert_close(impl.causal_conv1d_update(x1, empty, w1, None, False), x1 * w1[:, :1])


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every launch configuration the launchers pick (long and short rows, each optional input, silu, 16-bit)
    compiles for sm_80/90 without spills."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for L, init in ((1000, True), (1, False)):
                x, w = torch.randn(2, 64, L, dtype=dtype), torch.randn(64, 4, dtype=dtype)
                b = torch.randn(64, dtype=dtype)
                i0 = torch.randn(2, 64, 3, dtype=dtype) if init else None
                for silu in (False, True):
                    triton_conv1d.causal_conv1d_fwd(x, w, b if init else None, i0, silu)
                    triton_conv1d.causal_conv1d_bwd(x, x, w, b if init else None, i0, silu)
            state = torch.randn(2, 64, 3, dtype=dtype)
            for T in (1, 20):
                triton_conv1d.causal_conv1d_update(torch.randn(2, 64, T, dtype=dtype), state, w, b, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_conv_fwd_kernel", "_conv_bwd_kernel", "_conv_update_kernel"}
