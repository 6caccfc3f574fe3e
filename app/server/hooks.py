"""Gunicorn's server hooks, as gunicorn.conf.py installs them: what runs in
the master (starting, reload, child exit) and in each worker (after fork,
after init, at exit)."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import queue
import signal
import sys
from pathlib import Path

from app.server import runtime

PR_SET_PDEATHSIG = 1
log = logging.getLogger("mlserve")


def service():
    # NOTE: imported here, not at the top: gunicorn.conf.py imports this module
    # before prepare_metrics() has set PROMETHEUS_MULTIPROC_DIR, which must
    # happen before anything imports prometheus_client.
    from app.server import wsgi

    return wsgi.service()


def prepare_metrics(configured_dir: str) -> None:
    # prometheus_client picks multiprocess mode when it is first imported, so
    # the directory must be in the environment before the app is loaded. Kept
    # across SIGHUP (the config file is read again then).
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(runtime.metrics_directory(configured_dir))


def check_models_config(settings) -> None:
    """A broken models.yaml stops the start with one line (a reload keeps the old list)."""
    from app.plan import read_plan
    from app.settings import SettingError

    try:
        read_plan(Path(settings.models.config))
    except SettingError as exc:
        sys.exit(f"mlserve: bad setting: {exc}")


def on_starting(server) -> None:
    # Files left by an earlier run would be counted as this run's. The
    # master's own (made as the app loaded, before this hook) stay: it counts
    # the workers that die.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(path):
        if name.endswith(".db") and not name.endswith(f"_{os.getpid()}.db"):
            os.unlink(os.path.join(path, name))


def when_ready(server) -> None:
    # Listening now: only from here may the CLI find and signal this master.
    settings = service().settings
    runtime.write_pid_file(Path(settings.pid_path), settings.models.directory)
    freeze()
    running = service()
    running.follower.ensure(running)


def on_reload(server) -> None:
    # SIGHUP: the master loads what changed, then Gunicorn forks new workers
    # from it and retires the old ones gracefully.
    folded = fold_queued_reloads(server)
    if folded:
        log.info("reload: %d more SIGHUP(s) queued before it began are answered by this one", folded)
    running = service()
    running.reload()
    freeze()
    # What is followed may have changed (mlserve models follow reloads).
    running.follower.ensure(running)


def fold_queued_reloads(server) -> int:
    """Drop the SIGHUPs waiting in Gunicorn's signal queue, keeping the other
    signals in order; how many were dropped. This reload reads the repository
    after they arrived, so it answers them all: ten SIGHUPs in a second make
    one swap (two, if one arrives while this reload runs), not ten in a row."""
    queued, folded = [], 0
    while True:
        try:
            sig = server.SIG_QUEUE.get_nowait()
        except queue.Empty:
            break
        if sig == signal.SIGHUP:
            folded += 1
        else:
            queued.append(sig)
    for sig in queued:
        server.SIG_QUEUE.put_nowait(sig)
    return folded


def on_exit(server) -> None:
    from app.server import wsgi

    if wsgi._service is not None:  # None when loading the app failed
        wsgi._service.follower.stop()


def freeze() -> None:
    # Objects allocated while loading models move to a permanent generation, so
    # the collector never touches (and copies) their pages in the workers.
    gc.collect()
    gc.freeze()


def post_fork(server, worker) -> None:
    # A worker whose master is gone (killed with SIGKILL, OOM) must not linger
    # holding the port and the models: have the kernel send it SIGTERM.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def post_worker_init(worker) -> None:
    running = service()
    worker.drain = running.drain
    worker.max_body_bytes = running.settings.server.max_body_bytes
    use_batching(worker, running)
    running.on_worker_start()


def use_batching(worker, running) -> None:
    """Give the batcher the scheduler this worker can gather requests with (app/batching.py).
    Without a batching model nothing changes on the request path."""
    if not any(state.batching for state in running.registry.models.values()):
        return
    if hasattr(worker, "batching"):  # the meinheld worker: requests are greenlets of one loop
        from app.server.greenlets import GreenletScheduler

        worker.batching = GreenletScheduler(running.batcher, running.drain, [s.fileno() for s in worker.sockets])
        running.batcher.scheduler = worker.batching
    elif worker.cfg.threads > 1:  # gthread
        from app.batching import ThreadScheduler

        running.batcher.scheduler = ThreadScheduler()


def worker_exit(server, worker) -> None:
    running = service()
    running.predictions.flush(timeout=2.0)
    running.metrics.flush()
    # Tells the master (child_exit) that this worker was retired, not lost.
    runtime.directory().joinpath(f"exited-{os.getpid()}").touch()
    # Leave without running C-level exit handlers: ONNX Runtime's destroy a
    # condition variable last used by a master thread that does not exist in
    # the forked worker, and would wait on it for ever.
    logging.shutdown()
    os._exit(0)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    retired = runtime.directory() / f"exited-{worker.pid}"
    if retired.exists():
        retired.unlink()
    else:  # killed, crashed or timed out: the master forks a replacement
        service().metrics.worker_died()
