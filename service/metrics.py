"""Prometheus metrics, prefix ``crs_``; one registry per app, so tests and apps never share."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
EFFICIENCY_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


class Metrics:
    """The service's metrics and the registry that exports them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "crs_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "crs_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("crs_requests_in_flight", "HTTP requests being served", registry=r)
        self.items_scored = Counter("crs_items_scored", "items scored by the model", registry=r)
        self.tokens_scored = Counter("crs_tokens_scored", "real tokens scored", registry=r)
        self.items_truncated = Counter("crs_items_truncated", "items cut to fit", registry=r)
        self.model_info = Gauge(
            "crs_model_info", "the active model (value 1)", ["name", "version"], registry=r
        )
        self.model_loads = Counter(
            "crs_model_loads",
            "model loads finished, by outcome (ready, failed, cancelled)",
            ["outcome"],
            registry=r,
        )
        self.model_swaps = Counter(
            "crs_model_swaps", "activations that changed a name's active version", registry=r
        )
        self.models_loaded = Gauge(
            "crs_models_loaded", "model versions held, by state", ["state"], registry=r
        )
        # crs_device_memory_bytes, on CUDA only (export_cuda_memory).
        self.device_memory: Gauge | None = None
        self._batch_metrics(r)
        self._baseline_metrics(r)
        self._rebaseline_metrics(r)

    def _baseline_metrics(self, r: CollectorRegistry) -> None:
        self.baseline_lookups = Counter(
            "crs_baseline_lookups",
            "items answered per baseline source (cache, computed, missing, unavailable)",
            ["source"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "crs_store_seconds",
            "time of one baseline store operation",
            ["op"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "crs_store_errors", "failed baseline store operations", ["op"], registry=r
        )
        self.store_skipped = Counter(
            "crs_store_skipped",
            "lookups answered 'unavailable' without trying, in the cool-down after a failure",
            registry=r,
        )
        self.store_node_failures = Counter(
            "crs_store_node_failures",
            "Redis Cluster node failures (host:port); each leaves the node's prompts "
            "'unavailable' for CRS_STORE_COOLDOWN_S",
            ["node"],
            registry=r,
        )
        self.store_corrupt_values = Counter(
            "crs_store_corrupt",
            "values in the baseline store crs did not write, met by an operation (wrong_type, "
            "bad_value); each costs only its own prompt",
            ["reason"],
            registry=r,
        )

    # The model registry reports through these (service.scoring.registry.RegistryObserver).
    def models_changed(self, states: Mapping[str, int], active: Sequence[tuple[str, str]]) -> None:
        for state, count in states.items():
            self.models_loaded.labels(state).set(count)
        self.model_info.clear()
        for name, version in active:
            self.model_info.labels(name, version).set(1)

    def model_load_finished(self, outcome: str) -> None:
        self.model_loads.labels(outcome).inc()

    def model_swapped(self) -> None:
        self.model_swaps.inc()

    # The baseline store reports through this (service.baselines.redis_store.StoreObserver).
    def store_op(self, op: str, seconds: float, failed: bool) -> None:
        self.store_seconds.labels(op).observe(seconds)
        if failed:
            self.store_errors.labels(op).inc()

    # ... and this (service.baselines.redis_store.CorruptionObserver).
    def store_corrupt(self, reason: str) -> None:
        self.store_corrupt_values.labels(reason).inc()

    # ... and this (service.baselines.redis_store.NodeFailureObserver).
    def store_node_failed(self, node: str) -> None:
        self.store_node_failures.labels(node).inc()

    def _rebaseline_metrics(self, r: CollectorRegistry) -> None:
        # No version label: versions come and go with every swap, outcomes are three.
        self.rebaseline_prompts_total = Counter(
            "crs_rebaseline_prompts",
            "prompts gone through by rebaseline passes (scored, cached_already: that version's "
            "rewards were cached already, failed)",
            ["outcome"],
            registry=r,
        )
        self.rebaseline_progress_fraction = Gauge(
            "crs_rebaseline_progress",
            "fraction of the running rebaseline pass done (1 when none runs)",
            registry=r,
        )
        self.rebaseline_progress_fraction.set(1)

    # Rebaseline passes report through these (service.baselines.rebaseline.RebaselineObserver).
    def rebaseline_prompts(self, version: str, count: int, outcome: str) -> None:
        self.rebaseline_prompts_total.labels(outcome).inc(count)

    def rebaseline_progress(self, version: str, fraction: float) -> None:
        self.rebaseline_progress_fraction.set(fraction)

    def _batch_metrics(self, r: CollectorRegistry) -> None:
        self.queue_items = Gauge("crs_queue_items", "items waiting for a batch", registry=r)
        self.queue_tokens = Gauge("crs_queue_tokens", "tokens waiting for a batch", registry=r)
        self.batch_items = Histogram(
            "crs_batch_items", "items per batch", buckets=BATCH_ITEM_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "crs_batch_tokens",
            "tokens per batch, padding included",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding_efficiency = Histogram(
            "crs_batch_padding_efficiency",
            "real tokens / computed tokens per batch",
            buckets=EFFICIENCY_BUCKETS,
            registry=r,
        )
        self.real_tokens = Counter("crs_batch_real_tokens", "real tokens computed", registry=r)
        self.padded_tokens = Counter(
            "crs_batch_padded_tokens", "tokens computed, padding included", registry=r
        )
        self.queue_seconds = Histogram(
            "crs_queue_seconds",
            "time an item waits for its batch",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "crs_forward_seconds",
            "time of one batch's forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items_dropped_total = Counter(
            "crs_items_dropped", "items taken out of the queue unscored", ["reason"], registry=r
        )

    # The batcher reports through these (service.scoring.batcher.BatchObserver).
    def queue_changed(self, items: int, tokens: int) -> None:
        self.queue_items.set(items)
        self.queue_tokens.set(tokens)

    def batch_done(
        self, *, items: int, real_tokens: int, padded_tokens: int, forward_s: float
    ) -> None:
        self.batch_items.observe(items)
        self.batch_tokens.observe(padded_tokens)
        self.batch_padding_efficiency.observe(real_tokens / padded_tokens)
        self.real_tokens.inc(real_tokens)
        self.padded_tokens.inc(padded_tokens)
        self.forward_seconds.observe(forward_s)

    def items_waited(self, seconds: Sequence[float]) -> None:
        for wait in seconds:
            self.queue_seconds.observe(wait)

    def items_dropped(self, reason: str, count: int) -> None:
        self.items_dropped_total.labels(reason).inc(count)

    def export_cuda_memory(self) -> None:
        """Export ``crs_device_memory_bytes{kind}``: the bytes torch's CUDA allocator holds in
        tensors (``allocated``) and in all (``reserved``), summed over the visible devices and
        read at each scrape, so what a swap fails to give back shows. Only a service whose
        models run on CUDA calls this (service.app); calling it again does nothing."""
        if self.device_memory is not None:
            return
        import torch

        devices = range(torch.cuda.device_count())
        self.device_memory = memory = Gauge(
            "crs_device_memory_bytes",
            "CUDA memory held by torch's allocator (allocated, reserved)",
            ["kind"],
            registry=self.registry,
        )
        memory.labels("allocated").set_function(
            lambda: sum(torch.cuda.memory_allocated(device) for device in devices)
        )
        memory.labels("reserved").set_function(
            lambda: sum(torch.cuda.memory_reserved(device) for device in devices)
        )

    def render(self) -> bytes:
        """The text exposition format."""
        data: bytes = generate_latest(self.registry)
        return data


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The matched route's path template, or ``unmatched`` (never the raw path)."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
