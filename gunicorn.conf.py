"""Gunicorn's configuration: every value comes from app.settings
(config/server.yaml and MLSERVE_* environment variables), every hook from
app.server.hooks. Run: gunicorn -c gunicorn.conf.py"""
import os
import sys

# The workers are the parallelism: numeric libraries get one thread each.
# Set before numpy is imported, so the master forks with no BLAS threads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from app import settings as settings_module  # noqa: E402
from app.server import hooks  # noqa: E402

from app.server import runtime  # noqa: E402

_starting = getattr(settings_module, "last_good", None) is None  # else: re-read on SIGHUP
try:
    _settings = settings_module.load()
except settings_module.SettingError as exc:
    if _starting:
        sys.exit(f"mlserve: bad setting: {exc}")
    # A bad edit before a SIGHUP must not take down a running server.
    print(f"mlserve: bad setting, keeping the running settings: {exc}", file=sys.stderr)
    _settings = settings_module.last_good
settings_module.last_good = _settings
if _starting and (_busy := runtime.check_port_free(_settings.server.host, _settings.server.port)):
    sys.exit(f"mlserve: {_busy}; choose another port with server.port (MLSERVE_BIND=HOST:PORT)")

globals().update(settings_module.gunicorn_options(_settings))
wsgi_app = "app.server.wsgi:get_app()"
# Models load once in the master and are shared copy-on-write with the workers.
preload_app = True
# Hot swap and shutdown go through signals; no second control channel.
control_socket_disable = True
hooks.prepare_metrics(_settings.monitoring.metrics_dir)
if _starting:
    hooks.check_models_config(_settings)

on_starting = hooks.on_starting
when_ready = hooks.when_ready
on_reload = hooks.on_reload
post_fork = hooks.post_fork
post_worker_init = hooks.post_worker_init
worker_exit = hooks.worker_exit
child_exit = hooks.child_exit
on_exit = hooks.on_exit
