"""A Llama-style decoder built on tritium ops (gpt-fast style: one file, a config dataclass, named configs).

Per layer: fused residual add + RMSNorm, one fused QKV projection, RoPE, attention (flash attention over a
whole sequence for plain forwards and prefill, a prefill continuing a cached sequence reading its earlier K/V
from the pools; append_kv + paged decode attention over the paged KV cache for
decode), the output projection, fused add + RMSNorm, one fused gate/up projection, SwiGLU, the down projection.
GQA (n_kv_heads dividing n_heads), partial rotary, tied or untied LM head; float32 and bfloat16. With
num_experts > 0 each block's MLP is a dropless top-k mixture of SwiGLU experts (Mixtral's sparse MLP, on
tritium.moe), optionally with a dense shared expert.

The model never imports tritium.inference: a step takes the cache's pools and metadata as tensors
(``forward_step``), and the engine owns allocation and scheduling.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import tritium
from tritium.ops.activations import GATE_OPS, LAYOUT_GATE_UP
from tritium.nn import MoE, bump_serving_version, serving_version
from tritium.ops.linear import PackedLinear

# the serving path's ops (Block.serve, Llama._serve_decoder): called directly, with arguments the engine builds
# valid (the public functions' per-call checks would cost as much as a decode step's small kernels)
_APPEND_KV = torch.ops.tritium.append_kv.default
_PAGED_DECODE = torch.ops.tritium.paged_attention_decode.default
_RMS_NORM = torch.ops.tritium.rms_norm_fwd.default
_ADD_RMS_NORM = torch.ops.tritium.fused_add_rms_norm_fwd.default
_ROPE = torch.ops.tritium.rope_fwd.default
_SWIGLU = GATE_OPS["swiglu"][0]
_SERVE_DECODE = torch.ops.tritium.serve_decode.default
_MISSING = object()


@dataclass
class LlamaConfig:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rotary_dim: Optional[int] = None          # None: head_dim (partial rotary when smaller)
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    rope_scaling: Optional[dict] = None       # None or an HF rope_scaling dict (tritium.rope_tables' kinds)
    # mixture of experts (Mixtral; 0 experts: the dense SwiGLU MLP): each block routes a token to top_k of
    # num_experts SwiGLU experts of ffn_dim (softmax scores, the k weights renormalised to sum 1); shared_ffn_dim > 0
    # adds a dense SwiGLU MLP of that size every token goes through (DeepSeek's ungated shared expert). The
    # router's losses (tritium.moe's aux_loss and z_loss with these coefficients) reach the caller through the
    # forwards' `aux` list.
    num_experts: int = 0
    top_k: int = 2
    shared_ffn_dim: int = 0
    router_aux_loss_coef: float = 0.001       # Hugging Face Mixtral's default
    router_z_loss_coef: float = 0.0

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim, got {self.rotary_dim}")
        for name in ("num_experts", "shared_ffn_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.num_experts and not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"top_k must be an integer in [1, num_experts = {self.num_experts}], got {self.top_k!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def n_params(self) -> int:
        mlp = (self.num_experts * (3 * self.dim * self.ffn_dim + self.dim) + 3 * self.dim * self.shared_ffn_dim
               if self.num_experts else 3 * self.dim * self.ffn_dim)
        per_layer = (self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
                     + self.n_heads * self.head_dim * self.dim + mlp + 2 * self.dim)
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head


CONFIGS: Dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                                vocab_size=49152, norm_eps=1e-5, rope_base=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
    # tiny test configs: odd sizes, GQA, MHA, partial rotary, untied head
    "tiny": LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=72, vocab_size=97,
                        rope_base=10000.0, max_seq_len=256, tie_embeddings=True),
    "tiny-mha-untied": LlamaConfig(dim=40, n_layers=3, n_heads=5, n_kv_heads=5, head_dim=8, ffn_dim=56,
                                   vocab_size=131, max_seq_len=256, tie_embeddings=False),
    "tiny-partial-rotary": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, rotary_dim=8,
                                       ffn_dim=80, vocab_size=89, max_seq_len=256, tie_embeddings=False),
    # mixture of experts: Mixtral-style (4 experts, top 2), and with a shared expert and every expert chosen
    "tiny-moe": LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=40, vocab_size=97,
                            max_seq_len=256, tie_embeddings=False, num_experts=4, top_k=2),
    "tiny-moe-shared": LlamaConfig(dim=40, n_layers=2, n_heads=5, n_kv_heads=1, head_dim=8, ffn_dim=24,
                                   vocab_size=89, max_seq_len=256, num_experts=3, top_k=3, shared_ffn_dim=56,
                                   router_z_loss_coef=1e-3),
}


def _rope_tables(c: LlamaConfig, max_positions: int) -> Tuple[Tensor, Tensor]:
    """(cos, sin) (max_positions, rotary_dim // 2) float32 of the config (its base and scaling)."""
    return tritium.rope_tables(max_positions, c.rotary_dim, c.rope_base, c.rope_scaling)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepInput:
    """One engine step over a packed batch of tokens: decode tokens first (one per running sequence), then
    the prompt chunks being prefilled back to back (each from position 0, or continuing a sequence whose earlier
    tokens' K/V are in the cache: prefill_slots).

    tokens, positions, slot_mapping: int64 (T,); block_tables int32 (n_decode, max_blocks) and seq_lens int32
    (n_decode,) for the decode rows (seq_lens include the token being decoded); prefill_lens: host ints (their
    sum is T - n_decode); prefill_slots: empty (every prefill starts at position 0) or one entry per prefill:
    None (it starts at position 0) or the int64 (start + n,) slots of all the sequence's positions up to the
    chunk's end, the chunk's own last (its n tokens are at positions [start, start + n): the chunk's queries
    attend to the K/V of [0, start) read from the pools and to its own, causally); logits_rows int64: which
    rows' logits to return (None: every row).
    last_logits_only: the logits wanted are exactly the decode rows' and each prefill's last token's (what the
    engine asks for; logits_rows then need not be given): the last layer then runs its attention output, MLP and
    the final norm on those rows only, as llama.cpp does (the other rows' last-layer outputs feed nothing: the
    cache needs their K/V, which come before) — a 512-token prefill skips 1/n_layers of its work."""
    tokens: Tensor
    positions: Tensor
    slot_mapping: Tensor
    n_decode: int
    block_tables: Optional[Tensor]
    seq_lens: Optional[Tensor]
    prefill_lens: List[int] = field(default_factory=list)
    logits_rows: Optional[Tensor] = None
    last_logits_only: bool = False
    prefill_slots: List[Optional[Tensor]] = field(default_factory=list)


def _paged_attention(q: Tensor, k: Tensor, v: Tensor, step: StepInput, kv: Tuple[Tensor, Tensor], scale: float,
                     last: bool) -> Tensor:
    """One serving step's attention for one layer. Writes k, v (T, n_kv_heads, head_dim) into the layer's pools
    kv = (k_pool, v_pool) at step.slot_mapping; then each decode row attends over its cached sequence
    (paged_attention_decode) and each prompt chunk to itself, or, continuing a cached sequence
    (step.prefill_slots), to all the sequence's K/V gathered from the pools after this step's writes (causal flash
    attention, bottom-right aligned: the chunk's query i, at position start + i, sees keys 0..start + i).
    last: of each prompt only its last query (the rows StepInput.last_logits_only keeps; causal attention is
    bottom-right aligned, so that query still sees all the prompt's keys). Returns (rows, n_heads, head_dim)."""
    k_pool, v_pool = kv
    _APPEND_KV(k, v, k_pool, v_pool, step.slot_mapping)
    nd = step.n_decode
    if not step.prefill_lens:   # decode only: the common step
        return _PAGED_DECODE(q, k_pool, v_pool, step.block_tables, step.seq_lens, scale, None, None)
    outs = []
    if nd:
        outs.append(_PAGED_DECODE(q[:nd], k_pool, v_pool, step.block_tables, step.seq_lens, scale, None, None))
    start = nd
    ctx = step.prefill_slots
    for i, n in enumerate(step.prefill_lens):
        sl = slice(start, start + n)
        qs = slice(start + n - 1, start + n) if last else sl
        slots = ctx[i] if ctx else None
        if slots is None:
            ks, vs = k[None, sl], v[None, sl]
        else:   # the whole sequence so far, this chunk included (written above), from the pools
            ks = k_pool.view(-1, *k_pool.shape[2:]).index_select(0, slots)[None]
            vs = v_pool.view(-1, *v_pool.shape[2:]).index_select(0, slots)[None]
        o = tritium.flash_attention(q[None, qs].transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                    causal=True)                                       # (1, h, rows, hd)
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


class LoRAParts(nn.Module):
    """LoRA adapters on row blocks of one projection. A fused projection is several Hugging Face layers side by
    side ([q | k | v], [gate | up]): block j (``sizes[j]`` output rows) with an adapter (``chosen[j]``) has
    ``lora_A[i]`` (r, in) and ``lora_B[i]`` (sizes[j], r), PEFT's initialisation (A Kaiming-uniform, B zeros)
    and PEFT's scaling (lora_alpha / r, or / sqrt(r) with use_rslora). The projection then runs one
    tritium.lora_linear call with the adapters stacked: A = [A_i] (n r, in) and B block-diagonal (out, n r),
    zero rows where a block has no adapter, which is the sum of the blocks' separate LoRA terms."""

    def __init__(self, in_features: int, sizes: Sequence[int], chosen: Sequence[bool], r: int, lora_alpha: float,
                 lora_dropout: float, use_rslora: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.sizes, self.chosen = list(sizes), list(chosen)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.merged = False   # Linear.merge_lora: scaling B A is in the weight, the forward skips the adapters
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.ParameterList(torch.empty(r, in_features, **kw) for c in chosen if c)
        self.lora_B = nn.ParameterList(torch.zeros(n, r, **kw) for n, c in zip(sizes, chosen) if c)
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def blocks(self) -> List[int]:
        """The indices of the row blocks that have an adapter, in lora_A / lora_B order."""
        return [j for j, c in enumerate(self.chosen) if c]

    def stacked(self) -> Tuple[Tensor, Tensor]:
        """(A (n r, in), B (out, n r)): the adapters as one LoRA pair (differentiable in every lora_A/lora_B)."""
        if len(self.sizes) == 1:
            return self.lora_A[0], self.lora_B[0]
        A = self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A))
        it = iter(self.lora_B)
        return A, torch.block_diag(*(next(it) if c else A.new_zeros(n, 0) for n, c in zip(self.sizes, self.chosen)))

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """scaling B A (out, in), computed in float32 (float64 for float64), in ``dtype``."""
        A, B = self.stacked()
        acc = torch.promote_types(dtype, torch.float32)
        return ((B.detach().to(acc) @ A.detach().to(acc)) * self.scaling).to(dtype)


