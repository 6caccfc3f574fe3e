"""How the CLI finds the servers it talks to: a URL for the commands that ask
a running server, and the reload that tells running servers the repository
changed (a Redis message when Redis is configured, else SIGHUP to the master
named in the pid file)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from app import pidfile
from app.cli.errors import UsageError
from app.client import MLClient
from app.settings import Settings


# How long the CLI waits for a master's old workers to retire after a SIGHUP.
REPLACE_SECONDS = 30


def default_url(settings: Settings) -> str:
    """MLSERVE_URL (cli.url) when set, else where `mlserve serve` listens with these settings."""
    if settings.cli.url:
        return settings.cli.url
    host, port = settings.server.host, settings.server.port
    # A wildcard bind is reached through loopback; IPv6 literals need brackets in a URL.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def client(url: str | None, settings: Settings | None, api_key: str | None = None) -> MLClient:
    try:
        return MLClient(url or default_url(settings), api_key=api_key or (settings.cli.api_key if settings else None))
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None


def notify_servers(redis_url: str, pid_file: Path, models_dir: str, reason: str) -> str:
    """Tell running servers that the repository changed; what was done, for the user.
    A pid file that names anything but a live master of this repository is not signalled."""
    if redis_url:
        from app.control import ControlChannel  # the server install's redis client
        from app.reload import reload_message

        delivered = ControlChannel(redis_url).publish(reload_message("cli", reason))
        if delivered:
            return f"reload sent to {delivered} worker(s) through Redis"
    try:
        pid = pidfile.master(pid_file, models_dir)
    except pidfile.StalePidFile as exc:
        return f"signalled nothing: {exc}"
    if pid is None:
        where = "no Redis (redis.url)" if not redis_url else f"no worker listening on {redis_url}"
        return (f"no running server found: no pid file at {pid_file} (server.pid_file), {where}; the change "
                "applies when a server starts (a server elsewhere: use --url or MLSERVE_URL)")
    old = pidfile.workers(pid)
    os.kill(pid, signal.SIGHUP)
    # Back once the workers that served the old state are gone, so that the
    # next command (or request) sees the change.
    deadline = time.monotonic() + REPLACE_SECONDS
    while pidfile.workers(pid) & old and time.monotonic() < deadline:
        time.sleep(0.05)
    if pidfile.workers(pid) & old:
        return f"sent SIGHUP to the master (pid {pid}); its old workers are still finishing their requests"
    return f"sent SIGHUP to the master (pid {pid}); its workers now serve the change"
