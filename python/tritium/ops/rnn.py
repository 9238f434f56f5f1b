"""LSTM, GRU and the Elman RNN: fused cell ops, the scan through time with its backward, and the layer stack.

A layer-direction runs as: the input projection for every time step in ONE matmul up front
(x @ W_ih^T + b, shape (T, B, G*H)); then per step the recurrent matmul h @ W_hh^T (a matmul, as it must be)
followed by ONE fused cell pass (gate nonlinearities, cell update and output; the ops ``tritium::lstm_cell_fwd``
/ ``gru_cell_fwd`` are one step, ``lstm_scan_fwd`` / ``gru_scan_fwd`` loop the steps in C++ (CPU) or launch
the Triton cell kernel per step (GPU), writing straight into the (T, B, .) outputs). Backward through time runs
the fused cell backward kernel per step and carries dh through W_hh; the weight gradient
dW_hh = sum_t dG_t^T h_{t-1} is ONE matmul over all steps at the end (torch's autograd does one small matmul per
step), and dW_ih, db and dx are one matmul (or sum) each in the projection's backward. On CPU the per-step
recurrent products are rowgemm's register tiles (csrc/rowgemm.h: no per-call packing of W_hh, which at a
step's few rows is most of what BLAS would do) and the projection's large outputs come from tritium's pool.

The Elman RNN (torch.nn.RNN: h' = tanh or relu of x W_ih^T + b_ih + h W_hh^T + b_hh) runs the same way: both
biases folded into the projection, per step the recurrent product written straight into h_t and the activation
applied there (``rnn_scan_fwd``); backward dP_t = dh_t * act'(h_t) per step, carried through W_hh.

``lstm``, ``gru``, ``rnn_tanh`` and ``rnn_relu`` have the signature of ``torch.lstm`` / ``torch.gru`` /
``torch.rnn_tanh`` / ``torch.rnn_relu`` (the unpacked overloads that
torch.nn.LSTM/GRU call); anything the kernels do not cover (an unsupported dtype or device, empty input,
``TRITIUM_BACKEND=reference``) goes to ``tritium.reference`` (torch's own implementation).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ._library import acc_dtype, define_op, kernel_ok, unit_last
from .linear import project


# ---- fake kernels: shapes only ----
def _fake_lstm_fwd(gates, c):
    B, H = c.shape
    return c.new_empty((B, H)), c.new_empty((B, H)), c.new_empty((B, 4 * H))


def _fake_lstm_bwd(dh, dc, act, c_new, c):
    B, H = c.shape
    return c.new_empty((B, 4 * H)), c.new_empty((B, H))


def _fake_gru_fwd(xg, hg, h):
    B, H = h.shape
    return h.new_empty((B, H)), h.new_empty((B, 4 * H))


def _fake_gru_bwd(dh, saved, h):
    B, H = h.shape
    return h.new_empty((B, 3 * H)), h.new_empty((B, 3 * H)), h.new_empty((B, H))


# ---- the fused cell ops (no autograd of their own: the scans below are their autograd) ----
lstm_cell_fwd = define_op("lstm_cell_fwd(Tensor gates, Tensor c) -> (Tensor, Tensor, Tensor)",
                          _fake_lstm_fwd, "rnn:lstm_cell_fwd")
lstm_cell_bwd = define_op(
    "lstm_cell_bwd(Tensor dh, Tensor dc, Tensor act, Tensor c_new, Tensor c) -> (Tensor, Tensor)",
    _fake_lstm_bwd, "rnn:lstm_cell_bwd")
gru_cell_fwd = define_op("gru_cell_fwd(Tensor xg, Tensor hg, Tensor h) -> (Tensor, Tensor)",
                         _fake_gru_fwd, "rnn:gru_cell_fwd")
gru_cell_bwd = define_op("gru_cell_bwd(Tensor dh, Tensor saved, Tensor h) -> (Tensor, Tensor, Tensor)",
                         _fake_gru_bwd, "rnn:gru_cell_bwd")


def _fake_lstm_scan_fwd(xproj, w_hh, h0, c0, reverse):
    T, B, G = xproj.shape
    return xproj.new_empty((T, B, G // 4)), xproj.new_empty((T, B, G // 4)), xproj.new_empty((T, B, G))


def _fake_lstm_scan_bwd(dhs, dcT, w_hh, h0, c0, cs, acts, reverse):
    return acts.new_empty(acts.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _fake_gru_scan_fwd(xproj, w_hh, b_hh, h0, reverse):
    T, B, G = xproj.shape
    return xproj.new_empty((T, B, G // 3)), xproj.new_empty((T, B, 4 * (G // 3)))


def _fake_gru_scan_bwd(dhs, w_hh, h0, hs, saved, reverse):
    T, B, H = hs.shape
    return hs.new_empty((T, B, 3 * H)), hs.new_empty((T, B, 3 * H)), h0.new_empty(h0.shape)


def _fake_rnn_scan_fwd(xproj, w_hh, h0, reverse, relu):
    return xproj.new_empty(xproj.shape)


def _fake_rnn_scan_bwd(dhs, w_hh, h0, hs, reverse, relu):
    return hs.new_empty(hs.shape), h0.new_empty(h0.shape)


# ---- the scans: one layer-direction through time (per step: one matmul + one fused cell pass) ----
lstm_scan_fwd = define_op(
    "lstm_scan_fwd(Tensor xproj, Tensor w_hh, Tensor h0, Tensor c0, bool reverse) -> (Tensor, Tensor, Tensor)",
    _fake_lstm_scan_fwd, "rnn:lstm_scan_fwd")
lstm_scan_bwd = define_op(
    "lstm_scan_bwd(Tensor dhs, Tensor dcT, Tensor w_hh, Tensor h0, Tensor c0, Tensor cs, Tensor acts, bool reverse)"
    " -> (Tensor, Tensor, Tensor)", _fake_lstm_scan_bwd, "rnn:lstm_scan_bwd")
gru_scan_fwd = define_op(
    "gru_scan_fwd(Tensor xproj, Tensor w_hh, Tensor? b_hh, Tensor h0, bool reverse) -> (Tensor, Tensor)",
    _fake_gru_scan_fwd, "rnn:gru_scan_fwd")
gru_scan_bwd = define_op(
    "gru_scan_bwd(Tensor dhs, Tensor w_hh, Tensor h0, Tensor hs, Tensor saved, bool reverse)"
    " -> (Tensor, Tensor, Tensor)", _fake_gru_scan_bwd, "rnn:gru_scan_bwd")


rnn_scan_fwd = define_op("rnn_scan_fwd(Tensor xproj, Tensor w_hh, Tensor h0, bool reverse, bool relu) -> Tensor",
                         _fake_rnn_scan_fwd, "rnn:rnn_scan_fwd")
rnn_scan_bwd = define_op(
    "rnn_scan_bwd(Tensor dhs, Tensor w_hh, Tensor h0, Tensor hs, bool reverse, bool relu) -> (Tensor, Tensor)",
    _fake_rnn_scan_bwd, "rnn:rnn_scan_bwd")


def _projection(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """xproj (T, B, G) = x (T, B, I) @ w^T + bias, every step's input projection in one matmul (tritium's
    linear autograd: mm_pooled outputs, panel_gemm for float from 64 rows)."""
    T, B, n_in = x.shape
    return project(x.reshape(T * B, n_in), w, bias).view(T, B, w.shape[0])


def _weight_grad(dg: Tensor, hs: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """sum_t dG_t^T h_{t-1} (dg (T, B, G), hs (T, B, H)): one matmul over the steps that follow a step
    (views, no copy of hs) plus the first step's product with h0."""
    T, B, G = dg.shape
    H = hs.shape[2]
    first, rest, prev = (T - 1, slice(0, T - 1), slice(1, T)) if reverse else (0, slice(1, T), slice(0, T - 1))
    dw = dg[first].t() @ h0
    if T > 1:
        dw = torch.addmm(dw, dg[rest].reshape((T - 1) * B, G).t(), hs[prev].reshape((T - 1) * B, H))
    return dw


