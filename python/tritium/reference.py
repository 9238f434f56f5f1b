"""Plain-torch reference of every tritium op: the specification the kernels are tested against.

For a drop-in op the reference is torch's own function (its behaviour is the spec, errors included); for a
fused op it is the unfused composition of torch ops. Kernels fall back to these explicitly for inputs they
do not cover, and ``TRITIUM_BACKEND=reference`` routes every call here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dtypes import acc_dtype

rms_norm = F.rms_norm
layer_norm = F.layer_norm


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """F.group_norm, then SiLU when activation is "silu"."""
    if activation not in (None, "silu"):
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    y = F.group_norm(input, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                       eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    h = input + residual
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h


# ---- paged KV cache and sampling (tritium.ops.paged, tritium.ops.sampling) ----
def append_kv(k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, slot_mapping: Tensor) -> None:
    """k_pool.view(-1, H, D)[slot] = k[t] for every token t with slot = slot_mapping[t] >= 0 (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_pool.shape[1]
    k_pool[slots // bs, slots % bs] = k[keep].to(k_pool.dtype)
    v_pool[slots // bs, slots % bs] = v[keep].to(v_pool.dtype)


def paged_attention_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           scale: float, softcap: Optional[float] = None, window: Optional[int] = None) -> Tensor:
    """One query token per sequence against its cached tokens: gather the sequence's pages, then dense
    attention (GQA: query head h reads KV head h // (q_heads // kv_heads)); softcap: s = c * tanh(s / c) on the
    scaled scores; window: only the last `window` tokens. Computed in float32 (float64 for float64)."""
    acc = acc_dtype(q.dtype)
    B, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.zeros(B, Hq, D, dtype=acc, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue
        blocks = block_tables[b, : (n + bs - 1) // bs].long()
        k = k_pool[blocks].reshape(-1, Hkv, D)[:n].to(acc)
        v = v_pool[blocks].reshape(-1, Hkv, D)[:n].to(acc)
        if window is not None and window < n:
            k, v = k[n - window:], v[n - window:]
        k = k.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, n, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
        s = torch.einsum("hd,hnd->hn", q[b].to(acc), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
    return out.to(q.dtype)


def sampling_distribution(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                          min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                          frequency_penalty: float = 0.0, logit_bias: Optional[dict] = None,
                          history: Optional[list] = None) -> Tensor:
    """The distribution tritium.sample draws one row from, in float64 (temperature > 0), as plain torch ops:
    1. penalties over the row's history (each distinct token once, with c = its count): repetition
       (z / r if z > 0 else z * r), then z -= frequency * c + presence;
    2. z += logit_bias;  3. z /= temperature;  e = exp(z - max z);
    4. top_k: keep e >= the k-th largest e (ties at the cut are kept);
    5. top_p: keep token i iff the mass of kept tokens strictly more likely than i is < top_p * kept mass
       (the smallest prefix of the sorted kept set reaching top_p, ties at the cut kept);
    6. min_p: keep e >= min_p (i.e. p >= min_p * p_max);  7. renormalise over the kept set."""
    z = _penalised(logits.double(), dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty, logit_bias=logit_bias), history)
    z = z / temperature
    e = torch.exp(z - z.max())
    keep = torch.ones_like(e, dtype=torch.bool)
    if 0 < top_k < e.numel():
        keep &= e >= torch.topk(e, top_k).values[-1]
    if top_p < 1.0:
        ek = torch.where(keep, e, 0.0)
        s, _ = torch.sort(ek, descending=True)
        csum = torch.cumsum(s, 0)
        # mass strictly above each value: cumsum up to the first occurrence of the value, minus the value
        first = torch.searchsorted(-s, -ek, side="left")
        above = torch.where(first > 0, csum[(first - 1).clamp(min=0)], 0.0)
        keep &= above < top_p * ek.sum()
    if min_p > 0.0:
        keep &= e >= min_p
    p = torch.where(keep, e, 0.0)
    return p / p.sum()


# ---- RNNs: torch's own layer implementations, the unpacked overloads torch.nn.LSTM/GRU call ----
lstm = torch.lstm
gru = torch.gru
rnn_tanh = torch.rnn_tanh
rnn_relu = torch.rnn_relu



# ---- state-space scans and the causal depthwise conv of Mamba (tritium.ops.ssm, tritium.ops.conv1d) ----
# The semantics and argument layouts of mamba_ssm's selective_scan_ref / selective_state_update_ref and
# causal-conv1d's causal_conv1d_ref / causal_conv1d_update_ref (real A only), computed in float32 (float64 for
# float64 input) and returned in the input's dtype as theirs.
def _groups(t: Tensor, dim: int) -> Tensor:
    """B or C (batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), each group shared by dim // G channels."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.repeat_interleave(dim // t.shape[1], 1)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False):
    """Mamba's selective scan. u, delta, z (batch, dim, L); A (dim, N); B, C (dim, N) (constant) or
    (batch, N, L) / (batch, G, N, L) (per step, G groups of dim // G channels); D, delta_bias (dim,).
    dt = delta (+ delta_bias) (softplus'd); x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t (x: (batch, dim, N), x_{-1}
    = 0); y_t = <x_t, C_t> + D u_t; out = y * silu(z). Returns out (u's dtype) and, with return_last_state, x_{L-1}
    (float32)."""
    acc = acc_dtype(u.dtype)
    dtype_in = u.dtype
    u, delta, A = u.to(acc), delta.to(acc), A.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(acc)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    Bv = B.to(acc)[None, :, :, None] if B.dim() == 2 else _groups(B.to(acc), dim)   # (b|1, dim, N, L|1)
    Cv = C.to(acc)[None, :, :, None] if C.dim() == 2 else _groups(C.to(acc), dim)
    deltaA = torch.exp(delta[:, :, :, None] * A[None, :, None, :])                  # (batch, dim, L, N)
    deltaB_u = (delta * u)[:, :, :, None] * Bv.transpose(2, 3)                      # (batch, dim, L, N)
    x = u.new_zeros((batch, dim, dstate))
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append((x * Cv[..., min(i, Cv.shape[-1] - 1)]).sum(-1))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D.to(acc)[:, None]
    if z is not None:
        out = out * F.silu(z.to(acc))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False) -> Tensor:
    """One decoding step of the scan, updating state in place. Without heads: state (batch, dim, N); x, dt, z
    (batch, dim); A (dim, N); B, C (batch, N); D, dt_bias (dim,). With heads (Mamba-2's layout): state
    (batch, nheads, dim, N), x, dt, z (batch, nheads, dim), A (nheads, dim, N), B, C (batch, ngroups, N),
    D, dt_bias (nheads, dim), each group shared by nheads // ngroups heads. Returns y (x's dtype)."""
    acc = acc_dtype(x.dtype)
    heads = state.dim() == 4
    expand = (lambda t: t) if heads else (lambda t: t.unsqueeze(1))
    s4, x4, dt4, A4 = expand(state), expand(x).to(acc), expand(dt).to(acc), (A if heads else A[None]).to(acc)
    nheads = s4.shape[1]
    B4 = (B if B.dim() == 3 else B[:, None]).to(acc).repeat_interleave(nheads // (B.shape[1] if B.dim() == 3 else 1), 1)
    C4 = (C if C.dim() == 3 else C[:, None]).to(acc).repeat_interleave(nheads // (C.shape[1] if C.dim() == 3 else 1), 1)
    if dt_bias is not None:
        dt4 = dt4 + (dt_bias if heads else dt_bias[None]).to(acc)
    if dt_softplus:
        dt4 = F.softplus(dt4)
    new = s4.to(acc) * torch.exp(dt4[..., None] * A4) + (dt4 * x4)[..., None] * B4[:, :, None, :]
    s4.copy_(new)
    y = (new * C4[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + x4 * (D if heads else D[None]).to(acc)
    if z is not None:
        y = y * F.silu(expand(z).to(acc))
    return (y if heads else y.squeeze(1)).to(x.dtype)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
                  return_final_states: bool = False, final_states_out: Optional[Tensor] = None,
                  activation: Optional[str] = None):
    """The depthwise causal conv of Mamba: x (batch, dim, L), weight (dim, width), bias (dim,), initial_states
    (batch, dim, width - 1); out_t = sum_k weight[:, k] x_{t - width + 1 + k} (+ bias), x before 0 being the
    initial states (zeros without them); then silu with activation "silu" / "swish". With return_final_states
    also (out, final_states): the last width - 1 inputs (padded on the left by the initial states or zeros),
    copied into final_states_out when given."""
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    acc = acc_dtype(x.dtype)
    L, (dim, width) = x.shape[-1], weight.shape
    w, b = weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc)
    xa = x.to(acc)
    if initial_states is None:
        xa = F.pad(xa, (width - 1, 0))  # zeros before position 0
    else:
        xa = torch.cat([initial_states.to(acc), xa], dim=-1)
    out = F.conv1d(F.pad(xa, (0, 1)) if L == 0 else xa, w, b, groups=dim)[..., :L]  # (conv1d refuses L = 0)
    out = (out if activation is None else F.silu(out)).to(x.dtype)
    if not return_final_states:
        return out
    final = F.pad(xa, (width - 1 - xa.shape[-1], 0)).to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """One decoding step (or a few: x (batch, dim) or (batch, dim, seqlen)) of causal_conv1d over the rolling
    window conv_state (batch, dim, state_len >= width - 1), which is updated in place."""
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    acc = acc_dtype(x.dtype)
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    seqlen, state_len = xs.shape[-1], conv_state.shape[-1]
    x_new = torch.cat([conv_state.to(acc), xs.to(acc)], dim=-1)
    conv_state.copy_(x_new[:, :, x_new.shape[-1] - state_len:])  # (-state_len: would take all for 0)
    out = F.conv1d(x_new, weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc),
                   groups=weight.shape[0])[:, :, -seqlen:]
    out = out if activation is None else F.silu(out)
    return (out.squeeze(-1) if squeeze else out).to(x.dtype)


# ---- attention ----
scaled_dot_product_attention = F.scaled_dot_product_attention


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    window: Optional[tuple] = None, softcap: Optional[float] = None, return_lse: bool = False):
    """softmax(cap(q k^T * scale)) v with key j visible to query i when j <= i + S - L (causal, bottom-right)
    and i + S - L - left <= j <= i + S - L + right (window, -1 unbounded; None: no window); rows seeing no key
    give 0 and lse -inf. Computed in float32 (float64 for float64 input)."""
    L, D, S = q.shape[-2], q.shape[-1], k.shape[-2]
    acc = acc_dtype(q.dtype)
    group = q.shape[-3] // k.shape[-3]
    kf = k.to(acc).repeat_interleave(group, -3)
    vf = v.to(acc).repeat_interleave(group, -3)
    s = (q.to(acc) @ kf.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L, device=q.device)[:, None] + (S - L)
    j = torch.arange(S, device=q.device)[None, :]
    left, right = (-1, -1) if window is None else window
    right = 0 if causal else right
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if right >= 0:
        visible &= j <= i + right
    if left >= 0:
        visible &= j >= i - left
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = (p @ vf).to(q.dtype)
    return (out, lse) if return_lse else out


# ---- activations and gated units (tritium.ops.activations): torch's own functions ----
relu = F.relu
leaky_relu = F.leaky_relu
elu = F.elu
selu = F.selu
celu = F.celu
sigmoid = torch.sigmoid
tanh = torch.tanh
softplus = F.softplus
gelu = F.gelu
silu = F.silu
mish = F.mish
logsigmoid = F.logsigmoid
hardswish = F.hardswish
prelu = F.prelu
glu = F.glu


def swish(input: Tensor, beta=1.0) -> Tensor:
    """x * sigmoid(beta * x); beta a float or a tensor broadcast against x."""
    return input * torch.sigmoid(beta * input)


# batch_norm_act's activations: name -> torch's function (None: identity)
BN_ACTIVATIONS = {
    None: lambda x: x, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "mish": F.mish,
    "logsigmoid": F.logsigmoid, "hardswish": F.hardswish,
}


def batch_norm_act(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation: Optional[str] = "relu",
                   residual: Optional[Tensor] = None) -> Tensor:
    """act(batch_norm(input) in inference (the running statistics) + residual)."""
    if activation not in BN_ACTIVATIONS:
        raise ValueError(f"batch_norm_act: activation must be one of {sorted(a for a in BN_ACTIVATIONS if a)} "
                         f"or None, got {activation!r}")
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps)
    if residual is not None:
        y = y + residual
    return BN_ACTIVATIONS[activation](y)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Dynamic Tanh: weight * tanh(alpha * x) + bias."""
    return weight * torch.tanh(alpha * x) + bias


def _halves(gate: Tensor, up: Optional[Tensor]):
    if up is not None:
        return gate, up
    if gate.dim() == 0 or gate.shape[-1] % 2:
        raise ValueError(f"gate must hold [gate | up] halves along its last dim (even size) when up is None, "
                         f"got shape {tuple(gate.shape)}")
    return gate.chunk(2, dim=-1)


def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up; up None: gate holds [gate | up] along its last dim."""
    g, u = _halves(gate, up)
    return F.silu(g) * u


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up; up None: gate holds [gate | up] along its last dim."""
    g, u = _halves(gate, up)
    return F.gelu(g, approximate=approximate) * u


# ---- softmax family ----
softmax = F.softmax
log_softmax = F.log_softmax
softmin = F.softmin
kl_div = F.kl_div


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: Optional[float] = None) -> Tensor:
    """torch's cross_entropy; with softcap c the logits are c * tanh(logits / c) first, with z_loss w the loss adds
    w * logsumexp(logits)^2 per row (0 for an ignored row, no class weight), whose 'mean' divides by the number of
    non-ignored rows (tritium.cross_entropy's docstring; Liger-Kernel's lse_square_scale and softcap)."""
    if size_average is not None or reduce is not None:
        reduction = F._Reduction.legacy_get_string(size_average, reduce)
    if softcap is not None:
        input = softcap * torch.tanh(input / softcap)
    ce = F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if not z_loss:
        return ce
    lse = torch.logsumexp(input, 0 if input.dim() == 1 else 1)
    z = z_loss * lse * lse
    if target.dtype.is_floating_point:  # class probabilities: every row counts
        count = z.numel()
    else:
        valid = target != ignore_index
        z = torch.where(valid, z, 0.0)
        count = valid.sum()
    if reduction == "none":
        return ce + z
    return ce + (z.sum() / count if reduction == "mean" else z.sum())


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, chunk_size: Optional[int] = None, *,
                               z_loss: float = 0.0, softcap: Optional[float] = None) -> Tensor:
    """The unfused LM head + loss: cross_entropy(linear(hidden, weight, bias), target) (chunk_size unused), with
    cross_entropy's z_loss and softcap options."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                         softcap=softcap).reshape(target.shape if reduction == "none" else ())


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                      alpha: float = 0.5, target: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) (batchmean over rows of the last dim)
    + (1 - alpha) * cross_entropy(student, target); without target only the first term."""
    c = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, c) / temperature, -1)
    t = F.log_softmax(teacher_logits.detach().reshape(-1, c) / temperature, -1)
    loss = alpha * temperature ** 2 * F.kl_div(s, t, reduction="batchmean", log_target=True)
    if target is not None:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits.reshape(-1, c), target.reshape(-1),
                                                    ignore_index=ignore_index)
    return loss


def sample(logits: Tensor, uniform: Tensor, params: list, history: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """tritium.sample's specification row by row: temperature 0 -> argmax of the penalised, biased logits; else
    the first token (in index order) at which the cumulative sampling_distribution passes uniform[row]. Each
    params entry is a dict of sampling_distribution's keyword arguments. Returns (tokens int64, logprobs
    float32) with logprobs of the chosen token under the raw log_softmax(logits); a row with NaN or +inf logits,
    or no finite logit left, gives token -1 and logprob NaN."""
    tokens, logprobs = [], []
    raw = torch.log_softmax(logits.double(), dim=-1)
    for r, p in enumerate(params):
        row = logits[r].double()
        hist = history[r] if history is not None else None
        bad = bool(torch.isnan(row).any() or (row == float("inf")).any() or not torch.isfinite(row).any())
        if not bad:
            p = dict(p)
            if p.get("temperature", 1.0) == 0.0:
                p["temperature"] = 1.0
                z = _penalised(row, p, hist)
                bad = not torch.isfinite(z.max())
                t = int(torch.argmax(z)) if not bad else -1
            else:
                d = sampling_distribution(row, **p, history=hist)
                bad = bool(torch.isnan(d).any())
                c = torch.cumsum(d, 0)
                t = int(torch.searchsorted(c, uniform[r].double() * c[-1], side="right").clamp(max=row.numel() - 1))
        tokens.append(-1 if bad else t)
        logprobs.append(float("nan") if bad else float(raw[r, t]))
    return torch.tensor(tokens, dtype=torch.int64), torch.tensor(logprobs, dtype=torch.float32)


def _penalised(row: Tensor, p: dict, history: Optional[list]) -> Tensor:
    """Penalties and logit bias only (what greedy decoding takes the argmax of)."""
    z = row.clone()
    if history:
        toks, counts = torch.tensor([t for t in history if 0 <= t < z.numel()], dtype=torch.long).unique(
            return_counts=True)
        zt = z[toks]
        rep = p.get("repetition_penalty", 1.0)
        zt = torch.where(zt > 0, zt / rep, zt * rep)
        z[toks] = zt - p.get("frequency_penalty", 0.0) * counts.double() - p.get("presence_penalty", 0.0)
    for t, bias in (p.get("logit_bias") or {}).items():
        z[t] += bias
    return z


# ---- rope ----
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None,
         interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate pairs (i, i + R/2) (or (2i, 2i+1) when interleaved) of the first R = 2 * cos.shape[1] dims of q
    and k by position * inv_freq_i, with cos/sin rows gathered at positions (default 0..seq-1 along the seq
    dim, shaped q.shape[:-2]); computed in float32 (float64 for float64 input)."""
    if positions is None:
        seq = q.shape[-3] if q.dim() == 4 else q.shape[0]
        positions = torch.arange(seq, device=q.device).expand(q.shape[:-2])
    c = cos[positions].unsqueeze(-2)
    s = sin[positions].unsqueeze(-2)
    R = 2 * cos.shape[-1]

    def rot(x):
        acc = acc_dtype(x.dtype)
        xr, rest = x[..., :R].to(acc), x[..., R:]
        if interleaved:
            a, b = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((a * c - b * s, b * c + a * s), -1).flatten(-2)
        else:
            a, b = xr.chunk(2, -1)
            out = torch.cat((a * c - b * s, b * c + a * s), -1)
        return torch.cat((out.to(x.dtype), rest), -1)

    return rot(q), rot(k)


# ---- quantized weights (tritium.ops.quant; docs/quantization.md) ----
def quant_weight(q: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int, group: int,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight a logical quantized weight stands for: scales * q + mins per group of ``group``
    elements of a row (mins None: scales * (q - 2**(bits - 1))), computed in float32 as the kernels do (one
    rounding: the product and the sum are exact in float64 and rounded once), returned in ``dtype``."""
    n, k = q.shape
    s = scales.double().repeat_interleave(group, 1)[:, :k]
    if mins is None or mins.numel() == 0:
        w = s * (q.double() - 2 ** (bits - 1))
    else:
        w = s * q.double() + mins.double().repeat_interleave(group, 1)[:, :k]
    return w.float().to(dtype)


def quant_linear(x: Tensor, q: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int, group: int) -> Tensor:
    """x (M, K) @ W^T for the logical quantized weight, in float64 (the kernels' reference), returned in x's
    dtype."""
    return (x.double() @ quant_weight(q, scales, mins, bits, group).double().t()).to(x.dtype)


def quantize_int8_act(x: Tensor, terms: int = 1) -> Tensor:
    """x (M, K) as the int8 activations of quant_linear(int8_act=terms) see it, returned dequantised in float64:
    per block of 32 elements of a row (the row padded with zeros), scale d = absmax / 127 (a float32) and
    x_q = round_half_even(x * float32(1 / d)), giving d * x_q; with terms=2, plus the same quantization of what
    that left over (x - d * x_q, rounded once to float32). The reference for the int8-activation path is
    quant_linear(quantize_int8_act(x, terms), ...)."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    xp = torch.zeros(m, kp, dtype=torch.float64)
    xp[:, :k] = x.double().cpu()
    out = torch.zeros_like(xp)
    for _ in range(terms):
        blocks = xp.view(m, kp // 32, 32)
        d = (blocks.abs().amax(-1, keepdim=True) / 127).float().double()   # the scale is a float32 in the kernels
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d)).float().double()
        term = (torch.round((blocks * inv).float().double()) * d).view(m, kp)   # exact: 8 bits times a float32
        out += term
        xp = (xp - term).float().double()      # exact in float64, then one rounding, as the kernels' FMA
    return out[:, :k].to(x.device)


# ---- LoRA (tritium.ops.lora): PEFT's LoRA Linear forward ----
def lora_dropout_mask(x: Tensor, p: float) -> Tensor:
    """The dropout mask of lora_linear's adapter input: 0/1 in x's dtype and shape, each element kept with
    probability 1 - p, drawn from torch's generator (the kernels' path draws the same mask)."""
    return torch.empty_like(x).bernoulli_(1.0 - p)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = True) -> Tensor:
    """x W^T + bias + scaling (dropout(x) A^T) B^T, as PEFT's LoRA Linear computes it: the base layer in x's dtype,
    the adapter in its own (x cast to lora_A's dtype first), the sum returned in the base output's dtype.
    dropout(x) = x * lora_dropout_mask(x, p) / (1 - p) while training with p > 0."""
    y = F.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    if training and dropout_p > 0.0:
        xa = xa * lora_dropout_mask(x, dropout_p).to(xa.dtype) / (1.0 - dropout_p)
    return (y + F.linear(F.linear(xa, lora_A), lora_B) * scaling).to(y.dtype)


# ---- preference and RL losses (ops/preference.py) ----
# A sequence loss is a formula of per-sequence statistics: lp (N,) the summed log-probabilities of each sequence's
# non-ignored target tokens, n (N,) their counts, ref (N,) the reference model's summed log-probabilities, labels
# (N,) (KTO's desirable flags) and ctx (the batch-wide values: "n_groups", "chosen_tokens", "kl"). Paired kinds
# hold the B chosen sequences first, then the B rejected. Each formula returns (loss per group (pairs, or
# sequences for the unpaired KTO), rewards (N,), extra metrics, d(sum of the group losses)/d lp (N,)): the loss is
# the mean over groups. ops/preference.py evaluates them group by group on its fused log-probabilities and scales
# the group's gradient rows by the written-out derivative (the reference path here differentiates the loss with
# autograd instead, and the tests hold both to TRL's own code).
def _avg_n(n: Tensor) -> Tensor:
    return n.clamp(min=1)


def _smoothed_logsigmoid(z: Tensor, eps: float):
    """-(1 - eps) logsigmoid(z) - eps logsigmoid(-z) (the conservative, label-smoothed sigmoid loss) and its
    derivative sigmoid(z) - (1 - eps)."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps, torch.sigmoid(z) - (1 - eps)


def _chosen_rejected(t: Tensor):
    """The chosen (first) and rejected (second) halves of a per-sequence tensor."""
    return t[:t.shape[0] // 2], t[t.shape[0] // 2:]


def _pair_grad(dc: Tensor, dr: Tensor) -> Tensor:
    return torch.cat([dc, dr])


def _dpo(loss_type):
    def terms(lp, n, ref, labels, ctx, beta, label_smoothing):
        (c, r), (nc, nr) = _chosen_rejected(lp - ref), _chosen_rejected(_avg_n(n))
        z = beta * (c - r)
        if loss_type == "sigmoid":
            loss, dz = _smoothed_logsigmoid(z, label_smoothing)
            dc = beta * dz
        elif loss_type == "hinge":
            loss = torch.relu(1 - z)
            dc = -beta * (1 - z > 0).to(z.dtype)
        elif loss_type == "ipo":  # log-ratios averaged over the tokens, as TRL
            q = c / nc - r / nr - 1 / (2 * beta)
            loss = q ** 2
            return loss, beta * (lp - ref), {}, _pair_grad(2 * q / nc, -2 * q / nr)
        else:  # robust
            eps = label_smoothing
            loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
            dc = beta * (torch.sigmoid(z) - (1 - eps) / (1 - 2 * eps))
        return loss, beta * (lp - ref), {}, _pair_grad(dc, -dc)
    return terms


def _nll_share(lp: Tensor, ctx):
    """Each pair's share of the chosen sequences' token-mean NLL (their mean over pairs is that NLL), and its
    derivative with respect to the chosen summed log-probabilities."""
    k = -ctx["n_groups"] / ctx["chosen_tokens"].clamp(min=1)
    c = _chosen_rejected(lp)[0]
    return c * k, k.expand(c.shape)


def _cpo(loss_type):
    avg = loss_type in ("ipo", "simpo")

    def terms(lp, n, ref, labels, ctx, beta, label_smoothing, alpha, gamma):
        div = _avg_n(n) if avg else torch.ones_like(n)
        x = lp / div
        c, r = _chosen_rejected(x)
        logits = c - r
        if loss_type in ("sigmoid", "simpo"):
            loss, dz = _smoothed_logsigmoid(beta * (logits - (gamma / beta if loss_type == "simpo" else 0.0)),
                                            label_smoothing)
            dlogits = beta * dz
        elif loss_type == "hinge":
            loss = torch.relu(1 - beta * logits)
            dlogits = -beta * (1 - beta * logits > 0).to(logits.dtype)
        else:  # ipo
            loss = (logits - 1 / (2 * beta)) ** 2
            dlogits = 2 * (logits - 1 / (2 * beta))
        dc, dr = dlogits / _chosen_rejected(div)[0], -dlogits / _chosen_rejected(div)[1]
        if alpha != 0:
            nll, dnll = _nll_share(lp, ctx)
            loss, dc = loss + alpha * nll, dc + alpha * dnll
        return loss, beta * x, {}, _pair_grad(dc, dr)
    return terms


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, branching at -ln 2 to avoid cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo(lp, n, ref, labels, ctx, beta):
    div = _avg_n(n)
    x = lp / div
    c, r = _chosen_rejected(x)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    nll, dnll = _nll_share(lp, ctx)
    dlo = beta * (torch.sigmoid(log_odds) - 1)  # d(-beta logsigmoid(log_odds))
    dc, dr = dlo * (-1 / torch.expm1(c)), dlo * (1 / torch.expm1(r))  # d log_odds / d c = 1 / (1 - exp(c))
    dc, dr = dc / _chosen_rejected(div)[0] + dnll, dr / _chosen_rejected(div)[1]
    return nll - beta * ratio, beta * x, {"log_odds_ratio": ratio, "log_odds_chosen": log_odds}, _pair_grad(dc, dr)


def _kto(lp, n, ref, labels, ctx, beta, desirable_weight, undesirable_weight):
    ratio = lp - ref
    kl = ctx["kl"]
    good = labels.bool()
    z = torch.where(good, beta * (ratio - kl), beta * (kl - ratio))
    s = torch.sigmoid(z)
    w = torch.where(good, desirable_weight, undesirable_weight)
    # d(1 - sigmoid(z))/d ratio = -sigmoid'(z) dz/d ratio, dz/d ratio = beta (desirable), -beta (undesirable)
    grad = w * s * (1 - s) * torch.where(good, -beta, beta)
    return w * (1 - s), beta * ratio, {}, grad


# kind -> (formula, paired, the names of its float parameters in order)
SEQUENCE_LOSSES = {
    **{f"dpo_{t}": (_dpo(t), True, ("beta", "label_smoothing")) for t in ("sigmoid", "hinge", "ipo", "robust")},
    **{f"cpo_{t}": (_cpo(t), True, ("beta", "label_smoothing", "alpha", "gamma"))
       for t in ("sigmoid", "hinge", "ipo", "simpo")},
    "orpo": (_orpo, True, ("beta",)),
    "kto": (_kto, False, ("beta", "desirable_weight", "undesirable_weight")),
}


def sequence_loss_ctx(n: Tensor, paired: bool, kl: Tensor) -> dict:
    """The batch-wide values a formula reads (see SEQUENCE_LOSSES)."""
    groups = n.shape[0] // 2 if paired else n.shape[0]
    return {"n_groups": groups, "chosen_tokens": n[:groups].sum() if paired else n.sum(), "kl": kl}


def token_logps(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """log_softmax(logits)[target] per token (N, T), 0 where target is ignore_index."""
    keep = target != ignore_index
    lp = torch.gather(logits.log_softmax(-1), -1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    return lp * keep


def sequence_loss(kind: str, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                  ref_logps: Tensor, labels: Tensor, kl: Tensor, params, ignore_index: int = -100):
    """The unfused sequence loss: logits materialised, float32 for 16-bit inputs (as the fused op accumulates).
    Returns (loss, summed log-probabilities per sequence (N,))."""
    fn, paired, _ = SEQUENCE_LOSSES[kind]
    logits = F.linear(hidden, weight, bias).to(acc_dtype(hidden.dtype))
    lp = token_logps(logits, target, ignore_index).sum(-1)
    n = (target != ignore_index).sum(-1).to(lp.dtype)
    loss = fn(lp, n, ref_logps.to(lp.dtype), labels, sequence_loss_ctx(n, paired, kl), *params)[0].mean()
    return loss, lp


def grpo_token_loss(logps: Tensor, old_logps: Tensor, ref_logps: Optional[Tensor], advantages: Tensor,
                    mask: Tensor, beta: float, epsilon_low: float, epsilon_high: float, loss_type: str,
                    max_completion_length: int):
    """GRPO / PPO-clip on per-token log-probabilities (N, T) of the sampled tokens, TRL's token-level importance
    sampling: ratio = exp(logps - old_logps), loss_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)
    + beta (exp(ref - logps) - (ref - logps) - 1), normalised per loss_type ("grpo": token mean per sequence, then
    the mean over sequences; "bnpo": over every unmasked token; "dr_grpo": by N * max_completion_length).
    Returns (loss, per-token KL or None, per-token ratio)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    return loss, kl, ratio


def fused_linear_grpo_logps(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                            ignore_index: int = -100) -> Tensor:
    """Per-token log-probabilities of target on materialised logits (float32 for 16-bit inputs)."""
    return token_logps(F.linear(hidden, weight, bias).to(acc_dtype(hidden.dtype)), target, ignore_index)
# ---- losses (tritium.ops.losses): torch's own functions, and the written-out formulas of those torch lacks ----
mse_loss = F.mse_loss
l1_loss = F.l1_loss
smooth_l1_loss = F.smooth_l1_loss
huber_loss = F.huber_loss
binary_cross_entropy = F.binary_cross_entropy
binary_cross_entropy_with_logits = F.binary_cross_entropy_with_logits
soft_margin_loss = F.soft_margin_loss
hinge_embedding_loss = F.hinge_embedding_loss
margin_ranking_loss = F.margin_ranking_loss
multi_margin_loss = F.multi_margin_loss
multilabel_soft_margin_loss = F.multilabel_soft_margin_loss
triplet_margin_loss = F.triplet_margin_loss
cosine_embedding_loss = F.cosine_embedding_loss


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"{reduction} is not a valid value for reduction")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss, written out: ce (1 - p_t)^gamma, times alpha_t when alpha >= 0."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', "
                         f"'mean', 'sum'")
    return _reduce(loss, reduction)


def quantile_loss(input: Tensor, target: Tensor, quantiles, reduction: str = "mean") -> Tensor:
    """Pinball loss: e = target - input[..., q] (target of input's shape, or without the quantile dim),
    e >= 0 ? tau_q e : (tau_q - 1) e, reduced over every element."""
    tau = torch.as_tensor([float(q) for q in quantiles], dtype=input.dtype, device=input.device)
    if target.shape != input.shape:
        target = target.reshape(input.shape[:-1] + (1,))
    e = target - input
    return _reduce(torch.where(e >= 0, tau * e, (tau - 1) * e), reduction)


def contrastive_loss(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 1.0, eps: float = 1e-6,
                     reduction: str = "mean") -> Tensor:
    """Pairwise (Siamese) contrastive loss: d = pairwise_distance(input1, input2, eps) per row,
    loss = (target d^2 + (1 - target) max(margin - d, 0)^2) / 2 (target 1: a similar pair, 0: dissimilar)."""
    d = F.pairwise_distance(input1, input2, eps=eps)
    loss = 0.5 * (target * d * d + (1 - target) * torch.clamp(margin - d, min=0) ** 2)
    return _reduce(loss, reduction)


def info_nce(query: Tensor, key: Tensor, temperature: float = 0.1, symmetric: bool = True,
             negatives: Optional[Tensor] = None, normalize: bool = True, reduction: str = "mean") -> Tensor:
    """InfoNCE / CLIP-style contrastive loss, materialising the (N, N) logits: with q, k (and the explicit
    negatives n) L2-normalised when normalize, logits = q k^T / T (plus q n^T / T as extra columns), row i's
    positive is column i: loss_i = cross_entropy(logits_i, i); symmetric adds the key direction (the columns of
    q k^T: cross_entropy over the queries for each key) and averages the two."""
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        negatives = F.normalize(negatives, dim=-1) if negatives is not None else None
    sim = query @ key.t() / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    logits = sim if negatives is None else torch.cat([sim, query @ negatives.t() / temperature], 1)
    loss = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        loss = (loss + F.cross_entropy(sim.t(), labels, reduction="none")) / 2
    return _reduce(loss, reduction)


# ---- optimizer steps (tritium.ops.optim; the arguments of the ops adamw_step_ / sgd_step_) ----
def adamw_step_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, max_exp_avg_sqs: list,
                state_steps: list, params16: list, lr_tensor: Optional[Tensor], lr: float, beta1: float,
                beta2: float, weight_decay: float, eps: float, maximize: bool) -> None:
    """torch.optim's AdamW step (its single-tensor path) in place; state_steps are incremented. amsgrad when
    max_exp_avg_sqs is non-empty. With params16 (master weights), params are float32 copies, grads are widened
    to them, and each params16[i] receives params[i] rounded after the step."""
    from torch.optim.adam import adam

    adam(list(params), [g.to(p.dtype) for g, p in zip(grads, params)], list(exp_avgs), list(exp_avg_sqs),
         list(max_exp_avg_sqs), list(state_steps), foreach=False, capturable=False, differentiable=False,
         fused=False, has_complex=any(p.is_complex() for p in params), decoupled_weight_decay=True,
         amsgrad=len(max_exp_avg_sqs) > 0, beta1=beta1, beta2=beta2,
         lr=lr if lr_tensor is None else float(lr_tensor), weight_decay=weight_decay, eps=eps, maximize=maximize)
    for p16, p in zip(params16, params):
        p16.copy_(p)


