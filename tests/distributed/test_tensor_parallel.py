"""Tensor-parallel Llama (tritium.distributed.shard_llama / TPEngine) on 2 and 4 gloo processes (CPU) against the
same model in one process: plain-forward logits (DESIGN.md's tolerance rule against float64), every serving step's
logits and the greedy tokens for tiny configs (GQA, MHA with uneven head splits, KV heads fewer than ranks, query
heads sharing KV heads unevenly on a rank, tied and untied heads) and for the embedded SmolLM2-135M; the
vocabulary-parallel cross-entropy against F.cross_entropy (values and gradients) and sampler against the
full-vocabulary computation; the bytes a decode step's collectives move against the analytic count; bad input on
one rank raising the same error, naming it, on every rank."""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.spawn import cli_env, one_and_tp2, spawn, torchrun_serve
from tests.util import assert_within_torch_error, need_default_model
from tritium.distributed import (TPEngine, count_comm, gather_vocab, shard_from_state_dict, shard_llama, tp_shards,
                                 vocab_parallel_cross_entropy, vocab_parallel_sample)
from tritium.distributed.tp import even_split
from tritium.inference import Engine
from tritium.models.llama import CONFIGS, LlamaConfig, build

# tiny configs: the named ones plus SmolLM2's head layout (9 heads on 3 KV heads: 9 does not divide by 2 or 4,
# and on 2 ranks rank 0's heads 0-4 read KV heads 0 and 1 unevenly)
TINY = {"tiny": CONFIGS["tiny"], "tiny-mha-untied": CONFIGS["tiny-mha-untied"],
        "tiny-partial-rotary": CONFIGS["tiny-partial-rotary"],   # 1 KV head: replicated on every rank
        "smol-heads": LlamaConfig(dim=32, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=8, ffn_dim=40,
                                  vocab_size=101, max_seq_len=128)}
PROMPTS = [[5, 17, 3, 44, 2, 9, 31], [7, 1, 60]]


def _model(c: LlamaConfig, dtype=torch.float32):
    m = build(c)
    m.init_random(generator=torch.Generator().manual_seed(0))
    return m.to(dtype)


def _record(model, gather):
    """Wrap model.forward_step to record every step's (full) logits."""
    steps, inner = [], model.forward_step

    def forward_step(step, kv):
        out = inner(step, kv)
        steps.append(gather_vocab(out) if gather else out.clone())
        return out
    model.forward_step = forward_step
    return steps


def _check_config(rank, world, name):
    c = TINY[name]
    m = _model(c)
    tp = shard_llama(m)
    x = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = gather_vocab(tp(x))
        single = m(x)
        ref64 = copy.deepcopy(m).to(torch.float64)(x)
    assert_within_torch_error(ours, single, ref64, f"{name} rank {rank}/{world} forward logits")
    # bfloat16: the all-reduces sum the partial products in bfloat16, as Megatron does
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    with torch.no_grad():
        ours16 = gather_vocab(shard_llama(m16)(x))
        single16 = m16(x)
    assert_within_torch_error(ours16, single16, ref64, f"{name} rank {rank}/{world} bfloat16 forward logits")
    # the serving path: two prompts prefilled together, then decoded together; every step's logits and the
    # greedy tokens and their log-probabilities
    want_steps, got_steps = _record(m, False), _record(tp, True)
    want = Engine(m, max_batch=2).generate(PROMPTS, max_new_tokens=6)
    got = TPEngine(tp, max_batch=2).generate(PROMPTS, max_new_tokens=6)
    assert len(got_steps) == len(want_steps) == 6
    for i, (g, w) in enumerate(zip(got_steps, want_steps)):
        torch.testing.assert_close(g, w, msg=lambda s: f"{name} rank {rank}/{world} step {i} logits: {s}")
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids, f"{name} rank {rank}/{world}: greedy {g.token_ids} != {w.token_ids}"
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs))
    # each rank's cache holds only its KV heads
    eng = TPEngine(tp)
    assert eng.cache.k_pools[0].shape[2] == len(tp_shards(c, world)[rank].kv_heads) == tp.config.n_kv_heads
    return "ok"


