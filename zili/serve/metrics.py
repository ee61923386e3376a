"""Prometheus metrics at /metrics: HTTP requests by status, latency histograms, engine state.

Each app owns its registry (tests run several apps in one process). Engine figures are read
from the engine at scrape time and exposed by a collector: gauges for the current state,
counters for the engine's monotonic totals.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                "/v1/tokenize", "/v1/detokenize",
                "/health", "/ready", "/metrics", "/")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class _EngineCollector:
    def __init__(self):
        self.snapshot: dict = {}
        self.admission = None

    def collect(self):
        s = self.snapshot
        gauges = (("num_running", "Sequences running in the engine"),
                  ("num_waiting", "Sequences waiting in the engine"),
                  ("kv_blocks_used", "KV cache blocks in use"),
                  ("kv_blocks_total", "KV cache blocks in the pool"),
                  ("prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache"))
        for name, doc in gauges:
            yield GaugeMetricFamily(f"zili_engine_{name}", doc, value=s.get(name, 0.0))
        counters = (("prompt_tokens", "prompt_tokens_total", "Prompt tokens computed"),
                    ("generation_tokens", "generation_tokens_total", "Tokens generated"),
                    ("preemptions", "num_preemptions", "Sequences preempted for KV space"),
                    ("requests_finished", "num_requests_finished", "Requests the engine completed"),
                    ("requests_aborted", "num_requests_aborted", "Requests aborted (client gone, failure)"))
        for name, key, doc in counters:
            yield CounterMetricFamily(f"zili_engine_{name}", doc, value=s.get(key, 0.0))
        if self.admission is not None:
            yield GaugeMetricFamily("zili_http_requests_running", "Admitted requests holding a running slot",
                                    value=self.admission.num_running)
            yield GaugeMetricFamily("zili_http_requests_queued", "Admitted requests waiting for a slot",
                                    value=self.admission.num_queued)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("zili_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.finished = Counter("zili_generations_finished", "Generation choices by finish reason",
                                ["reason"], registry=self.registry)
        self.ttft = Histogram("zili_time_to_first_token_seconds", "Arrival to first token, as the client sees it",
                              buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.tpot = Histogram("zili_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              buckets=TOKEN_BUCKETS_S, registry=self.registry)
        self.e2e = Histogram("zili_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.engine = _EngineCollector()
        self.registry.register(self.engine)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(route=path if path in KNOWN_ROUTES else "other", status=str(status)).inc()

    def observe_generation(self, arrival_s: float, first_token_s: float | None, end_s: float,
                           num_tokens: int) -> None:
        if first_token_s is None:
            return
        self.ttft.observe(first_token_s - arrival_s)
        self.e2e.observe(end_s - arrival_s)
        if num_tokens > 1:
            self.tpot.observe((end_s - first_token_s) / (num_tokens - 1))

    def render(self, engine_snapshot: dict) -> bytes:
        self.engine.snapshot = engine_snapshot
        return generate_latest(self.registry)


class RequestCounterMiddleware:
    """Counts every HTTP response by route and status (pure ASGI, so streams count at start)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
