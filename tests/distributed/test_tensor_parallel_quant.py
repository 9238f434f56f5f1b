"""Tensor-parallel Llama with quantized weights (tritium.distributed.shard_llama of a quantize_d model) on 2 gloo
processes against the same quantized model in one process: the shards stay quantized (QuantizedLinear, about half
the quantized bytes on each rank), and the plain-forward logits, every serving step's logits and the greedy
tokens agree (with int8 activations: the logits within their own error, and the greedy tokens); a row-parallel
split that would cut a quantization group holds that layer in float, saying why."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.spawn import cli_env, one_and_tp2, spawn, torchrun_serve
from tests.distributed.test_tensor_parallel import _record
from tests.util import need_default_model
from tritium.distributed import TPEngine, gather_vocab, shard_llama
from tritium.inference import Engine
from tritium.models.llama import LlamaConfig, build
from tritium.nn import QuantizedLinear

# head_dim 16 and ffn_dim 128: on 2 ranks the output projection's and the down projection's input columns split
# at 32 and 64, on the int4 groups of 32
CONFIGS = {"gqa-tied": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                                   vocab_size=101, max_seq_len=128, tie_embeddings=True),
           "mha-untied": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128,
                                     vocab_size=97, max_seq_len=128, tie_embeddings=False),
           # ffn_dim 96 splits 48 / 48: the down projection's cut falls inside an int4 group
           "ffn-unaligned": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                                        vocab_size=101, max_seq_len=128, tie_embeddings=True)}
CASES = [("gqa-tied", "int8", None, 0), ("gqa-tied", "int4", None, 0), ("mha-untied", "int8", 32, 0),
         ("mha-untied", "int4", None, 0), ("ffn-unaligned", "int4", None, 0),
         ("gqa-tied", "int4", None, 1), ("mha-untied", "int8", 32, 1)]   # the last two: int8 activations
PROMPTS = [[5, 17, 3, 44, 2, 9, 31], [7, 1, 60]]


def _quant_bytes(model) -> int:
    seen = {id(m): m for m in model.modules() if isinstance(m, QuantizedLinear)}
    return sum(m.weight.nbytes for m in seen.values())


def _check(rank, world, name, mode, group_size, int8_act):
    what = f"{name} {mode}/{group_size} int8_act={int8_act} rank {rank}/{world}"
    c = CONFIGS[name]
    m = build(c).init_random(generator=torch.Generator().manual_seed(0))
    m.quantize_(mode, group_size, int8_act)
    tp = shard_llama(m)
    # the shard is quantized: every projection but a row-parallel one whose cut falls inside a group
    unaligned = name == "ffn-unaligned"
    for lin in tp._linears():
        down = lin in [b.mlp.w_down for b in tp.layers]
        assert (lin.quant is None) == (unaligned and down), f"{what}: {lin} quantized is {lin.quant is not None}"
        for q in lin.quant_parts:
            assert isinstance(q, QuantizedLinear) and q.int8_act in ((lin.int8_terms,) if int8_act else (0,))
    if unaligned:
        assert len(tp.tp_notes) == c.n_layers and all("down_proj" in n and "groups of 32" in n
                                                       for n in tp.tp_notes), tp.tp_notes
    else:
        assert tp.tp_notes == []
        assert tp.embed_q is not None if c.tie_embeddings else tp.embed is not None
    ratio = _quant_bytes(tp) / _quant_bytes(m)
    assert (0.25 if unaligned else 0.4) < ratio < 0.6, f"{what}: the shard holds {ratio:.3f} of the quantized bytes"
    x = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, single = gather_vocab(tp(x)), m(x)
    if int8_act:
        # int8 activations round each block of 32 to a step of its absmax / 127: the all-reduces' different
        # summation order can move an activation across a rounding boundary, so the shard agrees with one process
        # within the int8 activations' own error (one process's float-activation logits against its int8 ones)
        with torch.no_grad():
            own = (single - m.set_int8_activations(0)(x)).abs().max()
        m.set_int8_activations(int8_act)
        err = (ours - single).abs().max()
        assert 0 < own and err <= 2 * own, f"{what}: forward logits differ by {err}, int8 activations' error {own}"
    else:
        torch.testing.assert_close(ours, single, msg=lambda s: f"{what} forward logits: {s}")
    want_steps, got_steps = _record(m, False), _record(tp, True)
    want = Engine(m, max_batch=2).generate(PROMPTS, max_new_tokens=6)
    got = TPEngine(tp, max_batch=2).generate(PROMPTS, max_new_tokens=6)
    assert len(got_steps) == len(want_steps) == 6
    for i, (g, w) in enumerate(zip(got_steps, want_steps) if not int8_act else ()):
        torch.testing.assert_close(g, w, msg=lambda s: f"{what} step {i} logits: {s}")
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids, f"{what}: greedy {g.token_ids} != {w.token_ids}"
    return "ok"


def _all(rank, world):
    for case in CASES:
        _check(rank, world, *case)
    return "ok"


def test_tensor_parallel_quantized_matches_one_process(tmp_path):
    results = spawn(tmp_path, 2, _all)
    assert results == ["'ok'"] * 2, "\n".join(results)


@pytest.mark.slow
def test_embedded_gguf_shards_stay_quantized():
    """SmolLM2-135M loaded natively (Q4_1 layers, Q8_0 embedding and tied head): on 2 and 4 ranks every
    rank's slices are logical quantized weights (its cuts fall on the groups of 32), and the row-parallel
    slices and the vocabulary slices put back together are the model's own quantized weights, bit for bit."""

    import tritium.models
    from tritium.distributed.tp import shard_state_dict, tp_shards, tp_weights
    need_default_model()
    m, _ = tritium.models.load(weights="native")
    c = m.config
    w = tp_weights(m)
    names = [n for n in w if "proj" in n or "embed" in n]
    assert all(isinstance(w[n], tuple) for n in names), [n for n in names if not isinstance(w[n], tuple)]
    for world in (2, 4):
        notes = []
        shards = [shard_state_dict(w, c, s, notes) for s in tp_shards(c, world)]
        assert notes == [], notes
        for n in names:
            assert all(isinstance(sd[n], tuple) for sd in shards), f"{n} on {world} ranks is not quantized"
        for n, dim in [("model.embed_tokens.weight", 0), ("model.layers.3.self_attn.o_proj.weight", 1),
                       ("model.layers.5.mlp.down_proj.weight", 1)]:
            for i in range(3):   # q, scales, mins (None for Q8_0)
                got = None if w[n][i] is None else torch.cat([sd[n][i] for sd in shards], dim)
                assert (got is None and all(sd[n][i] is None for sd in shards)) or torch.equal(got, w[n][i]), \
                    f"{n}'s slices on {world} ranks do not put back the model's quantized weight"


