"""The Llama decoder with a mixture-of-experts MLP (Mixtral-style configs): equal to its eager twin and to
transformers' MixtralForCausalLM (logits, gradients, the router's load-balancing loss), loading both of
Mixtral's weight layouts, and served through the paged cache and the engine."""
import dataclasses

import pytest
import torch

import tritium
from tritium.inference.engine import Engine
from tritium.models import CONFIGS, LlamaConfig, build
from tritium.models.eager import EagerLlama
from tritium.models.llama import MoEMLP
from tritium.models.tokenizer import Tokenizer

from .test_llama import _paged_step, byte_tokenizer_meta

MOE = ["tiny-moe", "tiny-moe-shared"]


def moe_model(name="tiny-moe", dtype=torch.float32, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    return build(name, torch.float32).init_random(std=std, generator=g).to(dtype)


def twin(model):
    return EagerLlama(model.config).to(model.dtype).load_weights(model.hf_state_dict())


def mixtral(model):
    """transformers' Mixtral with model's config and weights (the reference a user would compare against)."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hc = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        sliding_window=None, router_aux_loss_coef=c.router_aux_loss_coef)
    hf = transformers.MixtralForCausalLM(hc).to(model.dtype)
    hf.load_state_dict(model.hf_state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 33)])
def test_forward_matches_eager_twin(name, shape):
    model = moe_model(name)
    ids = torch.randint(0, model.config.vocab_size, shape)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), twin(model)(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MOE)
def test_gradients_match_eager_twin(name):
    """Training: every parameter's gradient (the experts', the router's, the shared expert's, attention's), with
    the router losses in the loss."""
    model = moe_model(name).requires_grad_(True)
    eager = twin(model).requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    target = torch.randint(0, model.config.vocab_size, (2, 11))
    aux = []
    ce = torch.nn.functional.cross_entropy
    (ce(model(ids, aux).flatten(0, 1), target.flatten()) + sum(aux)).backward()
    # the twin's router losses: reference.moe's on each layer's normalised input
    eager_aux = []
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda mod, args: eager_aux.append(sum(tritium.reference.moe(
            args[0], mod.gate.weight, mod.experts.gate_up_proj, mod.experts.down_proj, mod.top_k,
            aux_loss_coef=model.config.router_aux_loss_coef, z_loss_coef=model.config.router_z_loss_coef)[1:])))
        for layer in eager.model.layers]
    (ce(eager(ids).flatten(0, 1), target.flatten()) + sum(eager_aux)).backward()
    for h in hooks:
        h.remove()
    assert len(aux) == model.config.n_layers
    torch.testing.assert_close(torch.stack(aux), torch.stack(eager_aux).detach(), rtol=1e-5, atol=1e-7)
    grads = dict(eager.named_parameters())
    assert model.hf_state_dict().keys() <= grads.keys() | {"lm_head.weight"}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}.mlp."
        moe = layer.mlp.moe
        for ours, theirs in ((moe.router_weight, "gate.weight"), (moe.w13, "experts.gate_up_proj"),
                             (moe.w2, "experts.down_proj")):
            torch.testing.assert_close(ours.grad, grads[p + theirs].grad, rtol=1e-4, atol=1e-6)
    projections = model.hf_projections()
    assert len(projections) == model.config.n_layers * (4 if model.config.shared_ffn_dim else 2)
    for lin, names, _ in projections:
        ref = torch.cat([grads[n + ".weight"].grad for n in names])
        torch.testing.assert_close(lin.weight.grad, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.embed.grad, eager.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


def test_matches_transformers_mixtral():
    """Logits equal transformers' MixtralForCausalLM on the same weights; with one layer (where Mixtral's loss,
    which pools every layer's tokens, is the per-layer one) the router loss equals coef * its aux_loss."""
    model = moe_model("tiny-moe", std=0.2)
    ids = torch.randint(0, model.config.vocab_size, (3, 19))
    with torch.no_grad():
        aux = []
        ours = model(ids, aux)
        out = mixtral(model)(ids, output_router_logits=True)
    torch.testing.assert_close(ours, out.logits, rtol=1e-5, atol=1e-5)

    one = build(dataclasses.replace(model.config, n_layers=1)).init_random(
        std=0.2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        aux = []
        ours = one(ids, aux)
        out = mixtral(one)(ids, output_router_logits=True)
    torch.testing.assert_close(ours, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux[0], one.config.router_aux_loss_coef * out.aux_loss, rtol=1e-5, atol=1e-8)


def test_loads_mixtral_published_layout():
    """Mixtral's published checkpoints name each expert's w1 (gate), w3 (up), w2 (down) under
    block_sparse_moe: load_weights stacks them into the same model."""
    model = moe_model("tiny-moe")
    sd = model.hf_state_dict()
    legacy = {}
    for k, v in sd.items():
        if ".mlp.gate." in k:
            legacy[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
        elif ".mlp.experts.gate_up_proj" in k:
            base = k.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                legacy[f"{base}{e}.w1.weight"], legacy[f"{base}{e}.w3.weight"] = v[e, :f], v[e, f:]
        elif ".mlp.experts.down_proj" in k:
            base = k.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for e in range(v.shape[0]):
                legacy[f"{base}{e}.w2.weight"] = v[e]
        else:
            legacy[k] = v
    other = build("tiny-moe").load_weights(legacy)
    for a, b in zip(model.hf_state_dict().values(), other.hf_state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("last_only", [False, True], ids=["logits_rows", "last_logits_only"])
@pytest.mark.parametrize("name", MOE)
def test_paged_step_matches_full_forward(name, last_only):
    model = moe_model(name).pack_for_inference()
    v = model.config.vocab_size
    seqs = [torch.randint(0, v, (n,)).tolist() for n in (13, 5, 1, 9)]
    with torch.no_grad():
        out = _paged_step(model, seqs, last_only=last_only)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i], model(torch.tensor([s]))[0, -1], rtol=1e-5, atol=1e-5)


# tiny-moe with every in_features a multiple of 32, so "int4" (groups of 32) quantizes every projection
QCFG = dataclasses.replace(CONFIGS["tiny-moe"], vocab_size=261, dim=64, n_heads=8, ffn_dim=64)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_engine_serves_moe(quantize):
    """Continuous batching over the paged cache: each request's greedy tokens equal the eager twin's (float
    weights), and batching requests together changes none of them; quantized models (projections and experts)
    serve too."""
    cfg = QCFG
    model = build(cfg).init_random(std=0.3, generator=torch.Generator().manual_seed(1))
    tok = Tokenizer.from_gguf_metadata(byte_tokenizer_meta())
    prompts = ["hello world", "a", "the quick brown fox jumps", "1234"]
    if quantize is None:
        eager = twin(model)
        want = [eager.generate(torch.tensor([tok.encode(p)]), 10)[0] for p in prompts]
    else:
        model.quantize_(quantize)
        want = [Engine(model, tok, max_batch=1).generate([p], max_new_tokens=10, stop_token_ids=[])[0].token_ids
                for p in prompts]
    got = Engine(model, tok, max_batch=4, block_size=4).generate(prompts, max_new_tokens=10, stop_token_ids=[])
    assert [r.token_ids for r in got] == want


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_stores_experts_quantized(mode):
    """Llama.quantize_ quantizes the experts with the projections: no float expert weight is left, and the
    logits equal those of the float model holding every weight dequantized (float activations), prefill and
    paged step alike; int8 activations (mode 1) stay close to them."""
    import copy

    model = build(QCFG).init_random(std=0.1, generator=torch.Generator().manual_seed(2))
    float_model = copy.deepcopy(model)
    model.quantize_(mode)
    assert not [n for n, _ in model.named_parameters() if "w13" in n or "w2" in n]
    with torch.no_grad():
        for q, f in zip(model._linears(), float_model._linears()):
            f.weight.copy_(q.quant.weight.dequantize())
        for q, f in zip(model._moes(), float_model._moes()):
            f.w13.copy_(torch.stack([e.weight.dequantize() for e in q.experts13]))
            f.w2.copy_(torch.stack([e.weight.dequantize() for e in q.experts2]))
        ids = torch.randint(0, QCFG.vocab_size, (2, 11))
        want = float_model(ids)
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
        seqs = [ids[0].tolist(), ids[1, :5].tolist()]
        out = _paged_step(model, seqs, last_only=True)
        torch.testing.assert_close(out[0], want[0, -1], rtol=1e-4, atol=1e-4)
        model.set_int8_activations(1)
        assert {(e.int8_act, d.int8_act) for m in model._moes() for e, d in zip(m.experts13, m.experts2)} == {(1, 2)}
        got = model(ids)
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_bfloat16_and_compile():
    """bfloat16 runs (within 2x the eager twin's own error against float64) and the training forward compiles
    whole (fullgraph)."""
    model = moe_model("tiny-moe-shared", std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        exact = twin(model.to(torch.float64))(ids)
        model = model.to(torch.float32)
        ours = model.to(torch.bfloat16)(ids).double()
        ref = twin(model)(ids).double()
    assert (ours - exact).abs().max() <= 2 * (ref - exact).abs().max()
    model = moe_model("tiny-moe-shared").requires_grad_(True)

    def loss(ids):
        aux = []
        return model(ids, aux).logsumexp(-1).mean() + sum(aux)

    torch.testing.assert_close(torch.compile(loss, fullgraph=True)(ids), loss(ids), rtol=1e-5, atol=1e-6)


def test_config_errors_and_projection_names():
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, num_experts = 4\], got 5"):
        LlamaConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts must be a non-negative integer, got -1"):
        LlamaConfig(num_experts=-1)
    model = build("tiny-moe-shared")
    assert isinstance(model.layers[0].mlp, MoEMLP)
    assert model.config.n_params() == sum(p.numel() for p in model.parameters())
    names = [n for _, ns, _ in model.hf_projections() for n in ns]
    assert "model.layers.1.mlp.shared_expert.down_proj" in names and not any("experts." in n for n in names)
    assert build("tiny-moe").hf_projections()[2][1] == ["model.layers.1.self_attn.q_proj",
                                                          "model.layers.1.self_attn.k_proj",
                                                          "model.layers.1.self_attn.v_proj"]


def test_loads_transformers_saved_mixtral_directory(tmp_path):
    """tritium.models.load on the directory MixtralForCausalLM.save_pretrained writes (config.json with
    model_type "mixtral", per-expert tensors): the same logits; a sliding window, which tritium does not
    implement, is refused by name."""
    import json

    from tritium.models import load
    from tritium.models.tokenizer import Tokenizer as TT

    model = moe_model("tiny-moe", std=0.2)
    mixtral(model).save_pretrained(str(tmp_path))
    TT.from_gguf_metadata(byte_tokenizer_meta())._tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    loaded, _ = load(str(tmp_path))
    assert (loaded.config.num_experts, loaded.config.top_k) == (4, 2)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-6, atol=1e-6)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    with pytest.raises(ValueError, match="sliding_window 16 is not supported"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 5}))
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) must be at most num_local_experts \(4\)"):
        load(str(tmp_path))


