"""The mLSTM kernels (forward, backward, decoding step), Triton (interpreter) and C++, against
tritium.ops.mlstm.mlstm_reference in float64 (every output and every gradient)."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import mlstm
from tritium.ops.mlstm import mlstm_chunk, mlstm_reference
from tests.ops.test_mlstm import NAMES, make_inputs
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_mlstm = on_device(mlstm)
CASES, IDS = impl_cases(triton_mlstm)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference(args, scale, h0, dh, dT, dtype):
    """(h, final (C, n, m), grads (q, k, v, i, f[, C0, n0])) of the reference in dtype (torch's own error) and in
    float64 on the same values."""
    res = {}
    for run in (dtype, torch.float64):
        ins = [leaf(args[n], run) for n in NAMES]
        s0 = None if h0 is None else (leaf(h0[0], _acc(run)), leaf(h0[1], _acc(run)), h0[2].to(_acc(run)))
        h, last = mlstm_reference(*ins, scale, 1e-6, s0, True)
        leaves = ins + ([] if s0 is None else list(s0[:2]))
        outs, gouts = [h], [dh.to(h.dtype)]
        if dT is not None:
            outs += [last[0], last[1]]
            gouts += [dT[0].to(last[0].dtype), dT[1].to(last[1].dtype)]
        gs = torch.autograd.grad(outs, leaves, gouts)
        res[run] = (h.detach(), [x.detach() for x in last], gs)
    return res[dtype], res[torch.float64]


# (B, H, T, DK, DV, chunk, initial state, final-state gradient); the interpreter runs one program per (batch, head)
SHAPES = [
    (2, 3, 1, 5, 7, 16, True, False),        # one step, odd dims
    (1, 2, 7, 3, 9, 16, False, True),        # a partial chunk
    (2, 1, 7, 1, 1, 16, True, True),         # DK = DV = 1
    (1, 1, 129, 17, 16, 16, True, True),     # 9 chunks, the last of one step
    (1, 2, 40, 64, 64, 32, True, True),      # xLSTM-size heads
    (1, 1, 20, 130, 20, 16, True, True),     # three key blocks (the Triton kernels' BLOCK_K = 64), the last partial
    (1, 1, 50, 9, 40, 64, True, True),       # one partial chunk wider than a score panel, a partial value panel
]
SHAPE_IDS = [f"B{s[0]}-H{s[1]}-T{s[2]}-DK{s[3]}-DV{s[4]}-chunk{s[5]}" + ("-h0" if s[6] else "")
             + ("-dT" if s[7] else "") for s in SHAPES]
# The Triton kernels run chunks of 16 (mlstm_chunk on CUDA): the 64-step chunk is the C++ kernels' alone
MLSTM_CASES = [pytest.param(*case, shape, id=f"{sid}-{cid}") for shape, sid in zip(SHAPES, SHAPE_IDS)
               for case, cid in zip(CASES, IDS) if not (case[0] == "triton" and (
                   (shape[2] > 100 and case[2] != torch.float32) or shape[5] > 32))]


@pytest.mark.parametrize("impl_name,impl,dtype,shape", MLSTM_CASES)
def test_mlstm(impl_name, impl, dtype, shape):
    B, H, T, DK, DV, chunk, has_h0, has_dT = shape
    acc, scale = _acc(dtype), DK ** -0.5
    args = make_inputs(B, H, T, DK, DV, dtype)
    gen = torch.Generator().manual_seed(1)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    h0 = (rn(B, H, DK, DV).to(acc), rn(B, H, DK).to(acc), rn(B, H).to(acc)) if has_h0 else None
    dh = rn(B, H, T, DV).to(dtype)
    dT = (rn(B, H, DK, DV).to(acc), rn(B, H, DK).to(acc)) if has_dT else None
    h, Cs, ns, ms = impl.mlstm_fwd(*(args[n] for n in NAMES), scale, 1e-6, *(h0 or (None,) * 3), chunk)
    nc = -(-T // chunk)
    assert Cs.shape == (B, H, nc + 1, DK, DV) and ns.shape == (B, H, nc + 1, DK) and ms.shape == (B, H, nc + 1)
    grads = impl.mlstm_bwd(dh, *(args[n] for n in NAMES), scale, 1e-6, Cs, ns, ms, chunk, *(dT or (None, None)))
    (t_h, t_last, t_g), (r_h, r_last, r_g) = _reference(args, scale, h0, dh, dT, dtype)
    assert_within_torch_error(h, t_h, r_h, "h")
    for what, ours, tl_, rl in zip(("C", "n", "m"), (Cs[:, :, -1], ns[:, :, -1], ms[:, :, -1]), t_last, r_last):
        assert_within_torch_error(ours, tl_, rl, f"final {what}", compute_dtype=dtype)
    names = list(NAMES) + (["C0", "n0"] if has_h0 else [])
    for name, g, tg, rg in zip(names, grads[:5] + (grads[5:] if has_h0 else ()), t_g, r_g):
        assert_within_torch_error(g, tg, rg, f"d{name}")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_steps_equal_the_sequence(impl_name, impl, dtype):
    B, H, T, DK, DV = 2, 2, 9, 5, 3
    acc = _acc(dtype)
    args = make_inputs(B, H, T, DK, DV, dtype)
    gen = torch.Generator().manual_seed(4)
    state = (torch.randn(B, H, DK, DV, generator=gen).to(acc), torch.randn(B, H, DK, generator=gen).to(acc),
             torch.randn(B, H, generator=gen).to(acc))
    h, Cs, ns, ms = impl.mlstm_fwd(*(args[n] for n in NAMES), 0.4, 1e-6, *state, 16)
    ys = []
    for t in range(T):
        y, *state = impl.mlstm_step(*(args[n][:, :, t].contiguous() for n in NAMES), *state, 0.4, 1e-6)
        ys.append(y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(ys, 2), h, **tol)
    for a, b in zip(state, (Cs[:, :, -1], ns[:, :, -1], ms[:, :, -1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_choice():
    assert [mlstm_chunk(t) for t in (1, 16, 17, 63, 64, 1000)] == [16, 16, 32, 64, 64, 64]
    assert [mlstm_chunk(t, "cuda") for t in (1, 17, 1000)] == [16, 16, 16]


@pytest.mark.gpu_compile
def test_gpu_compile():
    """The forward, backward and step compile for sm_80/90 without spills at xLSTM's head sizes 64 and 128 (and an
    odd one), with and without the initial state and the final state's gradient, in float32 and bfloat16, at the
    chunk the op takes on CUDA."""
    chunk = mlstm_chunk(40, "cuda")

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for DK, DV, on in ((64, 64, True), (64, 64, False), (128, 128, True), (128, 128, False), (17, 33, True)):
                B, H, T = 1, 2, 40
                q, k, v = (torch.randn(B, H, T, d, dtype=dtype) for d in (DK, DK, DV))
                i, f = torch.randn(B, H, T, dtype=dtype), torch.randn(B, H, T, dtype=dtype)
                s = (torch.zeros(B, H, DK, DV), torch.zeros(B, H, DK), torch.zeros(B, H))
                h0 = s if on else (None,) * 3
                h, Cs, ns, ms = triton_mlstm.mlstm_fwd(q, k, v, i, f, 0.125, 1e-6, *h0, chunk)
                triton_mlstm.mlstm_bwd(h, q, k, v, i, f, 0.125, 1e-6, Cs, ns, ms, chunk,
                                       *(s[:2] if on else (None,) * 2))
                triton_mlstm.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], *s, 0.125, 1e-6)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_mlstm_fwd_kernel", "_mlstm_bwd_kernel"}
