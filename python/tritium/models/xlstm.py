"""An xLSTM language model (mLSTM blocks, optionally sLSTM blocks) on tritium's ops, with its plain-PyTorch twin in
the same class.

    model = XLSTMLM(XLSTMConfig(vocab_size=256, d_model=256, n_layer=4, n_head=4))          # impl="tritium"
    twin = XLSTMLM(model.config, impl="torch"); twin.load_state_dict(model.state_dict())   # the reference twin
    logits = model(input_ids)                                   # (batch, L, vocab), differentiable
    tokens = model.generate(input_ids, max_new_tokens=20)       # constant-size recurrent state, no KV cache

The block is the pre-norm mLSTM block of NX-AI's xLSTM-7B ("xLSTM 7B: A Recurrent LLM for Fast and Efficient
Inference", 2025; ``xlstm.xlstm_large``), without its gate soft-capping:

    h = h + mlstm_layer(rms_norm(h));  h = h + ffn(rms_norm(h));  logits = emb^T rms_norm(h)    (tied head)
    mlstm_layer(x): q, k (H heads of qk_dim), v (H heads of v_dim) = linear(x); i, f = linear(x) + bias (per head);
                    h = mlstm(q, k, v, i, f) (tritium.ops.mlstm); h = rms_norm(h) per head * out_norm;
                    out = out_proj(sigmoid(ogate(x)) * h)
    ffn(x) = down(silu(gate(x)) * up(x))

At the layers listed in ``slstm_at`` the mLSTM layer is an sLSTM layer (the xLSTM paper's sLSTM block, without its
causal conv): wx = linear(x) (the four gates' input preactivations, with bias), h = slstm(wx, R) (tritium.ops.slstm,
R the per-head recurrent blocks), h = rms_norm(h) per head * out_norm, out = out_proj(h).

impl="tritium" runs the cell through ``tritium.mlstm`` (``tritium.mlstm_step`` when decoding), the norms through
``tritium.rms_norm`` and the gated unit through ``tritium.swiglu``; impl="torch" runs the recurrence step by step
(``tritium.ops.mlstm.mlstm_reference``) and torch's rms_norm and silu. The projections are torch's linear in both;
both have the same parameters, so state_dicts move between them.

Decoding keeps per layer the cell's state (C (batch, H, qk_dim, v_dim), n (batch, H, qk_dim), m (batch, H), float32;
float64 for a float64 model) in an ``XLSTMState``: ``prefill`` fills it from the prompt, ``step`` advances it by one
token in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tritium
from tritium import reference
from tritium.ops.mlstm import mlstm_reference
from tritium.ops.slstm import slstm_reference

from .ssm import RecurrentLM

IMPLS = ("tritium", "torch")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"XLSTMLM: impl must be one of {IMPLS}, got {impl!r}")


@dataclass
class XLSTMConfig:
    """The mLSTM LM's hyperparameters. qk_dim and v_dim are the per-head sizes (default: d_model / n_head / 2 and
    d_model / n_head, xLSTM-7B's qk_dim_factor 0.5 and v_dim_factor 1); d_ffn defaults to 8/3 d_model rounded up to
    a multiple of 64 (its ffn_proj_factor 2.667, ffn_round_up_to_multiple_of 64)."""
    vocab_size: int = 50304
    d_model: int = 512
    n_layer: int = 6
    n_head: int = 4
    qk_dim: Optional[int] = None
    v_dim: Optional[int] = None
    d_ffn: Optional[int] = None
    norm_eps: float = 1e-6
    cell_eps: float = 1e-6
    slstm_at: Tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "n_head"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"XLSTMConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"XLSTMConfig: d_model must be a multiple of n_head {self.n_head}, got {self.d_model}")
        hd = self.d_model // self.n_head
        defaults = {"qk_dim": max(1, hd // 2), "v_dim": hd, "d_ffn": -(-8 * self.d_model // 3 // 64) * 64}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"XLSTMConfig: {name} must be a positive int or None, got {getattr(self, name)!r}")
        self.slstm_at = tuple(self.slstm_at)
        bad = [j for j in self.slstm_at if not isinstance(j, int) or not 0 <= j < self.n_layer]
        if bad:
            raise ValueError(f"XLSTMConfig: slstm_at must hold layer indices in [0, {self.n_layer}), got {bad[0]!r}")


@dataclass
class XLSTMState:
    """The recurrent state of a batch being decoded, the same size at every length: per layer the mLSTM cell's
    C (batch, H, qk_dim, v_dim), n (batch, H, qk_dim) and m (batch, H) (unused at sLSTM layers), and per sLSTM
    layer its (h, c, n, m) (batch, d_model) each. ``XLSTMLM.step`` updates them in place."""
    C: Tensor   # (n_layer, batch, H, qk_dim, v_dim)
    n: Tensor   # (n_layer, batch, H, qk_dim)
    m: Tensor   # (n_layer, batch, H)
    s: Tensor   # (len(slstm_at), 4, batch, d_model): the sLSTM layers' h, c, n, m

    @property
    def batch(self) -> int:
        return self.C.shape[1]

    @property
    def nbytes(self) -> int:
        return self.C.nbytes + self.n.nbytes + self.m.nbytes + self.s.nbytes


class MLSTMLayer(nn.Module):
    """The mLSTM layer (xLSTM-7B's mLSTMLayer with its parameter names, no soft-capping)."""

    def __init__(self, c: XLSTMConfig, impl: str):
        super().__init__()
        self.impl, self.H, self.dk, self.dv, self.eps, self.cell_eps = impl, c.n_head, c.qk_dim, c.v_dim, \
            c.norm_eps, c.cell_eps
        C, H = c.d_model, c.n_head
        self.q = nn.Linear(C, H * c.qk_dim, bias=False)
        self.k = nn.Linear(C, H * c.qk_dim, bias=False)
        self.v = nn.Linear(C, H * c.v_dim, bias=False)
        self.ogate_preact = nn.Linear(C, H * c.v_dim, bias=False)
        self.igate_preact = nn.Linear(C, H, bias=True)
        self.fgate_preact = nn.Linear(C, H, bias=True)
        self.multihead_norm = nn.Parameter(torch.ones(H * c.v_dim))
        self.out_proj = nn.Linear(H * c.v_dim, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self, c: XLSTMConfig) -> None:
        """xLSTM-7B's: small init (std sqrt(2 / (5 d))) for the projections, the output projection's scaled by
        2 / n_layer, input gates biased to -10 with zero weights, forget gates to linspace(3, 6) over the heads."""
        std = math.sqrt(2 / (5 * c.d_model))
        for lin in (self.q, self.k, self.v, self.ogate_preact):
            nn.init.normal_(lin.weight, 0.0, std)
        nn.init.normal_(self.out_proj.weight, 0.0, 2 / c.n_layer * std)
        self.igate_preact.weight.zero_()
        self.igate_preact.bias.fill_(-10.0)
        self.fgate_preact.weight.zero_()
        self.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, c.n_head))
        self.multihead_norm.fill_(1.0)

    def _head_norm(self, h: Tensor) -> Tensor:
        """(..., H, v_dim) -> each head rms-normalised, times multihead_norm, flattened to (..., H * v_dim)."""
        fn = tritium.rms_norm if self.impl == "tritium" else reference.rms_norm
        y = fn(h, (self.dv,), None, self.eps)
        return y.flatten(-2) * self.multihead_norm

    def forward(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). With state (C, n, m) given (prefill) the sequence starts from it and it is
        overwritten with the one after the sequence."""
        B, T, _ = x.shape
        H = self.H
        q = self.q(x).view(B, T, H, self.dk).transpose(1, 2)
        k = self.k(x).view(B, T, H, self.dk).transpose(1, 2)
        v = self.v(x).view(B, T, H, self.dv).transpose(1, 2)
        i, f = self.igate_preact(x).transpose(1, 2), self.fgate_preact(x).transpose(1, 2)
        cell = tritium.mlstm if self.impl == "tritium" else mlstm_reference
        h, last = cell(q, k, v, i, f, eps=self.cell_eps, initial_state=state, output_final_state=state is not None)
        if state is not None:
            for dst, src in zip(state, last):
                dst.copy_(src)
        h = self._head_norm(h.transpose(1, 2))
        return self.out_proj(torch.sigmoid(self.ogate_preact(x)) * h)

    def step(self, x: Tensor, state: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """One token: x (B, C) -> (B, C), the state (C, n, m) advanced in place. The tritium impl runs mlstm_step;
        the twin the recurrence on the one-token sequence."""
        if self.impl != "tritium":
            return self.forward(x[:, None], state)[:, 0]
        B = x.shape[0]
        q, k = self.q(x).view(B, self.H, self.dk), self.k(x).view(B, self.H, self.dk)
        v = self.v(x).view(B, self.H, self.dv)
        h, new = tritium.mlstm_step(q, k, v, self.igate_preact(x), self.fgate_preact(x), state, eps=self.cell_eps)
        for dst, src in zip(state, new):
            dst.copy_(src)
        return self.out_proj(torch.sigmoid(self.ogate_preact(x)) * self._head_norm(h))


class SLSTMLayer(nn.Module):
    """The sLSTM layer: wx = gates(x) (4 d_model, [i | f | z | o], with bias), h = slstm(wx, R), a per-head
    rms_norm times out_norm, out_proj."""

    def __init__(self, c: XLSTMConfig, impl: str):
        super().__init__()
        self.impl, self.H, self.dh, self.eps = impl, c.n_head, c.d_model // c.n_head, c.norm_eps
        C = c.d_model
        self.gates = nn.Linear(C, 4 * C, bias=True)
        self.R = nn.Parameter(torch.empty(4, c.n_head, self.dh, self.dh))
        self.multihead_norm = nn.Parameter(torch.ones(C))
        self.out_proj = nn.Linear(C, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self, c: XLSTMConfig) -> None:
        """Small init for the projections, R zero (the paper's), forget-gate biases linspace(3, 6) over the
        channels, the other biases zero."""
        std = math.sqrt(2 / (5 * c.d_model))
        nn.init.normal_(self.gates.weight, 0.0, std)
        nn.init.normal_(self.out_proj.weight, 0.0, 2 / c.n_layer * std)
        self.R.zero_()
        self.gates.bias.zero_()
        self.gates.bias[c.d_model:2 * c.d_model].copy_(torch.linspace(3.0, 6.0, c.d_model))
        self.multihead_norm.fill_(1.0)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); state (4, B, C) (h, c, n, m), when given, is the start and is overwritten with
        the state after the sequence."""
        B, T, C = x.shape
        init = None if state is None else tuple(state)
        if self.impl == "tritium":
            h, last = tritium.slstm(self.gates(x), self.R, init, state is not None)
        else:
            h, last = slstm_reference(self.gates(x), self.R, init, state is not None)
        if state is not None:
            for dst, src in zip(state, last):
                dst.copy_(src)
        fn = tritium.rms_norm if self.impl == "tritium" else reference.rms_norm
        h = fn(h.view(B, T, self.H, self.dh), (self.dh,), None, self.eps).flatten(-2) * self.multihead_norm
        return self.out_proj(h)

    def step(self, x: Tensor, state: Tensor) -> Tensor:
        return self.forward(x[:, None], state)[:, 0]


class FeedForward(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, c: XLSTMConfig, impl: str):
        super().__init__()
        self.impl = impl
        self.proj_up_gate = nn.Linear(c.d_model, c.d_ffn, bias=False)
        self.proj_up = nn.Linear(c.d_model, c.d_ffn, bias=False)
        self.proj_down = nn.Linear(c.d_ffn, c.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, c: XLSTMConfig) -> None:
        std = math.sqrt(2 / (5 * c.d_model))
        nn.init.normal_(self.proj_up_gate.weight, 0.0, std)
        nn.init.normal_(self.proj_up.weight, 0.0, std)
        nn.init.normal_(self.proj_down.weight, 0.0, 2 / c.n_layer * std)

    def forward(self, x: Tensor) -> Tensor:
        fn = tritium.swiglu if self.impl == "tritium" else reference.swiglu
        return self.proj_down(fn(self.proj_up_gate(x), self.proj_up(x)))


class Block(nn.Module):
    """h + mlstm_layer(norm_mlstm(h)), then h + ffn(norm_ffn(h))."""

    def __init__(self, c: XLSTMConfig, impl: str, slstm: bool = False):
        super().__init__()
        self.impl, self.eps, self.slstm = impl, c.norm_eps, slstm
        self.norm_mlstm = nn.Parameter(torch.ones(c.d_model))
        self.mlstm_layer = SLSTMLayer(c, impl) if slstm else MLSTMLayer(c, impl)
        self.norm_ffn = nn.Parameter(torch.ones(c.d_model))
        self.ffn = FeedForward(c, impl)

    def norm(self, x: Tensor, weight: Tensor) -> Tensor:
        fn = tritium.rms_norm if self.impl == "tritium" else reference.rms_norm
        return fn(x, (x.shape[-1],), weight, self.eps)

    def forward(self, h: Tensor, state=None) -> Tensor:
        h = h + self.mlstm_layer(self.norm(h, self.norm_mlstm), state)
        return h + self.ffn(self.norm(h, self.norm_ffn))

    def step(self, h: Tensor, state) -> Tensor:
        h = h + self.mlstm_layer.step(self.norm(h, self.norm_mlstm), state)
        return h + self.ffn(self.norm(h, self.norm_ffn))


class XLSTMLM(RecurrentLM):
    """xLSTM (mLSTM blocks) language model: ``model(input_ids (batch, L))`` -> logits (batch, L, vocab);
    ``prefill`` / ``step`` / ``generate`` decode with an XLSTMState.

    impl: "tritium" (tritium's ops) or "torch" (the step-by-step recurrence and torch's norms: the plain-PyTorch
    twin). Parameter names follow xLSTM-7B's (embedding.weight, blocks.{i}.norm_mlstm, blocks.{i}.mlstm_layer.{q,
    k, v, ogate_preact, igate_preact, fgate_preact, multihead_norm, out_proj}, blocks.{i}.norm_ffn,
    blocks.{i}.ffn.{proj_up_gate, proj_up, proj_down}, out_norm; at sLSTM layers blocks.{i}.mlstm_layer.{gates, R,
    multihead_norm, out_proj}); the head is the embedding (tied)."""

    def __init__(self, config: XLSTMConfig, impl: str = "tritium"):
        super().__init__()
        _check_impl(impl)
        self.config, self.impl = config, impl
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, impl, j in config.slstm_at) for j in range(config.n_layer))
        self.out_norm = nn.Parameter(torch.ones(config.d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        nn.init.normal_(self.embedding.weight, 0.0, math.sqrt(2 / (5 * c.d_model)))
        for block in self.blocks:
            block.mlstm_layer.reset_parameters(c)
            block.ffn.reset_parameters(c)
            block.norm_mlstm.fill_(1.0)
            block.norm_ffn.fill_(1.0)
        self.out_norm.fill_(1.0)

    def _logits(self, h: Tensor) -> Tensor:
        logits = F.linear(self.blocks[0].norm(h, self.out_norm), self.embedding.weight)
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def _check_ids(self, input_ids: Tensor, what: str, dims: int) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != dims or input_ids.is_floating_point():
            shape = "(batch, L)" if dims == 2 else "(batch,)"
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"XLSTMLM.{what}: token ids must be an integer tensor {shape}, got {got}")

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (batch, L) -> logits (batch, L, vocab). Differentiable in every parameter."""
        self._check_ids(input_ids, "forward", 2)
        h = self.embedding(input_ids)
        for block in self.blocks:
            h = block(h)
        return self._logits(h)

    # ---- decoding with the recurrent state ----
    def new_state(self, batch: int) -> XLSTMState:
        """A zero state for `batch` sequences (what the model has before any token)."""
        c, w = self.config, self.embedding.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        z = dict(dtype=acc, device=w.device)
        s = torch.zeros(len(c.slstm_at), 4, batch, c.d_model, **z)
        s[:, 3] = float("-inf")   # the sLSTM's m before any token (its first m is the input gate)
        return XLSTMState(torch.zeros(c.n_layer, batch, c.n_head, c.qk_dim, c.v_dim, **z),
                          torch.zeros(c.n_layer, batch, c.n_head, c.qk_dim, **z),
                          torch.zeros(c.n_layer, batch, c.n_head, **z), s)

    def _layer_state(self, state: XLSTMState, j: int):
        """Block j's part of the state: the sLSTM's (4, batch, C) or the mLSTM's (C, n, m)."""
        if self.blocks[j].slstm:
            return state.s[self.config.slstm_at.index(j)]
        return state.C[j], state.n[j], state.m[j]

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, last_only: bool = False) -> Tuple[Tensor, XLSTMState]:
        """Run the prompts input_ids (batch, L), L >= 1, and return (logits, state): logits (batch, L, vocab)
        ((batch, vocab) of the last position with last_only) and the XLSTMState after the prompts."""
        self._check_ids(input_ids, "prefill", 2)
        if input_ids.shape[1] == 0:
            raise ValueError("XLSTMLM.prefill: the prompt must have at least one token")
        state = self.new_state(input_ids.shape[0])
        h = self.embedding(input_ids)
        for j, block in enumerate(self.blocks):
            h = block(h, self._layer_state(state, j))
        return self._logits(h[:, -1] if last_only else h), state

    @torch.no_grad()
    def step(self, token_ids: Tensor, state: XLSTMState) -> Tensor:
        """Feed one token per sequence, token_ids (batch,), and return the next-token logits (batch, vocab);
        the state advances in place (its size does not change)."""
        self._check_ids(token_ids, "step", 1)
        if token_ids.shape[0] != state.batch:
            raise ValueError(f"XLSTMLM.step: {token_ids.shape[0]} tokens for a state of batch {state.batch}")
        h = self.embedding(token_ids)
        for j, block in enumerate(self.blocks):
            h = block.step(h, self._layer_state(state, j))
        return self._logits(h)


__all__ = ["XLSTMConfig", "XLSTMLM", "XLSTMState", "IMPLS"]
