"""An RWKV-7 "Goose" language model on tritium's ops, with its plain-PyTorch twin in the same class.

    model = RWKV7LM(RWKV7Config(vocab_size=256, d_model=256, n_layer=4))              # impl="tritium"
    twin = RWKV7LM(model.config, impl="torch"); twin.load_state_dict(model.state_dict())   # the reference twin
    logits = model(input_ids)                                   # (batch, L, vocab), differentiable
    tokens = model.generate(input_ids, max_new_tokens=20)       # constant-size recurrent state, no KV cache

The architecture is BlinkDL's RWKV-7 (RWKV-LM's ``RWKV_Tmix_x070`` / ``RWKV_CMix_x070``; flash-linear-attention's
``RWKV7Attention`` / ``RWKV7FeedForward`` are the same model), with BlinkDL's parameter names:

    h = ln0(emb(ids))                                              (layer 0 only)
    h = h + time_mix(ln1(h));  h = h + channel_mix(ln2(h))         (per layer)
    logits = head(ln_out(h))

time mix, on x (batch, L, C) with xx = shift(x) - x (shift: the previous token's x, zeros before the first):
    x_? = x + xx * mu_?            for ? in r, w, k, v, a, g          (token shift, one mix vector each)
    r, k, v = receptance(x_r), key(x_k), value(x_v)
    w = -exp(-0.5) * sigmoid(w0 + tanh(x_w W1) W2)    the log of the decay, in (-exp(-0.5), 0) (BlinkDL's
                                                       exp(-exp(-softplus(-(...)) - 0.5)) decay, fla's form)
    v = v + (v_first - v) * sigmoid(v0 + x_v V1 V2)   (layers > 0: the value residual to layer 0's v)
    a = sigmoid(a0 + x_a A1 A2)                        (the in-context learning rate)
    g = sigmoid(x_g G1) G2                             (the output gate)
    kk = l2-normalise(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    o = wkv7(r, w, k, v, -kk, kk * a, scale 1)         (per head: S_t = S_{t-1} (diag(e^w) - kk^T (a kk)) + v^T k)
    o = group_norm(o, heads) + ((r * k * r_k).sum per head) * v
    out = output(o * g)
channel mix: k = x + xx * mu_k; out = value(relu(key(k)) ** 2).

The low-rank (LoRA-style) pairs W1 W2, A1 A2, V1 V2, G1 G2 have BlinkDL's default ranks (``RWKV7Config``).

impl="tritium" runs the wkv recurrence through ``tritium.wkv7`` (``tritium.wkv7_step`` when decoding) and the
layer and group norms through ``tritium.layer_norm`` / ``tritium.group_norm``; impl="torch" runs the naive
recurrence (``tritium.ops.wkv.wkv7_reference``, a loop over time in torch ops: fla's naive RWKV-7 reference) and
torch's norms. The projections are torch's linear in both. Both have the same parameters, so state_dicts move
between them.

Decoding keeps per layer the time mix's and the channel mix's previous token (batch, C) each and the wkv state
(batch, heads, head_size, head_size) (float32; float64 for a float64 model) in an ``RWKV7State``: ``prefill`` fills
it from the prompt, ``step`` advances it by one token in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tritium
from tritium.ops.wkv import wkv7_reference

from .ssm import RecurrentLM

IMPLS = ("tritium", "torch")
_DECAY_SCALE = math.exp(-0.5)   # BlinkDL's soft clamp of the log-log decay to (-inf, -0.5)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"RWKV7LM: impl must be one of {IMPLS}, got {impl!r}")


def _lora_rank(C: int, factor: float, power: float) -> int:
    """BlinkDL's default ranks: max(32, round(factor * C ** power / 32) * 32)."""
    return max(32, int(round(factor * C ** power / 32)) * 32)


