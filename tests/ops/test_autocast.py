"""tritium's public functions under torch.autocast: the dtype torch's twin gives, its values within the tolerance
rule (against float64 of the inputs as autocast casts them), gradients reaching float32 leaves as float32, the
same under torch.compile; the policy table (ops/_autocast.py) checked against torch itself on CPU."""
import pytest
import torch
import torch.nn.functional as F

import tritium
import tritium.nn as tnn
from tests.util import assert_within_torch_error
from tritium.ops import _autocast

B, D = 7, 19


def _r(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


# name -> (make args for a floating dtype, torch's twin, tritium's, indices of the args to differentiate)
CASES = {
    "linear": (lambda d: (_r(B, D, dtype=d), _r(5, D, dtype=d), _r(5, dtype=d)), F.linear, tritium.linear, (0, 1, 2)),
    "scaled_dot_product_attention": (lambda d: tuple(_r(1, 2, 9, 16, dtype=d) for _ in range(3)),
                                     F.scaled_dot_product_attention, tritium.scaled_dot_product_attention, (0, 1, 2)),
    "prelu": (lambda d: (_r(B, D, dtype=d), _r(1, dtype=d).abs()), F.prelu, tritium.prelu, (0, 1)),
    "cross_entropy": (lambda d: (_r(B, D, dtype=d), torch.randint(0, D, (B,))), F.cross_entropy,
                      tritium.cross_entropy, (0,)),
    "kl_div": (lambda d: (_r(B, D, dtype=d).log_softmax(-1), _r(B, D, dtype=d).log_softmax(-1)),
               lambda a, b: F.kl_div(a, b, reduction="batchmean", log_target=True),
               lambda a, b: tritium.kl_div(a, b, reduction="batchmean", log_target=True), (0,)),
    "mse_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d)), F.mse_loss, tritium.mse_loss, (0,)),
    "l1_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d)), F.l1_loss, tritium.l1_loss, (0,)),
    "smooth_l1_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d)), F.smooth_l1_loss, tritium.smooth_l1_loss,
                       (0,)),
    "huber_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d)), F.huber_loss, tritium.huber_loss, (0,)),
    "binary_cross_entropy": (lambda d: (_r(B, D, dtype=d).sigmoid(), _r(B, D, dtype=d).sigmoid()),
                             F.binary_cross_entropy, tritium.binary_cross_entropy, (0,)),
    "binary_cross_entropy_with_logits": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d).sigmoid()),
                                         F.binary_cross_entropy_with_logits,
                                         tritium.binary_cross_entropy_with_logits, (0,)),
    "soft_margin_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d).sign()), F.soft_margin_loss,
                         tritium.soft_margin_loss, (0,)),
    "hinge_embedding_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d).sign()), F.hinge_embedding_loss,
                             tritium.hinge_embedding_loss, (0,)),
    "margin_ranking_loss": (lambda d: (_r(B, dtype=d), _r(B, dtype=d), _r(B, dtype=d).sign()),
                            F.margin_ranking_loss, tritium.margin_ranking_loss, (0, 1)),
    "multi_margin_loss": (lambda d: (_r(B, D, dtype=d), torch.randint(0, D, (B,))), F.multi_margin_loss,
                          tritium.multi_margin_loss, (0,)),
    "triplet_margin_loss": (lambda d: tuple(_r(B, D, dtype=d) for _ in range(3)), F.triplet_margin_loss,
                            tritium.triplet_margin_loss, (0, 1, 2)),
    "cosine_embedding_loss": (lambda d: (_r(B, D, dtype=d), _r(B, D, dtype=d), _r(B, dtype=d).sign()),
                              F.cosine_embedding_loss, tritium.cosine_embedding_loss, (0, 1)),
    # functions torch's CPU autocast leaves alone: tritium's must too
    "softmax": (lambda d: (_r(B, D, dtype=d),), lambda x: F.softmax(x, -1), lambda x: tritium.softmax(x, -1), (0,)),
    "layer_norm": (lambda d: (_r(B, D, dtype=d), _r(D, dtype=d), _r(D, dtype=d)),
                   lambda x, w, b: F.layer_norm(x, (D,), w, b), lambda x, w, b: tritium.layer_norm(x, (D,), w, b),
                   (0, 1, 2)),
    "rms_norm": (lambda d: (_r(B, D, dtype=d), _r(D, dtype=d)), lambda x, w: F.rms_norm(x, (D,), w),
                 lambda x, w: tritium.rms_norm(x, (D,), w), (0, 1)),
    "gelu": (lambda d: (_r(B, D, dtype=d),), F.gelu, tritium.gelu, (0,)),
    "multilabel_soft_margin_loss": (lambda d: (_r(B, D, dtype=d), (_r(B, D, dtype=d) > 0).to(d)),
                                    F.multilabel_soft_margin_loss, tritium.multilabel_soft_margin_loss, (0,)),
}