class Linear(nn.Module):
    """A bias-free projection x @ weight^T, weight (out, in), that the serving path serves.

    ``linear(x)``: plain torch (autograd; training and the plain forward). ``linear.serve(x)``: the serving
    path, through the PackedLinear that Llama.pack_for_inference attached (tritium.ops.linear decides there how
    to compute the product and keeps any packed copy; without one, PackedLinear's unpacked way), or the
    quantized op when the weight is stored quantized (set_quantized). swiglu: the weight is a fused [gate | up]
    projection and the output is silu(gate) * up. int8_terms: the int8 activation terms the projection takes in
    Llama.set_int8_activations(1) (1 or 2; see there)."""

    def __init__(self, in_features: int, out_features: int, swiglu: bool = False, int8_terms: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.out_features, self.in_features = out_features, in_features
        self.swiglu, self.int8_terms = swiglu, int8_terms
        self.server: Optional[PackedLinear] = None
        self.quant: Optional[nn.Module] = None   # set_quantized: the weight stored quantized instead
        self._serve_fn = None                    # serve()'s product, built on first use
        self.lora: Optional[LoRAParts] = None    # add_lora: adapters trained on the frozen weight
        self.qbase = None     # quantize_base: the frozen weight quantized (NF4Weight: QLoRA, or QuantizedWeight)
        self.qbase_dtype: Optional[torch.dtype] = None   # the float weight's dtype (dequantize_base's)

    @property
    def nf4(self):
        """The NF4 base (quantize_base("nf4")), or None."""
        return self.qbase if isinstance(self.qbase, tritium.ops.nf4.NF4Weight) else None

    def reset_serving(self) -> None:
        """Drop serve()'s callable (built again on next use) and bump tritium.nn.serving_version, which drops
        the model's cached serve_decode arguments: after the weight or its serving copies change."""
        self._serve_fn = None
        bump_serving_version()

    @property
    def quant_parts(self) -> list:
        """The QuantizedLinear modules the weight is stored in (several for QuantizedParts; none when float)."""
        q = self.quant
        return [] if q is None else list(q) if isinstance(q, QuantizedParts) else [q]

    def set_quantized(self, quant: Optional[nn.Module], dtype: torch.dtype = torch.float32) -> None:
        """Serve (and run the plain forward) through quant, a tritium.nn.QuantizedLinear (or QuantizedParts),
        releasing the float weight; None goes back to a float weight (uninitialised, of dtype, if it had none)."""
        self.quant, self.server = quant, None
        self.reset_serving()
        if quant is not None:
            self.weight = None
        elif self.weight is None:
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=dtype),
                                       requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """The plain forward (autograd): torch's matmul, the quantized layer, or with adapters (add_lora) one
        tritium.lora_linear call."""
        base = self.weight if self.qbase is None else self.qbase
        if self.lora is not None and not self.lora.merged:
            A, B = self.lora.stacked()
            y = tritium.lora_linear(x, base, None, A, B, self.lora.scaling, self.lora.lora_dropout, self.training)
        elif self.qbase is not None:
            y = tritium.ops.lora.frozen_linear(x, self.qbase)
        else:
            y = self.quant(x) if self.quant is not None else torch.matmul(x, self.weight.t())
        return tritium.swiglu(y) if self.swiglu else y

    def add_lora(self, sizes: Sequence[int], chosen: Sequence[bool], r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False) -> LoRAParts:
        """Adapters on the row blocks ``sizes`` (summing to out_features) where ``chosen`` (LoRAParts); the
        weight is frozen. Needs a float weight: a quantized one raises NotImplementedError."""
        if self.weight is None:
            raise NotImplementedError("add_lora: the projection is stored quantized; load the model with float "
                                      "weights (weights='float') to train adapters on it")
        if sum(sizes) != self.out_features or len(sizes) != len(chosen) or not any(chosen):
            raise ValueError(f"add_lora: sizes {list(sizes)} must sum to out_features {self.out_features}, with "
                             f"one chosen flag each and at least one chosen, got {list(chosen)}")
        self.weight.requires_grad_(False)
        self.lora = LoRAParts(self.in_features, sizes, chosen, r, lora_alpha, lora_dropout, use_rslora,
                              self.weight.dtype, self.weight.device)
        self.reset_serving()
        return self.lora

    def quantize_base(self, blocksize: int = 64, double_quant: bool = False, *, quantize: str = "nf4",
                      group_size: Optional[int] = None) -> None:
        """The frozen float weight replaced by a quantized one for LoRA training (tritium.ops.lora.quantize_frozen):
        "nf4" (QLoRA; bitsandbytes' layout, blocksize, double_quant), "int8" (per channel or per group_size) or
        "int4" (per group_size, default 32), multiplied from its stored bytes by the plain forward;
        dequantize_base() goes back."""
        if self.qbase is None:
            if self.weight is None:
                raise NotImplementedError("quantize_base: the projection is already stored quantized")
            self.qbase = tritium.ops.lora.quantize_frozen("quantize_base", self.weight.detach(), quantize,
                                                          blocksize, double_quant, group_size)
            self.qbase_dtype = self.weight.dtype
            self.weight = None
            self.reset_serving()

    def dequantize_base(self) -> None:
        """The quantized base (quantize_base) back to a float weight (its dequantised values, in the weight's
        former dtype), e.g. to merge the trained adapters into it and serve."""
        if self.qbase is not None:
            self.weight = nn.Parameter(self.qbase.dequantize(self.qbase_dtype), requires_grad=False)
            self.qbase = self.qbase_dtype = None
            self.reset_serving()

    def _check_servable(self) -> None:
        if self.qbase is not None:
            kind = "an NF4" if self.nf4 is not None else "a quantized (int8/int4)"
            raise ValueError(f"the serving path does not take {kind} base: dequantize_base() it (and merge the "
                             "adapters) first")
        if self.lora is not None and not self.lora.merged:
            raise ValueError("the serving path does not apply LoRA adapters: merge them into the weights first "
                             "(tritium.lora.merge(model)), or use the plain forward")

    @torch.no_grad()
    def merge_lora(self, merge: bool = True) -> None:
        """weight += scaling B A (merge) or -= it (merge=False, undoing a merge): merged, the plain and serving
        forwards are the plain projection's, without the adapters' cost."""
        lora = self.lora
        if lora is not None and lora.merged != merge and self.qbase is not None:
            raise ValueError("merge_lora: the base is quantized (quantize_base); dequantize_base() first to merge "
                             "into float")
        if lora is not None and lora.merged != merge:
            delta = lora.delta_weight(self.weight.dtype)
            self.weight.add_(delta if merge else -delta)
            lora.merged = merge
            self.server = None
            self.reset_serving()

    def serve(self, x: Tensor) -> Tensor:
        """The serving path's product for x (T, in): the quantized op, or the PackedLinear that
        Llama.pack_for_inference attached (without one, PackedLinear's unpacked way); SwiGLU applied for a
        swiglu weight. The callable is built once (set_quantized and pack_for_inference rebuild it)."""
        if self._serve_fn is None:
            self._serve_fn = self._build_serve_fn()
        return self._serve_fn(x)

    def decode_plan(self, rows: int) -> Optional[tuple]:
        """serve()'s product for `rows` rows as tritium.ops.serve.serve_decode takes a projection: (its three
        tensors, its six ints: kind then five parameters), or None when it has none (quantized parts of
        different formats, a bias). Llama._decode_args caches what this returns."""
        from tritium.nn import QuantizedLinear

        self._check_servable()
        q = self.quant
        if q is None:
            server = self.server or PackedLinear(self.weight, self.swiglu, pack=False)
            kind, tensors, ints = server.decode_plan(rows)
        elif isinstance(q, QuantizedLinear) and q.bias is None:
            kind, tensors, ints = q.weight.decode_plan(q.int8_act)
        else:
            return None
        return tuple(tensors), (kind, *ints)

    def _build_serve_fn(self):
        self._check_servable()
        q = self.quant
        if q is None:
            return self.server or PackedLinear(self.weight, self.swiglu, pack=False)  # applies swiglu itself
        f = q.forward   # QuantizedLinear or QuantizedParts, without the module-call overhead
        if not self.swiglu:
            return f
        return lambda x: _SWIGLU(f(x), None, LAYOUT_GATE_UP)