def _check_ce(rank, world):
    V = 37
    v0, n = even_split(V, world)[rank]
    g = torch.Generator().manual_seed(3)
    full64 = 3 * torch.randn(2, 7, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (2, 7), generator=g)
    target[0, 2] = target[1, 5] = -100
    target[1, 0] = even_split(V, world)[1][0]   # a target at the edge of a slice (the same on every rank)
    dy = torch.randn(2, 7, generator=g, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        res = {}
        for dt in (torch.float32, torch.float64):
            full = full64.to(dt).clone().requires_grad_(True)
            mine = full.detach()[..., v0:v0 + n].clone().requires_grad_(True)
            ours = vocab_parallel_cross_entropy(mine, target, v0, reduction=reduction)
            theirs = F.cross_entropy(full.transpose(1, 2), target, reduction=reduction)
            w = dy.to(dt) if reduction == "none" else 1.0
            (ours * w).sum().backward()
            (theirs * w).sum().backward()
            res[dt] = (ours.detach(), mine.grad, theirs.detach(), full.grad[..., v0:v0 + n])
        what = f"vocab-parallel CE ({reduction}) rank {rank}/{world}"
        o64, g64, t64, tg64 = res[torch.float64]
        torch.testing.assert_close(o64, t64, msg=lambda s: f"{what} float64 loss: {s}")
        torch.testing.assert_close(g64, tg64, msg=lambda s: f"{what} float64 grad: {s}")
        o32, g32, t32, tg32 = res[torch.float32]
        assert_within_torch_error(o32, t32, t64, what + " float32 loss")
        assert_within_torch_error(g32, tg32, tg64, what + " float32 grad")
    return "ok"


# every sampling parameter, alone and together; history tokens for the penalties
SAMPLING = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.0, top_k=5),
            dict(temperature=0.9, top_p=0.6), dict(temperature=1.3, top_p=0.97), dict(temperature=1.0, min_p=0.2),
            dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05), dict(temperature=0.0, repetition_penalty=1.6),
            dict(temperature=1.1, top_p=0.8, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3),
            dict(temperature=0.6, logit_bias={3: 2.5, 250: -1.0, 299: 4.0}, frequency_penalty=0.5),
            dict(temperature=1.0, top_k=400), dict(temperature=0.0, logit_bias={150: 100.0})]


