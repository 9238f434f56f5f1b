"""Quantized weights on CPU (tritium.ops.quant, csrc/quant.cpp): the packed layout round-trips bit for bit, the
dequantised weight is exactly the logical format's (reference.quant_weight), the products match a float64
reference of the same quantized weight within 2x torch's own error, on every instruction set this CPU has (the
kernels are chosen at run time: each set is forced in turn), and the modules, quantize_ and the errors behave."""
from __future__ import annotations

import io

import pytest
import torch

import tritium
from tritium import reference
from tritium.nn import QuantizedLinear
from tritium.ops.quant import (BF16_TILE_ROWS, FLOAT_ROWS, FLOAT_ROWS_16, QuantizedWeight, activation_terms, bf16_tiles,
                               n_groups, quant_dequantize, quant_linear, quant_pack, quant_unpack, quantize_logical)
from tests.util import assert_within_torch_error

_ALL_ISAS = ("amx_int8", "avx512_bf16", "avx512_vnni", "avx512", "avx2")


def _available():
    out = []
    for name in _ALL_ISAS:
        try:
            torch.ops.tritium_runtime.quant_isa(name)
            out.append(name)
        except RuntimeError:
            pass
    torch.ops.tritium_runtime.quant_isa("auto")
    return out


ISAS = _available()


@pytest.fixture(params=ISAS)
def isa(request):
    torch.ops.tritium_runtime.quant_isa(request.param)
    yield request.param
    torch.ops.tritium_runtime.quant_isa("auto")


# (bits, group, mins, scale dtype, K): every format the sources produce, K not a multiple of 32 where the group
# allows it (padding), group 16 (Q6_K), per-channel (group = padded K)
FORMATS = [
    (4, 32, True, torch.float16, 72),     # Q4_1
    (4, 32, False, torch.float16, 72),    # Q4_0
    (8, 32, False, torch.float16, 72),    # Q8_0
    (4, 32, True, torch.float32, 96),     # Q4_K
    (8, 32, True, torch.float32, 96),     # Q5_K
    (8, 16, False, torch.float32, 96),    # Q6_K
    (4, 64, True, torch.float16, 120),    # int4, group 64
    (8, 128, False, torch.float32, 100),  # int8 per channel (group = padded K)
]


def logical(n, k, bits, group, mins, sdt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ng = n_groups(k, group)
    q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=gen)
    s = ((torch.rand(n, ng, generator=gen) + 0.1) * 0.02).to(sdt)
    m = (torch.randn(n, ng, generator=gen) * 0.02).to(sdt) if mins else None
    return q, s, m


@pytest.mark.parametrize("bits,group,mins,sdt,k", FORMATS)
@pytest.mark.parametrize("n", [1, 16, 37])
def test_pack_unpack_round_trip_is_bit_exact(bits, group, mins, sdt, k, n):
    q, s, m = logical(n, k, bits, group, mins, sdt)
    packed = quant_pack(q, s, m, bits, group)
    q2, s2, m2 = quant_unpack(*packed, bits, group, n, k)
    assert torch.equal(q2, q) and torch.equal(s2, s) and s2.dtype == sdt
    assert torch.equal(m2, m) if mins else m2.numel() == 0


@pytest.mark.parametrize("bits,group,mins,sdt,k", FORMATS)
def test_dequantize_is_the_logical_weight(bits, group, mins, sdt, k):
    n = 37
    q, s, m = logical(n, k, bits, group, mins, sdt)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    want = reference.quant_weight(q, s, m, bits, group)
    assert torch.equal(w.dequantize(), want)   # one float32 rounding on both sides: equal, not close
    rows = torch.tensor([36, 0, 17, 17])
    assert torch.equal(w.dequantize(rows=rows), want[rows])
    assert torch.equal(w.dequantize(torch.bfloat16), want.bfloat16())