def _grad_seq(g: Optional[Tensor], like: Tensor) -> Tensor:
    if g is None:
        return torch.zeros_like(like)
    return unit_last(g)


class _LSTMScan(torch.autograd.Function):
    """hs (T, B, H), c_T (B, H) = the LSTM over xproj (T, B, 4H) (= x W_ih^T + b_ih + b_hh) from (h0, c0).
    h_T is hs at the last step processed (the caller takes that view)."""

    @staticmethod
    def forward(ctx, xproj: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, reverse: bool):
        hs, cs, acts = lstm_scan_fwd(xproj, w_hh, h0, c0, reverse)
        ctx.reverse = reverse
        ctx.save_for_backward(w_hh, h0, c0, hs, cs, acts)
        return hs, cs[0 if reverse else -1].clone()

    @staticmethod
    def backward(ctx, dhs: Optional[Tensor], dcT: Optional[Tensor]):
        w_hh, h0, c0, hs, cs, acts = ctx.saved_tensors
        dgates, dh0, dc0 = lstm_scan_bwd(_grad_seq(dhs, hs), _grad_seq(dcT, c0), w_hh, h0, c0, cs, acts,
                                         ctx.reverse)
        dw = None
        if ctx.needs_input_grad[1]:  # sum_t dG_t^T h_{t-1}: one matmul over all steps
            dw = _weight_grad(dgates, hs, h0, ctx.reverse)
        return dgates, dw, dh0, dc0, None


