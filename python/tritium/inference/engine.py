"""The serving engine: continuous batching over the paged KV cache, sampling, stop conditions, beam search.

Each ``step()``:
  1. schedule: every running sequence decodes one token; waiting requests are admitted (prefilled) while the
     cache has blocks for them and the step's prefill token budget lasts. A running sequence that cannot get a
     block preempts the most recently admitted request, whose blocks are freed; it waits at the head of the
     queue and is later recomputed (its prompt and generated tokens prefilled again), so others never fail.
  2. one model call (``Llama.forward_step``) over the packed tokens of decodes and prefills together;
  3. sampling (tritium.sample: one fused call, each row with its own SamplingParams and seed), stop tokens /
     strings / max tokens, streaming callbacks with the new text.

Prefix caching (on by default; ``prefix_caching=False`` turns it off): a prompt whose first blocks' tokens a
finished or running sequence already computed takes those blocks from the cache (tritium.inference.cache) and only
the rest is computed: prefilled as one chunk at positions [cached, len) whose queries attend to the cached
tokens' K/V, read from the pools, and to the chunk's own, causally (``StepInput.prefill_slots``). A waiting
prompt whose next uncached block a prefill of the same step computes waits for the next step, which takes that
block from the cache (prompts sharing a system prompt arriving together compute it once).

``abort(request)`` ends a request at once (a client went away): its blocks are free for the next step.

Beam search (``num_beams > 1``) keeps num_beams sequences per request that share their common prefix's
blocks (``fork``); a beam writing into a shared, partially filled block first copies it (copy-on-write).
Hypotheses are ranked by sum(logprobs) / t**length_penalty (t = generated tokens).
"""
from __future__ import annotations

import collections
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..models.llama import StepInput
from .cache import CacheFullError, PagedKVCache
from ..ops._library import kernel_ok
from ..ops.sampling import params_table, sample_op
from .sampling import SamplingParams, sample


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str               # "stop" (stop token/string), "length" (max tokens), "error", "abort"
    prompt_token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    score: Optional[float] = None    # beam search: sum(logprobs) / t**length_penalty
    # with top_logprobs (add_request): per generated token, the model's log-probability of it and its
    # top_logprobs most likely tokens [(token, logprob), ...] (log_softmax of the logits, before any sampling
    # transformation)
    top_logprobs: List[tuple] = field(default_factory=list)


_seq_keys = itertools.count()


class _Seq:
    """One sequence: its tokens (all but the last sampled one have K/V in the cache while it runs) and its
    key in the PagedKVCache (in_cache: whether the cache holds it; cached: how many of its tokens' K/V the prefix
    cache gave it when it was admitted)."""
    __slots__ = ("tokens", "key", "in_cache", "logprobs", "n_prompt", "cached", "top")

    def __init__(self, tokens: List[int], n_prompt: int):
        self.tokens = tokens
        self.key = next(_seq_keys)
        self.in_cache = False
        self.logprobs: List[float] = []
        self.n_prompt = n_prompt
        self.cached = 0
        self.top: List[tuple] = []

    @property
    def generated(self) -> List[int]:
        return self.tokens[self.n_prompt:]


_ids = itertools.count()


