"""The engine's thread: it owns the tritium.inference.Engine (nothing else touches it), takes new requests and
aborts from a queue between steps, and hands every piece of streamed text and every finished result to the
event loop of the request that asked (``loop.call_soon_threadsafe``), so the HTTP side never waits for a step
and a step never waits for the HTTP side.

Which thread: ``start()`` gives the engine a thread of its own; ``run()`` runs it on the calling thread, which
should be the one that loaded the model (`tritium serve` and `tritium bench serve` run it on the main thread and
the HTTP server beside it). The reason is OpenMP (torch's intra-op threads on CPU): each thread that starts
parallel regions gets its own team of worker threads, and once libgomp manages more threads than there are CPUs
it stops letting idle workers spin, so every parallel region (hundreds per decode step) pays a sleep and a wake-up:
a batch-1 decode step on another thread than the one that loaded the model takes about 3x as long."""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from ..inference.engine import Engine, Request


@dataclass
class Submission:
    """One engine request as the HTTP side asks for it. sink(kind, payload) is called on the loop's thread:
    ("text", (text, new token ids, their top_logprobs entries)), then once ("done", GenerationResult) or
    ("error", message)."""
    prompt_ids: List[int]
    max_new_tokens: int
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    sink: Callable[[str, object], None]
    arrival: float = field(default_factory=time.perf_counter)
    request: Optional[Request] = None
    sent: int = 0            # generated tokens already handed to the sink
    first: Optional[float] = None   # when the first token came (TTFT)
    last: Optional[float] = None    # when the latest token came (inter-token latency)


class EngineWorker:
    """Runs ``engine.step()`` in a loop while there is work, on a daemon thread of its own (start()) or on the
    calling thread (run(), until stop()); submit() and abort() are thread-safe and return at once. metrics
    (tritium.serve.metrics.Metrics or None) is updated after each step from the engine's thread. in_flight:
    submissions not finished yet (read by the HTTP side for the queue limit)."""

    def __init__(self, engine: Engine, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self._inbox: "queue.Queue[tuple]" = queue.Queue()
        self._active: Dict[int, Submission] = {}
        self._stop = threading.Event()
        self.in_flight = 0
        self._lock = threading.Lock()
        self.error: Optional[str] = None    # set when a step raised: the engine is no longer trusted
        self._thread: Optional[threading.Thread] = None
        self._outbox: Dict[asyncio.AbstractEventLoop, list] = {}   # events for each loop, sent by _flush

    def start(self) -> "EngineWorker":
        """The engine loop on a daemon thread of its own, until stop()."""
        self._thread = threading.Thread(target=self._run, name="tritium-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """The engine loop on the calling thread; returns after stop() (called from another thread) or when a step
        raised (error says why). KeyboardInterrupt propagates."""
        self._run()

    def request_stop(self) -> None:
        """End the loop within its 0.5 s poll, taking no lock but the event's own: safe from a signal handler, which
        may run while this thread holds the inbox's lock (stop() would wait for that lock forever)."""
        self._stop.set()

    def stop(self) -> None:
        """End the loop after the current step; joins the worker's own thread if it has one."""
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether requests can still be served: no step has failed, stop() was not called, and the own thread
        (if started) is running."""
        return (self.error is None and not self._stop.is_set()
                and (self._thread is None or self._thread.is_alive()))

    def try_reserve(self, n: int, limit: int) -> bool:
        """Count n more requests in flight unless that would pass limit (the HTTP side's 429)."""
        with self._lock:
            if self.in_flight + n > limit:
                return False
            self.in_flight += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.in_flight -= n

    def submit(self, sub: Submission) -> Submission:
        self._inbox.put(("add", sub))
        return sub

    def abort(self, sub: Submission) -> None:
        """End sub's request (its client went away); its blocks are freed before the next step."""
        self._inbox.put(("abort", sub))

    def call(self, fn: Callable[[Engine], object]) -> "concurrent.futures.Future":
        """fn(engine) run on the engine's thread between steps (to read the engine's state consistently)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, fut))
        return fut

    # ---- the engine thread ----
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                block = not self.engine.has_work()
                while True:
                    try:
                        item = self._inbox.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    block = False
                    self._handle(item)
                self._flush()
                if self.engine.has_work():
                    self.engine.step()
                    self._after_step()
                    self._flush()
                    if self.metrics is not None:
                        self.metrics.engine_state(self.engine)
            except Exception:   # a broken step: fail everything in flight, keep answering /health with the cause
                self.error = traceback.format_exc(limit=3)
                for sub in list(self._active.values()):
                    self._send(sub, "error", "the engine failed: " + self.error.strip().splitlines()[-1])
                self._active.clear()
                self._flush()
                return

    def _handle(self, item: tuple) -> None:
        if item[0] == "add":
            sub: Submission = item[1]
            try:   # the HTTP side checked the request; anything the engine still refuses fails it alone
                sub.request = self.engine.add_request(sub.prompt_ids, max_new_tokens=sub.max_new_tokens,
                                                      on_token=lambda r, t, text, s=sub: self._on_token(s, text),
                                                      **sub.kwargs)
            except (ValueError, TypeError) as e:
                self._send(sub, "error", str(e))
                return
            self._active[sub.request.id] = sub
        elif item[0] == "call":
            fn, fut = item[1], item[2]
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)
        elif item[0] == "abort":
            sub = item[1]
            if sub.request is not None and sub.request.id in self._active:
                self.engine.abort(sub.request)
                del self._active[sub.request.id]
                if self.metrics is not None:
                    self.metrics.finished(sub, "abort")
                    self.metrics.engine_state(self.engine)

    def _on_token(self, sub: Submission, text: str) -> None:
        """The engine's per-token callback (new text ready to show): forward it with the tokens it came from."""
        s = sub.request.seqs[0]
        gen = s.generated
        toks = gen[sub.sent:]
        tops = s.top[sub.sent:len(gen)] if sub.request.top_logprobs is not None else []
        sub.sent = len(gen)
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token_times(sub, now)
        if sub.first is None:
            sub.first = now
        sub.last = now
        self._send(sub, "text", (text, toks, tops))

    def _after_step(self) -> None:
        done = [sub for sub in self._active.values() if sub.request.done]
        for sub in done:
            del self._active[sub.request.id]
            if self.metrics is not None:
                self.metrics.finished(sub, sub.request.result.finish_reason)
            self._send(sub, "done", sub.request.result)

    def _send(self, sub: Submission, kind: str, payload) -> None:
        """Queue sub.sink(kind, payload) for the request's event loop; _flush hands them over."""
        self._outbox.setdefault(sub.loop, []).append((sub.sink, kind, payload))

    def _flush(self) -> None:
        """Everything a step (or the inbox) produced, one call_soon_threadsafe per event loop: one wake-up of the
        loop per step instead of one per streamed token."""
        outbox, self._outbox = self._outbox, {}
        for loop, events in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:   # the event loop is closed (server shutting down): nobody to tell
                pass


def _deliver(events: list) -> None:
    for sink, kind, payload in events:
        sink(kind, payload)