def _check_sampler(rank, world):
    """vocab_parallel_sample against tritium.sample on the full logits (one process: the C++ kernel): the same
    tokens and log-probabilities for every sampling parameter over 8 seeds each, peaked and flat rows (a flat
    top-p row's nucleus reaches below the first 64 candidates of a rank: they are gathered again), ties, NaN."""
    from tritium.ops.sampling import SamplingParams, sample

    V = 301
    v0, n = even_split(V, world)[rank]
    g = torch.Generator().manual_seed(4)
    rows, plist, hist = [], [], []
    for j, kw in enumerate(SAMPLING):
        for seed in range(8):
            rows.append(torch.randn(V, generator=g) * (3.0 if seed % 2 else 0.3))   # peaked or flat
            plist.append(SamplingParams(**kw, seed=100 * j + seed))
            hist.append(torch.randint(0, V, (seed * 3,), generator=g).tolist())
    full = torch.stack(rows)
    full[1, 3] = full[1, V - 2] = full[1].max() + 1   # a greedy tie across slices: the lower id wins, as argmax
    full[2, 7] = float("nan")                           # no valid choice: -1
    want, wlp = sample(full, plist, hist, on_invalid="flag")
    with count_comm() as st:
        toks, lps = vocab_parallel_sample(full[:, v0:v0 + n].contiguous(), v0, plist, hist, vocab_size=V)
    assert toks[1] == 3 and toks[2] == -1 and want[2] == -1
    diff = (toks != want).nonzero()[:, 0].tolist()
    assert not diff, f"rank {rank}/{world}: rows {diff}: {toks[diff].tolist()} != one process's {want[diff].tolist()}"
    torch.testing.assert_close(lps, wlp, equal_nan=True)
    # the agreement, the first all-gather, candidates (and their second gathering), the flat rows' pick
    assert st.calls["check"] == 1 and st.calls["all_gather"] >= 4, st
    # greedy (params None): one all-gather of (rows, 4) float64, as the analytic count says
    with count_comm() as st:
        toks, _ = vocab_parallel_sample(full[:, v0:v0 + n].contiguous(), v0)
    assert st.bytes == {"all_gather": full.shape[0] * 4 * 8}, st
    assert toks[1] == 3 and toks[0] == full[0].argmax()
    # ranks passing different parameters, or a bad one: the same error naming the rank on every rank
    errors = []
    for bad in (dict(temperature=1.0, top_k=4 + rank, seed=1), dict(temperature=1.0, logit_bias={V - 1 + rank: 1.0},
                                                                     seed=1)):
        try:
            vocab_parallel_sample(full[:2, v0:v0 + n].contiguous(), v0, SamplingParams(**bad), vocab_size=V)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    assert errors[0].startswith("vocab_parallel_sample: rank 1: sampling parameters' checksum"), errors
    assert errors[1] == f"vocab_parallel_sample: rank 1: SamplingParams.logit_bias must be keyed by token ids in " \
                        f"[0, {V}), got {{{V}: 1.0}}", errors
    return "ok"


def _check_top_p_radix(rank, world):
    """Top-p rows whose nucleus holds thousands of tokens (flat rows of a 4099 vocabulary, far below the first 64
    candidates of a rank): the cut by radix selection gives tritium.sample's tokens and log-probabilities, with
    min-p above and below the cut and ties at the cut, in the first candidates' exchange, two radix rounds and the
    draw's: 5 all-gathers of a known size whatever the nucleus."""
    from tritium.ops.sampling import SamplingParams, sample

    V = 4099
    v0, n = even_split(V, world)[rank]
    g = torch.Generator().manual_seed(5)
    rows, plist = [], []
    for j, kw in enumerate([dict(temperature=0.8, top_p=0.9), dict(temperature=1.2, top_p=0.99),
                            dict(temperature=1.0, top_p=0.5, min_p=0.6), dict(temperature=1.0, top_p=0.6, min_p=0.05),
                            dict(temperature=1.0, top_p=0.7)]):
        for seed in range(8):
            x = torch.randn(V, generator=g) * 0.3
            if j == 4:   # logits on a grid of 1/8 at scale 1: many tokens share the value at the cut
                x = (x * 3 * 8).round() / 8
            rows.append(x)
            plist.append(SamplingParams(**kw, seed=10 * j + seed))
    full = torch.stack(rows)
    hist = [[]] * len(rows)
    want, wlp = sample(full, plist, hist, on_invalid="flag")
    with count_comm() as st:
        toks, lps = vocab_parallel_sample(full[:, v0:v0 + n].contiguous(), v0, plist, hist, vocab_size=V)
    diff = (toks != want).nonzero()[:, 0].tolist()
    assert not diff, f"rank {rank}/{world}: rows {diff}: {toks[diff].tolist()} != one process's {want[diff].tolist()}"
    torch.testing.assert_close(lps, wlp)
    # per row: the greedy table (4), the masses and first digit (2 + 1024) with 64 candidates (3 each), the two
    # radix rounds (2048 + 1024), the draw (2), float64
    assert st.calls["all_gather"] == 5, st
    assert st.bytes["all_gather"] == len(rows) * (4 + 2 + 1024 + 64 * 3 + 2048 + 1024 + 2) * 8, st
    return "ok"