@pytest.mark.parametrize("types", [("Q8_0", "Q8_0", "Q8_0"), ("Q4_0", "Q4_1", "Q8_0")], ids=["q8_0", "mixed"])
def test_loads_gguf_mixture_of_experts(tmp_path, types):
    """A GGUF in llama.cpp's Mixtral layout (expert_count / expert_used_count metadata, the experts' gate, up and
    down stacked 3-D as ffn_gate_exps / ffn_up_exps / ffn_down_exps, the router ffn_gate_inp), with the expert
    stacks quantized (gate, up and down in `types`): the loaded model equals one built from the dequantised
    tensors, with weights="float" (experts dequantised at load) and weights="native" (each expert served from its
    own blocks: gate and up fused when their formats agree, side by side when not)."""
    from tritium.models import load
    from tritium.models.llama import QuantizedParts

    from .test_llama import write_gguf

    cfg = dataclasses.replace(CONFIGS["tiny-moe"], dim=64, n_heads=8, n_kv_heads=2, ffn_dim=96)   # Q8_0: 32-blocks
    model = build(cfg).init_random(generator=torch.Generator().manual_seed(0))
    path = tmp_path / "moe.gguf"
    of = dict(zip(("gate_proj", "up_proj", "down_proj"), types))
    expected = write_gguf(path, model, qtype_of=lambda name: of[name.rsplit(".", 1)[-1]] if "experts." in name
                          else "F32")
    ref = build(cfg)
    w = {k: torch.from_numpy(v).float() for k, v in expected.items()}
    sd = model.hf_state_dict()
    for k in sd:
        if k.endswith("experts.gate_up_proj"):
            w[k] = torch.cat([w.pop(k.replace("gate_up_proj", "gate_proj")),
                              w.pop(k.replace("gate_up_proj", "up_proj"))], 1)
    for k in ("q_proj", "k_proj"):   # write_gguf permuted Q/K rows the llama.cpp way; the loader undoes it
        for name in [n for n in w if n.endswith(f"{k}.weight")]:
            w[name] = sd[name]
    ref.load_weights({k: v.reshape(sd[k].shape) for k, v in w.items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    for weights in ("float", "native"):
        loaded, _ = load(str(path), weights=weights)
        assert (loaded.config.num_experts, loaded.config.top_k) == (4, 2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), ref(ids), rtol=1e-5, atol=1e-5)
        moe = loaded.layers[0].mlp.moe
        assert (moe.w13 is None) == (weights == "native")
        if weights == "native":
            assert {q.weight.bits for q in moe.experts2} == {8}
            assert isinstance(moe.experts13[0], QuantizedParts) == (types[0] != types[1])
            assert loaded.weight_bytes_per_token() < ref.weight_bytes_per_token() / 2
    assert not torch.equal(moe.expert_weights()[0], model.layers[0].mlp.moe.w13)   # the quantization rounded them
