"""Prometheus metrics, aggregated over every worker (multiprocess mode).

PROMETHEUS_MULTIPROC_DIR is set by gunicorn.conf.py before this module is
imported; without it (unit tests, one process) metrics live in memory.

PERF: writing a multiprocess metric is a locked mmap write (~1 us each, three
per request). Requests are counted into plain in-process tallies instead and
flushed into the Prometheus values every FLUSH_SECONDS by a background
thread, and before every scrape, so a scrape lags other workers by at most
that long.
"""
from __future__ import annotations

import os
import threading
from bisect import bisect_left

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
FLUSH_SECONDS = 1.0


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
        self.cache_lookups = Counter("mlserve_cache_lookups", "Cache lookups by level (l1, l2), model and result (hit, miss).",
                                     ["level", "model", "result"], registry=self.registry)
        self.l2_latency = Histogram("mlserve_cache_l2_duration_seconds", "Redis round trips of the cache.",
                                    buckets=BUCKETS, registry=self.registry)
        self.breaker_state = Gauge("mlserve_cache_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open, 2 open.",
                                   multiprocess_mode="livemax", registry=self.registry)
        self.breaker_transitions = Counter("mlserve_cache_breaker_transitions", "Circuit breaker state changes.",
                                           ["state"], registry=self.registry)
        self.swaps = Counter("mlserve_model_swaps", "Model reloads by result (swapped, refused, unchanged).",
                             ["model", "result"], registry=self.registry)
        self.shadow_comparisons = Counter("mlserve_shadow_comparisons", "Shadow scoring by result (agree, disagree, error).",
                                          ["model", "primary", "shadow", "result"], registry=self.registry)
        self.shadow_diff = Histogram("mlserve_shadow_abs_diff", "Absolute difference of shadow and primary (regression).",
                                     ["model", "primary", "shadow"], registry=self.registry,
                                     buckets=(1e-6, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0))
        self.model_ready = Gauge("mlserve_model_ready", "1 when a configured model is serving, else 0.",
                                 ["model"], multiprocess_mode="livemax", registry=self.registry)
        self.worker_deaths = Counter("mlserve_worker_unexpected_exits", "Workers that exited without being "
                                     "retired (killed, crashed, timed out); the master replaces them.",
                                     registry=self.registry)
        self.log_written = Counter("mlserve_prediction_log_records", "Prediction records written, by sink "
                                   "(for the http sink: request and response event pairs).", ["sink"],
                                   registry=self.registry)
        self.log_dropped = Counter("mlserve_prediction_log_dropped", "Prediction records not written, by sink "
                                   "and reason (queue_full, sink_behind, sink_error, no_lane).", ["sink", "reason"],
                                   registry=self.registry)
        # Computed at scrape time from what every worker shares (drift PSI).
        self.collectors: list = []
        self.alias_checks = Counter("mlserve_alias_checks", "Followed MLflow aliases that moved or could not be read, "
                                    "by model and result (promoted, refused, failed).", ["model", "result"],
                                    registry=self.registry)
        self.batch_rows = Histogram("mlserve_batch_size", "Rows per batched runtime call (app/batching.py).",
                                    ["model", "version"], buckets=BATCH_ROWS, registry=self.registry)
        self.batch_wait = Histogram("mlserve_batch_queue_wait_seconds", "Time a request's rows waited for their "
                                    "batch to run.", ["model", "version"], buckets=QUEUE_BUCKETS, registry=self.registry)
        self.batch_run = Histogram("mlserve_batch_run_seconds", "Runtime time of one batched call.",
                                   ["model", "version"], buckets=BUCKETS, registry=self.registry)
        self.lock = threading.Lock()
        # (model, version, endpoint, status) -> [count, seconds, per-bucket counts]
        self.pending: dict[tuple, list] = {}
        # (counter, labels) -> count, for the other hot-path counters
        self.pending_counts: dict[tuple, int] = {}
        self.flusher: threading.Thread | None = None

    def observe(self, model: str, version: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, version, endpoint, status)
        with self.lock:
            tally = self.pending.get(key)
            if tally is None:
                tally = self.pending[key] = [0, 0.0, [0] * (len(BUCKETS) + 1)]
            tally[0] += 1
            tally[1] += seconds
            # Prometheus buckets are "le": the first bound >= seconds.
            tally[2][bisect_left(BUCKETS, seconds)] += 1

    def cache_lookup(self, level: str, model: str, hit: bool, n: int = 1) -> None:
        if n:
            key = (self.cache_lookups, (level, model, "hit" if hit else "miss"))
            with self.lock:
                self.pending_counts[key] = self.pending_counts.get(key, 0) + n

    def batch_ran(self, model: str, version: str, rows: int, seconds: float, waits: list[float]) -> None:
        """One batched call of rows, run in seconds, for requests that waited waits seconds each."""
        self.batch_rows.labels(model, version).observe(rows)
        self.batch_run.labels(model, version).observe(seconds)
        wait = self.batch_wait.labels(model, version)
        for waited in waits:
            wait.observe(waited)

    def observe_l2(self, seconds: float) -> None:
        self.l2_latency.observe(seconds)

    def breaker_changed(self, state: int, name: str) -> None:
        self.breaker_state.set(state)
        self.breaker_transitions.labels(name).inc()

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
            counts, self.pending_counts = self.pending_counts, {}
        for (counter, labels), n in counts.items():
            counter.labels(*labels).inc(n)
        for (model, version, endpoint, status), (count, seconds, buckets) in pending.items():
            self.requests.labels(model, version, endpoint, str(status)).inc(count)
            histogram = self.latency.labels(model, version, endpoint)
            # NOTE: prometheus_client has no observe-many; these are the
            # values Histogram.observe() itself increments.
            histogram._sum.inc(seconds)
            for i, n in enumerate(buckets):
                if n:
                    histogram._buckets[i].inc(n)

    def start_flushing(self, interval: float = FLUSH_SECONDS) -> None:
        """Flush from a daemon thread in this process (call once per worker, after fork)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                self.flush()

        self.flusher = threading.Thread(target=loop, name="metrics-flush", daemon=True)
        self.flusher.start()

    def swapped(self, results: list[tuple[str, str, str]]) -> None:
        for model, result, _ in results:
            self.swaps.labels(model, result).inc()

    def alias_checked(self, model: str, result: str) -> None:
        self.alias_checks.labels(model, result).inc()

    def shadow_compared(self, primary, shadow, agreed: list[bool], diffs: list[float] | None) -> None:
        labels = (primary.name, str(primary.version), str(shadow.version))
        agree = sum(agreed)
        if agree:
            self.shadow_comparisons.labels(*labels, "agree").inc(agree)
        if len(agreed) - agree:
            self.shadow_comparisons.labels(*labels, "disagree").inc(len(agreed) - agree)
        for diff in diffs or ():
            self.shadow_diff.labels(*labels).observe(diff)

    def shadow_error(self, primary, shadow) -> None:
        self.shadow_comparisons.labels(primary.name, str(primary.version), str(shadow.version), "error").inc()

    def set_serving(self, serving: dict) -> None:
        self.models_loaded.set(len(serving))
        for name, model in serving.items():
            self.serving_version.labels(name).set(model.version)

    def set_ready(self, configured: list[str], serving: dict) -> None:
        for name in configured:
            self.model_ready.labels(name).set(1 if name in serving else 0)

    def worker_died(self) -> None:
        self.worker_deaths.inc()

    def prediction_log_sinks(self, sinks: list[str]) -> None:
        """Show every sink's counters from the start (at 0), so rates and alerts see them."""
        for sink in sinks:
            if sink != "drift":
                self.log_written.labels(sink)
            for reason in ("queue_full", "sink_behind", "sink_error") if sink != "drift" else ("queue_full", "no_lane"):
                self.log_dropped.labels(sink, reason)

    def prediction_log_written(self, sink: str, n: int) -> None:
        self.log_written.labels(sink).inc(n)

    def prediction_log_dropped(self, sink: str, reason: str, n: int) -> None:
        self.log_dropped.labels(sink, reason).inc(n)

    def add_collector(self, collector) -> None:
        """A collector whose values every worker computes alike (from shared memory): one value per host."""
        self.collectors.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        self.flush()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            for collector in self.collectors:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)
