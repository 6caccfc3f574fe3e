"""The master's runtime files: a directory for what the processes of one
server share (per-worker metric files, reload claims), and the pid file the
CLI reads to signal this master (app/pidfile.py). Both are made by the master
and removed when it exits; after a SIGKILL, by the next master to start."""
from __future__ import annotations

import atexit
import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

from app import pidfile

PREFIX = "mlserve-run-"
_directory: list[Path] = []


def directory() -> Path:
    """This master's directory, made on first use; those of masters that were
    killed (and so could not remove theirs) are removed then."""
    if not _directory:
        sweep(Path(tempfile.gettempdir()))
        pid = os.getpid()
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{pidfile.start_time(pid)}-"))
        _directory[:] = [path]
        at_master_exit(lambda: shutil.rmtree(path, ignore_errors=True))
    return _directory[0]


def sweep(parent: Path) -> None:
    """Remove the directories of masters no longer running: named
    mlserve-run-<pid>-<start time>-..., so a reused pid does not keep one alive."""
    for path in parent.glob(PREFIX + "*-*-*"):
        pid, _, rest = path.name[len(PREFIX):].partition("-")
        started = rest.partition("-")[0]
        if pid.isdigit() and started.isdigit() and str(pidfile.start_time(int(pid))) != started:
            shutil.rmtree(path, ignore_errors=True)


def metrics_directory(configured: str) -> Path:
    """Where workers write their metric files: the configured directory, else ours."""
    path = Path(configured) if configured else directory() / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    return path


def at_master_exit(action) -> None:
    # Forked workers inherit atexit handlers; only the master acts.
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and action())


def check_port_free(host: str, port: int) -> str | None:
    """Why the address cannot be listened on, or None. Asked before the models
    load, so a busy port costs one line, not a load and five retries."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use by another program"
            return f"cannot listen on {host}:{port} ({exc.strerror})"
    return None


def write_pid_file(path: Path, models_dir: str) -> None:
    """Written once the master listens, removed when it exits."""
    pidfile.write(path, os.getpid(), models_dir)
    at_master_exit(lambda: pidfile.remove(path, os.getpid()))
