"""The control channel: messages that every worker of every host must act on
(cache invalidation, model swaps), carried by Redis pub/sub when Redis is
configured. Each worker listens on its own thread, started after fork."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import orjson
import redis

from app.redis_client import connect

log = logging.getLogger(__name__)
CHANNEL = "mlserve:control"

Handler = Callable[[dict], None]


class ControlChannel:
    def __init__(self, url: str, connect_timeout: float = 0.5):
        self.url = url
        self.connect_timeout = connect_timeout
        self.handlers: dict[str, Handler] = {}
        self.listening_pid: int | None = None
        self.subscribed = threading.Event()

    def on(self, op: str, handler: Handler) -> None:
        self.handlers[op] = handler

    def publish(self, message: dict) -> int | None:
        """Send to every listening worker; the number that received it, or None
        without Redis (or when it is unreachable): the caller acts locally then."""
        if not self.url:
            return None
        try:
            client = connect(self.url, self.connect_timeout, self.connect_timeout)
            with client:
                return client.publish(CHANNEL, orjson.dumps(message))
        except (redis.RedisError, OSError) as exc:
            log.warning("control message %s not sent, Redis unavailable: %s", message.get("op"), exc)
            return None

    def start(self) -> None:
        """Listen in a daemon thread of this process (once per worker)."""
        if not self.url or self.listening_pid == os.getpid():
            return
        self.listening_pid = os.getpid()
        self.subscribed.clear()
        threading.Thread(target=self.listen_forever, name="control-listener", daemon=True).start()

    def listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                self.listen()
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("control channel lost (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    def listen(self) -> None:
        client = connect(self.url, self.connect_timeout, health_check_interval=10)
        with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(CHANNEL)
            self.subscribed.set()
            for message in pubsub.listen():
                self.dispatch(message.get("data"))

    def dispatch(self, data) -> None:
        try:
            message = orjson.loads(data)
            handler = self.handlers[message["op"]]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignored control message %r", data[:200] if isinstance(data, bytes) else data)
            return
        try:
            handler(message)
        except Exception:
            log.exception("control message %s failed", message.get("op"))