@pytest.mark.parametrize("world", [2, 4])
def test_top_p_radix_cut_matches_one_process(tmp_path, world):
    results = spawn(tmp_path, world, _check_top_p_radix)
    assert results == ["'ok'"] * world, "\n".join(results)


def _check_sampling_engine(rank, world):
    """TPEngine with seeded sampling and penalties generates the same tokens as Engine in one process."""
    c = TINY["smol-heads"]
    m = _model(c)
    kws = [dict(temperature=0.8, top_p=0.9, seed=1), dict(temperature=1.0, top_k=5, repetition_penalty=1.3, seed=2),
           dict(temperature=0.7, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.3, seed=3),
           dict(temperature=0.0, repetition_penalty=1.5, logit_bias={7: 0.5})]
    tops = [3, None, 0, 5]   # top_logprobs of each request
    want = [Engine(m).generate([p], max_new_tokens=8, top_logprobs=t, **kw)[0]
            for p, kw, t in zip(PROMPTS * 2, kws, tops)]
    eng = TPEngine(shard_llama(m), max_batch=4)
    reqs = [eng.add_request(p, max_new_tokens=8, top_logprobs=t, **kw) for p, kw, t in zip(PROMPTS * 2, kws, tops)]
    while eng.has_work():
        eng.step()
    for r, w, kw in zip(reqs, want, kws):
        assert r.result.token_ids == w.token_ids, f"{kw} rank {rank}/{world}: {r.result.token_ids} != {w.token_ids}"
        torch.testing.assert_close(torch.tensor(r.result.logprobs), torch.tensor(w.logprobs))
        got_top, want_top = r.result.top_logprobs, w.top_logprobs
        assert len(got_top) == len(want_top) == (0 if r.top_logprobs is None else 8), (got_top, want_top)
        for (glp, gl), (wlp, wl) in zip(got_top, want_top):
            assert [t for t, _ in gl] == [t for t, _ in wl], (kw, gl, wl)
            torch.testing.assert_close(torch.tensor([glp] + [v for _, v in gl]),
                                       torch.tensor([wlp] + [v for _, v in wl]))
    with pytest.raises(ValueError, match=r"logit_bias must be keyed by token ids in \[0, 101\)"):
        eng.add_request([1, 2], logit_bias={101: 1.0})
    assert not eng.has_work()
    return "ok"


def _check_beams(rank, world):
    """TPEngine's beam search keeps the same beams as Engine in one process: beam requests of widths 2 and 4 (one
    with a stop token its beams reach, one with a length penalty) batched with a greedy request; the same tokens,
    log-probabilities and scores. A beam step's one all-gather moves (beam rows, 1 + 2 x 2 num_beams) float64."""
    c = TINY["smol-heads"]
    m = _model(c)
    stop = Engine(m).generate([PROMPTS[0]], max_new_tokens=1)[0].token_ids[0]   # the token this model favours
    kws = [dict(num_beams=3, stop_token_ids=[stop], length_penalty=0.0), dict(num_beams=2, length_penalty=0.5),
           dict(num_beams=4, stop_token_ids=[stop], length_penalty=2.0), dict()]
    prompts = [[4, 8, 15, 16, 23, 42], *PROMPTS, [9, 9]]
    want = [Engine(m, max_batch=4).generate([p], max_new_tokens=8, **kw)[0] for p, kw in zip(prompts, kws)]
    eng = TPEngine(shard_llama(m), max_batch=10)
    reqs = [eng.add_request(p, max_new_tokens=8, **kw) for p, kw in zip(prompts, kws)]
    while eng.has_work():
        eng.step()
    for r, w, kw in zip(reqs, want, kws):
        what = f"{kw} rank {rank}/{world}"
        assert r.result.token_ids == w.token_ids, f"{what}: {r.result.token_ids} != {w.token_ids}"
        assert r.result.finish_reason == w.finish_reason, what
        torch.testing.assert_close(torch.tensor(r.result.logprobs), torch.tensor(w.logprobs))
        if w.score is not None:
            torch.testing.assert_close(torch.tensor(r.result.score), torch.tensor(w.score))
    assert want[0].finish_reason == "stop" and len(want[0].token_ids) > 1   # a finished beam won
    # one decode step of a 3-beam request alone: the agreement, the all-reduces, one all-gather of its candidates
    eng = TPEngine(shard_llama(m), max_batch=3)
    eng.add_request(PROMPTS[0], max_new_tokens=4, num_beams=3)
    eng.step()
    eng.step()
    with count_comm() as st:
        eng.step()
    assert st.calls == {"all_reduce": 2 * c.n_layers + 1, "all_gather": 1, "check": 1}, st
    assert st.bytes["all_gather"] == 3 * (1 + 2 * 6) * 8, st
    return "ok"