def sgd_step_(params: list, grads: list, momentum_buffers: list, params16: list, lr_tensor: Optional[Tensor],
              lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              is_first_step: bool) -> None:
    """torch.optim's SGD step (its single-tensor path) in place. momentum_buffers (one per param when momentum
    != 0) are overwritten with the gradient on the first step (is_first_step), as torch.optim starts them.
    params16: as in adamw_step_."""
    lr = lr if lr_tensor is None else float(lr_tensor)
    for i, p in enumerate(params):
        g = grads[i].to(p.dtype)
        g = -g if maximize else g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if is_first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
    for p16, p in zip(params16, params):
        p16.copy_(p)


# ---- mixture of experts (tritium.ops.moe): the router, its losses and the eager loop over experts ----
def moe_route(x: Tensor, router_weight: Tensor, top_k: int, score: str, renormalize: bool):
    """The router of moe for x (tokens, D): (logits (tokens, E) in x's dtype, scores (tokens, E) in float32 (x's
    dtype if wider), top-k weights (tokens, k) in the scores' dtype, top-k expert indices (tokens, k))."""
    logits = F.linear(x, router_weight)
    lf = logits.to(acc_dtype(x.dtype))
    scores = torch.softmax(lf, -1) if score == "softmax" else torch.sigmoid(lf)
    topw, topi = scores.topk(top_k, dim=-1)
    if renormalize:
        topw = topw / topw.sum(-1, keepdim=True)
    return logits, scores, topw, topi


