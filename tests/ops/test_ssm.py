"""tritium.selective_scan / selective_state_update: the public functions against mamba_ssm's own reference
functions (selective_scan_ref, selective_state_update_ref, loaded from its pinned source archive by tests/upstream.py)
and against tritium.reference in float64; gradcheck, torch.compile, layouts, the decoding step, bad input."""
import pytest
import torch

import tritium
from tritium import reference
from tests.upstream import upstream
from tests.util import CPU_DTYPES, assert_within_torch_error, leaf


def scan_ref():
    return upstream("mamba-ssm", "mamba_ssm/ops/selective_scan_interface.py", "selective_scan_ref")


def step_ref():
    return upstream("mamba-ssm", "mamba_ssm/ops/triton/selective_state_update.py", "selective_state_update_ref")


def _inputs(batch=2, dim=5, L=37, N=4, groups=None, dtype=torch.float32, seed=0):
    """Mamba-like inputs: delta around softplus's knee, A = -exp(.) (a stable decay), B/C per step;
    groups None: B, C (batch, N, L); else (batch, groups, N, L)."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    t = dict(u=rn(batch, dim, L), delta=rn(batch, dim, L) * 0.5 - 1, A=-torch.exp(rn(dim, N) * 0.5),
             B=rn(*bc), C=rn(*bc), D=rn(dim), z=rn(batch, dim, L), delta_bias=rn(dim) * 0.1)
    return {k: v.to(dtype) for k, v in t.items()}


FLAGS = [dict(), dict(D=True), dict(z=True, D=True), dict(delta_bias=True, softplus=True),
         dict(D=True, z=True, delta_bias=True, softplus=True)]


def _args(t, flags):
    return (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"] if flags.get("D") else None,
            t["z"] if flags.get("z") else None, t["delta_bias"] if flags.get("delta_bias") else None,
            bool(flags.get("softplus")))


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("groups", [None, 1, 5])
def test_scan_matches_mamba_ssm_reference(flags, groups):
    """float32 output and final state within 2x the error of mamba_ssm's selective_scan_ref (against float64)."""
    t = _inputs(groups=groups)
    args = _args(t, flags)
    out, last = tritium.selective_scan(*args, return_last_state=True)
    theirs, their_last = scan_ref()(*args, return_last_state=True)
    ref, ref_last = reference.selective_scan(*[a.double() if isinstance(a, torch.Tensor) else a for a in args],
                                             return_last_state=True)
    assert_within_torch_error(out, theirs, ref, "out")
    assert_within_torch_error(last, their_last, ref_last, "last state")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 129, 16), (3, 37, 70, 5)])
def test_scan_values_and_gradients(dtype, shape):
    """Every output and every gradient (u, delta, A, B, C, D, z, delta_bias, through the last state too) within 2x
    the reference's own error in dtype."""
    batch, dim, L, N = shape
    groups = 1 if dim == 1 else None
    t = _inputs(batch, dim, L, N, groups=groups, dtype=dtype)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(batch, dim, L, generator=gen, dtype=torch.float64)
    dlast = torch.randn(batch, dim, N, generator=gen, dtype=torch.float64)
    res = {}
    for name, fn, d in (("ours", tritium.selective_scan, dtype), ("torch", reference.selective_scan, dtype),
                        ("ref", reference.selective_scan, torch.float64)):
        ins = [leaf(t[k], d) for k in names]
        out, last = fn(*ins, delta_softplus=True, return_last_state=True)
        gs = torch.autograd.grad((out, last), ins, (dy.to(out.dtype), dlast.to(last.dtype)))
        res[name] = (out, last, gs)
    for i, what in enumerate(["out", "last state"]):
        assert_within_torch_error(res["ours"][i].detach(), res["torch"][i].detach(), res["ref"][i].detach(), what,
                                  compute_dtype=dtype)
    for name, a, b, c in zip(names, res["ours"][2], res["torch"][2], res["ref"][2]):
        assert_within_torch_error(a, b, c, f"grad {name}")


