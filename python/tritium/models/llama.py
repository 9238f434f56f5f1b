"""A Llama-style decoder built on tritium ops (gpt-fast style: one file, a config dataclass, named configs).

Per layer: fused residual add + RMSNorm, one fused QKV projection, RoPE, attention (flash attention over a
whole sequence for plain forwards and prefill; append_kv + paged decode attention over the paged KV cache for
decode), the output projection, fused add + RMSNorm, one fused gate/up projection, SwiGLU, the down projection.
GQA (n_kv_heads dividing n_heads), partial rotary, tied or untied LM head; float32 and bfloat16.

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
from tritium.ops.paged import append_kv, paged_attention_decode
from tritium.ops.linear import (glu_pack_ok, linear_packed, linear_packed_swiglu, linear_small, pack_linear,
                                pack_linear_glu, small_rows_ok)


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

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim, got {self.rotary_dim}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def n_params(self) -> int:
        per_layer = (self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
                     + self.n_heads * self.head_dim * self.dim + 3 * self.dim * self.ffn_dim + 2 * self.dim)
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
    the prompts being prefilled back to back (each from position 0).

    tokens, positions, slot_mapping: int64 (T,); block_tables int32 (n_decode, max_blocks) and seq_lens int32
    (n_decode,) for the decode rows (seq_lens include the token being decoded); prefill_lens: host ints (their
    sum is T - n_decode); logits_rows int64: which rows' logits to return (None: every row).
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


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(c.dim))
        self.wqkv = nn.Parameter(torch.empty(q + 2 * kv, c.dim))       # (out, in): [q | k | v] rows
        self.wo = nn.Parameter(torch.empty(c.dim, q))
        self.mlp_norm = nn.Parameter(torch.ones(c.dim))
        self.w_gate_up = nn.Parameter(torch.empty(2 * c.ffn_dim, c.dim))  # [gate | up] rows
        self.w_down = nn.Parameter(torch.empty(c.dim, c.ffn_dim))


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """x (..., in) @ w (out, in)^T."""
    return torch.matmul(x, w.t())


def _packed_linear(x: Tensor, w: Tensor, packed: Dict[int, Tensor]) -> Tensor:
    """x (T, in) @ w^T for the serving path (no autograd), through w's packed copy when the model has one
    (pack_for_inference): tritium's column panels for float32/float64 (linear_packed: register tiles with no
    reduction epilogue, 1.1-1.2x rowgemm from 16 rows up), oneDNN's blocked layout for 16-bit. Without a copy,
    a decode step's few rows go to linear_small (rowgemm on the weights as they are) and the rest to BLAS."""
    p = packed.get(id(w))
    if p is not None:
        if w.dtype in (torch.float32, torch.float64):
            return linear_packed(x, p, w.shape[0])
        if not small_rows_ok(x, w):
            return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    if small_rows_ok(x, w):
        return linear_small(x, w)
    return torch.matmul(x, w.t())


