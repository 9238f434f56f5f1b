"""Prefix caching in the paged KV cache (keys per full block, reference counts, LRU eviction of freed cached
blocks) and in the Engine (a prompt starting with a cached prefix computes only the rest, with the same tokens as
without the cache), and Engine.abort."""
import pytest
import torch

from tests.inference.test_engine import CFG, model, tok  # noqa: F401  (the tiny model and byte tokenizer)
from tritium.inference import CacheFullError, PagedKVCache
from tritium.inference.engine import Engine

BS = 4


def cache(num_blocks=16, caching=True):
    return PagedKVCache(num_layers=1, num_blocks=num_blocks, block_size=BS, num_kv_heads=1, head_dim=2,
                        prefix_caching=caching)


def run(c, sid, tokens):
    """A sequence of tokens as the engine runs one: allocated on its cached prefix, then published."""
    n, slots = c.allocate_cached(sid, tokens)
    assert slots.numel() == len(tokens) - n
    c.publish(sid, tokens)
    c.check_invariants()
    return n


def test_shared_prefix_is_found_and_shared():
    c = cache()
    a = list(range(10))                      # blocks [0..3], [4..7], and 2 tokens
    assert run(c, "a", a) == 0
    assert run(c, "b", a[:8] + [99, 98, 97]) == 8          # both full blocks
    assert c.blocks_of("b")[:2] == c.blocks_of("a")[:2]
    assert c.allocator.refcount[c.blocks_of("a")[0]] == 2
    # at least one token is always computed: a prompt of exactly the cached blocks reuses all but the last one
    assert run(c, "c", a[:8]) == 4
    assert c.prefix_stats == {"queried_tokens": 29, "hit_tokens": 12, "evictions": 0}


def test_changed_token_misses_from_its_block_only():
    c = cache()
    a = list(range(17))
    run(c, "a", a)
    for pos in range(16):
        b = list(a)
        b[pos] = 1000 + pos
        assert run(c, ("b", pos), b) == pos // BS * BS, pos
        c.free(("b", pos))
    c.check_invariants()


def test_freed_cached_blocks_stay_until_evicted_least_recent_first():
    c = cache(num_blocks=6)
    run(c, "a", list(range(9)))              # 3 blocks, 2 of them full (cached)
    run(c, "b", list(range(100, 109)))
    assert c.num_free_blocks == 0
    c.free("a")
    c.free("b")
    assert c.num_free_blocks == 6 and c.allocator.num_evictable == 4
    c.check_invariants()
    assert run(c, "a2", list(range(9))) == 8  # still there after their sequence ended
    c.free("a2")                              # a's blocks are now the most recently freed
    c.allocate("x", 4 * BS)                   # 2 never-cached + 2 evicted: b's (the least recently freed)
    assert c.prefix_stats["evictions"] == 2
    c.check_invariants()
    c.free("x")
    assert run(c, "b2", list(range(100, 109))) == 0
    c.free("b2")
    assert run(c, "a3", list(range(9))) == 8
    c.check_invariants()


def test_taking_idle_cached_blocks_never_evicts_them_and_full_raises_unchanged():
    c = cache(num_blocks=3)
    run(c, "a", list(range(9)))
    c.free("a")                               # 2 idle cached blocks + 1 free block
    assert c.blocks_needed_cached(list(range(9)) + [5, 5, 5]) == 3
    assert run(c, "b", list(range(9)) + [5, 5, 5]) == 8   # takes the 2 cached, allocates 1 fresh
    c.check_invariants()
    with pytest.raises(CacheFullError):
        c.allocate_cached("c", list(range(50, 60)))
    assert "c" not in c
    c.check_invariants()


def test_off_means_no_sharing():
    c = cache(caching=False)
    assert run(c, "a", list(range(9))) == 0 and run(c, "b", list(range(9))) == 0
    assert c.allocator.num_evictable == 0 and c.prefix_stats["queried_tokens"] == 0


def test_fork_keeps_the_keys_and_copy_on_write_skips_full_blocks():
    c = cache()
    run(c, "a", list(range(6)))
    c.fork("a", "b")
    c.append(["a", "b"], 3)                   # a shared partial block is copied before each writes
    c.publish("a", list(range(6)) + [7, 7, 7])
    c.publish("b", list(range(6)) + [8, 8, 8])
    c.check_invariants()
    assert run(c, "x", list(range(6)) + [8, 8, 8, 1]) == 8


PROMPTS = ["the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over a sleeping cat",
           "the quick brown", "hello there"]


def _generate(model, tok, caching, **kw):  # noqa: F811
    eng = Engine(model, tok, max_batch=8, block_size=BS, prefix_caching=caching, **kw)
    out = []
    for p in PROMPTS:   # one at a time: each later prompt finds the earlier ones' blocks
        out.append(eng.generate([p], max_new_tokens=8, stop_token_ids=[])[0].token_ids)
    both = eng.generate(PROMPTS, max_new_tokens=8, stop_token_ids=[])   # all again, together
    eng.cache.check_invariants()
    assert eng.cache.sequences() == []
    return out, [r.token_ids for r in both], eng