def _check_comm(rank, world):
    """The bytes one decode step of 2 sequences moves per rank: 2 all-reduces per layer and one for the embedding
    of (rows, dim) in the model's dtype, the sampler's all-gather of (rows, 4) float64, the 5-integer agreement."""
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        c = TINY["tiny-mha-untied"]
        tp = shard_llama(_model(c, dt))
        eng = TPEngine(tp, max_batch=2)
        for p in PROMPTS:
            eng.add_request(p, max_new_tokens=4)
        eng.step()   # the prefill
        rows = 2
        with count_comm() as st:
            eng.step()   # one decode step
        per_token_allreduce = (2 * c.n_layers + 1) * c.dim * dt.itemsize
        assert st.bytes == {"all_reduce": rows * per_token_allreduce, "all_gather": rows * 4 * 8, "check": 5 * 8}, \
            (dt, st)
        assert st.calls == {"all_reduce": 2 * c.n_layers + 1, "all_gather": 1, "check": 1}, (dt, st)
        out[str(dt)] = st.total_bytes / rows
    return out


def _all_checks(rank, world):
    for name in TINY:
        _check_config(rank, world, name)
    _check_ce(rank, world)
    _check_sampler(rank, world)
    _check_sampling_engine(rank, world)
    return _check_comm(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_one_process(tmp_path, world):
    results = spawn(tmp_path, world, _all_checks)
    assert not any(r.startswith("FAILED") for r in results), "\n".join(results)
    assert len(set(results)) == 1, results


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_beam_search_matches_one_process(tmp_path, world):
    results = spawn(tmp_path, world, _check_beams, timeout_s=120)
    assert results == ["'ok'"] * world, "\n".join(results)


def test_shards():
    """The split: heads as even as possible, KV heads replicated or one per query head where groups are uneven."""
    s = tp_shards(TINY["smol-heads"], 2)
    assert [x.q_heads for x in s] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert [x.kv_heads for x in s] == [[0, 0, 0, 1, 1], [1, 2, 2, 2]]
    s = tp_shards(TINY["smol-heads"], 4)
    assert [x.kv_heads for x in s] == [[0], [1], [1, 2], [2]]
    assert [x.kv_heads for x in tp_shards(TINY["tiny-partial-rotary"], 4)] == [[0]] * 4
    assert [x.vocab for x in tp_shards(TINY["tiny"], 4)] == [(0, 25), (25, 24), (49, 24), (73, 24)]
    with pytest.raises(ValueError, match=r"world size must be in \[1, n_heads=4\], got 5"):
        tp_shards(TINY["tiny-partial-rotary"], 5)
    with pytest.raises(NotImplementedError, match="mixture of 4 experts"):
        tp_shards(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=16, vocab_size=50,
                              num_experts=4, top_k=2), 2)


