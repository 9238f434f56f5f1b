"""Fused multi-tensor optimizer steps (AdamW, SGD): one launch updates a whole list of tensors of one dtype.

The tensors of a list are addressed through one of them (the base pointer, which sets the element type) plus a
table of each tensor's element offset from it, so a kernel argument per list serves any number of tensors. Each
program takes one chunk of CHUNK elements of one tensor (a task table of (tensor, start) built on the host from
the sizes), and walks it in BLOCK-wide steps. Math in float32 with torch.optim's formulas (csrc/optim.cpp states
them); step counters are per-tensor float tensors on the device: the launcher increments them, the kernel reads
them, so nothing is synchronised with the host.

Traffic per element: AdamW reads p, g, m, v and writes p, m, v (plus vmax read and write with amsgrad, plus the
16-bit param's write with master weights); SGD reads p, g (and buf) and writes p (and buf).
"""
import torch
import triton
import triton.language as tl

CHUNK = 65536  # elements per program: enough work per program to hide its setup, small enough to fill the GPU
BLOCK = 1024


@triton.jit
def _adamw_kernel(
    P, G, M, V, VMAX, P16,                         # base pointers of the lists (their element types)
    P_OFF, G_OFF, M_OFF, V_OFF, VMAX_OFF, P16_OFF,  # int64 element offsets of each tensor from its list's base
    NUMEL, STEPS, TASK_T, TASK_START, LR_PTR,
    lr, beta1, beta2, log_beta1, log_beta2, weight_decay, eps, sign,
    AMSGRAD: tl.constexpr,    # keep the running max of v and use it in the denominator
    OUT16: tl.constexpr,      # master weights: also store the updated param into P16 (16-bit)
    LR_TENSOR: tl.constexpr,  # read lr from LR_PTR (a tensor lr) instead of the lr argument
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(TASK_T + pid)
    start = tl.load(TASK_START + pid)
    n = tl.load(NUMEL + t)
    step = tl.load(STEPS + t).to(tl.float32)
    if LR_TENSOR:
        lr = tl.load(LR_PTR).to(tl.float32)
    step_size = lr / (1.0 - tl.exp(step * log_beta1))     # lr / (1 - beta1^t)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2))    # sqrt(1 - beta2^t)
    decay = 1.0 - lr * weight_decay
    p_ptr = P + tl.load(P_OFF + t)
    g_ptr = G + tl.load(G_OFF + t)
    m_ptr = M + tl.load(M_OFF + t)
    v_ptr = V + tl.load(V_OFF + t)
    end = tl.minimum(start + CHUNK, n)
    for i in tl.range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)                   # lerp(m, g, 1 - beta1)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) * beta2 + (1.0 - beta2) * g * g
        tl.store(m_ptr + offs, m.to(M.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(V.dtype.element_ty), mask=mask)
        if AMSGRAD:
            vmax_ptr = VMAX + tl.load(VMAX_OFF + t)
            v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v,
                           propagate_nan=tl.PropagateNan.ALL)
            tl.store(vmax_ptr + offs, v.to(VMAX.dtype.element_ty), mask=mask)
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(P.dtype.element_ty), mask=mask)
        if OUT16:
            p16_ptr = P16 + tl.load(P16_OFF + t)
            tl.store(p16_ptr + offs, p.to(P16.dtype.element_ty), mask=mask)


@triton.jit
def _sgd_kernel(
    P, G, BUF, P16, P_OFF, G_OFF, BUF_OFF, P16_OFF, NUMEL, TASK_T, TASK_START, LR_PTR,
    lr, weight_decay, momentum, one_minus_dampening, sign,
    MOMENTUM: tl.constexpr,   # keep a momentum buffer
    FIRST: tl.constexpr,      # the buffers are new: they start as the gradient (torch.optim's first step)
    NESTEROV: tl.constexpr,
    OUT16: tl.constexpr, LR_TENSOR: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(TASK_T + pid)
    start = tl.load(TASK_START + pid)
    n = tl.load(NUMEL + t)
    if LR_TENSOR:
        lr = tl.load(LR_PTR).to(tl.float32)
    p_ptr = P + tl.load(P_OFF + t)
    g_ptr = G + tl.load(G_OFF + t)
    end = tl.minimum(start + CHUNK, n)
    for i in tl.range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign + weight_decay * p
        if MOMENTUM:
            buf_ptr = BUF + tl.load(BUF_OFF + t)
            if FIRST:
                b = g
            else:
                b = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32) * momentum + one_minus_dampening * g
            tl.store(buf_ptr + offs, b.to(BUF.dtype.element_ty), mask=mask)
            if NESTEROV:
                g = g + momentum * b
            else:
                g = b
        p = p - lr * g
        tl.store(p_ptr + offs, p.to(P.dtype.element_ty), mask=mask)
        if OUT16:
            p16_ptr = P16 + tl.load(P16_OFF + t)
            tl.store(p16_ptr + offs, p.to(P16.dtype.element_ty), mask=mask)


