"""The composition root: one server's parts, built from settings.

build_service() is called once, in the Gunicorn master (app/server/wsgi.py),
so every model is loaded once and shared copy-on-write with the forked
workers. Nothing here runs at import.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import falcon
import pybreaker

from app.batching import Batcher
from app.cache import LRU, BreakerMetrics, Generations, PredictionCache, RedisStore
from app.control import ControlChannel
from app.drift import DriftMonitor, Thresholds
from app.http.app import Drain, create_app
from app.keys import KeyStore
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.plan import read_plan
from app.predictions import PredictionLog
from app.registry import Registry
from app.reload import ReloadTrigger
from app.repository import ModelRepository
from app.server.follower import FollowerProcess
from app.settings import SettingError, Settings
from app.shadow import ShadowScorer
from app.sinks import CloudEventSink, FileSink, RedisStreamSink, Sink

log = logging.getLogger("mlserve")


@dataclass
class Service:
    settings: Settings
    registry: Registry
    metrics: Metrics
    cache: PredictionCache | None
    control: ControlChannel
    reloads: ReloadTrigger
    drain: Drain
    app: falcon.App
    predictions: PredictionLog
    drift: DriftMonitor | None
    follower: FollowerProcess = field(default_factory=FollowerProcess)
    batcher: Batcher = field(default_factory=Batcher)

    def reload(self) -> None:
        """In the master, on SIGHUP: apply repository and config changes before
        Gunicorn forks the new workers."""
        started = time.time()
        results = self.registry.refresh()
        if self.drift is not None:
            self.drift.prepare(loaded_versions(self.registry))
        self.metrics.swapped(results)
        for model, result, detail in results:
            if result != "unchanged":
                log.info("reload %s: %s (%s)", model, result, detail)
        log.info("reloaded in %.2f s", time.time() - started)

    def on_worker_start(self) -> None:
        """In each worker, after fork: what owns a thread or a socket starts here."""
        self.metrics.set_serving(self.registry.serving())
        self.metrics.set_ready(list(self.registry.models), self.registry.serving())
        self.metrics.start_flushing()
        self.control.start()
        self.predictions.start()


def build_service(settings: Settings, signal_master: Callable[[], None], runtime_dir: Path) -> Service:
    """Load the models and assemble the app. signal_master asks this host's
    master to reload; runtime_dir holds what the host's processes share."""
    started = time.time()
    repository = ModelRepository(Path(settings.models.directory))
    plan = functools.partial(read_plan, Path(settings.models.config))
    registry = Registry(repository, plan, settings.models.verify_tolerance, settings.models.reconvert)
    registry.refresh()
    metrics = Metrics()
    cache = build_cache(settings, metrics)
    drift = build_drift(settings, registry, metrics)
    predictions = build_prediction_log(settings, metrics, cache, drift)
    control = ControlChannel(settings.redis.url, settings.redis.connect_timeout * 10)
    if cache is not None:
        control.on("invalidate", lambda message: cache.invalidate_local(message.get("model")))
    # Made in the master, so every worker of this host shares them.
    reloads = ReloadTrigger(control, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}",
                            runtime_dir / "claims", signal_master)
    control.on("reload", reloads.on_message)
    keys = build_keys(settings)
    if keys is not None:
        control.on("keys", lambda message: keys.refresh(force=True))
    drain = Drain()
    # Each worker gives it the scheduler its worker class can batch with (app/server/hooks.py).
    batcher = Batcher(metrics)
    app = create_app(settings, registry, metrics, started, cache=cache, control=control,
                     lifecycle=Lifecycle(repository, settings.models.verify_tolerance, plan), reloads=reloads,
                     shadow=ShadowScorer(metrics), drain=drain, predictions=predictions, drift=drift, keys=keys,
                     batcher=batcher)
    log.info("loaded %d of %d models in %.2f s", len(registry.serving()), len(registry.models),
             time.time() - started)
    return Service(settings, registry, metrics, cache, control, reloads, drain, app, predictions, drift,
                   batcher=batcher)


def build_keys(settings: Settings) -> KeyStore | None:
    if not settings.security.api_keys:
        return None
    keys = KeyStore(Path(settings.keys_path))
    keys.refresh()
    log.info("API keys required: %d active in %s%s", len(keys.by_id), settings.keys_path,
             "" if keys.by_id or settings.server.admin_token else
             " (none yet, and no admin token: create one with mlserve keys create)")
    return keys


def build_cache(settings: Settings, metrics: Metrics) -> PredictionCache | None:
    options = settings.cache
    if not options.enabled:
        return None
    l1 = LRU(options.l1_max_entries, options.l1_max_bytes, options.l1_ttl) if options.l1_max_entries else None
    l2 = None
    if settings.redis.url and options.l2_enabled:
        breaker = build_breaker(settings, metrics)
        redis = settings.redis
        l2 = RedisStore(redis.url, redis.cache_ttl, redis.connect_timeout, redis.socket_timeout,
                        redis.pool_size, breaker, metrics)
    if l1 is None and l2 is None:
        return None
    return PredictionCache(l1, l2, Generations(), metrics)


def build_breaker(settings: Settings, metrics: Metrics) -> pybreaker.CircuitBreaker:
    options = settings.cache
    return pybreaker.CircuitBreaker(fail_max=options.breaker_failures, reset_timeout=options.breaker_reset,
                                    listeners=[BreakerMetrics(metrics)], name="redis")


def loaded_versions(registry: Registry) -> list:
    return [model for state in registry.models.values() for model in state.versions.values()]


def build_drift(settings: Settings, registry: Registry, metrics: Metrics) -> DriftMonitor | None:
    """Drift state for every loaded version, in the master: the workers forked after share it."""
    options = settings.drift
    if not options.enabled:
        return None
    limits = Thresholds(options.warn_threshold, options.drift_threshold, options.epsilon, options.min_rows)
    # Old and new workers overlap during a swap: lanes for both, and a spare.
    drift = DriftMonitor(options.window_seconds, options.window_buckets, options.window_rows, options.baseline_rows,
                         limits, lanes=2 * settings.server.workers + 2)
    drift.prepare(loaded_versions(registry))
    metrics.add_collector(drift)
    return drift


def build_prediction_log(settings: Settings, metrics: Metrics, cache: PredictionCache | None,
                         drift: DriftMonitor | None) -> PredictionLog:
    options = settings.prediction_log
    sinks: list[Sink] = []
    if options.file:
        folder = Path(options.file).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise SettingError(f"prediction_log.file={options.file!r}: {folder} is not a writable directory")
        sinks.append(FileSink(options.file, options.file_max_bytes, options.file_backups, options.sink_buffer_bytes,
                              metrics))
    if options.redis_stream:
        if not settings.redis.url:
            raise SettingError(f"prediction_log.redis_stream={options.redis_stream!r}: needs redis.url")
        # The cache's breaker when there is one: Redis is down for both or neither.
        breaker = cache.l2.breaker if cache is not None and cache.l2 is not None else build_breaker(settings, metrics)
        sinks.append(RedisStreamSink(settings.redis.url, options.redis_stream, options.redis_maxlen,
                                     settings.redis.connect_timeout, settings.redis.socket_timeout, breaker,
                                     options.sink_buffer_bytes, metrics))
    if options.http_url:
        sinks.append(CloudEventSink(options.http_url, options.http_timeout, options.sink_buffer_bytes, metrics))
    return PredictionLog(sinks, drift, metrics, sample_rate=options.sample_rate, queue_rows=options.queue_rows,
                         flush_seconds=options.flush_seconds)
