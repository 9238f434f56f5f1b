"""Engine cases whose output is known in advance: beam search with a reachable end-of-sequence token on a
bigram model whose probabilities are written down (the result worked out by hand), stop strings and streaming
of multi-byte UTF-8 on a scripted model, and preemption of the newest request on a random tiny model
(identical output to an unpreempted run, seeded sampling included).

The scripted and bigram models stand in for tritium.models.llama.Llama: ``forward_step`` returns, for each row
the engine asks about (each decode token and each prefill's last token), logits that depend only on that row's
token and position, so the engine's scheduling, cache and stop logic run unchanged around them."""
import math
from types import SimpleNamespace

import pytest
import torch

from tritium.inference.engine import Engine
from tritium.models import LlamaConfig, build
from tritium.models.tokenizer import Tokenizer

from ..util import byte_tokens

EOS = 2  # the byte tokenizer's <|im_end|>, its stop id


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer: token 3 + b is byte b; 0..2 are specials (2, <|im_end|>, is the stop id)."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_tokens()
    return Tokenizer.from_gguf_metadata({
        "ggml.model": "gpt2", "ggml.pre": "smollm", "ggml.tokens": tokens, "ggml.merges": [],
        "ggml.token_type": [3] * 3 + [1] * 256, "ggml.bos_token_id": 1, "ggml.eos_token_id": EOS,
        "ggml.add_bos_token": False})


V = 259


def byte_ids(text: str):
    return [3 + b for b in text.encode("utf-8")]


class RowModel:
    """Llama.forward_step's interface; the logits of a row are next_logits(token, position)."""

    def __init__(self, next_logits, max_seq_len=256):
        self.next_logits = next_logits
        self.config = SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=2, max_seq_len=max_seq_len)
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.is_packed = True   # nothing to pack for serving

    def forward_step(self, step, pools):
        tokens, positions = step.tokens.tolist(), step.positions.tolist()
        rows = list(range(step.n_decode))
        end = step.n_decode
        for n in step.prefill_lens:
            end += n
            rows.append(end - 1)
        return torch.stack([self.next_logits(tokens[r], positions[r]) for r in rows])


def scripted(prompt_len, script):
    """A model that emits the token ids of `script` one by one after a prompt of prompt_len tokens."""
    def next_logits(token, position):
        z = torch.zeros(V)
        z[script[position + 1 - prompt_len]] = 30.0
        return z
    return RowModel(next_logits)


# ---- streaming of multi-byte UTF-8 ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["aé🙂 b日本", "🙂🙂", "€x\u00a0ç"])
def test_streaming_splits_no_character(tok, text):
    """One byte per token, so every multi-byte character arrives over several tokens: each streamed piece is
    whole characters (no replacement character), exactly one piece per character here, and the pieces
    concatenate to the final text."""
    ids = byte_ids(text)
    prompt = byte_ids("> ")
    pieces = []
    eng = Engine(scripted(len(prompt), ids), tok, max_batch=2, block_size=4)
    r = eng.generate([prompt], max_new_tokens=len(ids), stop_token_ids=[],
                     on_token=lambda req, t, s: pieces.append(s))[0]
    assert r.token_ids == ids and r.text == text and r.finish_reason == "length"
    assert pieces == list(text)


# ---- stop strings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,stop", [
    ("two worlds: the world", "world"),       # the first occurrence (inside "worlds") stops it
    ("one wo two wor three world", "world"),  # false starts "wo", "wor" are held back, then released
    ("price: 5€ or 6€!", "€!"),               # a stop string ending in a multi-byte character
    ("naïve\n\nend", "\n\n"),
])
def test_stop_string_cuts_text_and_streaming(tok, text, stop):
    ids = byte_ids(text)
    k = text.find(stop)
    done = len(text[:k + len(stop)].encode("utf-8"))   # tokens up to the one completing the stop string
    prompt = byte_ids("> ")
    pieces = []
    eng = Engine(scripted(len(prompt), ids + byte_ids("tail")), tok, max_batch=2, block_size=4)
    r = eng.generate([prompt], max_new_tokens=len(ids) + 4, stop_token_ids=[], stop=[stop],
                     on_token=lambda req, t, s: pieces.append(s))[0]
    assert r.finish_reason == "stop"
    assert r.text == text[:k]
    assert r.token_ids == ids[:done]
    assert "".join(pieces) == r.text
    assert all(stop not in p and "\ufffd" not in p for p in pieces)


