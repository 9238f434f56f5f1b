"""Quantized linear layers, Triton (interpreter), against the float64 references (tritium.reference.quant_weight,
quant_linear, quantize_int8_act; docs/quantization.md).

Bounds: pack/unpack, dequantize and the int8 quantization of the activations are exact (the format specifies one
float32 rounding, the activation scale and the round half to even); the matmuls' error is at most 2x that of
torch's own matmul in the dtype (x, or the quantized activations, times the dequantised weight in that dtype)
against the float64 product. Shapes are small (the interpreter is slow) but reach every path: K not a multiple
of 32 (nor of 64: the 4-bit rows' padding), several K steps, odd N, M of one and several programs, every group
kind (16, 32, 64, 128, a whole padded row), float16 and float32 scales, with and without mins.
"""
import pytest
import torch

import tritium  # noqa: F401  (registers the ops kernels/quant.py imports its helpers from)
from tests.util import (KERNEL_DTYPES, assert_within_torch_error, check_gpu_compile, interpreter_bf16_dot,
                        on_device)
from tritium import reference
from tritium.kernels import quant
from tritium.ops.quant import activation_terms, n_groups

triton_quant = on_device(quant)

# (bits, group): 16 is 8-bit only (Q6_K); 96 is a whole padded row of K = 72 (per-channel int8)
GROUPS = [(8, 16), (8, 32), (8, 64), (8, 96), (8, 128), (4, 32), (4, 64), (4, 128)]
K = 72  # not a multiple of 32 (nor of 64: the 4-bit rows pad to 128)
N = 37


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    """bf16 dots in the interpreter as a GPU computes them (tests/util.py interpreter_bf16_dot)."""
    with interpreter_bf16_dot():
        yield


def _weight(n, k, bits, group, has_mins, sdtype=None):
    """A random logical weight: q uniform over [0, 2**bits), positive scales, negative mins (or None). Scales are
    float32 for groups 16 and 64 (the K-quants' products), float16 otherwise, unless sdtype says."""
    sdtype = sdtype or (torch.float32 if group in (16, 64) else torch.float16)
    ng = n_groups(k, group)
    q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, ng, dtype=torch.float64) * 0.02 + 0.002).to(sdtype)
    mins = -(torch.rand(n, ng, dtype=torch.float64) * 0.1).to(sdtype) if has_mins else None
    return q, scales, mins


def _packed(q, scales, mins, bits, group):
    return triton_quant.quant_pack(q, scales, mins, bits, group)


def _ids(case):
    return f"q{case[0]}g{case[1]}"


