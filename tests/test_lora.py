"""tritium.lora against PEFT: a PEFT LoRA model and tritium's LoRA on the same weights give the same logits and
adapter gradients (a tiny transformers Llama, float32, bfloat16 within the tolerance rule); adapters saved here load
in PEFT with the same outputs and PEFT's load here; apply's targets, freezing, merge / unmerge; bad input.

peft and transformers come with the hf extra (`make install`): outside CI a missing one skips these tests with the
command that installs it; under CI (CI=true) it is a failure."""
import copy
import json

import pytest
import torch

import tritium
from tests.util import assert_within_torch_error, need as _need

peft = _need("peft")
transformers = _need("transformers")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
R, ALPHA = 4, 8


def tiny_llama(dtype=torch.float32):
    """Two layers, hidden 60 over 6 heads (GQA 3), an odd vocabulary: random weights from seed 1."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=60, intermediate_size=94, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 97, (2, 11), generator=g)


def peft_model(model, targets=TARGETS, r=R, alpha=ALPHA):
    """PEFT's LoRA on model (adapters in the model's dtype), lora_B random so the adapters do something."""
    torch.manual_seed(2)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                    lora_dropout=0.0), autocast_adapter_dtype=False)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pm


def copy_adapters(pm, model):
    """PEFT's adapter weights into tritium's LoRALinear layers of the same names."""
    mods = tritium.lora.lora_modules(model)
    assert len(mods) == 2 * len(TARGETS)
    with torch.no_grad():
        for name, m in mods.items():
            layer = pm.base_model.model.get_submodule(name)
            m.lora_A.copy_(layer.lora_A["default"].weight)
            m.lora_B.copy_(layer.lora_B["default"].weight)


def logits_and_grads(model, input_ids, names):
    """Logits and the gradients of a loss on them w.r.t. each adapter weight (by module name)."""
    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    (logits.float().square().mean()).backward()
    grads = {}
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, tritium.nn.LoRALinear):
            grads[name] = (m.lora_A.grad, m.lora_B.grad)
        else:
            grads[name] = (m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad)
    return logits.detach(), grads


def _pair(dtype):
    """(PEFT model, tritium model) on copies of the same tiny Llama, with the same adapter weights."""
    base = tiny_llama(dtype)
    ours = tritium.lora.apply(copy.deepcopy(base), r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS)
    pm = peft_model(base)
    copy_adapters(pm, ours)
    return pm, ours


def test_same_logits_and_grads_float32():
    pm, ours = _pair(torch.float32)
    names = list(tritium.lora.lora_modules(ours))
    lp, gp = logits_and_grads(pm.base_model.model, ids(), names)
    lo, go = logits_and_grads(ours, ids(), names)
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-5)
    for name in names:
        for a, b in zip(go[name], gp[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_same_logits_and_grads_bfloat16():
    """bfloat16: tritium's logits and adapter gradients within twice PEFT's own bfloat16 error of PEFT in float64."""
    pm, ours = _pair(torch.bfloat16)
    names = list(tritium.lora.lora_modules(ours))
    pm64 = copy.deepcopy(pm).double()
    l64, g64 = logits_and_grads(pm64.base_model.model, ids(), names)
    lp, gp = logits_and_grads(pm.base_model.model, ids(), names)
    lo, go = logits_and_grads(ours, ids(), names)
    assert_within_torch_error(lo, lp, l64, "logits")
    for name in names:
        for which, a, b, c in zip(("dA", "dB"), go[name], gp[name], g64[name]):
            assert_within_torch_error(a, b, c, f"{name} {which}")


def test_trains_like_peft():
    """Three SGD steps on the same batch: the same losses as PEFT's (float32)."""
    pm, ours = _pair(torch.float32)
    x = ids()
    losses = []
    for model in (pm, ours):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        run = []
        for _ in range(3):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ---- PEFT's format, both ways ----
def test_saved_here_loads_in_peft(tmp_path):
    base = tiny_llama()
    ours = tritium.lora.apply(copy.deepcopy(base), r=R, alpha=ALPHA, dropout=0.1, targets=TARGETS)
    with torch.no_grad():
        for m in tritium.lora.lora_modules(ours).values():
            m.lora_B.normal_(0, 0.1)
    tritium.lora.save(ours, str(tmp_path), base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA and config["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert pm.peft_config["default"].lora_dropout == 0.1
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids()).logits, pm(input_ids=ids()).logits)


