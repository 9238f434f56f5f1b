"""Tensor-parallel (Megatron-style) Llama decoding on torch.distributed.

``shard_llama(model, group)`` turns a loaded tritium Llama into this rank's ``TPLlama``: a Llama of the same
class whose config is its shard's (its heads, its KV heads, its slice of the FFN and of the vocabulary), so every
serving piece (the paged KV cache, packing, the engine's scheduling) works on the shard unchanged:

- QKV and gate/up are column-parallel: rank r computes its heads' q, k, v and its FFN columns, no communication;
- the output and down projections are row-parallel: each rank's partial product is summed by one all-reduce of the
  (tokens, hidden) activation each (``_RowParallel``), so a layer costs 2 all-reduces;
- the embedding is vocabulary-parallel: each rank looks up the tokens in its vocabulary range (zeros elsewhere)
  and one all-reduce sums the rows; the LM head is vocabulary-parallel too and returns this rank's slice of the
  logits (tokens, vocab_local), which are never gathered: ``vocab_parallel_cross_entropy`` and
  ``vocab_parallel_sample`` reduce each shard and exchange a few numbers per row.

Heads are split as evenly as possible (the first n_heads % world ranks one more), so any world size up to n_heads
works (SmolLM2's 9 heads on 2 or 4 ranks). A rank holds the KV heads its query heads read: with fewer KV heads
than ranks they are replicated. When a rank's query heads do not share their KV heads evenly (9 heads on 3 KV
heads split 5 / 4: heads 0-2 read KV head 0 and heads 3-4 KV head 1), the rank holds one KV head per query head
(copies of the shared ones), which keeps the attention kernels' uniform grouping.

Decode per token per rank moves (2 n_layers + 1) x hidden x dtype bytes in all-reduces (2 per layer, 1 for the
embedding), 32 bytes per row in the sampler's all-gather, and a 40-byte agreement per forward (``comm.agree``:
bad input on one rank raises the same error naming it on every rank, instead of leaving the others waiting in an
all-reduce). ``tritium.distributed.count_comm`` counts them.

The C++ one-call decode step (serve_decode) is not used (it has no all-reduces): a step runs Block.serve's ops
from Python. Training a TPLlama is not supported (its all-reduces have no backward).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..inference.engine import Engine
from ..models.llama import Linear, Llama, LlamaConfig, StepInput
from ..ops.sampling import SamplingParams, seeded_uniform
from .comm import agree, all_gather, all_reduce, meta_device

# ---------------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------------


def even_split(n: int, world: int) -> List[Tuple[int, int]]:
    """(start, size) of each rank's part of n items: sizes as even as possible, the first n % world one larger."""
    out, at = [], 0
    for r in range(world):
        size = n // world + (1 if r < n % world else 0)
        out.append((at, size))
        at += size
    return out


@dataclasses.dataclass
class TPShard:
    """What rank ``rank`` of ``world`` holds of a Llama config: query heads, KV heads (global ids, a KV head
    listed once per local group, several times when replicated per query head), FFN rows and vocabulary rows."""
    rank: int
    world: int
    q_heads: List[int]
    kv_heads: List[int]
    ffn: Tuple[int, int]        # (start, size)
    vocab: Tuple[int, int]      # (start, size)

    def local_config(self, c: LlamaConfig) -> LlamaConfig:
        return dataclasses.replace(c, n_heads=len(self.q_heads), n_kv_heads=len(self.kv_heads),
                                   ffn_dim=self.ffn[1], vocab_size=self.vocab[1])


