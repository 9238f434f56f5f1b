"""GGUF quantized tensors -> tritium's logical quantized weight (tritium.models.gguf.logical_quant), bit for bit.

- Hand-built blocks: test_gguf_blocks' packers write blocks of values chosen here (a stand-in for their random
  generator hands them out), so the expected q / scales / mins follow from the chosen integers and the table of
  docs/quantization.md, and the float weight is the packer's own hand-computed value.
- Random blocks and the embedded model file: reference.quant_weight of the logical weight against the ``gguf``
  package's dequantize.

Every comparison with a float weight is bit-exact (float32 bit patterns, signed zeros included), not only to
float32 rounding: in every supported formula each product is exact in float32. A float16 d has an 11-bit
significand; Q4_K / Q5_K multiply it by a 6-bit sub-scale and a 4- or 5-bit quant (22 bits at most); Q6_K by an
int8 sub-scale (7 significant bits: 128 is a power of two) and q - 32 in [-32, 31] (5 significant bits), 23 bits;
Q8_0 / Q4_0 / Q4_1 by one small integer; and no product overflows or leaves float32's normal range (float16
subnormals are float32 normals). So the only rounding is the one addition of the min (Q4_1, Q4_K, Q5_K),
rounded once by gguf's float32 ``d * q - dm`` and once by quant_weight's float64-then-float32 ``s * q + (-dm)``,
which are the same IEEE operation. The order of the products does not matter when none of them rounds.
"""
import random

import numpy as np
import pytest
import torch

import gguf
from tests.models.test_gguf_blocks import QK_K, QT, _q4_0, _q4_1, _q4_k, _q5_k, _q6_k, _q8_0, _write_tensor
from tritium.models.gguf import SUPPORTED_QUANT, _unpermute, dequantize, logical_quant, unpermute_rows
from tritium.models.gguf_file import GGUFFile
from tests.models.test_llama_smollm2 import model_path  # noqa: F401  (the embedded model's path, or a skip)
from tritium.reference import quant_weight


class _Chosen:
    """Stands in for the random.Random a packer of test_gguf_blocks draws from: hands out chosen values in the
    order the packer draws them, each checked against the range it asks for."""

    def __init__(self, values):
        self.values = list(values)
        self.i = 0

    def _next(self):
        v = self.values[self.i]
        self.i += 1
        return v

    def randint(self, a, b):
        v = self._next()
        assert a <= v <= b, (v, a, b)
        return v

    def choice(self, seq):
        v = self._next()
        assert v in seq, (v, seq)
        return v

    def done(self):
        return self.i == len(self.values)


def _scale(rng):
    """The two draws of test_gguf_blocks._scale (k in 1..1023, then the sign) and the scale k / 1024 * sign."""
    k, sign = rng.randint(1, 1023), rng.choice((-1, 1))
    return [k, sign], sign * k / 1024


def _ints(rng, lo, hi, n):
    """n integers in [lo, hi]: both ends first, so every block has its extremes, then random ones."""
    return [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]


# ---- per type: the draws of one block (packer order), and the logical q, scales, mins they give ----------------
def _spec_q8_0(rng):
    dd, d = _scale(rng)
    q = _ints(rng, -128, 127, 32)
    return dd + q, [x + 128 for x in q], [d], None


def _spec_q4_0(rng):
    dd, d = _scale(rng)
    q = _ints(rng, 0, 15, 32)
    return dd + q, q, [d], None


def _spec_q4_1(rng):
    dd, d = _scale(rng)
    md, m = _scale(rng)
    q = _ints(rng, 0, 15, 32)
    return dd + md + q, q, [d], [m]


def _spec_k(rng, qmax):
    dd, d = _scale(rng)
    nd, dmin = _scale(rng)
    sc, mn = _ints(rng, 0, 63, 8), _ints(rng, 0, 63, 8)
    q = _ints(rng, 0, qmax, QK_K)
    return dd + nd + sc + mn + q, q, [d * s for s in sc], [-dmin * m for m in mn]


def _spec_q6_k(rng):
    dd, d = _scale(rng)
    sc = _ints(rng, -128, 127, 16)
    L = _ints(rng, 0, 63, QK_K)
    return dd + sc + L, [x + 96 for x in L], [d * s for s in sc], None


