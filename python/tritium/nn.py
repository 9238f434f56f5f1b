"""Drop-in modules: subclasses of the torch.nn modules that override only ``forward``, so state_dicts,
``extra_repr`` and isinstance checks are the torch module's; and ``patch(model)`` to swap them in place."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

from . import ops
from .ops.cross_entropy import check_z_loss_softcap


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm on tritium.group_norm; ``activation="silu"`` fuses the SiLU that follows a U-Net
    block's GroupNorm (the state_dict stays torch's; a patched torch.nn.GroupNorm has no activation)."""

    activation = None

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, activation=None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        if activation not in ops.norms.GROUP_NORM_ACTIVATIONS:
            raise ValueError(f"GroupNorm: activation must be None or 'silu', got {activation!r}")
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra


class Linear(torch.nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


# torch module class -> its tritium twin; every later op family adds its rows here.
PATCH_TABLE: Dict[Type[torch.nn.Module], Type[torch.nn.Module]] = {
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.Linear: Linear,
}


def patch(model: torch.nn.Module) -> List[Tuple[str, Type[torch.nn.Module]]]:
    """Swap every torch module in ``model`` that has a tritium twin for that twin, in place (the module
    object, its parameters, buffers and hooks stay; only its class changes). Exact class matches only, so
    user subclasses with their own forward are left alone. Returns [(qualified name, original class)]."""
    replaced = []
    for name, module in model.named_modules():
        twin = PATCH_TABLE.get(type(module))
        if twin is not None:
            replaced.append((name, type(module)))
            module.__class__ = twin
    return replaced


# ---- RNNs: torch.nn.LSTM / GRU / RNN whose per-step gate math is one fused kernel ----
def _rnn_hidden(module: torch.nn.RNNBase, input: Tensor, hx, n_states: int):
    """Torch's own input/hidden validation and defaults for unpacked input: returns (input 3-D, hx tuple,
    is_batched). Mirrors torch.nn.LSTM/GRU.forward, error types and messages included."""
    name = type(module).__mro__[1].__name__
    if input.dim() not in (2, 3):
        raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
    is_batched = input.dim() == 3
    if not is_batched:
        input = input.unsqueeze(0 if module.batch_first else 1)
    B = input.size(0) if module.batch_first else input.size(1)
    D = 2 if module.bidirectional else 1
    if hx is None:
        z = torch.zeros(module.num_layers * D, B, module.hidden_size, dtype=input.dtype, device=input.device)
        hx = (z,) * n_states
    else:
        hx = tuple(hx) if n_states == 2 else (hx,)
        want = 3 if is_batched else 2
        if any(h.dim() != want for h in hx):
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            if n_states == 2:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx[0].dim()}-D tensor")
        if not is_batched:
            hx = tuple(h.unsqueeze(1) for h in hx)
    module.check_forward_args(input, hx if n_states == 2 else hx[0], None)
    return input, hx, is_batched


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM whose per-step cell is one fused kernel (tritium.ops.rnn). Packed sequences and
    proj_size > 0 run torch's own implementation."""

    def forward(self, input, hx=None):
        if isinstance(input, torch.nn.utils.rnn.PackedSequence) or self.proj_size > 0:
            return super().forward(input, hx)
        self._update_flat_weights()
        x, (h0, c0), is_batched = _rnn_hidden(self, input, hx, 2)
        out, h, c = ops.lstm(x, (h0, c0), self._flat_weights, self.bias, self.num_layers, float(self.dropout),
                             self.training, self.bidirectional, self.batch_first)
        if not is_batched:
            return out.squeeze(0 if self.batch_first else 1), (h.squeeze(1), c.squeeze(1))
        return out, (h, c)


class GRU(torch.nn.GRU):
    """torch.nn.GRU whose per-step cell is one fused kernel (tritium.ops.rnn). Packed sequences run torch's
    own implementation."""

    def forward(self, input, hx=None):
        if isinstance(input, torch.nn.utils.rnn.PackedSequence):
            return super().forward(input, hx)
        self._update_flat_weights()
        x, (h0,), is_batched = _rnn_hidden(self, input, hx, 1)
        out, h = ops.gru(x, h0, self._flat_weights, self.bias, self.num_layers, float(self.dropout),
                         self.training, self.bidirectional, self.batch_first)
        if not is_batched:
            return out.squeeze(0 if self.batch_first else 1), h.squeeze(1)
        return out, h


