"""Flash attention kernels, C++ (torch.ops.tritium) and Triton (interpreter), against float64 torch SDPA.

Bound: the kernel's error (output and dq, dk, dv) is at most 2x the error of torch's own SDPA in the same dtype
(for softcap, which SDPA lacks: torch's matmul/tanh/softmax/matmul composition in the dtype). Windows and
bottom-right causal are given to torch as explicit boolean masks. The interpreter is slow: Triton cases use
short sequences and few heads but reach every code path (masks, windows, softcap, GQA, partial blocks, rows
that see no key); the C++ kernel also runs the long cases (1000) and every head dim.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tests.util import assert_within_torch_error, check_gpu_compile, interpreter_bf16_dot, on_device
from tritium import reference
from tritium.kernels import attention

triton_attn = on_device(attention)

cpp = torch.ops.tritium


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    """bf16 dots in the interpreter as a GPU computes them (tests/util.py interpreter_bf16_dot)."""
    with interpreter_bf16_dot():
        yield


def _visible(L, S, offset, left, right):
    i = torch.arange(L)[:, None] + offset
    j = torch.arange(S)[None, :]
    vis = torch.ones(L, S, dtype=torch.bool)
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    return vis


def _torch_attn(q, k, v, scale, vis, add_mask, softcap):
    """torch's own computation in q's dtype (SDPA; the naive composition when soft-capping)."""
    group = q.shape[1] // k.shape[1]
    if softcap:
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = softcap * torch.tanh((q @ kk.transpose(-1, -2)) * scale / softcap)
        if add_mask is not None:
            s = s + add_mask
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s.float() if q.dtype != torch.float64 else s, -1).nan_to_num(0.0).to(q.dtype)
        return p @ vv
    m = torch.zeros(vis.shape, dtype=q.dtype).masked_fill(~vis, float("-inf"))
    if add_mask is not None:
        m = m + add_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=group > 1)


def _run_case(impl, dtype, B, H, Hk, L, S, D, *, offset=0, left=-1, right=-1, softcap=0.0, mask=None,
              Dv=None, dlse=False):
    Dv = Dv or D
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(B, Hk, S, D, dtype=torch.float64)
    v = torch.randn(B, Hk, S, Dv, dtype=torch.float64)
    do = torch.randn(B, H, L, Dv, dtype=torch.float64)
    scale = 1.0 / math.sqrt(D)
    vis = _visible(L, S, offset, left, right)
    add = None
    if mask == "additive":  # per-head random bias with some -inf, broadcast over batch (stride 0)
        add = torch.randn(1, H, L, S, dtype=torch.float64).masked_fill(torch.rand(1, H, L, S) < 0.2, float("-inf"))
    elif mask == "bool":  # a (L, S) key-padding style mask with a fully masked row, broadcast over batch, heads
        keep = torch.rand(L, S) > 0.3
        keep[L // 2] = False
        add = torch.zeros(L, S, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    # every input rounded to dtype first: the float64 reference sees the values the kernel and torch see
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
    add = None if add is None else add.to(dtype).double()
    kmask = None if add is None else add.to(dtype).expand(B, H, L, S)

    qd, kd, vd, dod = (t.to(dtype) for t in (q, k, v, do))
    out, lse = impl.flash_attn_fwd(qd, kd, vd, kmask, scale, offset, left, right, softcap)
    dl = torch.randn(B, H, L, dtype=lse.dtype) if dlse else None
    dq, dk, dv = impl.flash_attn_bwd(dod, qd, kd, vd, out, lse, dl, kmask, scale, offset, left, right, softcap)

    results = {}
    for d in (dtype, torch.float64):
        ins = [t.to(d).requires_grad_(True) for t in (q, k, v)]
        if dlse:  # torch has no lse output: its composition (reference.flash_attention) in the dtype
            outs = reference.flash_attention(*ins, False, scale, (left, right), softcap or None, True)
            gos = (do.to(d), dl.to(outs[1].dtype))
        else:
            outs = (_torch_attn(*ins, scale, vis, None if add is None else add.to(d), softcap),)
            gos = (do.to(d),)
        g = torch.autograd.grad(outs, ins, gos)
        results[d] = (outs[0].detach(), *g)
    for name, ours, theirs, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), results[dtype],
                                       results[torch.float64]):
        assert_within_torch_error(ours, theirs, ref, name)
    # lse against float64 logsumexp of the visible scores
    s = (q @ k.repeat_interleave(H // Hk, 1).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if add is not None:
        s = s + add
    ref_lse = s.masked_fill(~vis, float("-inf")).logsumexp(-1)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    # lse is float32 for every 16-bit dtype too, its scores accumulated in float32 from the exact products of the
    # rounded inputs: the same float32 bound applies to all three
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=tol, atol=tol)


# (B, H, Hk, L, S, D, options): every code path on short sequences
SMALL = [
    (1, 2, 2, 17, 17, 32, {}),
    (2, 4, 1, 17, 40, 64, dict(right=0)),                          # MQA, causal top-left, L < S
    (1, 4, 4, 40, 17, 32, dict(right=0)),                          # causal top-left, L > S: rows past S
    (1, 4, 1, 33, 70, 80, dict(right=0, offset=70 - 33)),          # bottom-right causal, D=80 (padded block)
    (1, 8, 1, 1, 129, 64, dict(right=0, offset=128)),              # decode step, GQA 8
    (1, 2, 2, 70, 70, 32, dict(left=9, right=3, offset=0)),        # sliding window both sides
    (1, 4, 2, 129, 129, 16, dict(left=20, right=0)),               # Mistral-style window
    (1, 2, 1, 40, 50, 32, dict(softcap=5.0, right=0, offset=10)),  # softcap + causal
    (1, 2, 2, 33, 45, 32, dict(mask="additive")),
    (2, 2, 2, 17, 30, 32, dict(mask="bool", right=0)),             # bool mask with a fully masked row
    (1, 2, 2, 20, 20, 32, dict(left=-1, right=0, offset=-25)),     # every row sees nothing
    (1, 2, 1, 21, 21, 32, dict(Dv=48)),                            # value head dim != query head dim
]
SMALL_IDS = [f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}x{c[5]}-{'-'.join(f'{k}{v}' for k, v in c[6].items())}"
             for c in SMALL]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", SMALL, ids=SMALL_IDS)
def test_cpp_small(case, dtype):
    B, H, Hk, L, S, D, opts = case
    _run_case(cpp, dtype, B, H, Hk, L, S, D, **opts)


TRITON_CASES = [c for c in SMALL if c[3] * c[4] <= 129 * 129 and c[1] <= 4] + [SMALL[4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", TRITON_CASES, ids=[SMALL_IDS[SMALL.index(c)] for c in TRITON_CASES])
def test_triton(case, dtype):
    B, H, Hk, L, S, D, opts = case
    _run_case(triton_attn, dtype, B, H, Hk, L, S, D, **opts)


# The large head dims take other block sizes (kernels/attention.py _blocks) and float16 other dot operands: every
# head-dim branch in the three dtypes, causal with a window so the key-range bounds move per query block.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("d", (128, 256))
def test_triton_large_head_dims(d, dtype):
    _run_case(triton_attn, dtype, 1, 2, 1, 40, 45, d, right=0, left=20, offset=5)


@pytest.mark.parametrize("dtype", [torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", [SMALL[1], SMALL[6], SMALL[8]], ids=[SMALL_IDS[i] for i in (1, 6, 8)])
def test_triton_float16(case, dtype):
    B, H, Hk, L, S, D, opts = case
    _run_case(triton_attn, dtype, B, H, Hk, L, S, D, **opts)


@pytest.mark.parametrize("impl", [cpp, triton_attn], ids=["cpp", "triton"])
def test_lse_gradient(impl):
    """return_lse's gradient (d lse / d s = P) flows into dq and dk."""
    _run_case(impl, torch.float32, 1, 2, 1, 17, 33, 32, softcap=4.0, dlse=True)


