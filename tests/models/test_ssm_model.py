"""tritium.models.ssm: the Mamba LM against Hugging Face transformers' MambaForCausalLM (logits, greedy generation,
its cached decoding logits), the tritium model against its plain-PyTorch twin (logits and every parameter's
gradient), prefill + step decoding against the full forward, and torch.compile(fullgraph=True).

Tolerances follow tests/util.py's rule where there is a float64 reference (the torch twin in float64): the error of
a float32 result is at most twice the error of the float32 result it is compared with, plus 1e-6 of the scale.
Direct float32-to-float32 comparisons use 1e-4 of the compared tensor's largest magnitude: float32 rounding over two
layers, a 37-step scan and a 101-way head is ~1e-6 of that, so 1e-4 leaves room for summation order and still
catches any wrong formula (a missing norm weight, D, bias or gate moves the logits by percents)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from tests.util import assert_within_torch_error
from tritium.models.ssm import IMPLS, MambaConfig, MambaLM
from .recurrent_lm import check_greedy_generate

VOCAB, HIDDEN, LAYERS, STATE, CONV, EXPAND = 101, 32, 2, 16, 4, 2
RTOL_SCALE = 1e-4   # direct float32 comparisons: max |a - b| <= RTOL_SCALE * max |b|


def _hf_model() -> "transformers.MambaForCausalLM":
    """A tiny random transformers Mamba, float32, every parameter perturbed off its init (the norms' ones, D's
    ones, the conv's zero bias would hide a missing weight; see _perturb)."""
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=STATE,
                                   conv_kernel=CONV, expand=EXPAND, eos_token_id=None, bos_token_id=None,
                                   pad_token_id=None)
    torch.manual_seed(0)
    return _perturb(transformers.MambaForCausalLM(cfg).float().eval())