class Request:
    """A generation request; created by Engine.add_request."""

    def __init__(self, prompt_ids: List[int], params: SamplingParams, max_new_tokens: int, stop: Sequence[str],
                 stop_token_ids: Sequence[int], on_token: Optional[Callable], num_beams: int,
                 length_penalty: float, top_logprobs: Optional[int] = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.stop_token_ids = set(stop_token_ids)
        self.on_token = on_token
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.top_logprobs = top_logprobs
        self.seqs: List[_Seq] = [_Seq(list(prompt_ids), len(prompt_ids))]
        self.finished_beams: List[tuple] = []   # (score, tokens, logprobs)
        self.emitted = 0                        # characters of text already streamed
        self.result: Optional[GenerationResult] = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def reset(self) -> None:
        """Back to the prompt (beam requests are recomputed from scratch after preemption)."""
        self.seqs = [_Seq(list(self.prompt_ids), len(self.prompt_ids))]
        self.finished_beams = []


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------
class Engine:
    """Continuous batching over a paged KV cache for a tritium.models.llama.Llama.

    max_batch: most sequences decoding in one step; num_blocks x block_size: cache capacity in tokens
    (default: max_batch sequences of min(max_seq_len, 1024) tokens, at most 16384 tokens in all);
    max_prefill_tokens: prompt tokens prefilled in one step (more waiting prompts wait for the next step; a
    longer prompt is prefilled alone; tokens the prefix cache holds do not count). prefix_caching: reuse the
    cached blocks of a prompt's longest already computed prefix (see the module's docstring). stats: tokens and
    seconds spent in prefill and decode (a mixed step's time is split in proportion to its tokens), steps,
    preemptions, prompt tokens taken from the prefix cache (prefix_hit_tokens).
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 32, num_blocks: Optional[int] = None,
                 block_size: int = 16, max_prefill_tokens: int = 2048, prefix_caching: bool = True):
        c = model.config
        self.model, self.tokenizer = model, tokenizer
        if not model.is_packed:   # the serving path's weights, packed once (Llama.pack_for_inference)
            model.pack_for_inference()
        self.max_batch, self.block_size, self.max_prefill_tokens = max_batch, block_size, max_prefill_tokens
        if num_blocks is None:  # room for max_batch sequences of up to 1024 tokens, at most 16384 tokens
            num_blocks = math.ceil(min(max_batch * min(c.max_seq_len, 1024), 16384) / block_size)
        self.cache = PagedKVCache(c.n_layers, num_blocks, block_size, c.n_kv_heads, c.head_dim, model.dtype,
                                  model.device, prefix_caching=prefix_caching)
        self.pools = list(zip(self.cache.k_pools, self.cache.v_pools))
        self._greedy_args: Dict[tuple, tuple] = {}   # _greedy's uniform and params tensors per logits shape
        self.waiting: Deque[Request] = collections.deque()
        self.running: List[Request] = []
        self.stats = dict(prefill_tokens=0, prefill_time=0.0, decode_tokens=0, decode_time=0.0, steps=0,
                          preemptions=0, prefix_hit_tokens=0)

    # ---- requests ----
    def add_request(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64,
                    params: Optional[SamplingParams] = None, stop: Sequence[str] = (),
                    stop_token_ids: Optional[Sequence[int]] = None, on_token: Optional[Callable] = None,
                    num_beams: int = 1, length_penalty: float = 1.0, top_logprobs: Optional[int] = None,
                    **sampling) -> Request:
        """Queue a request. sampling: SamplingParams fields (temperature=0.0 is greedy) unless params given.
        stop_token_ids None: the tokenizer's (EOS and end-of-turn); on_token(request, token_id, new_text).
        top_logprobs k >= 0: the result's top_logprobs records each token's model log-probability and the k most
        likely tokens (num_beams 1 only)."""
        if params is None:
            params = SamplingParams(**{"temperature": 0.0, **sampling})
        elif sampling:
            raise TypeError("pass either params or sampling keyword arguments, not both")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs the engine's tokenizer")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt must have at least one token")
        if len(ids) + max_new_tokens > self.model.config.max_seq_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's max_seq_len {self.model.config.max_seq_len}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if top_logprobs is not None and (top_logprobs < 0 or num_beams > 1):
            raise ValueError(f"top_logprobs must be None or >= 0 with num_beams 1, got {top_logprobs} with "
                             f"num_beams {num_beams}")
        if stop_token_ids is None:
            stop_token_ids = self.tokenizer.stop_ids if self.tokenizer is not None else ()
        if isinstance(stop, str):
            stop = [stop]
        req = Request(ids, params, max_new_tokens, stop, stop_token_ids, on_token, num_beams, length_penalty,
                      top_logprobs)
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, prompts, **kwargs) -> List[GenerationResult]:
        reqs = [self.add_request(p, **kwargs) for p in prompts]
        while not all(r.done for r in reqs):
            self.step()
        return [r.result for r in reqs]

    def abort(self, req: Request) -> None:
        """End req now, wherever it is (waiting or running): its blocks go back to the cache at once, so the next
        step can use them; req.result gets finish_reason "abort" and the tokens generated so far. No-op when
        req is done."""
        if req.done:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._free(req)
        if req in self.running:
            self.running.remove(req)
        s = req.seqs[0]
        req.result = GenerationResult("", list(s.generated), "abort", list(req.prompt_ids), list(s.logprobs),
                                      top_logprobs=list(s.top))

    # ---- scheduling ----
    def _free(self, req: Request) -> None:
        for s in req.seqs:
            if s.in_cache:
                self.cache.free(s.key)
                s.in_cache = False

    def _preempt(self, victim: Request) -> None:
        self._free(victim)
        if victim.num_beams > 1:
            victim.reset()
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self.stats["preemptions"] += 1

    def _schedule(self):
        """(decode seqs, their slots (int64 tensor)), prefill seqs with their slots."""
        # every running sequence gets one more slot; if the cache cannot give them all, the most recently
        # admitted request is preempted (freed, re-queued first, recomputed later) until it can
        while self.running:
            keys = [s.key for r in self.running for s in r.seqs]
            if self.cache.can_append(keys, 1):
                break
            if len(self.running) == 1:
                self._finish(self.running[0], "error", "")
                break
            self._preempt(self.running[-1])
        decode = [(r, s) for r in self.running for s in r.seqs]
        dec_slots = self.cache.append([s.key for _, s in decode], 1) if decode else None
        prefill = []
        budget = self.max_prefill_tokens
        n_seqs = len(decode)
        computing = set()   # prefix keys of the full blocks this step's prefills compute (published after it)
        while self.waiting:
            req = self.waiting[0]
            if sum(self.cache.blocks_needed(None, len(s.tokens) + 1) for s in req.seqs) > self.cache.num_blocks:
                self.waiting.popleft()
                self._finish(req, "error", "")
                continue
            # what the prefix cache does not hold is what this step computes and the free blocks it takes
            hits = [len(self.cache.match_prefix(s.tokens)[0]) for s in req.seqs]
            n = sum(len(s.tokens) - h * self.block_size for s, h in zip(req.seqs, hits))
            keys = [self.cache.block_keys(s.tokens) for s in req.seqs]
            if any(h < len(k) and k[h] in computing for h, k in zip(hits, keys)):
                break   # its next uncached block is being computed now: next step takes it from the cache
            need = sum(self.cache.blocks_needed_cached(s.tokens, 1) for s in req.seqs)
            width = max(len(req.seqs), req.num_beams)
            if n_seqs + width > self.max_batch or need > self.cache.num_free_blocks or \
                    (n > budget and (prefill or decode)):
                break
            admitted = []
            try:
                for s in req.seqs:
                    s.cached, slots = self.cache.allocate_cached(s.key, s.tokens)
                    s.in_cache = True
                    admitted.append((req, s, slots))
            except CacheFullError:   # sequences of one request matching the same idle cached blocks: wait
                self._free(req)
                break
            self.waiting.popleft()
            for (_, s, _), k in zip(admitted, keys):
                computing.update(k[s.cached // self.block_size:])
            prefill += admitted
            self.running.append(req)
            n_seqs += width
            budget -= n
        return decode, dec_slots, prefill

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> None:
        if not self.has_work():
            return
        decode, dec_slots, prefill = self._schedule()
        if not decode and not prefill:
            return
        t0 = time.perf_counter()
        # decode rows first, then each prompt's uncached rest as one chunk: from position 0, or continuing from the
        # tokens the prefix cache gave it (the chunk attends to their K/V in the pools: StepInput.prefill_slots)
        tokens = [s.tokens[-1] for _, s in decode]
        positions = [len(s.tokens) - 1 for _, s in decode]
        slots = [dec_slots] if decode else []
        lens, ctx = [], []
        for _, s, sl in prefill:
            n = len(s.tokens)
            tokens.extend(s.tokens[s.cached:])
            positions.extend(range(s.cached, n))
            slots.append(sl)
            lens.append(n - s.cached)
            ctx.append(self.cache.slots(s.key, n) if s.cached else None)
        dev = self.model.device
        bt = sl = None
        if decode:
            bt = self.cache.block_tables([s.key for _, s in decode])
            sl = torch.tensor(positions[:len(decode)], dtype=torch.int32, device=dev) + 1
        step = StepInput(
            tokens=torch.tensor(tokens, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.cat(slots) if len(slots) > 1 else slots[0],
            n_decode=len(decode), block_tables=bt, seq_lens=sl, prefill_lens=lens,
            prefill_slots=ctx if any(c is not None for c in ctx) else [],
            last_logits_only=True)   # logits of the decode rows and each prefill's last token
        logits = self.model.forward_step(step, self.pools)
        ran = decode + [(r, s) for r, s, _ in prefill]
        # their new K/V are written: full blocks become reusable prefixes (before sampling, which may finish a
        # request and free its blocks: a request that ends on its first token still leaves its prompt cached)
        for _, s in ran:
            self.cache.publish(s.key, s.tokens)
        self._process(logits, ran)
        dt = time.perf_counter() - t0   # model, sampling and stop checks
        n_prefill = sum(lens)
        self.stats["prefix_hit_tokens"] += sum(s.cached for _, s, _ in prefill)
        # attribute the step's time to prefill and decode in proportion to their tokens
        self.stats["prefill_tokens"] += n_prefill
        self.stats["decode_tokens"] += len(decode)
        self.stats["prefill_time"] += dt * n_prefill / len(tokens)
        self.stats["decode_time"] += dt * len(decode) / len(tokens)
        self.stats["steps"] += 1

    # ---- after the model call ----
    def _process(self, logits: Tensor, rows: List[tuple]) -> None:
        by_req: Dict[int, List[int]] = collections.defaultdict(list)
        reqs: Dict[int, Request] = {}
        for i, (r, _) in enumerate(rows):
            by_req[r.id].append(i)
            reqs[r.id] = r
        greedy = [i for i, (r, _) in enumerate(rows) if r.num_beams == 1 and _is_greedy(r.params)]
        picked = {}   # row -> (token, logprob); token -1: the row's logits had no valid choice (NaN / inf)
        if greedy:    # argmax and its log-softmax in one pass per row (the fused sampler at temperature 0)
            lg = logits if len(greedy) == logits.shape[0] else \
                logits.index_select(0, torch.tensor(greedy, device=logits.device))
            toks, lps = self._greedy(lg)
            picked = dict(zip(greedy, zip(toks.tolist(), lps.tolist())))
        sampled = [i for i, (r, _) in enumerate(rows) if r.num_beams == 1 and i not in picked]
        if sampled:  # one fused call: per-row params, penalties over each row's generated tokens, seeds
            toks, lps = sample(logits.index_select(0, torch.tensor(sampled, device=logits.device)),
                               [rows[i][0].params for i in sampled], [rows[i][1].generated for i in sampled],
                               on_invalid="flag")
            picked.update(zip(sampled, zip(toks.tolist(), lps.tolist())))
        tops = {}   # row -> (logprob of its token, [(token, logprob)] of the top_logprobs most likely)
        want = [i for i, (r, _) in enumerate(rows) if r.top_logprobs is not None and i in picked]
        if want:
            lsm = torch.log_softmax(logits.index_select(0, torch.tensor(want, device=logits.device)).float(), -1)
            k = max(rows[i][0].top_logprobs for i in want)
            chosen = lsm.gather(1, torch.tensor([[max(picked[i][0], 0)] for i in want], device=lsm.device))
            tv, ti = lsm.topk(k, -1) if k else (lsm[:, :0], lsm[:, :0].long())
            for j, i in enumerate(want):
                kk = rows[i][0].top_logprobs
                tops[i] = (chosen[j, 0].item(), list(zip(ti[j, :kk].tolist(), tv[j, :kk].tolist())))
        for rid, idxs in by_req.items():
            r = reqs[rid]
            if r.done:
                continue
            if r.num_beams > 1:
                self._beam_step(r, logits[idxs].float(), [rows[i][1] for i in idxs])
                continue
            i = idxs[0]
            s = rows[i][1]
            t, lp = picked[i]
            if t < 0:   # this request's logits are not finite: it ends in error, the batch goes on
                self._finish(r, "error", "")
                continue
            s.tokens.append(t)
            s.logprobs.append(lp)
            if i in tops:
                s.top.append(tops[i])
            self._after_token(r, s, t)

    def _greedy(self, logits: Tensor) -> tuple:
        """(tokens, logprobs) of greedy rows: the sampler op with a cached temperature-0 table (the public
        sample() builds and validates one per call, which costs as much as the kernel at one row); sample()
        itself where the kernels do not take the logits (dtype, backend)."""
        if not kernel_ok(logits):
            return sample(logits, _GREEDY, on_invalid="flag")
        key = (logits.shape, logits.device)
        args = self._greedy_args.get(key)
        if args is None:
            b, v = logits.shape
            args = self._greedy_args[key] = (torch.zeros(b, device=logits.device),
                                             params_table([_GREEDY] * b, v, logits.device))
        return sample_op(logits if logits.stride(-1) == 1 else logits.contiguous(), *args, None, None, None)

    def _after_token(self, r: Request, s: _Seq, t: int) -> None:
        gen = s.generated
        text = self.tokenizer.decode(gen) if self.tokenizer is not None else ""
        if t in r.stop_token_ids:
            self._finish(r, "stop", self.tokenizer.decode(gen[:-1]) if self.tokenizer is not None else "")
            return
        for st in r.stop:
            k = text.find(st, max(0, r.emitted - len(st)))
            if k >= 0:
                self._finish(r, "stop", text[:k])
                return
        if len(gen) >= r.max_new_tokens:
            self._finish(r, "length", text)
            return
        if r.on_token is not None:
            # hold back an incomplete UTF-8 character and any tail that may begin a stop string
            safe = len(text.rstrip("\ufffd"))
            for st in r.stop:
                for n in range(min(len(st) - 1, safe), 0, -1):
                    if text[safe - n:safe] == st[:n]:
                        safe -= n
                        break
            if safe > r.emitted:
                r.on_token(r, t, text[r.emitted:safe])
                r.emitted = safe

    def _finish(self, r: Request, reason: str, text: str) -> None:
        if r.num_beams > 1 and reason != "error":
            return self._finish_beams(r)
        s = r.seqs[0]
        if reason == "error":
            text = ""
        if r.on_token is not None and len(text) > r.emitted:
            r.on_token(r, None, text[r.emitted:])
            r.emitted = len(text)
        r.result = GenerationResult(text if reason != "error" else "", list(s.generated), reason,
                                    list(r.prompt_ids), list(s.logprobs), top_logprobs=list(s.top))
        self._free(r)
        if r in self.running:
            self.running.remove(r)

    # ---- beam search ----
    def _beam_score(self, r: Request, logprob_sum: float, n: int) -> float:
        return logprob_sum / (max(n, 1) ** r.length_penalty)

    def _beam_candidates(self, r: Request, logits: Tensor, seqs: List[_Seq]) -> List[tuple]:
        """The 2 num_beams best continuations of r's beams, best first: (score, beam, token), a score being the
        beam's summed log-probabilities plus log_softmax(logits[beam])[token] (float32). TPEngine computes the
        same from its vocabulary slice."""
        logp = torch.log_softmax(logits, -1)                                        # (n_beams, vocab)
        base = torch.tensor([sum(s.logprobs) for s in seqs], dtype=logp.dtype)
        cand = (base[:, None] + logp).view(-1)
        top = cand.topk(min(2 * r.num_beams, cand.numel()))
        vocab = logp.shape[-1]
        return [(v, f // vocab, f % vocab) for v, f in zip(top.values.tolist(), top.indices.tolist())]

    def _beam_step(self, r: Request, logits: Tensor, seqs: List[_Seq]) -> None:
        k = r.num_beams
        new: List[_Seq] = []
        n_gen = len(seqs[0].generated) + 1
        for score, p, tok in self._beam_candidates(r, logits, seqs):
            parent = seqs[p]
            lp = score - sum(parent.logprobs)
            if tok in r.stop_token_ids:
                r.finished_beams.append((self._beam_score(r, score, n_gen), parent.generated + [tok],
                                         parent.logprobs + [lp]))
                continue
            child = _Seq(parent.tokens + [tok], parent.n_prompt)
            self.cache.fork(parent.key, child.key)   # shares the parent's blocks; copy-on-write on append
            child.in_cache = True
            child.logprobs = parent.logprobs + [lp]
            new.append(child)
            if len(new) == k:
                break
        for s in seqs:
            self.cache.free(s.key)
            s.in_cache = False
        r.seqs = new
        best_running = max((self._beam_score(r, sum(s.logprobs), n_gen) for s in new), default=-math.inf)
        finished = sorted(r.finished_beams, key=lambda b: -b[0])[:k]
        r.finished_beams = finished
        if n_gen >= r.max_new_tokens or not new or (len(finished) >= k and finished[-1][0] >= best_running):
            self._finish_beams(r)

    def _finish_beams(self, r: Request) -> None:
        hyps = list(r.finished_beams) + [(self._beam_score(r, sum(s.logprobs), len(s.generated)), s.generated,
                                          s.logprobs) for s in r.seqs]
        score, toks, lps = max(hyps, key=lambda b: b[0])
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
        reason = "stop" if toks and toks[-1] in r.stop_token_ids else "length"
        if r.on_token is not None and text:
            r.on_token(r, None, text)
        r.result = GenerationResult(text, list(toks), reason, list(r.prompt_ids), list(lps), score)
        self._free(r)
        if r in self.running:
            self.running.remove(r)


_GREEDY = SamplingParams(temperature=0.0)


def _is_greedy(p: SamplingParams) -> bool:
    return (p.temperature == 0.0 and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and not p.logit_bias)


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, max_batch: Optional[int] = None,
             **kwargs) -> List[GenerationResult]:
    """Run prompts (a string, or a list of strings / token-id lists) together; one GenerationResult each."""
    if isinstance(prompts, str):
        prompts = [prompts]
    nb = kwargs.get("num_beams", 1)
    lens = [len(tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    bs = 16
    blocks = sum(nb * (-(-(n + max_new_tokens) // bs) + 1) for n in lens)  # enough for all at once
    engine = Engine(model, tokenizer, max_batch=max_batch or max(1, len(prompts) * nb), num_blocks=blocks,
                    block_size=bs)
    return engine.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
