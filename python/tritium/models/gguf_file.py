"""Reading a GGUF file's header, metadata and tensor table, every size checked against the file.

``GGUFFile(path)`` maps the file once and parses the header: ``fields`` holds the metadata as plain Python values
(strings, numbers, lists), ``tensors`` the tensor table, whose ``data`` is a read-only numpy view of the mapped
file, shaped as ``gguf.GGUFReader``'s (float types: their dtype, dims slowest-first; quantized types: uint8 bytes
per row). The constants (value types, tensor types, block sizes) are the ``gguf`` package's.

Why not ``gguf.GGUFReader``: it builds numpy views for every part of every metadata value (each of a tokenizer's
~100k strings is two), ~170 MB of objects for the embedded 98 MB model, which the heap keeps after the load; and
it trusts the file (a truncated one fails deep in numpy's ``reshape``). This reader makes one Python string per
string and checks, before anything is read or allocated, that every length, count and tensor byte range lies
inside the file; any failure is a ValueError that names the file and what was expected and found.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

_SCALARS = {  # GGUFValueType -> struct format (little-endian), numpy dtype
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4           # GGML_MAX_DIMS
_MAX_NESTING = 8        # arrays of arrays: a bound, so a crafted file cannot exhaust the recursion limit
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table. ``shape`` lists dims fastest-first, as the file (and GGUFReader) does."""
    name: str
    tensor_type: object          # gguf.GGMLQuantizationType
    shape: Tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int             # absolute, in the file
    _file: "GGUFFile"

    @property
    def data(self) -> np.ndarray:
        """A read-only view of the tensor's bytes in the mapped file, shaped as GGUFReader's ``data``."""
        dims = tuple(reversed(self.shape))
        dtype = _FLOAT_DTYPES.get(self.tensor_type.name)
        if dtype is not None:
            return np.frombuffer(self._file._map, dtype, self.n_elements, self.data_offset).reshape(dims)
        from gguf import quant_shape_to_byte_shape

        raw = np.frombuffer(self._file._map, np.uint8, self.n_bytes, self.data_offset)
        return raw.reshape(quant_shape_to_byte_shape(dims, self.tensor_type))