class _GRUScan(torch.autograd.Function):
    """hs (T, B, H) = the GRU over xproj (T, B, 3H) (= x W_ih^T + b_ih) from h0."""

    @staticmethod
    def forward(ctx, xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, reverse: bool):
        hs, saved = gru_scan_fwd(xproj, w_hh, b_hh, h0, reverse)
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        ctx.save_for_backward(w_hh, h0, hs, saved)
        return hs

    @staticmethod
    def backward(ctx, dhs: Optional[Tensor]):
        w_hh, h0, hs, saved = ctx.saved_tensors
        dx, dq, dh0 = gru_scan_bwd(_grad_seq(dhs, hs), w_hh, h0, hs, saved, ctx.reverse)
        dw = db = None
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(dq, hs, h0, ctx.reverse)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dq.sum((0, 1))
        return dx, dw, db, dh0, None


class _RNNScan(torch.autograd.Function):
    """hs (T, B, H) = the Elman RNN (tanh, or relu) over xproj (T, B, H) (= x W_ih^T + b_ih + b_hh) from h0."""

    @staticmethod
    def forward(ctx, xproj: Tensor, w_hh: Tensor, h0: Tensor, reverse: bool, relu: bool):
        hs = rnn_scan_fwd(xproj, w_hh, h0, reverse, relu)
        ctx.reverse, ctx.relu = reverse, relu
        ctx.save_for_backward(w_hh, h0, hs)
        return hs

    @staticmethod
    def backward(ctx, dhs: Optional[Tensor]):
        w_hh, h0, hs = ctx.saved_tensors
        dpre, dh0 = rnn_scan_bwd(_grad_seq(dhs, hs), w_hh, h0, hs, ctx.reverse, ctx.relu)
        dw = _weight_grad(dpre, hs, h0, ctx.reverse) if ctx.needs_input_grad[1] else None
        return dpre, dw, dh0, None, None