def _can_pack(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Llama(nn.Module):
    """model(input_ids (batch, seq)) -> logits (batch, seq, vocab); forward_step(StepInput, kv) for serving."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.dim))
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.Parameter(torch.ones(c.dim))
        self.lm_head = None if c.tie_embeddings else nn.Parameter(torch.empty(c.vocab_size, c.dim))
        cos, sin = _rope_tables(c, c.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self._packed: Dict[int, Tensor] = {}    # id(weight) -> packed copy (pack_for_inference)
        self._packed_glu: Dict[int, Tensor] = {}  # id(w_gate_up) -> its pack_linear_glu copy (float weights)
        self._split = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)

    def pack_for_inference(self, enable: Optional[bool] = None) -> "Llama":
        """Keep packed copies of the projection and head weights for forward_step, the serving path (the plain
        forward, used for training, keeps reading the parameters), on CPU:
        - float32/float64: tritium's column panels (pack_linear / linear_packed, csrc/panel.h): measured on
          SmolLM2-135M's projections with cold weights, 12% faster than rowgemm at a 512-token prompt, 23% at
          64 rows, equal at 1-4 (where the step streams the weights either way);
        - 16-bit: oneDNN's blocked layout, whose AMX/AVX-512 bf16 kernels run these products 1.6-3x faster
          than torch.matmul (3x at 1 row, 2.5x at 16, 1.6x at 512).
        The copies double the weights' memory (540 MB more for SmolLM2-135M in float32). enable None or True:
        pack; False: drop the copies. Call again after changing the weights."""
        self._drop_packed()
        if enable is False or self.device.type != "cpu":
            return self
        panels = self.dtype in (torch.float32, torch.float64)
        if not panels and not _can_pack(self.device):
            return self
        ws = [w for layer in self.layers for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)]
        ws.append(self.embed if self.lm_head is None else self.lm_head)
        glu = {id(layer.w_gate_up) for layer in self.layers}
        with torch.no_grad():
            for w in ws:
                if panels and id(w) in glu and glu_pack_ok(w):
                    # gate and up rows interleaved per panel: SwiGLU runs in the product's epilogue
                    # (linear_packed_swiglu), the (T, 2 ffn_dim) projection is never written
                    self._packed_glu[id(w)] = pack_linear_glu(w.detach())
                else:
                    self._packed[id(w)] = (pack_linear(w.detach()) if panels
                                           else torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
        return self

    def _drop_packed(self) -> None:
        self._packed, self._packed_glu, self._pack_tuned = {}, {}, False

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the float32 RoPE tables: rebuild them on the (new) device instead.
        super()._apply(fn, recurse)
        self._drop_packed()
        cos, sin = _rope_tables(self.config, self.config.max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(self.embed.device), sin.to(self.embed.device)
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

    def load_weights(self, w: Dict[str, Tensor]) -> "Llama":
        """Load Hugging Face Llama parameter names (what tritium.models.gguf returns), fusing q/k/v and
        gate/up into one projection each."""
        self._drop_packed()
        with torch.no_grad():
            self.embed.copy_(w["model.embed_tokens.weight"])
            self.norm.copy_(w["model.norm.weight"])
            if self.lm_head is not None:
                self.lm_head.copy_(w["lm_head.weight"])
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.attn_norm.copy_(w[p + "input_layernorm.weight"])
                layer.wqkv.copy_(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0))
                layer.wo.copy_(w[p + "self_attn.o_proj.weight"])
                layer.mlp_norm.copy_(w[p + "post_attention_layernorm.weight"])
                layer.w_gate_up.copy_(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], 0))
                layer.w_down.copy_(w[p + "mlp.down_proj.weight"])
        return self

    def hf_state_dict(self) -> Dict[str, Tensor]:
        """The inverse of load_weights (to build the eager twin from this model's weights)."""
        c = self.config
        out = {"model.embed_tokens.weight": self.embed.detach(), "model.norm.weight": self.norm.detach()}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.detach()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, k, v = layer.wqkv.detach().split(self._split, 0)
            gate, up = layer.w_gate_up.detach().split(c.ffn_dim, 0)
            out.update({p + "input_layernorm.weight": layer.attn_norm.detach(),
                        p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                        p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.wo.detach(),
                        p + "post_attention_layernorm.weight": layer.mlp_norm.detach(),
                        p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                        p + "mlp.down_proj.weight": layer.w_down.detach()})
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads (every matrix once; the embedding only one row)."""
        n = sum(p.numel() for p in self.parameters()) - self.embed.numel()
        n += self.config.vocab_size * self.config.dim   # the LM head (tied: the embedding matrix)
        return n * self.embed.element_size()

    # ---- the pieces shared by both forwards ----
    def _head(self, h: Tensor, lin=_linear) -> Tensor:
        return lin(h, self.embed if self.lm_head is None else self.lm_head)

    def _layers(self, x: Tensor, attend, lin=_linear, keep: Optional[Tensor] = None, gate_up=None) -> Tensor:
        """Run the decoder stack; attend(i, layer, y, last) -> attention output (before wo), of the rows keep
        only when last (the last layer, when keep is given: the rows whose outputs are wanted). Returns the final
        normalised hidden state (of the rows keep, when given). gate_up(y, w_gate_up) -> SwiGLU of the fused
        projection (default: tritium.swiglu of lin)."""
        c = self.config
        eps = c.norm_eps
        y = tritium.rms_norm(x, (c.dim,), self.layers[0].attn_norm, eps)
        h = x
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            last = keep is not None and i == n - 1
            o = attend(i, layer, y, last)
            if last:
                h = h.index_select(0, keep)
            a = lin(o, layer.wo)
            y, h = tritium.fused_add_rms_norm(a, h, layer.mlp_norm, eps)
            g = gate_up(y, layer.w_gate_up) if gate_up is not None else tritium.swiglu(lin(y, layer.w_gate_up))
            m = lin(g, layer.w_down)
            nxt = self.layers[i + 1].attn_norm if i + 1 < n else self.norm
            y, h = tritium.fused_add_rms_norm(m, h, nxt, eps)
        return y

    # ---- plain full forward (no cache) ----
    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab); causal self-attention over the sequence."""
        c = self.config
        b, s = input_ids.shape
        x = nn.functional.embedding(input_ids, self.embed)                       # (b, s, dim)

        def attend(i, layer, y, last):
            q, k, v = _linear(y, layer.wqkv).split(self._split, -1)
            q = q.view(b, s, c.n_heads, c.head_dim)
            k = k.view(b, s, c.n_kv_heads, c.head_dim)
            q, k = tritium.rope(q, k, self.rope_cos, self.rope_sin)
            v = v.view(b, s, c.n_kv_heads, c.head_dim)
            o = tritium.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal=True)                                  # (b, h, s, hd)
            return o.transpose(1, 2).reshape(b, s, c.n_heads * c.head_dim)

        return self._head(self._layers(x, attend))

    # ---- one serving step over the paged cache ----
    def forward_step(self, step: StepInput, kv: Sequence[Tuple[Tensor, Tensor]]) -> Tensor:
        """Logits (len(step.logits_rows), vocab) of one packed step; writes every token's K/V into the pools
        kv[layer] = (k_pool, v_pool), each (num_blocks, block_size, n_kv_heads, head_dim)."""
        c = self.config
        t = step.tokens.shape[0]
        nd = step.n_decode
        x = nn.functional.embedding(step.tokens, self.embed)                     # (T, dim)
        packed = self._packed

        def lin(a, w):
            return _packed_linear(a, w, packed)

        def gate_up(a, w):
            p = self._packed_glu.get(id(w))
            if p is not None:
                return linear_packed_swiglu(a, p, w.shape[0])
            return tritium.swiglu(lin(a, w))

        # the rows whose logits are wanted, when the last layer can skip the others (see StepInput)
        keep = None
        if step.last_logits_only and t > nd + len(step.prefill_lens):
            ends = [nd + e - 1 for e in itertools.accumulate(step.prefill_lens)]
            keep = torch.tensor(list(range(nd)) + ends, dtype=torch.int64, device=step.tokens.device)

        def attend(i, layer, y, last):
            q, k, v = lin(y, layer.wqkv).split(self._split, -1)
            q = q.view(t, c.n_heads, c.head_dim)
            k = k.view(t, c.n_kv_heads, c.head_dim)
            v = v.view(t, c.n_kv_heads, c.head_dim)
            q, k = tritium.rope(q, k, self.rope_cos, self.rope_sin, step.positions)
            k_pool, v_pool = kv[i]
            append_kv(k, v, k_pool, v_pool, step.slot_mapping)
            if not step.prefill_lens:   # decode only: the common step
                return paged_attention_decode(q, k_pool, v_pool, step.block_tables, step.seq_lens,
                                              self.scale).reshape(t, -1)
            outs = []
            if nd:
                outs.append(paged_attention_decode(q[:nd], k_pool, v_pool, step.block_tables, step.seq_lens,
                                                   self.scale).reshape(nd, -1))
            start = nd
            for n in step.prefill_lens:  # each prompt attends to itself only (prefill starts at position 0)
                sl = slice(start, start + n)
                # last: its last query only (causal is bottom-right aligned: it sees all n keys)
                qs = slice(start + n - 1, start + n) if last else sl
                o = tritium.flash_attention(q[None, qs].transpose(1, 2), k[None, sl].transpose(1, 2),
                                            v[None, sl].transpose(1, 2), causal=True)         # (1, h, n, hd)
                outs.append(o[0].transpose(0, 1).reshape(o.shape[2], -1))
                start += n
            return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

        y = self._layers(x, attend, lin, keep, gate_up)
        if keep is None and step.logits_rows is not None and not step.last_logits_only:
            y = y.index_select(0, step.logits_rows)
        return self._head(y, lin)


def build(config: LlamaConfig | str, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """An uninitialised model of a named or given config."""
    if isinstance(config, str):
        config = CONFIGS[config]
    return Llama(config).to(device=device, dtype=dtype).requires_grad_(False)