class RNN(torch.nn.RNN):
    """torch.nn.RNN (Elman, tanh or relu) whose time loop is one scan op (tritium.ops.rnn): per step the
    recurrent product written into h_t and the activation applied in place. Packed sequences run torch's own
    implementation."""

    def forward(self, input, hx=None):
        if isinstance(input, torch.nn.utils.rnn.PackedSequence):
            return super().forward(input, hx)
        self._update_flat_weights()
        x, (h0,), is_batched = _rnn_hidden(self, input, hx, 1)
        fn = ops.rnn_tanh if self.nonlinearity == "tanh" else ops.rnn_relu
        out, h = fn(x, h0, self._flat_weights, self.bias, self.num_layers, float(self.dropout), self.training,
                    self.bidirectional, self.batch_first)
        if not is_batched:
            return out.squeeze(0 if self.batch_first else 1), h.squeeze(1)
        return out, h


PATCH_TABLE[torch.nn.LSTM] = LSTM
PATCH_TABLE[torch.nn.GRU] = GRU
PATCH_TABLE[torch.nn.RNN] = RNN


# ---- softmax family ----
class Softmax(torch.nn.Softmax):
    def forward(self, input: Tensor) -> Tensor:
        return ops.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    def forward(self, input: Tensor) -> Tensor:
        return ops.log_softmax(input, self.dim, _stacklevel=5)


class Softmin(torch.nn.Softmin):
    def forward(self, input: Tensor) -> Tensor:
        return ops.softmin(input, self.dim, _stacklevel=5)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch's module; keyword-only z_loss and softcap as tritium.cross_entropy's (off by default)."""

    def __init__(self, *args, z_loss: float = 0.0, softcap: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_z_loss_softcap("CrossEntropyLoss", z_loss, softcap)
        self.z_loss, self.softcap = z_loss, softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing,
                                 z_loss=getattr(self, "z_loss", 0.0), softcap=getattr(self, "softcap", None))


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """The LM head's loss without the logits: forward(hidden, weight, target, bias=None) =
    cross_entropy(linear(hidden, weight, bias), target), computed chunk by chunk of tokens (torch has no twin);
    z_loss and softcap as in CrossEntropyLoss (off by default)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 chunk_size=None, *, z_loss: float = 0.0, softcap=None):
        super().__init__()
        check_z_loss_softcap("FusedLinearCrossEntropyLoss", z_loss, softcap)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size
        self.z_loss, self.softcap = z_loss, softcap

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias=None) -> Tensor:
        return ops.fused_linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                              self.label_smoothing, self.chunk_size, z_loss=self.z_loss,
                                              softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"
                + (f", z_loss={self.z_loss}" if self.z_loss else "")
                + (f", softcap={self.softcap}" if self.softcap is not None else ""))


PATCH_TABLE.update({torch.nn.Softmax: Softmax, torch.nn.LogSoftmax: LogSoftmax, torch.nn.Softmin: Softmin,
                    torch.nn.CrossEntropyLoss: CrossEntropyLoss})


