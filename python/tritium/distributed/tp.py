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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..inference.engine import Engine
from ..models.llama import Linear, Llama, LlamaConfig, StepInput
from .comm import agree, all_gather, all_reduce

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


def shard_state_dict(w: Dict[str, Tensor], c: LlamaConfig, s: TPShard) -> Dict[str, Tensor]:
    """Rank s.rank's slice of Hugging Face Llama weights w (Llama.hf_state_dict's names) for s.local_config(c)."""
    hd = c.head_dim
    (f0, fn), (v0, vn) = s.ffn, s.vocab
    q_idx = torch.tensor(s.q_heads)
    kv_idx = torch.tensor(s.kv_heads)
    out = {"model.norm.weight": w["model.norm.weight"],
           "model.embed_tokens.weight": w["model.embed_tokens.weight"][v0:v0 + vn]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"][v0:v0 + vn]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."

        def rows(name, idx, n):
            t = w[p + name + ".weight"]
            return t.view(n, hd, t.shape[-1]).index_select(0, idx).reshape(-1, t.shape[-1])
        out[p + "input_layernorm.weight"] = w[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = w[p + "post_attention_layernorm.weight"]
        out[p + "self_attn.q_proj.weight"] = rows("self_attn.q_proj", q_idx, c.n_heads)
        out[p + "self_attn.k_proj.weight"] = rows("self_attn.k_proj", kv_idx, c.n_kv_heads)
        out[p + "self_attn.v_proj.weight"] = rows("self_attn.v_proj", kv_idx, c.n_kv_heads)
        o = w[p + "self_attn.o_proj.weight"]
        out[p + "self_attn.o_proj.weight"] = o.view(o.shape[0], c.n_heads, hd).index_select(1, q_idx).reshape(
            o.shape[0], -1)
        out[p + "mlp.gate_proj.weight"] = w[p + "mlp.gate_proj.weight"][f0:f0 + fn]
        out[p + "mlp.up_proj.weight"] = w[p + "mlp.up_proj.weight"][f0:f0 + fn]
        out[p + "mlp.down_proj.weight"] = w[p + "mlp.down_proj.weight"][:, f0:f0 + fn]
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
    """This rank's TPLlama of model (a loaded Llama, the same on every rank of group; quantized weights are
    dequantised: the shard is float in model's dtype). Not a collective; the returned model's forwards are."""
    return shard_from_state_dict(model.hf_state_dict(), model.config, model.dtype, group, model.device)


def shard_from_state_dict(w: Dict[str, Tensor], config: LlamaConfig, dtype: torch.dtype = torch.float32,
                          group: Optional[dist.ProcessGroup] = None, device="cpu") -> TPLlama:
    """This rank's TPLlama from Hugging Face Llama weights w (float tensors; e.g. a memory-mapped torch.load of
    Llama.hf_state_dict()) of config: only this rank's slices are copied."""
    if not dist.is_initialized():
        raise RuntimeError("shard_llama: torch.distributed is not initialized (call init_process_group first, "
                           "e.g. under torchrun)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = tp_shards(config, world)[rank]
    local = TPLlama(shard.local_config(config), TPInfo(group, shard, config))
    local = local.to(device=device, dtype=dtype).requires_grad_(False)
    return local.load_weights(shard_state_dict(w, config, shard))


def gather_vocab(local: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Collective, for tests and debugging (the serving path never does this): the full logits from every rank's
    vocabulary slice along the last dim (slices may differ in size)."""
    world = dist.get_world_size(group)
    n = all_gather(torch.tensor([local.shape[-1]]), group).view(-1).tolist()
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


def _gumbel(seed: int, vocab_size: int, start: int, n: int) -> Tensor:
    """Gumbel noise over the whole vocabulary from seed (the same numbers on every rank and at every world size),
    this rank's slice [start, start + n)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(vocab_size, generator=g, dtype=torch.float64)[start:start + n]
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def vocab_parallel_sample(logits: Tensor, vocab_start: int, temperature: Optional[Sequence[float]] = None,
                          seeds: Optional[Sequence[int]] = None, vocab_size: Optional[int] = None,
                          group: Optional[dist.ProcessGroup] = None) -> Tuple[Tensor, Tensor]:
    """One token per row from this rank's vocabulary slice of the logits (rows, n) (collective): (tokens int64
    (rows,), log-probabilities float32 (rows,), the log-softmax of the full logits at the token), the same on every
    rank. Temperature 0 (or None: every row) is greedy (the lowest id among equal maxima, as argmax); a row with
    temperature T > 0 draws from softmax(logits / T) by the Gumbel-max trick, its noise drawn over the whole
    vocabulary from seeds[row] (so a draw does not depend on the world size) and sliced. Each rank reduces its
    slice to (best score, its token, its log-sum-exp, its logit) and one all-gather of (rows, 4) float64 picks the
    token: full logits are never gathered. A row whose logits are not finite gets token -1."""
    rows, n = logits.shape
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    score = x
    temps = [0.0] * rows if temperature is None else [float(t) for t in temperature]
    hot = [i for i, t in enumerate(temps) if t > 0]
    if hot:
        if seeds is None or vocab_size is None:
            raise ValueError("vocab_parallel_sample: sampling rows (temperature > 0) need seeds and vocab_size")
        score = x.double().clone()
        for i in hot:
            score[i] = score[i] / temps[i] + _gumbel(int(seeds[i]), vocab_size, vocab_start, n)
    best, idx = score.max(-1)
    mine = torch.stack([best.double(), (idx + vocab_start).double(), lse.double(),
                        x.gather(1, idx[:, None])[:, 0].double()], -1)
    table = all_gather(mine, group)                                         # (world, rows, 4)
    win = table[..., 0].argmax(0)                                           # first rank holding the maximum
    pick = table.gather(0, win[None, :, None].expand(1, rows, 4))[0]
    glse = torch.logsumexp(table[..., 2], 0)
    tokens = pick[:, 1].long()
    logprobs = (pick[:, 3] - glse).float()
    bad = ~torch.isfinite(glse) | ~torch.isfinite(pick[:, 0])
    tokens[bad] = -1
    return tokens, logprobs


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------
class TPEngine(Engine):
    """tritium.inference.Engine on a TPLlama: every rank runs the same engine on the same requests (the
    scheduling is deterministic), each over its own paged KV cache (its heads only), and picks each token with
    vocab_parallel_sample. Greedy and temperature sampling (seeded or not); other sampling parameters,
    beams and top_logprobs raise ValueError."""

    def __init__(self, model: TPLlama, tokenizer=None, **kwargs):
        if not isinstance(model, TPLlama):
            raise TypeError(f"TPEngine takes a TPLlama (shard_llama), got {type(model).__name__}")
        super().__init__(model, tokenizer, **kwargs)
        self.group = model.tp.group
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(seed, src, group=self.group)   # unseeded draws: the same on every rank
        self._seed = int(seed)

    def add_request(self, prompt, max_new_tokens: int = 64, params=None, **kwargs):
        from ..ops.sampling import SamplingParams

        p = params if params is not None else SamplingParams(**{"temperature": 0.0, **{
            k: v for k, v in kwargs.items() if k in {f.name for f in dataclasses.fields(SamplingParams)}}})
        if (p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) != \
                (0, 1.0, 0.0, 1.0, 0.0, 0.0) or p.logit_bias:
            raise ValueError("tensor-parallel decoding samples greedily or at a temperature only: top_k, top_p, "
                             "min_p, penalties and logit_bias are not supported")
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("top_logprobs") is not None:
            raise ValueError("tensor-parallel decoding does not support num_beams > 1 or top_logprobs")
        return super().add_request(prompt, max_new_tokens, params, **kwargs)

    def _process(self, logits: Tensor, rows: List[tuple]) -> None:
        temps = [r.params.temperature for r, _ in rows]
        # a seeded row's noise depends on its seed and position only; unseeded rows draw from the engine's seed
        seeds = [((self._seed + r.id if r.params.seed is None else r.params.seed) * 1000003 + len(s.tokens))
                 % (2 ** 62) for r, s in rows]
        toks, lps = vocab_parallel_sample(logits, self.model.tp.vocab_start, temps, seeds,
                                          self.model.tp.full_config.vocab_size, self.group)
        for (r, s), t, lp in zip(rows, toks.tolist(), lps.tolist()):
            if r.done:
                continue
            if t < 0:
                self._finish(r, "error", "")
                continue
            s.tokens.append(t)
            s.logprobs.append(lp)
            self._after_token(r, s, t)

