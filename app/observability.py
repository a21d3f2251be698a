"""Prometheus metrics of one app instance (its own registry, so several apps can share a process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("clipsearch_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("clipsearch_request_seconds", "HTTP request latency", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("clipsearch_batch_size", "inputs per model call", ["modality"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("clipsearch_queue_depth", "requests waiting for the model", ["modality"],
                                 registry=r)
        self.stage = Histogram("clipsearch_stage_seconds", "time per pipeline stage", ["stage"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("clipsearch_shed", "requests refused or dropped before the model",
                                ["modality", "reason"], registry=r)
        self.reloads = Counter("clipsearch_index_reloads", "index hot reloads", ["result"], registry=r)
        # process_resident_memory_bytes, CPU seconds, open fds: what a soak run watches for growth
        ProcessCollector(registry=r)