class GGUFFile:
    """A GGUF file (versions 2 and 3, little-endian): ``version``, ``fields`` (key -> value), ``tensors`` (in
    file order) and ``path``. The mapping stays open while the file or any tensor's ``data`` is referenced."""

    def __init__(self, path: str):
        self.path = str(path)
        self._name = os.path.basename(self.path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                self._fail(f"{size} bytes is too short for a GGUF header (24 bytes): not a GGUF file?")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = size
        self._pos = 0
        magic = self._take(4, "the magic")
        if magic != b"GGUF":
            self._fail(f"starts with {magic!r}, not the GGUF magic b'GGUF': not a GGUF file")
        self.version = self._scalar(4, "the version")
        if self.version not in (2, 3):
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            why = " (a big-endian file: not supported)" if swapped in (2, 3) else ""
            self._fail(f"GGUF version {self.version}{why}; supported: 2, 3")
        n_tensors = self._scalar(10, "the tensor count")
        n_fields = self._scalar(10, "the metadata count")
        # each metadata entry takes at least 12 bytes (key length, type) and each tensor entry at least 24 (name
        # length, dims count, type, offset): counts the file cannot hold are rejected before any loop runs
        if n_fields * 12 + n_tensors * 24 > size - self._pos:
            self._fail(f"header claims {n_fields} metadata entries and {n_tensors} tensors, more than the "
                       f"{size} bytes of the file can hold: truncated or corrupt?")
        self.fields: Dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string("a metadata key")
            if key in self.fields:
                self._fail(f"metadata key {key!r} appears twice")
            kind = self._scalar(4, f"the type of metadata {key!r}")
            self.fields[key] = self._value(kind, key)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            self._fail(f"general.alignment must be a power of two, got {align!r}")
        self._align = align
        start = -(-self._pos // align) * align
        self.tensors: List[GGUFTensor] = []
        seen = set()
        for name, dims, ttype, offset in infos:
            if name in seen:
                self._fail(f"tensor {name!r} appears twice")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, ttype, offset, start))

    # -- parsing ----------------------------------------------------------------------------------------------
    def _fail(self, what: str):
        raise ValueError(f"{self._name}: {what}")

    def _need(self, n: int, what: str) -> None:
        if n > self._size - self._pos:
            self._fail(f"{what} needs {n} bytes at offset {self._pos}, the file ends after {self._size} bytes: "
                       f"truncated?")

    def _take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        b = self._map[self._pos:self._pos + n]
        self._pos += n
        return b

    def _scalar(self, kind: int, what: str):
        fmt, _ = _SCALARS[kind]
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += n
        return v

    def _string(self, what: str) -> str:
        n = self._scalar(10, f"the length of {what}")
        raw = self._take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._fail(f"{what} at offset {self._pos - n} is not UTF-8 ({e.reason})")

    def _value(self, kind: int, key: str, depth: int = 0):
        if kind in _SCALARS:
            return self._scalar(kind, f"metadata {key!r}")
        if kind == _STRING:
            return self._string(f"metadata {key!r}")
        if kind != _ARRAY:
            self._fail(f"metadata {key!r} has value type {kind}, not one of GGUF's 0..12")
        sub = self._scalar(4, f"the element type of metadata {key!r}")
        count = self._scalar(10, f"the element count of metadata {key!r}")
        if sub in _SCALARS:
            fmt, dtype = _SCALARS[sub]
            nbytes = count * struct.calcsize(fmt)
            self._need(nbytes, f"metadata {key!r} ({count} elements)")
            out = np.frombuffer(self._map, dtype, count, self._pos).tolist()
            self._pos += nbytes
            return out
        if sub == _STRING:
            self._need(count * 8, f"metadata {key!r} ({count} strings)")   # each has at least its length
            return [self._string(f"element {i} of metadata {key!r}") for i in range(count)]
        if sub == _ARRAY:
            if depth >= _MAX_NESTING:
                self._fail(f"metadata {key!r} nests arrays deeper than {_MAX_NESTING} levels")
            self._need(count * 12, f"metadata {key!r} ({count} arrays)")
            return [self._value(_ARRAY, f"{key}[{i}]", depth + 1) for i in range(count)]
        self._fail(f"metadata {key!r} is an array of value type {sub}, not one of GGUF's 0..12")

    def _tensor_info(self):
        name = self._string("a tensor name")
        n_dims = self._scalar(4, f"the dims count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            self._fail(f"tensor {name!r} has {n_dims} dims; GGUF allows 1..{_MAX_DIMS}")
        dims = tuple(self._scalar(10, f"the dims of tensor {name!r}") for _ in range(n_dims))
        ttype = self._scalar(4, f"the type of tensor {name!r}")
        offset = self._scalar(10, f"the data offset of tensor {name!r}")
        return name, dims, ttype, offset

    def _tensor(self, name: str, dims, ttype: int, offset: int, start: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            self._fail(f"tensor {name!r} has type id {ttype}, which the gguf package does not know")
        n = 1
        for d in dims:
            n *= d            # Python ints: no overflow; the byte-range check below bounds it
        if n % block or dims[0] % block:
            self._fail(f"tensor {name!r} of type {qtype.name} has shape {list(dims)}: its rows ({dims[0]}) "
                       f"must be a multiple of the type's block of {block}")
        n_bytes = n // block * type_size
        if offset % self._align:
            self._fail(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment {self._align}")
        at = start + offset
        if at + n_bytes > self._size:
            self._fail(f"tensor {name!r} needs {_mib(n_bytes)} at offset {at}, the file ends after "
                       f"{_mib(self._size)}: truncated?")
        return GGUFTensor(name, qtype, tuple(int(d) for d in dims), n, n_bytes, at, self)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
