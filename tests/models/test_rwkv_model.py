"""tritium.models.rwkv: the RWKV-7 LM on tritium's ops against its plain-PyTorch twin (the naive wkv recurrence and
torch's norms): logits and every parameter's gradient at odd lengths, prefill + step decoding against the full
forward, generation, the config's checks and torch.compile(fullgraph=True).

Tolerances as tests/models/test_ssm_model.py: against the float64 twin, the float32 tritium model's error is at
most twice the float32 twin's (tests/util.py's rule); direct float32-to-float32 comparisons allow 1e-4 of the
compared tensor's largest magnitude (float32 rounding through two layers and a 37-step recurrence is ~1e-6 of it;
a wrong formula, a missing norm, residual or gate moves the logits by percents)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.util import assert_within_torch_error
from tritium.models.rwkv import IMPLS, RWKV7Config, RWKV7LM
from .recurrent_lm import check_greedy_generate

RTOL_SCALE = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float = RTOL_SCALE) -> None:
    err, bound = (a - b).abs().max().item(), scale * b.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _config() -> RWKV7Config:
    """Odd vocab, 3 heads of 8, small odd low-rank sizes (the defaults are at least 32)."""
    return RWKV7Config(vocab_size=67, d_model=24, n_layer=2, head_size=8, d_ffn=40, decay_rank=5, a_rank=3,
                       v_rank=7, gate_rank=6)


def _random_model(impl: str, seed: int = 1) -> RWKV7LM:
    """Every parameter moved off BlinkDL's init by N(0, 0.3) (its zeros, e.g. the output projections and the
    low-rank first factors, would hide a missing term), w0 and the a/v/gate offsets included."""
    torch.manual_seed(seed)
    model = RWKV7LM(_config(), impl=impl)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _loss_and_grads(model: RWKV7LM, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def test_config_defaults_and_checks():
    c = RWKV7Config(d_model=768, n_layer=12)
    # BlinkDL's ranks at C = 768: 1.8 sqrt(C) ~ 49.9 -> 64, 1.3 sqrt(C) ~ 36 -> 32, 0.6 C^0.8 ~ 121 -> 128
    assert (c.decay_rank, c.a_rank, c.v_rank, c.gate_rank, c.d_ffn, c.n_head) == (64, 64, 32, 128, 3072, 12)
    assert c.group_norm_eps == pytest.approx(64e-5)
    with pytest.raises(ValueError, match="d_model must be a multiple of head_size 64, got 100"):
        RWKV7Config(d_model=100)
    with pytest.raises(ValueError, match="n_layer must be a positive int, got 0"):
        RWKV7Config(n_layer=0)
    with pytest.raises(ValueError, match="gate_rank must be a positive int or None, got -1"):
        RWKV7Config(gate_rank=-1)
    with pytest.raises(ValueError, match="impl must be one of"):
        RWKV7LM(_config(), impl="cuda")
    with pytest.raises(ValueError, match=r"token ids must be an integer tensor \(batch, L\), got \(2, 3, 4\)"):
        RWKV7LM(_config())(torch.zeros(2, 3, 4, dtype=torch.long))


def test_state_dict_names_are_blinkdls_and_shared_by_the_twins():
    sd = RWKV7LM(_config()).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in RWKV7LM(_config(), "torch").state_dict()
                                                   .items()}
    for name in ("emb.weight", "blocks.0.ln0.weight", "blocks.1.att.v2", "blocks.0.att.w0", "blocks.0.att.r_k",
                 "blocks.1.att.ln_x.weight", "blocks.1.ffn.x_k", "blocks.1.ffn.value.weight", "ln_out.bias",
                 "head.weight"):
        assert name in sd, name
    assert "blocks.0.att.v0" not in sd and "blocks.1.ln0.weight" not in sd
    assert sd["blocks.0.att.r_k"].shape == (3, 8) and sd["blocks.0.att.w1"].shape == (24, 5)


@pytest.mark.parametrize("length", [1, 7, 37])
def test_twins_agree_in_logits_and_every_gradient(length):
    twin = _random_model("torch")
    model = RWKV7LM(twin.config, impl="tritium")
    model.load_state_dict(twin.state_dict())
    ids = torch.randint(0, twin.config.vocab_size, (2, length + 1))
    got, got_g = _loss_and_grads(model, ids)
    want, want_g = _loss_and_grads(twin, ids)
    ref, ref_g = _loss_and_grads(copy.deepcopy(twin).double(), ids)
    # emb, ln_out (2), head; per layer 33: 2 LayerNorms (4), ln_x (2), 6 mixes, w/a/v 3 each, the gate's 2, k_k,
    # k_a, r_k, 4 projections, the channel mix's 3; layer 0 has ln0 (2) and no v0/v1/v2
    assert set(got_g) == set(want_g) and len(got_g) == 4 + (33 + 2 - 3) + 33
    assert_within_torch_error(got, want, ref, "logits")
    _close(got, want, "logits vs twin")
    for name in got_g:
        assert got_g[name] is not None and want_g[name] is not None, name
        assert_within_torch_error(got_g[name], want_g[name], ref_g[name], f"grad {name}")
        _close(got_g[name], want_g[name], f"grad {name} vs twin")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_prefill_then_steps_equal_the_full_forward(impl, prompt_len):
    """The state is updated in place and its size is the same after every token."""
    model = _random_model(impl).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids)
    logits, state = model.prefill(ids[:, :prompt_len])
    _close(logits, full[:, :prompt_len], "prefill logits")
    c = model.config
    assert state.att_shift.shape == state.ffn_shift.shape == (c.n_layer, 3, c.d_model)
    assert state.wkv.shape == (c.n_layer, 3, c.n_head, c.head_size, c.head_size)
    assert state.wkv.dtype == torch.float32
    size = state.nbytes
    ptrs = (state.att_shift.data_ptr(), state.ffn_shift.data_ptr(), state.wkv.data_ptr())
    for t in range(prompt_len, ids.shape[1]):
        step = model.step(ids[:, t], state)
        assert step.shape == (3, c.vocab_size)
        _close(step, full[:, t], f"step logits at position {t}")
        assert state.nbytes == size
        assert (state.att_shift.data_ptr(), state.ffn_shift.data_ptr(), state.wkv.data_ptr()) == ptrs


def test_step_twins_agree():
    twin = _random_model("torch").eval()
    model = RWKV7LM(twin.config)
    model.load_state_dict(twin.state_dict())
    ids = torch.randint(0, twin.config.vocab_size, (2, 6))
    (a, sa), (b, sb) = model.prefill(ids[:, :3]), twin.prefill(ids[:, :3])
    for t in range(3, 6):
        a, b = model.step(ids[:, t], sa), twin.step(ids[:, t], sb)
        _close(a, b, f"step {t}")
    _close(sa.wkv, sb.wkv, "wkv state")


def test_generate_is_greedy_over_the_full_forward():
    model = _random_model("tritium").eval()
    prompt = check_greedy_generate(model)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="3 tokens for a state of batch 2"):
        model.step(torch.zeros(3, dtype=torch.long), model.new_state(2))


def test_torch_compile_fullgraph_forward_equals_eager():
    model = _random_model("tritium")
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(ids)
    _close(got, model(ids), "compiled logits", 1e-5)


def test_the_tritium_model_runs_the_kernels(monkeypatch):
    """impl="tritium" reaches tritium's wkv7 kernels (forward, backward, the decoding step), not the naive
    recurrence its fallback for uncovered inputs would run."""
    from tritium.ops import wkv

    def refuse(*args, **kwargs):
        raise AssertionError("the tritium model fell back to wkv7_reference")

    monkeypatch.setattr(wkv, "wkv7_reference", refuse)
    model = _random_model("tritium")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    _loss_and_grads(model, ids)
    _, state = model.prefill(ids[:, :4])
    model.step(ids[:, 4], state)