LONG = [
    (1, 4, 4, 1000, 1000, 64, dict(right=0)),
    (1, 8, 2, 1000, 1000, 128, dict(right=0, left=200)),         # GQA 4, window
    (1, 8, 1, 129, 1000, 80, dict(right=0, offset=871)),         # GQA 8, chunked prefill against a cache
    (2, 2, 2, 1000, 129, 32, dict(mask="additive")),
    (1, 2, 2, 1000, 1000, 64, dict(softcap=30.0, right=0)),
    # odd head dims and an odd last query block: the bfloat16 backward's pair panels pad K-dims of odd length
    (1, 2, 1, 301, 333, 33, dict(right=0, offset=32, Dv=17)),
    (1, 2, 1, 129, 600, 24, dict(softcap=3.0, dlse=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", LONG, ids=[f"{c[3]}x{c[4]}x{c[5]}-{i}" for i, c in enumerate(LONG)])
def test_cpp_long(case, dtype):
    B, H, Hk, L, S, D, opts = case
    _run_case(cpp, dtype, B, H, Hk, L, S, D, **opts)


def test_cpp_strided_inputs():
    """(batch, seq, heads, dim) tensors viewed as (batch, heads, seq, dim) are read in place."""
    q, k, v = (torch.randn(2, 37, 4, 32) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out, _ = cpp.flash_attn_fwd(qt, kt, vt, None, 0.2, 0, -1, 0, 0.0)
    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("d", (16, 32, 64, 80, 128, 256))
def test_gpu_compile(d):
    """Every kernel configuration the launchers pick compiles for sm_80/sm_90 (shared memory reported)."""
    B, H, L, S = 1, 2, 20, 20

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(B, H, L, d, dtype=dtype) for _ in range(3))
            mask = torch.zeros(1, 1, L, S, dtype=dtype).expand(B, H, L, S)
            for m, left, right, cap in ((None, -1, -1, 0.0), (None, -1, 0, 0.0), (mask, 4, 0, 0.0),
                                        (None, 4, 2, 3.0)):
                o, lse = triton_attn.flash_attn_fwd(q, k, v, m, 0.1, 0, left, right, cap)
                triton_attn.flash_attn_bwd(o, q, k, v, o, lse, lse if cap else None, m, 0.1, 0, left, right, cap)

    report = check_gpu_compile(run)
    names = {c.name for c in report}
    assert names == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
