"""The plain-PyTorch eager twin of tritium.models.llama: the same Llama decoder written the way Hugging Face
transformers writes it (separate q/k/v and gate/up nn.Linear layers, rotate_half RoPE, repeat_kv GQA, float32
upcast RMSNorm, torch's scaled_dot_product_attention) with a contiguous, preallocated KV cache.

It is the correctness twin (same parameter names as a Hugging Face Llama checkpoint, so the loaders' weights
load into it directly) and the benchmark baseline of ``tritium bench generate``. Only torch ops; no tritium op (a
mixture of experts runs tritium.reference.moe, the plain-torch loop over experts).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from .llama import LlamaConfig


class EagerRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (batch, heads, seq, head_dim); cos/sin (batch, seq, rotary_dim) (partial rotary: the rest passes)."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    xr, xp = x[..., :rd], x[..., rd:]
    out = xr * cos + rotate_half(xr) * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


class EagerAttention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional["EagerKVCache"], layer: int,
                start: int) -> Tensor:
        c = self.c
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, c.n_heads, c.head_dim).transpose(1, 2)      # (b, h, s, hd)
        k = self.k_proj(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)   # (b, kvh, s, hd)
        v = self.v_proj(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cache.k[layer][:b, :, start:start + s] = k
            cache.v[layer][:b, :, start:start + s] = v
            k, v = cache.k[layer][:b, :, :start + s], cache.v[layer][:b, :, :start + s]
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # repeat_kv
        if s == 1:
            o = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after cached tokens: causal, bottom-right aligned
            mask = torch.ones(s, start + s, dtype=torch.bool, device=x.device).tril(start)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


class EagerMLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EagerMoE(nn.Module):
    """Mixtral's sparse MLP as transformers names it (gate.weight, experts.gate_up_proj, experts.down_proj), run
    as the eager loop over experts (tritium.reference.moe); plus the shared expert when the config has one."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(c.num_experts, c.dim))
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(c.num_experts, 2 * c.ffn_dim, c.dim))
        self.experts.down_proj = nn.Parameter(torch.empty(c.num_experts, c.dim, c.ffn_dim))
        self.shared_expert = EagerMLP(c.dim, c.shared_ffn_dim) if c.shared_ffn_dim else None
        self.top_k = c.top_k

    def forward(self, x: Tensor) -> Tensor:
        y, _, _ = reference.moe(x, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj, self.top_k)
        return y if self.shared_expert is None else y + self.shared_expert(x)


class EagerBlock(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = EagerRMSNorm(c.dim, c.norm_eps)
        self.self_attn = EagerAttention(c)
        self.post_attention_layernorm = EagerRMSNorm(c.dim, c.norm_eps)
        self.mlp = EagerMoE(c) if c.num_experts else EagerMLP(c.dim, c.ffn_dim)

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(EagerBlock(c) for _ in range(c.n_layers))
        self.norm = EagerRMSNorm(c.dim, c.norm_eps)


class EagerKVCache:
    """Contiguous cache: per layer (batch, kv_heads, max_len, head_dim) keys and values, written in place."""

    def __init__(self, c: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]


class EagerLlama(nn.Module):
    """model(input_ids (batch, seq), cache=None, start=0) -> logits (batch, seq, vocab)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = self.config = config
        self.model = _Body(c)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        rd = c.rotary_dim or c.head_dim
        inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
        kind = (c.rope_scaling or {}).get("type", (c.rope_scaling or {}).get("rope_type", "default"))
        if kind == "linear":
            inv_freq = inv_freq / c.rope_scaling["factor"]
        elif kind not in (None, "default"):
            raise NotImplementedError(f"the eager twin implements default and linear RoPE scaling, not {kind!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def load_weights(self, weights: Dict[str, Tensor]) -> "EagerLlama":
        sd = dict(weights)
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        self.load_state_dict(sd, strict=True)
        return self

    def _rope(self, positions: Tensor, dtype):
        freqs = positions.float()[..., None] * self.inv_freq                         # (b, s, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: Tensor, cache: Optional[EagerKVCache] = None, start: int = 0,
                logits_to_keep: int = 0) -> Tensor:
        """logits_to_keep > 0: only the last that many positions' logits (as transformers' generate does for
        the prompt)."""
        b, s = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(start, start + s, device=input_ids.device).expand(b, s)
        cos, sin = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, start)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, stop_ids=()) -> List[List[int]]:
        """Greedy continuation of a batch of equal-length prompts (the benchmark's and tests' baseline)."""
        b, s = input_ids.shape
        cache = EagerKVCache(self.config, b, s + max_new_tokens, self.lm_head.weight.dtype, input_ids.device)
        logits = self(input_ids, cache, 0, logits_to_keep=1)[:, -1]
        out = []
        for t in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt)
            if t + 1 < max_new_tokens:
                logits = self(nxt[:, None], cache, s + t)[:, -1]
        toks = torch.stack(out, 1).tolist()
        if stop_ids:
            toks = [_cut(row, stop_ids) for row in toks]
        return toks


def _cut(row: List[int], stop_ids) -> List[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1]
    return row