# ---- bad input: every rank raises the same error, naming the bad rank; nothing hangs ----
def _bad_inputs(rank, world):
    tp = shard_llama(_model(TINY["tiny"]))
    good = torch.tensor([[1, 2, 3, 4, 5]])
    bad = {"range": torch.tensor([[1, 2, 300, 4, 5]]), "length": torch.tensor([[1, 2, 3, 4, 5, 6]]),
           "dtype": good.float(), "other tokens": torch.tensor([[1, 2, 3, 4, 6]])}
    got = {}
    for name, x in bad.items():
        try:
            with torch.no_grad():
                tp(x if rank == 1 else good)
            got[name] = "no error"
        except Exception as e:
            got[name] = f"{type(e).__name__}: {e}"
    with torch.no_grad():   # the group is still usable
        torch.testing.assert_close(gather_vocab(tp(good)), _model(TINY["tiny"])(good))
    return got


def test_bad_input_on_one_rank_fails_every_rank(tmp_path):
    t0 = time.monotonic()
    results = spawn(tmp_path, 2, _bad_then_silent)
    assert not any(r.startswith("FAILED") for r in results), "\n".join(results)
    per_rank = [eval(r)[0] for r in results]
    want = {"range": "token ids must be in [0, 97), got values in [1, 300]",
            "length": "token count 6 differs from rank 0's 5",
            "dtype": "tokens must be an int64 tensor, got torch.float32",
            "other tokens": "token sum 16 differs from rank 0's 15"}
    for name, msg in want.items():
        for rank, got in enumerate(per_rank):
            assert got[name].startswith(f"ValueError: TPLlama.forward: rank 1: {msg}"), f"{name} rank {rank}: " \
                                                                                        f"{got[name]}"
    assert time.monotonic() - t0 < 50   # nobody waited for the 60 s collective timeout
    # a rank that stops outside the collectives: the other fails after the group's 2 s timeout
    waited, timed_out = eval(results[0])[1]
    assert timed_out and 2 <= waited < 10, results[0]


def _silent_rank(rank, world):
    """Rank 1 fails outside any collective (it never calls the forward): rank 0's first collective raises after
    the group's timeout instead of waiting for ever. Returns (seconds rank 0 waited, whether gloo said so)."""
    import datetime

    g = dist.new_group(timeout=datetime.timedelta(seconds=2))
    tp = shard_llama(_model(TINY["tiny"]), g)
    if rank == 1:
        time.sleep(4)
        return None
    t0 = time.monotonic()
    try:
        with torch.no_grad():
            tp(torch.tensor([[1, 2, 3]]))
    except RuntimeError as e:
        return time.monotonic() - t0, "Timed out" in str(e)
    return "no error"


def _bad_then_silent(rank, world):
    return _bad_inputs(rank, world), _silent_rank(rank, world)


# ---- the embedded SmolLM2-135M ----
@pytest.fixture(scope="module")
def smollm2_reference(tmp_path_factory):
    """The float32 model's weights (saved for the ranks to memory-map), its logits for a chat prompt, the
    float64 model's, and its greedy continuation, all in one process."""
    import tritium.models
    need_default_model()
    model, tok = tritium.models.load()
    d = tmp_path_factory.mktemp("smollm2")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    x = torch.tensor([ids])
    with torch.no_grad():
        single = model(x)
        ref64 = copy.deepcopy(model).to(torch.float64)(x)
    greedy = Engine(model).generate([ids], max_new_tokens=12)[0]
    torch.save(model.hf_state_dict(), d / "weights.pt")
    torch.save({"ids": ids, "single": single, "ref64": ref64, "tokens": greedy.token_ids}, d / "reference.pt")
    return d, model.config


def _check_smollm2(rank, world, d, config):
    w = torch.load(os.path.join(d, "weights.pt"), mmap=True)
    tp = shard_from_state_dict(w, config)
    ref = torch.load(os.path.join(d, "reference.pt"))
    with torch.no_grad():
        ours = gather_vocab(tp(torch.tensor([ref["ids"]])))
    assert_within_torch_error(ours, ref["single"], ref["ref64"], f"SmolLM2 rank {rank}/{world} logits")
    got = TPEngine(tp).generate([ref["ids"]], max_new_tokens=12)[0].token_ids
    assert got == ref["tokens"], f"rank {rank}/{world}: greedy {got} != one process's {ref['tokens']}"
    return "ok"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_smollm2_tensor_parallel(tmp_path, smollm2_reference, world):
    d, config = smollm2_reference
    results = spawn(tmp_path, world, _check_smollm2, str(d), config, timeout_s=180)
    assert results == ["'ok'"] * world, "\n".join(results)