def tp_shards(c: LlamaConfig, world: int) -> List[TPShard]:
    """Every rank's TPShard of config c on world ranks."""
    if getattr(c, "num_experts", 0):
        raise NotImplementedError(f"tensor parallelism shards dense Llama MLPs; this config has a mixture of "
                                  f"{c.num_experts} experts (expert parallelism is not built)")
    if world < 1 or world > c.n_heads:
        raise ValueError(f"tensor parallelism: world size must be in [1, n_heads={c.n_heads}], got {world}")
    if world > c.ffn_dim or world > c.vocab_size:
        raise ValueError(f"tensor parallelism: world size {world} exceeds ffn_dim {c.ffn_dim} or vocab_size "
                         f"{c.vocab_size}")
    group = c.n_heads // c.n_kv_heads
    shards = []
    for r, ((h0, nh), ffn, vocab) in enumerate(zip(even_split(c.n_heads, world), even_split(c.ffn_dim, world),
                                                   even_split(c.vocab_size, world))):
        q = list(range(h0, h0 + nh))
        kv_of = [h // group for h in q]
        kv = sorted(set(kv_of))
        counts = {k: kv_of.count(k) for k in kv}
        if len(set(counts.values())) != 1:   # uneven groups on this rank: one KV head per query head
            kv = kv_of
        shards.append(TPShard(r, world, q, kv, ffn, vocab))
    return shards


def _is_logical(v) -> bool:
    """A logical quantized weight (q, scales, mins, bits, group) rather than a float tensor."""
    return isinstance(v, tuple)


def _select_rows(v, idx: Tensor):
    """Rows idx of a float weight or of a logical quantized weight (rows keep their own scales: always exact)."""
    if _is_logical(v):
        q, s, m, bits, group = v
        return (q.index_select(0, idx), s.index_select(0, idx), None if m is None else m.index_select(0, idx),
                bits, group)
    return v.index_select(0, idx)


def _row_range(v, start: int, n: int):
    return _select_rows(v, torch.arange(start, start + n))


def _col_range(v, start: int, n: int, name: str, notes: List[str]):
    """Input columns [start, start + n) of a float weight or of a logical quantized weight. A quantized weight's
    columns are cut on its groups' boundaries (each group's scale and min travel with it); a weight with one group
    a row (int8 per channel) can be cut anywhere. When the cut falls inside a group, the slice is float (the
    dequantised weight's columns) and the reason is appended to notes."""
    if not _is_logical(v):
        return v[:, start:start + n]
    from ..ops.quant import padded_k

    q, s, m, bits, group = v
    k = q.shape[1]
    if s.shape[1] == 1:   # one group a row: its scale (and min) serve any subset of its columns
        return (q[:, start:start + n], s, m, bits, padded_k(n) if group >= 32 else group)
    end = start + n
    if start % group == 0 and (end % group == 0 or end == k):
        g0, g1 = start // group, -(-end // group)
        return (q[:, start:end], s[:, g0:g1], None if m is None else m[:, g0:g1], bits, group)
    from ..reference import quant_weight

    notes.append(f"{name}: its input columns [{start}, {end}) do not fall on its quantization groups of {group}, "
                 f"so this rank holds its slice in float")
    return quant_weight(q, s, m, bits, group)[:, start:end]


def shard_state_dict(w: Dict[str, object], c: LlamaConfig, s: TPShard,
                     notes: Optional[List[str]] = None) -> Dict[str, object]:
    """Rank s.rank's slice of Hugging Face Llama weights w (Llama.hf_state_dict's names) for s.local_config(c).
    A value may be a float tensor or a logical quantized weight (q, scales, mins, bits, group) (tp_weights,
    tritium.models.gguf with weights="native"): quantized slices stay quantized (rows with their scales; columns
    on group boundaries, else float with the reason appended to notes)."""
    notes = [] if notes is None else notes
    hd = c.head_dim
    (f0, fn), (v0, vn) = s.ffn, s.vocab
    q_idx = torch.tensor(s.q_heads)
    kv_idx = torch.tensor(s.kv_heads)
    out = {"model.norm.weight": w["model.norm.weight"],
           "model.embed_tokens.weight": _row_range(w["model.embed_tokens.weight"], v0, vn)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = _row_range(w["lm_head.weight"], v0, vn)
    h0, nh = s.q_heads[0], len(s.q_heads)
    assert s.q_heads == list(range(h0, h0 + nh)), "a rank's query heads are a contiguous range"
    for i in range(c.n_layers):
        p = f"model.layers.{i}."

        def rows(name, idx):   # the rows of heads idx
            return _select_rows(w[p + name + ".weight"], (idx[:, None] * hd + torch.arange(hd)).flatten())
        out[p + "input_layernorm.weight"] = w[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = w[p + "post_attention_layernorm.weight"]
        out[p + "self_attn.q_proj.weight"] = rows("self_attn.q_proj", q_idx)
        out[p + "self_attn.k_proj.weight"] = rows("self_attn.k_proj", kv_idx)
        out[p + "self_attn.v_proj.weight"] = rows("self_attn.v_proj", kv_idx)
        out[p + "self_attn.o_proj.weight"] = _col_range(w[p + "self_attn.o_proj.weight"], h0 * hd, nh * hd,
                                                        p + "self_attn.o_proj", notes)
        out[p + "mlp.gate_proj.weight"] = _row_range(w[p + "mlp.gate_proj.weight"], f0, fn)
        out[p + "mlp.up_proj.weight"] = _row_range(w[p + "mlp.up_proj.weight"], f0, fn)
        out[p + "mlp.down_proj.weight"] = _col_range(w[p + "mlp.down_proj.weight"], f0, fn, p + "mlp.down_proj",
                                                     notes)
    return out


def _split_weight(lin: Linear, sizes: Sequence[int], dtype: torch.dtype) -> list:
    """lin's weight as the Hugging Face layers stacked into it (sizes: their output rows): logical quantized
    weights when lin is stored quantized (a layer spanning parts of different formats, or a biased part: float),
    else float tensors."""
    from ..models.llama import _float_weight
    from ..ops.quant import cat_logical

    parts = lin.quant_parts
    if not parts or any(m.bias is not None for m in parts):
        return list(_float_weight(lin, dtype).split(list(sizes), 0))
    spans, at = [], 0   # (first row, logical) of every part
    for m in parts:
        spans.append((at, (*m.weight.logical(), m.weight.bits, m.weight.group)))
        at += m.weight.n
    out, at = [], 0
    for size in sizes:
        pieces = []
        for r0, lw in spans:
            a, b = max(at, r0), min(at + size, r0 + lw[0].shape[0])
            if a < b:
                pieces.append(_row_range(lw, a - r0, b - a))
        fused = pieces[0] if len(pieces) == 1 else cat_logical(pieces)
        if fused is None:
            from ..reference import quant_weight

            fused = torch.cat([quant_weight(*p) for p in pieces], 0).to(dtype)
        out.append(fused)
        at += size
    return out


def tp_weights(model: Llama) -> Dict[str, object]:
    """model's weights under Hugging Face Llama names (as Llama.hf_state_dict), its quantized projections, LM
    head and embedding as logical quantized weights (q, scales, mins, bits, group) instead of dequantised, so
    shard_state_dict can slice them quantized."""
    c, dt = model.config, model.dtype
    out = {"model.norm.weight": model.norm.detach()}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": layer.attn_norm.detach(),
                    p + "post_attention_layernorm.weight": layer.mlp_norm.detach()})
    head = _split_weight(model.lm_head, [c.vocab_size], dt)[0]
    out["model.embed_tokens.weight"] = model.embed.detach() if model.embed is not None else head
    if not c.tie_embeddings:
        out["lm_head.weight"] = head
    for lin, names, sizes in model.hf_projections():
        out.update((n + ".weight", v) for n, v in zip(names, _split_weight(lin, sizes, dt)))
    return out


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class _RowParallel(Linear):
    """A row-parallel projection: this rank's input columns' partial product, summed over the group by one
    all-reduce (both the serving path and the plain forward)."""
    tp_group = None

    def serve(self, x: Tensor) -> Tensor:
        return all_reduce(Linear.serve(self, x).contiguous(), group=self.tp_group)

    def forward(self, x: Tensor) -> Tensor:
        y = Linear.forward(self, x)
        if y.requires_grad:
            raise NotImplementedError("a tensor-parallel Llama is for inference: its all-reduces have no backward")
        return all_reduce(y.contiguous(), group=self.tp_group)


@dataclasses.dataclass
class TPInfo:
    group: Optional[dist.ProcessGroup]
    shard: TPShard
    full_config: LlamaConfig

    @property
    def vocab_start(self) -> int:
        return self.shard.vocab[0]


class TPLlama(Llama):
    """This rank's shard of a tensor-parallel Llama (shard_llama builds it). forward(input_ids) and
    forward_step(step, kv) take the full model's inputs (the same on every rank) and return this rank's slice of
    the logits, vocabulary rows [tp.vocab_start, tp.vocab_start + config.vocab_size); they are collectives."""

    def __init__(self, local_config: LlamaConfig, tp: TPInfo):
        super().__init__(local_config)
        self.tp = tp
        for block in self.layers:
            for lin in (block.attention.wo, block.mlp.w_down):
                lin.__class__ = _RowParallel
                lin.tp_group = tp.group

    def _check(self, what: str, tokens: Tensor, extra: Sequence[int] = (), extra_names: Sequence[str] = ()):
        """Every rank validates its tokens and agrees on their count and checksum (and extra values) before the
        first all-reduce: bad or different input on one rank raises the same error everywhere, naming it."""
        V = self.tp.full_config.vocab_size
        err = None
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            err = f"tokens must be an int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}"
            n = s = 0
        else:
            n, s = tokens.numel(), int(tokens.sum()) if tokens.numel() else 0
            if n and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
                err = (f"token ids must be in [0, {V}), got values in [{int(tokens.min())}, "
                       f"{int(tokens.max())}]")
        agree(what, err, [n, s, *extra], ["token count", "token sum", *extra_names], self.tp.group)

    def _decode_args(self, rows: int):
        return None   # no one-call C++ decode: it has no all-reduces

    def _embed(self, tokens: Tensor) -> Tensor:
        start, n = self.tp.shard.vocab
        local = tokens - start
        inside = (local >= 0) & (local < n)
        x = super()._embed(torch.where(inside, local, torch.zeros_like(local)))
        x = x.masked_fill(~inside[..., None], 0).contiguous()
        return all_reduce(x, group=self.tp.group)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (batch, seq), the same on every rank -> this rank's logits (batch, seq, vocab_local)."""
        self._check("TPLlama.forward", input_ids, list(getattr(input_ids, "shape", ())[:2]), ["batch", "seq"])
        return super().forward(input_ids)

    def forward_step(self, step: StepInput, kv: Sequence[Tuple[Tensor, Tensor]]) -> Tensor:
        """Llama.forward_step on this rank's heads (its pools hold only them): this rank's logits (rows,
        vocab_local)."""
        self._check("TPLlama.forward_step", step.tokens, [step.n_decode, len(step.prefill_lens)],
                    ["decode rows", "prefills"])
        return super().forward_step(step, kv)


def shard_llama(model: Llama, group: Optional[dist.ProcessGroup] = None) -> TPLlama:
    """This rank's TPLlama of model (a loaded Llama, the same on every rank of group). Quantized weights stay
    quantized (tp_weights): column-parallel projections, the LM head and the embedding split by rows, row-parallel
    ones (output, down) by input columns on their quantization groups' boundaries; a row-parallel slice that
    would cut a group is held in float, and the reason is in the returned model's ``tp_notes`` (and a warning).
    The quantized layers keep model's activation mode (int8_act). Not a collective; the returned model's
    forwards are."""
    local = shard_from_state_dict(tp_weights(model), model.config, model.dtype, group, model.device)
    for src, dst in zip(model._linears(), local._linears()):   # the same modules in the same order
        if src.quant_parts:
            for m in dst.quant_parts:
                m.int8_act = src.quant_parts[0].int8_act
    return local


def shard_from_state_dict(w: Dict[str, object], config: LlamaConfig, dtype: torch.dtype = torch.float32,
                          group: Optional[dist.ProcessGroup] = None, device="cpu") -> TPLlama:
    """This rank's TPLlama from Hugging Face Llama weights w (float tensors, e.g. a memory-mapped torch.load of
    Llama.hf_state_dict(), or logical quantized weights (q, scales, mins, bits, group): tp_weights) of config:
    only this rank's slices are copied, quantized ones kept quantized (see shard_llama)."""
    if not dist.is_initialized():
        raise RuntimeError("shard_llama: torch.distributed is not initialized (call init_process_group first, "
                           "e.g. under torchrun)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = tp_shards(config, world)[rank]
    local = TPLlama(shard.local_config(config), TPInfo(group, shard, config))
    local = local.to(device=device, dtype=dtype).requires_grad_(False)
    notes: List[str] = []
    local.load_weights(shard_state_dict(w, config, shard, notes))
    local.tp_notes = notes
    if notes:
        warnings.warn(f"tensor parallelism (rank {rank}/{world}): " + "; ".join(notes))
    if local.is_quantized:
        local.consolidate_weights()
    return local


def gather_vocab(local: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Collective, for tests and debugging (the serving path never does this): the full logits from every rank's
    vocabulary slice along the last dim (slices may differ in size)."""
    world = dist.get_world_size(group)
    n = all_gather(torch.tensor([local.shape[-1]], device=local.device), group).view(-1).tolist()
    pad = max(n)
    x = F.pad(local, (0, pad - local.shape[-1]))
    parts = all_gather(x.contiguous(), group)
    return torch.cat([parts[r][..., :n[r]] for r in range(world)], -1)


# ---------------------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy and sampling
# ---------------------------------------------------------------------------------------------------------
class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, group, ignore_index):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.to(acc)
        n = x.shape[-1]
        m = x.amax(-1)
        all_reduce(m, dist.ReduceOp.MAX, group)                     # the global max of each row
        e = torch.exp(x - m[:, None])
        local = target - start
        inside = (local >= 0) & (local < n) & (target != ignore_index)
        t = x.gather(1, torch.where(inside, local, 0)[:, None])[:, 0].masked_fill(~inside, 0)
        st = torch.stack([e.sum(-1), t])
        all_reduce(st, group=group)                                 # sum of exps and the target's logit
        valid = target != ignore_index
        loss = (torch.log(st[0]) + m - st[1]).masked_fill(~valid, 0)
        ctx.save_for_backward(e / st[0][:, None], local, inside, valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        p, local, inside, valid = ctx.saved_tensors
        rows = inside.nonzero()[:, 0]
        grad = p.clone()
        grad[rows, local[rows]] -= 1
        grad *= (g.to(grad.dtype) * valid)[:, None]
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, vocab_start: int,
                                 group: Optional[dist.ProcessGroup] = None, ignore_index: int = -100,
                                 reduction: str = "mean") -> Tensor:
    """F.cross_entropy of the full logits from this rank's vocabulary slice (collective). logits (..., n) hold
    vocabulary rows [vocab_start, vocab_start + n); target (...) int64 full-vocabulary ids, the same on every
    rank. Each rank reduces its slice to a max, a sum of exps and the target's logit (when it holds the target),
    and two all-reduces of (rows,) and (2, rows) floats combine them; the gradient of the logits stays on each
    rank's slice. Differentiable in logits; reduction "mean" (over targets != ignore_index), "sum" or "none"."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be 'mean', 'sum' or 'none', got "
                         f"{reduction!r}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: target shape {tuple(target.shape)} must be logits' "
                         f"{tuple(logits.shape)} without the last dim")
    loss = _VocabParallelCE.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), int(vocab_start),
                                  group, ignore_index).view(target.shape)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().to(loss.dtype)


