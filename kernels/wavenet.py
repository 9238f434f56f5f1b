"""WaveNet's gated activation: z = tanh(a + c_a) * sigmoid(g + c_g) over h (B, 2C, T) = [a | g] along channels
(optional conditioning c of h's shape), forward and backward (dh = [dz s (1 - t^2) | dz t s (1 - s)], t and s
recomputed from h). Per batch row the halves are contiguous runs of n = C T elements: one program per (row, block
of n). Traffic: forward reads 2n (+2n) and writes n per row; backward reads 3n (+2n) and writes 2n."""
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _wavenet_gate_kernel(H, COND, DZ, OUT, n, HAS_COND: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b * 2 * n + offs
    a = tl.load(H + base, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(H + base + n, mask=mask, other=0.0).to(tl.float32)
    if HAS_COND:
        a += tl.load(COND + base, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(COND + base + n, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(a)
    s = 1.0 / (1.0 + tl.exp(-g))
    if BACKWARD:
        d = tl.load(DZ + b * n + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + base, (d * s * (1.0 - t * t)).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + base + n, (d * t * s * (1.0 - s)).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + b * n + offs, (t * s).to(OUT.dtype.element_ty), mask=mask)


def _launch(h, cond, dz, out, backward):
    B, C2, T = h.shape
    n = C2 // 2 * T
    if out.numel() == 0:
        return out
    BLOCK = 1024
    _wavenet_gate_kernel[(B, triton.cdiv(n, BLOCK))](h, cond if cond is not None else h, dz if dz is not None else h,
                                                     out, n, HAS_COND=cond is not None, BACKWARD=backward,
                                                     BLOCK=BLOCK, num_warps=4)
    return out


def wavenet_gate_fwd(h, cond):
    """z (B, C, T) = tanh(h[:, :C] + cond[:, :C]) * sigmoid(h[:, C:] + cond[:, C:]); h, cond contiguous."""
    B, C2, T = h.shape
    return _launch(h, cond, None, torch.empty((B, C2 // 2, T), device=h.device, dtype=h.dtype), False)


def wavenet_gate_bwd(dz, h, cond):
    """dh (B, 2C, T) for dz (B, C, T) contiguous (also the conditioning's gradient)."""
    return _launch(h, cond, dz, torch.empty_like(h, memory_format=torch.contiguous_format), True)
