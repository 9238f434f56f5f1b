"""Cross-entropy, fused linear + cross-entropy, KL divergence and distillation loss.

``cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy``. Class-index targets run one fused
kernel per row (``cross_entropy_fwd``) that writes the per-row loss and, when a gradient will be needed, the
gradient row of that loss (in float32 for 16-bit inputs, so the result is rounded once), so no softmax is kept
and the backward (``cross_entropy_bwd``) only scales rows by the upstream gradient. For 'mean' the kernel divides
rows by the summed weight of the non-ignored targets (torch's divisor) and the reduction is a sum of the rows.
Class-probability targets are torch's composition on top of the log_softmax kernel. Anything the kernels do not
cover (integer targets other than int64, mismatched weight dtype/device, empty inputs, invalid arguments) goes
explicitly to ``tritium.reference`` (torch), so errors are torch's.

``fused_linear_cross_entropy`` projects hidden states to logits chunk by chunk of tokens and never materialises
the (tokens, vocab) logits: for 'mean' and 'sum' the gradients of hidden, weight and bias are accumulated in the
forward (no second pass over the vocabulary), for 'none' the backward recomputes each chunk.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..utils import cpu_has, cpu_has_bf16_dot, register_cpu_path
from ._library import HALF_DTYPES, acc_dtype, call_op, define_op, kernel_ok, rows
from .softmax import log_softmax
from .linear import linear_packed, mm_acc_, pack_linear


# ---- fake kernels: shapes only ----
def _fake_ce_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad):
    m = x.shape[0]
    grad = x.new_empty(x.shape if need_grad else (0,), dtype=acc_dtype(x.dtype))
    return x.new_empty((m,), dtype=acc_dtype(x.dtype)), grad, x.new_empty((), dtype=acc_dtype(x.dtype))


def _fake_ce_bwd(grad, dloss, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


cross_entropy_bwd = define_op("cross_entropy_bwd(Tensor grad, Tensor dloss, ScalarType dtype) -> Tensor", _fake_ce_bwd,
                              "cross_entropy:cross_entropy_bwd")


def _ce_setup(ctx, inputs, output):
    # the gradient rows and the total are outputs no loss depends on: without this, autograd would build a
    # zero (tokens, vocab) tensor for them on every backward, writing as many bytes as the logits themselves
    ctx.set_materialize_grads(False)
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _ce_backward(ctx, dloss, _dgrad, _dtotal):
    (grad,) = ctx.saved_tensors
    none = (None,) * 6
    if dloss is None or grad.dim() == 1:  # no gradient rows: the forward ran without grad
        return (None,) + none
    return (cross_entropy_bwd(grad, dloss, ctx.dtype),) + none


cross_entropy_fwd = define_op(
    "cross_entropy_fwd(Tensor x, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
    " bool mean, bool need_grad) -> (Tensor, Tensor, Tensor)", _fake_ce_fwd, "cross_entropy:cross_entropy_fwd",
    backward=_ce_backward, setup_context=_ce_setup)


def _fake_ce_z_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad, z_loss, softcap):
    return _fake_ce_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad)


def _ce_z_backward(ctx, dloss, dgrad, dtotal):
    return _ce_backward(ctx, dloss, dgrad, dtotal) + (None, None)


# cross_entropy_fwd with the z-loss and logit soft-capping options (softcap 0: off): a new op rather than two more
# arguments of cross_entropy_fwd, so an extension built before it still registers against the old schema
cross_entropy_z_fwd = define_op(
    "cross_entropy_z_fwd(Tensor x, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
    " bool mean, bool need_grad, float z_loss, float softcap) -> (Tensor, Tensor, Tensor)", _fake_ce_z_fwd,
    "cross_entropy:cross_entropy_z_fwd", backward=_ce_z_backward, setup_context=_ce_setup)


# ---- fused linear + cross-entropy: the chunk loop, shared by the CPU and CUDA keys (its per-chunk work is
# a matmul and the cross_entropy_fwd op, each dispatched to its own kernel) ----
def default_chunk_size(tokens: int, hidden: int, vocab: int, dtype: Optional[torch.dtype] = None,
                       device: Optional[torch.device] = None) -> int:
    """Tokens per chunk: the chunk's logits about as large as the hidden states (Liger's rule), at least 256
    rows so the matmuls stay efficient; float32 on CPU at least 1024 rows, since every chunk streams the whole
    (V, H) weight from memory once more (for float32 that costs more than a 4x larger chunk of logits saves)."""
    per = _next_pow2(math.ceil(tokens / max(1, math.ceil(vocab / max(hidden, 1)))))
    least = 1024 if dtype == torch.float32 and device is not None and torch.device(device).type == "cpu" else 256
    return max(1, min(tokens, max(least, per)))


def _own_grad_hidden_gemm() -> bool:
    """Whether the float32 LM head computes grad_hidden = g @ W with tritium's packed panels: yes except where MKL,
    torch's BLAS, runs its tuned kernels (an Intel CPU), whose sgemm is faster there (bench/results/)."""
    return not cpu_has("intel")


