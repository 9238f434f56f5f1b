"""LoRA adapters on an int8/int4 base (tritium.ops.quant.QuantizedWeight: LoRALinear.quantize_base("int8" |
"int4"), tritium.lora.apply(quantize=...)), the twin of tests/test_qlora.py for NF4. The output and the gradients
of x, A and B against a float64 reference on the same quantized weights dequantised exactly (float32 and bfloat16,
bias, dropout, per-channel int8, int8 and int4 per group of 32/64/128, 1, 7 and 129 rows); training only the
adapters; the state_dict; merge and dequantize_base; torch.compile; the errors; PEFT's LoRA on the dequantised base
giving the same logits and adapter gradients (a layer, a tiny transformers Llama); apply(quantize="int4") on a tiny
tritium Llama training, its adapter loading in PEFT and serving after dequantize_bases + merge; tritium finetune's
--base options."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tritium
from tritium import finetune as ft
from tritium.models import LlamaConfig, build
from tritium.nn import LoRALinear
from tests.util import assert_lora_layer_grads, assert_matches_peft_layer, need

# (mode, group_size, in_features): per-channel int8 at an odd width, and each group size the formats take
FORMATS = [("int8", None, 45), ("int8", 64, 192), ("int4", 32, 96), ("int4", 64, 192), ("int4", 128, 384)]
FORMAT_IDS = [f"{m}-{g or 'channel'}-k{k}" for m, g, k in FORMATS]


def _layer(k, n, r, dtype, mode, group, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = LoRALinear(k, n, r=r, lora_alpha=2 * r, lora_dropout=dropout, bias=bias, dtype=dtype)
    torch.nn.init.normal_(m.lora_B, std=0.1)   # a nonzero adapter (a new one starts at B = 0)
    return m.quantize_base(mode, group_size=group)


def _dequantized64(layer) -> torch.Tensor:
    """The base weight from its logical integers and scales by docs/quantization.md's formula (not the dequantize
    op): W = scales * q + mins, or scales * (q - 2**(bits - 1)) without mins, the weight the format stands for
    with its one rounding to float32 (the formula is exact in float64, float32 scales times 8-bit integers are
    not in float32), returned in float64."""
    qw = layer.frozen_base()
    q, scales, mins = qw.logical()
    idx = torch.arange(qw.k) // qw.group
    s = scales.double()[:, idx]
    if mins is None:
        w = s * (q.double() - 2 ** (qw.bits - 1))
    else:
        w = s * q.double() + mins.double()[:, idx]
    return w.float().double()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("rows,bias,dropout", [(1, True, 0.0), (7, False, 0.0), (129, True, 0.0), (40, True, 0.25),
                                               (391, True, 0.0)],
                         ids=["1-bias", "7-nobias", "129-bias", "40-dropout", "391-bias"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_gradients(fmt, rows, bias, dropout, dtype):
    """y, dx, dA, dB within 2x torch's own error (the same computation in dtype on the dequantised base) of the
    float64 reference; with dropout the mask is the seeded one the layer draws (reference.lora_dropout_mask). The
    row counts lie on both sides of every gemm_rows (32; 384 for bfloat16 on 4-bit tiles): the quantized product
    below, the fused ops on the dequantised weight from there (test_dequantised_route)."""
    mode, group, k = fmt
    n, r = 37, 5
    layer = _layer(k, n, r, dtype, mode, group, bias, dropout)
    w64 = _dequantized64(layer)
    torch.testing.assert_close(layer.frozen_base().dequantize(torch.float32).double(), w64, rtol=0, atol=0)
    x = torch.randn(rows, k, dtype=torch.float64).to(dtype)
    dy = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    assert_lora_layer_grads(layer, w64, x, dy, dropout, f"{mode}/{group} {rows} rows {dtype}")


class _Ops(TorchDispatchMode):
    """The names of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("int8", "int4", "nf4"))