# ---- losses (tritium.ops.losses) ----
class MSELoss(torch.nn.MSELoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.mse_loss(input, target, reduction=self.reduction)


class L1Loss(torch.nn.L1Loss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(torch.nn.HuberLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class BCELoss(torch.nn.BCELoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                    reduction=self.reduction)


class SoftMarginLoss(torch.nn.SoftMarginLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.soft_margin_loss(input, target, reduction=self.reduction)


class HingeEmbeddingLoss(torch.nn.HingeEmbeddingLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.hinge_embedding_loss(input, target, margin=self.margin, reduction=self.reduction)


class MarginRankingLoss(torch.nn.MarginRankingLoss):
    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return ops.margin_ranking_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)


class MultiLabelSoftMarginLoss(torch.nn.MultiLabelSoftMarginLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.multilabel_soft_margin_loss(input, target, weight=self.weight, reduction=self.reduction)


class MultiMarginLoss(torch.nn.MultiMarginLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.multi_margin_loss(input, target, p=self.p, margin=self.margin, weight=self.weight,
                                     reduction=self.reduction)


class TripletMarginLoss(torch.nn.TripletMarginLoss):
    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return ops.triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=self.p, eps=self.eps,
                                       swap=self.swap, reduction=self.reduction)


class CosineEmbeddingLoss(torch.nn.CosineEmbeddingLoss):
    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return ops.cosine_embedding_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)


class SigmoidFocalLoss(torch.nn.Module):
    """tritium.sigmoid_focal_loss as a module (torchvision has the function only)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return ops.sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)


class QuantileLoss(torch.nn.Module):
    """tritium.quantile_loss (pinball loss) over a fixed list of quantiles."""

    def __init__(self, quantiles, reduction: str = "mean"):
        super().__init__()
        self.quantiles, self.reduction = [float(q) for q in quantiles], reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.quantile_loss(input, target, self.quantiles, self.reduction)


class ContrastiveLoss(torch.nn.Module):
    """tritium.contrastive_loss (pairwise, Siamese) as a module."""

    def __init__(self, margin: float = 1.0, eps: float = 1e-6, reduction: str = "mean"):
        super().__init__()
        self.margin, self.eps, self.reduction = margin, eps, reduction

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return ops.contrastive_loss(input1, input2, target, self.margin, self.eps, self.reduction)


class InfoNCELoss(torch.nn.Module):
    """tritium.info_nce (CLIP-style InfoNCE / NT-Xent in row blocks) as a module."""

    def __init__(self, temperature: float = 0.1, symmetric: bool = True, normalize: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        self.temperature, self.symmetric, self.normalize, self.reduction = temperature, symmetric, normalize, reduction

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor = None) -> Tensor:
        return ops.info_nce(query, key, self.temperature, self.symmetric, negatives, self.normalize, self.reduction)


PATCH_TABLE.update({
    torch.nn.MSELoss: MSELoss, torch.nn.L1Loss: L1Loss, torch.nn.SmoothL1Loss: SmoothL1Loss,
    torch.nn.HuberLoss: HuberLoss, torch.nn.BCELoss: BCELoss, torch.nn.BCEWithLogitsLoss: BCEWithLogitsLoss,
    torch.nn.SoftMarginLoss: SoftMarginLoss, torch.nn.HingeEmbeddingLoss: HingeEmbeddingLoss,
    torch.nn.MarginRankingLoss: MarginRankingLoss, torch.nn.MultiLabelSoftMarginLoss: MultiLabelSoftMarginLoss,
    torch.nn.MultiMarginLoss: MultiMarginLoss, torch.nn.TripletMarginLoss: TripletMarginLoss,
    torch.nn.CosineEmbeddingLoss: CosineEmbeddingLoss,
})


# ---- activations, gated MLP blocks and DyT (tritium.ops.activations) ----
class ReLU(torch.nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.relu(x, self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.leaky_relu(x, self.negative_slope, self.inplace)


class ELU(torch.nn.ELU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.elu(x, self.alpha, self.inplace)


class SELU(torch.nn.SELU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.selu(x, self.inplace)


class CELU(torch.nn.CELU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.celu(x, self.alpha, self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, x: Tensor) -> Tensor:
        return ops.sigmoid(x)


class Tanh(torch.nn.Tanh):
    def forward(self, x: Tensor) -> Tensor:
        return ops.tanh(x)


class Softplus(torch.nn.Softplus):
    def forward(self, x: Tensor) -> Tensor:
        return ops.softplus(x, self.beta, self.threshold)


class GELU(torch.nn.GELU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.gelu(x, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.silu(x, self.inplace)


class Mish(torch.nn.Mish):
    def forward(self, x: Tensor) -> Tensor:
        return ops.mish(x, self.inplace)


class LogSigmoid(torch.nn.LogSigmoid):
    def forward(self, x: Tensor) -> Tensor:
        return ops.logsigmoid(x)


class Hardswish(torch.nn.Hardswish):
    def forward(self, x: Tensor) -> Tensor:
        return ops.hardswish(x, self.inplace)


class PReLU(torch.nn.PReLU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.prelu(x, self.weight)


class GLU(torch.nn.GLU):
    def forward(self, x: Tensor) -> Tensor:
        return ops.glu(x, self.dim)


class Swish(torch.nn.Module):
    """x * sigmoid(beta * x); ``learnable=True`` makes beta a parameter (initialised to ``beta``)."""

    def __init__(self, beta: float = 1.0, learnable: bool = False):
        super().__init__()
        if learnable:
            self.beta = torch.nn.Parameter(torch.tensor(float(beta)))
        else:
            self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return ops.swish(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}" if isinstance(self.beta, float) else "beta=learnable"


class DyT(torch.nn.Module):
    """Dynamic Tanh ("Transformers without Normalization"), a drop-in for a LayerNorm/RMSNorm over the last
    dim: weight * tanh(alpha * x) + bias with a learnable scalar alpha (initialised to ``alpha_init``)."""

    def __init__(self, normalized_shape: int, alpha_init: float = 0.5, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.normalized_shape = int(normalized_shape)
        self.alpha_init = alpha_init
        self.alpha = torch.nn.Parameter(torch.full((1,), float(alpha_init), **kw))
        self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, **kw))

    def forward(self, x: Tensor) -> Tensor:
        return ops.dyt(x, self.alpha, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, alpha_init={self.alpha_init}"


class _GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)) with the gate and up projections fused into one weight: ``gate_up_proj`` is a
    Linear(dim, 2 * hidden) whose first half of outputs is the gate, the second the up projection, so one
    GEMM feeds one fused gated-unit kernel that reads [gate | up] in place."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim = dim, hidden_dim
        self.gate_up_proj = torch.nn.Linear(dim, 2 * hidden_dim, bias=bias, **kw)
        self.down_proj = torch.nn.Linear(hidden_dim, dim, bias=bias, **kw)

    @torch.no_grad()
    def load_projections(self, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear):
        """Copy separate gate/up/down Linear layers (e.g. a Llama checkpoint's gate_proj, up_proj, down_proj)."""
        h = self.hidden_dim
        self.gate_up_proj.weight[:h].copy_(gate.weight)
        self.gate_up_proj.weight[h:].copy_(up.weight)
        self.down_proj.weight.copy_(down.weight)
        for dst, srcs in ((self.gate_up_proj.bias, (gate.bias, up.bias)), (self.down_proj.bias, (down.bias,))):
            if dst is not None:
                dst.copy_(torch.cat(srcs))
        return self


class SwiGLU(_GatedMLP):
    """The Llama MLP: down(silu(gate(x)) * up(x))."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(x)))


class GeGLU(_GatedMLP):
    """The T5 v1.1 / PaLM-style GeGLU MLP: down(gelu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, approximate: str = "none", device=None,
                 dtype=None):
        super().__init__(dim, hidden_dim, bias, device, dtype)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.geglu(self.gate_up_proj(x), approximate=self.approximate))


PATCH_TABLE.update({
    torch.nn.ReLU: ReLU, torch.nn.LeakyReLU: LeakyReLU, torch.nn.ELU: ELU, torch.nn.SELU: SELU,
    torch.nn.CELU: CELU, torch.nn.Sigmoid: Sigmoid, torch.nn.Tanh: Tanh, torch.nn.Softplus: Softplus,
    torch.nn.GELU: GELU, torch.nn.SiLU: SiLU, torch.nn.Mish: Mish, torch.nn.LogSigmoid: LogSigmoid,
    torch.nn.Hardswish: Hardswish, torch.nn.PReLU: PReLU, torch.nn.GLU: GLU,
})


# ---- rope + attention ----
class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding with its cos/sin tables built once (``tritium.rope_tables``: base, and
    linear / ntk / llama3 / yarn ``scaling``) and kept as non-persistent buffers, so they follow ``.to()`` and
    never enter the state_dict. ``forward(q, k, positions=None)`` -> ``tritium.rope(q, k, cos, sin, positions,
    interleaved)``; ``rotary_dim`` may be smaller than the head dim (partial rotary)."""

    def __init__(self, rotary_dim: int, max_position_embeddings: int = 2048, base: float = 10000.0,
                 scaling=None, interleaved: bool = False, device=None):
        super().__init__()
        self.rotary_dim, self.max_position_embeddings, self.base = rotary_dim, max_position_embeddings, base
        self.scaling, self.interleaved = scaling, interleaved
        cos, sin = ops.rope_tables(max_position_embeddings, rotary_dim, base, scaling, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: Tensor, k: Tensor, positions=None) -> Tuple[Tensor, Tensor]:
        return ops.rope(q, k, self.cos, self.sin, positions, self.interleaved)

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, max_position_embeddings={self.max_position_embeddings}, "
                f"base={self.base}, scaling={self.scaling}, interleaved={self.interleaved}")


# ---- quantized weights ----
# Bumped whenever a served weight or its activation mode changes (a QuantizedLinear's weight or int8_act, a tritium
# Llama projection's serving state): descriptions of the serving path cached elsewhere (Llama's serve_decode
# arguments) compare it and rebuild.
_serving_version = [0]


def serving_version() -> int:
    return _serving_version[0]


def bump_serving_version() -> None:
    _serving_version[0] += 1


class QuantizedLinear(torch.nn.Module):
    """A Linear layer whose weight is stored quantized (tritium.ops.quant.QuantizedWeight: 4- or 8-bit integers
    with per-group scales, packed for its device's kernel); inference and frozen-base training (the input
    gradient flows, the weight takes none). ``int8_act``: 0 (or False) multiplies in float; 1 (or True) quantizes
    the activations per block of 32 to int8 (integer dot products, llama.cpp's way); 2 quantizes them in two int8
    terms, the second holding what the first rounded off (near float accuracy, twice the integer work, still
    faster than float in batches on CPU).

    Build one with ``QuantizedLinear.from_linear(linear, "int8" | "int4", group_size)`` or
    ``tritium.quantize_(model, ...)``. The state_dict holds the packed tensors (``qdata``, ``scales``, ``mins``,
    ``bias``) and the format (extra state); loading it replaces the module's tensors, so a module of any shape
    can load any QuantizedLinear's state. ``.to(device)`` repacks for the new device; ``.to(dtype)`` changes the
    bias only (the quantized storage keeps its own dtypes)."""

    def __init__(self, weight: "ops.quant.QuantizedWeight", bias: Tensor = None, int8_act: int = 0):
        super().__init__()
        self.int8_act = int8_act
        self._set_weight(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_weight(self, w: "ops.quant.QuantizedWeight") -> None:
        self.weight = w   # not a buffer: module._apply must not cast the float16 scales
        self.bits, self.group = w.bits, w.group
        self.in_features, self.out_features = w.k, w.n
        bump_serving_version()

    @property
    def int8_act(self) -> int:
        return self._int8_act

    @int8_act.setter
    def int8_act(self, value: int) -> None:
        if value not in (0, 1, 2):   # False and True included
            raise ValueError(f"QuantizedLinear: int8_act must be 0 (float), 1 or 2 (int8 terms), got {value!r}")
        self._int8_act = int(value)
        bump_serving_version()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: str = "int8", group_size: int = None,
                    int8_act: int = 0) -> "QuantizedLinear":
        w = ops.quant.QuantizedWeight.quantize(linear.weight.detach(), mode, group_size)
        return cls(w, linear.bias, int8_act)

    def forward(self, x: Tensor) -> Tensor:
        y = self.weight.linear(x, self.int8_act)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0)).device       # where .to()/.cuda()/.cpu() sends tensors
        if device != self.weight.device:
            self._set_weight(self.weight.to(device))
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        destination[prefix + "qdata"], destination[prefix + "scales"] = w.qdata, w.scales
        destination[prefix + "mins"] = w.mins

    def get_extra_state(self):
        w = self.weight
        return {"bits": w.bits, "group": w.group, "out_features": w.n, "in_features": w.k,
                "int8_act": self.int8_act, "device_type": w.device.type}

    def set_extra_state(self, state):
        self._pending_format = state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ("qdata", "scales", "mins")
        got = {n: state_dict.get(prefix + n) for n in names}
        bias_key = prefix + "bias"
        if self.bias is None and bias_key in state_dict:
            self.bias = torch.nn.Parameter(state_dict[bias_key].detach().clone(), requires_grad=False)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k[len(prefix):] not in names},
                                      prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        fmt = getattr(self, "_pending_format", None)
        if fmt is None or any(v is None for v in got.values()):
            missing_keys.extend(prefix + n for n in names if got[n] is None)
            return
        w = ops.quant.QuantizedWeight(got["qdata"], got["scales"], got["mins"], fmt["bits"], fmt["group"],
                                      fmt["out_features"], fmt["in_features"])
        if fmt["device_type"] != got["qdata"].device.type or w.device != self.weight.device:
            # packed for another device's kernel: unpack with that device's layout, repack for ours
            src = w if fmt["device_type"] == got["qdata"].device.type else w.to(fmt["device_type"])
            w = src.to(self.weight.device)
        self.int8_act = fmt["int8_act"]
        self._set_weight(w)
        del self._pending_format

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={w.k}, out_features={w.n}, bias={self.bias is not None}, bits={w.bits}, "
                f"group={w.group}, int8_act={self.int8_act}")


def quantize_(model: torch.nn.Module, mode: str = "int8", group_size: int = None, int8_act: int = 0,
              filter=None) -> torch.nn.Module:
    """Convert ``model``'s linear layers in place to QuantizedLinear (weight-only: "int8" per output channel, or
    per group when group_size is given; "int4" per group of group_size, default 32) and return the model.
    Every torch.nn.Linear (and subclass) is converted and every tritium.nn.MoE stores its experts quantized
    (MoE.quantize_), or those for which ``filter(module, qualified_name)`` is true. A tritium Llama
    (tritium.models.llama.Llama) converts its own projections, experts and LM head instead (Llama.quantize_).
    The float weights are released. ``int8_act``: the layers' activation mode (QuantizedLinear)."""
    from .models.llama import Llama

    if isinstance(model, Llama):
        return model.quantize_(mode, group_size, int8_act)
    if isinstance(model, MoE):
        return model.quantize_(mode, group_size, int8_act)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, MoE) and (filter is None or filter(child, full)):
                child.quantize_(mode, group_size, int8_act)
            elif isinstance(child, torch.nn.Linear) and (filter is None or filter(child, full)):
                setattr(module, child_name, QuantizedLinear.from_linear(child, mode, group_size, int8_act))
    return model


# ---- LoRA adapters (tritium.ops.lora; tritium.lora applies them to a model, docs/lora.md) ----
def _check_lora_args(fn: str, r, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{fn}: r must be a positive integer, got {r!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"{fn}: dropout must be in [0, 1), got {lora_dropout!r}")


class LoRALinear(torch.nn.Linear):
    """A frozen torch.nn.Linear plus a trained low-rank adapter, PEFT's LoRA Linear: forward(x) = x W^T + bias +
    scaling (dropout(x) A^T) B^T through tritium.lora_linear, scaling = lora_alpha / r (lora_alpha / sqrt(r) with
    use_rslora). ``weight`` and ``bias`` are the base layer's, frozen (requires_grad False); ``lora_A`` (r, in) starts
    as PEFT's (Kaiming-uniform, a = sqrt(5)) and ``lora_B`` (out, r) at zeros, so a new adapter leaves the output as
    it was. ``lora_dropout``: the dropout probability on the adapter's input while training.

    ``merge()`` adds scaling B A into the weight (forward is then the plain linear layer), ``unmerge()`` subtracts
    it again. ``LoRALinear.from_linear(linear, r, lora_alpha, lora_dropout)`` wraps an existing layer (sharing its
    weight and bias); ``tritium.lora.apply(model, ...)`` does it for a model's layers."""

    def __init__(self, in_features: int, out_features: int, r: int = 16, lora_alpha: float = 32.0,
                 lora_dropout: float = 0.0, bias: bool = True, device=None, dtype=None, use_rslora: bool = False):
        _check_lora_args("LoRALinear", r, lora_dropout)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = torch.nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, r, **kw))
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, r: int = 16, lora_alpha: float = 32.0, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """A LoRALinear around ``linear``: its weight and bias Parameters (now frozen), new adapters on its device
        and in its dtype."""
        _check_lora_args("LoRALinear.from_linear", r, lora_dropout)
        w = linear.weight
        with torch.device("meta"):   # no second copy of the weight: the layer's own Parameters are put in below
            m = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, linear.bias is not None,
                    use_rslora=use_rslora)
        m.weight = w
        m.bias = linear.bias
        m.weight.requires_grad_(False)
        if m.bias is not None:
            m.bias.requires_grad_(False)
        m.lora_A = torch.nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        m.lora_B = torch.nn.Parameter(torch.zeros(linear.out_features, r, device=w.device, dtype=w.dtype))
        m.reset_lora_parameters()
        m.train(linear.training)
        return m

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.lora_B.zero_()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def delta_weight(self) -> Tensor:
        """scaling B A (out, in), computed in float32 (float64 for a float64 weight), in the weight's dtype."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return ((self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """weight += scaling B A; forward is then the plain linear layer (no adapter term) until unmerge()."""
        if self.base_kind is not None:
            kind = "NF4" if self.base_kind == "nf4" else self.base_kind
            raise NotImplementedError(f"LoRALinear.merge: the base weight is {kind} (quantize_base); "
                                      f"merging would requantize it: keep the adapter separate, or "
                                      f"dequantize_base() first to merge into the float copy of its values")
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight -= scaling B A: the base weight again (up to the rounding of the weight's dtype)."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    nf4_meta = None    # (shape, blocksize, dtype) once quantize_base made the base NF4 (QLoRA)
    quant_dtype = None  # the float weight's dtype once quantize_base made the base int8/int4 (weight_quant)

    @torch.no_grad()
    def quantize_base(self, quantize: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                      group_size: Optional[int] = None) -> "LoRALinear":
        """The frozen base weight replaced by a quantized one (tritium.ops.lora.quantize_frozen), multiplied from
        its stored bytes in the kernel; ``weight`` becomes None. "nf4" (QLoRA): bitsandbytes' layout, buffers
        ``weight_nf4``, ``weight_absmax`` and with double_quant ``weight_absmax2``, ``weight_offset``. "int8" (per
        output channel, or per group of group_size) and "int4" (per group of group_size, default 32):
        a tritium.nn.QuantizedLinear ``weight_quant`` (no bias) holding the QuantizedWeight, whose state_dict
        entries (``weight_quant.qdata``, ...) carry the format. A quantized base cannot be merged into
        (dequantize_base() first). Returns self."""
        fn = "LoRALinear.quantize_base"
        if self.merged:
            raise RuntimeError(f"{fn}: unmerge() first (the base would hold the adapter)")
        if self.base_kind is not None:
            if self.base_kind != quantize:
                raise ValueError(f"{fn}: the base is already {self.base_kind}; dequantize_base() first to make it "
                                 f"{quantize!r}")
            return self
        q = ops.lora.quantize_frozen(fn, self.weight, quantize, blocksize, double_quant, group_size)
        if quantize == "nf4":
            self.register_buffer("weight_nf4", q.data)
            self.register_buffer("weight_absmax", q.absmax)
            if q.double_quant:
                self.register_buffer("weight_absmax2", q.absmax2)
                self.register_buffer("weight_offset", q.offset)
            self.nf4_meta = (q.shape, q.blocksize, q.dtype)
        else:
            self.weight_quant = QuantizedLinear(q, None)
            self.quant_dtype = self.weight.dtype
        self.weight = None
        return self

    @property
    def base_kind(self) -> Optional[str]:
        """None for a float base, else the quantized base's kind: "nf4", "int8" or "int4"."""
        if self.nf4_meta is not None:
            return "nf4"
        return None if self.quant_dtype is None else f"int{self.weight_quant.weight.bits}"

    def frozen_base(self):
        """The quantized base (quantize_base): an NF4Weight or a QuantizedWeight; None for a float base."""
        return self.nf4_weight() if self.nf4_meta is not None else (
            None if self.quant_dtype is None else self.weight_quant.weight)

    def nf4_weight(self):
        """The NF4Weight of an NF4 base (quantize_base("nf4")), or None."""
        if self.nf4_meta is None:
            return None
        shape, blocksize, dtype = self.nf4_meta
        dq = hasattr(self, "weight_absmax2")
        return ops.nf4.NF4Weight(self.weight_nf4, self.weight_absmax, shape, blocksize, dtype,
                                 self.weight_absmax2 if dq else None, self.weight_offset if dq else None)

    @torch.no_grad()
    def dequantize_base(self) -> "LoRALinear":
        """A quantized base (quantize_base) back to a float ``weight`` holding its dequantised values, in the dtype
        it was quantized from (frozen): what the adapter then merges into to be served. Returns self."""
        base = self.frozen_base()
        if base is None:
            return self
        dtype = self.nf4_meta[2] if self.nf4_meta is not None else self.quant_dtype
        self.weight = torch.nn.Parameter(base.dequantize(dtype), requires_grad=False)
        if self.nf4_meta is not None:
            for name in ("weight_nf4", "weight_absmax", "weight_absmax2", "weight_offset"):
                if hasattr(self, name):
                    delattr(self, name)
            del self.nf4_meta
        else:
            del self.weight_quant
            del self.quant_dtype
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return ops.linear(x, self.weight, self.bias)
        weight = self.weight if self.base_kind is None else self.frozen_base()
        return ops.lora_linear(x, weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
                               self.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"
                f"{', use_rslora=True' if self.use_rslora else ''}{', merged' if self.merged else ''}"
                f"{f', base={self.base_kind}' if self.base_kind is not None else ''}")


# ---- mixture of experts ----
class MoE(torch.nn.Module):
    """A dropless top-k mixture of SwiGLU experts (Mixtral / Qwen-MoE's sparse MLP) through tritium.moe:
    forward(x) -> MoEOutput(output, aux_loss, z_loss), output (*, dim) in x's dtype and the router's
    load-balancing loss (aux_loss_coef * E * sum_i f_i P_i) and z-loss (z_loss_coef * mean logsumexp^2).

    Parameters: ``router_weight`` (num_experts, dim), ``w13`` (num_experts, 2 ffn_dim, dim) each expert's fused
    [gate; up] projection, ``w2`` (num_experts, dim, ffn_dim) its down projection; with ``shared_expert`` a
    dense SwiGLU MLP of the same ffn_dim every token goes through (Qwen-MoE / DeepSeek's), added to the output.
    ``impl="reference"`` runs tritium.reference.moe, the eager loop over experts (the twin the kernels are
    checked against)."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, score: str = "softmax",
                 renormalize: bool = True, shared_expert: bool = False, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.001, impl: str = "tritium", device=None, dtype=None):
        super().__init__()
        for name, v in (("dim", dim), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoE: {name} must be a positive integer, got {v!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be an integer in [1, num_experts = {num_experts}], got {top_k!r}")
        if score not in ops.moe_ops.SCORES:
            raise ValueError(f"MoE: score must be one of {ops.moe_ops.SCORES}, got {score!r}")
        if impl not in ("tritium", "reference"):
            raise ValueError(f"MoE: impl must be 'tritium' or 'reference', got {impl!r}")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.ffn_dim, self.num_experts, self.top_k = dim, ffn_dim, num_experts, top_k
        self.score, self.renormalize, self.impl = score, renormalize, impl
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router_weight = torch.nn.Parameter(torch.empty(num_experts, dim, **kw))
        self.w13 = torch.nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, dim, **kw))
        self.w2 = torch.nn.Parameter(torch.empty(num_experts, dim, ffn_dim, **kw))
        self.shared = SwiGLU(dim, ffn_dim, **kw) if shared_expert else None
        self.experts13 = self.experts2 = None   # quantize_: the experts' projections as QuantizedLinear modules
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation for each expert's projections and the router."""
        for w, fan_in in ((self.router_weight, self.dim), (self.w13, self.dim), (self.w2, self.ffn_dim)):
            bound = 1.0 / fan_in ** 0.5
            if w is not None:
                w.uniform_(-bound, bound)

    @torch.no_grad()
    def quantize_(self, mode: str = "int8", group_size: int = None, int8_act: int = 0) -> "MoE":
        """Store each expert's fused gate/up projection (w13[e]) and down projection (w2[e]) quantized, as
        ``experts13`` and ``experts2`` (ModuleLists of QuantizedLinear: "int8" per output channel or per group,
        "int4" per group of group_size, default 32; int8_act as QuantizedLinear's), and the shared expert's linear
        layers likewise; w13 and w2 are released. Forward then runs tritium.ops.moe_ops.moe_quantized: each step
        reads only the experts its tokens are routed to, in 4 or 8 bits. For inference and frozen-base training
        (gradients reach x and the router, not the experts). Returns self."""
        if self.experts13 is not None:
            return self

        def quantized(w: Tensor) -> QuantizedLinear:
            return QuantizedLinear(ops.quant.QuantizedWeight.quantize(w, mode, group_size), None, int8_act)

        self.set_quantized_experts([quantized(w) for w in self.w13.detach()], [quantized(w) for w in self.w2.detach()])
        if self.shared is not None:
            quantize_(self.shared, mode, group_size, int8_act)
        return self

    def expert_weights(self):
        """(w13, w2) as float stacks (detached): the parameters, or the quantized experts dequantized (float32)."""
        if self.experts13 is None:
            return self.w13.detach(), self.w2.detach()

        def dense(m) -> Tensor:
            parts = list(m) if isinstance(m, torch.nn.ModuleList) else [m]
            return torch.cat([q.weight.dequantize() for q in parts], 0)

        return (torch.stack([dense(m) for m in self.experts13]), torch.stack([dense(m) for m in self.experts2]))

    def set_quantized_experts(self, experts13, experts2) -> None:
        """Run the experts from quantized projections, one per expert: experts13[e] its [gate; up] product
        (dim -> 2 ffn_dim) and experts2[e] its down product (ffn_dim -> dim), e.g. QuantizedLinear modules built
        from a GGUF file's blocks; w13 and w2 are released. None and None go back to float experts (new, uninitialised
        w13 and w2 in the router's dtype)."""
        if experts13 is None:
            kw = {"device": self.router_weight.device, "dtype": self.router_weight.dtype}
            self.experts13 = self.experts2 = None
            self.w13 = torch.nn.Parameter(torch.empty(self.num_experts, 2 * self.ffn_dim, self.dim, **kw))
            self.w2 = torch.nn.Parameter(torch.empty(self.num_experts, self.dim, self.ffn_dim, **kw))
            return
        experts13, experts2 = torch.nn.ModuleList(experts13), torch.nn.ModuleList(experts2)
        ops.moe_ops.check_quantized_experts("MoE.set_quantized_experts", self.router_weight.new_empty(0, self.dim),
                                            self.router_weight, experts13, experts2, self.top_k, self.score,
                                            self.renormalize)
        if (experts13[0].out_features, experts13[0].in_features) != (2 * self.ffn_dim, self.dim):
            raise ValueError(f"MoE.set_quantized_experts: the experts must be (2 ffn_dim, dim) = "
                             f"({2 * self.ffn_dim}, {self.dim}), got ({experts13[0].out_features}, "
                             f"{experts13[0].in_features})")
        self.w13 = self.w2 = None   # registered Parameters set to None: gone from parameters() and the state_dict
        self.experts13, self.experts2 = experts13, experts2

    def forward(self, x: Tensor):
        from .reference import moe as reference_moe

        args = (x, self.router_weight, self.w13, self.w2, self.top_k, self.score, self.renormalize,
                self.aux_loss_coef, self.z_loss_coef)
        if self.experts13 is not None:
            out = ops.moe_ops.moe_quantized(x, self.router_weight, self.experts13, self.experts2, *args[4:])
        elif self.impl == "reference":
            ops.moe_ops.check_moe_args("MoE", *args[:7])
            out = ops.moe_ops.MoEOutput(*reference_moe(*args))
        else:
            out = ops.moe(*args)
        if self.shared is not None:
            out = out._replace(output=out.output + self.shared(x))
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score={self.score!r}, renormalize={self.renormalize}, shared_expert={self.shared is not None}"
                f"{', impl=reference' if self.impl == 'reference' else ''}"
                f"{', experts quantized' if self.experts13 is not None else ''}")
