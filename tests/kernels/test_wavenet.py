"""WaveNet gate kernels (forward and backward), Triton (interpreter) and C++, against the float64 reference
tanh(a + c_a) * sigmoid(g + c_g): odd channel counts and lengths (one element to several blocks per row), with and
without conditioning, every gradient, every dtype, and the GPU compile check."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import wavenet
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, on_device, torch_and_ref

triton_wavenet = on_device(wavenet)
CASES, IDS = impl_cases(triton_wavenet)
SHAPES = [(1, 1, 1), (2, 3, 7), (3, 37, 129), (2, 16, 1000)]  # (batch, C, T)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("B,C,T", SHAPES)
@pytest.mark.parametrize("cond", [False, True], ids=["plain", "cond"])
def test_kernel(impl_name, impl, dtype, B, C, T, cond):
    torch.manual_seed(B + C + T)
    h = (torch.randn(B, 2 * C, T, dtype=torch.float64) * 2).to(dtype)
    c = (torch.randn(B, 2 * C, T, dtype=torch.float64)).to(dtype) if cond else None
    dz = torch.randn(B, C, T, dtype=torch.float64).to(dtype)
    z = impl.wavenet_gate_fwd(h, c)
    dh = impl.wavenet_gate_bwd(dz, h, c)
    args = [h] + ([c] if cond else [])
    (ty, tg), (ry, rg) = torch_and_ref(lambda h_, *c_: reference.wavenet_gate(h_, c_[0] if c_ else None), args, dz,
                                       dtype)
    assert_within_torch_error(z, ty, ry, "z")
    assert_within_torch_error(dh, tg[0], rg[0], "dh")
    if cond:
        assert_within_torch_error(dh, tg[1], rg[1], "dcond")


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_wavenet), ("cpp", torch.ops.tritium)])
def test_saturation(impl_name, impl):
    """Large |a|, |g|: tanh and sigmoid saturate to +-1 and 0/1 without NaN, and so do the gradients (to 0)."""
    h = torch.tensor([[[-80.0, 80.0, 0.0, 30.0], [80.0, -80.0, 0.0, -30.0]]])
    z = impl.wavenet_gate_fwd(h, None)
    torch.testing.assert_close(z, torch.tensor([[[-1.0, 0.0, 0.0, 1.0 / (1.0 + torch.exp(torch.tensor(30.0)))]]]))
    dh = impl.wavenet_gate_bwd(torch.ones(1, 1, 4), h, None)
    assert torch.isfinite(dh).all()
    torch.testing.assert_close(dh[0, :, :2], torch.zeros(2, 2))


def test_cpp_errors():
    with pytest.raises(RuntimeError, match="h must be"):
        torch.ops.tritium.wavenet_gate_fwd(torch.randn(2, 3, 4), None)
    with pytest.raises(RuntimeError, match="cond must be"):
        torch.ops.tritium.wavenet_gate_fwd(torch.randn(2, 4, 4), torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match="dz must be"):
        torch.ops.tritium.wavenet_gate_bwd(torch.randn(2, 4, 4), torch.randn(2, 4, 4), None)


@pytest.mark.gpu_compile
def test_gpu_compile():
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for cond in (False, True):
                h = torch.randn(2, 64, 300, dtype=dtype)
                c = torch.randn_like(h) if cond else None
                triton_wavenet.wavenet_gate_fwd(h, c)
                triton_wavenet.wavenet_gate_bwd(torch.randn(2, 32, 300, dtype=dtype), h, c)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_wavenet_gate_kernel"}
