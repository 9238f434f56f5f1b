"""The fused optimizer kernels (C++ and the Triton launchers under the interpreter) against torch.optim: AdamW and
SGD steps over lists of odd-sized tensors, every option, master weights, a tensor lr, against torch.optim's own
single-tensor step in float64 (the reference) within 2x torch's error in the dtype; the Triton launch with more
tensors and elements than one program covers; the sm_80/sm_90 compile check."""
import pytest
import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import optim
from tests.util import assert_within_torch_error, check_gpu_compile, on_device

triton_optim = on_device(optim)
cpp = torch.ops.tritium
F16 = (torch.bfloat16, torch.float16)
SHAPES = [(1,), (7,), (123,), (781, 3)]
STEPS = 100
# Triton under the interpreter: a small chunk per program so the launch has several programs per tensor and a
# loop of several blocks in each (CHUNK 512 / BLOCK 128: 781 x 3 elements are 5 programs of 4 blocks)
TRITON_KW = dict(chunk=512, block=128)


def _grads(shapes, dtype, steps, seed=1):
    """A fixed gradient sequence per step, rounded to dtype (the reference sees the values the kernel sees)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]


def _torch_opt(kind, params, **opts):
    if kind == "adamw":
        return torch.optim.AdamW(params, foreach=False, **opts)
    return torch.optim.SGD(params, foreach=False, **opts)


def _torch_run(kind, init, grads, dtype, opts):
    """torch.optim's single-tensor step in dtype over the gradient sequence: the final params and state."""
    ps = [p.detach().to(dtype).clone().requires_grad_() for p in init]
    opt = _torch_opt(kind, ps, **opts)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype)
        opt.step()
    return ps, opt


def _state(opt, p, key):
    return opt.state[p][key]


def _run_kernel(impl, kind, init, grads, pdtype, gdtype, opts, kw, master=False, lr_tensor=False):
    """The kernel over the gradient sequence: params of pdtype (float32 masters with master), grads of gdtype."""
    ps = [p.detach().to(pdtype).clone() for p in init]
    p16 = [p.detach().to(gdtype).clone() for p in init] if master else []
    lr = opts.get("lr", 1e-3)
    lr_t = torch.tensor(lr, dtype=torch.float64) if lr_tensor else None
    if kind == "adamw":
        m = [torch.zeros_like(p) for p in ps]
        v = [torch.zeros_like(p) for p in ps]
        vmax = [torch.zeros_like(p) for p in ps] if opts.get("amsgrad") else []
        steps = [torch.zeros((), dtype=torch.float32) for _ in ps]
        b1, b2 = opts.get("betas", (0.9, 0.999))
        for gs in grads:
            impl.adamw_step_(ps, gs, m, v, vmax, steps, p16, lr_t, 0.0 if lr_tensor else lr, b1, b2,
                             opts.get("weight_decay", 1e-2), opts.get("eps", 1e-8), opts.get("maximize", False), **kw)
        assert all(float(s) == len(grads) for s in steps)
        state = {"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}
    else:
        mom = opts.get("momentum", 0.0)
        bufs = [torch.empty_like(p) for p in ps] if mom != 0 else []
        for k, gs in enumerate(grads):
            impl.sgd_step_(ps, gs, bufs, p16, lr_t, 0.0 if lr_tensor else lr, opts.get("weight_decay", 0.0), mom,
                           opts.get("dampening", 0.0), opts.get("nesterov", False), opts.get("maximize", False),
                           k == 0, **kw)
        state = {"momentum_buffer": bufs}
    return ps, p16, state


def check_step(impl, kind, dtype, opts, kw, master=False, lr_tensor=False, shapes=SHAPES, steps=STEPS):
    """The kernel's params and state after `steps` steps vs torch.optim's in float64, within 2x torch.optim's own
    error in the dtype (the update's dtype: float32 with master weights, whose 16-bit params must be the masters
    rounded). 16-bit params without master weights: checked step by step instead (check_each_step)."""
    if dtype in F16 and not master:
        return check_each_step(impl, kind, dtype, opts, kw, lr_tensor, shapes, steps)
    init = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]  # rounded to the params' dtype
    grads = _grads(shapes, dtype, steps)
    work = torch.float32 if master else dtype
    ours, ours16, state = _run_kernel(impl, kind, init, grads, work, dtype, opts, kw, master, lr_tensor)
    theirs, topt = _torch_run(kind, init, grads, work, opts)
    ref, ropt = _torch_run(kind, init, grads, torch.float64, opts)
    keys = [k for k, v in state.items() if v]
    for i in range(len(shapes)):
        assert_within_torch_error(ours[i], theirs[i].detach(), ref[i].detach(), f"param {i} {shapes[i]}")
        for key in keys:
            assert_within_torch_error(state[key][i], _state(topt, theirs[i], key), _state(ropt, ref[i], key),
                                      f"{key} {i}")
        if master:
            assert torch.equal(ours16[i], ours[i].to(dtype)), "params16 must be the float32 params rounded"