@pytest.mark.parametrize("bits,group,mins,sdt,k", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m_rows", [1, 5, 37, 400])   # 37: one GEMM (16-bit: its own), 400: past the AMX-BF16 tiles
def test_linear_float_activations(isa, bits, group, mins, sdt, k, dtype, m_rows):
    n = 48 if m_rows == 400 else 37   # 48: whole tiles of 16 rows, float32's GEMM on tritium's panels
    q, s, m = logical(n, k, bits, group, mins, sdt, seed=m_rows)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    x = torch.randn(m_rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    wf = reference.quant_weight(q, s, m, bits, group)
    ref = x.double() @ wf.double().t()
    torch_out = x @ wf.to(dtype).t()
    assert_within_torch_error(w.linear(x), torch_out, ref, f"{isa} {bits}-bit group {group} {dtype}")


@pytest.mark.parametrize("bits,group,mins,sdt,k", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_rows", [1, 6, 21])   # 21: AMX's passes of 16 rows, the last one padded
@pytest.mark.parametrize("terms", [1, 2])
def test_linear_int8_activations(isa, bits, group, mins, sdt, k, dtype, m_rows, terms):
    """int8_act: the product of the activations as the kernel quantizes them (reference.quantize_int8_act: per
    block of 32, absmax / 127, round half to even; two terms: the same of what the first left over) and the
    weight: against float64, within 2x what a float32 (16-bit: that dtype's) matmul of the same operands makes."""
    n = 37
    q, s, m = logical(n, k, bits, group, mins, sdt, seed=3)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    x = torch.randn(m_rows, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    # float64, exactly the kernel's activations (x itself where AMX-BF16 tiles take the rows: activation_terms)
    used = activation_terms(terms, m_rows, dtype, bits, group)
    xq = reference.quantize_int8_act(x, used) if used else x.double()
    wf = reference.quant_weight(q, s, m, bits, group)
    ref = xq @ wf.double().t()
    torch_out = (xq.float() @ wf.t()).to(dtype)
    assert_within_torch_error(w.linear(x, int8_act=terms), torch_out, ref,
                              f"{isa} {bits}-bit int8 act x{terms} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_int8_terms_from_float_rows_take_float_activations(isa, dtype):
    """From FLOAT_ROWS rows (FLOAT_ROWS_16 for 16-bit x: a prefill) int8_act 2 is the float-activation product bit
    for bit (one GEMM, exact and faster there than two integer passes); one term stays int8 at any row count (but
    where AMX-BF16 tiles take bfloat16 rows: activation_terms); below it two terms differ from float (a 16-bit
    decode step of FLOAT_ROWS rows among them: no longer a dequantise-and-GEMM per call)."""
    k, n = 96, 37
    q, s, m = logical(n, k, 4, 32, True, torch.float16, seed=7)
    w = QuantizedWeight.from_logical(q, s, m, 4, 32)
    rows = FLOAT_ROWS if dtype == torch.float32 else FLOAT_ROWS_16
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(8)).to(dtype)
    assert activation_terms(2, FLOAT_ROWS) == 0 and activation_terms(2, FLOAT_ROWS - 1) == 2
    assert activation_terms(2, FLOAT_ROWS_16, torch.bfloat16) == 0
    assert torch.equal(w.linear(x, int8_act=2), w.linear(x, int8_act=0))
    assert not torch.equal(w.linear(x[:5], int8_act=2), w.linear(x[:5], int8_act=0))
    if dtype != torch.float32 and activation_terms(2, FLOAT_ROWS, dtype) == 2:
        assert activation_terms(2, FLOAT_ROWS_16 - 1, dtype) == 2
        assert not torch.equal(w.linear(x[:FLOAT_ROWS], int8_act=2), w.linear(x[:FLOAT_ROWS], int8_act=0))
    wf = reference.quant_weight(q, s, m, 4, 32)
    used = activation_terms(1, rows, dtype)
    xq = reference.quantize_int8_act(x, used) if used else x.double()
    assert_within_torch_error(w.linear(x, int8_act=1), (xq.float() @ wf.t()).to(dtype), xq @ wf.double().t(),
                              f"{isa} one int8 term at {rows} rows {dtype}")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mins", [True, False], ids=("mins", "sym"))
@pytest.mark.parametrize("group,sdt,k", [(32, torch.float16, 72), (64, torch.float32, 250), (128, torch.float16, 1000)])
def test_bf16_tiles_multiply_exactly(isa, bits, mins, group, sdt, k):
    """AMX-BF16 tiles (bfloat16 x, BF16_TILE_ROWS rows or more): every int8_act mode the tiles take (4-bit: all,
    8-bit: 0 and 2) gives the float-activation product, within 2x the error of torch's float32 matmul of the same
    operands (the tiles take x's values as they are and each weight as 128 + q, 8-bit: 16 (128 + high nibble) and
    128 + low nibble, exact in bfloat16); the other modes and fewer rows stay int8; odd K (zero padding), passes of
    16 rows with a partial last one."""
    if not bf16_tiles(torch.bfloat16, bits, group, 0):
        pytest.skip(f"kernel set {isa} on this CPU ({', '.join(tritium.utils.cpu_features())}) multiplies {bits}-bit "
                    f"weights by bfloat16 x neither on AMX-BF16 tiles nor by AVX512-BF16 pairs")
    n = 53
    q, s, m = logical(n, k, bits, group, mins, sdt, seed=11)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    wf = reference.quant_weight(q, s, m, bits, group)
    tiled = [a for a in (0, 1, 2) if bf16_tiles(torch.bfloat16, bits, group, a)]
    assert tiled == (([0, 1, 2] if bits == 4 else [0, 2]) if isa == "amx_int8" else [0, 2])
    for rows in (BF16_TILE_ROWS, 21, 100):
        x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).bfloat16()
        ref = x.double() @ wf.double().t()
        outs = {a: w.linear(x, int8_act=a) for a in (0, 1, 2)}
        assert all(torch.equal(outs[0], outs[a]) for a in tiled), f"{rows} rows: tiled modes differ"
        terms = [activation_terms(a, rows, torch.bfloat16, bits, group) for a in (0, 1, 2)]
        assert terms == [0 if a in tiled else a for a in (0, 1, 2)], f"{rows} rows: {terms}"
        assert_within_torch_error(outs[0], (x.float() @ wf.t()).bfloat16(), ref, f"bf16 tiles {rows}x{n}x{k}")
        if bits == 8:   # one int8 term, on int8 tiles at every row count (not the tiles, not a float GEMM)
            xq = reference.quantize_int8_act(x, 1)
            assert_within_torch_error(outs[1], (xq.float() @ wf.t()).bfloat16(), xq @ wf.double().t(),
                                      f"8-bit, one int8 term, {rows}x{n}x{k}")
    x = torch.randn(BF16_TILE_ROWS - 1, k).bfloat16()
    assert activation_terms(1, BF16_TILE_ROWS - 1, torch.bfloat16, bits, group) == 1
    assert not torch.equal(w.linear(x, int8_act=1), w.linear(x, int8_act=0))


@pytest.mark.parametrize("bits,group,mins,sdt,k", [(4, 32, True, torch.float16, 72), (4, 32, False, torch.float16, 72),
                                                   (8, 32, False, torch.float16, 72),
                                                   (4, 64, True, torch.float32, 250)])
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33])
def test_bf16_rows_against_float64(isa, bits, group, mins, sdt, k, rows):
    """bfloat16 x of a batched decode step's row counts (below BF16_TILE_ROWS, one and two passes of the exact
    kernels' 8 rows with a partial last one), odd N and K: every int8_act mode against a float64 product of the
    activations the kernel takes (activation_terms) and the dequantised weight, within 2x torch's error."""
    n = 37
    q, s, m = logical(n, k, bits, group, mins, sdt, seed=rows)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    wf = reference.quant_weight(q, s, m, bits, group)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1)) * 2).bfloat16()
    for a in (0, 1, 2):
        used = activation_terms(a, rows, torch.bfloat16, bits, group)
        xq = reference.quantize_int8_act(x, used) if used else x.double()
        assert_within_torch_error(w.linear(x, int8_act=a), (xq.float() @ wf.t()).bfloat16(), xq @ wf.double().t(),
                                  f"{isa} {bits}-bit group {group} int8_act {a}, {rows}x{n}x{k}")


