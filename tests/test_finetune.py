"""LoRA on tritium's Llama (fused [q | k | v] and [gate | up] projections, adapters named by their Hugging Face
layers) against PEFT on the plain-PyTorch eager twin, the same weights: logits and adapter gradients (float32, and
bfloat16 within the tolerance rule), adapters saved by either loading in the other, merge / unmerge, the serving
path refusing unmerged adapters; tritium.finetune's data handling (prompt masking, JSON Lines errors) and training;
``tritium finetune`` on the embedded model raising held-out exact-match accuracy, and ``tritium generate
--adapter`` serving its adapter.

PEFT comes with the hf extra (`make install`): outside CI a missing one skips these tests with the command that
installs it; under CI (CI=true) it is a failure."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import tritium
from tritium import finetune as ft
from tritium.models import LlamaConfig, build
from tritium.models.eager import EagerLlama
from tests.test_lora import peft_model
from tests.util import assert_within_torch_error, need

peft = need("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]   # parts of both fused projections, and whole ones
R, ALPHA = 4, 8
CFG = LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=72, vocab_size=97,
                  max_seq_len=64, tie_embeddings=True)


def pair(dtype=torch.float32, targets=TARGETS):
    """(tritium Llama, PEFT model on its eager twin) with the same base weights and the same adapters (PEFT's,
    lora_B random, moved over through PEFT's save_pretrained and tritium.lora.load)."""
    model = build(CFG, torch.float32).init_random(generator=torch.Generator().manual_seed(0)).to(dtype)
    twin = EagerLlama(CFG).to(dtype).load_weights(model.hf_state_dict())
    return model, peft_model(twin, targets, R, ALPHA)


def ids():
    return torch.randint(0, CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))


def logits_and_grads(model):
    """Logits, and the gradient of a loss on them w.r.t. every adapter weight by PEFT key name."""
    model.zero_grad()
    out = model(ids())
    out = out.logits if hasattr(out, "logits") else out
    out.float().square().mean().backward()
    if isinstance(model, peft.PeftModel):
        grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    else:
        grads = {}
        for name, a in tritium.lora._adapters(model).items():
            grads[f"base_model.model.{name}.lora_A.weight"] = a.lora_A.grad
            grads[f"base_model.model.{name}.lora_B.weight"] = a.lora_B.grad
    return out.detach(), grads


def loaded(model, pm, tmp_path):
    pm.save_pretrained(str(tmp_path))
    return tritium.lora.load(model, str(tmp_path))


def test_peft_adapter_same_logits_and_grads_float32(tmp_path):
    model, pm = pair()
    ours = loaded(model, pm, tmp_path)
    lo, go = logits_and_grads(ours)
    lp, gp = logits_and_grads(pm)
    assert sorted(go) == sorted(gp) and len(go) == 2 * 2 * len(TARGETS)
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-5)
    for k in gp:
        torch.testing.assert_close(go[k], gp[k], rtol=1e-4, atol=1e-6, msg=k)
    # only the adapters train; the fused projections' blocks without an adapter (k_proj, gate_proj) have none
    assert all("lora" in n for n, p in ours.named_parameters() if p.requires_grad)
    assert ours.layers[0].attention.wqkv.lora.chosen == [True, False, True]
    assert ours.layers[0].mlp.w_gate_up.lora.chosen == [False, True]


def test_peft_adapter_bfloat16(tmp_path):
    """bfloat16: logits and adapter gradients within twice PEFT's own bfloat16 error of PEFT in float64."""
    model, pm = pair(torch.bfloat16)
    ours = loaded(model, pm, tmp_path)
    l64, g64 = logits_and_grads(copy.deepcopy(pm).double())
    lp, gp = logits_and_grads(pm)
    lo, go = logits_and_grads(ours)
    assert_within_torch_error(lo, lp, l64, "logits")
    for k in gp:
        assert_within_torch_error(go[k], gp[k], g64[k], k)


