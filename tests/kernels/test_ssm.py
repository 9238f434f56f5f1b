"""Mamba's selective scan kernels (forward, backward, decoding step), Triton (interpreter) and C++, against
tritium.reference.selective_scan / selective_state_update in float64."""
import math

import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import ssm
from tritium.ops.ssm import scan_chunk
from tests.util import assert_within_torch_error, check_gpu_compile, impl_cases, leaf, on_device

triton_ssm = on_device(ssm)
CASES, IDS = impl_cases(triton_ssm)


def _acc(dtype):
    """The dtype of A, B, C, D, delta_bias and the states: float32 (float64 for float64 input)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strided(t):
    """The same values as a view whose channel and batch strides are wider than the rows (a slice of a bigger
    buffer)."""
    buf = torch.zeros(t.shape[0], t.shape[1] + 2, t.shape[2] + 5, dtype=t.dtype)
    buf[:, 1:t.shape[1] + 1, 3:t.shape[2] + 3] = t
    return buf[:, 1:t.shape[1] + 1, 3:t.shape[2] + 3]


def _inputs(batch, dim, L, N, G, dtype, has_D, has_z, has_bias, softplus, has_dlast):
    """Mamba-like values: A = -exp(randn) (stable), dt in [0.001, 0.1] through softplus of delta + bias (an inverse
    softplus init like Mamba's dt_proj), else small positive delta."""
    acc = _acc(dtype)
    u = torch.randn(batch, dim, L, dtype=torch.float64).to(dtype)
    if softplus:
        delta = (torch.randn(batch, dim, L, dtype=torch.float64) * 0.5).to(dtype)
        dt0 = torch.exp(torch.rand(dim, dtype=torch.float64) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        bias = (dt0 + torch.log(-torch.expm1(-dt0))).to(acc)  # softplus^-1(dt0)
        if not has_bias:
            delta = (delta.double() + bias.double()[:, None]).to(dtype)
    else:
        delta = (torch.rand(batch, dim, L, dtype=torch.float64) * 0.1).to(dtype)
        bias = (torch.rand(dim, dtype=torch.float64) * 0.02).to(acc)
    A = (-torch.exp(torch.randn(dim, N, dtype=torch.float64) * 0.5)).to(acc)
    B = torch.randn(batch, G, N, L, dtype=torch.float64).to(acc)
    C = torch.randn(batch, G, N, L, dtype=torch.float64).to(acc)
    D = torch.randn(dim, dtype=torch.float64).to(acc) if has_D else None
    z = torch.randn(batch, dim, L, dtype=torch.float64).to(dtype) if has_z else None
    dout = torch.randn(batch, dim, L, dtype=torch.float64).to(dtype)
    dlast = torch.randn(batch, dim, N, dtype=torch.float64).to(acc) if has_dlast else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias if has_bias else None), dout, dlast


_GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _reference(args, softplus, dout, dlast, dtype):
    """(out, final state, {name: grad}) of reference.selective_scan run in dtype (torch's own error: u, delta, z in
    dtype, the rest in float32) and in float64 (on the same values)."""
    res = {}
    for run in (dtype, torch.float64):
        ins = {k: None if v is None else leaf(v, run if k in ("u", "delta", "z") else
                                               (_acc(dtype) if run == dtype else torch.float64))
               for k, v in args.items()}
        out, last = reference.selective_scan(**ins, delta_softplus=softplus, return_last_state=True)
        names = [k for k in _GRAD_NAMES if ins[k] is not None]
        outs, gouts = [out], [dout.to(out.dtype)]
        if dlast is not None:
            outs.append(last)
            gouts.append(dlast.to(last.dtype))
        gs = torch.autograd.grad(outs, [ins[k] for k in names], gouts)
        res[run] = (out.detach(), last.detach(), dict(zip(names, gs)))
    return res[dtype], res[torch.float64]


# (batch, dim, L, N, G, D, z, delta_bias, softplus, chunk (None: scan_chunk(N)), dlast, strided u/delta/z/dout).
# The interpreter takes some 40 ms per program and step (forward and backward): the long cases run one program.
SHAPES = [
    (2, 3, 1, 16, 1, True, True, True, True, None, False, False),
    (2, 3, 7, 1, 3, False, False, False, False, None, False, False),        # one channel per group, N 1
    (2, 37, 7, 16, 1, True, False, True, True, 4, True, True),              # two channel blocks, chunk 4, dlast
    (2, 12, 7, 16, 3, False, True, True, False, 3, False, True),            # three groups, no softplus
    (1, 5, 129, 16, 1, True, True, True, True, 8, False, False),            # chunk 8 does not divide 129
    (1, 3, 129, 64, 1, True, True, False, True, None, True, False),         # N 64: scan_chunk 16, 8 chunks + 1
    (1, 3, 1000, 16, 1, True, True, True, True, None, True, False),         # long: scan_chunk(16) = 64, 15 + 1
]
SHAPE_IDS = [f"b{s[0]}-d{s[1]}-L{s[2]}-N{s[3]}-G{s[4]}" + "".join(
    f"-{name}" for name, on in zip(("D", "z", "bias", "softplus"), s[5:9]) if on)
    + (f"-chunk{s[9]}" if s[9] else "") + ("-dlast" if s[10] else "") + ("-strided" if s[11] else "")
    for s in SHAPES]


# every implementation and dtype at every shape, except the long sequence under the (slow) interpreter, which runs
# in float32 only
SCAN_CASES = [pytest.param(*case, shape, id=f"{sid}-{cid}") for shape, sid in zip(SHAPES, SHAPE_IDS)
              for case, cid in zip(CASES, IDS) if not (case[0] == "triton" and shape[2] >= 1000
                                                       and case[2] != torch.float32)]


@pytest.mark.parametrize("impl_name,impl,dtype,shape", SCAN_CASES)
def test_selective_scan(impl_name, impl, dtype, shape):
    batch, dim, L, N, G, has_D, has_z, has_bias, softplus, chunk, has_dlast, strided = shape
    chunk = chunk or scan_chunk(N)
    args, dout, dlast = _inputs(batch, dim, L, N, G, dtype, has_D, has_z, has_bias, softplus, has_dlast)
    call = dict(args)
    if strided:
        for k in ("u", "delta", "z"):
            if call[k] is not None:
                call[k] = _strided(call[k])
    out, states = impl.selective_scan_fwd(call["u"], call["delta"], call["A"], call["B"], call["C"], call["D"],
                                          call["z"], call["delta_bias"], softplus, chunk)
    assert states.shape == (batch, dim, -(-L // chunk), N)
    grads = impl.selective_scan_bwd(_strided(dout) if strided else dout, call["u"], call["delta"], call["A"],
                                    call["B"], call["C"], call["D"], call["z"], call["delta_bias"], softplus, chunk,
                                    states, dlast)
    (t_out, t_last, t_g), (r_out, r_last, r_g) = _reference(args, softplus, dout, dlast, dtype)
    assert_within_torch_error(out, t_out, r_out, "out")
    assert_within_torch_error(states[:, :, -1], t_last, r_last, "final state")
    for name, g in zip(_GRAD_NAMES, grads):
        if args[name] is None:
            assert g.shape == (0,), f"d{name}: shape {tuple(g.shape)} without {name}"
        else:
            assert_within_torch_error(g, t_g[name], r_g[name], f"d{name}")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_intermediate_states(impl_name, impl, dtype):
    """states[:, :, c] is the state after step min((c + 1) chunk, L) - 1 (the reference run on the prefix)."""
    batch, dim, L, N, chunk = 2, 5, 19, 4, 6
    args, _, _ = _inputs(batch, dim, L, N, 1, dtype, True, True, True, True, False)
    _, states = impl.selective_scan_fwd(*(args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                        True, chunk)
    for c in range(states.shape[2]):
        end = min((c + 1) * chunk, L)
        pre = {k: v[..., :end] if k in ("u", "delta", "z", "B", "C") and v is not None else v for k, v in args.items()}
        _, t_last = reference.selective_scan(**pre, delta_softplus=True, return_last_state=True)
        _, r_last = reference.selective_scan(**{k: None if v is None else v.double() for k, v in pre.items()},
                                             delta_softplus=True, return_last_state=True)
        assert_within_torch_error(states[:, :, c], t_last, r_last, f"state {c}")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("dim,N,G,flags", [(3, 16, 1, (True, True, True, True)), (37, 1, 1, (False,) * 4),
                                           (8, 64, 4, (True, False, False, True))], ids=["d3-all", "d37-none", "d8-G4"])
def test_selective_state_update(impl_name, impl, dtype, dim, N, G, flags):
    """One step against the reference, on a state that is a strided slice of a cache (written in place only
    there) and strided x / dt / z."""
    has_D, has_z, has_bias, softplus = flags
    acc, batch = _acc(dtype), 3
    args, _, _ = _inputs(batch, dim, 1, N, G, dtype, has_D, has_z, has_bias, softplus, False)
    x, dt, z = (None if args[k] is None else args[k][..., 0] for k in ("u", "delta", "z"))
    B, C = args["B"][..., 0].contiguous(), args["C"][..., 0].contiguous()
    state0 = torch.randn(batch, dim, N, dtype=torch.float64).to(acc)
    cache = torch.full((batch + 1, dim + 1, N), 7.0, dtype=acc)
    cache[1:, 1:] = state0
    state = cache[1:, 1:]

    def wide(t):
        return None if t is None else torch.stack([t, t], -1)[..., 0]  # channel stride 2

    y = impl.selective_state_update(state, wide(x), wide(dt), args["A"], B, C, args["D"], wide(z),
                                    args["delta_bias"], softplus)
    # The reference's grouped layout is Mamba-2's, with heads: each channel a head of size 1, so group g serves
    # channels g dim / G ... (g + 1) dim / G - 1, as in the kernels.
    outs = {}
    for run in (dtype, torch.float64):
        def p(t, head=True):  # float64 for the reference run; (..., dim) -> (..., dim, 1)
            t = None if t is None else t.to(torch.float64) if run == torch.float64 else t
            return t[..., None] if t is not None and head else t

        s = p(state0, False).clone()[:, :, None]  # (batch, dim, 1, N), updated in place
        yy = reference.selective_state_update(s, p(x), p(dt), p(args["A"], False)[:, None], p(B, False),
                                              p(C, False), p(args["D"]), p(z), p(args["delta_bias"]), softplus)
        outs[run] = (yy[..., 0], s[:, :, 0])
    assert_within_torch_error(y, outs[dtype][0], outs[torch.float64][0], "y")
    assert_within_torch_error(state, outs[dtype][1], outs[torch.float64][1], "state")
    assert (cache[0] == 7).all() and (cache[:, 0] == 7).all(), "wrote outside the state's slice of the cache"


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
def test_state_update_steps_match_scan(impl_name, impl, dtype):
    """T decoding steps from a zero state give the scan's outputs and final state."""
    batch, dim, L, N, G = 2, 6, 9, 16, 2
    args, _, _ = _inputs(batch, dim, L, N, G, dtype, True, True, True, True, False)
    out, states = impl.selective_scan_fwd(*(args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                          True, 4)
    state = torch.zeros(batch, dim, N, dtype=_acc(dtype))
    for t in range(L):
        y = impl.selective_state_update(state, args["u"][..., t], args["delta"][..., t], args["A"],
                                        args["B"][..., t].contiguous(), args["C"][..., t].contiguous(), args["D"],
                                        args["z"][..., t], args["delta_bias"], True)
        torch.testing.assert_close(y, out[..., t], msg=lambda m: f"step {t}: {m}")
    torch.testing.assert_close(state, states[:, :, -1])


@pytest.mark.gpu_compile
def test_gpu_compile():
    """The scan, its backward and the step compile for sm_80/90 at Mamba's shapes (d_inner 1536, N 16, one group;
    and N 64 with groups, Mamba-2-like), with every optional input and with none."""
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            for dim, N, G, L in ((1536, 16, 1, 256), (256, 64, 4, 256)):
                for on in (True, False):
                    u = torch.randn(2, dim, L, dtype=dtype)
                    A, B, C = torch.randn(dim, N), torch.randn(2, G, N, L), torch.randn(2, G, N, L)
                    D, bias = (torch.randn(dim), torch.randn(dim)) if on else (None, None)
                    z = u if on else None
                    chunk = scan_chunk(N)
                    out, states = triton_ssm.selective_scan_fwd(u, u, A, B, C, D, z, bias, on, chunk)
                    triton_ssm.selective_scan_bwd(out, u, u, A, B, C, D, z, bias, on, chunk, states,
                                                  torch.randn(2, dim, N) if on else None)
                    triton_ssm.selective_state_update(torch.zeros(2, dim, N), u[..., 0], u[..., 0], A, B[..., 0],
                                                      C[..., 0], D, z[..., 0] if on else None, bias, on)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_scan_fwd_kernel", "_scan_bwd_kernel", "_state_update_kernel"}