# qtype: (packer, spec, bits, group, scale dtype, block size)
TYPES = {
    QT.Q8_0: (_q8_0, _spec_q8_0, 8, 32, torch.float16, 32),
    QT.Q4_0: (_q4_0, _spec_q4_0, 4, 32, torch.float16, 32),
    QT.Q4_1: (_q4_1, _spec_q4_1, 4, 32, torch.float16, 32),
    QT.Q4_K: (_q4_k, lambda rng: _spec_k(rng, 15), 4, 32, torch.float32, QK_K),
    QT.Q5_K: (_q5_k, lambda rng: _spec_k(rng, 31), 8, 32, torch.float32, QK_K),
    QT.Q6_K: (_q6_k, _spec_q6_k, 8, 16, torch.float32, QK_K),
}
ROWS, BLOCKS_PER_ROW = 3, 2


def test_supported_types_are_the_tested_ones():
    assert SUPPORTED_QUANT == ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
    assert tuple(t.name for t in TYPES) == SUPPORTED_QUANT


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same float32 bit patterns (signed zeros distinguished)."""
    return a.dtype == b.dtype == torch.float32 and a.shape == b.shape and torch.equal(a.view(torch.int32),
                                                                                      b.view(torch.int32))


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_hand_built_blocks_give_the_table_format(tmp_path, qtype):
    pack, spec, bits, group, sdtype, block = TYPES[qtype]
    rng = random.Random(1000 + int(qtype))
    raw_rows, w_rows, q_rows, s_rows, m_rows = [], [], [], [], []
    for _ in range(ROWS):
        raw, w, q, s, m = b"", [], [], [], []
        for _ in range(BLOCKS_PER_ROW):
            draws, bq, bs, bm = spec(rng)
            chosen = _Chosen(draws)
            r, v = pack(chosen)
            assert chosen.done(), "the packer drew fewer values than were chosen"
            raw += r
            w += v
            q += bq
            s += bs
            m += bm or []
        raw_rows.append(np.frombuffer(raw, dtype=np.uint8))
        w_rows.append(w)
        q_rows.append(q)
        s_rows.append(s)
        m_rows.append(m)
    t = _write_tensor(tmp_path, "w", np.stack(raw_rows), raw_dtype=qtype)
    q, scales, mins, got_bits, got_group = logical_quant(t)
    k = BLOCKS_PER_ROW * block

    # (1) the logical format of docs/quantization.md, from the chosen integers
    assert (got_bits, got_group) == (bits, group)
    assert q.dtype == torch.uint8 and q.shape == (ROWS, k)
    assert torch.equal(q, torch.tensor(q_rows, dtype=torch.uint8))
    assert int(q.max()) < 2 ** bits
    want_s = torch.tensor(s_rows, dtype=torch.float64)
    assert scales.dtype == sdtype and scales.shape == (ROWS, k // group)
    assert torch.equal(want_s.to(sdtype).double(), want_s), "the chosen scales must be exact in their dtype"
    assert torch.equal(scales.double(), want_s)
    if qtype in (QT.Q8_0, QT.Q4_0, QT.Q6_K):
        assert mins is None
    else:
        want_m = torch.tensor(m_rows, dtype=torch.float64)
        assert mins.dtype == sdtype and mins.shape == scales.shape
        assert torch.equal(mins.double(), want_m)

    # (2) the float weight it stands for: the packer's hand-computed values, exact in float32 (scales k / 1024
    # times small integers), so the comparison is bit for bit
    want_w = torch.tensor(w_rows, dtype=torch.float64)
    assert torch.equal(want_w.float().double(), want_w)
    got_w = quant_weight(q, scales, mins, bits, group)
    assert torch.equal(got_w.double(), want_w)
    assert _bits_equal(got_w, torch.from_numpy(dequantize(t)))


# byte offsets of each type's float16 fields (d, and dmin / m), which random blocks fill with finite values
F16_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def _finite_f16_bits(rng: np.random.Generator, shape) -> np.ndarray:
    """Random float16 bit patterns of finite values: every exponent (subnormals and zeros too), both signs."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    inf_nan = (bits & 0x7C00) == 0x7C00
    bits[inf_nan] &= 0xBFFF   # clear the exponent's top bit: a finite value
    return bits


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_random_blocks_match_gguf_dequantize(tmp_path, qtype):
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    rows, blocks = 7, 3 if block == QK_K else 9
    raw = rng.integers(0, 256, size=(rows, blocks, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[..., off:off + 2] = _finite_f16_bits(rng, (rows, blocks)).view(np.uint8).reshape(rows, blocks, 2)
    t = _write_tensor(tmp_path, "w", raw.reshape(rows, blocks * nbytes), raw_dtype=qtype)
    logical = logical_quant(t)
    assert logical[0].shape == (rows, blocks * block)
    want = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(rows, blocks * block)
    assert np.isfinite(want).all()
    assert _bits_equal(quant_weight(*logical), torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32)))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K],
                         ids=lambda q: q.name)