@pytest.mark.parametrize("bits,group,mins,sdt,k", [(4, 32, True, torch.float16, 200),
                                                   (4, 32, False, torch.float16, 200),
                                                   (8, 32, False, torch.float16, 200),
                                                   (4, 64, True, torch.float32, 250)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 16, 17, 33])
def test_int8_rows_of_a_batched_decode_step_against_float64(isa, bits, group, mins, sdt, k, dtype, rows):
    """One and two int8 terms at a batched decode step's row counts (the VNNI kernels' passes of 16 and 8 rows,
    then 4, 2, 1; two terms double the int8 rows), odd N (a partial last tile) and K (zero padding): against a
    float64 product of the activations the kernel takes (activation_terms) and the dequantised weight, within 2x
    torch's error."""
    n = 45
    q, s, m = logical(n, k, bits, group, mins, sdt, seed=rows + 40)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    wf = reference.quant_weight(q, s, m, bits, group)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 41)) * 2).to(dtype)
    for a in (1, 2):
        used = activation_terms(a, rows, dtype, bits, group)
        xq = reference.quantize_int8_act(x, used) if used else x.double()
        assert_within_torch_error(w.linear(x, int8_act=a), (xq.float() @ wf.t()).to(dtype), xq @ wf.double().t(),
                                  f"{isa} {bits}-bit group {group} int8_act {a} {dtype}, {rows}x{n}x{k}")


