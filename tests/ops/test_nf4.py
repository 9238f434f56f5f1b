"""NF4 weights (tritium.ops.nf4): quantize_nf4 gives bitsandbytes' bytes and absmax, dequantisation is bitsandbytes'
value for value (bitsandbytes 0.50, the [test] extra, runs quantize_4bit / dequantize_4bit on this CPU), the
written-out float64 formula agrees with both, and the public nf4_linear (C++ kernels, on every instruction set this
CPU has) holds the float64 reference for values and the input gradient within 2x torch's own error, under
torch.compile(fullgraph=True) too; bad input raises naming the argument."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium.ops.nf4 import (BLOCKSIZES, DECODE_ROWS, DYNAMIC_CODE, NF4_CODE_VALUES, NF4Weight,
                             dequantize_nf4_reference)
from tests.util import assert_within_torch_error, need, torch_and_ref

ISAS = []
for _name in ("avx512", "avx2"):
    try:
        torch.ops.tritium_runtime.nf4_isa(_name)
        ISAS.append(_name)
    except RuntimeError:
        pass
torch.ops.tritium_runtime.nf4_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    torch.ops.tritium_runtime.nf4_isa(request.param)
    yield request.param
    torch.ops.tritium_runtime.nf4_isa("auto")


def _weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    w.view(-1)[:3] = 0          # an element on the code's exact 0, a block's absmax unaffected
    return w


# (shape, blocksize, double_quant, dtype): numel not a multiple of the blocksize (a short last block), odd numel (a
# padded last nibble), several double-quantisation blocks of 256 with a short last one, bfloat16 / float16 inputs
FORMAT_CASES = [((10, 128), 64, False, torch.float32), ((37, 100), 64, True, torch.float32),
                ((33, 7), 64, False, torch.float16), ((300, 576), 128, True, torch.bfloat16),
                ((300, 512), 128, True, torch.bfloat16), ((257, 320), 64, True, torch.float32),
                ((3, 1000), 256, False, torch.float32), ((5, 1024), 256, False, torch.float16)]


@pytest.mark.parametrize("shape,bs,dq,dtype", FORMAT_CASES, ids=str)
def test_matches_bitsandbytes(shape, bs, dq, dtype):
    """Bytes and absmax equal bitsandbytes'. Double quantisation: the offset and the second-level absmax equal
    bitsandbytes'; the 8-bit codes of the absmax are the nearest code values (bitsandbytes' own rule, its pure-torch
    and CUDA kernels), where bitsandbytes' CPU library (a coarse binary search) picks a neighbour for a few: those
    codes must be at least as close, and a weight rebuilt from bitsandbytes' state dequantises as bitsandbytes'."""
    bf = need("bitsandbytes.functional")
    w = _weight(shape, dtype)
    q, st = bf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
    ours = tritium.quantize_nf4(w, bs, dq)
    assert torch.equal(ours.data, q)
    assert torch.equal(torch.tensor(NF4_CODE_VALUES), st.code)
    if not dq:
        assert torch.equal(ours.absmax, st.absmax)
    else:
        assert torch.equal(DYNAMIC_CODE, st.state2.code)
        assert torch.equal(ours.offset, st.offset) and torch.equal(ours.absmax2, st.state2.absmax)
        plain = bf.quantize_4bit(w, blocksize=bs, quant_type="nf4")[1].absmax - st.offset
        scaled = plain / st.state2.absmax.repeat_interleave(256)[:plain.numel()]
        ours_err = (DYNAMIC_CODE[ours.absmax.long()] - scaled).abs()
        bnb_err = (DYNAMIC_CODE[st.absmax.long()] - scaled).abs()
        assert (ours_err <= bnb_err).all()
        assert (ours.absmax == st.absmax).float().mean() > 0.98
    # bitsandbytes' dequantisation equals ours, of our weight and of one built from bitsandbytes' state. Where
    # the rows are not whole blocks (in_features % blocksize != 0) bitsandbytes 0.50's CPU dequantize_4bit
    # disagrees with its own quantize_4bit (and with its pure-torch dequantisation, which is ours): there the
    # weight is held to the quantisation's own bound instead (half the widest gap between codes, times absmax)
    from_bnb = NF4Weight.from_bnb(q, st)
    if shape[-1] % bs:
        ref = dequantize_nf4_reference(from_bnb)
        def per_element(a):
            return a.double().repeat_interleave(bs)[:w.numel()].view(shape)

        true = per_element(F.pad(w.reshape(-1).float(), (0, -w.numel() % bs)).view(-1, bs).abs().amax(1))
        stored = per_element(from_bnb.absmax_f32())
        # half the widest gap between codes (-1 and -0.696...), and what double quantisation moved absmax by
        bound = 0.1520 * torch.maximum(true, stored) + (true - stored).abs() + 1e-12
        assert ((ref - w.double()).abs() <= bound).all()
        return
    theirs = bf.dequantize_4bit(q, st)
    assert torch.equal(from_bnb.dequantize(), theirs)
    assert torch.equal(dequantize_nf4_reference(from_bnb).float().to(dtype), theirs)
    if not dq:
        assert torch.equal(ours.dequantize(), theirs)


def test_quantize_formula():
    """Without bitsandbytes: each element's code is the nearest of the 16 to w / absmax (ties to the lower), two
    codes per byte with the even element high, absmax the block's largest magnitude."""
    w = _weight((6, 128))
    q = tritium.quantize_nf4(w, 64)
    codes = torch.tensor(NF4_CODE_VALUES, dtype=torch.float64)
    absmax = w.view(-1, 64).abs().amax(1)
    assert torch.equal(q.absmax, absmax)
    scaled = (w.view(-1, 64).double() / absmax.double()[:, None]).view(-1)
    idx = (scaled[:, None] - codes[None, :]).abs().argmin(1)      # first (lowest) of equal distances
    packed = (idx[0::2] << 4 | idx[1::2]).to(torch.uint8)
    assert torch.equal(q.data.view(-1), packed)
    ref = dequantize_nf4_reference(q)
    assert torch.equal(ref.view(-1), codes[idx] * absmax.double().repeat_interleave(64))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("dq", (False, True), ids=("plain", "double"))
