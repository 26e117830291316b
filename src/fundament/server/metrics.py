"""`GET /metrics` in Prometheus' text format (prometheus-client) and one log line per request.
Names and meanings follow vLLM's (`vllm:X` is `fundament:X`, label `model_name`), so dashboards
carry over: requests by endpoint, model and status; time to first token and end-to-end latency;
prompt and generated tokens; running and waiting sequences, KV-cache use and prefix-cache
queries and hits (in tokens), read from the engines at scrape time; fine-tuning jobs by status
and the running job's training speed. Knows
the registry, the job store and ASGI; not the engines' insides.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("fundament.requests")

# vLLM's buckets for time to first token and end-to-end latency (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


@dataclass
class RequestRecord:
    """What one HTTP request did, filled in as it runs (the route names the model; each generated
    sequence adds its tokens)."""

    metrics: ServerMetrics | None = None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def sequence_done(self, n_prompt: int, ttft_s: float | None, n_generated: int) -> None:
        """One generated sequence of this request finished (or was cut off)."""
        self.prompt_tokens += n_prompt
        self.completion_tokens += n_generated
        if self.metrics is not None:
            self.metrics.observe_sequence(self.model, n_prompt, ttft_s, n_generated)


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("fundament_request", default=None)


@contextlib.contextmanager
def request_scope(record: RequestRecord):
    """`record` is the current request's while the block runs (a batch line, say)."""
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


def current() -> RequestRecord | None:
    """This request's record (None outside a request, e.g. in a batch run or a unit test)."""
    return _current.get()


class ServerMetrics:
    """The server's metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, registry_of_models: Any, store: Any):
        self.models, self.store = registry_of_models, store
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fundament:requests", "HTTP requests by endpoint, model and status.", ["endpoint", "model_name", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "fundament:time_to_first_token_seconds", "Time to the first generated token of a sequence.",
            ["model_name"], buckets=TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "fundament:e2e_request_latency_seconds", "End-to-end latency of a model request.",
            ["model_name"], buckets=E2E_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "fundament:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "fundament:generation_tokens", "Tokens generated.", ["model_name"], registry=self.registry
        )
        self.registry.register(_LiveState(self))

    def observe_sequence(self, model: str, n_prompt: int, ttft_s: float | None, n_generated: int) -> None:
        """One generated sequence finished (or was cut off): its tokens and time to first token."""
        self.prompt_tokens.labels(model).inc(n_prompt)
        self.generation_tokens.labels(model).inc(n_generated)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState:
    """Gauges read when Prometheus scrapes: engines' sequences and KV cache, jobs."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        running = GaugeMetricFamily(
            "fundament:num_requests_running", "Sequences in the engine's batch.", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            "fundament:num_requests_waiting", "Sequences waiting to start.", labels=["model_name"]
        )
        kv = GaugeMetricFamily(
            "fundament:kv_cache_usage_perc", "KV-cache use, 0 to 1 (1 = full).", labels=["model_name"]
        )
        queries = CounterMetricFamily(
            "fundament:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=["model_name"]
        )
        hits = CounterMetricFamily(
            "fundament:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=["model_name"]
        )
        for name, g in list(self.metrics.models.generators.items()):
            engine = g.engine
            running.add_metric([name], len(engine.running))
            waiting.add_metric([name], len(getattr(engine, "waiting", ())))
            budget = getattr(getattr(engine, "config", None), "kv_cache_tokens", None)
            if budget and hasattr(engine, "reserved_tokens"):
                kv.add_metric([name], engine.reserved_tokens / budget)
            prefix = getattr(engine, "prefix", None)
            if prefix is not None:
                queries.add_metric([name], prefix.queries)
                hits.add_metric([name], prefix.hits)
        yield from (running, waiting, kv, queries, hits)
        jobs = GaugeMetricFamily("fundament:fine_tuning_jobs", "Fine-tuning jobs by status.", labels=["status"])
        speed = GaugeMetricFamily(
            "fundament:fine_tuning_tokens_per_second",
            "Training tokens per second of a running job's last step (all its processes together).",
            labels=["job_id", "model_name"],
        )
        for status, n in self.metrics.store.count_by_status().items():
            jobs.add_metric([status], n)
        for job in self.metrics.store.jobs_with_status("running"):
            last = self.metrics.store.last_metrics(job["id"])
            if last and last.get("tokens_per_second"):
                speed.add_metric([job["id"], job["base_model"]], last["tokens_per_second"])
        yield from (jobs, speed)


class RequestMetricsMiddleware:
    """Counts every /v1 request by endpoint (the route's path), model and status, times model
    requests end to end, and logs one line per request: method, path, model, tokens in and out,
    latency, status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        record = RequestRecord(self.metrics)
        token = _current.set(record)
        status = 500
        t0 = time.perf_counter()

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            latency = time.perf_counter() - t0
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or scope.get("path", "")
            self.metrics.requests.labels(endpoint, record.model, str(status)).inc()
            if record.model and status < 400:
                self.metrics.e2e.labels(record.model).observe(latency)
            log.info(
                "%s %s model=%s prompt_tokens=%d completion_tokens=%d latency_ms=%.0f status=%d",
                scope.get("method", ""),
                scope.get("path", ""),
                record.model or "-",
                record.prompt_tokens,
                record.completion_tokens,
                latency * 1000,
                status,
            )
