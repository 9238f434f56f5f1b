"""The OpenAI-compatible ASGI app (FastAPI): ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (streamed as server-sent events or not), ``GET /health``, ``GET /metrics``.

Each request is validated and tokenized here (a bad one is answered at once and never reaches the engine), then
becomes n engine requests (one per choice and prompt) handed to the engine's thread (tritium.serve.worker); their
text comes back through an asyncio queue as the engine's per-token callback produces it. A client that goes away
(a closed stream, or a dropped connection while a non-streaming answer is computed) has its engine requests
aborted: their KV blocks are free at the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .worker import EngineWorker, Submission


class ServerState:
    """What the routes share: the engine's worker, the tokenizer, the served name, the limits, the metrics."""

    def __init__(self, engine: Engine, model_name: str, api_key: Optional[str], max_queue: int):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.model_name, self.api_key = model_name, api_key
        self.max_seq_len = engine.model.config.max_seq_len
        self.vocab_size = engine.model.config.vocab_size
        self.limit = engine.max_batch + max_queue   # engine requests in flight before a 429
        self.metrics = Metrics()
        self.worker = EngineWorker(engine, self.metrics)
        self.created = int(time.time())


def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None, max_queue: int = 256,
               engine_thread: bool = True) -> FastAPI:
    """The app serving engine (its tokenizer gives the chat template and the stop tokens) under model_name.
    engine_thread: the engine gets a thread of its own, started with the app (lifespan) and stopped with it; False:
    the caller runs ``app.state.tritium.worker.run()`` on its own thread (the one that loaded the model: faster,
    tritium.serve.worker says why) and stop() ends it. api_key: the Bearer token every /v1 route requires.
    max_queue: engine requests that may wait beyond the engine's max_batch before new ones get 429."""
    if engine.tokenizer is None:
        raise ValueError("create_app: the engine needs a tokenizer")
    state = ServerState(engine, model_name, api_key, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="tritium", lifespan=lifespan)
    app.state.tritium = state

    # ---- errors, as OpenAI shapes them ----
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.http_errors.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            e2 = APIError(400, f"the request body is not valid JSON: {err.get('msg', '')}", code="invalid_json")
        else:
            where = ".".join(loc)
            got = err.get("input")
            shown = "" if err.get("type") == "missing" else f" (got {json.dumps(got, default=str)[:80]})"
            e2 = APIError(400, f"{where}: {err.get('msg', 'invalid')}{shown}" if where else err.get("msg", "invalid"),
                          param=loc[0] if loc else None,
                          code="missing_required_parameter" if err.get("type") == "missing" else "invalid_value")
        return await _api_error(request, e2)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return await _api_error(request, APIError(e.status_code, str(e.detail), code=None,
                                                  type="invalid_request_error" if e.status_code < 500 else
                                                  "server_error"))

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {state.api_key}":
            raise APIError(401, "Incorrect API key provided" if auth else
                           "Missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{state.model_name}`)",
                           param="model", code="model_not_found")

    # ---- routes ----
    @app.get("/health")
    async def health():
        if not state.worker.alive:
            return JSONResponse({"status": "error", "detail": state.worker.error or "the engine is not running"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        check_model(name)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_key(request)
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        prompts = _prompts(state, body.prompt)
        return await _respond(state, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_key(request)
        check_model(body.model)
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content if isinstance(m.content, str) else \
                "".join(p.text for p in m.content) if m.content is not None else ""
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        text = state.tokenizer.apply_chat_template(messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return await _respond(state, request, body, [state.tokenizer.encode(text)], chat=True)

    return app


# ---------------------------------------------------------------------------------------------------------
# Request -> engine requests
# ---------------------------------------------------------------------------------------------------------
def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "tritium"}


def _prompts(state: ServerState, prompt) -> List[List[int]]:
    """The completion endpoint's prompt (a string, a list of strings, token ids, lists of token ids) as token-id
    lists, each checked."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    out = []
    for p in items:
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {state.vocab_size})",
                           param="prompt", code="invalid_value")
        out.append(ids)
    return out


def _engine_kwargs(state: ServerState, body, chat: bool) -> tuple:
    """(max_tokens or None, engine keyword arguments except the seed, seed) of a request; bad values -> 400."""
    bias = None
    if body.logit_bias:
        bias = {}
        for k, v in body.logit_bias.items():
            try:
                t = int(k)
            except ValueError:
                t = -1
            if not 0 <= t < state.vocab_size:
                raise APIError(400, f"logit_bias: key {k!r} is not a token id in [0, {state.vocab_size})",
                               param="logit_bias", code="invalid_value")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias: the bias of {k} must be in [-100, 100], got {v}",
                               param="logit_bias", code="invalid_value")
            bias[t] = float(v)
    try:
        params = dict(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p,
                      repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                      frequency_penalty=body.frequency_penalty, logit_bias=bias)
        SamplingParams(**params).validate(state.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"stop takes at most 4 sequences, got {len(stop)}", param="stop", code="invalid_value")
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if chat:
        top = (body.top_logprobs or 0) if body.logprobs else None
    else:
        top = body.logprobs
    kw = dict(stop=stop, top_logprobs=top, **params)
    if body.ignore_eos:
        kw["stop_token_ids"] = []
    return max_tokens, kw, body.seed


async def _respond(state: ServerState, request: Request, body, prompts: List[List[int]], chat: bool):
    max_tokens, kwargs, seed = _engine_kwargs(state, body, chat)
    if max_tokens is None and not chat:
        max_tokens = 16   # OpenAI's default for the completions endpoint
    jobs = []   # (choice index, prompt ids, max new tokens, engine kwargs)
    for pi, ids in enumerate(prompts):
        room = state.max_seq_len - len(ids)
        mt = room if max_tokens is None else max_tokens
        if room < 1 or mt > room:
            raise APIError(400, f"This model's maximum context length is {state.max_seq_len} tokens. However, "
                           f"you requested {len(ids) + max(mt, 1)} tokens ({len(ids)} in the "
                           f"{'messages' if chat else 'prompt'}, {max(mt, 1)} in the completion). Please reduce "
                           f"the length of the {'messages' if chat else 'prompt'} or completion.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        for i in range(body.n):
            # choice i of a seeded request draws from seed + i: reproducible, and the choices differ
            kw = dict(kwargs, seed=None if seed is None else seed + i)
            jobs.append((pi * body.n + i, ids, mt, kw))
    if not state.worker.alive:
        raise APIError(503, "the engine is not running", type="server_error", code="engine_down")
    if not state.worker.try_reserve(len(jobs), state.limit):
        raise APIError(429, f"the server's queue is full ({state.limit} requests in flight); retry later",
                       type="requests", code="rate_limit_exceeded")
    run = _Run(state, jobs)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, run, rid, body, prompts, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        results = await run.collect(request)
    finally:
        run.close()
    if results is None:   # the client went away; nobody reads an answer
        return Response(status_code=499)
    return JSONResponse(_final(state, rid, body, prompts, results, chat))


class _Run:
    """The engine requests of one HTTP request and the queue their events arrive on: (index, kind, payload)."""

    def __init__(self, state: ServerState, jobs: list):
        self.state = state
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.subs: Dict[int, Submission] = {}
        self.done: Dict[int, object] = {}
        for idx, ids, mt, kw in jobs:
            sub = Submission(ids, mt, kw, loop, lambda kind, payload, idx=idx: self.queue.put_nowait((idx, kind,
                                                                                                      payload)))
            self.subs[idx] = sub
            state.worker.submit(sub)
        self.closed = False

    async def events(self) -> AsyncIterator[tuple]:
        while len(self.done) < len(self.subs):
            idx, kind, payload = await self.queue.get()
            if kind in ("done", "error"):
                self.done[idx] = (kind, payload)
            yield idx, kind, payload

    async def collect(self, request: Request) -> Optional[Dict[int, object]]:
        """Every choice's result, or None when the client disconnects first."""
        async def drain():
            async for _ in self.events():
                pass

        async def disconnected():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        work = asyncio.ensure_future(drain())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()
            return None
        work.result()
        return self.done

    def close(self) -> None:
        """Abort what has not finished (the client left) and give back the queue places."""
        if self.closed:
            return
        self.closed = True
        for idx, sub in self.subs.items():
            if idx not in self.done:
                self.state.worker.abort(sub)
        self.state.worker.release(len(self.subs))


# ---------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------
def _finish_reason(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _visible(state: ServerState, result) -> tuple:
    """(token ids, top_logprobs entries) a client sees: without a final stop token."""
    toks, tops = list(result.token_ids), list(result.top_logprobs)
    if result.finish_reason == "stop" and toks and toks[-1] in state.tokenizer.stop_ids:
        toks, tops = toks[:-1], tops[:len(toks) - 1]
    return toks, tops[:len(toks)]


def _chat_logprobs(state: ServerState, toks: List[int], tops: list) -> dict:
    def entry(t, lp):
        text = state.tokenizer.token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(tt, tl) for tt, tl in top])
                        for t, (lp, top) in zip(toks, tops)], "refusal": None}