def _offsets(ts, device):
    """(base tensor, int64 offsets of every tensor's first element from the base's, in elements) for one list."""
    base = ts[0]
    es = base.element_size()
    b0 = base.data_ptr()
    offs = []
    for t in ts:
        d = t.data_ptr() - b0
        assert d % es == 0, "optim kernels: a tensor's address is not a multiple of its element size from the base"
        offs.append(d // es)
    return base, torch.tensor(offs, dtype=torch.int64).to(device, non_blocking=True)


def _tasks(params, device, chunk):
    """The task table: for each program, its tensor and the first element of its chunk."""
    numel = [p.numel() for p in params]
    ts, starts = [], []
    for i, n in enumerate(numel):
        for s in range(0, n, chunk):
            ts.append(i)
            starts.append(s)
    as_dev = lambda x, dt: torch.tensor(x, dtype=dt).to(device, non_blocking=True)  # noqa: E731
    return as_dev(numel, torch.int64), as_dev(ts, torch.int32), as_dev(starts, torch.int64), len(ts)


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, params16, lr_tensor, lr, beta1,
                beta2, weight_decay, eps, maximize, chunk=CHUNK, block=BLOCK):
    """AdamW step (torch.optim's math, csrc/optim.cpp's header) over lists of same-shaped dense tensors, in place:
    params P (N_i elements each), grads (P's dtype, or 16-bit with float32 P and params16), exp_avgs and exp_avg_sqs
    (P's dtype), max_exp_avg_sqs (empty, or as exp_avgs: amsgrad), state_steps (one float scalar tensor each,
    incremented), params16 (empty, or the 16-bit params receiving the update). One launch.
    Moves per element: 4 reads + 3 writes (+1 read, +1 write with amsgrad; +1 16-bit write with params16)."""
    if not params:
        return
    device = params[0].device
    torch._foreach_add_(state_steps, 1)
    steps = torch.stack([s.reshape(()) for s in state_steps])
    numel, task_t, task_start, n_tasks = _tasks(params, device, chunk)
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or params, params16 or grads]
    bases, offs = zip(*(_offsets(ts, device) for ts in lists))
    lr_ptr = lr_tensor if lr_tensor is not None else steps
    ln = lambda b: float("-inf") if b == 0 else float(torch.tensor(b, dtype=torch.float64).log())  # noqa: E731
    if n_tasks:
        _adamw_kernel[(n_tasks,)](
            *bases, *offs, numel, steps, task_t, task_start, lr_ptr, float(lr), float(beta1), float(beta2),
            ln(beta1), ln(beta2), float(weight_decay), float(eps), -1.0 if maximize else 1.0,
            AMSGRAD=bool(max_exp_avg_sqs), OUT16=bool(params16), LR_TENSOR=lr_tensor is not None, CHUNK=chunk,
            BLOCK=block, num_warps=4)


def sgd_step_(params, grads, momentum_buffers, params16, lr_tensor, lr, weight_decay, momentum, dampening, nesterov,
              maximize, is_first_step, chunk=CHUNK, block=BLOCK):
    """SGD step (torch.optim's math) over lists of same-shaped dense tensors, in place: params, grads (as in
    adamw_step_), momentum_buffers (one per param when momentum != 0, else empty; written with the gradient when
    is_first_step), params16 (as in adamw_step_). One launch.
    Moves per element: 2 reads + 1 write (+1 read unless the first step, +1 write, with momentum)."""
    if not params:
        return
    device = params[0].device
    numel, task_t, task_start, n_tasks = _tasks(params, device, chunk)
    lists = [params, grads, momentum_buffers or params, params16 or grads]
    bases, offs = zip(*(_offsets(ts, device) for ts in lists))
    lr_ptr = lr_tensor if lr_tensor is not None else numel
    if n_tasks:
        _sgd_kernel[(n_tasks,)](
            *bases, *offs, numel, task_t, task_start, lr_ptr, float(lr), float(weight_decay), float(momentum),
            1.0 - float(dampening), -1.0 if maximize else 1.0, MOMENTUM=momentum != 0, FIRST=bool(is_first_step),
            NESTEROV=bool(nesterov), OUT16=bool(params16), LR_TENSOR=lr_tensor is not None, CHUNK=chunk,
            BLOCK=block, num_warps=4)
