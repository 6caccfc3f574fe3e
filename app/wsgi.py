"""The WSGI entry point: the one place that builds the application from settings.

Gunicorn imports this in the master (preload_app), so every model is loaded
once and shared copy-on-write with the forked workers.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import falcon
import pybreaker

from app import settings as settings_module
from app.api import Drain, create_app
from app.cache import LRU, BreakerMetrics, Generations, PredictionCache, RedisStore
from app.control import ControlChannel
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.registry import Registry, read_model_config
from app.repository import ModelRepository
from app.shadow import ShadowScorer
from app.swap import SwapTrigger

log = logging.getLogger("mlserve")


class Service:
    """The loaded parts of one server: settings, registry, metrics, app."""

    def __init__(self, settings: settings_module.Settings):
        self.settings = settings
        started = time.time()
        repository = ModelRepository(Path(settings.models.directory))
        config = Path(settings.models.config)
        self.registry = Registry(repository, read_model_config(config, repository),
                                 settings.models.verify_tolerance, config_path=config)
        self.registry.load_all()
        self.metrics = Metrics()
        self.cache = build_cache(settings, self.metrics)
        self.control = ControlChannel(settings.redis.url, settings.redis.connect_timeout * 10)
        if self.cache is not None:
            self.control.on("invalidate", lambda message: self.cache.invalidate_local(message.get("model")))
        # Made in the master, so every worker of this host shares them.
        self.swap = SwapTrigger(self.control, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}",
                                Path(tempfile.mkdtemp(prefix="mlserve-claims-")))
        self.control.on("reload", self.swap.on_message)
        self.drain = Drain()
        self.app: falcon.App = create_app(
            settings, self.registry, self.metrics, started, cache=self.cache, control=self.control,
            lifecycle=Lifecycle(repository, settings.models.verify_tolerance), swap=self.swap,
            shadow=ShadowScorer(self.metrics), drain=self.drain)
        log.info("loaded %d of %d models in %.2f s", len(self.registry.serving), len(self.registry.plan),
                 time.time() - started)

    def reload(self) -> None:
        """In the master, on SIGHUP: apply repository and config changes before
        Gunicorn forks the new workers."""
        started = time.time()
        results = self.registry.refresh()
        self.metrics.swapped(results)
        for model, result, detail in results:
            if result != "unchanged":
                log.info("reload %s: %s (%s)", model, result, detail)
        log.info("reloaded in %.2f s", time.time() - started)

    def on_worker_start(self) -> None:
        self.metrics.set_serving(self.registry.serving)
        self.metrics.start_flushing()
        self.control.start()


def build_cache(settings: settings_module.Settings, metrics: Metrics) -> PredictionCache | None:
    options = settings.cache
    if not options.enabled:
        return None
    l1 = LRU(options.l1_max_entries, options.l1_max_bytes, options.l1_ttl) if options.l1_max_entries else None
    l2 = None
    if settings.redis.url and options.l2_enabled:
        breaker = pybreaker.CircuitBreaker(fail_max=options.breaker_failures, reset_timeout=options.breaker_reset,
                                           listeners=[BreakerMetrics(metrics)], name="redis")
        redis = settings.redis
        l2 = RedisStore(redis.url, redis.cache_ttl, redis.connect_timeout, redis.socket_timeout,
                        redis.pool_size, breaker, metrics)
    if l1 is None and l2 is None:
        return None
    return PredictionCache(l1, l2, Generations(), metrics)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")


def get_service() -> Service:
    settings = settings_module.load()
    configure_logging(settings.monitoring.log_level)
    return Service(settings)


service = get_service()
application = service.app