# ---- the command line ----
def test_generate_tp_needs_torchrun(monkeypatch):
    from tritium.cli import generate
    from tritium.cli.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UsageError, match=r"--tp 2 runs under `torchrun --nproc-per-node 2 -m tritium generate"):
        generate.main(["hi", "--tp", "2"])
    with pytest.raises(UsageError, match=r"--tp 2 runs under `torchrun --nproc-per-node 2 -m tritium generate"):
        generate.main(["hi", "--tp", "2", "--weights", "int8"])   # quantized weights are sharded too
    pytest.importorskip("fastapi", reason="tritium serve needs the serve extra")
    from tritium.cli import serve

    with pytest.raises(UsageError, match=r"--tp 2 runs under `torchrun --nproc-per-node 2 -m tritium serve"):
        serve.main(["--tp", "2"])


@pytest.mark.slow
def test_generate_tp_under_torchrun(smollm2_reference):
    """`torchrun --nproc-per-node 2 -m tritium generate ... --tp 2` streams the same greedy tokens as one process
    (the reference's prompt is the same chat-templated question)."""
    import subprocess

    import tritium.models

    _, tok = tritium.models.load(weights="native")
    ref = torch.load(smollm2_reference[0] / "reference.pt")
    env, torchrun = cli_env()
    out = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "tritium", "generate",
                          "What is the capital of France?", "--tp", "2", "--max-new-tokens", "12", "--dtype",
                          "float32"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    toks = ref["tokens"]   # the reference ran without stop tokens: the CLI stops at the first
    want = tok.decode(toks[:next((i for i, t in enumerate(toks) if t in set(tok.stop_ids)), len(toks))])
    assert out.stdout.strip() == want.strip(), (out.stdout, want)
    assert "tensor-parallel on 2 ranks" in " ".join(out.stderr.split())
    # seeded sampling with every CLI sampling flag: the same text as one process on the same float weights
    sampling = ["What is the capital of France?", "--max-new-tokens", "12", "--dtype", "float32", "--weights",
                "float", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.02",
                "--repetition-penalty", "1.2", "--seed", "3"]
    one, two = one_and_tp2(["generate", *sampling], env)
    assert two.stdout == one.stdout and one.stdout.strip(), (two.stdout, one.stdout)
    # beam search: the same text as one process
    beams = ["What is the capital of France?", "--max-new-tokens", "8", "--dtype", "float32", "--weights", "float",
             "--num-beams", "3"]
    one, two = one_and_tp2(["generate", *beams], env)
    assert two.stdout == one.stdout and one.stdout.strip(), (two.stdout, one.stdout)


@pytest.mark.slow
def test_serve_tp_over_http_under_torchrun(smollm2_reference):
    """`torchrun --nproc-per-node 2 -m tritium serve --tp 2 --port 0`: rank 0 answers the OpenAI API over HTTP (a
    greedy chat completion: the reference's tokens, as one process gives them) while rank 1 follows its steps."""
    httpx = pytest.importorskip("httpx")
    import tritium.models

    _, tok = tritium.models.load(weights="native")
    toks = torch.load(smollm2_reference[0] / "reference.pt")["tokens"]
    want = tok.decode(toks[:next((i for i, t in enumerate(toks) if t in set(tok.stop_ids)), len(toks))])
    with torchrun_serve(["--dtype", "float32", "--max-batch", "2"]) as (url, _):
        assert httpx.get(url + "/health", timeout=60).json() == {"status": "ok"}
        name = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == want.strip(), (r.json(), want)


