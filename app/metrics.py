"""Prometheus metrics, aggregated over every worker (multiprocess mode).

PROMETHEUS_MULTIPROC_DIR is set by gunicorn.conf.py before this module is
imported; without it (unit tests, one process) metrics live in memory.
"""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("mlserve_requests", "Requests by model, version, endpoint and status.",
                                ["model", "version", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("mlserve_request_duration_seconds", "Server time per request.",
                                 ["model", "version", "endpoint"], buckets=BUCKETS, registry=self.registry)
        self.models_loaded = Gauge("mlserve_models_loaded", "Models serving in this worker.",
                                   multiprocess_mode="livemax", registry=self.registry)
        self.serving_version = Gauge("mlserve_model_serving_version", "Version serving per model.",
                                     ["model"], multiprocess_mode="livemax", registry=self.registry)
        # PERF: label resolution costs more than the increment; bind each label set once.
        self.bound: dict[tuple, tuple] = {}

    def observe(self, model: str, version: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, version, endpoint, status)
        children = self.bound.get(key)
        if children is None:
            children = self.bound[key] = (self.requests.labels(model, version, endpoint, str(status)),
                                          self.latency.labels(model, version, endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def set_serving(self, serving: dict) -> None:
        self.models_loaded.set(len(serving))
        for name, model in serving.items():
            self.serving_version.labels(name).set(model.version)

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