def _widen_16bit() -> bool:
    """Whether the CPU LM head multiplies 16-bit inputs in float32 (the weight widened and packed once): on a CPU
    without bfloat16 dot products (cpu_has_bf16_dot), where a 16-bit matmul converts every element on the way in
    and runs several times slower than float32's (bench/results/)."""
    return not cpu_has_bf16_dot()


register_cpu_path("fused_linear_cross_entropy.float32", lambda: "panels for the logits, " + (
    "panels" if _own_grad_hidden_gemm() else "MKL sgemm") + " for grad_hidden")
register_cpu_path("fused_linear_cross_entropy.bfloat16", lambda: (
    "float32 panels (the weight widened once)" if _widen_16bit() else "16-bit matmuls"))


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): triton.next_power_of_2, without importing triton on CPU."""
    return 1 << max(0, (int(n) - 1).bit_length())


def _flce_loop(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, need_grad, row_scale,
               z_loss=0.0, softcap=0.0, weight_grad=True):
    """Per chunk of tokens: logits = hidden @ weight.T + bias; per-row loss (with cross_entropy's z_loss and
    softcap options: softcap 0 is off) and (need_grad) its gradient rows, scaled by row_scale[rows] when given;
    grad_hidden rows, and (need_grad and weight_grad) grad_weight / grad_bias accumulated in the accumulation dtype.
    Returns (loss per row (T,), grad_hidden, grad_weight, grad_bias); a gradient not computed is an empty tensor.

    On the CPU the rows whose target is ignore_index (an SFT batch's prompt and padding: most of its tokens) are
    left out of the products: their loss and gradient rows are exactly zero, so the chunks run on the other rows
    only and the results are scattered back (finding them reads the targets, which on the CPU waits for nothing;
    on a GPU it would synchronise, so there every row goes through the chunks)."""
    T = hidden.shape[0]
    if hidden.device.type == "cpu" and T > 0:
        keep = (target != ignore_index).nonzero().squeeze(1)
        if keep.numel() < T:
            loss, gh, gw, gb = _flce_loop(hidden.index_select(0, keep), weight, target.index_select(0, keep), bias,
                                          ignore_index, label_smoothing, chunk, need_grad,
                                          None if row_scale is None else row_scale.index_select(0, keep), z_loss,
                                          softcap, weight_grad)
            loss = loss.new_zeros((T,)).index_copy_(0, keep, loss)
            if need_grad:
                gh = hidden.new_zeros(hidden.shape).index_copy_(0, keep, gh)
            return loss, gh, gw, gb
    adt = acc_dtype(hidden.dtype)
    loss = hidden.new_empty((T,), dtype=adt)
    gh = torch.empty_like(hidden) if need_grad else hidden.new_empty((0,))
    gw, gb = flce_accumulators(weight, bias, hidden.dtype, need_grad and weight_grad)
    head = LMHead(weight, bias, hidden.dtype, min(chunk, T), need_grad, weight_grad)
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        loss[start:stop] = head.chunk(hidden[start:stop], target[start:stop], ignore_index, label_smoothing,
                                      gh[start:stop] if need_grad else None, gw, gb,
                                      None if row_scale is None else row_scale[start:stop], z_loss, softcap)
    cast = lambda t: t.to(hidden.dtype) if t.numel() else t  # noqa: E731
    return loss, gh, cast(gw), cast(gb)


def flce_accumulators(weight, bias, dtype, need_grad):
    """Zeroed grad_weight / grad_bias sums in the accumulation dtype of dtype (empty when not needed)."""
    adt = acc_dtype(dtype)
    gw = torch.zeros(weight.shape, dtype=adt, device=weight.device) if need_grad else weight.new_empty((0,))
    gb = (torch.zeros(weight.shape[0], dtype=adt, device=weight.device) if need_grad and bias is not None
          else weight.new_empty((0,)))
    return gw, gb


class LMHead:
    """The LM head's per-chunk work shared by fused_linear_cross_entropy and the fused preference losses
    (ops/preference.py): logits of a chunk of tokens, their per-row cross-entropy and, when a gradient is needed,
    the chunk's grad_hidden rows and (weight_grad: unless the weight and bias are frozen, as under LoRA) its
    grad_weight / grad_bias added into caller-owned sums.

    CPU float: the weight is packed once into column panels for every chunk's logits (linear_packed), where BLAS
    would repack the whole (V, H) weight on each chunk's call. The packed copy costs the weight's size once more,
    for the object's lifetime. The input gradient g @ W likewise from W's rows packed once (its panels run the
    vocabulary-long reduction in L2-sized blocks; BLAS would repack the weight per chunk here too), except on an
    Intel CPU, where MKL's sgemm is the faster product (_own_grad_hidden_gemm).

    CPU 16-bit without bfloat16 dot products (_widen_16bit): the same in float32, the weight widened once and each
    chunk's rows on the way in (the logits and gradient rows stay float32, more exact than eager's 16-bit ones);
    grad_hidden is rounded to the input dtype once, at the end of each chunk."""

    def __init__(self, weight, bias, dtype, chunk, need_grad, weight_grad=True):
        self.need_grad, self.weight_grad, self.vocab = need_grad, need_grad and weight_grad, weight.shape[0]
        self.packed = self.packed_t = None
        self.widen = False
        if weight.device.type == "cpu" and weight.is_contiguous() and chunk >= 64 and weight.shape[1] > 0:
            if dtype in HALF_DTYPES and _widen_16bit():
                self.widen = True
                weight, bias = weight.float(), bias.float() if bias is not None else None
            if dtype in (torch.float32, torch.float64) or self.widen:
                self.packed = pack_linear(weight)
                if need_grad and _own_grad_hidden_gemm():
                    self.packed_t = pack_linear(weight.t())
        # (a widened weight is kept only for grad_hidden's torch.mm, when there are no panels for it)
        self.weight = weight if not self.widen or (need_grad and self.packed_t is None) else None
        self.bias = bias

    def chunk(self, h, t, ignore_index, label_smoothing, gh_out, gw, gb, row_scale, z_loss=0.0, softcap=0.0):
        """The per-row loss of the chunk h (rows, H), t (rows,), in the accumulation dtype (z_loss / softcap:
        cross_entropy's options, softcap 0 off). With need_grad: its gradient rows (scaled by row_scale when given)
        times W into gh_out, and (weight_grad) their products with h added into gw and the row sums into gb (when
        there is a bias)."""
        weight, bias = self.weight, self.bias
        if self.widen:
            h = h.float()
        if self.packed is not None:
            logits = linear_packed(h, self.packed, self.vocab, bias)
        else:
            logits = torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())
        if z_loss or softcap:
            rows_loss, g, _ = call_op(cross_entropy_z_fwd, logits, t, None, ignore_index, label_smoothing, False,
                                      self.need_grad, z_loss, softcap)
        else:
            rows_loss, g, _ = call_op(cross_entropy_fwd, logits, t, None, ignore_index, label_smoothing, False,
                                      self.need_grad)
        del logits
        if not self.need_grad:
            return rows_loss
        # the gradient rows (float32 for 16-bit inputs), scaled and in the input dtype as eager's logits gradient
        # (kept float32 when widened)
        gdt = h.dtype
        if row_scale is not None:
            g = cross_entropy_bwd(g, row_scale, gdt)
        elif g.dtype != gdt:
            g = cross_entropy_bwd(g, rows_loss.new_ones(()).expand(h.shape[0]), gdt)
        if self.packed_t is not None:
            gh_out.copy_(linear_packed(g, self.packed_t, h.shape[1]))
        elif gh_out.dtype != g.dtype:
            gh_out.copy_(torch.mm(g, weight))
        else:
            torch.mm(g, weight, out=gh_out)
        if not self.weight_grad:
            return rows_loss
        if gw.dtype == g.dtype:
            gw.addmm_(g.t(), h)
        elif gw.device.type == "cpu":  # 16-bit: each chunk's product added into the float32 sum in one pass
            mm_acc_(gw, g.t(), h)
        else:  # the chunk's product in the input dtype (as eager's matmul), summed in float32
            gw += torch.mm(g.t(), h)
        if bias is not None:
            gb += g.sum(0, dtype=gw.dtype)
        return rows_loss


def _fake_flce(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, mean, need_grad, z_loss=0.0,
               softcap=0.0, weight_grad=True):
    adt = acc_dtype(hidden.dtype)
    none = (0,)  # a gradient not computed: an empty tensor of its own (outputs never alias)
    wg = need_grad and weight_grad
    return (hidden.new_empty((), dtype=adt), hidden.new_empty((), dtype=adt),
            hidden.new_empty(hidden.shape if need_grad else none),
            weight.new_empty(weight.shape if wg else none),
            weight.new_empty((weight.shape[0],) if wg and bias is not None else none))


def _flce_impl(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, mean, need_grad, z_loss=0.0,
               softcap=0.0, weight_grad=True):
    """(the loss: sum of the rows, or 'mean': divided by the non-ignored count (NaN for none, as torch), that
    count, and the gradients of the loss: zero, not NaN, when every row is ignored; weight_grad False: no
    gradients of the weight and bias, empty tensors in their place)."""
    loss, gh, gw, gb = _flce_loop(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, need_grad,
                                  None, z_loss, softcap, weight_grad)
    total = (target != ignore_index).sum().to(loss.dtype)
    loss = loss.sum()
    if mean:
        loss = loss / total
        if need_grad:
            inv = torch.where(total > 0, 1.0 / total, 0.0)
            gh = gh * inv.to(gh.dtype)
            gw = gw * inv.to(gw.dtype) if gw.numel() else gw
            gb = gb * inv.to(gb.dtype) if gb.numel() else gb
    return loss, total, gh, gw, gb


def _fake_flce_rows(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, z_loss=0.0, softcap=0.0):
    return hidden.new_empty((hidden.shape[0],), dtype=acc_dtype(hidden.dtype))


def _flce_rows_impl(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, z_loss=0.0, softcap=0.0):
    return _flce_loop(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, False, None, z_loss,
                      softcap)[0]


def _fake_flce_bwd(hidden, weight, target, bias, dloss, ignore_index, label_smoothing, chunk, z_loss=0.0,
                   softcap=0.0):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],) if bias is not None else (0,)))


def _flce_bwd_impl(hidden, weight, target, bias, dloss, ignore_index, label_smoothing, chunk, z_loss=0.0,
                   softcap=0.0):
    _, gh, gw, gb = _flce_loop(hidden, weight, target, bias, ignore_index, label_smoothing, chunk, True, dloss,
                               z_loss, softcap)
    return gh, gw, gb


_FLCE_ARGS = "int ignore_index, float label_smoothing, int chunk"
# cross_entropy's z_loss and softcap (0: off), last and defaulted so calls without them keep their meaning
_FLCE_OPTIONS = "float z_loss=0.0, float softcap=0.0"
flce_bwd = define_op(
    f"fused_linear_cross_entropy_bwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor dloss, "
    f"{_FLCE_ARGS}, {_FLCE_OPTIONS}) -> (Tensor, Tensor, Tensor)", _fake_flce_bwd, composite=_flce_bwd_impl)


def saved_grads_setup(ctx, inputs, output):
    """Autograd context of an op (hidden, weight, target, bias, ...) whose forward already computed the gradients
    of a unit loss, (grad_hidden, grad_weight, grad_bias) as outputs 2-4: fused_linear_cross_entropy and
    preference.fused_linear_sequence_loss."""
    ctx.set_materialize_grads(False)  # no zero tensors for the gradient outputs (see _ce_setup)
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(output[2], output[3], output[4])


def saved_grads_backward(n_inputs: int):
    """The backward of such an op with n_inputs inputs: the saved gradients scaled by the loss's gradient (None
    for the weight's and bias's when the forward computed none: a frozen LM head)."""
    def backward(ctx, dloss, *_):
        if dloss is None:
            return (None,) * n_inputs
        gh, gw, gb = ctx.saved_tensors
        g = dloss.to(gh.dtype)
        return (gh * g, gw * g if gw.numel() else None, None,
                gb * g if ctx.has_bias and gb.numel() else None) + (None,) * (n_inputs - 4)
    return backward


def lm_head_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[bool, bool]:
    """(need_grad, weight_grad) of an LM-head loss op that computes its gradients in the forward: need_grad when
    autograd will ask for any of hidden's, the weight's or the bias's; weight_grad False for a frozen head (LoRA)."""
    weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    return torch.is_grad_enabled() and (hidden.requires_grad or weight_grad), weight_grad


