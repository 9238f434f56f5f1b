"""info_nce's Triton kernels (kernels/losses_nce.py; interpreter) against torch's materialised computation
(tritium.reference.info_nce) in the input dtype and in float64: the per-row loss, the row and column
log-sum-exps the backward reads, and the gradients of query, key and negatives, symmetric or not, at odd shapes
(one row, rows and features across several tiles); plus the sm_80/sm_90 compile check at the bar shape."""
import pytest
import torch
import torch.nn.functional as F

from tritium import reference
from tritium.kernels import losses_nce
from tests.util import (KERNEL_DTYPES, assert_within_torch_error, check_gpu_compile, interpreter_bf16_dot, leaf,
                        on_device)

triton_nce = on_device(losses_nce)
# (N, D, M negatives): one row of one feature, rows and features past one tile (129: three row tiles; 1000: the
# feature loop and two feature blocks of the backward), explicit negatives past one column tile
SHAPES = ((1, 1, 0), (7, 1000, 0), (129, 7, 0), (70, 33, 67))


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    """bf16 dots in the interpreter as a GPU computes them (tests/util.py interpreter_bf16_dot)."""
    with interpreter_bf16_dot():
        yield


def test_registered_for_cuda():
    """info_nce's ops run these launchers on CUDA and the blocked BLAS + C++ composite on CPU."""
    import tritium  # noqa: F401  (registers the ops)

    for op in ("info_nce_fwd", "info_nce_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tritium::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tritium::{op}", "CPU"), op


def _unit_rows(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).to(dtype)


def _torch(ins, inv_t, symmetric, dloss, dt):
    """torch's per-row loss, the two log-sum-exps and the inputs' gradients, computed in dt (materialised)."""
    leaves = [leaf(t, dt) for t in ins]
    q, k = leaves[0], leaves[1]
    neg = leaves[2] if len(leaves) > 2 else None
    val = reference.info_nce(q, k, 1.0 / inv_t, symmetric, neg, False, "none")
    gs = torch.autograd.grad(val, leaves, dloss.to(dt))
    with torch.no_grad():
        s = q @ k.t() / (1.0 / inv_t)
        full = s if neg is None else torch.cat([s, q @ neg.t() / (1.0 / inv_t)], 1)
        lse_row, lse_col = torch.logsumexp(full, 1), torch.logsumexp(s, 0)
    return val.detach(), lse_row, lse_col, gs


@pytest.mark.parametrize("symmetric", (True, False), ids=("symmetric", "one-way"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d)[6:])
def test_info_nce(dtype, symmetric):
    inv_t = 1.0 / 0.07
    for n, d, m in SHAPES:
        ins = [_unit_rows(n, d, dtype), _unit_rows(n, d, dtype)] + ([_unit_rows(m, d, dtype)] if m else [])
        neg = ins[2] if m else None
        dloss = torch.randn(n, dtype=torch.float64).to(dtype)
        loss, lse_row, lse_col = triton_nce.info_nce_fwd(ins[0], ins[1], neg, inv_t, symmetric, 16)
        assert loss.dtype == lse_row.dtype == lse_col.dtype == torch.float32
        assert lse_col.shape == ((n,) if symmetric else (0,))
        grads = triton_nce.info_nce_bwd(dloss.float(), ins[0], ins[1], neg, lse_row, lse_col, inv_t, symmetric, 16)
        assert grads[2].shape == (ins[2].shape if m else (0,))
        mine = _torch(ins, inv_t, symmetric, dloss, dtype)
        ref = _torch(ins, inv_t, symmetric, dloss, torch.float64)
        at = f"({n}, {d}, {m})"
        assert_within_torch_error(loss.to(dtype), mine[0], ref[0], f"{at} loss")
        assert_within_torch_error(lse_row.to(dtype), mine[1], ref[1], f"{at} lse_row")
        if symmetric:
            assert_within_torch_error(lse_col.to(dtype), mine[2], ref[2], f"{at} lse_col")
        for name, got, want, want64 in zip(("dq", "dk", "dn"), grads, mine[3], ref[3]):
            assert got.dtype == dtype
            assert_within_torch_error(got, want, want64, f"{at} {name}")


def test_strided_rows():
    """Row strides other than the width (column slices of one tensor) are read in place."""
    base = F.normalize(torch.randn(20, 30), dim=-1)
    q, k = base[:, :13], base[:, 13:26]
    got = losses_nce.info_nce_fwd(q, k, None, 5.0, True, 16)
    want = losses_nce.info_nce_fwd(q.contiguous(), k.contiguous(), None, 5.0, True, 16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dl = torch.randn(20)
    got = losses_nce.info_nce_bwd(dl, q, k, None, *want[1:], 5.0, True, 16)
    want = losses_nce.info_nce_bwd(dl, q.contiguous(), k.contiguous(), None, *want[1:], 5.0, True, 16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """The forward (both directions, with and without negatives) and the three gradient launches compile for
    sm_80/sm_90 without spills and within shared memory at the bar shape (N 8192, dim 512) in float32, bfloat16
    and float16 (the launches are recorded, not run)."""
    def run():
        for dtype in KERNEL_DTYPES:
            q, k, neg = (torch.empty(r, 512, dtype=dtype) for r in (8192, 8192, 1024))
            for negatives in (None, neg):
                _, lse_row, lse_col = losses_nce.info_nce_fwd(q, k, negatives, 10.0, True, 16)
                losses_nce.info_nce_bwd(torch.ones(8192), q, k, negatives, lse_row, lse_col, 10.0, True, 16)
            _, lse_row, lse_col = losses_nce.info_nce_fwd(q, k, None, 10.0, False, 16)
            losses_nce.info_nce_bwd(torch.ones(8192), q, k, None, lse_row, lse_col, 10.0, False, 16)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_nce_lse_kernel", "_nce_grad_kernel"}
