"""The WSGI entry point: Gunicorn loads `app.server.wsgi:get_app()`.

With preload_app, get_app() runs once, in the master, before the workers
are forked: every model is loaded there and shared with them. Importing this
module loads nothing.
"""
from __future__ import annotations

import os
import signal

import falcon

from app import logs
from app import settings as settings_module
from app.server.service import Service, build_service
from app.server import runtime

_service: Service | None = None


def get_app() -> falcon.App:
    global _service
    if _service is None:
        settings = settings_module.load()
        logs.configure(settings.monitoring.log_level)
        logs.quiet_library_warnings()
        _service = build_service(settings, signal_master, runtime.directory())
    return _service.app


def service() -> Service:
    """The service get_app() built (the server hooks act on it)."""
    if _service is None:
        raise RuntimeError("get_app() has not run in this process")
    return _service


def signal_master() -> None:
    """Called in a worker: its master reloads on SIGHUP."""
    os.kill(os.getppid(), signal.SIGHUP)