# need_grad: the gradients are computed in the forward; weight_grad (last and defaulted, as _FLCE_OPTIONS) False
# leaves out the weight's and bias's (a frozen LM head: LoRA), whose (V, H) sum costs as much as the logits
flce_fwd = define_op(
    f"fused_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, {_FLCE_ARGS},"
    f" bool mean, bool need_grad, {_FLCE_OPTIONS}, bool weight_grad=True) -> (Tensor, Tensor, Tensor, Tensor,"
    f" Tensor)", _fake_flce, composite=_flce_impl, backward=saved_grads_backward(12), setup_context=saved_grads_setup)


def _flce_rows_setup(ctx, inputs, output):
    hidden, weight, target, bias, *args = inputs
    ctx.args = tuple(args)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, target, bias)


def _flce_rows_backward(ctx, dloss):
    hidden, weight, target, bias = ctx.saved_tensors
    gh, gw, gb = flce_bwd(hidden, weight, target, bias, dloss.contiguous(), *ctx.args)
    return (gh, gw, None, (gb if ctx.has_bias else None)) + (None,) * len(ctx.args)


flce_rows = define_op(
    f"fused_linear_cross_entropy_rows(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, {_FLCE_ARGS}, "
    f"{_FLCE_OPTIONS}) -> Tensor", _fake_flce_rows, composite=_flce_rows_impl, backward=_flce_rows_backward,
    setup_context=_flce_rows_setup)


