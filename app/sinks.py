"""Where prediction records go: a JSON Lines file, a Redis stream, an HTTP
endpoint receiving CloudEvents (KServe's logger format).

Each sink has its own bounded buffer and thread in each worker, so a slow or
dead sink delays nothing but itself: the prediction log's writer offers it
chunks and never waits; when the buffer is over its byte limit the oldest
chunks are dropped and counted (reason "sink_behind"); a chunk the sink
fails to take three times is dropped and counted (reason "sink_error").
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path

import pybreaker
import redis
import requests

from app.metrics import Metrics
from app.redis_client import connect

log = logging.getLogger(__name__)
ATTEMPTS = 3
BACKOFF_SECONDS = (0.5, 1.0, 2.0)
CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"


class SinkFailed(Exception):
    """The sink did not take a chunk; it is tried again, then dropped."""


class Sink:
    """A buffer of chunks and the thread that writes them. Subclasses say what
    a chunk is (kind "records": JSON Lines bytes; "events": CloudEvent pairs) and write()."""
    name = "sink"
    kind = "records"

    def __init__(self, buffer_bytes: int, metrics: Metrics):
        self.limit = buffer_bytes
        self.metrics = metrics
        self.chunks: deque = deque()   # (payload, records, bytes)
        self.bytes = 0
        self.ready = threading.Condition()
        self.busy = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writing thread (in each worker, after the fork)."""
        self.thread = threading.Thread(target=self.loop, name=f"prediction-log-{self.name}", daemon=True)
        self.thread.start()

    def offer(self, payload, records: int, size: int) -> None:
        """Queue a chunk; never blocks on the sink. Drops the oldest chunks beyond the byte limit."""
        dropped = 0
        with self.ready:
            self.chunks.append((payload, records, size))
            self.bytes += size
            while self.bytes > self.limit and self.chunks:
                _, n, old = self.chunks.popleft()
                self.bytes -= old
                dropped += n
            self.ready.notify()
        if dropped:
            self.metrics.prediction_log_dropped(self.name, "sink_behind", dropped)

    def loop(self) -> None:
        while True:
            with self.ready:
                while not self.chunks:
                    self.busy = False
                    self.ready.notify_all()
                    self.ready.wait()
                payload, records, size = self.chunks.popleft()
                self.bytes -= size
                self.busy = True
            self.deliver(payload, records)

    def deliver(self, payload, records: int) -> None:
        for attempt in range(ATTEMPTS):
            try:
                self.write(payload)
            except SinkFailed as exc:
                if attempt == 0:
                    log.warning("prediction log sink %s failed: %s", self.name, exc)
                time.sleep(BACKOFF_SECONDS[attempt])
                continue
            except Exception:  # a bug in a sink must not end its thread
                log.exception("prediction log sink %s failed", self.name)
                break
            self.metrics.prediction_log_written(self.name, records)
            return
        left = self.left(payload, records)
        if records - left:
            self.metrics.prediction_log_written(self.name, records - left)
        self.metrics.prediction_log_dropped(self.name, "sink_error", left)

    def left(self, payload, records: int) -> int:
        """Records of a chunk not yet written (a sink that writes part of a chunk says how much is left)."""
        return records

    def write(self, payload) -> None:
        raise NotImplementedError

    def flush(self, timeout: float) -> bool:
        """Wait until every queued chunk was written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self.ready:
            while self.chunks or self.busy:
                left = deadline - time.monotonic()
                if left <= 0 or self.thread is None:
                    return False
                self.ready.wait(left)
        return True


class FileSink(Sink):
    """JSON Lines appended to one file by every worker (O_APPEND: whole writes),
    rotated by size to FILE.1 ... FILE.N under a lock file, so that two workers
    never rotate at once; a worker that finds the file rotated reopens it."""
    name = "file"

    def __init__(self, path: str, max_bytes: int, backups: int, buffer_bytes: int, metrics: Metrics):
        super().__init__(buffer_bytes, metrics)
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.fd: int | None = None

    def open(self) -> int:
        if self.fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return self.fd
            except FileNotFoundError:
                pass
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self.fd

    def write(self, payload: bytes) -> None:
        try:
            fd = self.open()
            if os.fstat(fd).st_size + len(payload) > self.max_bytes:
                fd = self.rotate(len(payload))
            os.write(fd, payload)
        except OSError as exc:
            raise SinkFailed(f"{self.path}: {exc.strerror or exc}") from None

    def rotate(self, incoming: int) -> int:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            if size and size + incoming > self.max_bytes:  # else another worker has just rotated it
                for i in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            return self.open()


class RedisStreamSink(Sink):
    """XADD of each record (field "record") with an approximate MAXLEN, pipelined
    per chunk, through the circuit breaker the cache uses."""
    name = "redis"

    def __init__(self, url: str, stream: str, maxlen: int, connect_timeout: float, socket_timeout: float,
                 breaker: pybreaker.CircuitBreaker, buffer_bytes: int, metrics: Metrics):
        super().__init__(buffer_bytes, metrics)
        self.url, self.stream, self.maxlen, self.breaker = url, stream, maxlen, breaker
        self.timeouts = (connect_timeout, socket_timeout)
        self.client: redis.Redis | None = None

    def write(self, payload: bytes) -> None:
        if self.client is None:
            self.client = connect(self.url, *self.timeouts)

        def pipeline():
            with self.client.pipeline(transaction=False) as pipe:
                for line in payload.splitlines():
                    pipe.xadd(self.stream, {"record": line}, maxlen=self.maxlen, approximate=True)
                pipe.execute()
        try:
            self.breaker.call(pipeline)
        except pybreaker.CircuitBreakerError:
            raise SinkFailed("the Redis circuit breaker is open") from None
        except (redis.RedisError, OSError) as exc:
            raise SinkFailed(str(exc)) from None


class CloudEventSink(Sink):
    """Each request as two CloudEvents in binary mode, as KServe's payload logger
    sends them: ce-type org.kubeflow.serving.inference.request with the request,
    then .response with the response, both with the request id as ce-id."""
    name = "http"
    kind = "events"

    def __init__(self, url: str, timeout: float, buffer_bytes: int, metrics: Metrics):
        super().__init__(buffer_bytes, metrics)
        self.url, self.timeout = url, timeout
        self.namespace = socket.gethostname()
        self.session: requests.Session | None = None

    def headers(self, event: dict, kind: str) -> dict:
        headers = {
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-id": event["id"],
            "ce-type": kind,
            "ce-source": f"mlserve://{self.namespace}/{event['endpoint']}",
            "ce-time": event["time"],
            "ce-inferenceservicename": event["model"] or "",
            "ce-namespace": self.namespace,
            "ce-component": "predictor",
            "ce-endpoint": event["route"] or "",
            "ce-modelversion": str(event["version"] or ""),
        }
        if kind == CE_RESPONSE:
            headers["ce-status"] = str(event["status"])
        return headers

    def write(self, payload: deque) -> None:
        """Post each event pair; those delivered leave the chunk, so a retry sends only the rest."""
        if self.session is None:
            self.session = requests.Session()
        while payload:
            event = payload[0]
            for kind in (CE_REQUEST, CE_RESPONSE):
                if kind in event["sent"]:
                    continue
                body = event["request" if kind == CE_REQUEST else "response"]
                try:
                    answer = self.session.post(self.url, data=body, headers=self.headers(event, kind), timeout=self.timeout)
                except requests.RequestException as exc:
                    raise SinkFailed(f"{self.url}: {type(exc).__name__}") from None
                if answer.status_code >= 300:
                    raise SinkFailed(f"{self.url} answered {answer.status_code}")
                event["sent"].add(kind)
            payload.popleft()

    def left(self, payload: deque, records: int) -> int:
        return len(payload)
