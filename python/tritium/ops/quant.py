"""Weight-only quantized linear layers: x @ W^T where W is stored as 4- or 8-bit integers with per-group scales
(docs/quantization.md has the format, the mapping of each source onto it and the CPU layout).

The ops, each with a CPU (csrc/quant.cpp) and a GPU (kernels/quant.py) kernel on that device's packed layout:

- ``quant_pack(q, scales, mins, bits, group)`` -> (qdata, scales, mins): the logical weight (q uint8 (N, K),
  scales/mins (N, ceil(K / group))) repacked once into the layout the device's kernel reads.
- ``quant_unpack(qdata, scales, mins, bits, group, n, k)`` -> (q, scales, mins): the inverse, bit for bit.
- ``quant_linear(x, qdata, scales, mins, bits, group, n, k, int8_act)`` -> y (M, N) in x's dtype: x (M, K) times
  the weight; int8_act 1 quantizes x per block of 32 to int8 first (integer dot products, llama.cpp's way), 2 in
  two int8 terms (x ~ d1 q1 + d2 q2, the second quantizing what the first left over: near float accuracy for
  twice the integer work), 0 keeps x float (the weights widened to float in registers). From FLOAT_ROWS rows
  (a prefill; FLOAT_ROWS_16 for 16-bit x on the CPU) int8_act 2 computes with float activations: the product is
  compute-bound there, and float is both faster than two integer passes and exact. On a CPU with AMX-BF16,
  bfloat16 x of BF16_TILE_ROWS rows or more multiplies exactly on bfloat16 tiles, faster than int8: for 4-bit
  weights whatever int8_act says, for 8-bit ones with int8_act 0 or 2 (``activation_terms`` has the rule).
  ``quant_linear_dx`` is
  its input gradient dy (M, N) @ W (float; what QLoRA-style training on a frozen quantized base needs).
- ``quant_dequantize(qdata, scales, mins, bits, group, n, k, dtype)`` -> W (N, K); with ``rows`` (int64 indices)
  only those rows (an embedding lookup in a quantized table).

``QuantizedWeight`` holds one packed weight and its metadata; ``tritium.nn.QuantizedLinear`` is the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._library import HALF_DTYPES, call_op, check_linear_input, define_op

QUANT_BITS = (4, 8)
BLOCK = 32          # activations are quantized per 32 elements; rows are padded to a multiple of 32
FLOAT_ROWS = 32     # from this many rows of x, int8_act 2 runs on float activations (csrc/quant.cpp: kGemmRows)
FLOAT_ROWS_16 = 128  # the same for bfloat16 / float16 x on the CPU (kGemmRows16)
BF16_TILE_ROWS = 8  # from this many bfloat16 rows, AMX-BF16 tiles where bf16_tiles holds (kAmxRows)
BF16_GEMM_ROWS = 384  # ... up to this many: from it one GEMM on the dequantised weight again (kBf16TileRows)


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result's effect (torch._dynamo.decorators sets this one attribute) without its
    import of torch._dynamo, which brings triton with it: `import tritium` stays light (tests/models/test_imports)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _quant_isa() -> str:
    """The CPU kernel set in use (csrc/quant.cpp quant_isa); a constant to torch.compile (a traced graph keeps the
    path chosen when it was traced, as it keeps the shapes')."""
    return torch.ops.tritium_runtime.quant_isa("")


def bf16_tiles(dtype: torch.dtype, bits: int, group: int, int8_act: int) -> bool:
    """Whether the CPU kernel multiplies bfloat16 x of BF16_TILE_ROWS rows or more exactly (x's values times the
    integer weights, float32 sums), weights in groups of 32 or more: on AMX-BF16 tiles (the amx_int8 kernel set in
    use on a CPU with AMX-BF16) any int8_act for 4-bit weights, int8_act 0 or 2 for 8-bit ones (one int8 term is
    faster there); by AVX512-BF16 pair products (the avx512_bf16 set) 4-bit weights with int8_act 0 or 2 (one
    VNNI int8 term, and VNNI on 8-bit weights, are faster). csrc/quant.cpp: bf16_tiles."""
    from ..utils import cpu_has

    if dtype != torch.bfloat16 or bits not in QUANT_BITS or group == 16:
        return False
    isa = _quant_isa()
    if isa == "avx512_bf16":
        return bits == 4 and int8_act != 1
    return isa == "amx_int8" and cpu_has("amx_bf16") and (bits == 4 or int8_act != 1)


def activation_terms(int8_act: int, rows: int, dtype: Optional[torch.dtype] = None, bits: int = 4,
                     group: int = BLOCK) -> int:
    """The int8 terms quant_linear(int8_act) multiplies with for an x of that many rows: 0 (float activations)
    for int8_act 2 from FLOAT_ROWS rows, else int8_act. Given x's dtype and the weight's format (the CPU
    kernel's rule), also 0 from BF16_TILE_ROWS rows where bf16_tiles holds (exact tiles, then one GEMM), and
    16-bit x keeps two terms up to FLOAT_ROWS_16 rows."""
    if dtype is not None and rows >= BF16_TILE_ROWS and bf16_tiles(dtype, bits, group, int8_act):
        return 0
    float_rows = FLOAT_ROWS_16 if dtype in HALF_DTYPES else FLOAT_ROWS
    return 0 if int8_act == 2 and rows >= float_rows else int8_act


def padded_k(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def n_groups(k: int, group: int) -> int:
    """Groups per row: ceil(K / group) (the CPU layout pads K to a multiple of 32 first)."""
    return -(-padded_k(k) // group) if group >= BLOCK else -(-k // group)


def _fake_pack(q, scales, mins, bits, group):
    if q.device.type == "cpu":
        n, k = q.shape
        tiles = -(-n // 16)
        nb = padded_k(k) // BLOCK
        ng = scales.shape[1]
        return (q.new_empty((tiles, nb, 16 * BLOCK * bits // 8)), scales.new_empty((tiles, ng, 16)),
                scales.new_empty((tiles, ng, 16) if mins is not None else (0,)))
    from tritium.kernels.quant import packed_shapes

    qs, ss, ms = packed_shapes(q.shape[0], q.shape[1], bits, group, mins is not None)
    return q.new_empty(qs), scales.new_empty(ss), scales.new_empty(ms)


def _fake_unpack(qdata, scales, mins, bits, group, n, k):
    ng = n_groups(k, group)
    return (qdata.new_empty((n, k)), scales.new_empty((n, ng)),
            scales.new_empty((n, ng) if mins is not None and mins.numel() else (0,)))


def _fake_linear(x, qdata, scales, mins, bits, group, n, k, int8_act):
    return x.new_empty((x.shape[0], n))


def _fake_linear_dx(dy, qdata, scales, mins, bits, group, n, k):
    return dy.new_empty((dy.shape[0], k))


def _fake_dequantize(qdata, scales, mins, bits, group, n, k, dtype, rows=None):
    return scales.new_empty((n if rows is None else rows.shape[0], k), dtype=dtype)


_Q = "Tensor qdata, Tensor scales, Tensor? mins, int bits, int group, int n, int k"
quant_pack = define_op("quant_pack(Tensor q, Tensor scales, Tensor? mins, int bits, int group)"
                       " -> (Tensor, Tensor, Tensor)", _fake_pack, "quant:quant_pack")
quant_unpack = define_op(f"quant_unpack({_Q}) -> (Tensor, Tensor, Tensor)", _fake_unpack, "quant:quant_unpack")
quant_linear_dx = define_op(f"quant_linear_dx(Tensor dy, {_Q}) -> Tensor", _fake_linear_dx, "quant:quant_linear_dx")


def _linear_setup(ctx, inputs, output):
    ctx.weight = inputs[1:8]   # qdata, scales, mins, bits, group, n, k: the frozen weight takes no gradient


def _linear_backward(ctx, dy):
    return (quant_linear_dx(dy.contiguous(), *ctx.weight),) + (None,) * 8


quant_linear = define_op(f"quant_linear(Tensor x, {_Q}, int int8_act) -> Tensor", _fake_linear,
                         "quant:quant_linear", backward=_linear_backward, setup_context=_linear_setup)
quant_dequantize = define_op(f"quant_dequantize({_Q}, ScalarType dtype, Tensor? rows=None) -> Tensor",
                             _fake_dequantize, "quant:quant_dequantize")


# ---------------------------------------------------------------------------------------------------------
# QuantizedWeight: one packed weight and what the ops need to read it
# ---------------------------------------------------------------------------------------------------------
def _check_logical(q: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int, group: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"quantized weight: bits must be one of {QUANT_BITS}, got {bits}")
    if not (isinstance(q, Tensor) and q.dtype == torch.uint8 and q.dim() == 2 and q.numel() > 0):
        raise ValueError(f"quantized weight: q must be a non-empty uint8 (N, K) tensor, got "
                         f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
    if not (group == 16 or (group > 0 and group % BLOCK == 0)):
        raise ValueError(f"quantized weight: group must be 16 or a multiple of {BLOCK}, got {group}")
    n, k = q.shape
    want = (n, n_groups(k, group))
    if scales.dtype not in (torch.float16, torch.float32) or tuple(scales.shape) != want:
        raise ValueError(f"quantized weight: scales must be float16 or float32 {want}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if mins is not None and (mins.dtype != scales.dtype or mins.shape != scales.shape):
        raise ValueError(f"quantized weight: mins must be like scales ({scales.dtype} {want}), got {mins.dtype} "
                         f"{tuple(mins.shape)}")


@dataclass
class QuantizedWeight:
    """A weight W (n, k) stored quantized (docs/quantization.md), packed for the kernels of its device.

    Build one with ``QuantizedWeight.from_logical(q, scales, mins, bits, group)`` (e.g. from GGUF blocks:
    tritium.models.gguf.logical_quant) or ``QuantizedWeight.quantize(w, "int8" | "int4", group_size)``.
    ``linear(x, int8_act)`` is x (..., k) @ W^T; ``dequantize()`` the float weight; ``logical()`` the inverse of
    from_logical, bit for bit."""
    qdata: Tensor
    scales: Tensor
    mins: Tensor            # empty when symmetric
    bits: int
    group: int
    n: int
    k: int

    @classmethod
    def from_logical(cls, q: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int, group: int,
                     device=None) -> "QuantizedWeight":
        _check_logical(q, scales, mins, bits, group)
        dev = torch.device(device) if device is not None else q.device
        q, scales = q.to(dev), scales.to(dev)
        mins = mins.to(dev) if mins is not None else None
        qd, sc, mn = quant_pack(q, scales, mins, bits, group)
        return cls(qd, sc, mn, bits, group, q.shape[0], q.shape[1])

    @classmethod
    def quantize(cls, w: Tensor, mode: str, group_size: Optional[int] = None) -> "QuantizedWeight":
        """W (n, k) float quantized: "int8" symmetric per output channel (group_size None) or per group
        (scale = absmax / 127, float32 scales), "int4" asymmetric per group of group_size (default 32;
        scale = (max - min) / 15 and min, both float16: the q are computed from the rounded scale and min)."""
        q, scales, mins, bits, group = quantize_logical(w, mode, group_size)
        return cls.from_logical(q, scales, mins, bits, group, w.device)

    def __post_init__(self):
        self._mins_or_none = self.mins if self.mins.numel() > 0 else None

    @property
    def has_mins(self) -> bool:
        return self._mins_or_none is not None

    def _mins(self) -> Optional[Tensor]:
        return self._mins_or_none

    def logical(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        q, s, m = quant_unpack(self.qdata, self.scales, self._mins(), self.bits, self.group, self.n, self.k)
        return q, s, (m if self.has_mins else None)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: Optional[Tensor] = None) -> Tensor:
        return quant_dequantize(self.qdata, self.scales, self._mins(), self.bits, self.group, self.n, self.k,
                                dtype, rows)

    def linear(self, x: Tensor, int8_act: int = 0) -> Tensor:
        """x (..., k) @ W^T -> (..., n) in x's dtype; differentiable in x (the input gradient through
        quant_linear_dx; the weight is frozen). int8_act: 0 float activations, 1 or 2 int8 terms (quant_linear)."""
        int8_act = int(int8_act)
        if x.dim() == 2 and x.shape[1] == self.k:   # the serving path's case: no reshapes
            return call_op(quant_linear, x, self.qdata, self.scales, self._mins_or_none, self.bits, self.group, self.n,
                           self.k, int8_act)
        if x.shape[-1] != self.k:
            raise ValueError(f"quantized linear: x must end in k = {self.k}, got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"quantized linear: x must be float32, bfloat16 or float16, got {x.dtype}")
        lead = x.shape[:-1]
        y = call_op(quant_linear, x.reshape(-1, self.k), self.qdata, self.scales, self._mins(), self.bits, self.group,
                    self.n, self.k, int8_act)
        return y.view(*lead, self.n)

    def gemm_rows(self, dtype: torch.dtype) -> int:
        """The row count of x (of dtype) from which linear(x, 0) dequantises the weight once and runs one GEMM
        (csrc/quant.cpp: kGemmRows, or kBf16TileRows where bfloat16 x takes the exact tiles): below it the tile
        kernels read the stored bytes."""
        return BF16_GEMM_ROWS if bf16_tiles(dtype, self.bits, self.group, 0) else FLOAT_ROWS

    def lora_parts(self) -> Tuple[Tensor, Tensor, Optional[Tensor], List[int]]:
        """The packed tensors and the ints (bits, group, n, k) quant_dequantize takes: the frozen base of
        tritium.ops.lora's dequantised route."""
        return self.qdata, self.scales, self._mins(), [self.bits, self.group, self.n, self.k]

    def decode_plan(self, int8_act: int = 0) -> tuple:
        """How serve_decode (tritium.ops.serve) computes x @ W^T: (kind, three tensors, five ints)."""
        from .serve import KIND

        return KIND["quant"], (self.qdata, self.scales, self.mins), (self.bits, self.group, self.n, self.k,
                                                                      int(int8_act))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.mins))

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def to(self, device) -> "QuantizedWeight":
        device = torch.device(device)
        if device == self.device:
            return self
        q, s, m = self.logical()
        return QuantizedWeight.from_logical(q, s, m, self.bits, self.group, device)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.k} -> {self.n}, {self.bits}-bit, group {self.group}, "
                f"{self.scales.dtype} scales{', mins' if self.has_mins else ''}, {self.nbytes / 2**20:.2f} MiB)")


def check_quantized_linear(x, weight, bias) -> Tuple[int, int]:
    """quantized_linear's argument checks (errors name it); returns the weight's (n, k)."""
    fn = "quantized_linear"
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"{fn}: weight must be a QuantizedWeight (QuantizedWeight.quantize), got "
                        f"{type(weight).__name__}")
    check_linear_input(fn, x, bias, weight.n, weight.k, weight.device)
    return weight.n, weight.k


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """x (*, k) @ W^T + bias -> (*, n) in x's dtype with float activations (int8_act 0: the accuracy of a float
    matmul of the dequantised weight), differentiable w.r.t. x (quant_linear_dx) and bias; the weight is frozen.
    The base product of LoRA on an int8/int4 base (tritium.ops.lora). x: float32, bfloat16 or float16 on the
    weight's device; float64 x, an empty x and TRITIUM_BACKEND=reference multiply the dequantised weight
    (exact in float32) with torch instead."""
    n, k = check_quantized_linear(x, weight, bias)
    from .._backend import use_reference

    if x.dtype == torch.float64 or x.numel() == 0 or use_reference() or x.device.type not in ("cpu", "cuda"):
        return torch.nn.functional.linear(x, weight.dequantize(torch.float32).to(x.dtype), bias)
    y = weight.linear(x, 0)
    return y if bias is None else y + bias


def cat_logical(parts: List[Tuple[Tensor, Tensor, Optional[Tensor], int, int]]):
    """Logical weights stacked along n (a fused QKV or gate/up projection); None when their formats differ."""
    bits, group = parts[0][3], parts[0][4]
    sdt, has_m = parts[0][1].dtype, parts[0][2] is not None
    if any(p[3] != bits or p[4] != group or p[1].dtype != sdt or (p[2] is not None) != has_m for p in parts):
        return None
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]) if has_m else None, bits, group)


def quantize_logical(w: Tensor, mode: str, group_size: Optional[int] = None):
    """(q, scales, mins, bits, group) of a float weight w (n, k); see QuantizedWeight.quantize."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize: mode must be 'int8' or 'int4', got {mode!r}")
    if not (isinstance(w, Tensor) and w.dim() == 2 and w.is_floating_point() and w.numel() > 0):
        raise ValueError(f"quantize: the weight must be a non-empty 2-D float tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    n, k = w.shape
    if mode == "int4" and group_size is None:
        group_size = BLOCK
    if group_size is not None:
        if group_size <= 0 or group_size % BLOCK:
            raise ValueError(f"quantize: group_size must be a positive multiple of {BLOCK}, got {group_size}")
        if k % group_size:
            raise ValueError(f"quantize: group_size {group_size} does not divide the weight's in_features {k}")
        group = group_size
    else:
        group = padded_k(k)  # int8 per channel: one group a row
    wf = w.detach().float().cpu()
    kp = -(-k // group) * group
    wp = torch.zeros(n, kp)
    wp[:, :k] = wf
    blocks = wp.view(n, kp // group, group)
    if mode == "int8":
        scales = blocks.abs().amax(-1) / 127
        inv = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
        q = (torch.round(blocks * inv[..., None]).clamp(-127, 127) + 128).to(torch.uint8)
        return q.view(n, kp)[:, :k].contiguous(), scales, None, 8, group
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scales = ((hi - lo) / 15).half()
    mins = lo.half()
    s, m = scales.float(), mins.float()
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    q = torch.round((blocks - m[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(n, kp)[:, :k].contiguous(), scales, mins, 4, group


__all__: List[str] = []