# ---- public API ----
_REDUCTIONS = ("mean", "sum", "none")


def _index_kernel_ok(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
                     label_smoothing: float) -> bool:
    if not kernel_ok(input) or input.dim() == 0:
        return False
    if target.dtype != torch.int64 or target.device != input.device:
        return False
    expected = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        return False
    if weight is not None and (weight.dtype != input.dtype or weight.device != input.device
                               or tuple(weight.shape) != (input.shape[0 if input.dim() == 1 else 1],)):
        return False
    return reduction in _REDUCTIONS and 0.0 <= label_smoothing <= 1.0


def _class_rows(input: Tensor) -> Tensor:
    """input with the class dim (1, or 0 for an unbatched input) last, as (rows, C). A 2-D input is read in
    place; (N, C, d1, ...) inputs are copied once into (N * d1 * ..., C) rows (the kernels read class rows)."""
    if input.dim() == 1:
        return input.unsqueeze(0)
    c = input.shape[1]
    if input.dim() == 2:
        return rows(input, c)
    return input.movedim(1, -1).reshape(-1, c)


def check_z_loss_softcap(fn: str, z_loss, softcap) -> None:
    """ValueError naming the argument unless z_loss is a finite number >= 0 and softcap None or a finite number > 0."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0 (0: off), got {z_loss!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"{fn}: softcap must be None (off) or a finite number > 0, got {softcap!r}")


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.cross_entropy`` (class dim 1, or 0 for an unbatched input; class-index
    or class-probability targets; weight, ignore_index, reduction, label_smoothing as torch).

    Two options, off by default (then the result is torch's): ``softcap`` c > 0 reads the logits as
    c * tanh(logits / c) before everything else (Gemma 2's logit soft-capping); ``z_loss`` w > 0 adds PaLM's
    auxiliary loss w * lse^2 per row, lse the logsumexp of the (capped) logits. The z-loss of an ignored row is 0;
    it is not multiplied by the class weights; 'mean' divides the z-loss sum by the number of non-ignored rows
    (the number of rows for class-probability targets) and the cross-entropy by torch's divisor (the summed weight
    of the non-ignored targets), 'sum' adds both sums, 'none' both per row. This matches Liger-Kernel's
    ``LigerCrossEntropyLoss(lse_square_scale=z_loss, softcap=softcap)``. Class-index targets run both in the
    fused kernel (the capped logits are never materialised); class-probability targets run tritium.reference."""
    if size_average is not None or reduce is not None:
        reduction = F._Reduction.legacy_get_string(size_average, reduce)
    check_z_loss_softcap("cross_entropy", z_loss, softcap)
    extra = z_loss != 0 or softcap is not None
    if extra and not _index_kernel_ok(input, target, weight, reduction, label_smoothing):
        return reference.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if _index_kernel_ok(input, target, weight, reduction, label_smoothing):
        x2 = _class_rows(input)
        need_grad = torch.is_grad_enabled() and input.requires_grad
        if extra:
            per_row, _, _ = call_op(cross_entropy_z_fwd, x2, target.reshape(-1), weight, ignore_index,
                                    float(label_smoothing), reduction == "mean", need_grad, float(z_loss),
                                    float(softcap or 0.0))
        else:
            per_row, _, _ = call_op(cross_entropy_fwd, x2, target.reshape(-1), weight, ignore_index,
                                    float(label_smoothing), reduction == "mean", need_grad)
        if reduction == "none":
            return per_row.to(input.dtype).view(target.shape)
        return per_row.sum().to(input.dtype)  # 'mean': the rows are already divided by the total weight
    if (kernel_ok(input, target, *([weight] if weight is not None else [])) and input.dim() > 0
            and target.shape == input.shape and reduction in _REDUCTIONS and 0.0 <= label_smoothing <= 1.0
            and (weight is None or weight.shape == (input.shape[min(1, input.dim() - 1)],))):
        return _prob_cross_entropy(input, target, weight, reduction, label_smoothing)
    return reference.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)


