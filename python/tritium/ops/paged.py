"""Paged KV cache ops: append_kv (write new tokens' K/V into their slots) and paged_attention_decode (one query
token per sequence against its cached pages, GQA, split-K flash-decoding).

Pools are (num_blocks, block_size, kv_heads, head_dim); a token's slot is block * block_size + offset.
Block tables are int32 (batch, max_blocks), seq_lens int32 (batch,). Inputs the kernels do not cover (a dtype
outside float32/bfloat16/float16/float64, float64 on the GPU, a non-unit head_dim stride, devices other than
cpu/cuda) go explicitly to ``tritium.reference``. The tensors' values are not range-checked on the hot path
(that would need a host sync): slots and table entries must index the pools, seq_lens must be within the
table's width; ``tritium.inference.PagedKVCache`` builds them so.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ._library import define_op, kernel_ok


def _fake_append(k, v, k_pool, v_pool, slot_mapping):
    return None


def _fake_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, softcap, window):
    return q.new_empty(q.shape)


append_kv_op = define_op(
    "append_kv(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slot_mapping) -> ()",
    _fake_append, "paged:append_kv")
paged_attention_decode_op = define_op(
    "paged_attention_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens,"
    " float scale, float? softcap, int? window) -> Tensor",
    _fake_decode, "paged:paged_attention_decode")


def _check_pools(k_pool: Tensor, v_pool: Tensor, fn: str) -> None:
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"{fn}: k_pool and v_pool must both be (num_blocks, block_size, kv_heads, head_dim), "
                         f"got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    if k_pool.dtype != v_pool.dtype or k_pool.device != v_pool.device:
        raise ValueError(f"{fn}: k_pool and v_pool must share dtype and device, got {k_pool.dtype}/{k_pool.device}"
                         f" and {v_pool.dtype}/{v_pool.device}")


def append_kv(k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, slot_mapping: Tensor) -> None:
    """Write each token's K and V into its slot of the pools, in place: k_pool[s // bs, s % bs] = k[t] for
    s = slot_mapping[t]; a negative slot skips the token (padding). k, v (tokens, kv_heads, head_dim) in the
    pools' dtype; slot_mapping int64 (tokens,)."""
    _check_pools(k_pool, v_pool, "append_kv")
    if k.dim() != 3 or k.shape != v.shape or tuple(k.shape[1:]) != tuple(k_pool.shape[2:]):
        raise ValueError(f"append_kv: k and v must be (tokens, {k_pool.shape[2]}, {k_pool.shape[3]}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != k_pool.dtype or v.dtype != v_pool.dtype:
        raise TypeError(f"append_kv: k and v must have the pools' dtype {k_pool.dtype}, got {k.dtype}, {v.dtype}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"append_kv: slot_mapping must be int64 ({k.shape[0]},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if not (k.device == v.device == k_pool.device == slot_mapping.device):
        raise ValueError("append_kv: k, v, the pools and slot_mapping must be on one device")
    if k.shape[0] == 0:
        return None
    if not (kernel_ok(k_pool) and k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1):
        return reference.append_kv(k, v, k_pool, v_pool, slot_mapping)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    append_kv_op(k, v, k_pool, v_pool, slot_mapping)


def paged_attention_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           scale: float, softcap: Optional[float] = None, window: Optional[int] = None) -> Tensor:
    """Decode attention over a paged cache: out[b, h] = softmax(s) @ V with s_j = q[b, h] . k_j * scale (then
    softcap * tanh(s / softcap) if softcap is set) over the first seq_lens[b] tokens of sequence b, whose pages
    are block_tables[b]; query head h reads KV head h // (q_heads // kv_heads) (GQA/MQA).

    window: attend only to the last `window` tokens (Mistral/HF `sliding_window`; flash_attention's
    window=(window - 1, 0)). A sequence of length 0 gives zeros.
    q (batch, q_heads, head_dim); pools (num_blocks, block_size, kv_heads, head_dim) in q's dtype; block_tables
    int32 (batch, max_blocks); seq_lens int32 (batch,).  Returns (batch, q_heads, head_dim) in q's dtype."""
    _check_pools(k_pool, v_pool, "paged_attention_decode")
    if q.dim() != 3 or q.shape[-1] != k_pool.shape[-1]:
        raise ValueError(f"paged_attention_decode: q must be (batch, q_heads, {k_pool.shape[-1]}), got "
                         f"{tuple(q.shape)}")
    if k_pool.shape[2] == 0 or q.shape[1] % k_pool.shape[2] != 0:
        raise ValueError(f"paged_attention_decode: q_heads ({q.shape[1]}) must be a multiple of kv_heads "
                         f"({k_pool.shape[2]})")
    if q.dtype != k_pool.dtype:
        raise TypeError(f"paged_attention_decode: q and the pools must share a dtype, got {q.dtype} and "
                        f"{k_pool.dtype}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"paged_attention_decode: block_tables must be int32 ({q.shape[0]}, max_blocks), got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"paged_attention_decode: seq_lens must be int32 ({q.shape[0]},), got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention_decode: softcap must be > 0 or None, got {softcap}")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"paged_attention_decode: window must be None (no window) or an int >= 1 (attend to the "
                         f"last `window` tokens), got {window!r}")
    if not (kernel_ok(q) and q.stride(-1) == 1 and k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1):
        return reference.paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, softcap, window)
    return paged_attention_decode_op(q, k_pool, v_pool, block_tables, seq_lens, float(scale),
                                     None if softcap is None else float(softcap), window)


__all__: List[str] = []  # exported from tritium.inference, not from the top-level namespace