def test_two_int8_terms_are_near_float():
    """Two int8 terms leave about 1/254 of one term's activation error: with an outlier channel setting each
    block's scale, one term's product error is orders of magnitude above float32's, two terms' near it."""
    k, n = 256, 64
    q, s, m = logical(n, k, 4, 32, True, torch.float16, seed=5)
    w = QuantizedWeight.from_logical(q, s, m, 4, 32)
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(6))
    x[:, 3::32] *= 50                                        # one outlier per block
    ref = x.double() @ reference.quant_weight(q, s, m, 4, 32).double().t()
    err = [(w.linear(x, int8_act=t).double() - ref).abs().max().item() / ref.abs().max().item() for t in (0, 1, 2)]
    assert err[2] < err[1] / 100 and err[2] < 1e-4, err


def test_int8_activation_quantization_rounds_half_to_even():
    """A block whose values sit exactly on .5 steps of the scale: round half to even, as reference says."""
    k = 32
    x = torch.zeros(1, k)
    x[0, 0] = 127.0                      # scale 1: x_q = round(x)
    x[0, 1:5] = torch.tensor([0.5, 1.5, 2.5, -0.5])
    q = torch.full((1, k), 128, dtype=torch.uint8)
    q[0, 1:5] = 129                      # weight 1 at elements 1..4 (8-bit symmetric, scale 1)
    w = QuantizedWeight.from_logical(q, torch.ones(1, 1), None, 8, 32)
    # the sum over elements 1..4 of round-half-even(x): 0 + 2 + 2 + 0
    assert w.linear(x, int8_act=True).item() == 4.0
    assert w.linear(x).item() == 4.0     # float activations: 0.5 + 1.5 + 2.5 - 0.5