# (bits, group, k) with the group no wider than the padded row (a wider group is not a format)
_ROUND_TRIP = [(b, g, k) for b, g in GROUPS for k in (K, 64, 200) if g <= 32 * -(-k // 32)]


@pytest.mark.parametrize("has_mins", (False, True), ids=("sym", "mins"))
@pytest.mark.parametrize("bits,group,k", _ROUND_TRIP, ids=[f"q{b}g{g}k{k}" for b, g, k in _ROUND_TRIP])
def test_pack_unpack_round_trip(bits, group, has_mins, k):
    q, scales, mins = _weight(N, k, bits, group, has_mins)
    qdata, s, m = _packed(q, scales, mins, bits, group)
    assert (tuple(qdata.shape), tuple(s.shape), tuple(m.shape)) == quant.packed_shapes(N, k, bits, group, has_mins)
    assert qdata.dtype == torch.uint8 and s.dtype == scales.dtype and m.dtype == scales.dtype
    q2, s2, m2 = triton_quant.quant_unpack(qdata, s, m, bits, group, N, k)
    assert torch.equal(q2, q) and torch.equal(s2, scales)
    assert torch.equal(m2, mins) if has_mins else m2.shape == (0,)
    # the 4-bit layout: byte 32 c + j holds elements 64 c + j (low nibble) and 64 c + 32 + j (high nibble)
    if bits == 4 and k >= 64:
        assert torch.equal(qdata[:, :32], q[:, :32] | (q[:, 32:64] << 4))


@pytest.mark.parametrize("rows", (None, "rows"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("has_mins", (False, True), ids=("sym", "mins"))
@pytest.mark.parametrize("bits,group", GROUPS, ids=map(_ids, GROUPS))
def test_dequantize(bits, group, has_mins, dtype, rows):
    """Exactly the format's float32 weights rounded to dtype, all rows or a gather (repeated, out of order)."""
    q, scales, mins = _weight(N, K, bits, group, has_mins)
    packed = _packed(q, scales, mins, bits, group)
    ref = reference.quant_weight(q, scales, mins, bits, group, dtype)
    if rows is not None:
        rows = torch.tensor([36, 0, 5, 5, 17], dtype=torch.int64)
        ref = ref[rows]
    out = triton_quant.quant_dequantize(*packed, bits, group, N, K, dtype, rows)
    assert out.dtype == dtype
    assert torch.equal(out, ref)


def _linear_case(bits, group, has_mins, dtype, int8_act, m, k=K, n=N):
    q, scales, mins = _weight(n, k, bits, group, has_mins)
    packed = _packed(q, scales, mins, bits, group)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    out = triton_quant.quant_linear(x, *packed, bits, group, n, k, int8_act)
    terms = activation_terms(int8_act, m)            # two terms become float activations from FLOAT_ROWS rows
    x_in = reference.quantize_int8_act(x, terms) if terms else x.double()
    ref = reference.quant_linear(x_in, q, scales, mins, bits, group)
    theirs = x_in.to(dtype) @ reference.quant_weight(q, scales, mins, bits, group, dtype).t()
    assert_within_torch_error(out, theirs, ref, f"q{bits} g{group} mins={has_mins} {m}x{n}x{k} int8={int8_act}")


@pytest.mark.parametrize("int8_act", (0, 1, 2), ids=("float", "int8", "int8x2"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("has_mins", (False, True), ids=("sym", "mins"))
@pytest.mark.parametrize("bits,group", GROUPS, ids=map(_ids, GROUPS))
def test_linear(bits, group, has_mins, dtype, int8_act):
    """M = 1 (decode), 5 (a partial tile) and 70 (two programs of the prefill tile; float activations for
    int8_act 2)."""
    for m in (1, 5, 70):
        _linear_case(bits, group, has_mins, dtype, int8_act, m)


@pytest.mark.parametrize("int8_act", (0, 1, 2), ids=("float", "int8", "int8x2"))
@pytest.mark.parametrize("bits,group", [(8, 16), (8, 128), (4, 32), (4, 128)],
                         ids=["q8g16", "q8g128", "q4g32", "q4g128"])
def test_linear_long_rows(bits, group, int8_act):
    """Several K steps (groups across step boundaries), N over several programs, a strided x."""
    _linear_case(bits, group, True, torch.bfloat16, int8_act, 3, k=328, n=70)
    q, scales, mins = _weight(70, 328, bits, group, False)
    x = torch.randn(3, 400)[:, 10:338]
    out = triton_quant.quant_linear(x, *_packed(q, scales, mins, bits, group), bits, group, 70, 328, int8_act)
    x_in = reference.quantize_int8_act(x, int8_act) if int8_act else x.double()
    ref = reference.quant_linear(x_in, q, scales, mins, bits, group)
    assert_within_torch_error(out, x_in.float() @ reference.quant_weight(q, scales, mins, bits, group).t(), ref)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("has_mins", (False, True), ids=("sym", "mins"))
@pytest.mark.parametrize("bits,group", GROUPS, ids=map(_ids, GROUPS))
def test_linear_dx(bits, group, has_mins, dtype):
    q, scales, mins = _weight(N, K, bits, group, has_mins)
    packed = _packed(q, scales, mins, bits, group)
    w = reference.quant_weight(q, scales, mins, bits, group)
    for m in (1, 5, 70):
        dy = torch.randn(m, N, dtype=torch.float64).to(dtype)
        out = triton_quant.quant_linear_dx(dy, *packed, bits, group, N, K)
        assert_within_torch_error(out, dy @ w.to(dtype), dy.double() @ w.double(), f"q{bits} g{group} m={m}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_quantize_int8_act_exact(dtype):
    """The int8 activations are reference.quantize_int8_act's exactly: scales, ties rounded to even, an all-zero
    block (scale 0), a block of one tiny value, the zero padding of the last block."""
    x = torch.randn(6, 100, dtype=torch.float64).to(dtype)
    x[0, :32] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5] + [0.0] * 24, dtype=dtype)
    x[1, 32:64] = 0
    x[2, 64:96] = 0
    x[2, 70] = 1e-3
    xq, xd = triton_quant.quantize_int8_act(x)
    assert xq.shape == (6, 128) and xq.dtype == torch.int8 and xd.shape == (6, 4) and xd.dtype == torch.float32
    assert xq[0, :8].tolist() == [127, 2, 4, -2, -4, 0, 0, 2] and xd[0, 0] == 1.0
    assert xd[1, 1] == 0 and torch.equal(xq[1, 32:64], torch.zeros(32, dtype=torch.int8))
    assert torch.equal(xq[:, 100:], torch.zeros(6, 28, dtype=torch.int8))
    got = (xq.double().view(6, 4, 32) * xd.double()[:, :, None]).view(6, 128)[:, :100]
    assert torch.equal(got, reference.quantize_int8_act(x))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_quantize_int8_terms_exact(dtype):
    """Two int8 terms: row 2i is row i's quantize_int8_act, row 2i + 1 the residual's; together exactly
    reference.quantize_int8_act(x, 2)."""
    x = torch.randn(5, 100, dtype=torch.float64).to(dtype)
    x[1, 32:64] = 0
    xq, xd = triton_quant.quantize_int8_terms(x)
    assert xq.shape == (10, 128) and xd.shape == (10, 4)
    assert torch.equal(xq[0::2], triton_quant.quantize_int8_act(x)[0])
    got = (xq.double().view(10, 4, 32) * xd.double()[:, :, None]).view(5, 2, 128).sum(1)[:, :100]
    assert torch.equal(got, reference.quantize_int8_act(x, 2))


def test_empty_and_degenerate():
    """M = 0 gives (0, N); the launchers accept mins None or empty alike."""
    q, scales, _ = _weight(N, K, 8, 32, False)
    qdata, s, m = _packed(q, scales, None, 8, 32)
    assert m.shape == (0,)
    assert triton_quant.quant_linear(torch.randn(0, K), qdata, s, m, 8, 32, N, K, False).shape == (0, N)
    a = triton_quant.quant_dequantize(qdata, s, None, 8, 32, N, K, torch.float32)
    b = triton_quant.quant_dequantize(qdata, s, m, 8, 32, N, K, torch.float32)
    assert torch.equal(a, b)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every configuration the launchers choose compiles for sm_80/sm_90 without spills: each x dtype, both bit
    widths, mins or not, group 16 and a multiple of 32, float and int8 activations, the decode and prefill tiles,
    dx, dequantize with and without rows, and float32 scales."""

    def run():
        for dtype in KERNEL_DTYPES:
            for bits, group in ((8, 16), (8, 32), (4, 32)):
                for has_mins in (False, True):
                    q, scales, mins = _weight(N, K, bits, group, has_mins, torch.float16)
                    packed = quant.quant_pack(q, scales, mins, bits, group)
                    for m in (1, 20):
                        x = torch.randn(m, K).to(dtype)
                        for int8_act in (False, True):
                            quant.quant_linear(x, *packed, bits, group, N, K, int8_act)
                        quant.quant_linear_dx(torch.randn(m, N).to(dtype), *packed, bits, group, N, K)
                    quant.quant_dequantize(*packed, bits, group, N, K, dtype)
                    quant.quant_dequantize(*packed, bits, group, N, K, dtype, torch.tensor([3, 1]))
        for bits in (8, 4):
            q, scales, mins = _weight(N, K, bits, 32, True, torch.float32)
            packed = quant.quant_pack(q, scales, mins, bits, 32)
            for m in (1, 20):
                quant.quant_linear(torch.randn(m, K, dtype=torch.bfloat16), *packed, bits, 32, N, K, False)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_linear_kernel", "_act_quant_kernel", "_dx_kernel", "_dequant_kernel"}