def test_unsupported_type_is_an_error_naming_it(tmp_path, qtype):
    if qtype in (QT.F32, QT.F16):
        data, raw_dtype = np.zeros((2, 64), dtype=np.float32 if qtype == QT.F32 else np.float16), None
    else:
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        data, raw_dtype = np.zeros((2, 256 // block * nbytes), dtype=np.uint8), qtype
    t = _write_tensor(tmp_path, "blk.0.attn_q.weight", data, raw_dtype=raw_dtype)
    assert t.tensor_type == qtype
    with pytest.raises(ValueError) as e:
        logical_quant(t)
    msg = str(e.value)
    assert "'blk.0.attn_q.weight'" in msg and qtype.name in msg
    assert all(name in msg for name in SUPPORTED_QUANT)
    assert "F32, F16 and BF16" in msg and "float" in msg


# ---- the embedded model file (SmolLM2-135M-Instruct: Q4_1 layers and a Q8_0 embedding) --------------------------
@pytest.fixture(scope="module")
def model_reader(model_path):  # noqa: F811
    return GGUFFile(model_path)


SAMPLE_ROWS = 48   # rows of each tensor compared with dequantize (all of them converted): keeps the test fast


def test_model_file_tensors_convert_and_match_dequantize(model_reader):
    tensors = [t for t in model_reader.tensors if t.tensor_type.name in SUPPORTED_QUANT]
    assert len(tensors) > 200
    rng = np.random.default_rng(0)
    for t in tensors:
        q, scales, mins, bits, group = logical_quant(t)
        n, k = (int(s) for s in reversed(t.shape))
        assert q.shape == (n, k) and q.dtype == torch.uint8 and int(q.numpy().max()) < 2 ** bits, t.name
        assert scales.shape == (n, k // group) and (mins is None or mins.shape == scales.shape), t.name
        # first and last rows and a random sample; dequantize those rows only (the data is (rows, bytes))
        rows = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, SAMPLE_ROWS - 2)]))
        want = gguf.quants.dequantize(np.array(t.data[rows]), t.tensor_type).reshape(len(rows), k)
        r = torch.from_numpy(rows)
        got = quant_weight(q[r], scales[r], None if mins is None else mins[r], bits, group)
        assert _bits_equal(got, torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))), t.name


def test_model_file_qk_rows_unpermute_like_the_float_weight(model_reader):
    """The loader unpermutes the dequantised Q/K weight; unpermuting q, scales and mins gives the same weight."""
    from tritium.models.gguf import read_gguf_metadata

    config, _ = read_gguf_metadata(model_reader)
    names = {t.name: t for t in model_reader.tensors}
    for name, heads in (("blk.0.attn_q.weight", config["n_heads"]), ("blk.0.attn_k.weight", config["n_kv_heads"])):
        t = names[name]
        q, scales, mins, bits, group = logical_quant(t)
        got = quant_weight(unpermute_rows(q, heads), unpermute_rows(scales, heads), unpermute_rows(mins, heads),
                           bits, group)
        want = _unpermute(torch.from_numpy(dequantize(t)), heads)
        assert _bits_equal(got, want.contiguous()), name
        assert unpermute_rows(None, heads) is None