def _perturb(model):
    """Every parameter moved off its init: N(0, 0.3) added (N(0, 0.1) to A_log and dt_proj's bias, which sit in
    exponents), enough that greedy decoding does not settle on one repeated token (a 0.1 perturbation does)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.1 if name.endswith(("A_log", "dt_proj.bias")) else 0.3) * torch.randn_like(p))
    return model


def _ours(hf, impl: str, dtype=torch.float32) -> MambaLM:
    model = MambaLM(MambaConfig.from_hf(hf.config), impl=impl)
    model.load_state_dict(hf.state_dict())
    return model.to(dtype).eval()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float = RTOL_SCALE) -> None:
    err, bound = (a - b).abs().max().item(), scale * b.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


def test_config_and_state_dict_names_match_transformers(hf):
    cfg = MambaConfig.from_hf(hf.config)
    assert (cfg.d_inner, cfg.dt_rank) == (EXPAND * HIDDEN, -(-HIDDEN // 16))
    ours = MambaLM(cfg).state_dict()
    theirs = hf.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    m = MambaLM(cfg)
    assert m.lm_head.weight is m.backbone.embeddings.weight
    # mamba_ssm's checkpoints: backbone.embedding.weight and no lm_head.weight
    sd = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
          for k, v in theirs.items() if k != "lm_head.weight"}
    m.load_state_dict(sd)
    assert torch.equal(m.lm_head.weight, theirs["lm_head.weight"])


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_match_transformers(hf, impl):
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        theirs = hf(ids).logits
        theirs64 = hf.double()(ids).logits
        hf.float()
        ref64 = _ours(hf, "torch", torch.float64)(ids)
        ours = _ours(hf, impl)(ids)
    assert ours.shape == (2, 37, VOCAB) and ours.dtype == torch.float32
    # the float64 twin is transformers' model (theirs computes A = -exp(A_log) in float32 even in float64)
    _close(ref64, theirs64, "float64 twin vs transformers", 1e-6)
    _close(ours, theirs, f"{impl} vs transformers")
    assert_within_torch_error(ours, theirs, ref64, f"{impl} logits")


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_generation_matches_transformers(hf, impl):
    """transformers' generate(do_sample=False) runs its own cached decoding (the slow path's recurrent state on
    CPU): the same tokens, and the logits of every step close to ours (prefill's last, then step's)."""
    prompt = torch.randint(0, VOCAB, (2, 11))
    n = 8
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model = _ours(hf, impl)
    tokens = model.generate(prompt, n)
    assert tokens.shape == (2, 11 + n)
    assert torch.equal(tokens, out.sequences)
    logits, state = model.prefill(prompt, last_only=True)
    for i in range(n):
        _close(logits, out.logits[i], f"{impl} decoding logits, token {i}")
        logits = model.step(out.sequences[:, 11 + i], state)


def _random_model(impl: str, seed: int = 1) -> MambaLM:
    """A tiny model of our own config (untied head, odd vocab and d_model, dt_rank 2), parameters perturbed."""
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=67, d_model=24, n_layer=2, d_state=8, d_conv=4, expand=2, tie_embeddings=False)
    return _perturb(MambaLM(cfg, impl=impl))


def _loss_and_grads(model: MambaLM, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def test_twins_agree_in_logits_and_every_gradient():
    twin = _random_model("torch")
    model = MambaLM(twin.config, impl="tritium")
    model.load_state_dict(twin.state_dict())
    ids = torch.randint(0, twin.config.vocab_size, (2, 29))
    got, got_g = _loss_and_grads(model, ids)
    want, want_g = _loss_and_grads(twin, ids)
    ref, ref_g = _loss_and_grads(copy.deepcopy(twin).double(), ids)
    assert set(got_g) == set(want_g) and len(got_g) == 2 + 10 * 2 + 1   # embeddings, head, 10 per layer, norm_f
    assert_within_torch_error(got, want, ref, "logits")
    _close(got, want, "logits vs twin")
    for name in got_g:
        assert got_g[name] is not None, name
        assert_within_torch_error(got_g[name], want_g[name], ref_g[name], f"grad {name}")
        _close(got_g[name], want_g[name], f"grad {name} vs twin")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt_len", [1, 2, 9])
def test_prefill_then_steps_equal_the_full_forward(impl, prompt_len):
    """Prompts shorter than d_conv (a conv state padded with zeros) and longer; the state is updated in place and
    its size is the same after every token."""
    model = _random_model(impl).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids)
    logits, state = model.prefill(ids[:, :prompt_len])
    _close(logits, full[:, :prompt_len], "prefill logits")
    c = model.config
    assert state.conv.shape == (c.n_layer, 3, c.d_inner, c.d_conv)
    assert state.ssm.shape == (c.n_layer, 3, c.d_inner, c.d_state) and state.ssm.dtype == torch.float32
    size, ptrs = state.nbytes, (state.conv.data_ptr(), state.ssm.data_ptr())
    for t in range(prompt_len, ids.shape[1]):
        step = model.step(ids[:, t], state)
        assert step.shape == (3, c.vocab_size)
        _close(step, full[:, t], f"step logits at position {t}")
        assert state.nbytes == size and (state.conv.data_ptr(), state.ssm.data_ptr()) == ptrs


def test_generate_is_greedy_over_the_full_forward():
    model = _random_model("tritium").eval()
    check_greedy_generate(model)


def test_torch_compile_fullgraph_forward_equals_eager():
    model = _random_model("tritium")
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids)
    want = model(ids)
    _close(got, want, "compiled logits", 1e-5)


def test_the_tritium_model_runs_the_kernels(monkeypatch):
    """impl="tritium" reaches tritium's kernels in the forward, the backward, prefill and step: none of its calls
    falls back to tritium.reference (the twin's functions, whose names the ops' fallbacks call)."""
    from tritium import reference

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"the tritium model fell back to reference.{name}")
        return f

    model = _random_model("tritium")
    for name in ("causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update", "rms_norm"):
        monkeypatch.setattr(reference, name, refuse(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model(ids).sum().backward()
    _, state = model.prefill(ids)
    model.step(ids[:, 0], state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="impl"):
        MambaLM(MambaConfig(vocab_size=8, d_model=8, n_layer=1), impl="cuda")
    model = MambaLM(MambaConfig(vocab_size=8, d_model=8, n_layer=1))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill(torch.zeros(2, 0, dtype=torch.long))
    _, state = model.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        model.step(torch.zeros(3, dtype=torch.long), state)