_GREEDY = SamplingParams(temperature=0.0)
_CAND0 = 64   # candidates per rank a top-p row sends first (a flat row's cut is then found by radix selection)


def _plain_greedy(p: SamplingParams) -> bool:
    return (p.temperature == 0.0 and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and not p.logit_bias)


def _penalise(z: Tensor, plist: Sequence[SamplingParams], history, v0: int) -> None:
    """tritium.reference's penalties and logit bias, in place, on this rank's vocabulary slice z (rows, n) of
    [v0, v0 + n): each distinct history token once (repetition, then frequency * count + presence)."""
    n = z.shape[1]
    for i, p in enumerate(plist):
        h = history[i] if history is not None else None
        if h is not None and len(h) and (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            t = torch.as_tensor(h if isinstance(h, Tensor) else list(h), dtype=torch.int64, device=z.device).flatten()
            t = t[(t >= v0) & (t < v0 + n)] - v0
            if t.numel():
                toks, counts = t.unique(return_counts=True)
                zt = z[i, toks]
                zt = torch.where(zt > 0, zt / p.repetition_penalty, zt * p.repetition_penalty)
                z[i, toks] = zt - p.frequency_penalty * counts.to(zt.dtype) - p.presence_penalty
        for t, b in (p.logit_bias or {}).items():
            if v0 <= t < v0 + n:
                z[i, t - v0] += b


def _nucleus(vals: Tensor, p: SamplingParams, vocab_size: int, mass: float) -> Tuple[Tensor, List[Tensor]]:
    """tritium.reference.sampling_distribution's kept set over candidate values e (1-D float64, exp(z - max)),
    given the row's whole-vocabulary mass: (keep mask, the cuts it used: the k-th largest value, the top-p
    cut). Exact for the whole vocabulary when every cut is above every value missing from the candidates."""
    keep = torch.ones_like(vals, dtype=torch.bool)
    cuts = []
    if 0 < p.top_k < vocab_size:
        if p.top_k < vals.numel():
            kth = torch.topk(vals, p.top_k).values[-1]
            keep &= vals >= kth
            cuts.append(kth)
        mass = float(vals[keep].sum())
    if p.top_p < 1.0:
        ek = torch.where(keep, vals, 0.0)
        s, _ = torch.sort(ek, descending=True)
        csum = torch.cumsum(s, 0)
        first = torch.searchsorted(-s, -ek, side="left")
        above = torch.where(first > 0, csum[(first - 1).clamp(min=0)], 0.0)
        keep &= above < p.top_p * mass
        cuts.append(vals[keep].min())
    if p.min_p > 0.0:
        keep &= vals >= p.min_p
    return keep & (vals > 0), cuts


# top-p's cut by radix selection over the float32 bit patterns of e (non-negative: ordered as the values), in
# three digits (shift, width): each round every rank sends its mass per digit value of the tokens matching the digits
# chosen so far, and every rank picks the same next digit; after the last, the cut is one exact float32 value
_DIGITS = ((21, 10), (10, 11), (0, 10))


def _digit_masses(e: Tensor, bits: Tensor, prefix: Tensor, level: int) -> Tensor:
    """(rows, 2 ** width) float64: each row's mass of e per value of digit `level` of the bit patterns, over its
    tokens whose higher digits equal the row's prefix (rows,)."""
    shift, width = _DIGITS[level]
    rows, nb = e.shape[0], 1 << width
    if level == 0:   # every token (the top digit has no prefix)
        idx, w = ((bits >> shift) + torch.arange(rows, dtype=bits.dtype, device=bits.device)[:, None] * nb).flatten(), \
            e.flatten()
    else:            # only the tokens matching the prefix (few, past the first digit)
        r, t = ((bits >> (shift + width)) == prefix.to(bits.dtype)[:, None]).nonzero(as_tuple=True)
        b = bits[r, t]
        idx, w = ((b >> shift) & (nb - 1)) + r.to(b.dtype) * nb, e[r, t]
    return torch.bincount(idx, w.double(), minlength=rows * nb).view(rows, nb)


def _radix_top_p(e: Tensor, bits: Tensor, h1: Tensor, kmin: Tensor, minp: Tensor, top_p: Tensor,
                 group) -> Tuple[Tensor, Tensor]:
    """The kept values of top-p rows (collective, two all-gathers): e (rows, n) this rank's exp(z - max) float32,
    bits its bit patterns, h1 (world, rows, bins) every rank's masses per first digit, kmin (world, rows) every
    rank's mass at or above the row's min-p. The cut is the smallest value whose mass strictly above is below
    top_p x the row's mass (tritium.reference.sampling_distribution): each round keeps the lowest digit value
    holding mass whose mass above (every higher digit's, plus the mass above the prefix) is still below the
    target; tokens of higher digit values are all kept, lower ones all dropped. Returns this rank's kept values
    (e, zero below max(cut, min-p)) and every rank's kept mass (world, rows) float64."""
    world, rows = h1.shape[0], e.shape[0]
    target = top_p * h1.sum((0, 2))
    dev = e.device
    above = torch.zeros(rows, dtype=torch.float64, device=dev)
    prefix = torch.zeros(rows, dtype=torch.int64, device=dev)
    kept = torch.zeros(world, rows, dtype=torch.float64, device=dev)
    hist = h1
    for level, (_, width) in enumerate(_DIGITS):
        if level:
            hist = all_gather(_digit_masses(e, bits, prefix, level), group)  # (world, rows, bins)
        g = hist.sum(0)
        nb = g.shape[1]
        over = torch.cat([g.flip(-1).cumsum(-1).flip(-1)[:, 1:], torch.zeros(rows, 1, dtype=g.dtype, device=dev)], -1)
        ok = (g > 0) & (above[:, None] + over < target[:, None])
        d = torch.where(ok, torch.arange(nb, device=dev), nb).amin(-1)
        d = torch.where(d < nb, d, (g > 0).long().cumsum(-1).argmax(-1))  # none (rounding): the top value with mass
        higher = torch.arange(nb, device=dev)[None, :] > d[:, None]
        if level == len(_DIGITS) - 1:
            higher = higher | (torch.arange(nb, device=dev)[None, :] == d[:, None])    # the cut's own value is kept
        kept += (hist * higher).sum(-1)
        above += over.gather(1, d[:, None])[:, 0]
        prefix = (prefix << width) | d
    cut = prefix.to(torch.int32).view(torch.float32)
    by_min_p = minp >= cut
    kept = torch.where(by_min_p[None, :], kmin, kept)
    cut = torch.maximum(cut, minp)
    return torch.where(e >= cut[:, None], e, 0.0), kept


def vocab_parallel_sample(logits: Tensor, vocab_start: int,
                          params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                          history: Optional[Sequence[Sequence[int]]] = None,
                          uniform: Optional[Sequence[float]] = None, vocab_size: Optional[int] = None,
                          group: Optional[dist.ProcessGroup] = None) -> Tuple[Tensor, Tensor]:
    """tritium.sample of the full logits from this rank's vocabulary slice (rows, n), holding vocabulary rows
    [vocab_start, vocab_start + n) (collective): (tokens int64 (rows,), log-probabilities float32 (rows,) under the
    raw log_softmax of the full logits), the same on every rank, and the same tokens tritium.sample draws in one
    process from the same logits, params, history and uniform numbers (tritium.reference.sampling_distribution's
    semantics; the vocabulary-sized work in float32, per-row sums, cuts and running masses in float64: only a
    uniform number within rounding of a boundary could pick a neighbour).

    params: one SamplingParams per row (or one for all; None: greedy), history: each row's generated tokens (for
    the penalties; a seeded row's draw number is its length), uniform: each sampling row's number in [0, 1)
    (default: tritium.ops.sampling.seeded_uniform(seed, len(history)), so unseeded sampling rows need it),
    vocab_size: the full vocabulary (needed unless every row is greedy). Full logits are never gathered:

    - every rank applies the penalties and logit bias to its slice and reduces each row to (best score, its token,
      its log-sum-exp, its logit at the token); one all-gather of (rows, 4) float64 gives the greedy tokens, the
      global maximum and the raw log-sum-exp;
    - top-k rows: each rank sends its slice's mass and its top candidates (k of them, 4 times as many again while
      the cut may reach below them) with their ids and logits, and every rank cuts and draws from the same
      candidate set, in token order as the one-process kernel does; top-p rows without top-k send 64 candidates
      with the masses of their values' first radix digit, and when their nucleus reaches below the candidates
      find the cut by radix selection (_radix_top_p: two more all-gathers) and draw as the rows below;
    - the other sampling rows (temperature, min-p): each rank's kept mass (in the same all-gather as the first
      candidates) tells every rank which rank's slice the draw falls in, and one all-gather of (rows, 2) brings
      that rank's token.

    Rows whose logits have NaN or +inf, or no finite value after penalties and bias, get token -1 (logprob NaN).
    Ranks must pass the same params and history: when any row is not plain greedy, a small all-gather checks that
    they agree (and that every rank's arguments are valid), raising the same ValueError, naming the rank, on all."""
    rows, n = logits.shape
    v0 = int(vocab_start)
    plist = [_GREEDY] * rows if params is None else ([params] * rows if isinstance(params, SamplingParams)
                                                      else list(params))
    plain = len(plist) == rows and all(isinstance(p, SamplingParams) and _plain_greedy(p) for p in plist)
    if not plain:
        err = None
        try:
            if len(plist) != rows or not all(isinstance(p, SamplingParams) for p in plist):
                raise ValueError(f"params must be a SamplingParams or a list of {rows}")
            if vocab_size is None:
                raise ValueError("vocab_size (the full vocabulary) is needed unless every row is greedy")
            for p in plist:
                p.validate(vocab_size)
            if history is not None and len(history) != rows:
                raise ValueError(f"history must have one sequence per row ({rows}), got {len(history)}")
            if any(p.temperature > 0 and p.seed is None for p in plist) and uniform is None:
                raise ValueError("rows sampling without a seed need uniform numbers")
            if uniform is not None and len(uniform) != rows:
                raise ValueError(f"uniform must have one number per row ({rows}), got {len(uniform)}")
        except ValueError as e:
            err = str(e)
        sig = zlib.crc32(repr([(dataclasses.astuple(p) if isinstance(p, SamplingParams) else p,
                                None if history is None or i >= len(history) else
                                (len(history[i]), int(sum(int(t) for t in history[i]))),
                                None if uniform is None else float(uniform[i]) if i < len(uniform) else None)
                               for i, p in enumerate(plist)]).encode())
        agree("vocab_parallel_sample", err, [rows, sig], ["rows", "sampling parameters' checksum"], group)
    # the vocabulary-sized work in float32 (as the one-process kernel), the few per-row numbers in float64
    x = logits.float()
    dev = x.device   # the small tensors too: NCCL gathers CUDA tensors only
    lse_loc = torch.logsumexp(x, -1)
    z = x
    if not plain:
        z = x.clone()
        _penalise(z, plist, history, v0)
    best, idx = z.max(-1)
    hot = [i for i, p in enumerate(plist) if p.temperature > 0]
    if hot:   # sampling rows' scores z / T: their maximum is the maximum's z / T (rounding is monotone)
        ht = torch.tensor(hot, device=dev)
        temps = torch.tensor([plist[i].temperature for i in hot], dtype=torch.float32, device=dev)
        best[ht] = best[ht] / temps
    cols = [best.double(), (idx + v0).double(), lse_loc.double(), x.gather(1, idx[:, None])[:, 0].double()]
    table = all_gather(torch.stack(cols, -1), group)                       # (world, rows, 4)
    world = table.shape[0]
    win = table[..., 0].argmax(0)                                           # first rank holding the maximum
    pick = table.gather(0, win[None, :, None].expand(1, rows, 4))[0]
    glse = torch.logsumexp(table[..., 2], 0)
    gmax = table[..., 0].amax(0)
    tokens = pick[:, 1].long()
    raw = pick[:, 3].clone()
    bad = ~torch.isfinite(glse) | ~torch.isfinite(gmax)
    hot = [i for i in hot if not bad[i]]
    if hot:
        V = int(vocab_size)
        ht = torch.tensor(hot, device=dev)
        temps = torch.tensor([plist[i].temperature for i in hot], dtype=torch.float32, device=dev)
        e = z.index_select(0, ht).div_(temps[:, None]).sub_(gmax[ht].float()[:, None]).exp_()   # (hot, n)
        row = {i: j for j, i in enumerate(hot)}                             # row -> its row of e
        us = [float(uniform[i]) if uniform is not None else
              seeded_uniform(plist[i].seed, len(history[i]) if history is not None else 0) for i in range(rows)]
        # top-k rows (with or without top-p): candidates, gathered deeper until they hold every cut; top-p rows:
        # the first candidates, else the cut by radix selection; the other rows: the rank holding the draw
        cand = [i for i in hot if 0 < plist[i].top_k < V]
        nuc = [i for i in hot if i not in cand and plist[i].top_p < 1.0]
        flat = [i for i in hot if i not in cand and i not in nuc]
        fe = e[[row[i] for i in flat]]
        for j, i in enumerate(flat):   # min-p: drop the tokens below the cut (e = 0 adds nothing to a sum)
            if plist[i].min_p > 0:
                fe[j] = torch.where(fe[j] >= plist[i].min_p, fe[j], 0.0)
        ne = e if nuc == hot else e[[row[i] for i in nuc]]                  # no copy when every row is top-p
        nbits = ne.view(torch.int32)                                        # e >= 0: ordered as the values
        minp = torch.tensor([plist[i].min_p for i in nuc], dtype=torch.float32, device=dev)
        cn = cand + nuc
        esum = e.sum(-1)
        nmin = esum[[row[i] for i in nuc]]
        for j, i in enumerate(nuc):
            if plist[i].min_p > 0:
                nmin[j] = torch.where(ne[j] >= minp[j], ne[j], 0.0).sum()
        # with the first candidates: the kept mass of every temperature / min-p row, the whole mass of every
        # top-k / top-p row and, of every top-p row, the mass at or above its min-p and its first digit's masses
        masses = torch.cat([fe.sum(-1), esum[[row[i] for i in cn]], nmin]).double()
        head = torch.cat([masses, _digit_masses(ne, nbits, torch.zeros(len(nuc), dtype=torch.int64, device=dev), 0)
                          .flatten()])
        nmax = -(-V // world)
        m = min(nmax, max([plist[i].top_k for i in cand] + [_CAND0] * bool(nuc), default=0))
        todo, first, deep = list(cn), True, []
        while first or todo:
            k = min(m, n)
            part = torch.full((len(todo), m, 3), -1.0, dtype=torch.float64, device=dev)
            if todo and k:
                rows_e = [row[i] for i in todo]
                src = e if rows_e == list(range(len(hot))) else e[rows_e]   # no copy when every row is here
                tv, ti = src.topk(k, -1)
                part[:, :k, 0], part[:, :k, 1] = tv.double(), (ti + v0).double()
                part[:, :k, 2] = x[torch.tensor(todo, device=dev)[:, None], ti].double()
            payload = torch.cat([head, part.flatten()]) if first else part.flatten()
            got = all_gather(payload, group)                                # (world, len)
            if first:
                nf, nc = len(flat), len(cn)
                ktable, mass = got[:, :nf], got[:, nf:nf + nc].sum(0)
                kmin = got[:, nf + nc:len(masses)]                          # (world, top-p rows)
                h1 = got[:, len(masses):len(head)].view(world, len(nuc), 1 << _DIGITS[0][1])
                got = got[:, len(head):]
                first = False
            got = got.view(world, len(todo), m, 3)
            again = []
            for j, i in enumerate(todo):
                c = got[:, j]                                               # (world, m, 3)
                full = c[:, -1, 1] >= 0                                     # ranks that may hold more
                floor = -math.inf if m >= nmax or not bool(full.any()) else float(c[full, -1, 0].max())
                c = c.reshape(-1, 3)
                c = c[c[:, 1] >= 0]
                keep, cuts = _nucleus(c[:, 0], plist[i], V, float(mass[cn.index(i)]))
                if any(float(t) <= floor for t in cuts):                    # the cut may reach missing tokens
                    (deep if i in nuc else again).append(i)
                    continue
                c = c[keep]
                c = c[c[:, 1].argsort()]                                    # in token order, as one process draws
                cum = torch.cumsum(c[:, 0], 0)
                at = int(torch.searchsorted(cum, us[i] * cum[-1], side="right").clamp(max=len(cum) - 1))
                tokens[i], raw[i] = int(c[at, 1]), c[at, 2]
            todo, m = again, min(4 * m, nmax)
        if deep:   # top-p rows whose nucleus reaches below the candidates: the cut, then as the flat rows
            dj = torch.tensor([nuc.index(i) for i in deep], device=dev)
            de, dkept = _radix_top_p(ne[dj], nbits[dj], h1[:, dj], kmin[:, dj], minp[dj],
                                     torch.tensor([plist[i].top_p for i in deep], dtype=torch.float64, device=dev),
                                     group)
            flat, fe, ktable = flat + deep, torch.cat([fe, de]), torch.cat([ktable, dkept], 1)
        if flat:
            # which rank's slice the draw falls in, then that rank's token
            pre = torch.cumsum(ktable, 0) - ktable                          # (world, rows_flat) mass before
            total = ktable.sum(0)
            me = dist.get_rank(group)
            mine = torch.full((len(flat), 2), -1.0, dtype=torch.float64, device=dev)
            for j, i in enumerate(flat):
                target = us[i] * float(total[j])
                holders = (ktable[:, j] > 0).nonzero()[:, 0].tolist()
                owner = next((r for r in holders if target < float(pre[r, j] + ktable[r, j])), holders[-1])
                if owner == me:   # the first token whose running kept mass passes the target
                    cum = float(pre[owner, j]) + torch.cumsum(fe[j].double(), 0)
                    at = int(torch.searchsorted(cum, target, side="right"))
                    if at >= n:   # the target rounded past this slice's mass: its last kept token
                        at = int(fe[j].nonzero()[-1])
                    mine[j, 0], mine[j, 1] = at + v0, float(x[i, at])
            g = all_gather(mine, group)                                     # (world, rows_flat, 2)
            pick2 = g.gather(0, g[..., 0].argmax(0)[None, :, None].expand(1, len(flat), 2))[0]   # the owner's
            for j, i in enumerate(flat):
                tokens[i], raw[i] = int(pick2[j, 0]), pick2[j, 1]
    logprobs = (raw - glse).float()
    tokens[bad] = -1
    logprobs[bad] = float("nan")
    return tokens, logprobs


def vocab_parallel_top_logprobs(logits: Tensor, vocab_start: int, k: int,
                                group: Optional[dist.ProcessGroup] = None) -> Tuple[Tensor, Tensor]:
    """The k most likely tokens of each row of the full logits and their log-probabilities (log_softmax of the
    full logits), from this rank's vocabulary slice (rows, n) (collective): (tokens int64 (rows, k), logprobs
    float32 (rows, k)), most likely first, the same on every rank. Each rank sends its log-sum-exp and its own k
    best (logit, id) pairs: one all-gather of (rows, 1 + 2k) float64, not the logits."""
    rows, n = logits.shape
    x = logits.float()
    kk = min(k, n)
    tv, ti = x.topk(kk, -1)
    mine = torch.full((rows, 1 + 2 * k), -math.inf, dtype=torch.float64, device=logits.device)
    mine[:, 0] = torch.logsumexp(x, -1)
    mine[:, 1:1 + kk], mine[:, 1 + k:1 + k + kk] = tv, (ti + vocab_start).double()
    table = all_gather(mine, group)                                         # (world, rows, 1 + 2k)
    glse = torch.logsumexp(table[..., 0], 0)
    vals = table[..., 1:1 + k].permute(1, 0, 2).reshape(rows, -1)
    ids = table[..., 1 + k:].permute(1, 0, 2).reshape(rows, -1)
    bv, at = vals.topk(k, -1)
    return ids.gather(1, at).long(), (bv - glse[:, None]).float()


def vocab_parallel_beam_candidates(logits: Tensor, vocab_start: int,
                                   requests: Sequence[Tuple[Sequence[int], Sequence[float], int]],
                                   group: Optional[dist.ProcessGroup] = None) -> List[List[Tuple[float, int, int]]]:
    """Beam search's next candidates from this rank's vocabulary slice (collective). logits (rows, n) hold
    vocabulary rows [vocab_start, vocab_start + n) of every beam of every request; requests: per request (its
    beams' rows of logits, their summed log-probabilities, m). Returns per request its m best continuations, best
    first, as (score, beam, token): score = the beam's sum + log_softmax of the full logits at token (float32, as
    Engine._beam_candidates computes it in one process). A beam's candidates are monotone in its logits, so the m
    best of the whole vocabulary are among every rank's m largest logits of every beam: each rank sends, per row,
    its log-sum-exp and its m largest logits with their ids, one all-gather of (rows, 1 + 2 m) float64 for every
    beam request of the step; every rank then picks the same candidates from the same table."""
    rows, n = logits.shape
    v0 = int(vocab_start)
    M = max((m for _, _, m in requests), default=1)
    x = logits.float()
    k = min(M, n)
    mine = torch.full((rows, 1 + 2 * M), -1.0, dtype=torch.float64, device=logits.device)
    mine[:, 1:1 + M] = -math.inf
    mine[:, 0] = torch.logsumexp(x, -1)
    tv, ti = x.topk(k, -1)
    mine[:, 1:1 + k], mine[:, 1 + M:1 + M + k] = tv.double(), (ti + v0).double()
    table = all_gather(mine, group)                                          # (world, rows, 1 + 2 M)
    glse = torch.logsumexp(table[..., 0], 0).float()                        # each row's full log-sum-exp
    out = []
    for beams, base, m in requests:
        at = torch.as_tensor(list(beams), dtype=torch.int64, device=logits.device)
        vals = table[:, at, 1:1 + M].float()                                 # (world, beams, M): exact
        ids = table[:, at, 1 + M:].long()
        score = (torch.tensor(list(base), dtype=torch.float32, device=logits.device)[None, :, None]
                 + (vals - glse[at][None, :, None]))
        beam = torch.arange(len(at), device=logits.device)[None, :, None].expand_as(score)
        ok = ids >= 0
        s, b, t = score[ok], beam[ok], ids[ok]
        top = s.topk(min(m, s.numel()))
        out.append([(v, int(b[j]), int(t[j])) for v, j in zip(top.values.tolist(), top.indices.tolist())])
    return out


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------
class TPEngine(Engine):
    """tritium.inference.Engine on a TPLlama: every rank runs the same engine on the same requests (the
    scheduling is deterministic), each over its own paged KV cache (its heads only), and picks each token with
    vocab_parallel_sample: the same sampling parameters as one process (temperature, top-k, top-p, min-p,
    repetition / presence / frequency penalties, logit bias, seeds, top_logprobs), and a seeded request draws the
    same tokens as Engine in one process. Beam search (num_beams > 1) keeps the same beams as Engine in one process
    (vocab_parallel_beam_candidates: one all-gather of every beam's few best candidates per step)."""

    def __init__(self, model: TPLlama, tokenizer=None, **kwargs):
        if not isinstance(model, TPLlama):
            raise TypeError(f"TPEngine takes a TPLlama (shard_llama), got {type(model).__name__}")
        super().__init__(model, tokenizer, **kwargs)
        self.group = model.tp.group
        # on the group's device (NCCL takes CUDA tensors only)
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).to(meta_device(self.group))
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(seed, src, group=self.group)   # unseeded draws: the same on every rank
        self._seed = int(seed)
        self._added = 0

    def add_request(self, prompt, max_new_tokens: int = 64, params=None, **kwargs):
        req = super().add_request(prompt, max_new_tokens, params, **kwargs)
        try:   # every rank refuses a bad logit_bias here alike (one process finds it in the step)
            req.params.validate(self.model.tp.full_config.vocab_size)
        except ValueError:
            self.waiting.remove(req)
            raise
        # unseeded rows draw from the engine's seed (broadcast: the same on every rank) and this request's number
        req.tp_seed = (self._seed + self._added) % (2 ** 62) if req.params.seed is None else req.params.seed
        self._added += 1
        return req

    def _beam_candidates(self, r, logits: Tensor, seqs: list) -> List[tuple]:
        return self._beam_cands.pop(r.id)   # found for every beam request of the step in _process

    def _process(self, logits: Tensor, rows: List[tuple]) -> None:
        beam_rows: Dict[int, List[int]] = {}   # beam requests' rows (every rank has the same rows in the same order)
        for i, (r, _) in enumerate(rows):
            if r.num_beams > 1 and not r.done:
                beam_rows.setdefault(r.id, []).append(i)
        if beam_rows:
            reqs = {r.id: r for r, _ in rows}
            found = vocab_parallel_beam_candidates(
                logits, self.model.tp.vocab_start,
                [(idxs, [sum(rows[i][1].logprobs) for i in idxs], 2 * reqs[rid].num_beams)
                 for rid, idxs in beam_rows.items()], self.group)
            self._beam_cands = dict(zip(beam_rows, found))
            for rid, idxs in beam_rows.items():
                self._beam_step(reqs[rid], logits[idxs], [rows[i][1] for i in idxs])
            keep = [i for i, (r, _) in enumerate(rows) if r.num_beams == 1]
            if not keep:
                return
            if len(keep) < len(rows):
                logits, rows = logits[keep], [rows[i] for i in keep]
        plist = [r.params for r, _ in rows]
        history = [s.generated for _, s in rows]
        # the draw number of a row is its count of generated tokens, as tritium.sample numbers seeded draws
        uniform = [seeded_uniform(r.tp_seed, len(h)) for (r, _), h in zip(rows, history)]
        toks, lps = vocab_parallel_sample(logits, self.model.tp.vocab_start, plist, history, uniform,
                                          self.model.tp.full_config.vocab_size, self.group)
        tops = {}   # as Engine: each wanting row's token log-probability and its top_logprobs most likely tokens
        want = [i for i, (r, _) in enumerate(rows) if r.top_logprobs is not None]
        k = max((rows[i][0].top_logprobs for i in want), default=0)
        if k:
            ti, tv = vocab_parallel_top_logprobs(logits[want], self.model.tp.vocab_start, k, self.group)
        for j, i in enumerate(want):
            kk = rows[i][0].top_logprobs
            tops[i] = (lps[i].item(), list(zip(ti[j, :kk].tolist(), tv[j, :kk].tolist())) if kk else [])
        for i, ((r, s), t, lp) in enumerate(zip(rows, toks.tolist(), lps.tolist())):
            if r.done:
                continue
            if t < 0:
                self._finish(r, "error", "")
                continue
            s.tokens.append(t)
            s.logprobs.append(lp)
            if i in tops:
                s.top.append(tops[i])
            self._after_token(r, s, t)