def test_dequantised_route(mode, dtype):
    """A layer on a quantized base runs the base's quantized product below the weight's gemm_rows and the fused ops
    on the weight dequantised per call (forward and backward) from there. Both paths' values and gradients are held
    to the float64 reference by test_gradients (and test_qlora.py's); here only which ops run."""
    k, n, r = 128, 37, 4
    if mode == "nf4":
        torch.manual_seed(0)
        layer = LoRALinear(k, n, r=r, lora_alpha=2 * r, dtype=dtype).quantize_base("nf4")
    else:
        layer = _layer(k, n, r, dtype, mode, 64 if mode == "int4" else None)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    edge = layer.frozen_base().gemm_rows(dtype)
    for rows, fused in ((edge - 1, False), (edge, True)):
        x = torch.randn(rows, k, dtype=dtype, requires_grad=True)
        with _Ops() as ops:
            y = layer(x)
            y.backward(torch.randn_like(y))
        assert ("tritium::lora_dequant_fwd" in ops.seen) == fused, (rows, sorted(ops.seen))
        assert ("tritium::lora_dequant_bwd" in ops.seen) == fused, (rows, sorted(ops.seen))
        base = "tritium::nf4_linear_fwd" if mode == "nf4" else "tritium::quant_linear"
        assert (base in ops.seen) != fused, (rows, sorted(ops.seen))


def test_dropout_draws_the_seeded_mask():
    """Dropout on the adapter's input only: with the seed reset, two training calls agree; the output differs from
    the eval (no dropout) output by the adapter term of the dropped inputs alone."""
    layer = _layer(96, 37, 4, torch.float32, "int4", 32, dropout=0.5)
    x = torch.randn(9, 96)
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    y2 = layer(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.manual_seed(3)
    mask = tritium.reference.lora_dropout_mask(x, 0.5)
    assert 0 < mask.sum() < mask.numel()
    layer.eval()
    y_eval = layer(x)
    adapter = layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)
    dropped = layer.scaling * 2 * F.linear(F.linear(x * mask, layer.lora_A), layer.lora_B)
    torch.testing.assert_close(y1 - y_eval, dropped - adapter, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 64)])