def _functional_step(kind, ps, gs, state, steps, opts, first):
    """torch.optim's functional single-tensor step (what its optimizers call) on the given lists, in place."""
    if kind == "adamw":
        b1, b2 = opts.get("betas", (0.9, 0.999))
        adam(ps, gs, state[0], state[1], state[2], steps, foreach=False, decoupled_weight_decay=True,
                              amsgrad=bool(state[2]), beta1=b1, beta2=b2, lr=opts.get("lr", 1e-3),
                              weight_decay=opts.get("weight_decay", 1e-2), eps=opts.get("eps", 1e-8),
                              maximize=opts.get("maximize", False))
    else:
        bufs = [None] * len(ps) if first else state[0]
        sgd(ps, gs, bufs, foreach=False, weight_decay=opts.get("weight_decay", 0.0),
                            momentum=opts.get("momentum", 0.0), lr=opts.get("lr", 1e-3),
                            dampening=opts.get("dampening", 0.0), nesterov=opts.get("nesterov", False),
                            maximize=opts.get("maximize", False))
        if opts.get("momentum", 0.0) != 0:
            state[0][:] = bufs


def check_each_step(impl, kind, dtype, opts, kw, lr_tensor, shapes, steps):
    """16-bit params: every step is checked from the kernel's own state before it (the inputs already rounded to
    the dtype), the kernel's result against torch.optim's step in float64 from that state, within 2x torch.optim's
    step in the dtype. Over many steps the trajectories of two 16-bit runs part by rounding alone (a random walk of
    half-ulp roundings of p), which says nothing about either step, so the rule is applied per step."""
    ps = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    grads = _grads(shapes, dtype, steps)
    lr = opts.get("lr", 1e-3)
    lr_t = torch.tensor(lr, dtype=torch.float64) if lr_tensor else None
    mom = opts.get("momentum", 0.0)
    if kind == "adamw":
        state = [[torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                 [torch.zeros_like(p) for p in ps] if opts.get("amsgrad") else []]
    else:
        state = [[torch.empty_like(p) for p in ps] if mom != 0 else []]
    steps_t = [torch.zeros((), dtype=torch.float32) for _ in ps]
    names = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] if kind == "adamw" else ["momentum_buffer"]
    for k, gs in enumerate(grads):
        runs = {}
        for d in (dtype, torch.float64):  # torch.optim's step from the kernel's state (exact in float64)
            rp = [p.to(d) for p in ps]
            rs = [[t.to(d) for t in lst] for lst in state]
            rsteps = [s.clone() for s in steps_t]
            _functional_step(kind, rp, [g.to(d) for g in gs], rs, rsteps, opts, k == 0)
            runs[d] = (rp, rs)
        if kind == "adamw":
            b1, b2 = opts.get("betas", (0.9, 0.999))
            impl.adamw_step_(ps, gs, state[0], state[1], state[2], steps_t, [], lr_t, 0.0 if lr_tensor else lr, b1, b2,
                             opts.get("weight_decay", 1e-2), opts.get("eps", 1e-8), opts.get("maximize", False), **kw)
        else:
            impl.sgd_step_(ps, gs, state[0], [], lr_t, 0.0 if lr_tensor else lr, opts.get("weight_decay", 0.0), mom,
                           opts.get("dampening", 0.0), opts.get("nesterov", False), opts.get("maximize", False),
                           k == 0, **kw)
        (tp, ts), (rp, rs) = runs[dtype], runs[torch.float64]
        for i in range(len(shapes)):
            assert_within_torch_error(ps[i], tp[i], rp[i], f"step {k + 1} param {i} {shapes[i]}")
            for j, lst in enumerate(state):
                if lst:
                    assert_within_torch_error(lst[i], ts[j][i], rs[j][i], f"step {k + 1} {names[j]} {i}")
    assert all(float(s) == (steps if kind == "adamw" else 0) for s in steps_t)


