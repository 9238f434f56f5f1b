"""tritium.optim.AdamW and SGD against torch.optim.AdamW and SGD: values over 100 steps (float64 reference, the
tolerance rule), every option, master weights, params without a gradient, sparse gradients refused, state_dict
both ways, zero_grad, LR schedulers and a tensor lr, torch.compile(fullgraph=True) of the step, the reference
backend, bad arguments."""
import pytest
import torch

import tritium
import tritium.optim as topt
from tests.util import assert_within_torch_error

SHAPES = [(7,), (123,), (33, 17), (1,)]
STEPS = 100


def _params(dtype, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(shapes, dtype, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]


def _train(cls, init, grads, dtype, sched=None, **opts):
    """cls's optimizer over params initialised from init (cast to dtype) and the gradient sequence (cast to the
    params' dtype): the final params and the optimizer."""
    ps = [torch.nn.Parameter(p.to(dtype).clone()) for p in init]
    opt = cls(ps, **opts)
    s = sched(opt) if sched else None
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype)
        opt.step()
        if s is not None:
            s.step()
    return ps, opt


def _compare(kind, dtype, opts, steps=STEPS, master=False, sched=None):
    """tritium's optimizer vs torch.optim's single-tensor one in float64 after `steps` steps, within 2x torch.optim's
    own error in the update's dtype (float32 with master weights: torch.optim on float32 copies)."""
    ours_cls, torch_cls = (topt.AdamW, torch.optim.AdamW) if kind == "adamw" else (topt.SGD, torch.optim.SGD)
    init, grads = _params(dtype), _grads(SHAPES, dtype, steps)
    extra = {"master_weights": True} if master else {}
    ours, oopt = _train(ours_cls, init, grads, dtype, sched, **opts, **extra)
    work = torch.float32 if master else dtype
    theirs, _ = _train(lambda ps, **o: torch_cls(ps, foreach=False, **o), init, grads, work, sched, **opts)
    ref, _ = _train(lambda ps, **o: torch_cls(ps, foreach=False, **o), init, grads, torch.float64, sched, **opts)
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
        value = oopt.state[o]["master_param"] if master else o.detach()
        assert_within_torch_error(value, t.detach(), r.detach(), f"param {i}")
        if master:
            assert o.dtype == dtype and torch.equal(o.detach(), value.to(dtype))
    return ours, oopt


ADAMW = {"default": {}, "wd-lr": dict(lr=1e-2, weight_decay=0.1), "amsgrad": dict(lr=1e-2, amsgrad=True),
         "maximize-betas-eps": dict(lr=5e-3, betas=(0.8, 0.95), eps=1e-6, maximize=True, weight_decay=0.0)}
SGD = {"plain": dict(lr=1e-2), "momentum": dict(lr=1e-2, momentum=0.9),
       "dampening-wd": dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.05),
       "nesterov-maximize": dict(lr=1e-2, momentum=0.8, nesterov=True, maximize=True)}


@pytest.mark.parametrize("name", ADAMW)
def test_adamw_100_steps(name):
    _compare("adamw", torch.float32, ADAMW[name])


@pytest.mark.parametrize("name", SGD)
def test_sgd_100_steps(name):
    _compare("sgd", torch.float32, SGD[name])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("kind,opts", [("adamw", ADAMW["amsgrad"]), ("sgd", SGD["nesterov-maximize"])],
                         ids=["adamw", "sgd"])
def test_other_dtypes(kind, opts, dtype):
    """float64 over 100 steps; bfloat16 params (16-bit state, as torch.optim keeps it) over 10 steps: beyond that,
    two 16-bit runs part by rounding alone (tests/kernels/test_optim.py checks every 16-bit step on its own)."""
    _compare(kind, dtype, opts, steps=STEPS if dtype == torch.float64 else 10)