class QuantizedParts(nn.ModuleList):
    """Quantized projections of different formats side by side (e.g. a fused QKV whose V is Q6_K and Q, K are
    Q4_K, as llama.cpp's mixed files have): the output is their outputs concatenated."""

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self)

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.weight.nbytes for p in self)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self], -1)


def _quant_module(parts: list) -> nn.Module:
    """A QuantizedLinear for logical quantized weights stacked along n (one packed weight when their formats
    agree), else QuantizedParts."""
    from tritium.nn import QuantizedLinear
    from tritium.ops.quant import QuantizedWeight, cat_logical

    parts = [_logical(p) for p in parts]
    fused = cat_logical(parts) if len(parts) > 1 else parts[0]
    if fused is not None:
        return QuantizedLinear(QuantizedWeight.from_logical(*fused))
    return QuantizedParts(QuantizedLinear(QuantizedWeight.from_logical(*p)) for p in parts)


def _quant_bytes(m: Optional[nn.Module]) -> int:
    if m is None:
        return 0
    return m.nbytes if isinstance(m, QuantizedParts) else m.weight.nbytes


class Attention(nn.Module):
    """Grouped-query self-attention: one fused QKV projection, RoPE, attention, the output projection."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.wqkv = Linear(c.dim, q + 2 * kv)       # [q | k | v] rows
        self.wo = Linear(q, c.dim)
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.split = (q, kv, kv)
        self.scale = 1.0 / math.sqrt(c.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (batch, seq, dim): causal attention within each sequence (the plain forward)."""
        q, k, v = self.wqkv(x).split(self.split, -1)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = tritium.rope(q, k, cos, sin)
        o = tritium.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    causal=True).transpose(1, 2)                      # (b, s, h, hd)
        return self.wo(o.flatten(-2))

    def serve(self, x: Tensor, cos: Tensor, sin: Tensor, step: StepInput, kv: Tuple[Tensor, Tensor],
              last: bool) -> Tensor:
        """The serving step: x (T, dim), the step's packed tokens, attending through the layer's paged cache kv
        (see _paged_attention); the ops called directly (no module calls, no per-call checks)."""
        t = x.shape[0]
        q, k, v = self.wqkv.serve(x).split(self.split, -1)
        q, k = _ROPE(q.view(t, self.n_heads, self.head_dim), k.view(t, self.n_kv_heads, self.head_dim), cos, sin,
                     step.positions, False, False)
        o = _paged_attention(q, k, v.view(t, self.n_kv_heads, self.head_dim), step, kv, self.scale, last)
        return self.wo.serve(o.reshape(o.shape[0], -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate_up = Linear(dim, 2 * ffn_dim, swiglu=True, int8_terms=1)   # [gate | up] rows
        self.w_down = Linear(ffn_dim, dim)

    def forward(self, x: Tensor, aux: Optional[list] = None) -> Tensor:
        return self.w_down(self.w_gate_up(x))

    def serve(self, x: Tensor) -> Tensor:
        return self.w_down.serve(self.w_gate_up.serve(x))


class MoEMLP(nn.Module):
    """Mixtral's sparse MLP: tritium.nn.MoE (the router, each expert's fused gate/up weight w13 (E, 2F, D) and
    down weight w2 (E, D, F): Hugging Face Mixtral's layout) plus, with shared_ffn_dim, a dense SwiGLU MLP every
    token goes through. forward appends the router's losses (aux_loss + z_loss) to aux when given one."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.moe = MoE(c.dim, c.ffn_dim, c.num_experts, c.top_k, aux_loss_coef=c.router_aux_loss_coef,
                       z_loss_coef=c.router_z_loss_coef)
        self.shared = MLP(c.dim, c.shared_ffn_dim) if c.shared_ffn_dim else None

    def forward(self, x: Tensor, aux: Optional[list] = None) -> Tensor:
        out = self.moe(x)
        if aux is not None:
            aux.append(out.aux_loss + out.z_loss)
        return out.output if self.shared is None else out.output + self.shared(x)

    def serve(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = self.moe(x).output
        return y if self.shared is None else y + self.shared.serve(x)


class Block(nn.Module):
    """Pre-norm decoder block: h = h + attention(attn_norm(h)); h = h + mlp(mlp_norm(h)).

    Each RMSNorm is fused with the residual add before it (fused_add_rms_norm). A block receives (m, h): the
    residual stream h and the previous block's MLP output m not yet added to it (None for the first block, whose
    h is the embeddings), adds and normalises them with its own attn_norm, and returns its MLP output and its
    residual stream (m', h') unadded, for the next block (or the model's final norm) to fuse into its norm. So a
    block uses only its own parameters (what FSDP2's fully_shard per block needs) and the stack runs the same ops
    as if each block normalised for the next. keep (serving, last block): the rows whose outputs are wanted; the
    block's attention output and MLP then run on those rows only."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.Parameter(torch.ones(c.dim))
        self.attention = Attention(c)
        self.mlp_norm = nn.Parameter(torch.ones(c.dim))
        self.mlp = MoEMLP(c) if c.num_experts else MLP(c.dim, c.ffn_dim)
        self.eps = c.norm_eps

    @property
    def projections(self) -> Tuple[Linear, Linear, Linear, Linear]:
        """The block's projections in a step's order (serve_decode's): wqkv, wo, w_gate_up, w_down (a dense
        block's only)."""
        return self.attention.wqkv, self.attention.wo, self.mlp.w_gate_up, self.mlp.w_down

    def forward(self, m: Optional[Tensor], h: Tensor, cos: Tensor, sin: Tensor,
                aux: Optional[list] = None) -> Tuple[Tensor, Tensor]:
        if m is None:
            y = tritium.rms_norm(h, (h.shape[-1],), self.attn_norm, self.eps)
        else:
            y, h = tritium.fused_add_rms_norm(m, h, self.attn_norm, self.eps)
        a = self.attention(y, cos, sin)
        y, h = tritium.fused_add_rms_norm(a, h, self.mlp_norm, self.eps)
        return self.mlp(y, aux), h

    def serve(self, m: Optional[Tensor], h: Tensor, cos: Tensor, sin: Tensor, step: StepInput,
              kv: Tuple[Tensor, Tensor], keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """forward for one serving step over the paged cache (2-D (T, dim) rows; the ops called directly)."""
        if m is None:
            y, _ = _RMS_NORM(h, self.attn_norm, self.eps)
        else:
            y, h, _ = _ADD_RMS_NORM(m, h, self.attn_norm, self.eps)
        a = self.attention.serve(y, cos, sin, step, kv, last=keep is not None)
        if keep is not None:
            h = h.index_select(0, keep)
        y, h, _ = _ADD_RMS_NORM(a, h, self.mlp_norm, self.eps)
        return self.mlp.serve(y), h


class Llama(nn.Module):
    """model(input_ids (batch, seq)) -> logits (batch, seq, vocab); forward_step(StepInput, kv) for serving."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.dim))
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.Parameter(torch.ones(c.dim))
        self.lm_head = Linear(c.dim, c.vocab_size, int8_terms=1)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed    # one Parameter, registered under both names
        self.embed_q: Optional[nn.Module] = None  # the embedding table stored quantized (embed is then None)
        cos, sin = _rope_tables(c, c.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- serving weights ----
    def _linears(self) -> List[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def _moes(self) -> List[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def pack_for_inference(self, enable: bool = True) -> "Llama":
        """Ready the serving path (forward_step): give every projection and the LM head a PackedLinear, which
        chooses how to compute its product on this device and dtype and keeps the packed copy that needs
        (tritium.ops.linear.PackedLinear: column panels for float32/float64, SwiGLU in the gate/up product's
        epilogue, oneDNN's blocked layout for 16-bit). The plain forward keeps reading the parameters (autograd).
        On CPU the copies take as much memory again as the weights. enable=False drops them. load_weights and
        .to() drop them too; after changing the weights in place, call this again."""
        self.__dict__.pop("_decode_cache", None)
        for lin in self._linears():
            lin.reset_serving()
            if lin.quant is None:
                lin.server = PackedLinear(lin.weight, lin.swiglu) if enable else None
        return self.consolidate_weights() if enable else self

    @property
    def is_packed(self) -> bool:
        """Whether pack_for_inference has readied the serving path (and nothing has dropped it since)."""
        return all(lin.server is not None or lin.quant is not None for lin in self._linears())

    # ---- quantized weights ----
    @property
    def is_quantized(self) -> bool:
        return any(lin.quant is not None for lin in self._linears())

    def quantize_(self, mode: str = "int8", group_size: Optional[int] = None, int8_act: int = 0) -> "Llama":
        """Store every projection, every MoE expert (tritium.nn.MoE.quantize_) and the LM head quantized
        (tritium.nn.QuantizedLinear: "int8" per output channel or per group, "int4" per group of group_size,
        default 32), releasing the float weights. The LM
        head is 8-bit in either mode (per group of 32 under "int4", llama.cpp's Q8_0 for the output of a 4-bit
        file): the logits decide every token, and a 4-bit head moves greedy decoding off the float model's within
        a few tokens. A tied LM head quantizes the embedding table too (looked up by dequantising the wanted
        rows)."""
        from tritium.nn import QuantizedLinear
        from tritium.ops.quant import QuantizedWeight

        for lin in self._linears():
            if lin.quant is None:
                m, g = (mode, group_size)
                if lin is self.lm_head and mode == "int4":   # groups of 32 where they fit, else per channel
                    m, g = "int8", 32 if lin.in_features % 32 == 0 else None
                qw = QuantizedWeight.quantize(lin.weight.detach(), m, g)
                lin.set_quantized(QuantizedLinear(qw, None))
        for moe in self._moes():
            moe.quantize_(mode, group_size)
        if self.config.tie_embeddings:
            self._tie_quantized()
        return self.set_int8_activations(int8_act).consolidate_weights()

    def consolidate_weights(self) -> "Llama":
        """Move the weights a serving step streams into one buffer on transparent huge pages
        (tritium.utils.huge_page_buffer), in the order a step reads them: the quantized layers' packed tensors,
        the float layers' packed panels (PackedLinear "panels") or the weights their serving product reads as
        stored (the other kinds). A decode step streams them all, and separate allocations on 4 KiB pages cost it
        a page walk every 4 KiB. CPU only; load, quantize_ and pack_for_inference call it."""
        from tritium.ops.quant import QuantizedWeight
        from tritium.utils import huge_page_buffer

        self.__dict__.pop("_decode_cache", None)   # it holds the tensors being replaced
        if self.device.type != "cpu":
            return self
        moves = []   # (tensors, install(views)): each group installed together, in reading order
        seen = set()
        for lin in self._linears():
            if lin.quant is not None:
                for m in lin.quant_parts:
                    if id(m) in seen:
                        continue
                    seen.add(id(m))
                    w = m.weight
                    moves.append(((w.qdata, w.scales, w.mins),
                                  lambda vs, m=m, w=w: m._set_weight(QuantizedWeight(*vs, w.bits, w.group, w.n,
                                                                                     w.k))))
            elif lin.server is not None and id(lin.weight) not in seen:
                srv = lin.server
                if srv.kind.startswith("panels"):
                    moves.append(((srv.packed,), lambda vs, srv=srv: setattr(srv, "packed", vs[0])))
                else:   # its serving product reads the weight as stored (a tied one once)
                    seen.add(id(lin.weight))

                    def put_weight(vs, lin=lin, srv=srv):
                        lin.weight.data = vs[0]
                        srv.weight = lin.weight.detach()
                    moves.append(((lin.weight,), put_weight))
        if not moves:
            return self
        align = 64

        def size(t: Tensor) -> int:
            return -(-t.numel() * t.element_size() // align) * align

        buf = huge_page_buffer(sum(size(t) for ts, _ in moves for t in ts))
        off = 0
        with torch.no_grad():
            for ts, install in moves:
                views = []
                for t in ts:
                    n = t.numel() * t.element_size()
                    v = buf[off:off + n].view(t.dtype).view(t.shape)
                    v.copy_(t)
                    views.append(v)
                    off += size(t)
                install(views)
        for lin in self._linears():
            lin.reset_serving()
        return self

    def _tie_quantized(self) -> None:
        self.embed_q = self.lm_head.quant
        self.embed = None

    def set_int8_activations(self, mode: int) -> "Llama":
        """How the quantized projections take their activations (QuantizedLinear.int8_act):
          0 (False)  float everywhere;
          1 (True)   one int8 term per block of 32 (integer dot products, llama.cpp's way) on the gate/up projection
                     and the LM head, two int8 terms on the QKV, output and down projections (Linear.int8_terms):
                     one term there moves greedy decoding off the float model's within a few tokens (the attention
                     scores amplify the QKV error; the attention output and the SwiGLU product have outlier
                     channels that set each block's scale; docs/quantization.md has the measurement);
          2          two int8 terms everywhere (near float accuracy; bench/results has its speed)."""
        if mode not in (0, 1, 2):
            raise ValueError(f"set_int8_activations: mode must be 0, 1 or 2, got {mode!r}")
        for lin in self._linears():
            for m in lin.quant_parts:
                m.int8_act = 0 if not mode else lin.int8_terms if mode == 1 else 2
        for moe in self._moes():   # the experts' gate/up and down products as the dense MLP's
            for gate_up, down in zip(moe.experts13 or (), moe.experts2 or ()):
                gate_up.int8_act, down.int8_act = (0, 0) if not mode else (1, 2) if mode == 1 else (2, 2)
        return self

    @property
    def weight_mode(self) -> str:
        """"float", or the quantized layers' formats and activation mode, e.g. "q4/32+mins q8/32 (float
        activations)"."""
        from tritium.nn import QuantizedLinear

        qs = [m for m in self.modules() if isinstance(m, QuantizedLinear)]
        if not qs:
            return "float"
        kinds = sorted({f"q{m.weight.bits}/{m.weight.group}{'+mins' if m.weight.has_mins else ''}" for m in qs})
        terms = {m.int8_act for m in qs}
        act = ("int8 activations, two terms on QKV/output/down" if 1 in terms else
               "two-term int8 activations" if 2 in terms else "float activations")
        return f"{' '.join(kinds)} ({act})"

    def _embed(self, tokens: Tensor) -> Tensor:
        if self.embed is not None:
            return nn.functional.embedding(tokens, self.embed)
        rows = self.embed_q.weight.dequantize(self.dtype, tokens.reshape(-1))
        return rows.view(*tokens.shape, rows.shape[-1])

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the float32 RoPE tables: rebuild them on the (new) device instead.
        super()._apply(fn, recurse)
        self.pack_for_inference(False)
        cos, sin = _rope_tables(self.config, self.config.max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(self.norm.device), sin.to(self.norm.device)
        return self

    # ---- weights ----
    def init_random(self, std: float = 0.05, generator: Optional[torch.Generator] = None) -> "Llama":
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=generator))
        return self

    def load_weights(self, w: Dict[str, object]) -> "Llama":
        """Load Hugging Face Llama parameter names (what tritium.models.gguf returns), fusing q/k/v and
        gate/up into one projection each. A projection's value is a float tensor, or a logical quantized weight
        (q, scales, mins, bits, group) (tritium.models.gguf with weights="native"): the layer is then stored
        quantized (tritium.nn.QuantizedLinear), with no float copy."""
        self.pack_for_inference(False)
        tied = self.config.tie_embeddings
        head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
        done = set()
        if self.device.type == "meta":
            # built on the meta device (tritium.models.load): the quantized layers first, then storage for the
            # float parameters only, so no float copy of a quantized weight is ever allocated
            for lin, parts in self._linear_parts(w):
                if all(_is_quant(p) for p in parts):
                    lin.set_quantized(_quant_module(parts))
                    done.add(lin)
            if tied and self.lm_head.quant is not None:
                self._tie_quantized()
            self.to_empty(device="cpu")
        with torch.no_grad():
            self.norm.copy_(w["model.norm.weight"])
            if self.lm_head not in done:
                _load_linear(self.lm_head, [head], self.dtype)
            if tied and self.lm_head.quant is not None:
                self._tie_quantized()
            else:
                if self.embed is None:
                    self.embed = nn.Parameter(torch.empty(self.config.vocab_size, self.config.dim,
                                                          dtype=self.dtype), requires_grad=False)
                    self.embed_q = None
                self.embed.copy_(_as_float(w["model.embed_tokens.weight"]))
                if tied:
                    self.lm_head.weight = self.embed
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.attn_norm.copy_(w[p + "input_layernorm.weight"])
                layer.mlp_norm.copy_(w[p + "post_attention_layernorm.weight"])
            for p, mlp in self._moe_layers():
                if _quant_experts(mlp.moe, w, p):
                    continue
                if mlp.moe.experts13 is not None:
                    mlp.moe.set_quantized_experts(None, None)
                for name, t in zip(("router_weight", "w13", "w2"), _moe_weights(w, p, self.config.num_experts)):
                    getattr(mlp.moe, name).copy_(_as_float(t))
            for lin, parts in self._linear_parts(w):
                if lin is not self.lm_head and lin not in done:
                    _load_linear(lin, parts, self.dtype)
        return self

    def hf_projections(self) -> List[Tuple[Linear, List[str], List[int]]]:
        """(projection, the Hugging Face layers stacked into it, their output rows) for every decoder projection:
        e.g. (layers[0].attention.wqkv, ["model.layers.0.self_attn.q_proj", ...k_proj, ...v_proj], [q, kv, kv])."""
        out = []
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.attention, layer.mlp
            out += [(attn.wqkv, [p + f"self_attn.{n}_proj" for n in "qkv"], list(attn.split)),
                    (attn.wo, [p + "self_attn.o_proj"], [attn.wo.out_features])]
            if isinstance(mlp, MoEMLP):   # the experts are not projections: only the shared expert's are
                mlp, p = mlp.shared, p + "mlp.shared_expert."
                if mlp is None:
                    continue
            else:
                p += "mlp."
            out += [(mlp.w_gate_up, [p + "gate_proj", p + "up_proj"], [mlp.w_down.in_features] * 2),
                    (mlp.w_down, [p + "down_proj"], [mlp.w_down.out_features])]
        return out

    def _moe_layers(self):
        """(the Hugging Face prefix, MoEMLP) of every MoE block."""
        return [(f"model.layers.{i}.mlp.", layer.mlp) for i, layer in enumerate(self.layers)
                if isinstance(layer.mlp, MoEMLP)]

    def _linear_parts(self, w: Dict[str, object]):
        """(projection, [the checkpoint tensors stacked into it]) for every projection and the LM head."""
        tied = self.config.tie_embeddings
        yield self.lm_head, [w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]]
        for lin, names, _ in self.hf_projections():
            yield lin, [w[n + ".weight"] for n in names]

    def hf_state_dict(self) -> Dict[str, Tensor]:
        """The inverse of load_weights (to build the eager twin from this model's weights)."""
        c = self.config
        dt = self.dtype
        embed = self.embed.detach() if self.embed is not None else _float_weight(self.lm_head, dt)
        out = {"model.embed_tokens.weight": embed, "model.norm.weight": self.norm.detach()}
        if not c.tie_embeddings:
            out["lm_head.weight"] = _float_weight(self.lm_head, dt)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out.update({p + "input_layernorm.weight": layer.attn_norm.detach(),
                        p + "post_attention_layernorm.weight": layer.mlp_norm.detach()})
        for lin, names, sizes in self.hf_projections():
            out.update((n + ".weight", w) for n, w in zip(names, _float_weight(lin, dt).split(sizes, 0)))
        for p, mlp in self._moe_layers():
            out.update({p + "gate.weight": mlp.moe.router_weight.detach(),
                        **dict(zip((p + "experts.gate_up_proj", p + "experts.down_proj"), mlp.moe.expert_weights()))})
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every matrix once (of a mixture of experts, a token's top_k
        experts), the embedding table only when it is also the LM head (tied; the step's embedding rows are
        negligible)."""
        n = sum(p.numel() * p.element_size() for p in self.parameters())   # a tied embedding/head counted once
        for _, mlp in self._moe_layers():   # a token reads top_k of the experts
            e = mlp.moe
            if e.experts13 is None:
                n -= (e.w13.numel() * e.w13.element_size() + e.w2.numel() * e.w2.element_size()) * (
                    e.num_experts - e.top_k) // e.num_experts
            else:
                n += sum(_quant_bytes(m) for m in (*e.experts13, *e.experts2)) * e.top_k // e.num_experts
        if not self.config.tie_embeddings and self.embed is not None:
            n -= self.embed.numel() * self.embed.element_size()
        return n + sum(_quant_bytes(lin.quant) for lin in self._linears())

    # ---- the forwards ----
    def _decoder(self, x: Tensor, aux: Optional[list] = None) -> Tensor:
        """The decoder stack on embeddings x (batch, seq, dim); returns the final normalised hidden state (and
        appends each MoE block's router losses to aux when given)."""
        m, h = None, x
        for block in self.layers:
            m, h = block(m, h, self.rope_cos, self.rope_sin, aux)
        return tritium.fused_add_rms_norm(m, h, self.norm, self.config.norm_eps)[0]

    def _decode_args(self, rows: int) -> Optional[Tuple[List[Tensor], List[int]]]:
        """serve_decode's (weights, linears) for a decode step of `rows` rows, or None when a projection has no
        description (Linear.decode_plan). Cached per row count until a served weight or activation mode changes
        anywhere (tritium.nn.serving_version): gathering them walks some 400 module attributes."""
        version = serving_version()
        cache = self.__dict__.get("_decode_cache")
        if cache is None or cache[0] != version:
            cache = self.__dict__["_decode_cache"] = (version, {})
        args = cache[1].get(rows, _MISSING)
        if args is _MISSING:
            args = cache[1][rows] = self._gather_decode_args(rows)
        return args

    def _gather_decode_args(self, rows: int) -> Optional[Tuple[List[Tensor], List[int]]]:
        weights: List[Tensor] = []
        ints: List[int] = []
        if self.config.num_experts:   # serve_decode runs dense blocks only: MoE blocks take Block.serve's path
            return None
        for block in self.layers:
            weights += (block.attn_norm, block.mlp_norm)
            for lin in block.projections:
                plan = lin.decode_plan(rows)
                if plan is None:
                    return None
                weights += plan[0]
                ints += plan[1]
        return weights, ints

    def _serve_decoder(self, x: Tensor, step: StepInput, kv: Sequence[Tuple[Tensor, Tensor]],
                       keep: Optional[Tensor]) -> Tensor:
        """_decoder for one serving step: x (T, dim) the step's packed tokens, each layer attending through its
        paged cache kv[i]; keep: the last block runs its attention output, MLP and norms on those rows only.
        A decode-only step on CPU runs in one call (serve_decode: Block.serve's ops, from C++); otherwise
        Block.serve calls the ops directly: at one token a step, per-call Python checks and module calls would
        cost as much as the layer's products."""
        c = self.config
        if not step.prefill_lens and keep is None and x.device.type == "cpu":
            args = self._decode_args(x.shape[0])
            if args is not None:
                return _SERVE_DECODE(x, args[0], args[1], [t for pair in kv for t in pair], self.norm,
                                     self.rope_cos, self.rope_sin, step.positions, step.slot_mapping,
                                     step.block_tables, step.seq_lens, c.n_heads, c.norm_eps,
                                     self.layers[0].attention.scale)
        m, h = None, x
        n = len(self.layers)
        cos, sin = self.rope_cos, self.rope_sin
        for i, block in enumerate(self.layers):
            m, h = block.serve(m, h, cos, sin, step, kv[i], keep if i == n - 1 else None)
        return _ADD_RMS_NORM(m, h, self.norm, c.norm_eps)[0]

    def hidden_states(self, input_ids: Tensor, aux: Optional[list] = None) -> Tensor:
        """input_ids (batch, seq) -> the final normalised hidden states (batch, seq, dim), the LM head's input
        (e.g. for tritium.fused_linear_cross_entropy with lm_head.weight: no logits held). aux: see forward."""
        return self._decoder(self._embed(input_ids), aux)

    def forward(self, input_ids: Tensor, aux: Optional[list] = None) -> Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab); causal self-attention over the sequence.
        aux: a list to which each MoE block appends its router losses (aux_loss + z_loss, a scalar), for the
        training loss (``loss = ce + sum(aux)``)."""
        x = self._embed(input_ids)                                               # (b, s, dim)
        return self.lm_head(self._decoder(x, aux))

    def forward_step(self, step: StepInput, kv: Sequence[Tuple[Tensor, Tensor]]) -> Tensor:
        """Logits (len(step.logits_rows), vocab) of one packed step; writes every token's K/V into the pools
        kv[layer] = (k_pool, v_pool), each (num_blocks, block_size, n_kv_heads, head_dim)."""
        x = self._embed(step.tokens)                                             # (T, dim)
        # the rows whose logits are wanted, when the last block can skip the others (see StepInput)
        keep = None
        nd = step.n_decode
        if step.last_logits_only and step.tokens.shape[0] > nd + len(step.prefill_lens):
            ends = [nd + e - 1 for e in itertools.accumulate(step.prefill_lens)]
            keep = torch.tensor(list(range(nd)) + ends, dtype=torch.int64, device=step.tokens.device)
        y = self._serve_decoder(x, step, kv, keep)
        if keep is None and step.logits_rows is not None and not step.last_logits_only:
            y = y.index_select(0, step.logits_rows)
        return self.lm_head.serve(y)


def _is_quant(v) -> bool:
    """A logical quantized weight (q, scales, mins, bits, group), or something that gives one (``logical()``:
    tritium.models.gguf.QuantTensor), rather than a float tensor."""
    return isinstance(v, tuple) or hasattr(v, "logical")


def _logical(v) -> tuple:
    return v if isinstance(v, tuple) else v.logical()


def _as_float(v) -> Tensor:
    """A float tensor, or a logical quantized weight dequantised to float32."""
    if _is_quant(v):
        from tritium.reference import quant_weight

        return quant_weight(*_logical(v))
    return v


def _load_linear(lin: Linear, parts: list, dtype: torch.dtype) -> None:
    """Give lin the stacked weight of parts: quantized when every part is a logical quantized weight, else float
    (quantized parts dequantised)."""
    if all(_is_quant(p) for p in parts):
        lin.set_quantized(_quant_module(parts))
        return
    lin.set_quantized(None, dtype)
    lin.weight.copy_(torch.cat([_as_float(p) for p in parts], 0) if len(parts) > 1 else _as_float(parts[0]))


def _moe_weights(w: Dict[str, object], p: str, num_experts: int) -> Tuple[object, object, object]:
    """(router (E, D), w13 (E, 2F, D), w2 (E, D, F)) of the MoE MLP whose Hugging Face prefix is p
    ("model.layers.{i}.mlp."): transformers' fused names (gate.weight, experts.gate_up_proj, experts.down_proj),
    GGUF's gate and up stacks (experts.gate_proj, experts.up_proj: tritium.models.gguf), or the per-expert names
    of Mixtral's published checkpoints (block_sparse_moe.gate.weight, block_sparse_moe.experts.{e}.w1 / w3 / w2
    .weight: gate, up, down), stacked."""
    if p + "experts.gate_up_proj" in w:
        return w[p + "gate.weight"], w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"]
    if p + "experts.gate_proj" in w:   # GGUF's split stacks (tritium.models.gguf's names for them)
        w13 = torch.cat([_as_float(w[p + "experts.gate_proj"]), _as_float(w[p + "experts.up_proj"])], 1)
        return w[p + "gate.weight"], w13, w[p + "experts.down_proj"]
    b = p[: -len("mlp.")] + "block_sparse_moe."
    experts = [[_as_float(w[f"{b}experts.{e}.{n}.weight"]) for e in range(num_experts)] for n in ("w1", "w3", "w2")]
    w13 = torch.stack([torch.cat([g, u], 0) for g, u in zip(experts[0], experts[1])])
    return w[b + "gate.weight"], w13, torch.stack(experts[2])


def _quant_experts(moe: MoE, w: Dict[str, object], p: str) -> bool:
    """Give moe quantized experts when the checkpoint stores them quantized (a GGUF's 3-D expert stacks loaded
    natively: gate, up and down each (E ffn_dim, dim) or (E dim, ffn_dim) logical rows), split per expert and each
    expert's gate and up rows fused (QuantizedParts when their formats differ); the router is loaded as float.
    False (nothing done) for float experts."""
    names = [p + f"experts.{n}_proj" for n in ("gate", "up", "down")]
    if not all(n in w and _is_quant(w[n]) for n in names):
        return False
    E = moe.num_experts
    gate, up, down = [_logical(w[n]) for n in names]

    def expert(lw: tuple, e: int) -> tuple:   # expert e's rows of a logical stack (q, scales, mins, bits, group)
        rows = lw[0].shape[0] // E
        return tuple(t[e * rows:(e + 1) * rows] if isinstance(t, Tensor) else t for t in lw)

    moe.set_quantized_experts([_quant_module([expert(gate, e), expert(up, e)]) for e in range(E)],
                              [_quant_module([expert(down, e)]) for e in range(E)])
    moe.router_weight.copy_(_as_float(w[p + "gate.weight"]))
    return True


def _float_weight(lin: Linear, dtype: torch.dtype) -> Tensor:
    """lin's weight as a float tensor (dequantised when it is stored quantized)."""
    if lin.quant is None:
        return lin.weight.detach()
    return torch.cat([p.weight.dequantize(dtype) for p in lin.quant_parts], 0)


def build(config: LlamaConfig | str, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """An uninitialised model of a named or given config."""
    if isinstance(config, str):
        config = CONFIGS[config]
    return Llama(config).to(device=device, dtype=dtype).requires_grad_(False)