@pytest.mark.parametrize("bits,group,mins,sdt,k", FORMATS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,n", [((2, 3), 29), ((70,), 48)])   # 70 x 48: float32's GEMM on tritium's panels
def test_input_gradient(bits, group, mins, sdt, k, dtype, lead, n):
    """dy @ W (quant_linear_dx): 16-bit dy multiplied in its dtype on the weight dequantised in it, float32 on the
    float32 weight; within 2x torch's error (its product on the dequantised weight in dtype) of float64."""
    q, s, m = logical(n, k, bits, group, mins, sdt)
    w = QuantizedWeight.from_logical(q, s, m, bits, group)
    x = torch.randn(*lead, k).to(dtype).requires_grad_(True)
    dy = torch.randn(*lead, n).to(dtype)
    (w.linear(x) * dy).sum().backward()
    wf = reference.quant_weight(q, s, m, bits, group).double()
    ref = dy.double() @ wf
    torch_out = dy @ wf.to(dtype)
    assert x.grad.dtype == dtype
    assert_within_torch_error(x.grad, torch_out, ref, f"input gradient {dtype}")


def test_zero_and_empty_rows():
    q, s, m = logical(20, 64, 4, 32, True, torch.float16)
    w = QuantizedWeight.from_logical(q, s, m, 4, 32)
    assert w.linear(torch.zeros(0, 64)).shape == (0, 20)
    zero = w.linear(torch.zeros(2, 64), int8_act=True)      # an all-zero block: scale 0, no division by zero
    assert torch.equal(zero, torch.zeros(2, 20))


def test_quantize_int8_per_channel_and_int4_groups():
    w = torch.randn(45, 96)
    q8 = QuantizedWeight.quantize(w, "int8")
    assert (q8.bits, q8.group, q8.has_mins) == (8, 96, False)
    step = w.abs().amax(1, keepdim=True) / 127                 # one scale per output channel
    assert ((q8.dequantize() - w).abs() <= step / 2 * (1 + 1e-6)).all()
    q4 = QuantizedWeight.quantize(w, "int4", 32)
    assert (q4.bits, q4.group, q4.has_mins) == (4, 32, True)
    blocks = w.view(45, 3, 32)
    step4 = (blocks.amax(-1) - blocks.amin(-1)) / 15
    err = (q4.dequantize() - w).view(45, 3, 32).abs().amax(-1)
    assert (err <= step4 * 0.5 + step4 * 2e-3 + 1e-6).all()   # half a step, plus the float16 rounding of the scale


def test_quantize_errors():
    w = torch.randn(8, 100)
    with pytest.raises(ValueError, match="group_size 32 does not divide the weight's in_features 100"):
        QuantizedWeight.quantize(w, "int4", 32)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32, got 48"):
        QuantizedWeight.quantize(w, "int4", 48)
    with pytest.raises(ValueError, match="mode must be 'int8' or 'int4', got 'int3'"):
        QuantizedWeight.quantize(w, "int3")
    with pytest.raises(ValueError, match="2-D float tensor"):
        QuantizedWeight.quantize(torch.ones(8, dtype=torch.int64), "int8")


def test_op_errors_name_the_argument():
    q, s, m = logical(20, 64, 4, 32, True, torch.float16)
    w = QuantizedWeight.from_logical(q, s, m, 4, 32)
    with pytest.raises(RuntimeError, match=r"quant_linear: x must be \(M, 64\), got \[3, 65\]"):
        quant_linear(torch.randn(3, 65), w.qdata, w.scales, w.mins, 4, 32, 20, 64, 0)
    with pytest.raises(RuntimeError, match="quant_linear: x must be float32, bfloat16 or float16, got Double"):
        quant_linear(torch.randn(3, 64, dtype=torch.float64), w.qdata, w.scales, w.mins, 4, 32, 20, 64, 0)
    with pytest.raises(RuntimeError, match=r"int8_act must be 0 \(float activations\), 1 or 2 \(int8 terms\), got 3"):
        quant_linear(torch.randn(3, 64), w.qdata, w.scales, w.mins, 4, 32, 20, 64, 3)
    with pytest.raises(ValueError, match=r"QuantizedLinear: int8_act must be 0 \(float\), 1 or 2 .*, got 3"):
        tritium.nn.QuantizedLinear(w, int8_act=3)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8, got 3"):
        quant_pack(q, s, m, 3, 32)
    with pytest.raises(RuntimeError, match="group must be 16 or a multiple of 32, got 48"):
        quant_pack(q, s, m, 4, 48)
    with pytest.raises(RuntimeError, match="group 16 is for symmetric 8-bit weights"):
        quant_pack(q, torch.ones(20, 4, dtype=torch.float16), None, 4, 16)
    with pytest.raises(RuntimeError, match="q holds values of 5 bits or more"):
        quant_pack(q + 16, s, m, 4, 32)
    with pytest.raises(RuntimeError, match=r"scales must be float16 or float32 \(20, 2\)"):
        quant_pack(q, s[:, :1], m, 4, 32)
    with pytest.raises(RuntimeError, match="qdata must be quant_pack's"):
        quant_dequantize(w.qdata[:1], w.scales, w.mins, 4, 32, 20, 64, torch.float32)
    with pytest.raises(RuntimeError, match="rows must index the weight's 20 rows, got 20"):
        w.dequantize(rows=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match=r"quantized linear: x must end in k = 64, got \(3, 63\)"):
        w.linear(torch.randn(3, 63))


def test_isa_switch_reports_and_validates():
    assert torch.ops.tritium_runtime.quant_isa() in _ALL_ISAS
    # the kernel sets of the build imported (the AVX2 build holds no AVX-512 code)
    built = "amx_int8, avx512_bf16, avx512_vnni, avx512, avx2" if tritium._kernels.WIDTH == "avx512" else "avx2"
    with pytest.raises(RuntimeError, match=f"unknown kernel set 'sse'; expected one of {built} or auto"):
        torch.ops.tritium_runtime.quant_isa("sse")
    assert torch.ops.tritium_runtime.quant_isa("auto") == ISAS[0]


# ---- modules ----
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40, bias=False))


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_quantize_module_in_place(mode, group):
    model = _mlp()
    x = torch.randn(7, 64)
    ref_weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    tritium.quantize_(model, mode, group_size=group)
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[2], QuantizedLinear)
    assert model[0].bias is not None and model[2].bias is None
    # the module computes exactly x @ dequantized^T + b (float64 reference within 2x torch's error)
    w0 = model[0].weight.dequantize()
    h_ref = x.double() @ w0.double().t() + model[0].bias.double()
    assert_within_torch_error(model[0](x), x @ w0.t() + model[0].bias, h_ref, "QuantizedLinear")
    # and stays close to the float layer: quantization error only
    rel = (model[0].weight.dequantize() - ref_weights[0]).abs().max() / ref_weights[0].abs().max()
    assert rel < (0.01 if mode == "int8" else 0.1)


