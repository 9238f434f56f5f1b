"""serve_decode (tritium.ops.serve): a decode step's layers in one call equal Block.serve's op-by-op loop bit for
bit (same ops, same order), for every kind of projection the serving path has: unpacked float (linear_small /
matmul), packed panels and panels with SwiGLU in the epilogue (float32), oneDNN (bfloat16, from two rows),
quantized with float or int8 activations. Logits of every step and the KV pools after the run are compared."""
from __future__ import annotations

import pytest
import torch

from tritium.inference.engine import Engine
from tritium.models import LlamaConfig, build
from tritium.models import llama as llama_mod
from tritium.utils import cpu_has_bf16_dot

# ffn_dim 64: a multiple of half a float32 panel, so pack_for_inference fuses SwiGLU into the gate/up panels
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, vocab_size=101,
                  max_seq_len=128, tie_embeddings=False)
PROMPTS = [[1, 2, 3, 4, 5], [7] * 19, [9, 8], [3, 1, 4, 1, 5, 9, 2, 6], [60]]


def _model(setup: str):
    dtype = {"bf16": torch.bfloat16, "f64": torch.float64}.get(setup.split("-")[0], torch.float32)
    m = build(CFG).init_random(generator=torch.Generator().manual_seed(0)).to(dtype)
    if "packed" in setup:
        m.pack_for_inference()
    if "int8" in setup or "int4" in setup:
        m.quantize_("int4" if "int4" in setup else "int8", 32 if "int4" in setup else None,
                    int8_act="act" in setup)
    return m


def _run(m, fused: bool, monkeypatch, max_batch: int):
    """Every step's logits and the pools after greedy decoding of PROMPTS, with serve_decode or without it."""
    calls = []
    real = llama_mod._SERVE_DECODE
    monkeypatch.setattr(llama_mod, "_SERVE_DECODE", lambda *a: calls.append(1) or real(*a))
    if not fused:
        monkeypatch.setattr(llama_mod.Llama, "_decode_args", lambda self, rows: None)
    eng = Engine(m, None, max_batch=max_batch, num_blocks=64, block_size=4)
    for p in PROMPTS:
        eng.add_request(p, max_new_tokens=9, stop_token_ids=[])
    logits = []
    real_step = m.forward_step
    monkeypatch.setattr(m, "forward_step", lambda step, kv: logits.append(real_step(step, kv)) or logits[-1])
    while eng.has_work():
        eng.step()
    monkeypatch.undo()
    return logits, [t.clone() for pair in eng.pools for t in pair], len(calls)


@pytest.mark.parametrize("setup", ["f32", "f32-packed", "f64", "bf16-packed", "int8", "int4-act", "bf16-int4"])
@pytest.mark.parametrize("max_batch", [1, 3, 5])
def test_serve_decode_equals_block_serve(setup, max_batch, monkeypatch):
    m = _model(setup)
    got, got_pools, n_fused = _run(m, True, monkeypatch, max_batch)
    want, want_pools, n_plain = _run(m, False, monkeypatch, max_batch)
    assert n_fused > 0 and n_plain == 0          # the one-call step ran (and only when asked)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_pools, want_pools):
        assert torch.equal(a, b)


def test_decode_plans_name_each_projection_kind():
    """The descriptions serve_decode receives: the kind each owner chooses for the row count."""
    from tritium.ops.serve import KIND

    def kinds(m, rows):
        _, ints = m._decode_args(rows)
        return {ints[i] for i in range(0, len(ints), 6)}

    assert kinds(_model("f32"), 1) == {KIND["small"]}
    assert kinds(_model("f64"), 5) == {KIND["matmul"]}
    assert kinds(_model("f32-packed"), 1) == {KIND["panels"], KIND["panels_swiglu"]}
    assert kinds(_model("int8"), 2) == {KIND["quant"]}
    if cpu_has_bf16_dot():
        assert kinds(_model("bf16-packed"), 1) == {KIND["small"]}
        assert kinds(_model("bf16-packed"), 2) == {KIND["onednn"]}


def test_decode_args_follow_weight_and_activation_changes():
    """serve_decode's arguments are cached, and rebuilt when a served weight or activation mode changes: through
    the model's methods or a QuantizedLinear's own attribute."""
    from tritium.ops.serve import KIND

    m = _model("f32")
    assert m._decode_args(1) is m._decode_args(1)              # cached
    assert m._decode_args(1)[1][0] == KIND["small"]
    m.quantize_("int8")
    weights, ints = m._decode_args(1)
    assert ints[0] == KIND["quant"] and ints[5] == 0           # kind, then bits, group, n, k, int8_act
    m.set_int8_activations(True)
    assert m._decode_args(1)[1][5] == 2                        # wqkv: two int8 terms (Linear.int8_terms)
    m.layers[0].attention.wqkv.quant.int8_act = False
    assert m._decode_args(1)[1][5] == 0