def test_engine_tokens_equal_without_cache(model, tok):  # noqa: F811
    want, want_both, off = _generate(model, tok, False)
    got, got_both, on = _generate(model, tok, True)
    assert got == want and got_both == want_both
    assert off.stats["prefix_hit_tokens"] == 0 and on.stats["prefix_hit_tokens"] > 0
    assert on.stats["prefill_tokens"] < off.stats["prefill_tokens"]


def test_engine_cache_pressure_evicts_and_stays_right(model, tok):  # noqa: F811
    """Just enough blocks for the batch: cached blocks are evicted as needed, results unchanged."""
    want, want_both, _ = _generate(model, tok, False)
    got, got_both, eng = _generate(model, tok, True, num_blocks=30)
    assert got == want and got_both == want_both
    assert eng.cache.prefix_stats["evictions"] > 0 and eng.stats["prefix_hit_tokens"] > 0


def test_abort_frees_blocks(model, tok):  # noqa: F811
    eng = Engine(model, tok, max_batch=4, block_size=BS)
    reqs = [eng.add_request(p, max_new_tokens=20, stop_token_ids=[]) for p in PROMPTS]
    eng.step()
    eng.step()
    eng.abort(reqs[0])                        # running
    assert reqs[0].done and reqs[0].result.finish_reason == "abort" and len(reqs[0].result.token_ids) == 2
    late = eng.add_request("waiting one", max_new_tokens=5)
    eng.abort(late)                           # still waiting
    assert late.result.finish_reason == "abort" and late not in eng.waiting
    eng.abort(reqs[0])                        # no-op when done
    while eng.has_work():
        eng.step()
    eng.cache.check_invariants()
    assert eng.cache.sequences() == [] and eng.cache.num_free_blocks == eng.cache.num_blocks
    assert [r.result.finish_reason for r in reqs[1:]] == ["length"] * 3


def test_top_logprobs(model, tok):  # noqa: F811
    eng = Engine(model, tok, max_batch=4)
    r = eng.generate(["hello"], max_new_tokens=5, stop_token_ids=[], top_logprobs=3)[0]
    assert len(r.top_logprobs) == 5
    for t, (lp, top) in zip(r.token_ids, r.top_logprobs):
        assert top[0][0] == t and lp == pytest.approx(top[0][1]) and len(top) == 3
        assert [x[1] for x in top] == sorted([x[1] for x in top], reverse=True)
        assert lp == pytest.approx(r.logprobs[r.token_ids.index(t)], abs=1e-4)
    assert eng.generate(["hello"], max_new_tokens=2)[0].top_logprobs == []
    with pytest.raises(ValueError, match="top_logprobs"):
        eng.add_request("x", top_logprobs=-1)
    torch.manual_seed(0)


def test_request_ending_on_its_first_token_leaves_its_prompt_cached(model, tok):  # noqa: F811
    """Blocks are published before sampling: a request finished (and freed) in its prefill step still caches
    its prompt for the next one, whose tokens equal those without the cache."""
    eng = Engine(model, tok, max_batch=4, block_size=BS)
    p = PROMPTS[0]
    eng.generate([p], max_new_tokens=1, stop_token_ids=[])
    got = eng.generate([p], max_new_tokens=6, stop_token_ids=[])[0].token_ids
    n = len(tok.encode(p))
    assert eng.stats["prefix_hit_tokens"] == (n - 1) // BS * BS > 0
    off = Engine(model, tok, max_batch=4, block_size=BS, prefix_caching=False)
    assert got == off.generate([p], max_new_tokens=6, stop_token_ids=[])[0].token_ids
    eng.cache.check_invariants()


def test_prompts_queued_together_wait_for_a_shared_prefix_being_computed(model, tok):  # noqa: F811
    """Prompts sharing a prefix that is not cached yet: the first computes it, the others are admitted the next
    step and take it from the cache (same tokens as without the cache)."""
    shared = "a long shared system prompt, " * 2
    prompts = [shared + q for q in ("first?", "second one?", "third")]
    eng = Engine(model, tok, max_batch=4, block_size=BS)
    got = [r.token_ids for r in eng.generate(prompts, max_new_tokens=4, stop_token_ids=[])]
    hit = len(tok.encode(shared)) // BS * BS
    assert eng.stats["prefix_hit_tokens"] >= 2 * hit > 0
    off = Engine(model, tok, max_batch=4, block_size=BS, prefix_caching=False)
    assert got == [r.token_ids for r in off.generate(prompts, max_new_tokens=4, stop_token_ids=[])]
    eng.cache.check_invariants()