@pytest.mark.parametrize("weights", ["native", "int4"])
def test_generate_tp_quantized_weights_under_torchrun(tmp_path, weights):
    """`torchrun --nproc-per-node 2 -m tritium generate ... --tp 2 --weights native|int4` on a tiny GGUF (stored
    Q8_0 / Q4_0 for native; float, quantized at load for int4): each rank's shard stays quantized (the shard's
    weight mode on rank 0's report) and the greedy text is one process's with the same weights (two-term int8
    activations, the CLI's default for quantized weights)."""

    from tests.models.checkpoints import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quantized=weights == "native")
    flags = ["generate", "hello there", "--raw", "--model", path, "--weights", weights, "--max-new-tokens", "12",
             "--dtype", "float32"]
    one, two = one_and_tp2(flags)
    assert two.stdout == one.stdout and one.stdout.strip(), (two.stdout, one.stdout)
    report = " ".join(two.stderr.split())
    want = "q4/32 q8/32" if weights == "native" else "q4/32"
    assert "tensor-parallel on 2 ranks" in report and f"weights {want}" in report, report


def test_serve_tp_quantized_weights_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m tritium serve --tp 2 --weights native` on a tiny GGUF stored quantized
    (Q8_0 / Q4_0): rank 0 answers a greedy /v1/completions with the text one process's `tritium generate` gives
    with the same weights, while rank 1 follows its steps on its quantized shard."""
    import subprocess
    import sys

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi", reason="tritium serve needs the serve extra")
    from tests.models.checkpoints import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quantized=True)
    env, _ = cli_env()
    model_flags = ["--model", path, "--weights", "native", "--dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "tritium", "generate", "hello there", "--raw", "--max-new-tokens",
                          "12", *model_flags], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr
    with torchrun_serve([*model_flags, "--max-batch", "2"], env) as (url, startup):
        assert "; shard weights: q4/32 q8/32" in " ".join(startup.split()), startup
        name = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": name, "prompt": "hello there", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == one.stdout[:-1], (r.json(), one.stdout)   # generate adds "\n"