@dataclass
class RWKV7Config:
    """RWKV-7's hyperparameters. d_model = n_head * head_size; d_ffn defaults to 4 * d_model; the low-rank sizes
    default to BlinkDL's (decay and a: 1.8 sqrt(C), v: 1.3 sqrt(C), gate: 0.6 C^0.8, rounded to multiples of 32,
    at least 32). group_norm_eps defaults to head_size * 1e-5 (BlinkDL's 1e-5 * head_size_divisor ** 2 at
    head size 64, fla's head_dim * norm_eps)."""
    vocab_size: int = 65536
    d_model: int = 768
    n_layer: int = 12
    head_size: int = 64
    d_ffn: Optional[int] = None
    decay_rank: Optional[int] = None
    a_rank: Optional[int] = None
    v_rank: Optional[int] = None
    gate_rank: Optional[int] = None
    norm_eps: float = 1e-5
    group_norm_eps: Optional[float] = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "head_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RWKV7Config: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.head_size:
            raise ValueError(f"RWKV7Config: d_model must be a multiple of head_size {self.head_size}, "
                             f"got {self.d_model}")
        C = self.d_model
        defaults = {"d_ffn": 4 * C, "decay_rank": _lora_rank(C, 1.8, 0.5), "a_rank": _lora_rank(C, 1.8, 0.5),
                    "v_rank": _lora_rank(C, 1.3, 0.5), "gate_rank": _lora_rank(C, 0.6, 0.8)}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RWKV7Config: {name} must be a positive int or None, got {getattr(self, name)!r}")
        if self.group_norm_eps is None:
            self.group_norm_eps = self.head_size * 1e-5

    @property
    def n_head(self) -> int:
        return self.d_model // self.head_size


@dataclass
class RWKV7State:
    """The recurrent state of a batch being decoded, the same size at every length: per layer i, att_shift[i] and
    ffn_shift[i] (batch, C), the previous token's input of the time mix and the channel mix (the model's dtype),
    and wkv[i] (batch, heads, head_size, head_size), the wkv state (float32; float64 for a float64 model).
    ``RWKV7LM.step`` updates all three in place."""
    att_shift: Tensor   # (n_layer, batch, C)
    ffn_shift: Tensor   # (n_layer, batch, C)
    wkv: Tensor         # (n_layer, batch, H, N, N)

    @property
    def batch(self) -> int:
        return self.wkv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.att_shift.nbytes + self.ffn_shift.nbytes + self.wkv.nbytes


def _shift(x: Tensor, prev: Optional[Tensor]) -> Tensor:
    """x (batch, L, C) -> the previous token's x at every position: prev (batch, C) (zeros if None) first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], 1)


def _ortho(shape: Tuple[int, int], scale: float) -> Tensor:
    """BlinkDL's ortho_init: an orthogonal matrix with gain scale * sqrt(max(rows / cols, 1))."""
    w = torch.empty(shape)
    nn.init.orthogonal_(w, gain=scale * math.sqrt(max(shape[0] / shape[1], 1.0)))
    return w


