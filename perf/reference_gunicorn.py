"""Gunicorn configuration for the reference apps: the Gunicorn settings the
server itself gets (app.settings.gunicorn_options, from the same MLSERVE_*
environment), without the server's hooks, which would load its models and
metrics into the reference workers."""
import gc
import logging
import os

from app import settings

globals().update(settings.gunicorn_options(settings.load()))
preload_app = True
control_socket_disable = True


def when_ready(server):
    # As the server does, so neither side pays for collecting preloaded objects.
    gc.collect()
    gc.freeze()


def worker_exit(server, worker):
    # ONNX Runtime's exit handlers hang in a forked worker (see app/server/hooks.py).
    logging.shutdown()
    os._exit(0)
