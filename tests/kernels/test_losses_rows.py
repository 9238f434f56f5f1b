"""The row losses' Triton kernels (kernels/losses_rows.py; interpreter) against torch and a float64 reference:
every loss id of the row table, its per-row loss and statistics, every input's gradient rows from the statistics
and from its own recompute, at odd shapes and a row wider than one block; plus the sm_80/sm_90 compile check at
the bar shape."""
import pytest
import torch

from tritium.kernels import losses_rows
from tritium.ops.losses import ROW_CONTRASTIVE, ROW_COSINE, ROW_MULTI_MARGIN, ROW_TRIPLET, ROW_TRIPLET_SWAP
from tests.kernels.test_losses import ROW_CASES, _row_ref, row_inputs
from tests.util import KERNEL_DTYPES, assert_within_torch_error, check_gpu_compile, leaf, on_device

triton_rows = on_device(losses_rows)
# (rows, cols): a single element, odd widths below and at one block, a row that loops over three blocks
SHAPES = ((1, 1), (7, 129), (129, 7), (3, 2100))


def test_ids_match_the_ops_table():
    assert (losses_rows.TRIPLET, losses_rows.TRIPLET_SWAP, losses_rows.COSINE, losses_rows.CONTRASTIVE,
            losses_rows.MULTI_MARGIN) == (ROW_TRIPLET, ROW_TRIPLET_SWAP, ROW_COSINE, ROW_CONTRASTIVE, ROW_MULTI_MARGIN)


def test_registered_for_cuda():
    """The row ops' CUDA kernels are these launchers (the public functions send CUDA calls to the ops)."""
    import tritium  # noqa: F401  (registers the ops)

    for op in ("loss_rows", "loss_rows_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tritium::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tritium::{op}", "CPU"), op


def _torch(loss, ins, y, w, a, b, c, dloss, dt, via=None):
    """torch's per-row loss and input gradients computed in dt (via: computed in that dtype and rounded to dt, the
    float32 arithmetic of torch's CUDA kernel for 16-bit inputs, where torch has no 16-bit CPU kernel)."""
    run = via or dt
    leaves = [leaf(t, run) for t in ins]
    args = leaves + [None] * (3 - len(leaves)) if loss != ROW_MULTI_MARGIN else [leaves[0], None, None]
    yy = None if y is None else (y if y.dtype == torch.int64 else y.to(run))
    val = _row_ref(loss, *args, yy, None if w is None else w.to(run), a, b, c)
    gs = torch.autograd.grad(val, leaves, dloss.to(run))
    return val.detach().to(dt), tuple(g.to(dt) for g in gs)


PARAMS = [(dt,) + case for case in ROW_CASES for dt in KERNEL_DTYPES]


@pytest.mark.parametrize("dtype,what,loss,a,b,c", PARAMS, ids=[f"{p[1]}-{str(p[0])[6:]}" for p in PARAMS])
def test_rows(dtype, what, loss, a, b, c):
    """Per-row losses (float32) and every input's gradient rows (in dtype, from an upstream gradient per row)
    against torch in dtype and in float64; the backward from the forward's statistics gives the bits of its own
    recompute; one gradient asked for writes only that one."""
    for n, d in SHAPES:
        x1, x2, x3, y, w = row_inputs(loss, n, d, dtype)
        ins = [t for t in (x1, x2, x3) if t is not None]
        dloss = torch.randn(n, dtype=torch.float64).to(dtype)
        out, stats = triton_rows.loss_rows(loss, x1, x2, x3, y, w, a, b, c)
        assert out.dtype == torch.float32 and stats.dtype == torch.float32 and stats.shape == (n, 3)
        grads = triton_rows.loss_rows_bwd(loss, dloss.float(), x1, x2, x3, y, w, a, b, c, True, True, True,
                                          stats)[:len(ins)]
        recomputed = triton_rows.loss_rows_bwd(loss, dloss.float(), x1, x2, x3, y, w, a, b, c, True, True,
                                               True)[:len(ins)]
        for got, want in zip(grads, recomputed):
            assert torch.equal(got, want)
        # loss_rows_grad: the two launches' results
        fused = triton_rows.loss_rows_grad(loss, dloss.float(), x1, x2, x3, y, w, a, b, c, True, True, True)
        assert torch.equal(fused[0], out) and torch.equal(fused[1], stats)
        assert all(torch.equal(got, want) for got, want in zip(fused[2:], grads))
        via = torch.float32 if loss == ROW_MULTI_MARGIN and dtype != torch.float32 else None
        mine = _torch(loss, ins, y, w, a, b, c, dloss, dtype, via)
        ref = _torch(loss, ins, y, w, a, b, c, dloss, torch.float64)
        at = f"{what} ({n}, {d})"
        assert_within_torch_error(out.to(dtype), mine[0], ref[0], f"{at} loss")
        for k, g in enumerate(grads):
            assert g.dtype == dtype
            assert_within_torch_error(g, mine[1][k], ref[1][k], f"{at} grad {k}")
        # one gradient asked for (an upstream gradient of stride 0): the others are empty, the one written the same
        only = triton_rows.loss_rows_bwd(loss, dloss.float()[:1].expand(n), x1, x2, x3, y, w, a, b, c, False, False,
                                         True, stats)
        assert only[0].numel() == 0 and only[1].numel() == 0
        if x3 is not None:
            want = triton_rows.loss_rows_bwd(loss, dloss.float()[:1].expand(n).contiguous(), x1, x2, x3, y, w, a, b,
                                             c, True, True, True, stats)[2]
            torch.testing.assert_close(only[2], want, rtol=0, atol=0)