def moe_losses(logits: Tensor, scores: Tensor, topi: Tensor, num_experts: int, aux_loss_coef: float,
               z_loss_coef: float):
    """(aux_loss, z_loss) of moe: aux_loss_coef * E * sum_i f_i P_i, f_i the share of tokens routed to expert i
    (each of a token's k choices counted: sum_i f_i = k, Hugging Face Mixtral's), P_i the mean over tokens of the
    scores normalised to sum 1 per token; z_loss_coef * mean logsumexp(logits)^2. Both in the scores' dtype."""
    T = logits.shape[0]
    counts = F.one_hot(topi.reshape(-1), num_experts).sum(0).to(scores.dtype)
    p = scores / scores.sum(-1, keepdim=True)
    aux = aux_loss_coef * num_experts * (counts / T * p.mean(0)).sum()
    z = z_loss_coef * torch.logsumexp(logits.to(scores.dtype), -1).square().mean()
    return aux, z


def moe(x: Tensor, router_weight: Tensor, w13: Tensor, w2: Tensor, top_k: int, score: str = "softmax",
        renormalize: bool = True, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001):
    """tritium.moe as the usual eager loop over experts: (output, aux_loss, z_loss). Each expert takes the tokens
    routed to it (torch.where over the top-k indices), runs its SwiGLU MLP and adds its weighted output back with
    index_add_, all in x's dtype."""
    E, F2, D = w13.shape
    x2 = x.reshape(-1, D)
    logits, scores, topw, topi = moe_route(x2, router_weight, top_k, score, renormalize)
    aux, z = moe_losses(logits, scores, topi, E, aux_loss_coef, z_loss_coef)
    w = topw.to(x.dtype)
    y = torch.zeros_like(x2)
    for e in range(E):
        tok, slot = torch.where(topi == e)
        a = F.linear(x2[tok], w13[e])
        h = F.silu(a[:, :F2 // 2]) * a[:, F2 // 2:]
        y.index_add_(0, tok, F.linear(h, w2[e]) * w[tok, slot, None])
    return y.view(x.shape), aux, z


# ---- KAN spline term (ops/kan.py) ----
def kan_b_splines(x: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """efficient-kan's KANLinear.b_splines: x (N, in), grid (in, knots) -> (N, in, knots - 1 - order) B-spline
    bases by the Cox-de Boor recursion on the whole knot vector."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for k in range(1, spline_order + 1):
        bases = ((x - grid[:, :-(k + 1)]) / (grid[:, k:-1] - grid[:, :-(k + 1)]) * bases[:, :, :-1]
                 + (grid[:, k + 1:] - x) / (grid[:, k + 1:] - grid[:, 1:(-k)]) * bases[:, :, 1:])
    return bases


def kan_spline(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int = 3) -> Tensor:
    """(..., in) -> (..., out): efficient-kan's spline output F.linear(b_splines(x).view(N, -1), weight.view(out,
    -1)) with weight (out, in, knots - 1 - order)."""
    x2 = x.reshape(-1, x.shape[-1])
    bases = kan_b_splines(x2, grid.to(x.dtype), spline_order)
    y = F.linear(bases.reshape(x2.shape[0], bases.shape[1] * bases.shape[2]), weight.reshape(weight.shape[0], -1))
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- 2-D max pooling (ops/pooling.py): torch's own ----
max_pool2d = F.max_pool2d


# ---- WaveNet's gated activation (ops/wavenet.py) ----
def wavenet_gate(h: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """tanh(a) * sigmoid(g) over the two channel halves of h (batch, 2C, T), cond added to h first."""
    if cond is not None:
        h = h + cond
    a, g = h.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(g)


def _edge_dst(rowptr: Tensor, num_edges: int) -> Tensor:
    """The destination node of each edge of a CSR graph (rowptr by destination): row i repeated deg(i) times."""
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=rowptr.device), rowptr.diff(),
                                   output_size=num_edges)


def graph_aggregate(x: Tensor, rowptr: Tensor, col: Tensor, weight: Optional[Tensor] = None, reduce: str = "sum",
                    csc=None, dst: Optional[Tensor] = None) -> Tensor:
    """tritium.graph_aggregate as eager PyTorch writes message passing: the (edges, features) messages
    x[col] * weight, then index_add_ (sum, mean: over the edge count) or scatter_reduce amax into the
    destinations; a destination without edges gets 0. dst: each edge's destination (computed from rowptr when
    not given); csc: unused (the kernels' transpose)."""
    nd, E = rowptr.numel() - 1, col.numel()
    dst = _edge_dst(rowptr, E) if dst is None else dst
    msg = x[col] if weight is None else x[col] * weight[:, None]
    out = x.new_zeros(nd, x.shape[1])
    if reduce == "max":
        return out.scatter_reduce(0, dst[:, None].expand_as(msg), msg, "amax", include_self=False)
    out = out.index_add(0, dst, msg)
    if reduce == "mean":
        out = out / rowptr.diff().clamp(min=1).to(x.dtype)[:, None]
    return out


def gat_aggregate(x: Tensor, a_src: Tensor, a_dst: Tensor, rowptr: Tensor, col: Tensor, negative_slope: float = 0.2,
                  csc=None, dst: Optional[Tensor] = None) -> Tensor:
    """tritium.gat_aggregate in eager PyTorch (PyG's GATConv formulation): per edge and head the score
    leaky_relu(a_src[col] + a_dst[dst]), softmax over each destination's incoming edges (scatter amax, exp,
    index_add of the sums), then index_add_ of the (edges, heads, channels) messages alpha x[col]. x (Ns, H, C),
    a_src (Ns, H), a_dst (Nd, H) -> (Nd, H, C); a destination without edges gets 0."""
    nd, E, H = rowptr.numel() - 1, col.numel(), x.shape[1]
    dst = _edge_dst(rowptr, E) if dst is None else dst
    s = F.leaky_relu(a_src[col] + a_dst[dst], negative_slope)                           # (E, H)
    m = s.new_full((nd, H), float("-inf")).scatter_reduce(0, dst[:, None].expand_as(s), s.detach(), "amax")
    p = torch.exp(s - m[dst])
    den = s.new_zeros(nd, H).index_add(0, dst, p)
    alpha = p / den[dst]
    return x.new_zeros(nd, H, x.shape[2]).index_add(0, dst, alpha[:, :, None] * x[col])