@pytest.mark.parametrize("kind,opts", [("adamw", ADAMW["wd-lr"]), ("sgd", SGD["momentum"])], ids=["adamw", "sgd"])
def test_master_weights(kind, opts):
    """bfloat16 params with master_weights: the float32 copies follow torch.optim on float32 params (with the
    bfloat16 gradients widened), the bfloat16 params are those copies rounded, and the state is float32."""
    ours, opt = _compare(kind, torch.bfloat16, opts, master=True)
    st = opt.state[ours[0]]
    assert all(t.dtype == torch.float32 for k, t in st.items() if k != "step")


def test_master_weights_keep_small_updates():
    """An update far below a bfloat16 ulp of the weight is lost by a bfloat16 step but accumulates in the master."""
    p = torch.nn.Parameter(torch.full((64,), 8.0, dtype=torch.bfloat16))
    q = torch.nn.Parameter(p.detach().clone())
    a, b = topt.SGD([p], lr=1e-3, master_weights=True), topt.SGD([q], lr=1e-3)
    for _ in range(1000):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        a.step()
        b.step()
    assert torch.equal(q.detach(), torch.full_like(q, 8.0))     # a 1e-3 step vanishes at bf16's ulp of 1/16
    torch.testing.assert_close(a.state[p]["master_param"], torch.full((64,), 7.0), atol=1e-3, rtol=0)
    assert torch.equal(p.detach(), torch.full_like(p, 7.0))


def test_mixed_dtypes_and_grad_none():
    """One group with float32 and bfloat16 params (one kernel call each) and a param without a gradient, which
    keeps its value and gets no state (as in torch.optim)."""
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(9).bfloat16())
    c = torch.nn.Parameter(torch.randn(3))
    a2, b2 = [torch.nn.Parameter(t.detach().clone()) for t in (a, b)]
    ours, theirs = topt.AdamW([a, b, c], lr=1e-2), torch.optim.AdamW([a2, b2], lr=1e-2, foreach=False)
    before = c.detach().clone()
    for _ in range(3):
        for x, y in ((a, a2), (b, b2)):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(c.detach(), before) and c not in ours.state
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2, atol=1e-2, rtol=1e-2)  # bf16: the kernel rounds once per step, torch per op