def _prob_cross_entropy(input, target, weight, reduction, label_smoothing):
    """torch's class-probability cross-entropy, on the log_softmax kernel:
    loss = -sum_c w_c t_c log_softmax(x)_c with t smoothed to t (1 - eps) + eps / C; 'mean' divides by the
    number of rows (numel / C). The products and sums are taken in the accumulation dtype (float32 for 16-bit
    input) and the loss rounded once to input's dtype: rounding each product and partial sum to bfloat16 costs up
    to an ulp of the loss more than torch's own error."""
    cdim = 0 if input.dim() == 1 else 1
    c = input.shape[cdim]
    adt = acc_dtype(input.dtype)
    logp = log_softmax(input, cdim).to(adt)
    target = target.to(adt)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / c
    if weight is not None:
        shape = [1] * input.dim()
        shape[cdim] = c
        target = target * weight.to(adt).view(shape)
    loss = -(logp * target).sum(cdim)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (input.numel() / c)
    return loss.to(input.dtype)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_size: Optional[int] = None, *, z_loss: float = 0.0,
                               softcap: Optional[float] = None) -> Tensor:
    """cross_entropy(linear(hidden, weight, bias), target) without materialising the logits.

    hidden (..., H), weight (V, H), bias (V,) or None, target (...) int64 class indices -> the loss ('mean',
    'sum': a scalar; 'none': target's shape), in hidden's dtype. Tokens are processed chunk_size at a time
    (default: see default_chunk_size); peak extra memory is about two (chunk, V) blocks plus a float32 (V, H)
    gradient accumulator. z_loss and softcap are cross_entropy's options (off by default; the z-loss's 'mean'
    divides by the non-ignored count, as the cross-entropy's does here), computed in the same per-chunk kernel."""
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"fused_linear_cross_entropy: hidden (..., H) and weight (V, H) must agree on H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"fused_linear_cross_entropy: target must have shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(target.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
    check_z_loss_softcap("fused_linear_cross_entropy", z_loss, softcap)
    ok = (kernel_ok(hidden, weight, *([bias] if bias is not None else [])) and target.dtype == torch.int64
          and target.device == hidden.device and weight.shape[0] > 0
          and (bias is None or bias.shape == weight.shape[:1]) and 0.0 <= label_smoothing <= 1.0)
    if not ok:
        return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                                    label_smoothing, z_loss=z_loss, softcap=softcap)
    H, V = hidden.shape[-1], weight.shape[0]
    h2 = rows(hidden, H)
    t = target.reshape(-1)
    chunk = chunk_size or default_chunk_size(h2.shape[0], H, V, h2.dtype, h2.device)
    ls, options = float(label_smoothing), (float(z_loss), float(softcap or 0.0))
    if reduction == "none":
        return call_op(flce_rows, h2, weight, t, bias, ignore_index, ls, chunk, *options).to(hidden.dtype).view(
            target.shape)
    need_grad, weight_grad = lm_head_grads(hidden, weight, bias)
    loss = call_op(flce_fwd, h2, weight, t, bias, ignore_index, ls, chunk, reduction == "mean", need_grad,
                   *options, weight_grad)[0]
    return loss.to(hidden.dtype)


