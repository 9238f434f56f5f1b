"""serve_decode: a Llama decoder's layers for one decode step in one call (CPU).

``serve_decode(x, weights, linears, pools, final_norm, cos, sin, positions, slot_mapping, block_tables, seq_lens,
n_heads, eps, scale)`` runs, for every layer, exactly the ops ``tritium.models.llama.Block.serve`` runs on a
decode-only step (QKV projection, rope, append_kv, paged_attention_decode, output projection,
fused_add_rms_norm, gate/up projection with SwiGLU, down projection, fused_add_rms_norm), in the same order and
so with the same result, from C++ (csrc/serve.cpp): at one token per sequence those ops take microseconds each,
and calling some 300 of them from Python per step costs as much as a large part of the weight stream.

x (T, dim): the step's embeddings; returns the final normalised hidden state (T, dim). Per layer ``weights``
holds [attn_norm, mlp_norm] then three tensors per projection (wqkv, wo, w_gate_up, w_down) and ``linears``
six ints per projection: its kind (KIND below) and five parameters; ``pools`` [k_pool, v_pool] per layer
(written in place); the other arguments are the StepInput's and the config's. A projection's description comes
from the object that owns its weight for the step's row count: ``PackedLinear.decode_plan`` (float) or
``QuantizedWeight.decode_plan`` (quantized); see csrc/serve.cpp for what each kind calls.
"""
from __future__ import annotations

from typing import List

from torch import Tensor

from ._library import define_op

# a projection's kind in serve_decode's ``linears`` (csrc/serve.cpp's Kind)
KIND = {"quant": 0, "panels": 1, "panels_swiglu": 2, "small": 3, "matmul": 4, "onednn": 5}


def _fake_serve_decode(x, weights, linears, pools, final_norm, cos, sin, positions, slot_mapping, block_tables,
                       seq_lens, n_heads, eps, scale):
    return x.new_empty(x.shape)


serve_decode = define_op(
    "serve_decode(Tensor x, Tensor[] weights, int[] linears, Tensor(a!)[] pools, Tensor final_norm, Tensor cos,"
    " Tensor sin, Tensor positions, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, int n_heads,"
    " float eps, float scale) -> Tensor", _fake_serve_decode)


def no_tensor(like: Tensor) -> Tensor:
    """The placeholder for an unused tensor slot of a projection's description."""
    return like.new_empty(0)


__all__: List[str] = []