def test_rows_strided():
    """Row strides other than the width (column slices of one tensor) are read in place."""
    base = torch.randn(9, 40)
    x1, x2, x3 = base[:, :13], base[:, 13:26], base[:, 26:39]
    out = triton_rows.loss_rows(ROW_TRIPLET, x1, x2, x3, None, None, 1.0, 2.0, 1e-6)[0]
    torch.testing.assert_close(out, torch.nn.functional.triplet_margin_loss(x1, x2, x3, reduction="none"))
    dl = torch.randn(9)
    g = triton_rows.loss_rows_bwd(ROW_TRIPLET, dl, x1, x2, x3, None, None, 1.0, 2.0, 1e-6, True, True, True)
    g_contig = triton_rows.loss_rows_bwd(ROW_TRIPLET, dl, x1.contiguous(), x2.contiguous(), x3.contiguous(), None,
                                         None, 1.0, 2.0, 1e-6, True, True, True)
    for a, b in zip(g, g_contig):
        assert torch.equal(a, b)


def test_multi_margin_target_out_of_range():
    """A target out of range gives that row a NaN loss and gradient row (the C++ kernel raises; a GPU kernel cannot
    without a host sync); the other rows are unaffected."""
    x, y = torch.randn(3, 5), torch.tensor([0, 5, 1])
    good = torch.tensor([0, 2, 1])
    out = losses_rows.loss_rows(ROW_MULTI_MARGIN, x, None, None, y, None, 1.0, 1.0, 0.0)[0]
    want = losses_rows.loss_rows(ROW_MULTI_MARGIN, x, None, None, good, None, 1.0, 1.0, 0.0)[0]
    assert torch.isnan(out[1]) and torch.equal(out[[0, 2]], want[[0, 2]])
    dl = torch.ones(3)
    g = losses_rows.loss_rows_bwd(ROW_MULTI_MARGIN, dl, x, None, None, y, None, 1.0, 1.0, 0.0, True, False, False)[0]
    g_good = losses_rows.loss_rows_bwd(ROW_MULTI_MARGIN, dl, x, None, None, good, None, 1.0, 1.0, 0.0, True, False,
                                       False)[0]
    assert torch.isnan(g[1]).all() and torch.equal(g[[0, 2]], g_good[[0, 2]])


def test_bad_arguments():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="multi_margin takes p = 1 or 2"):
        losses_rows.loss_rows(ROW_MULTI_MARGIN, x, None, None, torch.tensor([0, 1, 2]), None, 1.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="y must be"):
        losses_rows.loss_rows(ROW_COSINE, x, x, None, None, None, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="share x1's shape"):
        losses_rows.loss_rows(ROW_TRIPLET, x, x, torch.randn(3, 4), None, None, 1.0, 2.0, 1e-6)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every row loss (and each p mode), forward and backward from statistics and recomputing them, compiles for
    sm_80/sm_90 without spills at the bar shape (8192, 1024) and a row wider than a block (the launches are
    recorded, not run)."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for n, d in ((8192, 1024), (2, 3000)):
                for _, loss, a, b, c in ROW_CASES:
                    x1, x2, x3, y, w = row_inputs(loss, n, d, dtype)
                    out, stats = losses_rows.loss_rows(loss, x1, x2, x3, y, w, a, b, c)
                    dl = torch.ones(n)
                    losses_rows.loss_rows_bwd(loss, dl, x1, x2, x3, y, w, a, b, c, True, True, True, stats)
                    losses_rows.loss_rows_bwd(loss, dl, x1, x2, x3, y, w, a, b, c, True, True, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_rows_fwd_kernel", "_rows_bwd_kernel"}
