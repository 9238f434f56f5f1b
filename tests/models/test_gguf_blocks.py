"""GGUF tensor decoding against blocks written by hand.

Each case packs chosen quants and scales into the bytes of ggml's block layout (the packing of ggml-quants.c's
quantize_row_*_ref, the struct order of ggml-common.h), computes the values those blocks stand for here in
plain Python arithmetic from the chosen integers, writes the blocks into a small GGUF file and checks that the
loader's per-tensor decode (tritium.models.gguf.dequantize) gives exactly those values. The reference is
independent of the ``gguf`` package's own dequantize, which the loader uses.

Scales are k * 2**-10 with |k| < 1024 (exact in float16) and the quants are small integers, so every expected
value is exact in float32 and the comparison is bit-exact.
"""
import random
import struct

import numpy as np
import pytest

import gguf
from tritium.models.gguf import dequantize
from tritium.models.gguf_file import GGUFFile

QT = gguf.GGMLQuantizationType
QK_K = 256


def _f16(x: float) -> bytes:
    return struct.pack("<e", x)


def _scale(rng: random.Random, signed: bool = True) -> float:
    k = rng.randint(1, 1023)
    return (rng.choice((-1, 1)) if signed else 1) * k / 1024


def _nibbles(lo, hi) -> bytes:
    """Byte j holds lo[j] in its low nibble and hi[j] in its high nibble."""
    return bytes(a | (b << 4) for a, b in zip(lo, hi))


def _crumbs(L, base: int) -> bytes:
    """32 bytes each holding four 2-bit values: byte l = L[base+l] | L[base+l+32] << 2 | +64 << 4 | +96 << 6."""
    return bytes(L[base + l] | (L[base + l + 32] << 2) | (L[base + l + 64] << 4) | (L[base + l + 96] << 6)
                 for l in range(32))


def _k4_scales(sc, mn) -> bytes:
    """The 12 bytes of Q4_K / Q5_K's eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4 layout)."""
    out = [0] * 12
    for j in range(8):
        if j < 4:
            out[j] |= sc[j]
            out[j + 4] |= mn[j]
        else:
            out[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4)
            out[j - 4] |= (sc[j] >> 4) << 6
            out[j] |= (mn[j] >> 4) << 6
    return bytes(out)


# ---- one block of each type: (raw bytes, the values it stands for) -------------------------------------------
def _q8_0(rng):
    d = _scale(rng)
    q = [rng.randint(-128, 127) for _ in range(32)]
    return _f16(d) + struct.pack("<32b", *q), [d * x for x in q]


def _q4_0(rng):
    d = _scale(rng)
    q = [rng.randint(0, 15) for _ in range(32)]
    return _f16(d) + _nibbles(q[:16], q[16:]), [(x - 8) * d for x in q]


def _q4_1(rng):
    d, m = _scale(rng), _scale(rng)
    q = [rng.randint(0, 15) for _ in range(32)]
    return _f16(d) + _f16(m) + _nibbles(q[:16], q[16:]), [x * d + m for x in q]


def _q5_bits(q):
    """qh (bit j = the fifth bit of element j) and the low nibbles of Q5_0 / Q5_1."""
    qh = sum((x >> 4) << j for j, x in enumerate(q))
    return struct.pack("<I", qh) + _nibbles([x & 0xF for x in q[:16]], [x & 0xF for x in q[16:]])


def _q5_0(rng):
    d = _scale(rng)
    q = [rng.randint(0, 31) for _ in range(32)]
    return _f16(d) + _q5_bits(q), [(x - 16) * d for x in q]


def _q5_1(rng):
    d, m = _scale(rng), _scale(rng)
    q = [rng.randint(0, 31) for _ in range(32)]
    return _f16(d) + _f16(m) + _q5_bits(q), [x * d + m for x in q]


