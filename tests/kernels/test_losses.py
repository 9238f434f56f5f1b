"""Loss kernels, Triton (interpreter) and C++, against torch and a float64 reference: every row of the
elementwise table (values, the reduction in the same pass, the input's gradient from a per-element and a 0-d
upstream gradient, full and per-column weights, per-column parameters) and the row kernel's losses."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import losses
from tritium.ops.losses import (ELEMENTWISE, LOSS_IDS, ROW_CONTRASTIVE, ROW_COSINE, ROW_MULTI_MARGIN, ROW_TRIPLET,
                                ROW_TRIPLET_SWAP)
from tests.util import CPU_DTYPES, assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_losses = on_device(losses)
cpp = torch.ops.tritium
CASES, IDS = impl_cases(triton_losses)


def _margin_ranking(x, y, reduction="none", margin=0.0):
    return torch.margin_ranking_loss(x, torch.zeros_like(x), y, margin, 0)


# name -> (inputs (x, y) in float64 for a shape, pointwise torch function f(x, y, w, p), a, b, weight kinds, has p)
def _signs(shape):
    return torch.randint(0, 2, shape).double() * 2 - 1


def _bits(shape):
    return torch.randint(0, 2, shape).double()


SPEC = {
    "mse_loss": (lambda s: (torch.randn(s), torch.randn(s)),
                 lambda x, y, w, p, a, b: F.mse_loss(x, y, reduction="none"), 0.0, 0.0),
    "l1_loss": (lambda s: (torch.randn(s), torch.randn(s)), lambda x, y, w, p, a, b: F.l1_loss(x, y, reduction="none"),
                0.0, 0.0),
    "smooth_l1_loss": (lambda s: (torch.randn(s), torch.randn(s)),
                       lambda x, y, w, p, a, b: F.smooth_l1_loss(x, y, reduction="none", beta=a), 0.6, 0.0),
    "huber_loss": (lambda s: (torch.randn(s) * 2, torch.randn(s)),
                   lambda x, y, w, p, a, b: F.huber_loss(x, y, reduction="none", delta=a), 0.7, 0.0),
    "binary_cross_entropy": (lambda s: (torch.rand(s) * 0.98 + 0.01, torch.rand(s)),
                             lambda x, y, w, p, a, b: F.binary_cross_entropy(x, y, w, reduction="none"), 0.0, 0.0),
    "binary_cross_entropy_with_logits": (
        lambda s: (torch.randn(s) * 3, torch.rand(s)),
        lambda x, y, w, p, a, b: F.binary_cross_entropy_with_logits(x, y, w, reduction="none", pos_weight=p), 0.0, 0.0),
    "soft_margin_loss": (lambda s: (torch.randn(s) * 2, _signs(s)),
                         lambda x, y, w, p, a, b: F.soft_margin_loss(x, y, reduction="none"), 0.0, 0.0),
    "hinge_embedding_loss": (lambda s: (torch.randn(s), _signs(s)),
                             lambda x, y, w, p, a, b: F.hinge_embedding_loss(x, y, a, reduction="none"), 0.8, 0.0),
    "margin_ranking_loss": (lambda s: (torch.randn(s), _signs(s)),
                            lambda x, y, w, p, a, b: _margin_ranking(x, y, margin=a), 0.3, 0.0),
    "sigmoid_focal_loss": (lambda s: (torch.randn(s) * 2, _bits(s)),
                           lambda x, y, w, p, a, b: reference.sigmoid_focal_loss(x, y, a, b), 0.25, 2.0),
    "quantile_loss": (lambda s: (torch.randn(s), torch.randn(s)),
                      lambda x, y, w, p, a, b: reference.quantile_loss(x, y, p.tolist(), "none"), 0.0, 0.0),
}
WEIGHTED = {"binary_cross_entropy", "binary_cross_entropy_with_logits"}
PER_COLUMN = {"binary_cross_entropy_with_logits": "pos_weight", "quantile_loss": "quantiles"}


def test_table_is_complete():
    assert set(SPEC) == {loss.name for loss in ELEMENTWISE}


def _case(name, shape, dtype, weight_kind):
    make, fn, a, b = SPEC[name]
    x, y = (t.double().to(dtype) for t in make(shape))
    c = shape[-1]
    w = {"none": None, "full": torch.rand(shape) + 0.5, "col": torch.rand(c) + 0.5}[weight_kind]
    p = None
    if name == "binary_cross_entropy_with_logits":
        p = torch.rand(c) * 2 + 0.25
    elif name == "quantile_loss":
        p = torch.rand(c) * 0.9 + 0.05
    w = None if w is None else w.to(dtype)
    p = None if p is None else p.to(dtype)
    return fn, x, y, w, p, a, b


def _torch(fn, x, y, w, p, a, b, dtype, dy, scale=None):
    """torch's pointwise loss (and its reduction times scale when given) and the input's gradient, in dtype."""
    xi = leaf(x, dtype)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    val = fn(xi, y.to(dtype), cast(w), cast(p), a, b)  # (only the bce rows take a weight: WEIGHTED)
    if scale is not None:
        val = val.sum() * scale
    return val.detach(), torch.autograd.grad(val, xi, dy.to(dtype))[0]


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("name", list(SPEC))
def test_elementwise(impl_name, impl, dtype, name):
    """Each loss at an odd shape whose flat size spans several Triton programs: 'none' values and the gradient
    from a per-element upstream gradient, the reduced sum (one pass) and the gradient from a 0-d one."""
    shape = (5, 781) if impl_name == "cpp" else (3, 781)
    kinds = ("none", "full", "col") if name in WEIGHTED else ("none",)
    lid = LOSS_IDS[name]
    for kind in kinds:
        fn, x, y, w, p, a, b = _case(name, shape, dtype, kind)
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)
        out = impl.loss_fwd(lid, x, y, w, p, a, b, 1.0, False)
        dx = impl.loss_bwd(lid, dy, x, y, w, p, a, b, 1.0)
        mine = _torch(fn, x, y, w, p, a, b, dtype, dy)
        ref = _torch(fn, x, y, w, p, a, b, torch.float64, dy)
        assert out.dtype == dtype and dx.dtype == dtype
        assert_within_torch_error(out, mine[0], ref[0], f"{name} {kind} values")
        assert_within_torch_error(dx, mine[1], ref[1], f"{name} {kind} dx")
        scale = 1.0 / x.numel()
        s = impl.loss_fwd(lid, x, y, w, p, a, b, scale, True)
        g = torch.tensor(1.5, dtype=torch.float64).to(dtype)
        dxs = impl.loss_bwd(lid, g, x, y, w, p, a, b, scale)
        mine = _torch(fn, x, y, w, p, a, b, dtype, g, scale)
        ref = _torch(fn, x, y, w, p, a, b, torch.float64, g, scale)
        assert s.shape == () and s.dtype == dtype
        assert_within_torch_error(s, mine[0], ref[0], f"{name} {kind} mean")
        assert_within_torch_error(dxs, mine[1], ref[1], f"{name} {kind} dx of the mean")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("name", list(SPEC))
def test_fwd_grad_is_fwd_and_bwd_of_one(impl_name, impl, dtype, name):
    """loss_fwd_grad's one pass gives loss_bwd's dx for an upstream gradient of 1 bit for bit (a backward through a
    retained graph, or gradcheck's second one, computes it with loss_bwd: the two must agree), and loss_fwd's
    reduced loss to its last bits (the compiler may fuse the sum's additions differently), for every loss and weight
    kind, at a size whose blocks end in a partial vector."""
    shape = (5, 781) if impl_name == "cpp" else (3, 781)
    kinds = ("none", "full", "col") if name in WEIGHTED else ("none",)
    lid = LOSS_IDS[name]
    one = torch.tensor(1.0, dtype=dtype)
    for kind in kinds:
        _, x, y, w, p, a, b = _case(name, shape, dtype, kind)
        for scale in (1.0, 1.0 / x.numel()):
            s, dx = impl.loss_fwd_grad(lid, x, y, w, p, a, b, scale)
            assert s.shape == () and s.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
            s_ref = impl.loss_fwd(lid, x, y, w, p, a, b, scale, True)
            dx_ref = impl.loss_bwd(lid, one, x, y, w, p, a, b, scale)
            ulps = 4 * torch.finfo(dtype).eps
            torch.testing.assert_close(s, s_ref, rtol=ulps, atol=0, msg=f"{name} {kind} {scale} loss")
            assert torch.equal(dx, dx_ref), (name, kind, scale)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_losses), ("cpp", cpp)])
def test_empty(impl_name, impl):
    """An empty input: an empty pointwise loss and gradient, a zero sum (the public functions send empty inputs
    to torch, whose mean is NaN; the launchers still return well-formed results)."""
    x = torch.empty(0, 5)
    assert impl.loss_fwd(0, x, x, None, None, 0.0, 0.0, 1.0, False).shape == (0, 5)
    assert impl.loss_fwd(0, x, x, None, None, 0.0, 0.0, 1.0, True).item() == 0.0
    assert impl.loss_bwd(0, torch.tensor(1.0), x, x, None, None, 0.0, 0.0, 1.0).shape == (0, 5)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_losses), ("cpp", cpp)])
def test_special_points(impl_name, impl):
    """Ties at the formulas' thresholds (|d| = beta, delta; hinge and ranking margins at 0), exact zeros of
    bce's probability, NaN and infinite inputs: torch's values and gradients, in float32."""
    x = torch.tensor([0.0, 0.5, -0.5, 1.0, 2.0, float("nan"), float("inf"), -float("inf"), 1e-30, 0.3] * 3)
    y = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.5, 0.0, 1.0, -1.0, 0.0, 0.3] * 3)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0, -1.0] * 3)
    probs = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.25, 1.0, 0.0, 1e-30, 0.75] * 3)
    rows = [("mse_loss", x, y, 0.0), ("l1_loss", x, y, 0.0), ("smooth_l1_loss", x, y, 0.5),
            ("smooth_l1_loss", x, y, 0.0), ("huber_loss", x, y, 0.5), ("hinge_embedding_loss", x, signs, 0.5),
            ("margin_ranking_loss", x, signs, 0.5), ("binary_cross_entropy", probs, probs.flip(0), 0.0),
            ("soft_margin_loss", x, signs, 0.0)]
    for name, xs, ys, a in rows:
        fn = SPEC[name][1]
        xi = leaf(xs)
        val = fn(xi, ys, None, None, a, 0.0)
        gx = torch.autograd.grad(val, xi, torch.ones_like(val))[0]
        out = impl.loss_fwd(LOSS_IDS[name], xs, ys, None, None, a, 0.0, 1.0, False)
        dx = impl.loss_bwd(LOSS_IDS[name], torch.ones_like(xs), xs, ys, None, None, a, 0.0, 1.0)
        finite = torch.isfinite(val.detach()) | torch.isnan(val.detach())
        if name == "soft_margin_loss":  # torch's log1p(exp(z)) is inf where z overflows; the kernels are exact there
            finite = torch.isfinite(val.detach())
        torch.testing.assert_close(out[finite], val.detach()[finite], equal_nan=True, msg=name)
        torch.testing.assert_close(dx[finite], gx[finite], equal_nan=True, msg=f"{name} dx")


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_losses), ("cpp", cpp)])
def test_softplus_tails(impl_name, impl):
    """The kernels' softplus, log1p(exp(-|x|)) plus max(-x, 0), keeps its relative precision where exp(-|x|) is
    tiny (a confident, correct logit's loss ~ exp(-|x|)) and where it nears 1: bce_with_logits and soft_margin
    against float64 over |x| from 0 to 80, each value within a few float32 ulp of itself."""
    mag = torch.cat([torch.linspace(0, 2, 257), torch.linspace(2, 80, 391)]).double()
    x = torch.cat([mag, -mag])
    ones = torch.ones_like(x)
    for name, y in (("binary_cross_entropy_with_logits", (x < 0).double()), ("soft_margin_loss", x.sign())):
        fn, a, b = SPEC[name][1], SPEC[name][2], SPEC[name][3]
        ref = fn(x, y, None, ones[:1].expand(1) if name == "binary_cross_entropy_with_logits" else None, a, b)
        out = impl.loss_fwd(LOSS_IDS[name], x.float(), y.float(), None, None, a, b, 1.0, False).double()
        torch.testing.assert_close(out, ref, rtol=4e-6, atol=0, msg=name)


def test_bce_log_terms_over_the_range():
    """binary_cross_entropy's two terms, -log(x) (target 1) and -log1p(-x) (target 0), by the C++ kernels' inlined
    flog / flog1p over probabilities from 1e-38 to 1 - 2^-24 (log-spaced towards both ends): within 2x torch's own
    float32 error against float64, in float32 ulp of the result."""
    tiny = torch.logspace(-38, -0.31, 20001, dtype=torch.float64)
    x = torch.cat([tiny, 1 - tiny.clamp_min(2 ** -24)]).float()
    fi = torch.finfo(torch.float32)
    for target in (0.0, 1.0):
        y = torch.full_like(x, target)
        ref = F.binary_cross_entropy(x.double(), y.double(), reduction="none")
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))) * fi.eps
        theirs = F.binary_cross_entropy(x, y, reduction="none")
        ours = cpp.loss_fwd(LOSS_IDS["binary_cross_entropy"], x, y, None, None, 0.0, 0.0, 1.0, False)
        bound = 2 * ((theirs.double() - ref).abs() / ulp).max()
        err = (ours.double() - ref).abs() / ulp
        assert err.max() <= bound, f"target {target}: {err.max():.2f} ulp at x = {x[err.argmax()]:.8g} ({bound:.2f})"


def test_bce_range_errors():
    """The C++ kernel raises torch's errors for probabilities outside [0, 1] (NaN included)."""
    x, y = torch.rand(100), torch.rand(100)
    for bad_x, bad_y, what in ((1.5, 0.5, "input"), (float("nan"), 0.5, "input"), (0.5, -0.1, "target")):
        xs, ys = x.clone(), y.clone()
        xs[37], ys[37] = bad_x, bad_y
        for reduce in (False, True):
            with pytest.raises(RuntimeError, match=f"all elements of {what} should be between 0 and 1"):
                cpp.loss_fwd(LOSS_IDS["binary_cross_entropy"], xs, ys, None, None, 0.0, 0.0, 1.0, reduce)


def test_focal_gammas():
    """sigmoid_focal's general gamma (pow) and gamma 0 / 1 (their own branches), alpha < 0 (no alpha_t)."""
    x = torch.randn(4, 123, dtype=torch.float64) * 2
    y = _bits((4, 123))
    for impl in (triton_losses, cpp):
        for alpha, gamma in ((0.25, 0.0), (0.5, 1.0), (-1.0, 2.0), (0.75, 0.5), (0.25, 3.3)):
            dt = torch.float64 if impl is cpp else torch.float32
            xi = leaf(x)
            val = reference.sigmoid_focal_loss(xi, y, alpha, gamma)
            gx = torch.autograd.grad(val.sum(), xi)[0]
            out = impl.loss_fwd(LOSS_IDS["sigmoid_focal_loss"], x.to(dt), y.to(dt), None, None, alpha, gamma, 1.0,
                                False)
            dx = impl.loss_bwd(LOSS_IDS["sigmoid_focal_loss"], torch.tensor(1.0, dtype=dt), x.to(dt), y.to(dt), None,
                               None, alpha, gamma, 1.0)
            tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(out.double(), val.detach(), **tol)
            torch.testing.assert_close(dx.double(), gx, **tol)


# ---- the row kernel (C++) ----
def _row_ref(loss, x1, x2, x3, y, w, a, b, c):
    """torch's per-row loss for the row kernel's loss ids."""
    if loss in (ROW_TRIPLET, ROW_TRIPLET_SWAP):
        return F.triplet_margin_loss(x1, x2, x3, margin=a, p=b, eps=c, swap=loss == ROW_TRIPLET_SWAP,
                                     reduction="none")
    if loss == ROW_COSINE:
        return F.cosine_embedding_loss(x1, x2, y, margin=a, reduction="none")
    if loss == ROW_CONTRASTIVE:
        return reference.contrastive_loss(x1, x2, y, margin=a, eps=c, reduction="none")
    return F.multi_margin_loss(x1, y, p=int(b), margin=a, weight=w, reduction="none")


ROW_CASES = [("triplet-p2", ROW_TRIPLET, 1.0, 2.0, 1e-6), ("triplet-p1", ROW_TRIPLET, 0.5, 1.0, 1e-6),
             ("triplet-p3", ROW_TRIPLET, 1.0, 3.0, 1e-6), ("triplet-swap", ROW_TRIPLET_SWAP, 1.0, 2.0, 1e-6),
             ("cosine", ROW_COSINE, 0.2, 0.0, 0.0), ("contrastive", ROW_CONTRASTIVE, 4.0, 0.0, 1e-6),
             ("multi-margin-p1", ROW_MULTI_MARGIN, 1.0, 1.0, 0.0),
             ("multi-margin-p2", ROW_MULTI_MARGIN, 0.7, 2.0, 0.0)]


def row_inputs(loss, n, d, dtype):
    """(x1, x2, x3, y, w) of a row loss on n rows of d: x2 near x1, x3 for the triplets, labels for cosine
    (1, -1 and 0), contrastive (0/1) and multi-margin (class indices, with class weights; no x2)."""
    x1 = torch.randn(n, d, dtype=torch.float64).to(dtype)
    x2 = (x1.double() + torch.randn(n, d, dtype=torch.float64) * 0.7).to(dtype)
    x3 = torch.randn(n, d, dtype=torch.float64).to(dtype) if loss in (ROW_TRIPLET, ROW_TRIPLET_SWAP) else None
    y = w = None
    if loss == ROW_COSINE:
        y = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0]).repeat(n // 5 + 1)[:n].to(dtype)
    elif loss == ROW_CONTRASTIVE:
        y = _bits((n,)).to(dtype)
    elif loss == ROW_MULTI_MARGIN:
        y = torch.randint(0, d, (n,))
        w = (torch.rand(d) + 0.5).to(dtype)
        x2 = None
    return x1, x2, x3, y, w


# torch has no 16-bit CPU multi_margin_loss to measure its error against (the public function sends those calls
# to torch, which raises): the row kernel's multi-margin is checked in float32 and float64
ROW_PARAMS = [(dt,) + case for case in ROW_CASES for dt in CPU_DTYPES
              if case[1] != ROW_MULTI_MARGIN or dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize("dtype,what,loss,a,b,c", ROW_PARAMS, ids=[f"{p[1]}-{str(p[0])[6:]}" for p in ROW_PARAMS])
@pytest.mark.parametrize("d", (1, 7, 781))
def test_rows(dtype, what, loss, a, b, c, d):
    """Per-row losses and every input's gradient rows (from an upstream gradient per row) against torch in dtype
    and in float64."""
    n = 37
    x1, x2, x3, y, w = row_inputs(loss, n, d, dtype)
    ins = [t for t in (x1, x2, x3) if t is not None]
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    dloss = torch.randn(n, dtype=torch.float64).to(dtype)
    out, stats = cpp.loss_rows(loss, x1, x2, x3, y, w, a, b, c)
    assert out.dtype == adt and stats.dtype == adt and stats.shape == (n, 3)
    grads = cpp.loss_rows_bwd(loss, dloss.to(adt), x1, x2, x3, y, w, a, b, c, True, True, True, stats)[:len(ins)]
    # the forward's statistics give the bits the backward's own recompute gives
    recomputed = cpp.loss_rows_bwd(loss, dloss.to(adt), x1, x2, x3, y, w, a, b, c, True, True, True)[:len(ins)]
    for got, want in zip(grads, recomputed):
        assert torch.equal(got, want)
    # loss_rows_grad's one pass: the same loop as the two calls, so the same bits
    fused = cpp.loss_rows_grad(loss, dloss.to(adt), x1, x2, x3, y, w, a, b, c, True, True, True)
    assert torch.equal(fused[0], out) and torch.equal(fused[1], stats)
    assert all(torch.equal(got, want) for got, want in zip(fused[2:], grads))
    res = {}
    for dt in (dtype, torch.float64):
        leaves = [leaf(t, dt) for t in ins]
        args = leaves + [None] * (3 - len(leaves)) if loss != ROW_MULTI_MARGIN else [leaves[0], None, None]
        yy = None if y is None else (y if y.dtype == torch.int64 else y.to(dt))
        val = _row_ref(loss, *args, yy, None if w is None else w.to(dt), a, b, c)
        res[dt] = (val.detach(), torch.autograd.grad(val, leaves, dloss.to(dt)))
    assert_within_torch_error(out.to(dtype), res[dtype][0], res[torch.float64][0], f"{what} loss")
    for k, g in enumerate(grads):
        assert g.dtype == dtype
        assert_within_torch_error(g, res[dtype][1][k], res[torch.float64][1][k], f"{what} grad {k}")
    # one gradient asked for: the others are empty, the one written is the same
    only = cpp.loss_rows_bwd(loss, dloss.to(adt).expand(n)[:n], x1, x2, x3, y, w, a, b, c, False, False, True, stats)
    assert only[0].numel() == 0 and only[1].numel() == 0
    if x3 is not None:
        torch.testing.assert_close(only[2], grads[2])


def test_rows_strided():
    """Row strides other than the width (a column slice) are read in place."""
    base = torch.randn(9, 40, dtype=torch.float64)
    x1, x2, x3 = base[:, :13], base[:, 13:26], base[:, 26:39]
    out = cpp.loss_rows(ROW_TRIPLET, x1, x2, x3, None, None, 1.0, 2.0, 1e-6)[0]
    torch.testing.assert_close(out, F.triplet_margin_loss(x1, x2, x3, reduction="none"))


def test_multi_margin_target_out_of_range():
    with pytest.raises(RuntimeError, match="target out of range"):
        cpp.loss_rows(ROW_MULTI_MARGIN, torch.randn(3, 5), None, None, torch.tensor([0, 5, 1]), None, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n", (1, 7, 133))
def test_nce_blocks(dtype, n):
    """info_nce's block statistics (C++) against their torch form (ops/losses.py, the specification) in float64: row
    log-sum-exp with and without the negatives' block, the online column statistics across two blocks, and the
    block gradient with and without the column term and the diagonal. A bfloat16 block (the similarities of a
    bfloat16 matmul) is read in float32, the statistics' dtype, and its gradient written in bfloat16 (one rounding)."""
    from tritium.ops.losses import _nce_block_bwd_torch, _nce_block_fwd_torch
    adt = torch.float32 if dtype == torch.bfloat16 else dtype
    # the blocks as the kernels see them (rounded to dtype), in float64 for the reference
    s1, s2, sn = (torch.randn(b, w, dtype=torch.float64).mul(4).to(dtype).double()
                  for b, w in ((5, n), (3, n), (5, 11)))
    m0, e0 = torch.full((n,), float("-inf"), dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    # float32: the kernels' exp is ATen's exp_u20 algorithm (relative error up to ~1e-6, vec.h's fexp)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    # offset: the fixed-offset form (one exp per element about a bound on |s|, here the blocks' own; the
    # columns' running max is then the offset itself), and the running maxima's form
    bound = max(float(t.abs().max()) for t in (s1, s2, sn))
    for neg, offset in itertools.product((None, sn), (None, bound)):
        state = {"cpp": (m0.to(adt), e0.to(adt)), "ref": (m0, e0)}
        for blk in (s1, s2):
            ours = cpp.nce_block_fwd(blk.to(dtype), None if neg is None else neg[:blk.shape[0]].to(dtype),
                                     *state["cpp"], True, offset)
            assert all(t.dtype == adt for t in ours)
            ref = _nce_block_fwd_torch(blk, None if neg is None else neg[:blk.shape[0]], *state["ref"], True, offset)
            state = {"cpp": ours[1:], "ref": ref[1:]}
            torch.testing.assert_close(ours[0].double(), ref[0], **tol)
            if offset is not None:
                assert torch.equal(ours[1], torch.full_like(ours[1], offset))
            lse_ours = (state["cpp"][0] + state["cpp"][1].log()).double()
            torch.testing.assert_close(lse_ours, state["ref"][0] + state["ref"][1].log(), **tol)
        # the row statistics alone (not symmetric)
        ours = cpp.nce_block_fwd(s1.to(dtype), None if neg is None else neg[:5].to(dtype), m0[:0].to(adt),
                                 e0[:0].to(adt), False, offset)
        ref = _nce_block_fwd_torch(s1, None if neg is None else neg[:5], m0[:0], e0[:0], False, offset)
        torch.testing.assert_close(ours[0].double(), ref[0], **tol)
    with pytest.raises(RuntimeError, match="offset must be in"):
        cpp.nce_block_fwd(s1.to(dtype), None, m0.to(adt), e0.to(adt), True, 33.0)
    lse_row, wq = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    lse_col, wk = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    # the gradient: float32 within exp's error; bfloat16 within one rounding of it
    btol = dict(rtol=2 ** -8, atol=1e-5) if dtype == torch.bfloat16 else tol
    cases = (((lse_col, wk), 2, None), ((None, None), -1, None), ((lse_col, wk), 0, None), ((lse_col, wk), 2, bound),
             ((None, None), -1, bound), ((lse_col, wk), 0, bound))
    for col, diag, offset in cases:
        ours = s1.to(dtype, copy=True)  # the kernel writes the gradient over the block
        cpp.nce_block_bwd_(ours, lse_row.to(adt), wq.to(adt), *(None if c is None else c.to(adt) for c in col), diag,
                           offset)
        assert ours.dtype == dtype
        want = _nce_block_bwd_torch(s1, lse_row, wq, *col, diag)
        torch.testing.assert_close(ours.double(), want, **btol)
        # the torch form takes the block in dtype as the kernel does; the kernel's error within the tolerance rule
        # of it (the mixed-sign weights here cancel the two terms: each float32 form rounds its own way)
        theirs = _nce_block_bwd_torch(s1.to(dtype), lse_row.to(adt), wq.to(adt),
                                      *(None if c is None else c.to(adt) for c in col), diag)
        assert theirs.dtype == dtype
        assert_within_torch_error(ours, theirs, want, "nce_block_bwd_")
    theirs = _nce_block_fwd_torch(s1.to(dtype), sn.to(dtype), m0.to(adt), e0.to(adt), True)
    assert all(t.dtype == adt for t in theirs)
    ours = cpp.nce_block_fwd(s1.to(dtype), sn.to(dtype), m0.to(adt), e0.to(adt), True)
    for got, want in zip(theirs, ours):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every elementwise loss, with every weight mode and the reduction, compiles for sm_80/sm_90."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for name, lid in LOSS_IDS.items():
                _, x, y, w, p, a, b = _case(name, (2, 300), dtype, "none")
                kinds = [None] + ([torch.ones(2, 300, dtype=dtype), torch.ones(300, dtype=dtype)]
                                  if name in WEIGHTED else [])
                for wt in kinds:
                    triton_losses.loss_fwd(lid, x, y, wt, p, a, b, 1.0, False)
                    triton_losses.loss_fwd(lid, x, y, wt, p, a, b, 0.5, True)
                    triton_losses.loss_fwd_grad(lid, x, y, wt, p, a, b, 0.5)
                    triton_losses.loss_bwd(lid, torch.ones_like(x), x, y, wt, p, a, b, 1.0)
                    triton_losses.loss_bwd(lid, torch.tensor(1.0, dtype=dtype), x, y, wt, p, a, b, 0.5)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_loss_fwd_kernel", "_loss_bwd_kernel"}