# ---- the layer stack (torch.lstm / torch.gru / torch.rnn_* signatures) ----
def _rnn_ok(input: Tensor, hidden: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    return kernel_ok(input, *hidden, *params) and input.dim() == 3


def _layers(params: Sequence[Tensor], has_biases: bool, num_layers: int, bidirectional: bool):
    """Yield (layer, direction, w_ih, w_hh, b_ih, b_hh) from torch's flat weight list."""
    per = 4 if has_biases else 2
    D = 2 if bidirectional else 1
    for layer in range(num_layers):
        for d in range(D):
            p = params[(layer * D + d) * per:(layer * D + d + 1) * per]
            yield layer, d, p[0], p[1], (p[2] if has_biases else None), (p[3] if has_biases else None)


def _run(cell: str, input: Tensor, h0: Tensor, c0: Optional[Tensor], params, has_biases, num_layers, dropout,
         train, bidirectional, batch_first):
    dt = input.dtype
    wide = acc_dtype(dt)
    if wide != dt:
        # 16-bit layers compute in float32 and round once at the end: the state (and, backward, the gradient)
        # carried through T steps would otherwise be rounded to 16 bits at every step, and torch's own layers
        # (oneDNN's RNN primitives) keep it in float32; rounding relu's pre-activation at every step also moves
        # which units its kink switches off. The casts are autograd's: every gradient is rounded once.
        out, hn, cn = _run(cell, input.to(wide), h0.to(wide), None if c0 is None else c0.to(wide),
                           [p.to(wide) for p in params], has_biases, num_layers, dropout, train, bidirectional,
                           batch_first)
        return out.to(dt), hn.to(dt), None if cn is None else cn.to(dt)
    D = 2 if bidirectional else 1
    # (T, B, I). For batch_first the projection reads the transposed view (one copy of the input), so that xproj
    # and its gradient are contiguous (T, B, G): cheaper than copying the 4x wider gradient in backward.
    x = input.transpose(0, 1) if batch_first else input
    layer_out: List[Tensor] = []
    hn: List[Tensor] = []
    cn: List[Tensor] = []
    for layer, d, w_ih, w_hh, b_ih, b_hh in _layers(params, has_biases, num_layers, bidirectional):
        k = layer * D + d
        if cell == "lstm":
            bias = None if b_ih is None else b_ih + b_hh
            xproj = _projection(x, w_ih, bias)  # (T, B, 4H): every step's input projection in one matmul
            hs, c = _LSTMScan.apply(xproj, w_hh, h0[k], c0[k], d == 1)
            cn.append(c)
        elif cell in ("rnn_tanh", "rnn_relu"):
            bias = None if b_ih is None else b_ih + b_hh
            hs = _RNNScan.apply(_projection(x, w_ih, bias), w_hh, h0[k], d == 1, cell == "rnn_relu")
        else:
            xproj = _projection(x, w_ih, b_ih)  # (T, B, 3H)
            hs = _GRUScan.apply(xproj, w_hh, b_hh, h0[k], d == 1)
        layer_out.append(hs)
        hn.append(hs[0 if d == 1 else -1])  # h_T: the last step processed (step 0 for the reverse direction)
        if d == D - 1:
            x = layer_out[0] if D == 1 else torch.cat(layer_out, 2)  # (T, B, D*H)
            layer_out = []
            if dropout > 0 and train and layer < num_layers - 1:
                x = F.dropout(x, dropout, True)
    out = x.transpose(0, 1) if batch_first else x
    return out, torch.stack(hn), (torch.stack(cn) if cell == "lstm" else None)


def lstm(input: Tensor, hx: Sequence[Tensor], params: Sequence[Tensor], has_biases: bool, num_layers: int,
         dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Drop-in for ``torch.lstm`` (unpacked input, no projections): (output, h_n, c_n)."""
    if not _rnn_ok(input, hx, params) or len(params) != num_layers * (2 if bidirectional else 1) * (
            4 if has_biases else 2):
        return reference.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    out, h, c = _run("lstm", input, hx[0], hx[1], params, has_biases, num_layers, dropout, train, bidirectional,
                     batch_first)
    return out, h, c


def gru(input: Tensor, hx: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float,
        train: bool, bidirectional: bool, batch_first: bool) -> Tuple[Tensor, Tensor]:
    """Drop-in for ``torch.gru`` (unpacked input): (output, h_n)."""
    if not _rnn_ok(input, [hx], params):
        return reference.gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    out, h, _ = _run("gru", input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                     batch_first)
    return out, h


def _rnn(cell: str, input: Tensor, hx: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int,
         dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> Tuple[Tensor, Tensor]:
    if not _rnn_ok(input, [hx], params):
        return getattr(reference, cell)(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                        batch_first)
    out, h, _ = _run(cell, input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                     batch_first)
    return out, h


def rnn_tanh(input: Tensor, hx: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float,
             train: bool, bidirectional: bool, batch_first: bool) -> Tuple[Tensor, Tensor]:
    """Drop-in for ``torch.rnn_tanh`` (unpacked input): (output, h_n)."""
    return _rnn("rnn_tanh", input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


def rnn_relu(input: Tensor, hx: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float,
             train: bool, bidirectional: bool, batch_first: bool) -> Tuple[Tensor, Tensor]:
    """Drop-in for ``torch.rnn_relu`` (unpacked input): (output, h_n)."""
    return _rnn("rnn_relu", input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


__all__: List[str] = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