def test_bench_dist_tp_bytes_match_analytic():
    """`tritium bench dist --kind tp`'s measured bytes per token per rank (bfloat16, batch 3, 2 ranks) equal the
    analytic (2 n_layers + 1) x dim x 2 + 32 + 40 / 3 it prints beside them (the issue's bar)."""
    import argparse

    from tritium.bench import dist as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--kind", "tp", "--config", "tiny", "--worlds", "2", "--dtype", "bfloat16", "--batch", "3",
                         "--prompt-len", "5", "--decode-steps", "2"])
    rows = bench.run(args)
    c = CONFIGS["tiny"]
    want = (2 * c.n_layers + 1) * c.dim * 2 + 32 + 40 / 3
    assert [r["impl"] for r in rows] == ["single decode", "tp decode"]
    assert rows[1]["analytic_bytes_per_token_per_rank"] == pytest.approx(want, rel=1e-12)
    assert rows[1]["bytes_per_token_per_rank"] == pytest.approx(want, rel=1e-12)
    assert rows[0]["bytes_per_token_per_rank"] == 0


# ---- serving: rank 0's worker leads, the others follow ----
def _serve_tp(rank, world):
    import asyncio
    import threading

    from tritium.serve.tp import TPLeaderWorker, follow
    from tritium.serve.worker import Submission

    m = _model(TINY["tiny"])
    want = Engine(m, max_batch=4).generate(PROMPTS + [[3, 3, 3]], max_new_tokens=6)
    seeded = dict(temperature=0.9, top_p=0.8, repetition_penalty=1.2, seed=5)
    want_seeded = Engine(m).generate([[1, 2]], max_new_tokens=6, **seeded)[0]
    want_beams = Engine(m, max_batch=2).generate([[1, 2]], max_new_tokens=6, num_beams=2)[0]
    engine = TPEngine(shard_llama(m), max_batch=4)
    if rank:
        follow(engine)
        return "followed"
    worker = TPLeaderWorker(engine).start()

    async def ask(prompts, kwargs, abort_first=False):
        loop = asyncio.get_running_loop()
        got = asyncio.Queue()
        subs = [Submission(p, 6, kwargs, loop, lambda kind, payload, i=i: got.put_nowait((i, kind, payload)))
                for i, p in enumerate(prompts)]
        for s in subs:
            worker.submit(s)
        if abort_first:
            worker.abort(subs[0])
        out = {}
        while len(out) < len(subs) - abort_first:
            i, kind, payload = await got.get()
            if kind != "text":
                out[i] = (kind, payload.token_ids if kind == "done" else payload)
        return out

    try:
        first = asyncio.run(ask(PROMPTS, {}))
        time.sleep(1.2)   # idle ticks: the followers wait in the broadcast without timing out
        bad = asyncio.run(ask([[1, 2]], {"logit_bias": {10 ** 6: 1.0}}))   # refused by every rank's engine alike
        beams = asyncio.run(ask([[1, 2]], {"num_beams": 2}))
        sampled = asyncio.run(ask([[1, 2]], seeded))
        second = asyncio.run(ask([[3, 3, 3], [1, 2, 3, 4]], {}, abort_first=True))
    finally:
        worker.stop()
    assert worker.error is None, worker.error
    assert first == {0: ("done", want[0].token_ids), 1: ("done", want[1].token_ids)}, first
    assert bad[0][0] == "error" and "logit_bias" in bad[0][1], bad
    assert beams == {0: ("done", want_beams.token_ids)}, (beams, want_beams.token_ids)
    assert sampled == {0: ("done", want_seeded.token_ids)}, (sampled, want_seeded.token_ids)
    assert second[1][0] == "done" and len(second[1][1]) == 6, second
    assert not threading.current_thread().daemon
    return "led"


def test_serve_tp_followers_stay_in_step(tmp_path):
    results = spawn(tmp_path, 2, _serve_tp)
    assert results == ["'led'", "'followed'"], "\n".join(results)