@pytest.mark.parametrize("cls", [topt.AdamW, topt.SGD])
def test_sparse_grad_refused(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        cls(emb.parameters(), lr=0.1).step()


def test_zero_grad_and_closure():
    lin = torch.nn.Linear(4, 3)
    opt = topt.AdamW(lin.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = lin(torch.ones(2, 4)).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0 and all(p.grad is not None for p in lin.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in lin.parameters())
    w = lin.weight.detach().clone()
    opt.step()                                          # no gradients: nothing moves
    assert torch.equal(lin.weight.detach(), w)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_state_dict_roundtrip_with_torch(kind):
    """Same keys as torch.optim's state_dict; 5 steps here, the state loaded into torch.optim, 5 more steps on both
    sides, and the other way round: the same values as 10 steps of either."""
    ours_cls, torch_cls = (topt.AdamW, torch.optim.AdamW) if kind == "adamw" else (topt.SGD, torch.optim.SGD)
    opts = dict(lr=1e-2, amsgrad=True) if kind == "adamw" else dict(lr=1e-2, momentum=0.9)
    init, grads = _params(torch.float32), _grads(SHAPES, torch.float32, 10)
    for first, second in ((ours_cls, torch_cls), (torch_cls, ours_cls)):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        a = first(ps, **opts)
        for gs in grads[:5]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            a.step()
        sd = a.state_dict()
        b = second(ps, **opts)
        b.load_state_dict(sd)
        assert set(b.state_dict()["state"][0]) == set(sd["state"][0])
        for gs in grads[5:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            b.step()
        full, _ = _train(torch_cls, init, grads, torch.float32, **opts)
        for p, q in zip(ps, full):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    keys = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} if kind == "adamw" else {"momentum_buffer"}
    _, ours = _train(ours_cls, init, grads[:2], torch.float32, **opts)
    _, theirs = _train(torch_cls, init, grads[:2], torch.float32, **opts)
    assert set(ours.state_dict()["state"][0]) == set(theirs.state_dict()["state"][0]) == keys


def test_master_state_dict_keeps_float32():
    """A master-weights state_dict reloads with its float32 state and copies; torch.optim's bfloat16 state loads
    into a master-weights optimizer (widened)."""
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    opt = topt.AdamW([p], lr=1e-2, master_weights=True)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    again = topt.AdamW([p], lr=1e-2, master_weights=True)
    again.load_state_dict(sd)
    st = again.state[p]
    for key in ("exp_avg", "exp_avg_sq", "master_param"):
        assert st[key].dtype == torch.float32 and torch.equal(st[key], sd["state"][0][key])
    assert again.param_groups[0]["master_weights"]
    q = torch.nn.Parameter(torch.randn(40).bfloat16())
    t = torch.optim.AdamW([q], lr=1e-2)
    q.grad = torch.randn_like(q)
    t.step()
    mine = topt.AdamW([q], lr=1e-2, master_weights=True)
    mine.load_state_dict(t.state_dict())
    assert mine.param_groups[0]["master_weights"]
    q.grad = torch.randn_like(q)
    mine.step()
    assert mine.state[q]["exp_avg"].dtype == torch.float32 and float(mine.state[q]["step"]) == 2


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_lr_scheduler(kind):
    """An LR scheduler changes the group's lr between steps; each step reads it."""
    opts = dict(lr=0.05, momentum=0.9) if kind == "sgd" else dict(lr=0.05)
    _compare(kind, torch.float32, opts, steps=20,
             sched=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))


def test_tensor_lr():
    """A one-element tensor lr is read when the step runs (changing it in place changes the next step)."""
    lr = torch.tensor(0.01)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = topt.SGD([p], lr=lr)
    p.grad = torch.ones(3)
    opt.step()
    lr.fill_(0.1)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.11))
    with pytest.raises(ValueError, match="1-element"):
        topt.AdamW([p], lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_compile_step_fullgraph(kind):
    """torch.compile(opt.step, fullgraph=True): the step traces in one graph (the op has a fake kernel and declares
    its mutations) and gives eager's values; a tensor lr that a scheduler changes between steps needs no recompile.
    (torch.optim.AdamW's own single-tensor step breaks the graph there. The scheduler is made after the compile:
    it wraps opt.step in a function of lr_scheduler.py, which dynamo skips, and then warns that it cannot see the
    compiled calls.)"""
    init, grads = _params(torch.float32), _grads(SHAPES, torch.float32, 5)
    runs = []
    for compiled in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = (topt.AdamW(ps, lr=torch.tensor(0.01), amsgrad=True) if kind == "adamw"
               else topt.SGD(ps, lr=torch.tensor(0.01), momentum=0.9))
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for k, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            # the first step creates the state (one recompile after it); the lr changes afterwards recompile nothing
            with torch._dynamo.config.patch(error_on_recompile=k >= 2):
                step()
            sched.step()
        runs.append(ps)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_reference_backend(reference_backend):
    _compare("adamw", torch.float32, ADAMW["amsgrad"], steps=10)
    _compare("sgd", torch.float32, SGD["nesterov-maximize"], steps=10)


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs, match in ((dict(lr=-1.0), "Invalid learning rate"), (dict(eps=-1.0), "Invalid epsilon"),
                          (dict(betas=(1.0, 0.9)), "index 0"), (dict(betas=(0.9, -0.1)), "index 1"),
                          (dict(weight_decay=-1.0), "Invalid weight_decay")):
        with pytest.raises(ValueError, match=match):
            topt.AdamW(p, **kwargs)
        with pytest.raises(ValueError, match=match):
            torch.optim.AdamW(p, **kwargs)
    for kwargs, match in ((dict(momentum=-0.1), "Invalid momentum"), (dict(nesterov=True), "Nesterov"),
                          (dict(lr=-1.0), "Invalid learning rate")):
        with pytest.raises(ValueError, match=match):
            topt.SGD(p, **kwargs)


def test_exported():
    assert tritium.optim.AdamW is topt.AdamW and issubclass(topt.SGD, torch.optim.Optimizer)
