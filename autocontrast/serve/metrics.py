"""Prometheus metrics of one server: requests, tokens, queue depth, batch size, latencies.

One `CollectorRegistry` per app (two servers in one process do not mix their figures); `/metrics`
serves `render()` in Prometheus' text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, exposition, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("acd_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("acd_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("acd_generated_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter("acd_cancelled_requests", "Requests whose client left before the end", registry=r)
        self.queue_depth = Gauge("acd_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("acd_batch_size", "Rows in the last decode step", registry=r)
        self.ttft = Histogram("acd_time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.inter_token = Histogram("acd_time_per_output_token_seconds", "Time between a request's tokens",
                                     registry=r, buckets=LATENCY_BUCKETS)

    def observe(self, kind: str, value: float) -> None:
        """The scheduler's callback: ('queue_depth' | 'batch_size' | 'ttft' | 'inter_token' | 'cancelled', value)."""
        if kind == "queue_depth":
            self.queue_depth.set(value)
        elif kind == "batch_size":
            self.batch_size.set(value)
        elif kind in ("ttft", "inter_token"):
            (self.ttft if kind == "ttft" else self.inter_token).observe(value)
            self.generated_tokens.inc()
        elif kind == "cancelled":
            self.cancelled.inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
