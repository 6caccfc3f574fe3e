"""The WSGI entry point: the one place that builds the application from settings.

Gunicorn imports this in the master (preload_app), so every model is loaded
once and shared copy-on-write with the forked workers.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import falcon

from app import settings as settings_module
from app.api import create_app
from app.metrics import Metrics
from app.registry import Registry, read_model_config
from app.repository import ModelRepository

log = logging.getLogger("mlserve")


class Service:
    """The loaded parts of one server: settings, registry, metrics, app."""

    def __init__(self, settings: settings_module.Settings):
        self.settings = settings
        started = time.time()
        repository = ModelRepository(Path(settings.models.directory))
        plan = read_model_config(Path(settings.models.config), repository)
        self.registry = Registry(repository, plan, settings.models.verify_tolerance)
        self.registry.load_all()
        self.metrics = Metrics()
        self.app: falcon.App = create_app(settings, self.registry, self.metrics, started)
        log.info("loaded %d of %d models in %.2f s", len(self.registry.serving), len(plan), time.time() - started)

    def on_worker_start(self) -> None:
        self.metrics.set_serving(self.registry.serving)
        self.metrics.start_flushing()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")


def get_service() -> Service:
    settings = settings_module.load()
    configure_logging(settings.monitoring.log_level)
    return Service(settings)


service = get_service()
application = service.app