ADAMW_OPTS = {"wd": dict(lr=1e-2, weight_decay=0.1), "amsgrad": dict(lr=1e-2, weight_decay=0.0, amsgrad=True),
              "maximize-betas": dict(lr=3e-3, betas=(0.8, 0.99), maximize=True, eps=1e-6),
              "amsgrad-maximize-beta0": dict(lr=1e-2, amsgrad=True, maximize=True, betas=(0.0, 0.5))}
SGD_OPTS = {"plain": dict(lr=1e-2), "momentum-wd": dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
            "dampening-maximize": dict(lr=1e-2, momentum=0.9, dampening=0.3, maximize=True),
            "nesterov": dict(lr=1e-2, momentum=0.8, nesterov=True, weight_decay=0.05)}
# The C++ kernel: every option at every dtype over 100 steps. The Triton launchers under the interpreter (some
# 20 launches a second): every option in float32 and one per 16-bit dtype, over TRITON_STEPS steps.
TRITON_STEPS = 3
CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cases(options):
    cases = [("cpp", cpp, d, {}, o) for o in options for d in CPP_DTYPES]
    cases += [("triton", triton_optim, torch.float32, TRITON_KW, o) for o in options]
    cases += [("triton", triton_optim, d, TRITON_KW, options[i]) for i, d in enumerate(F16)]
    ids = [f"{n}-{str(d)[6:]}-{o}" for n, _, d, _, o in cases]
    return cases, ids


def _steps(impl_name):
    return STEPS if impl_name == "cpp" else TRITON_STEPS


ADAMW_CASES, ADAMW_IDS = _cases(list(ADAMW_OPTS))
SGD_CASES, SGD_IDS = _cases(list(SGD_OPTS))


@pytest.mark.parametrize("impl_name,impl,dtype,kw,opts", ADAMW_CASES, ids=ADAMW_IDS)
def test_adamw(impl_name, impl, dtype, kw, opts):
    opts = dict(ADAMW_OPTS[opts])
    if dtype == torch.float16:  # eps below float16's range: torch.optim's own float16 step divides by zero
        opts["eps"] = max(opts.get("eps", 1e-8), 1e-4)
    check_step(impl, "adamw", dtype, opts, kw, steps=_steps(impl_name))


@pytest.mark.parametrize("impl_name,impl,dtype,kw,opts", SGD_CASES, ids=SGD_IDS)
def test_sgd(impl_name, impl, dtype, kw, opts):
    check_step(impl, "sgd", dtype, SGD_OPTS[opts], kw, steps=_steps(impl_name))


MASTER = [("cpp", cpp, d, {}) for d in F16] + [("triton", triton_optim, torch.bfloat16, TRITON_KW)]


@pytest.mark.parametrize("impl_name,impl,dtype,kw", MASTER, ids=[f"{n}-{str(d)[6:]}" for n, _, d, _ in MASTER])
@pytest.mark.parametrize("kind,opts", [("adamw", "wd"), ("adamw", "amsgrad"), ("sgd", "nesterov")],
                         ids=["adamw", "adamw-amsgrad", "sgd-nesterov"])
def test_master_weights(impl_name, impl, dtype, kw, kind, opts):
    """16-bit grads on float32 params, the 16-bit params written each step: the float32 update's error."""
    table = ADAMW_OPTS if kind == "adamw" else SGD_OPTS
    check_step(impl, kind, dtype, table[opts], kw, master=True, steps=_steps(impl_name))


@pytest.mark.parametrize("impl_name,impl", [("cpp", cpp), ("triton", triton_optim)])
@pytest.mark.parametrize("kind,opts", [("adamw", ADAMW_OPTS["wd"]), ("sgd", SGD_OPTS["momentum-wd"])],
                         ids=["adamw", "sgd"])
def test_lr_tensor(impl_name, impl, kind, opts):
    """lr read from a one-element tensor (a scheduler's tensor lr) instead of the float argument."""
    kw = TRITON_KW if impl_name == "triton" else {}
    check_step(impl, kind, torch.float32, opts, kw, lr_tensor=True, steps=10 if impl_name == "cpp" else TRITON_STEPS)