class TimeMix(nn.Module):
    """RWKV-7's time mix (BlinkDL's RWKV_Tmix_x070), with its parameter names and shapes."""

    def __init__(self, c: RWKV7Config, layer_id: int, impl: str):
        super().__init__()
        C, H, N = c.d_model, c.n_head, c.head_size
        self.layer_id, self.impl, self.n_head, self.head_size = layer_id, impl, H, N
        self.gn_eps = c.group_norm_eps
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.w1 = nn.Parameter(torch.empty(C, c.decay_rank))
        self.w2 = nn.Parameter(torch.empty(c.decay_rank, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, c.a_rank))
        self.a2 = nn.Parameter(torch.empty(c.a_rank, C))
        if layer_id > 0:   # the value residual: layer 0's v is v_first itself
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, c.v_rank))
            self.v2 = nn.Parameter(torch.empty(c.v_rank, C))
        self.g1 = nn.Parameter(torch.empty(C, c.gate_rank))
        self.g2 = nn.Parameter(torch.empty(c.gate_rank, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=c.group_norm_eps)

    @torch.no_grad()
    def reset_parameters(self, c: RWKV7Config) -> None:
        """BlinkDL's initialisation (RWKV-LM's RWKV-v7 train_temp)."""
        C, L, i = c.d_model, c.n_layer, self.layer_id
        ratio_0_to_1 = i / max(L - 1, 1)
        ratio_1_to_almost0 = 1.0 - i / L
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - ddd.pow(p * ratio_1_to_almost0))
        n = torch.arange(C, dtype=torch.float32)
        decay_speed = -7 + 5 * (n / max(C - 1, 1)) ** (0.85 + 1.0 * ratio_0_to_1 ** 0.5)
        self.w0.copy_(decay_speed.view(1, 1, C) + 0.5)
        self.w1.zero_()
        self.w2.copy_(_ortho(tuple(self.w2.shape), 0.1))
        self.a0.zero_()
        self.a1.zero_()
        self.a2.copy_(_ortho(tuple(self.a2.shape), 0.1))
        if self.layer_id > 0:
            self.v0.fill_(1.0)
            self.v1.zero_()
            self.v2.copy_(_ortho(tuple(self.v2.shape), 0.1))
        self.g1.zero_()
        self.g2.copy_(_ortho(tuple(self.g2.shape), 0.1))
        self.k_k.fill_(0.85)
        self.k_a.fill_(1.0)
        self.r_k.zero_()
        bound = C ** -0.5
        nn.init.uniform_(self.receptance.weight, -0.5 * bound, 0.5 * bound)
        nn.init.uniform_(self.key.weight, -0.05 * bound, 0.05 * bound)
        nn.init.uniform_(self.value.weight, -0.5 * bound, 0.5 * bound)
        self.output.weight.zero_()
        self.ln_x.reset_parameters()

    def _wkv(self, r, w, k, v, a, b, state: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """(B, T, H, N) each -> (o (B, T, H, N), the final state if a state was given)."""
        if self.impl == "tritium":
            return tritium.wkv7(r, w, k, v, a, b, scale=1.0, initial_state=state,
                                output_final_state=state is not None)
        return wkv7_reference(r, w, k, v, a, b, scale=1.0, initial_state=state, output_final_state=state is not None)

    def _group_norm(self, o: Tensor) -> Tensor:
        """Each head's output normalised on its own (nn.GroupNorm with a group per head): (rows, C) -> (rows, C)."""
        fn = tritium.group_norm if self.impl == "tritium" else F.group_norm
        return fn(o, self.n_head, self.ln_x.weight, self.ln_x.bias, self.gn_eps)

    def forward(self, x: Tensor, v_first: Optional[Tensor], shift: Optional[Tensor] = None,
                state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x (B, T, C) -> (out (B, T, C), v_first (B, T, C)). With shift (B, C) and state (B, H, N, N) given
        (prefill, or one decoding step with T = 1) the sequence starts from them and they are overwritten with
        the ones after it."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shift(x, shift) - x
        if shift is not None:
            shift.copy_(x[:, -1])
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, mu) for mu in
                                  (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w = -_DECAY_SCALE * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        heads = [t.view(B, T, H, N) for t in (r, w, k, v)]
        o, last = self._wkv(*heads, -kk, kk * a.view(B, T, H, N), state)
        if state is not None:
            state.copy_(last)
        o = self._group_norm(o.reshape(B * T, C)).view(B, T, C)
        rk = (heads[0] * heads[2] * self.r_k).sum(-1, keepdim=True)          # (B, T, H, 1)
        o = o + (rk * heads[3]).view(B, T, C)
        return self.output(o * g), v_first

    def step(self, x: Tensor, v_first: Optional[Tensor], shift: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One token: x (B, C) -> (out (B, C), v_first (B, C)), shift and state advanced in place. The tritium
        impl runs wkv7_step; the twin the naive recurrence on the one-token sequence."""
        if self.impl != "tritium":
            out, v_first = self.forward(x[:, None], None if v_first is None else v_first[:, None], shift, state)
            return out[:, 0], v_first[:, 0]
        B, C = x.shape
        H, N = self.n_head, self.head_size
        xx = shift.to(x.dtype) - x
        shift.copy_(x)
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, mu.view(1, C)) for mu in
                                  (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w = -_DECAY_SCALE * torch.sigmoid(self.w0.view(1, C) + torch.tanh(xw @ self.w1) @ self.w2)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0.view(1, C) + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0.view(1, C) + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k.view(1, C)).view(B, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a.view(1, C))
        heads = [t.view(B, H, N) for t in (r, w, k, v)]
        o, new = tritium.wkv7_step(*heads, -kk, kk * a.view(B, H, N), state, scale=1.0)
        state.copy_(new)
        o = self._group_norm(o.reshape(B, C))
        o = o + ((heads[0] * heads[2] * self.r_k).sum(-1, keepdim=True) * heads[3]).view(B, C)
        return self.output(o * g), v_first


class ChannelMix(nn.Module):
    """RWKV-7's channel mix (BlinkDL's RWKV_CMix_x070): value(relu(key(x + xx * x_k)) ** 2)."""

    def __init__(self, c: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.empty(1, 1, c.d_model))
        self.key = nn.Linear(c.d_model, c.d_ffn, bias=False)
        self.value = nn.Linear(c.d_ffn, c.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, c: RWKV7Config) -> None:
        C = c.d_model
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_k.copy_(1.0 - ddd.pow((1.0 - self.layer_id / c.n_layer) ** 4))
        nn.init.uniform_(self.key.weight, -0.5 * C ** -0.5, 0.5 * C ** -0.5)
        self.value.weight.zero_()

    def forward(self, x: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        """x (B, T, C) or one token (B, C) (then shift is required); shift (B, C) is overwritten with the last
        token's x when given."""
        if x.dim() == 2:
            xx = shift.to(x.dtype) - x
            shift.copy_(x)
            k = torch.addcmul(x, xx, self.x_k.view(1, -1))
        else:
            xx = _shift(x, shift) - x
            if shift is not None:
                shift.copy_(x[:, -1])
            k = torch.addcmul(x, xx, self.x_k)
        return self.value(torch.relu(self.key(k)).square())


class Block(nn.Module):
    """[ln0 (layer 0)] h + att(ln1(h)), then h + ffn(ln2(h))."""

    def __init__(self, c: RWKV7Config, layer_id: int, impl: str):
        super().__init__()
        self.layer_id, self.impl = layer_id, impl
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.ln1 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.ln2 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.att = TimeMix(c, layer_id, impl)
        self.ffn = ChannelMix(c, layer_id)

    def ln(self, norm: nn.LayerNorm, x: Tensor) -> Tensor:
        fn = tritium.layer_norm if self.impl == "tritium" else F.layer_norm
        return fn(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def forward(self, h: Tensor, v_first: Optional[Tensor], att_shift: Optional[Tensor] = None,
                ffn_shift: Optional[Tensor] = None, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.layer_id == 0:
            h = self.ln(self.ln0, h)
        out, v_first = self.att(self.ln(self.ln1, h), v_first, att_shift, state)
        h = h + out
        return h + self.ffn(self.ln(self.ln2, h), ffn_shift), v_first

    def step(self, h: Tensor, v_first: Optional[Tensor], att_shift: Tensor, ffn_shift: Tensor,
             state: Tensor) -> Tuple[Tensor, Tensor]:
        if self.layer_id == 0:
            h = self.ln(self.ln0, h)
        out, v_first = self.att.step(self.ln(self.ln1, h), v_first, att_shift, state)
        h = h + out
        return h + self.ffn(self.ln(self.ln2, h), ffn_shift), v_first


class RWKV7LM(RecurrentLM):
    """RWKV-7 language model: ``model(input_ids (batch, L))`` -> logits (batch, L, vocab); ``prefill`` / ``step`` /
    ``generate`` decode with an RWKV7State.

    impl: "tritium" (tritium's ops) or "torch" (the naive recurrence and torch's norms: the plain-PyTorch twin).
    Parameter names are BlinkDL's (emb.weight, blocks.{i}.ln0/ln1/ln2, blocks.{i}.att.{x_r, ..., w0, w1, w2, a0,
    a1, a2, v0, v1, v2, g1, g2, k_k, k_a, r_k, receptance, key, value, output, ln_x}, blocks.{i}.ffn.{x_k, key,
    value}, ln_out, head); layer 0 has no v0/v1/v2 (its value residual is the identity)."""

    def __init__(self, config: RWKV7Config, impl: str = "tritium"):
        super().__init__()
        _check_impl(impl)
        self.config, self.impl = config, impl
        self.emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i, impl) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BlinkDL's initialisation: the embedding U(+-1e-4) (ln0 normalises it), the head orthogonal with gain
        0.5 sqrt(max(vocab / C, 1)), the blocks' (TimeMix / ChannelMix.reset_parameters), the norms 1 and 0."""
        c = self.config
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        self.head.weight.copy_(_ortho((c.vocab_size, c.d_model), 0.5))
        for block in self.blocks:
            block.att.reset_parameters(c)
            block.ffn.reset_parameters(c)
            for m in block.modules():
                if isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
        self.ln_out.reset_parameters()

    def _logits(self, h: Tensor) -> Tensor:
        h = self.blocks[0].ln(self.ln_out, h)
        logits = self.head(h)
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (batch, L) -> logits (batch, L, vocab). Differentiable in every parameter."""
        self._check_ids(input_ids, "forward", 2)
        h, v_first = self.emb(input_ids), None
        for block in self.blocks:
            h, v_first = block(h, v_first)
        return self._logits(h)

    # ---- decoding with the recurrent state ----
    def new_state(self, batch: int) -> RWKV7State:
        """A zero state for `batch` sequences (what the model has before any token)."""
        c, w = self.config, self.head.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        shift = torch.zeros(c.n_layer, batch, c.d_model, dtype=w.dtype, device=w.device)
        wkv = torch.zeros(c.n_layer, batch, c.n_head, c.head_size, c.head_size, dtype=acc, device=w.device)
        return RWKV7State(shift, shift.clone(), wkv)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, last_only: bool = False) -> Tuple[Tensor, RWKV7State]:
        """Run the prompts input_ids (batch, L), L >= 1, and return (logits, state): logits (batch, L, vocab)
        ((batch, vocab) of the last position with last_only) and the RWKV7State after the prompts."""
        self._check_ids(input_ids, "prefill", 2)
        if input_ids.shape[1] == 0:
            raise ValueError("RWKV7LM.prefill: the prompt must have at least one token")
        state = self.new_state(input_ids.shape[0])
        h, v_first = self.emb(input_ids), None
        for i, block in enumerate(self.blocks):
            h, v_first = block(h, v_first, state.att_shift[i], state.ffn_shift[i], state.wkv[i])
        return self._logits(h[:, -1] if last_only else h), state

    @torch.no_grad()
    def step(self, token_ids: Tensor, state: RWKV7State) -> Tensor:
        """Feed one token per sequence, token_ids (batch,), and return the next-token logits (batch, vocab);
        the state advances in place (its size does not change)."""
        self._check_ids(token_ids, "step", 1)
        if token_ids.shape[0] != state.batch:
            raise ValueError(f"RWKV7LM.step: {token_ids.shape[0]} tokens for a state of batch {state.batch}")
        h, v_first = self.emb(token_ids), None
        for i, block in enumerate(self.blocks):
            h, v_first = block.step(h, v_first, state.att_shift[i], state.ffn_shift[i], state.wkv[i])
        return self._logits(h)


__all__ = ["RWKV7Config", "RWKV7LM", "RWKV7State", "IMPLS"]
