"""Routes to torch's own ops (ops/_library.py's ROUTE_BELOW): below an op's size a CPU input goes to torch's op (the
same values torch gives, bit for bit, and no tritium op in the profile), from that size on to the kernel; with the
routes off (the test session's default, TRITIUM_ROUTES=off) every size reaches the kernel; the first route of an
op is logged and `tritium info` lists them. The semantics are tested at a small limit set for the test; the
table's own sizes are checked as values."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import tritium
from tritium.ops import _library
from tritium.ops._library import ROUTE_BELOW, ROUTE_DEFAULT, route_below, routed
from tritium.utils import cpu_paths

# (op, tritium's function, torch's): each routes on its input's element count
CASES = [
    ("gelu", tritium.gelu, F.gelu),
    ("silu", tritium.silu, F.silu),
    ("log_softmax", lambda x: tritium.log_softmax(x, -1), lambda x: F.log_softmax(x, -1)),
    ("rms_norm", lambda x: tritium.rms_norm(x, (x.shape[-1],)), lambda x: F.rms_norm(x, (x.shape[-1],))),
    ("layer_norm", lambda x: tritium.layer_norm(x, (x.shape[-1],)), lambda x: F.layer_norm(x, (x.shape[-1],))),
]
LIMIT = 8192    # every op's limit in the semantics tests (the real ones reach 2**23 elements)


@pytest.fixture
def routes_on():
    tritium.set_routes(True)
    yield
    tritium.set_routes(False)


@pytest.fixture
def small_limits(routes_on, monkeypatch):
    monkeypatch.setattr(_library, "ROUTE_DEFAULT", LIMIT)
    for op in list(ROUTE_BELOW):
        monkeypatch.setitem(ROUTE_BELOW, op, LIMIT)


def _tritium_ops(fn, *args) -> set:
    """The tritium:: ops one call of fn runs (forward and, when an input requires grad, backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*args)
        if out.requires_grad:
            out.sum().backward()
    return {e.key for e in prof.key_averages() if e.key.startswith("tritium::")}