def _completion_logprobs(state: ServerState, toks: List[int], tops: list, offset: int = 0) -> dict:
    texts = [state.tokenizer.token_text(t) for t in toks]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in tops],
            "top_logprobs": [{state.tokenizer.token_text(tt): tl for tt, tl in top} for _, top in tops],
            "text_offset": offsets}


def _usage(prompts: List[List[int]], results) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check(results: Dict[int, object]) -> list:
    """The GenerationResults in choice order; an engine failure is a 500."""
    out = []
    for idx in sorted(results):
        kind, payload = results[idx]
        if kind == "error" or payload.finish_reason == "error":
            raise APIError(500, payload if kind == "error" else "the model produced no valid token (non-finite "
                           "logits) or the request cannot fit the KV cache", type="server_error", code="engine_error")
        out.append(payload)
    return out


def _final(state: ServerState, rid: str, body, prompts, results, chat: bool) -> dict:
    res = _check(results)
    choices = []
    for idx, r in enumerate(res):
        toks, tops = _visible(state, r)
        if chat:
            choices.append({"index": idx, "message": {"role": "assistant", "content": r.text, "refusal": None},
                            "logprobs": _chat_logprobs(state, toks, tops) if body.logprobs else None,
                            "finish_reason": _finish_reason(r)})
        else:
            choices.append({"index": idx, "text": r.text, "finish_reason": _finish_reason(r),
                            "logprobs": _completion_logprobs(state, toks, tops) if body.logprobs is not None
                            else None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices, "usage": _usage(prompts, res)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(state: ServerState, run: _Run, rid: str, body, prompts, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        out = {"id": rid, "object": kind_name, "created": created, "model": state.model_name, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return _sse(out)

    def piece(idx, text, toks, tops, finish=None, offset=0):
        lp = None
        if chat and body.logprobs and toks:
            lp = _chat_logprobs(state, toks, tops)
        elif not chat and body.logprobs is not None and toks:
            lp = _completion_logprobs(state, toks, tops, offset)
        if chat:
            delta = {"content": text} if text else {}
            return {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": idx, "text": text, "logprobs": lp, "finish_reason": finish}

    try:
        if chat:   # the role first, as OpenAI sends it
            yield chunk([{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for idx in sorted(run.subs)])
        sent_tokens: Dict[int, int] = {idx: 0 for idx in run.subs}
        sent_chars: Dict[int, int] = {idx: 0 for idx in run.subs}
        finished = []
        async for idx, kind, payload in run.events():
            if kind == "text":
                text, toks, tops = payload
                stop_ids = state.tokenizer.stop_ids
                shown = [t for t in toks if t not in stop_ids]
                yield chunk([piece(idx, text, shown, tops[:len(shown)], offset=sent_chars[idx])])
                sent_tokens[idx] += len(toks)
                sent_chars[idx] += len(text)
            elif kind == "error" or payload.finish_reason == "error":
                msg = payload if kind == "error" else "the model produced no valid token or the request cannot " \
                                                      "fit the KV cache"
                yield _sse(APIError(500, msg, type="server_error", code="engine_error").body())
                return
            else:
                # the tokens no text chunk carried (a final stop token, held-back text) go with the finish chunk
                toks, tops = _visible(state, payload)
                rest = sent_tokens[idx]
                yield chunk([piece(idx, "", toks[rest:], tops[rest:], _finish_reason(payload), sent_chars[idx])])
                finished.append(payload)
        if include_usage:
            yield chunk([], _usage(prompts, finished))
        yield "data: [DONE]\n\n"
    finally:   # also when the client disconnects: Starlette cancels this generator, the engine drops the work
        run.close()