def test_apply_and_train(mode, group):
    """apply(quantize=mode) adapts the chosen layers on quantized bases, freezes the rest; a few AdamW steps on the
    adapters lower the loss; the quantized bytes do not change."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.GELU(), torch.nn.Linear(192, 64))
    x, target = torch.randn(64, 128), torch.randn(64, 64)
    tritium.lora.apply(model, r=8, alpha=16, dropout=0.0, quantize=mode, group_size=group)
    layers = tritium.lora.lora_modules(model)
    assert sorted(layers) == ["0", "2"] and all(m.weight is None and m.base_kind == mode for m in layers.values())
    assert layers["0"].frozen_base().group == (group or 128)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    before = {k: v.clone() for k, v in model.state_dict().items() if "weight_quant" in k and torch.is_tensor(v)}
    assert len(before) == 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert f"base={mode}" in repr(layers["0"])


def test_state_dict_round_trip():
    """A layer's state_dict (the packed bytes and their format, the adapters, the bias) loads into a fresh layer
    quantized the same way (as an NF4 base's does) and into one quantized in another format (QuantizedLinear's
    loader takes the saved format): the same output, the same bytes."""
    layer = _layer(192, 37, 4, torch.float32, "int4", 64)
    x = torch.randn(5, 192)
    sd = layer.state_dict()
    assert {"weight_quant.qdata", "weight_quant.scales", "weight_quant.mins", "lora_A", "lora_B", "bias"} <= set(sd)
    for mode, group in (("int4", 64), ("int8", None)):
        fresh = _layer(192, 37, 4, torch.float32, mode, group, seed=1)
        fresh.load_state_dict(sd)
        assert fresh.base_kind == "int4" and fresh.frozen_base().group == 64
        assert torch.equal(fresh.frozen_base().qdata, layer.frozen_base().qdata)
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_merge_raises_and_dequantize_base_serves(mode, group):
    """merge() on a quantized base raises as on an NF4 one; dequantize_base() gives the float weight of the
    dequantised values, which then merges: the merged layer's output is the unmerged one's."""
    layer = _layer(96, 37, 4, torch.float32, mode, group)
    with pytest.raises(NotImplementedError, match=f"the base weight is {mode} .quantize_base.; merging would "
                                                  "requantize it"):
        layer.merge()
    layer.eval()
    x = torch.randn(6, 96)
    with torch.no_grad():
        y = layer(x)
        w = layer.frozen_base().dequantize(torch.float32)
        layer.dequantize_base()
        assert layer.base_kind is None and layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
        assert torch.equal(layer.weight, w) and "weight_quant" not in dict(layer.named_modules())
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    bf = _layer(96, 37, 4, torch.bfloat16, mode, group).dequantize_base()
    assert bf.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("rows", (6, 40), ids=["quantized", "dequantised"])
def test_compile_fullgraph(rows):
    """Below and from gemm_rows (32 here): the quantized product and the dequantised route both trace whole."""
    layer = _layer(192, 37, 4, torch.float32, "int4", 64)
    x = torch.randn(rows, 192, requires_grad=True)

    def step(x):
        return layer(x).square().sum()

    g1 = torch.autograd.grad(step(x), (x, layer.lora_A, layer.lora_B))
    g2 = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), (x, layer.lora_A, layer.lora_B))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


def test_errors():
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    with pytest.raises(ValueError, match="quantize must be None, 'nf4', 'int8' or 'int4', got 'int2'"):
        tritium.lora.apply(model, r=4, quantize="int2")
    with pytest.raises(ValueError, match=r"quantize='int4' needs in_features a multiple of group_size 64; these "
                                         r"layers are not: 0 \(96\)"):
        tritium.lora.apply(model, r=4, quantize="int4", group_size=64)
    with pytest.raises(ValueError, match=r"quantize='int8' needs in_features a multiple of group_size 128; these "
                                         r"layers are not: 0 \(96\), 2 \(64\)"):
        tritium.lora.apply(model, r=4, quantize="int8", group_size=128)
    with pytest.raises(ValueError, match="apply: group_size must be a positive multiple of 32 .or None., got 48"):
        tritium.lora.apply(model, r=4, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="apply: r must be a positive integer, got 0"):
        tritium.lora.apply(model, r=0, quantize="int4")
    assert isinstance(model[0], torch.nn.Linear) and not isinstance(model[0], LoRALinear)  # left as it was
    odd = torch.nn.Sequential(torch.nn.Linear(45, 8))
    with pytest.raises(ValueError, match=r"needs in_features a multiple of group_size 32; these layers are not: "
                                         r"0 \(45\)"):
        tritium.lora.apply(odd, r=4, quantize="int4")
    tritium.lora.apply(odd, r=4, quantize="int8")   # per channel: any in_features
    assert odd[0].base_kind == "int8"
    fresh = LoRALinear(96, 8, r=2)
    with pytest.raises(ValueError, match="LoRALinear.quantize_base: group_size 64 does not divide in_features 96"):
        fresh.quantize_base("int4", group_size=64)
    with pytest.raises(ValueError, match="LoRALinear.quantize_base: quantize must be one of"):
        fresh.quantize_base("fp8")
    assert fresh.base_kind is None and fresh.weight is not None
    fresh.quantize_base("int4")
    with pytest.raises(ValueError, match="already int4; dequantize_base.. first"):
        fresh.quantize_base("int8")
    layer = _layer(96, 37, 2, torch.float32, "int4", 32)
    qw = layer.frozen_base()
    f = tritium.lora_linear
    with pytest.raises(ValueError, match=r"lora_A must be \(r, in_features\) = \(r >= 1, 96\), got shape \(2, 64\)"):
        f(torch.randn(2, 96), qw, None, torch.randn(2, 64), layer.lora_B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \(out_features, r\) = \(37, 2\), got shape \(36, 2\)"):
        f(torch.randn(2, 96), qw, None, layer.lora_A, layer.lora_B[1:], 1.0)
    with pytest.raises(ValueError, match=r"quantized_linear: x must be \(\*, in_features\) = \(\*, 96\), got shape"):
        f(torch.randn(2, 95), qw, None, layer.lora_A, layer.lora_B, 1.0)
    with pytest.raises(TypeError, match="quantized_linear: bias must have x's dtype torch.bfloat16"):
        f(torch.randn(2, 96, dtype=torch.bfloat16), qw, layer.bias, layer.lora_A.bfloat16(),
          layer.lora_B.bfloat16(), 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        f(torch.randn(2, 96), qw, None, layer.lora_A, layer.lora_B, 1.0, dropout_p=1.0)


def test_reference_paths_agree():
    """float64 x multiplies the dequantised weight with torch (the path an empty x and TRITIUM_BACKEND=reference
    take): the kernel's float32 result within float32 rounding of it; an empty x gives an empty output."""
    layer = _layer(96, 37, 4, torch.float32, "int4", 32)
    x = torch.randn(5, 96)
    y64 = tritium.lora_linear(x.double(), layer.frozen_base(), layer.bias.double(), layer.lora_A.double(),
                              layer.lora_B.double(), layer.scaling)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(layer(x).double(), y64, rtol=1e-5, atol=1e-5)
    assert tritium.lora_linear(torch.randn(0, 96), layer.frozen_base(), layer.bias, layer.lora_A, layer.lora_B,
                               1.0).shape == (0, 37)