@pytest.mark.parametrize("op,ours,theirs", CASES)
@pytest.mark.parametrize("grad", [False, True])
def test_small_inputs_go_to_torch_large_to_the_kernel(small_limits, op, ours, theirs, grad):
    small = torch.randn(LIMIT // 512 - 1, 512, requires_grad=grad)    # limit - 512 elements
    large = torch.randn(LIMIT // 512, 512, requires_grad=grad)        # exactly the limit: the kernel
    assert routed(op, small) and not routed(op, large)
    assert _tritium_ops(ours, small) == set()
    assert _tritium_ops(ours, large) != set()
    want = theirs(small)
    got = ours(small)
    assert torch.equal(got, want)                                      # torch's own op: bit for bit
    if grad:
        g_ours, = torch.autograd.grad(got.sum(), small)
        g_theirs, = torch.autograd.grad(want.sum(), small)
        assert torch.equal(g_ours, g_theirs)


@pytest.mark.parametrize("op,ours,theirs", CASES)
def test_routes_off_sends_every_size_to_the_kernel(op, ours, theirs):
    x = torch.randn(4, 8)
    assert not routed(op, x)
    assert _tritium_ops(ours, x) != set()


def test_the_table(routes_on):
    """The sizes the table states (bench/results/routes.json): every op of the routed families from 2**16
    elements, the ones whose kernels lose at in-cache sizes from their own larger sizes."""
    assert ROUTE_DEFAULT == 1 << 16 and route_below("rms_norm") == route_below("hardswish") == 1 << 16
    assert route_below("relu") == route_below("gelu") == route_below("layer_norm") == 1 << 23
    assert route_below("softmax") == route_below("log_softmax") == route_below("softmin") == 1 << 22
    assert route_below("group_norm") == 1 << 19 and route_below("group_norm (grad)") == 1 << 20
    assert routed("relu", torch.empty(2048, 4095)) and not routed("relu", torch.empty(2048, 4096))


def test_bfloat16_and_other_devices(small_limits):
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    assert routed("silu", x) and _tritium_ops(tritium.silu, x) == set()
    assert torch.equal(tritium.silu(x), F.silu(x))
    assert not routed("silu", torch.randn(8, 64, device="meta"))   # CPU only


def test_first_route_is_logged_once(routes_on, caplog):
    _library._routed_once.discard("softmax")
    with caplog.at_level(logging.DEBUG, logger="tritium"):
        tritium.softmax(torch.randn(4, 8), -1)
        tritium.softmax(torch.randn(4, 8), -1)
    msgs = [r.getMessage() for r in caplog.records if "ROUTE_BELOW" in r.getMessage()]
    assert msgs == [f"softmax: inputs below {1 << 22} elements on CPU go to torch's own op (ROUTE_BELOW)"]


def test_info_lists_the_routes(routes_on):
    assert cpu_paths()["routes"] == (
        "torch's own op below 65536 elements (the activations, softmax, norms and torch's losses); relu below "
        "8388608, gelu below 8388608, layer_norm below 8388608, softmax below 4194304, log_softmax below 4194304, "
        "softmin below 4194304, linear below 67108864, mse_loss (grad) below 524288, huber_loss (grad) below "
        "1048576, smooth_l1_loss (grad) below 1048576, triplet_margin_loss (grad) below 16384, group_norm below "
        "524288, group_norm (grad) below 1048576, info_nce below 65536")
    tritium.set_routes(False)
    assert cpu_paths()["routes"] == "the kernels (routes off: TRITIUM_ROUTES=off)"


def test_routes_env_must_be_on_or_off():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import tritium"], capture_output=True, text=True,
                       env={**__import__("os").environ, "TRITIUM_ROUTES": "maybe"})
    assert r.returncode != 0 and "TRITIUM_ROUTES must be 'on' or 'off', got 'maybe'" in r.stderr


def test_routes_trace_under_compile(small_limits):
    """torch.compile(fullgraph=True) traces both sides of a route (the size is a guard of the graph)."""
    f = torch.compile(lambda x: tritium.rms_norm(tritium.gelu(x), (x.shape[-1],)), fullgraph=True, dynamic=True)
    for rows in (8, 300):                  # 4096 elements: torch's ops; 153600: the kernels
        x = torch.randn(rows, 512)
        want = F.rms_norm(F.gelu(x), (512,))
        torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-5)


def test_group_norm_routes_by_size_and_by_gradient(routes_on):
    """group_norm goes to torch's GroupNorm below ROUTE_BELOW["group_norm"] elements, and below the larger
    ROUTE_BELOW["group_norm (grad)"] when the call records a backward; from there the kernel runs, 16-bit and
    without an activation too; routes off, every size reaches the kernel."""
    fwd, grad = route_below("group_norm"), route_below("group_norm (grad)")
    assert fwd < grad
    between = torch.randn(1, 8, fwd // 8, dtype=torch.bfloat16)                 # fwd elements: the forward's kernel
    w, b = torch.randn(8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    assert _tritium_ops(lambda: tritium.group_norm(between, 4, w, b)) == {"tritium::group_norm_fwd"}
    x = between.clone().requires_grad_(True)                                    # with a gradient: torch's
    assert _tritium_ops(lambda: tritium.group_norm(x, 4, w, b)) == set()
    y = torch.randn(1, 8, grad // 8, dtype=torch.bfloat16, requires_grad=True)  # from the (grad) size: the kernels
    assert _tritium_ops(lambda: tritium.group_norm(y, 4, w, b)) == {"tritium::group_norm_fwd",
                                                                    "tritium::group_norm_bwd"}
    small = between[:, :, :-1]                                                  # below the forward's size: torch's
    assert _tritium_ops(lambda: tritium.group_norm(small, 4, w, b)) == set()
    got, want = tritium.group_norm(x, 4, w, b), F.group_norm(x, 4, w, b)
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad(o.sum(), x)[0] for o in (got, want)))
    tritium.set_routes(False)
    assert _tritium_ops(lambda: tritium.group_norm(small, 4, w, b)) == {"tritium::group_norm_fwd"}
