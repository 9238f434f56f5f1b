"""tritium.inference.Engine on a random tiny model with a byte-level tokenizer: continuous batching equals
running alone, preemption and recompute, stop tokens/strings, streaming, seeds, beam search."""
import math

import pytest
import torch

from tests.models.test_llama import byte_tokenizer_meta
from tritium.inference.engine import Engine
from tritium.models import LlamaConfig, build
from tritium.models.tokenizer import Tokenizer

CFG = LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=72, vocab_size=261,
                  max_seq_len=256, tie_embeddings=False)
PROMPTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog", "1234", "hi there, how are you?"]


@pytest.fixture(scope="module")
def model():
    return build(CFG).init_random(std=0.3, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_metadata(byte_tokenizer_meta())


def alone(model, tok, prompt, **kw):
    return Engine(model, tok, max_batch=8).generate([prompt], **kw)[0]


def greedy_reference(model, ids, n):
    """Greedy decoding with full forwards (no cache at all)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def test_greedy_matches_uncached_forward(model, tok):
    r = alone(model, tok, PROMPTS[0], max_new_tokens=12, stop_token_ids=[])
    assert r.token_ids == greedy_reference(model, tok.encode(PROMPTS[0]), 12)
    assert r.finish_reason == "length" and r.text == tok.decode(r.token_ids)


@pytest.mark.parametrize("max_batch,max_prefill", [(8, 2048), (2, 2048), (3, 8)])
def test_batched_greedy_equals_alone(model, tok, max_batch, max_prefill):
    """Requests join (prefill) and leave while others decode; each gets exactly its solo tokens."""
    want = [alone(model, tok, p, max_new_tokens=10 + i, stop_token_ids=[]).token_ids for i, p in enumerate(PROMPTS)]
    eng = Engine(model, tok, max_batch=max_batch, max_prefill_tokens=max_prefill, block_size=4)
    reqs = [eng.add_request(p, max_new_tokens=10 + i, stop_token_ids=[]) for i, p in enumerate(PROMPTS[:2])]
    eng.step()
    eng.step()
    reqs += [eng.add_request(p, max_new_tokens=10 + i, stop_token_ids=[]) for i, p in enumerate(PROMPTS[2:], 2)]
    while eng.has_work():
        eng.step()
    assert [r.result.token_ids for r in reqs] == want
    eng.cache.check_invariants()
    assert eng.cache.num_free_blocks == eng.cache.num_blocks


def test_preemption_recomputes_identically(model, tok):
    want = [alone(model, tok, p, max_new_tokens=24, stop_token_ids=[]).token_ids for p in PROMPTS]
    # 12 blocks of 4 tokens: not enough for all five sequences to grow, so some are preempted and recomputed
    eng = Engine(model, tok, max_batch=8, num_blocks=24, block_size=4)
    got = eng.generate(PROMPTS, max_new_tokens=24, stop_token_ids=[])
    assert eng.stats["preemptions"] > 0
    assert [r.token_ids for r in got] == want
    assert eng.cache.num_free_blocks == eng.cache.num_blocks


def test_request_too_large_for_cache_fails_alone(model, tok):
    eng = Engine(model, tok, max_batch=4, num_blocks=3, block_size=4)
    big, small = eng.generate([PROMPTS[2], "a"], max_new_tokens=3, stop_token_ids=[])
    assert big.finish_reason == "error" and big.token_ids == []
    assert small.finish_reason == "length" and len(small.token_ids) == 3


def test_stop_token_string_and_streaming(model, tok):
    base = alone(model, tok, PROMPTS[0], max_new_tokens=16, stop_token_ids=[])
    stop_at = 5
    r = alone(model, tok, PROMPTS[0], max_new_tokens=16, stop_token_ids=[base.token_ids[stop_at]])
    k = base.token_ids.index(base.token_ids[stop_at])
    assert r.token_ids == base.token_ids[: k + 1] and r.finish_reason == "stop"
    assert r.text == tok.decode(base.token_ids[:k])
    # a stop string cuts the text before it; what was streamed is exactly the final text
    text = base.text
    stop = text[6:9]
    pieces = []
    eng = Engine(model, tok)
    res = eng.generate([PROMPTS[0]], max_new_tokens=16, stop_token_ids=[], stop=[stop],
                       on_token=lambda req, t, s: pieces.append(s))[0]
    assert res.finish_reason == "stop" and res.text == text[: text.find(stop)]
    assert "".join(pieces) == res.text
    pieces.clear()
    res = eng.generate([PROMPTS[1]], max_new_tokens=9, stop_token_ids=[],
                       on_token=lambda req, t, s: pieces.append(s))[0]
    assert "".join(pieces) == res.text and res.finish_reason == "length" and len(res.token_ids) == 9


def test_sampling_seeds_and_mixed_params(model, tok):
    kw = dict(max_new_tokens=12, stop_token_ids=[], temperature=1.0, top_p=0.9)
    a = alone(model, tok, PROMPTS[0], seed=7, **kw)
    b = alone(model, tok, PROMPTS[0], seed=7, **kw)
    c = alone(model, tok, PROMPTS[0], seed=8, **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    g = alone(model, tok, PROMPTS[3], max_new_tokens=12, stop_token_ids=[])
    eng = Engine(model, tok)
    r1 = eng.add_request(PROMPTS[0], seed=7, **kw)
    r2 = eng.add_request(PROMPTS[3], max_new_tokens=12, stop_token_ids=[])
    while eng.has_work():
        eng.step()
    assert r1.result.token_ids == a.token_ids and r2.result.token_ids == g.token_ids
    assert all(lp <= 0 for lp in r1.result.logprobs) and len(r1.result.logprobs) == 12


def beam_reference(model, ids, num_beams, n, alpha):
    """Plain beam search with full forwards: keep the num_beams best partial sequences by sum of logprobs;
    the result ranks the final beams by sum / n**alpha."""
    beams = [(0.0, [])]
    with torch.no_grad():
        for _ in range(n):
            cands = []
            for score, toks in beams:
                logp = torch.log_softmax(model(torch.tensor([ids + toks]))[0, -1].float(), -1)
                vals, idx = logp.topk(2 * num_beams)
                cands += [(score + v, toks + [i]) for v, i in zip(vals.tolist(), idx.tolist())]
            beams = sorted(cands, key=lambda c: -c[0])[:num_beams]
    best = max(beams, key=lambda b: b[0] / n ** alpha)
    return best[1], best[0] / n ** alpha


@pytest.mark.parametrize("num_beams,alpha", [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_beam_search_matches_reference(model, tok, num_beams, alpha):
    """Beams share their prefix blocks (fork) and copy a shared partial block before writing (block_size 4
    makes that happen often); the result equals a cache-free beam search."""
    ids = tok.encode(PROMPTS[4])
    eng = Engine(model, tok, max_batch=8, block_size=4)
    r = eng.generate([ids, ids[:5]], max_new_tokens=7, stop_token_ids=[], num_beams=num_beams,
                     length_penalty=alpha)
    for res, p in zip(r, [ids, ids[:5]]):
        want, score = beam_reference(model, p, num_beams, 7, alpha)
        assert res.token_ids == want
        if num_beams > 1:
            assert math.isclose(res.score, score, rel_tol=1e-4, abs_tol=1e-4)
    if num_beams == 1:
        assert r[0].token_ids == greedy_reference(model, ids, 7)
    eng.cache.check_invariants()
    assert eng.cache.num_free_blocks == eng.cache.num_blocks


def test_non_finite_logits_end_only_their_request(model, tok, monkeypatch):
    """A request whose logits come out NaN (a model fault on its row) finishes with "error"; the batch's other
    request is not disturbed and gets exactly its solo tokens."""
    want = alone(model, tok, PROMPTS[2], max_new_tokens=8, stop_token_ids=[]).token_ids
    eng = Engine(model, tok, max_batch=8)
    victim, other = (eng.add_request(p, max_new_tokens=8, stop_token_ids=[]) for p in PROMPTS[:3:2])
    real, steps = model.forward_step, []

    def poisoned(step, kv):
        logits = real(step, kv)
        steps.append(1)
        if len(steps) == 3:   # a decode step: row 0 is the first running request's
            logits[0] = float("nan")
        return logits

    monkeypatch.setattr(model, "forward_step", poisoned)
    while eng.has_work():
        eng.step()
    assert victim.result.finish_reason == "error" and victim.result.text == ""
    assert other.result.finish_reason == "length" and other.result.token_ids == want
    assert eng.cache.num_free_blocks == eng.cache.num_blocks


def test_bad_requests(model, tok):
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.add_request("x", max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request("x", max_new_tokens=1000)
    with pytest.raises(ValueError, match="at least one token"):
        eng.add_request("")


def test_tritium_generate_runs_the_engine(model, tok):
    """tritium.generate (reached from `import tritium`) is the engine's generate: same greedy tokens."""
    import tritium

    ours = tritium.generate(model, tok, [PROMPTS[0]], max_new_tokens=6, stop_token_ids=[])[0]
    assert ours.token_ids == alone(model, tok, PROMPTS[0], max_new_tokens=6, stop_token_ids=[]).token_ids
    assert len(ours.token_ids) == 6
