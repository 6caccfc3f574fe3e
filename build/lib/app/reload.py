"""Reloads: how a change to the repository reaches every serving process.

A reload is the same act wherever it starts: the Gunicorn master reloads its
registry from the repository (on SIGHUP, in the on_reload hook) and forks
fresh workers from it, so weights stay shared; old workers finish their
requests and close their connections cleanly (app/server/worker.py).

A worker asks its own master through signal_master (passed in: SIGHUP to the
parent under Gunicorn, a recorder in tests), and other hosts through a Redis
message that one worker on each host turns into a request to its master.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Callable

from app.control import ControlChannel

log = logging.getLogger(__name__)


class ReloadTrigger:
    def __init__(self, control: ControlChannel, host_id: str, claims_dir: Path, signal_master: Callable[[], None]):
        self.control = control
        self.host_id = host_id
        self.claims_dir = claims_dir
        self.signal_master = signal_master

    def request(self, reason: str) -> dict:
        """Called in a worker: reload this host now, and every other host."""
        self.signal_master()
        delivered = self.control.publish(reload_message(self.host_id, reason))
        return {"this_host": "reloading", "other_hosts_notified": delivered}

    def on_message(self, message: dict) -> None:
        """A reload message from the control channel: the first worker of this
        host to claim it asks the master; the host that sent it already has."""
        if message.get("origin") == self.host_id or not self.claim(str(message.get("id", ""))):
            return
        log.info("reload requested through the control channel: %s", message.get("reason"))
        self.signal_master()

    def claim(self, message_id: str) -> bool:
        if not message_id.isalnum():
            return False
        try:
            self.claims_dir.mkdir(parents=True, exist_ok=True)
            (self.claims_dir / f"reload-{message_id}").open("x").close()
        except FileExistsError:
            return False
        return True


def reload_message(origin: str, reason: str) -> dict:
    return {"op": "reload", "origin": origin, "id": uuid.uuid4().hex, "reason": reason}
