"""tritium.models.xlstm: the xLSTM (mLSTM) LM on tritium's ops against its plain-PyTorch twin (the step-by-step
recurrence and torch's norms): logits and every parameter's gradient at odd lengths, prefill + step decoding against
the full forward, generation, the config's checks and torch.compile(fullgraph=True).

Tolerances as tests/models/test_rwkv_model.py: against the float64 twin, the float32 tritium model's error is at
most twice the float32 twin's (tests/util.py's rule); direct float32-to-float32 comparisons allow 1e-4 of the
compared tensor's largest magnitude."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.util import assert_within_torch_error
from tritium.models.xlstm import IMPLS, XLSTMConfig, XLSTMLM
from .recurrent_lm import check_greedy_generate

RTOL_SCALE = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float = RTOL_SCALE) -> None:
    err, bound = (a - b).abs().max().item(), scale * b.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _config() -> XLSTMConfig:
    """Odd vocab, 3 heads, odd head sizes; layer 0 an mLSTM block, layer 1 an sLSTM block, layer 2 an mLSTM one."""
    return XLSTMConfig(vocab_size=67, d_model=24, n_layer=3, n_head=3, qk_dim=5, v_dim=7, d_ffn=40, slstm_at=(1,))


def _random_model(impl: str, seed: int = 1) -> XLSTMLM:
    """Every parameter moved off the init by N(0, 0.3) (its zero gate weights and -10 input-gate biases would hide
    a missing term), the input-gate biases back near zero so the gates matter."""
    torch.manual_seed(seed)
    model = XLSTMLM(_config(), impl=impl)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for block in model.blocks:
            if not block.slstm:
                block.mlstm_layer.igate_preact.bias.add_(10.0)
    return model


def _loss_and_grads(model: XLSTMLM, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def test_config_defaults_and_checks():
    c = XLSTMConfig(d_model=512, n_head=4)
    assert (c.qk_dim, c.v_dim, c.d_ffn) == (64, 128, 1408)
    with pytest.raises(ValueError, match="d_model must be a multiple of n_head 4, got 30"):
        XLSTMConfig(d_model=30)
    with pytest.raises(ValueError, match="n_layer must be a positive int, got 0"):
        XLSTMConfig(n_layer=0)
    with pytest.raises(ValueError, match=r"slstm_at must hold layer indices in \[0, 6\), got 6"):
        XLSTMConfig(slstm_at=(6,))
    with pytest.raises(ValueError, match="qk_dim must be a positive int or None, got -1"):
        XLSTMConfig(qk_dim=-1)
    with pytest.raises(ValueError, match="impl must be one of"):
        XLSTMLM(_config(), impl="cuda")
    with pytest.raises(ValueError, match=r"token ids must be an integer tensor \(batch, L\), got \(2, 3, 4\)"):
        XLSTMLM(_config())(torch.zeros(2, 3, 4, dtype=torch.long))


def test_state_dict_is_shared_by_the_twins_and_the_head_is_tied():
    model = XLSTMLM(_config())
    sd = model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in XLSTMLM(_config(), "torch").state_dict()
                                                   .items()}
    for name in ("embedding.weight", "blocks.0.norm_mlstm", "blocks.2.mlstm_layer.q.weight",
                 "blocks.2.mlstm_layer.igate_preact.bias", "blocks.1.mlstm_layer.gates.bias",
                 "blocks.0.mlstm_layer.multihead_norm",
                 "blocks.1.ffn.proj_down.weight", "out_norm"):
        assert name in sd, name
    assert sd["blocks.1.mlstm_layer.R"].shape == (4, 3, 8, 8) and "blocks.1.mlstm_layer.q.weight" not in sd
    assert sd["blocks.0.mlstm_layer.q.weight"].shape == (15, 24)
    assert sd["blocks.0.mlstm_layer.v.weight"].shape == (21, 24)
    assert not any(k.split(".")[0] in ("head", "lm_head") for k in sd)


@pytest.mark.parametrize("length", [1, 7, 70])
def test_twins_agree_in_logits_and_every_gradient(length):
    """length 70: two chunks of the kernels' chunkwise form against the twin's step-by-step recurrence."""
    twin = _random_model("torch")
    model = XLSTMLM(twin.config, impl="tritium")
    model.load_state_dict(twin.state_dict())
    ids = torch.randint(0, twin.config.vocab_size, (2, length + 1))
    got, got_g = _loss_and_grads(model, ids)
    want, want_g = _loss_and_grads(twin, ids)
    ref, ref_g = _loss_and_grads(copy.deepcopy(twin).double(), ids)
    # embedding, out_norm; per mLSTM layer: 2 norms, q, k, v, ogate, igate (2), fgate (2), multihead_norm, out_proj,
    # 3 ffn; the sLSTM layer: 2 norms, gates (2), R, multihead_norm, out_proj, 3 ffn
    assert set(got_g) == set(want_g) and len(got_g) == 2 + 2 * 15 + 10
    assert_within_torch_error(got, want, ref, "logits")
    _close(got, want, "logits vs twin")
    # the gradients against the float64 twin only: h = C q / max(|n . q|, e^-m) is scale-free in q where |n . q|
    # wins, so q's and k's gradients are small differences that the float32 twin itself gets a few percent wrong
    for name in got_g:
        assert got_g[name] is not None and want_g[name] is not None, name
        assert_within_torch_error(got_g[name], want_g[name], ref_g[name], f"grad {name}")


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
    assert state.C.shape == (c.n_layer, 3, c.n_head, c.qk_dim, c.v_dim) and state.C.dtype == torch.float32
    assert state.n.shape == (c.n_layer, 3, c.n_head, c.qk_dim) and state.m.shape == (c.n_layer, 3, c.n_head)
    assert state.s.shape == (1, 4, 3, c.d_model)
    size = state.nbytes
    ptrs = (state.C.data_ptr(), state.n.data_ptr(), state.m.data_ptr(), state.s.data_ptr())
    for t in range(prompt_len, ids.shape[1]):
        step = model.step(ids[:, t], state)
        assert step.shape == (3, c.vocab_size)
        _close(step, full[:, t], f"step logits at position {t}")
        assert state.nbytes == size
        assert (state.C.data_ptr(), state.n.data_ptr(), state.m.data_ptr(), state.s.data_ptr()) == ptrs


def test_step_twins_agree():
    twin = _random_model("torch").eval()
    model = XLSTMLM(twin.config)
    model.load_state_dict(twin.state_dict())
    ids = torch.randint(0, twin.config.vocab_size, (2, 6))
    (a, sa), (b, sb) = model.prefill(ids[:, :3]), twin.prefill(ids[:, :3])
    for t in range(3, 6):
        a, b = model.step(ids[:, t], sa), twin.step(ids[:, t], sb)
        _close(a, b, f"step {t}")
    _close(sa.C, sb.C, "C state")
    _close(sa.s[:, :3], sb.s[:, :3], "sLSTM state")


def test_generate_is_greedy_over_the_full_forward():
    model = _random_model("tritium").eval()
    check_greedy_generate(model)
    with pytest.raises(ValueError, match="3 tokens for a state of batch 2"):
        model.step(torch.zeros(3, dtype=torch.long), model.new_state(2))


def test_torch_compile_fullgraph_forward_equals_eager():
    model = _random_model("tritium")
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(ids)
    _close(got, model(ids), "compiled logits", 1e-5)


def test_the_tritium_model_runs_the_kernels(monkeypatch):
    """impl="tritium" reaches tritium's mlstm and slstm kernels (forward, backward, the decoding step), not the
    recurrences their fallbacks for uncovered inputs would run."""
    import sys

    mlstm, slstm = sys.modules["tritium.ops.mlstm"], sys.modules["tritium.ops.slstm"]  # (the names are functions)

    def refuse(*args, **kwargs):
        raise AssertionError("the tritium model fell back to a reference recurrence")

    monkeypatch.setattr(mlstm, "mlstm_reference", refuse)
    monkeypatch.setattr(slstm, "slstm_reference", refuse)
    model = _random_model("tritium")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    _loss_and_grads(model, ids)
    _, state = model.prefill(ids[:, :4])
    model.step(ids[:, 4], state)