# ---- kl_div and distillation ----
def _fake_kl_fwd(x, t, log_target, reduce, scale):
    return x.new_empty(() if reduce else x.shape)


def _fake_kl_bwd(grad, x, t, log_target, need_input, need_target):
    return x.new_empty(x.shape if need_input else (0,)), x.new_empty(x.shape if need_target else (0,))


kl_div_bwd = define_op("kl_div_bwd(Tensor grad, Tensor input, Tensor target, bool log_target, bool need_input, "
                       "bool need_target) -> (Tensor, Tensor)", _fake_kl_bwd, "kl_div:kl_div_bwd")


def _kl_setup(ctx, inputs, output):
    x, t, log_target, reduce, scale = inputs
    ctx.log_target, ctx.reduce, ctx.scale = log_target, reduce, scale
    ctx.save_for_backward(x, t)


def _kl_backward(ctx, g):
    x, t = ctx.saved_tensors
    need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g = g * ctx.scale if ctx.reduce else g.contiguous()  # the reduced loss's scale; 'none' reads g elementwise
    dx, dt = kl_div_bwd(g, x, t, ctx.log_target, need_x, need_t)
    return (dx if need_x else None), (dt if need_t else None), None, None, None


kl_div_fwd = define_op("kl_div_fwd(Tensor input, Tensor target, bool log_target, bool reduce, float scale) -> Tensor",
                       _fake_kl_fwd, "kl_div:kl_div_fwd", backward=_kl_backward, setup_context=_kl_setup)


