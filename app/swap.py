"""Hot swap triggers. Every swap is the same act: the Gunicorn master reloads
its registry from the repository (on SIGHUP, in the on_reload hook) and forks
fresh workers from it, so weights stay shared; old workers finish their
requests and close their connections cleanly (see app/worker.py).

This module sends that SIGHUP: to this host's master directly, and to other
hosts' masters through a Redis message that one worker on each host turns
into a SIGHUP of its own master.
"""
from __future__ import annotations

import logging
import os
import signal
import uuid
from pathlib import Path

from app.control import ControlChannel

log = logging.getLogger(__name__)


class SwapTrigger:
    def __init__(self, control: ControlChannel, host_id: str, claims_dir: Path):
        self.control = control
        self.host_id = host_id
        self.claims_dir = claims_dir

    def request(self, reason: str) -> dict:
        """Called in a worker: reload this host now, and every other host."""
        os.kill(os.getppid(), signal.SIGHUP)
        delivered = self.control.publish({"op": "reload", "origin": self.host_id, "id": uuid.uuid4().hex,
                                          "reason": reason})
        return {"this_host": "reloading", "other_hosts_notified": delivered}

    def on_message(self, message: dict) -> None:
        """A reload message from the control channel: the first worker of this
        host to claim it signals the master; the host that sent it already has."""
        if message.get("origin") == self.host_id or not self.claim(str(message.get("id", ""))):
            return
        log.info("reload requested through the control channel: %s", message.get("reason"))
        os.kill(os.getppid(), signal.SIGHUP)

    def claim(self, message_id: str) -> bool:
        if not message_id.isalnum():
            return False
        try:
            os.close(os.open(self.claims_dir / f"reload-{message_id}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


def notify_servers(redis_url: str, pid_file: Path, reason: str) -> str:
    """From the CLI: tell running servers that the repository changed.
    Returns what was done, for the user."""
    if redis_url:
        delivered = ControlChannel(redis_url).publish({"op": "reload", "origin": "cli", "id": uuid.uuid4().hex,
                                                       "reason": reason})
        if delivered:
            return f"reload sent to {delivered} worker(s) through Redis"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return f"no running server found (no Redis message delivered, no master at {pid_file}); " \
               "the change applies when a server starts"
    return f"sent SIGHUP to the master (pid {pid})"
