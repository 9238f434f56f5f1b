"""tritium.wavenet_gate and tritium.wavenet_residual_skip, the public functions: values and every gradient
against the float64 reference in every dtype, local and global (broadcast over time) conditioning, gradcheck,
torch.compile(fullgraph=True), the unit against the plain-torch residual unit, and bad inputs."""
import pytest
import torch

import tritium
from tritium import reference
from tests.util import KERNEL_DTYPES, assert_within_torch_error, torch_and_ref


@pytest.mark.parametrize("dtype", KERNEL_DTYPES + (torch.float64,), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cond_t", [None, 1, 23], ids=["plain", "global", "local"])
def test_gate_values_and_grads(dtype, cond_t):
    torch.manual_seed(0)
    h = torch.randn(3, 10, 23, dtype=torch.float64).to(dtype)
    c = None if cond_t is None else torch.randn(3, 10, cond_t, dtype=torch.float64).to(dtype)
    dz = torch.randn(3, 5, 23, dtype=torch.float64).to(dtype)
    args = [h] + ([c] if c is not None else [])
    ins = [a.clone().requires_grad_() for a in args]
    z = tritium.wavenet_gate(ins[0], ins[1] if c is not None else None)
    gs = torch.autograd.grad(z, ins, dz)
    (ty, tg), (ry, rg) = torch_and_ref(lambda h_, *c_: reference.wavenet_gate(h_, c_[0] if c_ else None), args, dz,
                                       dtype)
    assert_within_torch_error(z.detach(), ty, ry, "z")
    for i, (o, t, r) in enumerate(zip(gs, tg, rg)):
        assert_within_torch_error(o, t, r, f"grad {i}")


def test_gradcheck_and_compile():
    h = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 6, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tritium.wavenet_gate, (h, c))
    hf = h.float().detach().requires_grad_()
    out = torch.compile(lambda h: tritium.wavenet_gate(h).square().sum(), fullgraph=True, backend="aot_eager")(hf)
    torch.testing.assert_close(out, tritium.wavenet_gate(hf).square().sum())


@pytest.mark.parametrize("bias", [True, False])
def test_residual_skip_matches_the_torch_unit(bias):
    torch.manual_seed(1)
    B, R, C, S, T = 2, 7, 5, 11, 19
    x = torch.randn(B, R, T, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, 2 * C, T, dtype=torch.float64, requires_grad=True)
    res, skip = torch.nn.Conv1d(C, R, 1, bias=bias).double(), torch.nn.Conv1d(C, S, 1, bias=bias).double()
    params = [x, h] + list(res.parameters()) + list(skip.parameters())
    a, s = tritium.wavenet_residual_skip(x, h, res.weight, res.bias, skip.weight, skip.bias)
    z = torch.tanh(h[:, :C]) * torch.sigmoid(h[:, C:])
    ra, rs = x + res(z), skip(z)
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(s, rs)
    g1 = torch.autograd.grad((a.sum(), (s * 2).sum()), params)
    g2 = torch.autograd.grad((ra.sum(), (rs * 2).sum()), params)
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q)


def test_bad_inputs():
    h = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match=r"h must be \(batch, 2 C, time\) with an even channel count"):
        tritium.wavenet_gate(torch.randn(2, 5, 5))
    with pytest.raises(TypeError, match="h must be floating point"):
        tritium.wavenet_gate(h.long())
    with pytest.raises(ValueError, match="cond must be"):
        tritium.wavenet_gate(h, torch.randn(2, 6, 4))
    with pytest.raises(TypeError, match="cond must have h's dtype"):
        tritium.wavenet_gate(h, torch.randn(2, 6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \(batch, 4, 5\)"):
        tritium.wavenet_residual_skip(torch.randn(2, 3, 5), h, torch.randn(4, 3), None, torch.randn(8, 3), None)


def test_residual_skip_channels_last():
    """channels_last=True: the same unit on (batch, time, channels) tensors, conditioning broadcast over time."""
    torch.manual_seed(2)
    B, R, C, S, T = 2, 6, 4, 9, 13
    x = torch.randn(B, R, T, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, 2 * C, T, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(B, 2 * C, 1, dtype=torch.float64)
    wr, br, ws, bs = (torch.randn(R, C, dtype=torch.float64), torch.randn(R, dtype=torch.float64),
                      torch.randn(S, C, dtype=torch.float64), torch.randn(S, dtype=torch.float64))
    a, s = tritium.wavenet_residual_skip(x, h, wr, br, ws, bs, cond)
    al, sl = tritium.wavenet_residual_skip(x.transpose(1, 2), h.transpose(1, 2), wr, br, ws, bs,
                                           cond.transpose(1, 2), channels_last=True)
    torch.testing.assert_close(al.transpose(1, 2), a)
    torch.testing.assert_close(sl.transpose(1, 2), s)
    g1 = torch.autograd.grad((a.sum(), s.sum()), (x, h))
    g2 = torch.autograd.grad((al.sum(), sl.sum()), (x, h))
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="channels_last x must be"):
        tritium.wavenet_residual_skip(x, h.transpose(1, 2), wr, br, ws, bs, channels_last=True)