def _fake_distill(s, u, inv_temp, need_grad, target=None, ignore_index=-100, kl_weight=1.0, ce_weight=0.0):
    adt = acc_dtype(s.dtype)
    return s.new_empty((s.shape[0],), dtype=adt), s.new_empty(s.shape if need_grad else (0,), dtype=adt)


def _distill_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero (rows, classes) tensor for the gradient-row output
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _distill_backward(ctx, dloss, _dgrad):
    (grad,) = ctx.saved_tensors
    none = (None,) * 7
    if dloss is None or grad.dim() == 1:  # the forward ran without the gradient rows
        return (None,) + none
    return (cross_entropy_bwd(grad, dloss, ctx.dtype),) + none


# per row: kl_weight * KL, plus with a target the hard-label term's share of the mean cross-entropy,
# ce_weight * CE_r / n_valid; one gradient row for both (csrc/kl_div.cpp, kernels/kl_div.py)
distill_fwd = define_op("distill_fwd(Tensor student, Tensor teacher, float inv_temp, bool need_grad,"
                        " Tensor? target=None, int ignore_index=-100, float kl_weight=1.0, float ce_weight=0.0)"
                        " -> (Tensor, Tensor)", _fake_distill, "kl_div:distill_fwd", backward=_distill_backward,
                        setup_context=_distill_setup)

