"""NF4 (QLoRA's NormalFloat4) weights and the weight-only NF4 linear op (docs/quantization.md, "NF4").

The format is bitsandbytes' (``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4")``), byte for
byte, so weights quantized by either library load in the other:

- the weight is flattened in row-major order and cut into blocks of ``blocksize`` elements (64 by default; 64,
  128, ..., 4096); ``absmax`` (float32, one per block) is each block's largest magnitude;
- each element becomes the index (0..15) of the nearest of the 16 NF4 code values (``NF4_CODE``) to
  w / absmax (bitsandbytes' rule: the midpoints between neighbouring codes as bucket bounds, a value on a bound
  takes the lower code);
- two indices per byte, the even element in the high nibble: byte j = q[2j] << 4 | q[2j + 1];
- double quantisation (``double_quant=True``, bitsandbytes' ``compress_statistics``): offset = mean(absmax), and
  absmax - offset quantized to 8 bits per block of 256 with bitsandbytes' signed dynamic code (``DYNAMIC_CODE``),
  its own float32 absmax per block of 256.

The weight it stands for, in float32 (bitsandbytes' dequantize_4bit, one rounding):

    W.flat[i] = NF4_CODE[q[i]] * absmax[i // blocksize]
    absmax[b] = DYNAMIC_CODE[qabsmax[b]] * absmax2[b // 256] + offset      (double quantisation; float32 ops)

The ops (C++ in csrc/nf4.cpp, Triton in kernels/nf4.py) read the packed bytes and the float32 absmax as they
are; a double-quantized weight's absmax is decoded to float32 per call (``NF4Weight.absmax_f32``: 1/blocksize of
the weight's elements). The linear op needs in_features to be a multiple of the blocksize, so that each row of W
is whole blocks (every published model's projections are).

- ``nf4_linear(x, weight, bias)``: x (*, K) W^T + bias, differentiable w.r.t. x (and bias); the base is frozen.
- ``nf4_dequantize(weight, dtype)``: W (N, K).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._library import call_op, check_linear_input, define_op, unit_last

# bitsandbytes' NF4 code (bitsandbytes/functional.py get_4bit_type("nf4")): the quantiles of a standard normal
# scaled to [-1, 1], with an exact 0; as float32 values
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DQ_BLOCK = 256   # double quantisation: absmax values per 8-bit block (bitsandbytes' fixed choice)
DECODE_ROWS = 32  # below this many rows of x the CPU kernel decodes in registers; from it dequantise + GEMM


def nf4_code(device=None) -> Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def _dynamic_code() -> Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), value for value: the
    8-bit code of the double-quantized absmax."""
    data = []
    for i in range(7):
        items = 2 ** i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()