def _q2_k(rng):
    d, dmin = _scale(rng), _scale(rng)
    sc = [rng.randint(0, 15) for _ in range(16)]
    mn = [rng.randint(0, 15) for _ in range(16)]
    q = [rng.randint(0, 3) for _ in range(QK_K)]
    raw = bytes(s | (m << 4) for s, m in zip(sc, mn)) + _crumbs(q, 0) + _crumbs(q, 128) + _f16(d) + _f16(dmin)
    return raw, [d * sc[e // 16] * q[e] - dmin * mn[e // 16] for e in range(QK_K)]


def _q3_k(rng):
    d = _scale(rng)
    sc = [rng.randint(0, 63) for _ in range(16)]   # stored with an offset of 32: the scale is sc - 32
    L = [rng.randint(0, 7) for _ in range(QK_K)]   # stored with an offset of 4: the quant is L - 4
    hmask = [0] * 32
    for e in range(QK_K):
        hmask[e % 32] |= (L[e] >> 2) << (e // 32)
    low = [x & 3 for x in L]
    scales = [0] * 12
    for j in range(16):
        scales[j % 8] |= (sc[j] & 0xF) << (4 * (j // 8))
        scales[8 + j % 4] |= (sc[j] >> 4) << (2 * (j // 4))
    raw = bytes(hmask) + _crumbs(low, 0) + _crumbs(low, 128) + bytes(scales) + _f16(d)
    return raw, [d * (sc[e // 16] - 32) * (L[e] - 4) for e in range(QK_K)]


def _q4_k(rng):
    d, dmin = _scale(rng), _scale(rng)
    sc = [rng.randint(0, 63) for _ in range(8)]
    mn = [rng.randint(0, 63) for _ in range(8)]
    q = [rng.randint(0, 15) for _ in range(QK_K)]
    qs = b"".join(_nibbles(q[64 * c:64 * c + 32], q[64 * c + 32:64 * c + 64]) for c in range(4))
    raw = _f16(d) + _f16(dmin) + _k4_scales(sc, mn) + qs
    return raw, [d * sc[e // 32] * q[e] - dmin * mn[e // 32] for e in range(QK_K)]


def _q5_k(rng):
    d, dmin = _scale(rng), _scale(rng)
    sc = [rng.randint(0, 63) for _ in range(8)]
    mn = [rng.randint(0, 63) for _ in range(8)]
    q = [rng.randint(0, 31) for _ in range(QK_K)]
    qh = [0] * 32
    for e in range(QK_K):   # sub-block e // 32 keeps its fifth bits in bit e // 32 of qh[e % 32]
        qh[e % 32] |= (q[e] >> 4) << (e // 32)
    low = [x & 0xF for x in q]
    qs = b"".join(_nibbles(low[64 * c:64 * c + 32], low[64 * c + 32:64 * c + 64]) for c in range(4))
    raw = _f16(d) + _f16(dmin) + _k4_scales(sc, mn) + bytes(qh) + qs
    return raw, [d * sc[e // 32] * q[e] - dmin * mn[e // 32] for e in range(QK_K)]


def _q6_k(rng):
    d = _scale(rng)
    sc = [rng.randint(-128, 127) for _ in range(16)]
    L = [rng.randint(0, 63) for _ in range(QK_K)]   # stored with an offset of 32: the quant is L - 32
    ql, qh = [], []
    for h in (0, 128):
        ql += [(L[h + l] & 0xF) | ((L[h + l + 64] & 0xF) << 4) for l in range(32)]
        ql += [(L[h + l + 32] & 0xF) | ((L[h + l + 96] & 0xF) << 4) for l in range(32)]
        qh += [sum((L[h + l + 32 * i] >> 4) << (2 * i) for i in range(4)) for l in range(32)]
    raw = bytes(ql) + bytes(qh) + struct.pack("<16b", *sc) + _f16(d)
    return raw, [d * sc[e // 16] * (L[e] - 32) for e in range(QK_K)]


QUANTIZED = {
    QT.Q8_0: (32, _q8_0), QT.Q4_0: (32, _q4_0), QT.Q4_1: (32, _q4_1), QT.Q5_0: (32, _q5_0), QT.Q5_1: (32, _q5_1),
    QT.Q2_K: (QK_K, _q2_k), QT.Q3_K: (QK_K, _q3_k), QT.Q4_K: (QK_K, _q4_k), QT.Q5_K: (QK_K, _q5_k),
    QT.Q6_K: (QK_K, _q6_k),
}
# byte sizes of one block (ggml-common.h), checked so a packing mistake cannot go unnoticed
BLOCK_BYTES = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20, QT.Q5_0: 22, QT.Q5_1: 24, QT.Q2_K: 84, QT.Q3_K: 110,
               QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}
ROWS, BLOCKS_PER_ROW = 3, 2


def _write_tensor(tmp_path, name, data, raw_dtype=None):
    """Write one tensor into a GGUF file and open it again: the GGUFFile tensor the loader sees."""
    path = str(tmp_path / f"{name}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = GGUFFile(path).tensors
    return t


def _roundtrip(tmp_path, name, data, raw_dtype=None):
    """Write one tensor into a GGUF file and read it back as the loader does."""
    return dequantize(_write_tensor(tmp_path, name, data, raw_dtype))


@pytest.mark.parametrize("qtype", list(QUANTIZED), ids=lambda q: q.name)
def test_quantized_blocks_decode_to_hand_computed_values(tmp_path, qtype):
    block, pack = QUANTIZED[qtype]
    rng = random.Random(int(qtype))
    rows_raw, rows_want = [], []
    for _ in range(ROWS):
        raw, want = b"", []
        for _ in range(BLOCKS_PER_ROW):
            r, v = pack(rng)
            assert len(r) == BLOCK_BYTES[qtype] and len(v) == block
            raw += r
            want += v
        rows_raw.append(np.frombuffer(raw, dtype=np.uint8))
        rows_want.append(want)
    got = _roundtrip(tmp_path, "w", np.stack(rows_raw), raw_dtype=qtype)
    want = np.array(rows_want, dtype=np.float64)
    assert got.dtype == np.float32 and got.shape == (ROWS, BLOCKS_PER_ROW * block)
    assert np.array_equal(want.astype(np.float32), want), "the expected values must be exact in float32"
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_float_tensors_decode_exactly(tmp_path):
    rng = random.Random(0)
    # 8 significant bits at most: exact in float32, float16 and bfloat16
    vals = np.array([[rng.randint(-255, 255) / 64 for _ in range(40)] for _ in range(3)])
    got = _roundtrip(tmp_path, "f32", vals.astype(np.float32))
    np.testing.assert_array_equal(got, vals.astype(np.float32))
    got = _roundtrip(tmp_path, "f16", vals.astype(np.float16))
    np.testing.assert_array_equal(got, vals.astype(np.float32))
    # bfloat16: the upper half of each float32, little-endian
    bf16 = (vals.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    got = _roundtrip(tmp_path, "bf16", bf16.reshape(3, 80), raw_dtype=QT.BF16)
    assert got.shape == (3, 40)
    np.testing.assert_array_equal(got, vals.astype(np.float32))

