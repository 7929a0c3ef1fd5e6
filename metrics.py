"""Prometheus metrics (``GET /metrics``), one registry per app.

Counters and histograms are fed by the request hooks, the completion log and the
manager's lifecycle events; gauges of live state (loaded models, in-flight, queued,
estimated memory) are read from the manager at scrape time, so they can never drift.
Scraping reads state only: it never counts as activity that keeps a model loaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from activity import ActivityLog
from model_manager import ModelManager

PREFIX = "llama_server_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Any client can invent a method name; each would be a new series (unbounded cardinality).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


# Which API a path belongs to, first match: clients of each API can be counted apart.
_APIS = (("/v1/messages", "anthropic"), ("/v1/rerank", "llama.cpp"), ("/v1/", "openai"), ("/api/", "ollama"),
         ("/admin", "admin"), ("/metrics", "admin"), ("/health", "admin"))
_LLAMA_CPP_PATHS = frozenset({"/tokenize", "/detokenize", "/apply-template", "/rerank"})


def api_of(path: str) -> str:
    """``openai``, ``anthropic``, ``ollama``, ``llama.cpp`` (its own endpoints), ``admin`` or ``other``."""
    if path in _LLAMA_CPP_PATHS:
        return "llama.cpp"
    return next((api for prefix, api in _APIS if path.startswith(prefix)), "other")


class Metrics:
    """The app's metrics and the hooks that feed them."""

    def __init__(self, manager: ModelManager, activity: ActivityLog | None = None) -> None:
        """``activity``: also told of every completion (the status page's recent charts)."""
        self.activity = activity
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "HTTP requests", ["api", "endpoint", "method", "status"],
                                registry=registry)
        self.request_seconds = Histogram(PREFIX + "request_duration_seconds", "Request duration (streams: to the end)",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From request to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", ["model"], registry=registry)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens generated", ["model"], registry=registry)
        self.tokens_per_second = Gauge(PREFIX + "last_tokens_per_second", "Generation speed of the last completion",
                                       ["model"], registry=registry)
        self.loads = Counter(PREFIX + "model_loads", "Model loads", ["model", "mode"], registry=registry)
        self.unloads = Counter(PREFIX + "model_unloads", "Model unloads by reason", ["model", "mode", "reason"],
                               registry=registry)
        self.crashes = Counter(PREFIX + "model_crashes", "Worker processes that died under a loaded model",
                               ["model"], registry=registry)
        self.load_failures = Counter(PREFIX + "model_load_failures", "Failed model loads", ["model", "mode"],
                                     registry=registry)
        self.load_seconds = Histogram(PREFIX + "model_load_duration_seconds", "Model load time", ["model"],
                                      buckets=LOAD_BUCKETS, registry=registry)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
        registry.register(_LiveState(manager))
        manager.events.add_listener(self.on_event)

    def requests_by_api(self) -> dict[str, int]:
        """Requests answered so far, per API (``api_of``), for the status page."""
        counts: dict[str, int] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    api = sample.labels["api"]
                    counts[api] = counts.get(api, 0) + int(sample.value)
        return counts

    def on_event(self, event: dict[str, Any]) -> None:
        """Count lifecycle events (called synchronously by the event bus: keep it cheap)."""
        kind, model, mode = event["event"], event.get("model", ""), event.get("mode", "")
        if kind == "loaded":
            self.loads.labels(model, mode).inc()
            self.load_seconds.labels(model).observe(event.get("seconds", 0))
        elif kind == "unloaded":
            self.unloads.labels(model, mode, event.get("reason", "")).inc()
        elif kind == "crashed":
            self.crashes.labels(model).inc()
        elif kind == "failed" and not str(event.get("reason", "")).startswith("crashed"):
            self.load_failures.labels(model, mode).inc()

    def observe_completion(self, model: str, prompt_tokens: int, completion_tokens: int,
                           first_token_seconds: float | None, seconds: float) -> None:
        """Record one finished completion."""
        if self.activity is not None:
            self.activity.record(model, completion_tokens, first_token_seconds, seconds)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generated_tokens.labels(model).inc(completion_tokens)
        if first_token_seconds is not None:
            self.ttft.labels(model).observe(first_token_seconds)
        if completion_tokens and seconds > 0:
            self.tokens_per_second.labels(model).set(completion_tokens / seconds)

    def install(self, app: Flask) -> None:
        """Add ``GET /metrics`` and the per-request hooks to ``app``."""
        app.add_url_rule("/metrics", "metrics", self._scrape)

        @app.before_request
        def _start() -> None:
            g.metrics_started = time.monotonic()

        @app.after_request
        def _count(response: Response) -> Response:
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            started = g.get("metrics_started", time.monotonic())
            method = request.method if request.method in KNOWN_METHODS else "other"
            self.requests.labels(api_of(request.path), endpoint, method, str(response.status_code)).inc()

            def observe() -> None:
                self.request_seconds.labels(endpoint).observe(time.monotonic() - started)

            if response.is_streamed:
                response.call_on_close(observe)
            else:
                observe()
            return response

    def _scrape(self) -> Response:
        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)


class _LiveState(Collector):
    """Gauges read from the manager at scrape time."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        views = self._manager.models()
        loaded = GaugeMetricFamily(PREFIX + "loaded_models", "Model instances loaded now")
        in_flight = GaugeMetricFamily(PREFIX + "in_flight_requests", "Requests holding a lease", labels=["model"])
        queued = GaugeMetricFamily(PREFIX + "queued_requests", "Requests waiting for a load or a generation",
                                   labels=["model"])
        memory = GaugeMetricFamily(PREFIX + "estimated_memory_bytes", "Estimated memory of loaded models",
                                   labels=["model"])
        devices = GaugeMetricFamily(PREFIX + "model_device_bytes",
                                    "Weights of loaded models per device (llama.cpp's buffer name: CPU_Mapped, "
                                    "RPC0[host:port], CUDA0...)", labels=["model", "device"])
        count = 0
        for view in views:
            instances = [view] + ([view["embeddings"]] if "embeddings" in view else [])
            in_flight.add_metric([view["id"]], sum(i["in_flight"] for i in instances))
            queued.add_metric([view["id"]], sum(i["queued"] for i in instances))
            held = [i for i in instances if i["state"] == "loaded"]
            count += len(held)
            memory.add_metric([view["id"]], sum(i["estimated_memory_bytes"] for i in held))
            placed: dict[str, int] = {}
            for instance in held:
                for device, size in (instance.get("devices") or {}).items():
                    placed[device] = placed.get(device, 0) + size
            for device, size in placed.items():
                devices.add_metric([view["id"], device], size)
        loaded.add_metric([], count)
        yield from (loaded, in_flight, queued, memory, devices)
