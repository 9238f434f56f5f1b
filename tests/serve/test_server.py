"""`tritium serve`'s app on a free loopback port, driven by the official openai client (and httpx where the client
cannot send a malformed request): endpoints, streaming, n, stop, seeds, logprobs, greedy output equal to
tritium.generate, every error status and body, 32 concurrent streaming clients (with bad requests mixed in, and
again with a quarter disconnecting mid-stream) leaving the KV cache consistent with no block leaked, and the
prefix cache serving a repeated 500-token system prompt."""
import asyncio
import json
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve extra: pip install 'tritium[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra: pip install 'tritium[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install 'tritium[serve]'")

from tests.models.test_llama_smollm2 import model_path  # noqa: F401,E402  (the embedded model's path, or a skip)

NAME = "smollm2-test"
KEY = "sk-test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded(model_path):  # noqa: F811
    import tritium.models

    # float32 activations over the file's own quantized blocks: the same numbers on every CPU
    return tritium.models.load(model_path, torch.float32, weights="native")


@pytest.fixture(scope="module")
def server(loaded):
    from tritium.inference.engine import Engine
    from tritium.serve import BackgroundServer, create_app

    model, tok = loaded
    engine = Engine(model, tok, max_batch=32)
    app = create_app(engine, NAME, api_key=KEY, max_queue=256)
    with BackgroundServer(app) as srv:
        srv.engine, srv.state = engine, app.state.tritium
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference(loaded, prompt, n, **kw):
    """tritium.generate's result for the same prompt (the server idles between tests, so its engine and this one
    never run at once on the shared model)."""
    import tritium

    model, tok = loaded
    return tritium.generate(model, tok, [prompt], max_new_tokens=n, **kw)[0]


def in_engine(server, fn):
    return server.state.worker.call(fn).result(timeout=60)


def wait_idle(server):
    """Until the engine has nothing waiting or running (aborts of gone clients included)."""
    deadline = time.monotonic() + 60
    while in_engine(server, lambda e: e.has_work()):
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def assert_cache_clean(server):
    """No sequence left, every block free (cached prefixes included) and the bookkeeping consistent."""
    def check(engine):
        engine.cache.check_invariants()
        return engine.cache.sequences(), engine.cache.num_free_blocks, engine.cache.num_blocks

    wait_idle(server)
    seqs, free, total = in_engine(server, check)
    assert seqs == [] and free == total


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("tritium_requests_total", "tritium_queue_depth", "tritium_running_requests", "tritium_kv_blocks_used",
                 "tritium_kv_blocks_free", "tritium_prefix_cache_hit_rate", "tritium_time_to_first_token_seconds",
                 "tritium_inter_token_latency_seconds", "tritium_generation_tokens_total"):
        assert name in text


def test_chat_greedy_equals_generate(server, client, loaded):
    _, tok = loaded
    want = reference(loaded, tok.apply_chat_template(QUESTION), 12)
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: the same text in pieces, the role first, one finish_reason, usage last, then [DONE]
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_completions_stream_and_token_prompt(server, client, loaded):
    _, tok = loaded
    prompt = "The three primary colors are"
    want = reference(loaded, prompt, 10, stop_token_ids=[])
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    # the same prompt as token ids, streamed
    parts = list(client.completions.create(model=NAME, prompt=tok.encode(prompt), max_tokens=10, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == "length"
    # raw SSE: data lines, the last one [DONE]
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": prompt, "max_tokens": 3, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_n_seed_stop(server, client):
    kw = dict(model=NAME, prompt="My favourite animal is the", max_tokens=8, temperature=1.0, seed=1234, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]     # same seed, same texts
    assert len({c.text for c in a.choices}) > 1                          # the choices draw differently
    assert a.usage.completion_tokens <= 3 * 8
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)
    # a stop string taken from the greedy text ends the text right before it
    g = client.completions.create(model=NAME, prompt="One, two, three, four,", max_tokens=12, temperature=0).choices[0]
    word = g.text.split(",")[1].strip() if "," in g.text else g.text.strip().split()[-1]
    s = client.completions.create(model=NAME, prompt="One, two, three, four,", max_tokens=12, temperature=0,
                                  stop=[word]).choices[0]
    assert s.finish_reason == "stop" and s.text == g.text[:g.text.index(word)]


def test_logprobs(server, client):
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 0 < len(content) <= 6 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:   # greedy: the chosen token is the most likely one; the top list is sorted
        lps = [t.logprob for t in c.top_logprobs]
        assert len(lps) == 3 and lps == sorted(lps, reverse=True) and c.logprob == pytest.approx(lps[0])
        assert c.top_logprobs[0].token == c.token and c.logprob <= 0
    c = client.completions.create(model=NAME, prompt="Hello, my name is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)


def _status(resp):
    return resp.status_code, resp.json()["error"]


def test_errors(server, client):
    url, auth = server.url + "/v1", {"Authorization": f"Bearer {KEY}"}
    ok = {"model": NAME, "prompt": "hi", "max_tokens": 2}

    def post(path, body, headers=auth, raw=None):
        return httpx.post(url + path, headers={**headers, "content-type": "application/json"},
                          content=raw if raw is not None else json.dumps(body), timeout=60)

    status, err = _status(post("/completions", None, raw=b'{"model": '))
    assert status == 400 and set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    for field, value in [("temperature", -1), ("top_p", 0), ("n", 0), ("max_tokens", 0), ("seed", -3),
                         ("presence_penalty", 3), ("logprobs", 99), ("stop", ["a", "b", "c", "d", "e"]),
                         ("logit_bias", {"not-a-token": 1}), ("logit_bias", {"5": 500})]:
        status, err = _status(post("/completions", {**ok, field: value}))
        assert status == 400 and err["param"] == field, (field, err)
    status, err = _status(post("/completions", {"model": NAME}))
    assert status == 400 and err["param"] == "prompt"
    status, err = _status(post("/chat/completions", {"model": NAME, "messages": []}))
    assert status == 400 and err["param"] == "messages"
    status, err = _status(post("/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}))
    assert status == 400 and err["param"] == "messages"
    # the context: prompt + max_tokens over max_seq_len
    status, err = _status(post("/completions", {**ok, "max_tokens": server.state.max_seq_len}))
    assert status == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME,
                                       messages=[{"role": "user", "content": "word " * server.state.max_seq_len}])
    assert e.value.body["code"] == "context_length_exceeded"
    # unknown model
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    # the API key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, err = _status(post("/completions", ok, headers=headers))
        assert status == 401 and err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200   # health and metrics need no key
    # a full queue: no room for even one more request
    old, server.state.limit = server.state.limit, 0
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
    finally:
        server.state.limit = old
    assert client.completions.create(**ok).usage.completion_tokens >= 1   # and the server still serves
    assert_cache_clean(server)


PROMPTS = [f"Here is a short story about {w}:" for w in ("a cat", "the sea", "a robot", "winter", "a train",
                                                           "the moon", "bread", "a violin")]
N_TOKENS = 6


async def _clients(server, n_clients, per_client, leave=()):
    """n_clients concurrent streaming clients, per_client requests each; client i uses PROMPTS[(i + j) % 8];
    clients in leave close their streams after the first two chunks of each request. Every 16th request asks
    for an invalid temperature (a 400 that must not disturb the others). Returns {(i, j): (text, finish, usage)
    or ("error", status) or ("left",)}."""
    out = {}

    async def one(i):
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        async with client:
            for j in range(per_client):
                k = i * per_client + j
                bad = k % 16 == 5
                try:
                    stream = await client.completions.create(
                        model=NAME, prompt=PROMPTS[(i + j) % 8], temperature=-1 if bad else 0,
                        max_tokens=40 if i in leave else N_TOKENS, stream=True,
                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                except openai.APIStatusError as e:
                    out[i, j] = ("error", e.status_code)
                    continue
                text, finish, usage, seen = "", None, None, 0
                async for ch in stream:
                    seen += 1
                    if i in leave and seen == 2:
                        await stream.close()
                        break
                    if ch.choices:
                        text += ch.choices[0].text
                        finish = ch.choices[0].finish_reason or finish
                    if ch.usage:
                        usage = ch.usage
                out[i, j] = ("left",) if i in leave else (text, finish, usage)

    await asyncio.gather(*(one(i) for i in range(n_clients)))
    return out


@pytest.fixture(scope="module")
def story_refs(loaded):
    """Each story prompt's greedy N_TOKENS tokens (no stop token: the clients count exactly N_TOKENS)."""
    import tritium

    model, tok = loaded
    res = tritium.generate(model, tok, PROMPTS, max_new_tokens=N_TOKENS, stop_token_ids=[])
    return [r for r in res]


def _check_clients(out, refs, n_clients, per_client, leave=()):
    for i in range(n_clients):
        for j in range(per_client):
            got = out[i, j]
            if (i * per_client + j) % 16 == 5:
                assert got == ("error", 400)
            elif i in leave:
                assert got == ("left",)
            else:
                text, finish, usage = got
                ref = refs[(i + j) % 8]
                # greedy stories may end early at EOS: then the reference ends there too
                assert text == ref.text or (finish == "stop" and ref.text.startswith(text)), (i, j, text, ref.text)
                assert (finish, usage.completion_tokens) == ("length", N_TOKENS) or finish == "stop"


def test_32_concurrent_clients(server, story_refs):
    out = asyncio.run(_clients(server, 32, 4))
    assert len(out) == 128
    _check_clients(out, story_refs, 32, 4)
    assert_cache_clean(server)


def test_32_clients_quarter_disconnect(server, story_refs):
    steps_before = in_engine(server, lambda e: e.stats["steps"])
    leave = set(range(0, 32, 4))   # 8 of the 32
    out = asyncio.run(_clients(server, 32, 4, leave))
    _check_clients(out, story_refs, 32, 4, leave)
    assert_cache_clean(server)
    text = httpx.get(server.url + "/metrics").text
    n_abort = [float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith('tritium_requests_total{finish_reason="abort"}')]
    assert n_abort and n_abort[0] >= 16, "the streams that closed early were not aborted"
    assert in_engine(server, lambda e: e.stats["steps"]) > steps_before


def _system_prompt(tok, n_tokens):
    words = []
    i = 0
    while len(tok.encode(" ".join(words))) < n_tokens:
        words.append(f"rule{i}")
        i += 1
    return "You follow these rules: " + " ".join(words)


def _stream_ttft(client, messages):
    t0 = time.perf_counter()
    ttft, text = None, ""
    for ch in client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                             stream=True):
        if ch.choices and ch.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            text += ch.choices[0].delta.content
    return ttft, text


def test_prefix_cache_shared_system_prompt(server, client, loaded):
    """The same 500-token system prompt twice: the second request takes all its full blocks from the cache and
    computes only the rest (at most a third of the first's work), with the same output. A changed last token of
    the prefix misses exactly from the block holding it. (TTFTs are printed; the speed bar is checked by
    `tritium bench serve`, not in a unit test.)"""
    _, tok = loaded
    system = _system_prompt(tok, 500)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Which rule comes first?"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    bs = server.engine.block_size

    def stats(e):
        return dict(e.cache.prefix_stats), e.stats["prefill_tokens"]

    (s0, p0) = in_engine(server, stats)
    ttft1, text1 = _stream_ttft(client, msgs)
    (s1, p1) = in_engine(server, stats)
    ttft2, text2 = _stream_ttft(client, msgs)
    (s2, p2) = in_engine(server, stats)
    print(f"TTFT first {ttft1 * 1e3:.0f} ms, second {ttft2 * 1e3:.0f} ms")
    assert text2 == text1
    assert s1["hit_tokens"] - s0["hit_tokens"] == 0 and p1 - p0 == len(ids)
    assert s2["hit_tokens"] - s1["hit_tokens"] == (len(ids) - 1) // bs * bs
    assert p2 - p1 <= len(ids) / 3
    # the system prompt's last word changed: the blocks before the first differing token still hit
    changed = [{"role": "system", "content": system[:-1] + ("7" if system[-1] != "7" else "8")}, msgs[1]]
    ids2 = tok.encode(tok.apply_chat_template(changed))
    first_diff = next(i for i, (a, b) in enumerate(zip(ids, ids2)) if a != b)
    _stream_ttft(client, changed)
    (s3, _) = in_engine(server, stats)
    assert s3["hit_tokens"] - s2["hit_tokens"] == min(first_diff // bs, (len(ids2) - 1) // bs) * bs
    assert_cache_clean(server)


def test_engine_on_the_callers_thread(server, loaded):
    """create_app(engine_thread=False): the engine runs where worker.run() is called (here the test's thread, as
    `tritium serve` runs it on its main one) until stop(); the answers are the engine thread's, and after stop()
    the health check says the engine is not running."""
    import threading

    from tritium.inference.engine import Engine
    from tritium.serve import BackgroundServer, create_app

    model, tok = loaded
    prompt = "The three primary colors are"
    want = reference(loaded, prompt, 10, stop_token_ids=[])
    app = create_app(Engine(model, tok, max_batch=4), NAME, engine_thread=False)
    worker = app.state.tritium.worker
    got = {}

    def client(url):
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            got["health"] = httpx.get(url + "/health").json()
            got["text"] = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
            worker.stop()
            got["after"] = httpx.get(url + "/health").status_code
        finally:
            worker.stop()

    with BackgroundServer(app) as srv:
        t = threading.Thread(target=client, args=(srv.url,))
        t.start()
        worker.run()
        t.join()
    assert got == {"health": {"status": "ok"}, "text": want.text, "after": 503}


def test_cli_serves_and_stops_on_ctrl_c(model_path):  # noqa: F811
    """`tritium serve --port 0`: prints the address it listens on (the free port chosen), answers there, and stops
    cleanly on SIGINT (exit status 0)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    env = dict(os.environ, COLUMNS="300")
    p = subprocess.Popen([sys.executable, "-m", "tritium.cli", "serve", "--model", model_path, "--port", "0",
                          "--dtype", "float32", "--max-batch", "2", "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:(\d+))/v1", line)
            if m:
                break
        assert m and int(m.group(2)) > 0, "".join(lines)
        url = m.group(1)
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}
        r = httpx.post(url + "/v1/completions", json={"model": "x", "prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 404 and "model" in r.json()["error"]["message"]
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0, p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
