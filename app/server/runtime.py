"""The master's runtime directory: what the processes of one server share on
disk (per-worker metric files, reload claims), made when the master starts
and removed when it exits, however it exits."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "mlserve-run-"
_directory: list[Path] = []


def directory() -> Path:
    """This master's directory, made on first use."""
    if not _directory:
        path = Path(tempfile.mkdtemp(prefix=PREFIX))
        _directory[:] = [path]
        owner = os.getpid()
        # Forked workers inherit atexit handlers; only the master removes it.
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return _directory[0]


def metrics_directory(configured: str) -> Path:
    """Where workers write their metric files: the configured directory, else ours."""
    path = Path(configured) if configured else directory() / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    return path
