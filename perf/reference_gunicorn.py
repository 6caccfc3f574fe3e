"""Gunicorn hooks for the reference apps. Passing -c stops Gunicorn from
reading ./gunicorn.conf.py, whose hooks would load the server's models and
metrics into the reference workers; the settings that shape throughput come
from the command line perf/targets.py builds from app.settings."""
import gc
import logging
import os

control_socket_disable = True


def when_ready(server):
    # As gunicorn.conf.py does, so neither side pays for collecting preloaded objects.
    gc.collect()
    gc.freeze()


def worker_exit(server, worker):
    # ONNX Runtime's exit handlers hang in a forked worker (see gunicorn.conf.py).
    logging.shutdown()
    os._exit(0)