def test_dequantize(isa, dtype, dq):
    """The kernel's dequantisation is the float64 formula rounded to dtype, exactly (N odd, blocksize 128)."""
    q = tritium.quantize_nf4(_weight((37, 384)), 128, dq)
    assert torch.equal(tritium.nf4_dequantize(q, dtype), dequantize_nf4_reference(q).float().to(dtype))


def _linear_case(dtype, m, n, k, bs, bias=True, dq=False):
    q = tritium.quantize_nf4(_weight((n, k), seed=m), bs, dq)
    w64 = dequantize_nf4_reference(q)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    b = torch.randn(n, dtype=torch.float64).to(dtype) if bias else None
    dy = torch.randn(m, n, dtype=torch.float64)
    xl = x.clone().requires_grad_(True)
    y = tritium.nf4_linear(xl, q, b)
    (dx,) = torch.autograd.grad(y, xl, dy.to(dtype))

    def fn(x_):
        return F.linear(x_, w64.to(x_.dtype), None if b is None else b.to(x_.dtype))

    (ty, (tdx,)), (ry, (rdx,)) = torch_and_ref(fn, [x], dy, dtype)
    what = f"{m}x{n}x{k} bs{bs} {dtype}"
    assert_within_torch_error(y, ty, ry, f"y {what}")
    assert_within_torch_error(dx, tdx, rdx, f"dx {what}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("m", (1, 5, 16, DECODE_ROWS - 1, DECODE_ROWS, 70), ids=lambda m: f"M{m}")
def test_linear(isa, dtype, m):
    """Rows on both sides of the CPU kernel's decode / GEMM switch; N odd (not a multiple of any vector or tile),
    K = 3 blocks of 64."""
    _linear_case(dtype, m, 37, 192, 64)


@pytest.mark.parametrize("bs,dq,bias", [(128, True, False), (256, False, True), (64, True, True)], ids=str)
def test_linear_formats(isa, bs, dq, bias):
    _linear_case(torch.float32, 3, 21, 768, bs, bias, dq)
    _linear_case(torch.bfloat16, 40, 21, 768, bs, bias, dq)


def test_float64_and_batch_dims():
    """float64 x goes through the float64 dequantised weight; leading dims are kept."""
    q = tritium.quantize_nf4(_weight((9, 64)))
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    torch.testing.assert_close(tritium.nf4_linear(x, q), x @ dequantize_nf4_reference(q).t(), rtol=0, atol=1e-12)
    x32 = x.float()
    assert tritium.nf4_linear(x32, q).shape == (2, 3, 9)


def test_compile_fullgraph():
    q = tritium.quantize_nf4(_weight((37, 128)), 64, True)
    b = torch.randn(37)

    def f(x):
        return tritium.nf4_linear(x, q, b).square().sum()

    cf = torch.compile(f, fullgraph=True)
    for m in (3, 40):
        x = torch.randn(m, 128, requires_grad=True)
        (g1,) = torch.autograd.grad(f(x), x)
        x2 = x.detach().clone().requires_grad_(True)
        (g2,) = torch.autograd.grad(cf(x2), x2)
        torch.testing.assert_close(g2, g1)


def test_blocksizes_and_isa_names():
    assert BLOCKSIZES == (64, 128, 256, 512, 1024, 2048, 4096)
    with pytest.raises(RuntimeError, match="unknown kernel set 'sse'"):
        torch.ops.tritium_runtime.nf4_isa("sse")


def test_errors():
    w = _weight((8, 128))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        tritium.quantize_nf4(w, 32)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        tritium.quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight must be non-empty"):
        tritium.quantize_nf4(torch.empty(0, 64))
    q = tritium.quantize_nf4(w)
    with pytest.raises(ValueError, match=r"x must be \(\*, in_features\) = \(\*, 128\), got shape \(3, 100\)"):
        tritium.nf4_linear(torch.randn(3, 100), q)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        tritium.nf4_linear(torch.ones(3, 128, dtype=torch.int64), q)
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        tritium.nf4_linear(torch.randn(3, 128), w)
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\) = \(8,\)"):
        tritium.nf4_linear(torch.randn(3, 128), q, torch.randn(9))
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        tritium.nf4_linear(torch.randn(3, 128), q, torch.randn(8, dtype=torch.float64))
    # in_features not a multiple of the blocksize: quantizes (bitsandbytes' flat blocks), but the linear op refuses
    odd = tritium.quantize_nf4(_weight((8, 100)))
    with pytest.raises(ValueError, match=r"in_features \(100\) must be a multiple of its blocksize \(64\)"):
        tritium.nf4_linear(torch.randn(3, 100), odd)
    assert tritium.nf4_dequantize(odd).shape == (8, 100)    # the float64 formula serves any shape
    with pytest.raises(ValueError, match="must stand for a 2-D"):
        tritium.nf4_linear(torch.randn(3, 64), tritium.quantize_nf4(torch.randn(2, 4, 64)))
    # the C++ op's own checks, for callers of torch.ops.tritium directly
    with pytest.raises(RuntimeError, match="absmax must be contiguous float32"):
        torch.ops.tritium.nf4_linear_fwd(torch.randn(2, 128), q.data.view(-1), q.absmax[:-1], None, 8, 128, 64)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        torch.ops.tritium.nf4_linear_fwd(torch.randn(2, 128), q.data.view(-1), q.absmax, None, 8, 128, 96)