def _cast_like_autocast(args, dtype):
    return [a.to(dtype) if a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_autocast_matches_torch(name, dtype):
    make, torch_fn, ours, wrt = CASES[name]
    torch.manual_seed(0)
    base = make(dtype)
    runs = {}
    for side, fn in (("torch", torch_fn), ("tritium", ours)):
        args = [a.detach().clone().requires_grad_(i in wrt) for i, a in enumerate(base)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*args)
        gs = torch.autograd.grad(out.float().sum(), [args[i] for i in wrt])
        runs[side] = out, gs
    (t_out, t_gs), (o_out, o_gs) = runs["torch"], runs["tritium"]
    assert o_out.dtype == t_out.dtype, f"{name}: tritium {o_out.dtype}, torch {t_out.dtype} under autocast"
    # float64 of the inputs as torch's autocast casts them (its output dtype says which: bfloat16 or float32)
    cast = torch.bfloat16 if t_out.dtype == torch.bfloat16 else torch.float32
    ref_args = [a.detach().to(cast).double().requires_grad_(i in wrt) if a.is_floating_point() else a
                for i, a in enumerate(_cast_like_autocast(base, cast))]
    ref = torch_fn(*ref_args)
    ref_gs = torch.autograd.grad(ref.sum(), [ref_args[i] for i in wrt])
    assert_within_torch_error(o_out, t_out, ref.detach(), f"{name} {dtype} under autocast")
    for i, g_o, g_t, g_r in zip(wrt, o_gs, t_gs, ref_gs):
        assert g_o.dtype == g_t.dtype == base[i].dtype, f"{name}: grad {i} dtype {g_o.dtype}, torch {g_t.dtype}"
        assert_within_torch_error(g_o, g_t, g_r, f"{name} {dtype} grad {i} under autocast", compute_dtype=cast)


def test_table_agrees_with_torch_on_cpu():
    """Every function the table casts on CPU is one whose torch twin changes dtype under CPU autocast, and the
    cases above cover every such function."""
    cpu = {n for n, p in _autocast.AUTOCAST.items() if "cpu" in p}
    covered = set(CASES) | {"flash_attention", "lora_linear", "sigmoid_focal_loss", "lstm", "rnn_tanh", "rnn_relu"}
    assert cpu <= covered, sorted(cpu - covered)
    for name in CASES:
        make, torch_fn, _, _ = CASES[name]
        changes = set()
        for d in (torch.float32, torch.bfloat16):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = torch_fn(*make(d))
            if out.dtype != d:
                changes.add(out.dtype)
        want = {torch.bfloat16: _autocast.LOWER, torch.float32: _autocast.FP32}
        expect = want[changes.pop()] if changes else None
        assert _autocast.AUTOCAST.get(name, {}).get("cpu") == expect, name


def test_every_table_name_is_public_and_wrapped():
    for name in _autocast.AUTOCAST:
        assert name in tritium.ops.__all__, name
        assert getattr(tritium, name).__wrapped__ is not None, name


@pytest.mark.parametrize("mod", ["LSTM", "RNN", "GRU"])
def test_recurrent_modules_follow_torch(mod):
    torch.manual_seed(0)
    ref = getattr(torch.nn, mod)(D, 6, num_layers=2, batch_first=True)
    ours = getattr(tnn, mod)(D, 6, num_layers=2, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x)[0], ours(x)[0]
    assert got.dtype == want.dtype, f"{mod}: {got.dtype} vs torch {want.dtype}"
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)


def test_flash_attention_and_focal_follow_their_twins():
    q = torch.randn(1, 2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tritium.flash_attention(q, q, q, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        assert out.dtype == torch.bfloat16
        x, t = torch.randn(B, D, dtype=torch.bfloat16), torch.rand(B, D, dtype=torch.bfloat16)
        assert tritium.sigmoid_focal_loss(x, t, reduction="mean").dtype == torch.float32


def test_explicit_dtype_and_autocast_off_leave_calls_alone():
    x = torch.randn(B, D, dtype=torch.bfloat16)
    assert tritium.mse_loss(x, x).dtype == torch.bfloat16                      # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert tritium.mse_loss(x, x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tritium.mse_loss(x.double(), x.double()).dtype == torch.float64  # float64 is never cast


def test_autocast_under_compile():
    w = torch.randn(5, D, requires_grad=True)

    def step(x, y):
        return tritium.mse_loss(tritium.linear(x, w), y)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(B, D), torch.randn(B, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = step(x, y), compiled(x, y)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
