"""tritium.models.gguf_file against gguf's own GGUFReader (an independent parser of the same format) on files
written by gguf's GGUFWriter and on the embedded model, and on corrupted files: every truncation of the header,
random byte flips, absurd counts. A corrupted file either parses or raises a ValueError naming the file."""
import os
import random
import struct

import numpy as np
import pytest

import gguf
from tritium.models.gguf_file import GGUFFile
from tests.models.test_llama_smollm2 import model_path  # noqa: F401  (the embedded model's path, or a skip)


def _write(path, tensors=True):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_float64("t.f64", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -2**62)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ü b"])
    w.add_array("t.bools", [True, False])
    w.add_array("t.empty", [])
    if tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
        w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
        q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        q4 = gguf.quants.quantize(rng.standard_normal((3, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
        w.add_tensor("q4", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _same_as_gguf_reader(path):
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == want
    for k, v in ours.fields.items():
        assert type(v) is type(want[k]), k
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape), a.name
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data, equal_nan=True), a.name
    return ours


def test_every_value_type_and_tensor_matches_gguf_reader(tmp_path):
    f = _same_as_gguf_reader(_write(tmp_path / "m.gguf"))
    assert f.fields["t.u64"] == 2**63 + 5 and f.fields["t.strs"] == ["a", "", "ü b"]
    assert not f.tensors[0].data.flags.writeable   # a view of the mapped file, not a copy


def test_embedded_model_matches_gguf_reader(model_path):  # noqa: F811
    f = _same_as_gguf_reader(model_path)
    assert len(f.fields["tokenizer.ggml.tokens"]) == 49152


def _header_end(path):
    """Where the tensor data starts (the header, metadata and tensor table before it) and where the last tensor
    ends (the writer pads the file after it to the alignment)."""
    f = GGUFFile(path)
    return min(t.data_offset for t in f.tensors), max(t.data_offset + t.n_bytes for t in f.tensors)


def _loads_or_names_the_file(path):
    try:
        GGUFFile(path)
    except ValueError as e:
        assert str(e).startswith(os.path.basename(path) + ": "), e
        return False
    return True


def test_every_truncation_raises_naming_the_file(tmp_path):
    src = _write(tmp_path / "m.gguf")
    data = open(src, "rb").read()
    start, end = _header_end(src)
    cut = tmp_path / "cut.gguf"
    # every byte of the header and tensor table, then points inside the tensor data
    for n in list(range(start + 1)) + list(range(start + 1, end, 7)) + [end - 1]:
        cut.write_bytes(data[:n])
        assert not _loads_or_names_the_file(str(cut)), n
    cut.write_bytes(data)
    assert _loads_or_names_the_file(str(cut))


def test_truncated_tensor_error_says_what_was_needed(tmp_path):
    src = _write(tmp_path / "m.gguf")
    data = open(src, "rb").read()
    _, end = _header_end(src)
    (tmp_path / "cut.gguf").write_bytes(data[:end - 10])
    with pytest.raises(ValueError, match=r"cut.gguf: tensor 'q4' needs 54 bytes at offset \d+, the file ends "
                                         r"after \d+ bytes: truncated\?"):
        GGUFFile(str(tmp_path / "cut.gguf"))


def test_random_byte_flips_parse_or_raise_naming_the_file(tmp_path):
    src = _write(tmp_path / "m.gguf")
    data = bytearray(open(src, "rb").read())
    start, _ = _header_end(src)
    rng = random.Random(1234)
    bad = tmp_path / "flip.gguf"
    parsed = 0
    for _ in range(600):
        d = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            d[rng.randrange(start)] = rng.randrange(256)
        bad.write_bytes(bytes(d))
        parsed += _loads_or_names_the_file(str(bad))
    assert 0 < parsed < 600   # some flips only change values; most break the structure


def _patched(data, old: bytes, new: bytes):
    i = data.index(old)
    return data[:i] + new + data[i + len(old):]


@pytest.mark.parametrize("what,patch,message", [
    ("magic", (b"GGUF", b"GGML"), r"starts with b'GGML', not the GGUF magic"),
    ("version", (struct.pack("<I", 3), struct.pack("<I", 1)), r"GGUF version 1; supported: 2, 3"),
    ("big-endian", (struct.pack("<I", 3), struct.pack(">I", 3)), r"big-endian"),
])
def test_header_errors(tmp_path, what, patch, message):
    data = open(_write(tmp_path / "m.gguf"), "rb").read()
    (tmp_path / "bad.gguf").write_bytes(_patched(data, *patch))
    with pytest.raises(ValueError, match="bad.gguf: .*" + message):
        GGUFFile(str(tmp_path / "bad.gguf"))


def test_absurd_sizes_are_errors_not_allocations(tmp_path):
    data = open(_write(tmp_path / "m.gguf"), "rb").read()
    bad = tmp_path / "bad.gguf"
    # a tensor count of 10**12 (header bytes 8..16)
    bad.write_bytes(data[:8] + struct.pack("<Q", 10**12) + data[16:])
    with pytest.raises(ValueError, match=r"bad.gguf: header claims \d+ metadata entries and 1000000000000 tensors"):
        GGUFFile(str(bad))
    # the f32 tensor's first dim set to 10**12 elements: its byte range is checked, nothing allocated
    name = b"f32"
    i = data.index(struct.pack("<Q", len(name)) + name)
    dims_at = i + 8 + len(name) + 4
    bad.write_bytes(data[:dims_at] + struct.pack("<Q", 10**12) + data[dims_at + 8:])
    with pytest.raises(ValueError, match=r"bad.gguf: tensor 'f32' needs .* MiB at offset \d+, the file ends"):
        GGUFFile(str(bad))
    # a string array claiming 2**40 elements
    key = b"t.strs"
    i = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4
    bad.write_bytes(data[:i] + struct.pack("<Q", 2**40) + data[i + 8:])
    with pytest.raises(ValueError, match=r"bad.gguf: metadata 't.strs' \(1099511627776 strings\) needs"):
        GGUFFile(str(bad))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a model file at all")
    with pytest.raises(ValueError, match=r"notes.txt: starts with b'hell', not the GGUF magic"):
        GGUFFile(str(p))
    p.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"notes.txt: 4 bytes is too short for a GGUF header"):
        GGUFFile(str(p))