def test_peft_saved_loads_here(tmp_path):
    base = tiny_llama()
    pm = peft_model(copy.deepcopy(base), targets=["k_proj", "up_proj"], r=3, alpha=5)
    pm.save_pretrained(str(tmp_path))
    ours = tritium.lora.load(base, str(tmp_path)).eval()
    mods = tritium.lora.lora_modules(ours)
    assert len(mods) == 4 and all(m.r == 3 and m.scaling == 5 / 3 for m in mods.values())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{n}.{w}" for n in mods for w in ("lora_A", "lora_B")}
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids()).logits, pm.eval()(input_ids=ids()).logits)
    # loading again into the adapted model: the values are replaced, the layers stay
    tritium.lora.load(ours, str(tmp_path))
    assert tritium.lora.lora_modules(ours).keys() == mods.keys()


def test_rank_and_alpha_patterns(tmp_path):
    """Layers of different ranks and alphas: PEFT's rank_pattern / alpha_pattern, both ways."""
    base = tiny_llama()
    ours = tritium.lora.apply(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    ours = tritium.lora.apply(ours, r=2, alpha=3, dropout=0.0, targets=["v_proj"])
    with torch.no_grad():
        for m in tritium.lora.lora_modules(ours).values():
            m.lora_B.normal_(0, 0.1)
    tritium.lora.save(ours, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    back = tritium.lora.load(copy.deepcopy(base), str(tmp_path)).eval()
    ours.eval()
    with torch.no_grad():
        want = ours(input_ids=ids()).logits
        torch.testing.assert_close(pm(input_ids=ids()).logits, want)
        torch.testing.assert_close(back(input_ids=ids()).logits, want)


# ---- apply, merge, errors ----
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "o_proj": torch.nn.Linear(8, 8)})
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 8))
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.mlp(self.norm(self.attn["o_proj"](self.attn["q_proj"](x))))


def test_apply_targets_and_freezing():
    net = _Net()
    tritium.lora.apply(net, r=2, targets=["q_proj", "mlp.2"])
    assert sorted(tritium.lora.lora_modules(net)) == ["attn.q_proj", "mlp.2"]
    assert sorted(n for n, p in net.named_parameters() if p.requires_grad) == [
        "attn.q_proj.lora_A", "attn.q_proj.lora_B", "mlp.2.lora_A", "mlp.2.lora_B"]
    assert net.attn["q_proj"].lora_dropout == 0.05 and net.attn["q_proj"].scaling == 16.0
    regex = tritium.lora.apply(_Net(), r=2, targets=r"attn\..*")
    assert sorted(tritium.lora.lora_modules(regex)) == ["attn.o_proj", "attn.q_proj"]
    every = tritium.lora.apply(_Net(), r=2)
    assert len(tritium.lora.lora_modules(every)) == 4


def test_merge_unmerge_model():
    net = tritium.lora.apply(_Net(), r=3, alpha=6, dropout=0.0)
    with torch.no_grad():
        for m in tritium.lora.lora_modules(net).values():
            m.lora_B.normal_()
    x = torch.randn(5, 8)
    w0 = net.mlp[0].weight.detach().clone()
    want = net(x)
    tritium.lora.merge(net)
    torch.testing.assert_close(net(x), want)
    assert not torch.equal(net.mlp[0].weight, w0)
    tritium.lora.unmerge(net)
    torch.testing.assert_close(net.mlp[0].weight, w0)
    torch.testing.assert_close(net(x), want)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="apply: r must be a positive integer, got 0"):
        tritium.lora.apply(_Net(), r=0, targets=["q_proj"])
    with pytest.raises(ValueError, match="apply: r must be a positive integer, got -2"):
        tritium.lora.apply(_Net(), r=-2)
    with pytest.raises(ValueError, match=r"apply: targets \['k_proj'\] match no torch.nn.Linear module of the model "
                                         r"\(its linear layers not yet adapted: attn.q_proj, attn.o_proj, mlp.0"):
        tritium.lora.apply(_Net(), targets=["k_proj"])
    with pytest.raises(ValueError, match=r"apply: dropout must be in \[0, 1\), got 1.5"):
        tritium.lora.apply(_Net(), dropout=1.5)
    with pytest.raises(TypeError, match="apply: targets must be None, a regular expression or a list"):
        tritium.lora.apply(_Net(), targets=[1])
    with pytest.raises(ValueError, match="save: the model has no LoRA adapters"):
        tritium.lora.save(_Net(), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="load: no adapter_config.json"):
        tritium.lora.load(_Net(), str(tmp_path))
    net = tritium.lora.apply(_Net(), r=2, targets=["q_proj"])
    tritium.lora.save(net, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="load: the adapter's use_dora = True is not supported"):
        tritium.lora.load(_Net(), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="load: the adapter's module 'attn.q_proj' is not in the model"):
        tritium.lora.load(torch.nn.Sequential(torch.nn.Linear(8, 8)), str(tmp_path))