def test_quantize_filter_and_group_error():
    model = _mlp()
    tritium.quantize_(model, "int8", filter=lambda m, name: name == "2")
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], QuantizedLinear)
    with pytest.raises(ValueError, match="group_size 64 does not divide the weight's in_features 96"):
        tritium.quantize_(_mlp(), "int4", group_size=64)


def test_state_dict_round_trip():
    a = tritium.quantize_(_mlp(), "int4", group_size=32, int8_act=2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    torch.manual_seed(123)
    b = tritium.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                              torch.nn.Linear(96, 40, bias=False)), "int8")
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(5, 64)
    assert torch.equal(a(x), b(x))
    assert b[0].int8_act == 2 and b[0].weight.bits == 4
    for la, lb in ((a[0], b[0]), (a[2], b[2])):
        for qa, qb in zip(la.weight.logical(), lb.weight.logical()):
            assert (qa is None and qb is None) or torch.equal(qa, qb)


def test_module_dtype_cast_keeps_the_quantized_storage():
    m = tritium.quantize_(_mlp(), "int4")
    scales = m[0].weight.scales
    m.to(torch.bfloat16)
    assert m[0].weight.scales is scales and scales.dtype == torch.float16
    assert m[0].bias.dtype == torch.bfloat16
    assert m(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_frozen_base_training_step():
    """QLoRA-style: the quantized layer is frozen, the input gradient flows to what comes before it."""
    torch.manual_seed(0)
    first = torch.nn.Linear(16, 64)
    model = torch.nn.Sequential(first, tritium.nn.QuantizedLinear.from_linear(torch.nn.Linear(64, 8), "int8"))
    x = torch.randn(4, 16)
    model(x).square().sum().backward()
    w = model[1].weight.dequantize()
    h = first(x)
    y = h @ w.t() + model[1].bias
    dh = (2 * y) @ w
    want = dh.t() @ x
    torch.testing.assert_close(first.weight.grad, want, rtol=1e-5, atol=1e-5)
    assert not model[1].bias.requires_grad


def test_compile_fullgraph():
    m = tritium.quantize_(_mlp(), "int4")
    x = torch.randn(3, 64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), m(x))


def test_logical_quantize_is_what_quantize_packs():
    w = torch.randn(33, 64)
    q, s, m, bits, group = quantize_logical(w, "int4", 32)
    qw = QuantizedWeight.quantize(w, "int4", 32)
    q2, s2, m2 = qw.logical()
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(m, m2)