def test_gradcheck_float64():
    t = _inputs(2, 3, 9, 2, groups=3, dtype=torch.float64)
    ins = [leaf(t[k]) for k in ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]]

    def fn(*a):
        out, last = tritium.selective_scan(*a, delta_softplus=True, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(fn, ins)


def test_torch_compile_fullgraph():
    t = _inputs(2, 6, 20, 4, groups=2)
    args = _args(t, dict(D=True, z=True, delta_bias=True, softplus=True))
    ins = [leaf(a) if isinstance(a, torch.Tensor) else a for a in args]
    compiled = torch.compile(lambda *a: tritium.selective_scan(*a, return_last_state=True), fullgraph=True)
    out, last = compiled(*ins)
    eager, eager_last = tritium.selective_scan(*ins, return_last_state=True)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(last, eager_last)
    g1 = torch.autograd.grad(out.sum() + last.sum(), ins[:5])
    g2 = torch.autograd.grad(eager.sum() + eager_last.sum(), ins[:5])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_mamba_layouts():
    """Mamba's block passes u, delta, z as transposes of (batch, L, dim) projections and B, C as slices: any strides."""
    batch, L, dim, N = 2, 33, 12, 4
    xz = torch.randn(batch, L, 2 * dim + 2 * N)
    u, z = xz[..., :dim].transpose(1, 2), xz[..., dim:2 * dim].transpose(1, 2)
    B, C = xz[..., 2 * dim:2 * dim + N].transpose(1, 2), xz[..., 2 * dim + N:].transpose(1, 2)
    delta = torch.rand(batch, L, dim).transpose(1, 2)
    A = -torch.rand(dim, N) - 0.1
    ours = tritium.selective_scan(u, delta, A, B, C, z=z, delta_softplus=True)
    theirs = scan_ref()(u, delta, A, B, C, z=z, delta_softplus=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_constant_b_c_and_reference_backend(reference_backend):
    """Constant (dim, N) B/C run the reference, as does everything under TRITIUM_BACKEND=reference; both equal
    mamba_ssm's."""
    t = _inputs()
    B, C = torch.randn(5, 4), torch.randn(5, 4)
    args = (t["u"], t["delta"], t["A"])
    for b, c in ((B, C), (t["B"], t["C"])):  # (float32 both: only the order of the sums differs)
        torch.testing.assert_close(tritium.selective_scan(*args, b, c, t["D"], delta_softplus=True),
                                   scan_ref()(*args, b, c, t["D"], delta_softplus=True), rtol=1e-5, atol=1e-5)


# ---- the decoding step ----
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_steps_equal_the_scan(dtype):
    """L steps of selective_state_update from a zero state give the scan's outputs and final state."""
    t = _inputs(2, 6, 13, 16, groups=2, dtype=dtype)
    args = _args(t, dict(D=True, z=True, delta_bias=True, softplus=True))
    out, last = tritium.selective_scan(*args, return_last_state=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.zeros(2, 6, 16, dtype=acc)
    ys = [tritium.selective_state_update(state, t["u"][..., i], t["delta"][..., i], t["A"], t["B"][..., i],
                                         t["C"][..., i], t["D"], t["z"][..., i], t["delta_bias"], True)
          for i in range(13)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(ys, -1), out, **tol)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [None, (4, 2)], ids=["flat", "heads"])
def test_step_matches_mamba_ssm_reference(heads):
    """Both layouts of mamba_ssm's selective_state_update (Mamba-1 flat, Mamba-2 heads with groups), the state
    updated in place through a slice of a bigger cache."""
    batch, dim, N = 3, 8, 16
    lead = (batch, dim) if heads is None else (batch, heads[0], dim)
    cache = torch.randn(batch + 2, *lead[1:], N)
    state = cache[1:batch + 1]
    x, z, dt = torch.randn(lead), torch.randn(lead), torch.rand(lead)
    A = -torch.rand(*lead[1:], N)
    gshape = (batch, N) if heads is None else (batch, heads[1], N)
    B, C = torch.randn(gshape), torch.randn(gshape)
    D, bias = torch.randn(lead[1:]), torch.randn(lead[1:]) * 0.1
    theirs_state = state.clone()
    theirs = step_ref()(theirs_state, x, dt, A, B, C, D, z, bias, True)
    ours = tritium.selective_state_update(state, x, dt, A, B, C, D, z, bias, True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[1:batch + 1], theirs_state, rtol=1e-5, atol=1e-5)


# ---- bad input: a ValueError / TypeError naming the argument, what was expected and what came ----
def _bad_scan_calls():
    t = _inputs()
    u, d, A, B, C = t["u"], t["delta"], t["A"], t["B"], t["C"]
    return [
        (lambda: tritium.selective_scan(u[0], d, A, B, C), ValueError, "u must be (batch, dim, L)"),
        (lambda: tritium.selective_scan(u, d[..., :-1], A, B, C), ValueError, "delta must be u's shape"),
        (lambda: tritium.selective_scan(u, d, A[:-1], B, C), ValueError, "A must be (dim, N)"),
        (lambda: tritium.selective_scan(u, d, A, B[..., :-1], C), ValueError, "B must be (batch, N, L)"),
        (lambda: tritium.selective_scan(u, d, A, B, C.unsqueeze(1).expand(2, 3, 4, 37)), ValueError,
         "G dividing 5"),
        (lambda: tritium.selective_scan(u, d, A, B, C, D=torch.ones(4)), ValueError, "D must be (5,)"),
        (lambda: tritium.selective_scan(u, d, A, B, C, z=u[:, :2]), ValueError, "z must be u's shape"),
        (lambda: tritium.selective_scan(u.long(), d, A, B, C), TypeError, "u must be a floating point tensor"),
        (lambda: tritium.selective_state_update(torch.zeros(2, 5), u[..., 0], d[..., 0], A, B[..., 0], C[..., 0]),
         ValueError, "state must be"),
        (lambda: tritium.selective_state_update(torch.zeros(2, 5, 4), u[..., 0], d[..., 0], A, B[..., 0],
                                                C[..., :2, 0]), ValueError, "C must be"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_scan_calls())))
def test_bad_input_is_named(case):
    call, exc, text = _bad_scan_calls()[case]
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        call()
