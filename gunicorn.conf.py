"""Gunicorn settings, all taken from app.settings (config/server.yaml and
MLSERVE_* environment variables). Run: gunicorn -c gunicorn.conf.py"""
import ctypes
import gc
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile

# The workers are the parallelism: numeric libraries get one thread each.
# Set before numpy is imported, so the master forks with no BLAS threads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from app import settings as settings_module  # noqa: E402

try:
    _settings = settings_module.load()
except settings_module.SettingError as exc:
    _settings = getattr(settings_module, "last_good", None)
    if _settings is None:
        sys.exit(f"mlserve: bad setting: {exc}")
    # A bad edit before a SIGHUP must not take down a running server.
    print(f"mlserve: bad setting, keeping the running settings: {exc}", file=sys.stderr)
settings_module.last_good = _settings

_server = _settings.server
PR_SET_PDEATHSIG = 1

wsgi_app = "app.wsgi:application"
bind = [_settings.bind]
workers = _server.workers
if _server.worker_class == "meinheld" and importlib.util.find_spec("meinheld"):
    worker_class = "app.worker.MeinheldWorker"
else:
    worker_class = "gthread"
    threads = _server.threads
worker_connections = _server.worker_connections
timeout = _server.timeout
graceful_timeout = _server.graceful_timeout
keepalive = _server.keepalive
max_requests = _server.max_requests
max_requests_jitter = _server.max_requests_jitter
pidfile = _settings.pid_path
accesslog = "-" if _settings.monitoring.access_log else None
loglevel = _settings.monitoring.log_level
# Hot swap and shutdown go through signals; no second control channel.
control_socket_disable = True
# Models load once in the master and are shared copy-on-write with the workers.
preload_app = True

# prometheus_client picks multiprocess mode when it is first imported, so the
# directory must be in the environment before the app is loaded. Kept across
# SIGHUP (this file is read again then); wiped once, when the master starts.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = (_settings.monitoring.metrics_dir
                                              or tempfile.mkdtemp(prefix="mlserve-metrics-"))
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def on_starting(server):
    # Files left by an earlier run would be counted as this run's.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def when_ready(server):
    freeze()


def on_reload(server):
    # SIGHUP: the master loads what changed, then Gunicorn forks new workers
    # from it and retires the old ones gracefully.
    from app.wsgi import service

    service.reload()
    freeze()


def freeze():
    # Objects allocated while loading models move to a permanent generation, so
    # the collector never touches (and copies) their pages in the workers.
    gc.collect()
    gc.freeze()


def post_fork(server, worker):
    # A worker whose master is gone (killed with SIGKILL, OOM) must not linger
    # holding the port and the models: have the kernel send it SIGTERM.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def post_worker_init(worker):
    from app.wsgi import service

    service.on_worker_start()


def worker_exit(server, worker):
    from app.wsgi import service

    service.metrics.flush()
    # Leave without running C-level exit handlers: ONNX Runtime's destroy a
    # condition variable last used by a master thread that does not exist in
    # the forked worker, and would wait on it for ever.
    logging.shutdown()
    os._exit(0)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if os.environ["PROMETHEUS_MULTIPROC_DIR"].startswith(tempfile.gettempdir() + "/mlserve-metrics-"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
