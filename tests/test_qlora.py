"""QLoRA: LoRA adapters on an NF4 base (LoRALinear.quantize_base, tritium.lora.apply(quantize="nf4")). The output
and the gradients of x, A and B against a float64 reference on the dequantised base (float32 and bfloat16, bias,
dropout), training only the adapters, torch.compile, the errors, and PEFT's LoRA on bitsandbytes' Linear4bit (the
same NF4 bytes) giving the same logits and adapter gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium.nn import LoRALinear
from tritium.ops.nf4 import dequantize_nf4_reference
from tests.util import assert_lora_layer_grads, assert_matches_peft_layer, need


def _layer(k, n, r, dtype, bias=True, dropout=0.0, dq=False, seed=0):
    torch.manual_seed(seed)
    m = LoRALinear(k, n, r=r, lora_alpha=2 * r, lora_dropout=dropout, bias=bias, dtype=dtype)
    torch.nn.init.normal_(m.lora_B, std=0.1)   # a nonzero adapter (a new one starts at B = 0)
    return m.quantize_base(double_quant=dq)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("m,bias,dropout,dq", [(5, True, 0.0, False), (40, False, 0.0, True), (70, True, 0.25, False)],
                         ids=["decode-bias", "gemm-double", "dropout"])
def test_gradients(dtype, m, bias, dropout, dq):
    """y, dx, dA, dB within 2x torch's own error (the same computation in dtype on the dequantised base) of the
    float64 reference; with dropout the mask is the seeded one the layer draws (reference.lora_dropout_mask)."""
    k, n, r = 192, 37, 5
    layer = _layer(k, n, r, dtype, bias, dropout, dq)
    w64 = dequantize_nf4_reference(layer.nf4_weight())
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    assert_lora_layer_grads(layer, w64, x, dy, dropout, f"{m} rows {dtype}")


def test_apply_and_train():
    """apply(quantize="nf4") adapts the chosen layers on NF4 bases, freezes the rest; a few AdamW steps on the
    adapters lower the loss; the base bytes do not change."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.GELU(), torch.nn.Linear(192, 64))
    x, target = torch.randn(64, 128), torch.randn(64, 64)
    tritium.lora.apply(model, r=8, alpha=16, dropout=0.0, quantize="nf4", double_quant=True)
    layers = tritium.lora.lora_modules(model)
    assert sorted(layers) == ["0", "2"] and all(m.weight is None and m.nf4_meta for m in layers.values())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    before = layers["0"].weight_nf4.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(layers["0"].weight_nf4, before)
    assert "base=nf4" in repr(layers["0"])


def test_compile_fullgraph():
    layer = _layer(128, 37, 4, torch.float32, dq=True)
    x = torch.randn(6, 128)

    def step(x):
        return layer(x).square().sum()

    g1 = torch.autograd.grad(step(x), (layer.lora_A, layer.lora_B))
    g2 = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), (layer.lora_A, layer.lora_B))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


def test_errors():
    model = torch.nn.Sequential(torch.nn.Linear(100, 64))
    with pytest.raises(ValueError, match="quantize must be None, 'nf4', 'int8' or 'int4', got 'fp8'"):
        tritium.lora.apply(model, r=4, quantize="fp8")
    with pytest.raises(ValueError, match=r"in_features a multiple of blocksize 64; these layers are not: 0 \(100\)"):
        tritium.lora.apply(model, r=4, quantize="nf4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        tritium.lora.apply(torch.nn.Sequential(torch.nn.Linear(128, 8)), r=4, quantize="nf4", blocksize=48)
    assert isinstance(model[0], torch.nn.Linear) and not isinstance(model[0], LoRALinear)  # left as it was
    layer = _layer(128, 8, 2, torch.float32)
    with pytest.raises(NotImplementedError, match="the base weight is NF4"):
        layer.merge()
    with pytest.raises(ValueError, match=r"lora_A must be \(r, in_features\)"):
        tritium.lora_linear(torch.randn(2, 128), layer.nf4_weight(), None, torch.randn(2, 64), layer.lora_B, 1.0)


def test_matches_peft_on_bitsandbytes():
    """PEFT 0.21's LoRA on bitsandbytes' Linear4bit (NF4, blocksize 64, its own quantisation of the same float
    weight) and tritium's QLoRA layer on tritium's quantisation: the same bytes, the same logits and adapter
    gradients (float32)."""
    bnb = need("bitsandbytes")
    peft = need("peft")
    torch.manual_seed(0)
    k, n, r = 192, 70, 8
    lin = torch.nn.Linear(k, n)
    l4 = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                  compress_statistics=False)
    l4.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    l4 = l4.to("cpu")
    pm = peft.get_peft_model(torch.nn.Sequential(l4), peft.LoraConfig(r=r, lora_alpha=16, target_modules=["0"],
                                                                       lora_dropout=0.0))
    plora = pm.base_model.model[0]
    torch.nn.init.normal_(plora.lora_B["default"].weight, std=0.1)
    ours = torch.nn.Sequential(torch.nn.Linear(k, n))
    ours[0].load_state_dict(lin.state_dict())
    tritium.lora.apply(ours, r=r, alpha=16, dropout=0.0, quantize="nf4")
    layer = ours[0]
    assert torch.equal(layer.weight_nf4, l4.weight.data)
    assert torch.equal(layer.weight_absmax, l4.weight.quant_state.absmax)
    assert_matches_peft_layer(ours, layer, pm, plora, k, n)