def test_triton_many_programs():
    """More tensors and elements than one program covers, at the launcher's default CHUNK: a tensor spanning
    three programs (the last partial), tensors smaller than one BLOCK, and an empty one."""
    shapes = [(2 * optim.CHUNK + 5,), (3,), (0,), (optim.BLOCK + 1,), (17, 9)]
    check_step(triton_optim, "adamw", torch.float32, ADAMW_OPTS["amsgrad"], {}, shapes=shapes, steps=2)
    check_step(triton_optim, "sgd", torch.float32, SGD_OPTS["momentum-wd"], {}, shapes=shapes, steps=1)


def test_cpp_parallel_pieces():
    """The C++ flat split over threads: tensors larger than one parallel task next to many tiny and empty ones."""
    shapes = [(70001,), (0,)] + [(k,) for k in range(1, 40)]
    check_step(cpp, "adamw", torch.float32, ADAMW_OPTS["amsgrad"], {}, shapes=shapes, steps=3)
    check_step(cpp, "sgd", torch.bfloat16, SGD_OPTS["nesterov"], {}, shapes=shapes, steps=2)


def test_cpp_strided_params():
    """Densely stored but non-contiguous params (a transposed matrix) whose state shares their strides."""
    p = torch.randn(40, 30).t()
    g = torch.randn(40, 30).t()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    assert m.stride() == p.stride() and not p.is_contiguous()
    ref = p.clone().contiguous().requires_grad_()
    ref.grad = g.contiguous()
    topt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    step = torch.zeros(())
    cpp.adamw_step_([p], [g], [m], [v], [], [step], [], None, 1e-2, 0.9, 0.999, 1e-2, 1e-8, False)
    topt.step()
    torch.testing.assert_close(p, ref.detach())


def test_cpp_errors():
    p, g = torch.randn(5), torch.randn(5)
    z = torch.zeros(5)
    s = torch.zeros(())
    with pytest.raises(RuntimeError, match="grads must hold one tensor per param"):
        cpp.adamw_step_([p], [], [z], [z], [], [s], [], None, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must have the shape and strides"):
        cpp.adamw_step_([p], [g], [torch.zeros(4)], [z], [], [s], [], None, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(RuntimeError, match="grads must have the params' dtype"):
        cpp.sgd_step_([p], [g.double()], [], [], None, 1e-3, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="params must be float32 and grads and params16"):
        cpp.sgd_step_([p.bfloat16()], [g.bfloat16()], [], [p.bfloat16()], None, 1e-3, 0.0, 0.0, 0.0, False, False,
                      False)
    with pytest.raises(RuntimeError, match="needs momentum_buffers"):
        cpp.sgd_step_([p], [g], [], [], None, 1e-3, 0.0, 0.9, 0.0, False, False, False)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every kernel configuration the launchers pick compiles for sm_80/sm_90 without spills."""
    shapes = [(3000,), (7,)]

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            ps = [torch.randn(s, dtype=dtype) for s in shapes]
            for amsgrad in (False, True):
                z = [torch.zeros_like(p) for p in ps]
                steps = [torch.zeros(()) for _ in ps]
                triton_optim.adamw_step_(ps, ps, z, z, z if amsgrad else [], steps, [], None, 1e-3, 0.9, 0.999, 0.01,
                                         1e-8, False)
            for mom, first, nest in ((0.0, False, False), (0.9, True, False), (0.9, False, True)):
                triton_optim.sgd_step_(ps, ps, [torch.zeros_like(p) for p in ps] if mom else [], [], None, 1e-3, 0.0,
                                       mom, 0.0, nest, False, first)
        masters = [torch.randn(s) for s in shapes]
        p16 = [m.bfloat16() for m in masters]
        z = [torch.zeros_like(m) for m in masters]
        triton_optim.adamw_step_(masters, p16, z, z, [], [torch.zeros(()) for _ in masters], p16,
                                 torch.tensor(1e-3), 0.0, 0.9, 0.999, 0.01, 1e-8, True)
        triton_optim.sgd_step_(masters, p16, z, p16, None, 1e-3, 0.0, 0.9, 0.0, False, False, False)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_adamw_kernel", "_sgd_kernel"}