# ---- beam search with a reachable end-of-sequence token ---------------------------------------------------
P, A, B, C, D, F = (3 + ord(ch) for ch in "pabcdf")
# next-token probabilities after each token (the rest of a row's mass spread evenly over the other tokens)
BIGRAM = {P: {A: .5, B: .4}, A: {C: .6, D: .3}, B: {EOS: .9}, C: {EOS: .5, F: .4}, D: {EOS: .2, F: .7}}


def bigram_logits(token, position):
    named = BIGRAM.get(token, {})
    rest = (1 - sum(named.values())) / (V - len(named))
    p = torch.full((V,), rest, dtype=torch.float64)
    for t, q in named.items():
        p[t] = q
    return p.log().float()


@pytest.mark.parametrize("alpha,want", [(1.0, [B, EOS]), (0.0, [B, EOS]), (2.0, [A, C, EOS])])
def test_beam_search_with_reachable_eos(tok, alpha, want):
    """Two beams, three new tokens at most. Step 1 keeps a (.5) and b (.4). Step 2: b -> EOS (log .4 + log .9
    = -1.02) finishes, a c (-1.20) and a d (-1.90) continue. Step 3: a c EOS (-1.90) finishes, a c f (-2.12)
    and a d f (-2.25) continue. Scores sum / t**alpha: at alpha 1, b EOS -0.51 beats a c EOS -0.63, a c f
    -0.71, a d f -0.75; at alpha 0 (sums) b EOS still wins; at alpha 2, a c EOS (-0.211) beats b EOS
    (-0.255), a c f (-0.236) and a d f (-0.250). Greedy decoding would give a c EOS at every alpha."""
    eng = Engine(RowModel(bigram_logits), tok, max_batch=4, block_size=2)
    r = eng.generate([[P]], max_new_tokens=3, num_beams=2, length_penalty=alpha)[0]
    probs = {(P, A): .5, (P, B): .4, (A, C): .6, (B, EOS): .9, (C, EOS): .5}
    lps = [math.log(probs[pair]) for pair in zip([P] + want, want)]
    assert r.token_ids == want and r.finish_reason == "stop"
    assert r.text == tok.decode(want[:-1]) + tok.decode([EOS])
    assert r.logprobs == pytest.approx(lps, abs=1e-5)
    assert r.score == pytest.approx(sum(lps) / len(want) ** alpha, abs=1e-5)
    assert eng.cache.num_free_blocks == eng.cache.num_blocks
    greedy = Engine(RowModel(bigram_logits), tok).generate([[P]], max_new_tokens=3)[0]
    assert greedy.token_ids == [A, C, EOS]


# ---- preemption ------------------------------------------------------------------------------------------
CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, vocab_size=V,
                  max_seq_len=128, tie_embeddings=False)


def test_newest_request_is_preempted_and_recomputed_identically(tok):
    """Three requests (one greedy, two seeded samples) in a cache too small for all of them to grow: the most
    recently admitted running request is the one preempted, and every output (tokens, logprobs, streamed
    pieces) equals the run with a cache big enough for all."""
    model = build(CFG).init_random(std=0.3, generator=torch.Generator().manual_seed(3))
    prompts = ["first prompt", "second", "the third prompt here"]
    kws = [dict(), dict(temperature=1.0, top_p=0.9, seed=5), dict(temperature=0.8, seed=11)]

    def run(num_blocks):
        eng = Engine(model, tok, max_batch=4, num_blocks=num_blocks, block_size=4)
        victims = []
        preempt = eng._preempt

        def spy(victim):
            victims.append((victim, list(eng.running)))
            preempt(victim)

        eng._preempt = spy
        pieces = [[] for _ in prompts]
        reqs = [eng.add_request(p, max_new_tokens=20, stop_token_ids=[], **kw,
                                on_token=lambda req, t, s, i=i: pieces[i].append(s)) for i, (p, kw)
                in enumerate(zip(prompts, kws))]
        while eng.has_work():
            eng.step()
        assert eng.cache.num_free_blocks == eng.cache.num_blocks
        return [r.result for r in reqs], pieces, victims, eng.stats["preemptions"]

    want, want_pieces, _, n = run(None)
    assert n == 0
    got, got_pieces, victims, n = run(14)
    assert n > 0
    for victim, running in victims:
        assert victim is running[-1]   # the most recently admitted of the running requests
    for g, w, gp in zip(got, want, got_pieces):
        assert g.finish_reason == "length" and g.token_ids == w.token_ids and g.text == w.text
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert "".join(gp) == g.text
    assert got_pieces == want_pieces