# ---- PEFT on the dequantised base ----
def test_matches_peft_on_dequantised_base():
    """PEFT 0.21's LoRA on a torch Linear holding the dequantised weight and tritium's layer on the int4 base: the
    same logits and adapter gradients (float32)."""
    peft = need("peft")
    torch.manual_seed(0)
    k, n, r = 192, 70, 8
    lin = torch.nn.Linear(k, n)
    ours = torch.nn.Sequential(copy.deepcopy(lin))
    tritium.lora.apply(ours, r=r, alpha=16, dropout=0.0, quantize="int4", group_size=64)
    layer = ours[0]
    with torch.no_grad():
        lin.weight.copy_(layer.frozen_base().dequantize(torch.float32))
    pm = peft.get_peft_model(torch.nn.Sequential(lin), peft.LoraConfig(r=r, lora_alpha=16, target_modules=["0"],
                                                                       lora_dropout=0.0))
    plora = pm.base_model.model[0]
    torch.nn.init.normal_(plora.lora_B["default"].weight, std=0.1)
    assert_matches_peft_layer(ours, layer, pm, plora, k, n)


def test_transformers_llama_int8_matches_peft():
    """A tiny transformers Llama (hidden 60, intermediate 94: per-channel int8 takes any width) with
    apply(quantize="int8") and PEFT's LoRA on the same model with every adapted weight replaced by its dequantised
    values, the same adapters: the same logits and adapter gradients (float32)."""
    need("peft")
    from tests.test_lora import TARGETS, copy_adapters, ids, logits_and_grads, peft_model, tiny_llama

    base = tiny_llama()
    ours = tritium.lora.apply(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, targets=TARGETS, quantize="int8")
    with torch.no_grad():
        for name, m in tritium.lora.lora_modules(ours).items():
            base.get_submodule(name).weight.copy_(m.frozen_base().dequantize(torch.float32))
    pm = peft_model(base)
    copy_adapters(pm, ours)
    names = sorted(tritium.lora.lora_modules(ours))
    lp, gp = logits_and_grads(pm.base_model.model, ids(), names)
    lo, go = logits_and_grads(ours, ids(), names)
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-5)
    for name in names:
        for a, b in zip(go[name], gp[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


# ---- tritium's Llama (fused projections) ----
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, vocab_size=97,
                  max_seq_len=64, tie_embeddings=True)


def test_tiny_llama_int4_trains_loads_in_peft_and_serves(tmp_path):
    """apply(quantize="int4") on a tiny tritium Llama: a few AdamW steps lower the loss with the base bytes
    unchanged; the saved adapter loads in PEFT on the eager twin whose adapted weights are the dequantised ones,
    with the same logits; dequantize_bases + merge then serves it (the serving path refuses the quantized base)."""
    peft = need("peft")
    from tritium.models.eager import EagerLlama

    model = build(CFG, torch.float32).init_random(generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    tritium.lora.apply(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                       quantize="int4", group_size=32)
    quantized = [lin for lin, _, _ in model.hf_projections() if lin.qbase is not None]
    assert len(quantized) == 6 and all(lin.qbase.bits == 4 and lin.weight is None for lin in quantized)
    stored = [lin.qbase.qdata.clone() for lin in quantized]
    ids = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(lin.qbase.qdata, q) for lin, q in zip(quantized, stored))
    for (lin, _, _), (rlin, _, _) in zip(model.hf_projections(), ref.hf_projections()):
        if lin.qbase is not None:
            with torch.no_grad():
                rlin.weight.copy_(lin.qbase.dequantize(torch.float32))
    tritium.lora.save(model, str(tmp_path))
    twin = EagerLlama(CFG).load_weights(ref.hf_state_dict())
    pm = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    model.eval()
    with torch.no_grad():
        lo = model(ids)
        lp = pm(ids)
        lp = lp.logits if hasattr(lp, "logits") else lp
        torch.testing.assert_close(lo, lp, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match=r"does not take a quantized \(int8/int4\) base"):
            model.layers[0].attention.wqkv.serve(torch.randn(3, CFG.dim))
        with pytest.raises(ValueError, match="merge_lora: the base is quantized"):
            tritium.lora.merge(model)
        ft.dequantize_bases(model)
        tritium.lora.merge(model)
        torch.testing.assert_close(model(ids), lo, rtol=1e-4, atol=1e-4)
        model.layers[0].attention.wqkv.serve(torch.randn(3, CFG.dim))


def test_finetune_config_base_trains():
    """FinetuneConfig(base="int4"): tritium.finetune trains adapters on int4 bases of a tiny byte-level model (the
    loss falls, nothing but the adapters changes)."""
    from tests.test_finetune import ByteTok

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=257,
                      max_seq_len=256, tie_embeddings=True)
    model = build(cfg, torch.float32).init_random(generator=torch.Generator().manual_seed(0))
    losses = ft.finetune(model, ByteTok(), ft.dates_task(64, 0), ft.FinetuneConfig(r=8, epochs=6, lr=1e-2,
                                                                                   batch_size=16, dropout=0.0,
                                                                                   base="int4"))
    assert len(losses) == 24 and losses[-1] < 0.9 * losses[0]
    assert all(lin.qbase is not None and lin.qbase.bits == 4 for lin, _, _ in model.hf_projections())
    with pytest.raises(ValueError, match="qlora=True means base='nf4', got base='int8'"):
        ft.FinetuneConfig(qlora=True, base="int8").quantize()


def test_finetune_command_base_errors(tmp_path):
    """tritium finetune's --base / --group-size usage errors, before anything loads."""
    from tritium.cli import finetune
    from tritium.cli.errors import UsageError

    out = str(tmp_path / "adapter")
    for argv, match in [(["--qlora", "--base", "int4"], "--qlora means --base nf4; it conflicts with --base int4"),
                        (["--group-size", "64"], "--group-size sets the groups of --base int8 or int4, got --base "
                                                 "float"),
                        (["--base", "int4", "--group-size", "48"], "--group-size must be a multiple of 32, got 48"),
                        (["--shard", "fsdp", "--base", "int8"], "--shard fsdp shards the frozen weights as "
                                                                "parameters; --base int8 holds them quantized")]:
        with pytest.raises(UsageError, match=match):
            finetune.main([*argv, "--out", out])
