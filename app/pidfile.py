"""The master's pid file: which process it is (pid and start time, so a
reused pid is never taken for it) and which model repository it serves. The
server writes it once it listens (app/server/runtime.py); the CLI reads it
before it signals anything."""
from __future__ import annotations

import json
import os
from pathlib import Path


class StalePidFile(Exception):
    """The pid file names no live master of this repository; the message says why."""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def workers(pid: int) -> set[int]:
    """The master's child processes (its Gunicorn workers)."""
    try:
        return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))
    except OSError:
        return set()


def write(path: Path, pid: int, models_dir: str) -> None:
    record = {"pid": pid, "start_time": start_time(pid), "models_dir": str(Path(models_dir).resolve())}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def remove(path: Path, pid: int) -> None:
    """Remove the file if pid wrote it (another master may have written it since)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("pid") == pid:
        path.unlink(missing_ok=True)


def master(path: Path, models_dir: str) -> int | None:
    """The pid of the live master that wrote path and serves models_dir; None
    when there is no file; StalePidFile when the file names anything else."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise StalePidFile(f"{path} is not a pid file mlserve wrote") from None
    pid = record.get("pid") if isinstance(record, dict) else None
    if type(pid) is not int or start_time(pid) is None or start_time(pid) != record.get("start_time"):
        raise StalePidFile(f"{path} is stale: no mlserve master runs as pid {pid} (a server that stopped "
                           "without removing it?)")
    wanted = str(Path(models_dir).resolve())
    if record.get("models_dir") != wanted:
        raise StalePidFile(f"the master in {path} (pid {pid}) serves {record.get('models_dir')}, not {wanted}")
    return pid
