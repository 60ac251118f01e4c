"""Prometheus metrics of the server (`/metrics`): queue, batch, throughput, passes per canvas, latency."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.scheduler import Scheduler

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PASS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class TokenRate:
    """Generated tokens per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        self._events.append((time.monotonic(), tokens))
        self._forget_old()

    def __call__(self) -> float:
        self._forget_old()
        return sum(n for _, n in self._events) / self.window_s

    def _forget_old(self) -> None:
        start = time.monotonic() - self.window_s
        while self._events and self._events[0][0] < start:
            self._events.popleft()


class _EngineCollector(Collector):
    """The scheduler's state, read at scrape time."""

    def __init__(self, scheduler: Scheduler, rate: TokenRate):
        self.scheduler, self.rate = scheduler, rate

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        for name, doc, value in (("queue_depth", "requests waiting for a slot", s.queue_depth),
                                 ("active_requests", "requests holding a slot", s.active_requests),
                                 ("slots", "KV-cache slots: the most requests running at once", s.slots),
                                 ("batch_size", "rows in the last engine step", s.batch_size),
                                 ("tokens_per_second", "generated tokens per second over the last 10 s", self.rate())):
            yield GaugeMetricFamily(f"dgemma_{name}", doc, value=value)
        yield CounterMetricFamily("dgemma_engine_steps", "engine steps (one forward pass each)", value=s.steps)
        yield CounterMetricFamily("dgemma_engine_rows", "rows over all engine steps (/ steps = mean batch size)",
                                  value=s.rows_stepped)


class Metrics:
    def __init__(self, scheduler: Scheduler):
        self.registry = r = CollectorRegistry()
        self.rate = TokenRate()
        r.register(_EngineCollector(scheduler, self.rate))
        self.generated_tokens = Counter("dgemma_generated_tokens", "generated non-pad tokens", registry=r)
        self.requests = Counter("dgemma_requests", "answered HTTP requests", ["endpoint", "status"], registry=r)
        self.passes_per_canvas = Histogram("dgemma_passes_per_canvas", "decoder passes per committed canvas",
                                           buckets=_PASS_BUCKETS, registry=r)
        self.latency = Histogram("dgemma_request_latency_seconds", "request latency, arrival to the last byte",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_canvas = Histogram("dgemma_first_canvas_seconds", "arrival to the first committed canvas",
                                      buckets=_LATENCY_BUCKETS, registry=r)

    def canvas(self, tokens: int, passes: int) -> None:
        self.generated_tokens.inc(tokens)
        self.rate.add(tokens)
        self.passes_per_canvas.observe(passes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