def test_saved_here_loads_in_peft(tmp_path):
    model = build(CFG, torch.float32).init_random(generator=torch.Generator().manual_seed(0))
    base = copy.deepcopy(model)
    tritium.lora.apply(model, r=R, alpha=ALPHA, dropout=0.1, targets=["k_proj", "o_proj", "gate_proj"])
    with torch.no_grad():
        for a in tritium.lora._adapters(model).values():
            a.lora_B.normal_(0, 0.1)
    tritium.lora.save(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA and config["lora_dropout"] == 0.1
    assert sorted({t.rsplit(".", 1)[-1] for t in config["target_modules"]}) == ["gate_proj", "k_proj", "o_proj"]
    twin = EagerLlama(CFG).load_weights(base.hf_state_dict())
    pm = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), pm(ids()), rtol=1e-5, atol=1e-5)
        # and back: a fresh model loading the file gives the same logits
        again = tritium.lora.load(copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(again(ids()), model(ids()), rtol=0, atol=0)


def test_merge_unmerge_and_serving(tmp_path):
    model, pm = pair()
    ours = loaded(model, pm, tmp_path).eval()
    base_w = ours.layers[0].attention.wqkv.weight.detach().clone()
    with torch.no_grad():
        want = ours(ids())
        x = torch.randn(3, CFG.dim)
        with pytest.raises(ValueError, match="merge them into the weights first"):
            ours.layers[0].attention.wqkv.serve(x)
        tritium.lora.merge(ours)
        torch.testing.assert_close(ours(ids()), want, rtol=1e-5, atol=1e-5)
        lin = ours.layers[0].attention.wqkv
        torch.testing.assert_close(lin.serve(x), lin(x), rtol=1e-5, atol=1e-5)   # serving sees the merged weight
        tritium.lora.unmerge(ours)
        torch.testing.assert_close(ours.layers[0].attention.wqkv.weight, base_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(ids()), want, rtol=1e-5, atol=1e-5)


def test_bad_input(tmp_path):
    model = build(CFG, torch.float32).init_random(generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="match no projection"):
        tritium.lora.apply(model, targets=["nope"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        tritium.lora.apply(model, r=0)
    quant = copy.deepcopy(model).quantize_("int8")
    with pytest.raises(NotImplementedError, match="stored quantized"):
        tritium.lora.apply(quant, targets=["q_proj"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        tritium.lora.save(model, str(tmp_path))


# ---- tritium.finetune ----
class ByteTok:
    """A byte tokenizer with a ChatML template (tritium.models.tokenizer.Tokenizer's fallback), for tiny models."""
    bos_id, eos_id, add_bos = None, 256, False

    def encode(self, text, add_bos=None):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_encode_masks_all_but_the_assistant_turns():
    tok = ByteTok()
    ex = {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                       {"role": "assistant", "content": "ok"}]}
    ids, labels = ft.encode(ex, tok, 10_000)
    assert ids == tok.encode(tok.apply_chat_template(ex["messages"], add_generation_prompt=False))
    learned = bytes(t for t in labels if t != ft.IGNORE_INDEX).decode()
    assert learned == "yo<|im_end|>\nok<|im_end|>\n"
    ids, labels = ft.encode({"prompt": "2+2=", "completion": "4"}, tok, 10_000)
    assert ids == tok.encode("2+2=4") + [256] and labels == [ft.IGNORE_INDEX] * 4 + [ord("4"), 256]
    assert len(ft.encode(ex, tok, 7)[0]) == 7


def test_read_jsonl_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    for line, match in [("{", "d.jsonl:1: not JSON"), ('{"text": "x"}', "d.jsonl:1: an example is"),
                        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
                        ('{"prompt": "x", "completion": 3}', "string 'prompt' and 'completion'")]:
        f.write_text(line + "\n")
        with pytest.raises(ValueError, match=match):
            ft.read_jsonl(str(f))
    f.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        ft.read_jsonl(str(f))


def test_dates_task_splits_are_disjoint():
    train = {e["messages"][1]["content"] for e in ft.dates_task(2000, 0, "train")}
    test = {e["messages"][1]["content"] for e in ft.dates_task(500, 0, "test")}
    assert not train & test and len(test) > 400


def test_finetune_tiny_model_learns():
    """A tiny byte-level model: the adapters' loss on the date task falls, and only the adapters changed."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=257,
                      max_seq_len=256, tie_embeddings=True)
    model = build(cfg, torch.float32).init_random(generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = ft.finetune(model, ByteTok(), ft.dates_task(64, 0), ft.FinetuneConfig(r=8, epochs=6, lr=1e-2,
                                                                                   batch_size=16, dropout=0.0))
    assert len(losses) == 24 and losses[-1] < 0.9 * losses[0]
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, before[n]), n


# ---- the commands, on the embedded model ----
def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "tritium.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_finetune_command_raises_exact_match(tmp_path):
    """The built-in task: held-out exact match rises from a few percent to most (both measured in the run), the
    adapter is PEFT's format, and tritium generate --adapter serves it."""
    out, report = tmp_path / "adapter", tmp_path / "run.json"
    r = run_cli("finetune", "--out", str(out), "--train-size", "160", "--eval-size", "32", "--json", str(report))
    assert r.returncode == 0, r.stderr
    res = json.loads(report.read_text())
    assert res["exact_match_before"] <= 0.2 and res["exact_match_after"] >= 0.6, res
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    r = run_cli("generate", "--adapter", str(out), "--max-new-tokens", "12",
                "Convert this date to YYYY-MM-DD: March 4, 2023")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("2023-03-04"), r.stdout


def test_adapter_argument_errors(tmp_path):
    r = run_cli("generate", "--adapter", str(tmp_path), "--weights", "native", "hi")
    assert r.returncode == 2 and "needs --weights float, int8 or int4" in r.stderr
    r = run_cli("generate", "--adapter", str(tmp_path), "hi")
    assert r.returncode == 1 and "no adapter_config.json" in r.stderr
    r = run_cli("finetune", "--out", str(tmp_path / "a"), "--data", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and "--data: no such file" in r.stderr


def test_qlora_on_fused_projections(tmp_path):
    """QLoRA on tritium's Llama: the adapted projections' weights in NF4 give the logits and adapter gradients of
    the float model whose weights are their dequantised values, with the same adapters; dequantize_base + merge
    then serves them."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=97,
                      max_seq_len=64, tie_embeddings=True)
    model = build(cfg, torch.float32).init_random(generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    tritium.lora.apply(model, r=R, alpha=ALPHA, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"],
                       quantize="nf4")
    with torch.no_grad():
        for a in tritium.lora._adapters(model).values():
            a.lora_B.normal_(0, 0.1)
    for (lin, _, _), (rlin, _, _) in zip(model.hf_projections(), ref.hf_projections()):
        if lin.nf4 is not None:
            with torch.no_grad():
                rlin.weight.copy_(lin.nf4.dequantize())
    tritium.lora.save(model, str(tmp_path))
    tritium.lora.load(ref, str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    lo, go = logits_and_grads_of(model, ids)
    lr, gr = logits_and_grads_of(ref, ids)
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    for k in gr:
        torch.testing.assert_close(go[k], gr[k], rtol=1e-4, atol=1e-6, msg=k)
    x = torch.randn(3, cfg.dim)
    with pytest.raises(ValueError, match="NF4 base"):
        model.layers[0].attention.wqkv.serve(x)
    ft.dequantize_bases(model)
    tritium.lora.merge(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), lo, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        tritium.lora.apply(build(CFG, torch.float32), targets=["q_proj"], quantize="nf4")


def logits_and_grads_of(model, ids_):
    model.zero_grad()
    out = model(ids_)
    out.square().mean().backward()
    grads = {}
    for name, a in tritium.lora._adapters(model).items():
        grads[name + ".A"], grads[name + ".B"] = a.lora_A.grad, a.lora_B.grad
    return out.detach(), grads
