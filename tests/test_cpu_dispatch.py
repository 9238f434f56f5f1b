"""Run-time CPU dispatch (csrc/cpu.h): what tritium detects matches what the CPU reports, TRITIUM_CPU_DISABLE hides a
feature so the path of a lesser CPU runs (and a machine without AMX never selects it), `tritium info` names each
family's path, and the bfloat16 attention, info_nce and LoRA backward are right on every path this machine can take."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tritium
from tritium.utils import cpu_features, cpu_paths
from tests.util import assert_within_torch_error


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()


FLAGS = _cpuinfo_flags()
HAS_AMX = {"amx_tile", "amx_bf16"} <= FLAGS
HAS_BF16_DOT = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= FLAGS
needs_x86 = pytest.mark.skipif(not FLAGS, reason="reads the x86 flags of /proc/cpuinfo (not on this machine)")


def _in_subprocess(code: str, disable: str = "") -> dict:
    """Runs code (which prints one JSON value) in a fresh interpreter with TRITIUM_CPU_DISABLE=disable: the features
    are read once per process."""
    env = dict(os.environ, TRITIUM_CPU_DISABLE=disable)
    out = subprocess.run([sys.executable, "-c", "import json, torch, tritium\n" + code], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_x86
def test_features_match_cpuinfo():
    feats = set(cpu_features())
    assert ("avx2" in feats) == ({"avx2", "fma", "f16c"} <= FLAGS)
    assert ("avx512" in feats) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS)
    assert ("avx512_vnni" in feats) == ("avx512" in feats and "avx512_vnni" in FLAGS)
    assert ("avx512_bf16" in feats) == HAS_BF16_DOT
    # AMX also needs the kernel's permission for the tile data, which Linux grants on CPUs that have it
    assert ("amx_bf16" in feats) == HAS_AMX


def test_paths_name_every_family():
    paths = cpu_paths()
    for case in ("attention.float32", "attention.bfloat16", "attention.float16", "quant_linear",
                 "norms.bfloat16_output", "activations.bfloat16_output", "softmax.bfloat16_output",
                 "max_pool2d.short_rows"):
        assert paths.get(case), f"{case} missing from {paths}"
    for case in ("norms.bfloat16_output", "activations.bfloat16_output", "softmax.bfloat16_output"):
        assert ("AVX512-BF16" in paths[case]) == HAS_BF16_DOT
    assert ("AVX-512" in paths["max_pool2d.short_rows"]) == (tritium._kernels.WIDTH == "avx512")
    assert paths["attention.float32"] == "panels"
    bf16 = paths["attention.bfloat16"]
    if HAS_AMX:
        assert bf16 == "brgemm (oneDNN, AMX)"
    elif HAS_BF16_DOT:
        assert bf16 == "bf16 pair panels (AVX512-BF16)"
    else:
        assert "AMX" not in bf16 and "AVX512-BF16" not in bf16


@needs_x86
def test_disabled_features_are_never_selected():
    """A machine without AMX (simulated by hiding it) never takes the AMX path; without any feature the quantized
    products say they cannot run instead of running a kernel the CPU lacks."""
    code = "from tritium.utils import cpu_features, cpu_paths\nprint(json.dumps([cpu_features(), cpu_paths()]))"
    feats, paths = _in_subprocess(code, "amx_bf16,amx_int8")
    assert "amx_bf16" not in feats and "amx_int8" not in feats
    assert "AMX" not in paths["attention.bfloat16"]
    if HAS_BF16_DOT:
        assert paths["attention.bfloat16"] == "bf16 pair panels (AVX512-BF16)"
    feats, paths = _in_subprocess(code, "avx512")
    assert not {"avx512", "avx512_vnni", "avx512_bf16", "avx512_fp16"} & set(feats)
    assert paths["quant_linear"] == ("avx2" if "avx2" in feats else "none")
    assert "AVX512-BF16" not in paths["attention.bfloat16"]
    assert "AVX512-BF16" not in paths["norms.bfloat16_output"] and "AVX-512" not in paths["max_pool2d.short_rows"]
    assert "AVX512-BF16" not in paths["activations.bfloat16_output"]
    assert "AVX512-BF16" not in paths["softmax.bfloat16_output"]
    feats, paths = _in_subprocess(code, "all")
    assert feats == [] and paths["quant_linear"] == "none"


@needs_x86
def test_widest_kernel_build_is_imported():
    """setup.py builds the kernels for AVX-512 and for AVX2 whatever the build machine has; the widest one this CPU
    executes is imported, and hiding AVX-512 imports the AVX2 one, whose features then hold no AVX-512 or AMX."""
    import importlib.util
    if not os.environ.get("TRITIUM_CPU_CAPABILITY"):  # (a developer's single-width build)
        for width in ("avx512", "avx2"):
            assert importlib.util.find_spec(f"tritium._C_{width}") is not None, f"tritium._C_{width} not built"
    has_avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS
    assert tritium._kernels.WIDTH == ("avx512" if has_avx512 else "avx2")
    code = "print(json.dumps([tritium._kernels.WIDTH, tritium.utils.cpu_features()]))"
    width, feats = _in_subprocess(code, "avx512")
    assert width == "avx2" and not {"avx512", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"} & set(feats)
    # the AVX2 build computes what the widest one does (a quantized product and an attention, bit for bit where
    # the order of the sums is the same: the float32 attention panels are exact to torch's error either way)
    code = ("torch.manual_seed(0)\n"
            "x = torch.randn(5, 96)\n"
            "layer = tritium.nn.QuantizedLinear.from_linear(torch.nn.Linear(96, 40), 'int4', group_size=32)\n"
            "print(json.dumps([tritium._kernels.WIDTH, layer(x).tolist()]))")
    w1, y1 = _in_subprocess(code, "")
    w2, y2 = _in_subprocess(code, "avx512")
    assert w2 == "avx2"
    torch.testing.assert_close(torch.tensor(y1), torch.tensor(y2), rtol=1e-5, atol=1e-5)


def test_unknown_disabled_feature_is_an_error():
    """A misspelt TRITIUM_CPU_DISABLE is an error naming the variable and the names it takes, not silently ignored."""
    env = dict(os.environ, TRITIUM_CPU_DISABLE="amx")
    r = subprocess.run([sys.executable, "-c", "import tritium.utils as u; u.cpu_features()"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "TRITIUM_CPU_DISABLE: unknown feature 'amx'" in r.stderr and "amx_bf16" in r.stderr


_ATTENTION = """
torch.manual_seed(0)
B, H, L, D = 2, 3, 77, 64
q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
out = tritium.scaled_dot_product_attention(q, k, v, is_causal=True)
out.backward(torch.randn(B, H, L, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1)))
from tritium.utils import cpu_paths
print(json.dumps({"path": cpu_paths()["attention.bfloat16"],
                  "out": out.float().tolist(), "grads": [t.grad.float().tolist() for t in (q, k, v)]}))