_KL_REDUCTIONS = ("mean", "batchmean", "sum", "none")


def kl_div(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
           log_target: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.kl_div``: pointwise target * (log target - input) (xlogy: 0 where the
    target is 0), or with log_target exp(target) * (target - input); 'mean' averages over every element and warns,
    as torch ('batchmean', the sum over the batch size, is the mathematical KL divergence). One kernel computes
    the pointwise loss and its reduction (no (N,) intermediate for 'sum'/'mean'/'batchmean'), one the gradients
    of input and target; the reduction is accumulated in float32 blocks summed in double and rounded once.
    Other dtypes, mixed dtypes or devices, broadcasting shapes and empty inputs run torch's own function."""
    legacy = size_average is not None or reduce is not None
    if legacy:
        reduction = F._Reduction.legacy_get_string(size_average, reduce)
    ok = kernel_ok(input, target) and target.shape == input.shape and reduction in _KL_REDUCTIONS
    if not ok:
        if legacy:
            return reference.kl_div(input, target, size_average, reduce, log_target=log_target)
        return reference.kl_div(input, target, reduction=reduction, log_target=log_target)
    if reduction == "mean" and not legacy:
        warnings.warn(
            "reduction: 'mean' divides the total loss by both the batch size and the support size."
            "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
            "'mean' will be changed to behave the same as 'batchmean' in the next major release.",
            stacklevel=2,
        )
    if reduction == "none":
        return call_op(kl_div_fwd, input.contiguous(), target.contiguous(), bool(log_target), False, 1.0)
    if reduction == "mean":
        scale = 1.0 / input.numel()
    elif reduction == "batchmean" and input.dim() != 0:
        scale = 1.0 / input.shape[0]
    else:
        scale = 1.0
    return call_op(kl_div_fwd, input.contiguous(), target.contiguous(), bool(log_target), True, scale)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                      alpha: float = 0.5, target: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Knowledge distillation: alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) averaged over rows
    (the class dim is the last) + (1 - alpha) * cross_entropy(student, target) (mean over the targets that are not
    ignore_index; NaN when all are, as torch); without target only the first term. Both terms are one fused
    kernel per row (``distill_fwd``: both softmaxes at temperature T, the KL, the hard-label cross-entropy and
    one gradient row of the student for the whole loss, with no log-probabilities materialised), so the backward
    only scales that row; the teacher gets no gradient. Classes whose teacher probability is 0 (a -inf teacher
    logit) contribute 0, the limit of q log q, where the unfused composition log_softmax +
    kl_div(log_target=True) gives NaN. A target outside [0, C) that is not ignore_index raises cross_entropy's
    IndexError."""
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be positive, got {temperature}")
    if student_logits.dim() == 0:
        raise ValueError("distillation_loss: student_logits must have a class dim (the last), got a 0-d tensor")
    c = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"distillation_loss: teacher_logits must have the student's shape "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    if target is not None and tuple(target.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"distillation_loss: target must have shape {tuple(student_logits.shape[:-1])}, got "
                         f"{tuple(target.shape)}")
    ok = kernel_ok(student_logits, teacher_logits) and (
        target is None or (target.dtype == torch.int64 and target.device == student_logits.device))
    if not ok:
        return reference.distillation_loss(student_logits, teacher_logits, temperature, alpha, target, ignore_index)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    s2, u2 = rows(student_logits, c), rows(teacher_logits.detach(), c)
    kl_weight = alpha * temperature ** 2 / s2.shape[0]
    if target is None:
        kl_rows, _ = call_op(distill_fwd, s2, u2, 1.0 / temperature, need_grad)
        return (kl_rows.sum() * kl_weight).to(student_logits.dtype)
    # the rows hold both terms, weighted (the cross-entropy's mean divisor is counted by the kernel)
    loss_rows, _ = call_op(distill_fwd, s2, u2, 1.0 / temperature, need_grad, target.reshape(-1), ignore_index,
                           kl_weight, 1.0 - alpha)
    return loss_rows.sum().to(student_logits.dtype)


__all__: List[str] = ["cross_entropy", "fused_linear_cross_entropy", "kl_div", "distillation_loss"]