def _bucketize(scaled: Tensor, code: Tensor) -> Tensor:
    """The index of the nearest code value (bitsandbytes' rule: midpoint bounds, ties to the lower)."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True)


def _blockwise_absmax(flat: Tensor, blocksize: int) -> Tuple[Tensor, Tensor]:
    """Per-block absmax of a float32 vector (the last block may be short) and each element scaled into [-1, 1]
    (bitsandbytes' arithmetic: times 1 / absmax, clamped)."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)[:n]
    return absmax, scaled


@dataclass
class NF4Weight:
    """A weight quantized to NF4 in bitsandbytes' layout (module docstring). ``data``: uint8 (numel / 2, 1) as
    bitsandbytes' quantize_4bit returns it; ``absmax``: float32 (blocks,), or with double quantisation the uint8
    (blocks,) codes of absmax - offset, with ``absmax2`` float32 (ceil(blocks / 256),) and ``offset`` (a float32
    0-d tensor); ``shape``: the weight's shape; ``dtype``: the dtype it was quantized from (what dequantize
    returns by default)."""

    data: Tensor
    absmax: Tensor
    shape: Tuple[int, ...]
    blocksize: int = 64
    dtype: torch.dtype = torch.float32
    absmax2: Optional[Tensor] = None
    offset: Optional[Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def absmax_f32(self) -> Tensor:
        """The float32 absmax per block (double quantisation decoded with bitsandbytes' float32 arithmetic)."""
        if not self.double_quant:
            return self.absmax
        code = DYNAMIC_CODE.to(self.absmax.device)
        n = self.absmax.numel()
        blocks = -(-n // DQ_BLOCK)
        vals = code[self.absmax.long()]
        vals = torch.nn.functional.pad(vals, (0, blocks * DQ_BLOCK - n)).view(blocks, DQ_BLOCK)
        return (vals * self.absmax2.view(-1, 1)).reshape(-1)[:n] + self.offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """W in ``dtype`` (default: the dtype quantized from): NF4_CODE[q] * absmax in float32, rounded once."""
        return nf4_dequantize(self, dtype)

    def to(self, device) -> "NF4Weight":
        def mv(t):
            return (None if t is None else t.to(device))
        return NF4Weight(mv(self.data), mv(self.absmax), self.shape, self.blocksize, self.dtype, mv(self.absmax2),
                         mv(self.offset))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.absmax, self.absmax2, self.offset)
                   if t is not None)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={self.dtype}, device={self.device})")

    def gemm_rows(self, dtype: torch.dtype) -> int:
        """The row count of x from which nf4_linear dequantises the weight once and runs one GEMM (DECODE_ROWS:
        below it the kernel decodes in registers)."""
        return DECODE_ROWS

    def lora_parts(self) -> Tuple[Tensor, Tensor, Optional[Tensor], List[int]]:
        """The packed bytes, the float32 absmax, no third tensor and the ints (n, k, blocksize) nf4_dequantize
        takes: the frozen base of tritium.ops.lora's dequantised route (a 2-D weight of whole blocks a row)."""
        n, k = self.shape
        return self.data.view(-1), self.absmax_f32(), None, [n, k, self.blocksize]

    @classmethod
    def from_bnb(cls, data: Tensor, quant_state) -> "NF4Weight":
        """From bitsandbytes' quantize_4bit(..., quant_type="nf4") result (packed bytes and its QuantState)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: quant_state must be nf4, got {quant_state.quant_type!r}")
        if quant_state.nested:
            s2 = quant_state.state2
            if s2.blocksize != DQ_BLOCK:
                raise ValueError(f"NF4Weight.from_bnb: the nested state's blocksize must be {DQ_BLOCK}, got "
                                 f"{s2.blocksize}")
            return cls(data, quant_state.absmax, tuple(quant_state.shape), quant_state.blocksize, quant_state.dtype,
                       s2.absmax, quant_state.offset.to(torch.float32).reshape(()))
        return cls(data, quant_state.absmax, tuple(quant_state.shape), quant_state.blocksize, quant_state.dtype)


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """``weight`` (any shape, floating) quantized to NF4 in bitsandbytes' layout (module docstring): the same
    bytes and absmax as bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant)."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"quantize_nf4: weight must be a floating-point tensor, got "
                        f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__}")
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if weight.numel() == 0:
        raise ValueError(f"quantize_nf4: weight must be non-empty, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        absmax, scaled = _blockwise_absmax(flat, blocksize)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _bucketize(scaled, nf4_code(flat.device)).to(torch.uint8)
        data = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
        if not double_quant:
            return NF4Weight(data, absmax, tuple(weight.shape), blocksize, weight.dtype)
        offset = absmax.mean()
        am2, scaled2 = _blockwise_absmax(absmax - offset, DQ_BLOCK)
        qabsmax = _bucketize(scaled2, DYNAMIC_CODE.to(flat.device)).to(torch.uint8)
        return NF4Weight(data, qabsmax, tuple(weight.shape), blocksize, weight.dtype, am2, offset)


def dequantize_nf4_reference(weight: NF4Weight) -> Tensor:
    """The weight in float64 by the written-out formula (module docstring), unpacked element by element: what the
    tests hold the kernels to (each float32 product of two float32 values is exact in float64)."""
    data = weight.data.reshape(-1).to(torch.int64)
    q = torch.stack((data >> 4, data & 15), dim=1).reshape(-1)
    n = 1
    for s in weight.shape:
        n *= s
    q = q[:n]
    absmax = weight.absmax_f32().to(torch.float64)
    idx = torch.arange(n, device=q.device) // weight.blocksize
    return (nf4_code(q.device).to(torch.float64)[q] * absmax[idx]).view(weight.shape)


# ---- the ops ----
def _fake_fwd(x, qweight, absmax, bias, n, k, blocksize):
    return x.new_empty((x.shape[0], n))


def _fake_dx(dy, qweight, absmax, n, k, blocksize):
    return dy.new_empty((dy.shape[0], k))


def _fake_dequant(qweight, absmax, n, k, blocksize, dtype):
    return absmax.new_empty((n, k), dtype=dtype)


nf4_linear_dx = define_op(
    "nf4_linear_dx(Tensor dy, Tensor qweight, Tensor absmax, int n, int k, int blocksize) -> Tensor",
    _fake_dx, "nf4:nf4_linear_dx")

nf4_dequantize_op = define_op(
    "nf4_dequantize(Tensor qweight, Tensor absmax, int n, int k, int blocksize, ScalarType dtype) -> Tensor",
    _fake_dequant, "nf4:nf4_dequantize")


def _setup(ctx, inputs, output):
    x, qweight, absmax, bias, n, k, blocksize = inputs
    ctx.save_for_backward(qweight, absmax)
    ctx.meta = (n, k, blocksize)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    qweight, absmax = ctx.saved_tensors
    n, k, blocksize = ctx.meta
    need = ctx.needs_input_grad
    dy = unit_last(dy)
    dx = nf4_linear_dx(dy, qweight, absmax, n, k, blocksize) if need[0] else None
    db = dy.sum(0) if ctx.has_bias and need[3] else None
    return dx, None, None, db, None, None, None


nf4_linear_fwd = define_op(
    "nf4_linear_fwd(Tensor x, Tensor qweight, Tensor absmax, Tensor? bias, int n, int k, int blocksize) -> Tensor",
    _fake_fwd, "nf4:nf4_linear_fwd", backward=_backward, setup_context=_setup)


# ---- public functions ----
def _check_weight(fn: str, weight) -> Tuple[int, int]:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"{fn}: weight must be an NF4Weight (tritium.quantize_nf4), got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"{fn}: weight must stand for a 2-D (out_features, in_features) matrix, got shape "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if k % weight.blocksize:
        raise ValueError(f"{fn}: weight's in_features ({k}) must be a multiple of its blocksize "
                         f"({weight.blocksize}) so that each row is whole blocks; quantize with a blocksize that "
                         f"divides {k} (one of {[b for b in BLOCKSIZES if k % b == 0] or 'none'})")
    return n, k


def nf4_dequantize(weight: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """W (out, in) in ``dtype`` (default weight.dtype): bitsandbytes' dequantize_4bit, value for value."""
    dtype = weight.dtype if dtype is None else dtype
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"nf4_dequantize: weight must be an NF4Weight, got {type(weight).__name__}")
    if len(weight.shape) == 2 and weight.shape[1] % weight.blocksize == 0 and dtype in (
            torch.float32, torch.bfloat16, torch.float16) and weight.device.type in ("cpu", "cuda"):
        n, k = weight.shape
        return nf4_dequantize_op(weight.data.view(-1), weight.absmax_f32(), n, k, weight.blocksize, dtype)
    return dequantize_nf4_reference(weight).float().to(dtype)


def check_nf4_linear(x, weight, bias) -> Tuple[int, int]:
    """nf4_linear's argument checks (errors name it); returns the weight's (n, k)."""
    n, k = _check_weight("nf4_linear", weight)
    check_linear_input("nf4_linear", x, bias, n, k, weight.device)
    return n, k


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """x (*, in) @ W^T + bias -> (*, out) in x's dtype, W the NF4 weight dequantised in the kernel (its float32
    values, products and sums in float32). Differentiable w.r.t. x (dx = dy W) and bias; the NF4 base is frozen.
    x: float32, bfloat16 or float16 (float64 goes through the float64 dequantised weight)."""
    n, k = check_nf4_linear(x, weight, bias)
    from .._backend import use_reference

    if x.dtype == torch.float64 or x.numel() == 0 or use_reference() or x.device.type not in ("cpu", "cuda"):
        w = dequantize_nf4_reference(weight).to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    y = call_op(nf4_linear_fwd, unit_last(x.reshape(-1, k)), weight.data.view(-1), weight.absmax_f32(), bias, n, k,
                weight.blocksize)
    return y.view(*x.shape[:-1], n)



__all__: List[str] = ["quantize_nf4", "nf4_linear", "nf4_dequantize"]