"""


@pytest.mark.parametrize("disable", ["", "amx_bf16", "amx_bf16,avx512_bf16"])
def test_bfloat16_attention_on_each_path(disable):
    """The bfloat16 attention forward and every gradient on the path this machine takes with `disable` hidden
    (AMX brgemm, the AVX512-BF16 pair panels, oneDNN's brgemm without either), against float64, within 2x torch's
    own bfloat16 error."""
    got = _in_subprocess(_ATTENTION, disable)
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 77, 64
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn(B, H, L, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))

    def run(dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*ins, is_causal=True)
        o.backward(dout.to(dtype))
        return o.detach(), [t.grad for t in ins]

    ref, ref_grads = run(torch.float64)
    theirs, their_grads = run(torch.bfloat16)
    ours = torch.tensor(got["out"]).to(torch.bfloat16)
    assert_within_torch_error(ours, theirs, ref, f"out on {got['path']}")
    for name, g, tg, rg in zip("qkv", got["grads"], their_grads, ref_grads):
        assert_within_torch_error(torch.tensor(g).to(torch.bfloat16), tg, rg, f"d{name} on {got['path']}")


_INFO_NCE = """
torch.manual_seed(0)
q, k, n = (torch.randn(r, 24, dtype=torch.bfloat16, requires_grad=True) for r in (70, 70, 23))
loss = tritium.info_nce(q, k, 0.07, negatives=n, block_size=16)
loss.backward()
from tritium.utils import cpu_paths
print(json.dumps({"path": cpu_paths()["info_nce.bfloat16"], "loss": loss.float().item(),
                  "grads": [t.grad.float().tolist() for t in (q, k, n)]}))
"""


@pytest.mark.parametrize("disable", ["", "amx_bf16", "amx_bf16,avx512_bf16"])
def test_bfloat16_info_nce_on_each_path(disable):
    """The bfloat16 info_nce (blocks of 16 rows over 70, explicit negatives) and every gradient on the path this
    machine takes with `disable` hidden (AMX: bfloat16 products into float32; AVX512-BF16: oneDNN bfloat16 matmuls;
    neither: float32 products), against float64, within 2x torch's own bfloat16 error."""
    from tritium import reference
    got = _in_subprocess(_INFO_NCE, disable)
    torch.manual_seed(0)
    ins16 = [torch.randn(r, 24, dtype=torch.bfloat16) for r in (70, 70, 23)]

    def run(dtype):
        ins = [t.to(dtype).requires_grad_() for t in ins16]
        loss = reference.info_nce(ins[0], ins[1], 0.07, negatives=ins[2])
        loss.backward()
        return loss.detach(), [t.grad for t in ins]

    ref, ref_grads = run(torch.float64)
    theirs, their_grads = run(torch.bfloat16)
    assert_within_torch_error(torch.tensor(got["loss"]).to(torch.bfloat16), theirs, ref, f"loss on {got['path']}")
    for name, g, tg, rg in zip(("dq", "dk", "dn"), got["grads"], their_grads, ref_grads):
        assert_within_torch_error(torch.tensor(g).to(torch.bfloat16), tg, rg, f"{name} on {got['path']}")


def test_info_prints_the_paths():
    out = subprocess.run([sys.executable, "-m", "tritium.cli", "info"], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    assert "cpu_features" in out and "machine_kind" in out
    assert "attention.bfloat16" in out and "quant_linear" in out
    assert tritium.utils.machine_kind("AMD EPYC 9R14").startswith("amd-")
    kind = subprocess.run([sys.executable, "-m", "tritium.cli", "info", "--kind"], check=True, capture_output=True,
                          text=True, timeout=300).stdout.strip()
    from tritium.bench.common import cpu_model
    assert kind == tritium.utils.machine_kind(cpu_model())
    assert kind.endswith("-amx") == HAS_AMX


_LORA = """
torch.manual_seed(0)
x = torch.randn(131, 45, dtype=torch.bfloat16)
w, a, b = (torch.randn(*s, dtype=torch.bfloat16) / 7 for s in ((37, 45), (16, 45), (37, 16)))
dy = torch.randn(131, 37, dtype=torch.bfloat16)
y, xs = torch.ops.tritium.lora_linear_fwd(x, w, None, a, b, None, 2.0)
dx, da, db = torch.ops.tritium.lora_linear_bwd(dy, x, w, a, b, None, xs, 2.0, True)
from tritium.utils import cpu_paths
print(json.dumps({"path": cpu_paths()["lora_linear.bfloat16.backward"], "xs": xs.float().tolist(),
                  "grads": [t.float().tolist() for t in (dx, da, db)]}))
"""


@pytest.mark.parametrize("disable", ["", "avx512_bf16"])
def test_bfloat16_lora_backward_on_each_path(disable):
    """lora_linear's bfloat16 backward (r = 16, 131 rows: two tiles and a part) on the path this machine takes with
    `disable` hidden (the one pass over dy for gs and dB on AVX512-BF16; ATen's GEMMs without it): dx, dA and dB
    against float64 given the forward's xs, within 2x torch's own bfloat16 error; the path named as taken."""
    got = _in_subprocess(_LORA, disable)
    fused = HAS_BF16_DOT and not disable
    assert got["path"].startswith("gs and dB in one pass") == fused, got["path"]
    torch.manual_seed(0)
    x = torch.randn(131, 45, dtype=torch.bfloat16)
    w, a, b = (torch.randn(*s, dtype=torch.bfloat16) / 7 for s in ((37, 45), (16, 45), (37, 16)))
    dy = torch.randn(131, 37, dtype=torch.bfloat16)
    xs = torch.tensor(got["xs"]).to(torch.bfloat16)
    d = [t.double() for t in (dy, x, w, a, b, xs)]
    gs = 2.0 * d[0] @ d[4]
    refs = (d[0] @ d[2] + gs @ d[3], gs.t() @ d[1], d[0].t() @ d[5])
    gs16 = (dy @ b) * 2.0
    theirs = (dy @ w + gs16 @ a, gs16.t() @ x, dy.t() @ xs)
    for name, g, tg, rg in zip(("dx", "dA", "dB"), got["grads"], theirs, refs):
        assert_within_torch_error(torch.tensor(g).to(torch.bfloat16), tg, rg, f"{name} on {got['path']}")


@pytest.mark.skipif(not HAS_BF16_DOT, reason="no AVX512-BF16 on this CPU: one bfloat16 rounding path only")
def test_bfloat16_outputs_round_alike_on_both_paths():
    """The one-instruction bfloat16 rounding (vcvtne2ps2bf16, AVX512-BF16) gives torch's integer rounding's bits
    exactly, subnormal results included (the instruction would flush them: those vectors fall back): the same
    calls with AVX512-BF16 hidden return the same tensors."""
    code = """
torch.manual_seed(0)
tritium.set_routes(False)
x = (torch.randn(8, 4099) * 4).to(torch.bfloat16)
x[3, 100] = -200  # probabilities that underflow to subnormals and zero
tiny = torch.linspace(-2e-38, 2e-38, 8 * 4099).to(torch.bfloat16).view(8, 4099)
w = torch.full((4099,), 1e-38, dtype=torch.bfloat16)
outs = [tritium.softmax(x, -1), tritium.log_softmax(x, -1), tritium.silu(x), tritium.elu(tiny), tritium.silu(tiny),
        tritium.rms_norm(x, (4099,), w), tritium.layer_norm(x, (4099,))]
print(json.dumps([o.view(torch.int16).flatten().tolist() for o in outs]))
"""
    fast, plain = _in_subprocess(code), _in_subprocess(code, "avx512_bf16")
    names = ["softmax", "log_softmax", "silu", "elu (subnormal)", "silu (subnormal)", "rms_norm (subnormal)",
             "layer_norm"]
    for name, a, b in zip(names, fast, plain):
        assert a == b, f"{name}: the two roundings differ"
