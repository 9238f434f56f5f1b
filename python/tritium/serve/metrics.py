"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own per app (so two servers in one
process, as in the tests and ``tritium bench serve``, do not collide): requests by finish reason, prompt and
generated tokens, queue depth, running batch, KV blocks used and free, the prefix cache's hit rate, and
histograms of time to first token and inter-token latency."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# latency buckets (seconds) from a fast decode step on a small model to a long queue on a loaded CPU
_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tritium_requests", "engine requests finished, by finish reason", ["finish_reason"],
                                registry=r)
        self.http_errors = Counter("tritium_http_errors", "requests refused with an error, by status", ["status"],
                                   registry=r)
        self.prompt_tokens = Counter("tritium_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tritium_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("tritium_queue_depth", "requests waiting to be admitted", registry=r)
        self.running = Gauge("tritium_running_requests", "requests in the running batch", registry=r)
        self.kv_used = Gauge("tritium_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.kv_free = Gauge("tritium_kv_blocks_free", "KV cache blocks free (cached prefixes included)", registry=r)
        self.prefix_hit_rate = Gauge("tritium_prefix_cache_hit_rate",
                                     "prompt tokens found in the prefix cache / prompt tokens looked up", registry=r)
        self.ttft = Histogram("tritium_time_to_first_token_seconds", "arrival to first streamed token",
                              buckets=_BUCKETS, registry=r)
        self.itl = Histogram("tritium_inter_token_latency_seconds", "time between streamed tokens of a request",
                             buckets=_BUCKETS, registry=r)

    # called on the engine's thread
    def token_times(self, sub, now: float) -> None:
        if sub.first is None:
            self.ttft.observe(now - sub.arrival)
        else:
            self.itl.observe(now - sub.last)

    def finished(self, sub, reason: str) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(len(sub.prompt_ids))
        r = sub.request.result if sub.request is not None and sub.request.result is not None else None
        if r is not None:
            self.generation_tokens.inc(len(r.token_ids))

    def engine_state(self, engine) -> None:
        cache = engine.cache
        self.queue_depth.set(len(engine.waiting))
        self.running.set(len(engine.running))
        self.kv_free.set(cache.num_free_blocks)
        self.kv_used.set(cache.num_blocks - cache.num_free_blocks)
        st = cache.prefix_stats
        self.prefix_hit_rate.set(st["hit_tokens"] / st["queried_tokens"] if st["queried_tokens"] else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
