"""A bounded client load on keep-alive connections, that records every answer.

Each thread holds one HTTP/1.1 connection (http.client) and sends requests on
it back to back; it reconnects only when the server asked it to (a response
with `Connection: close`). Every non-2xx answer and every socket error is
kept. When `ending` is set (the target is being stopped on purpose), a
connection refused on a *new* connection ends the thread quietly: nothing
was sent. With `reconnect_when_ending` false, a thread also ends when the
server closes its connection then, as a client behind a balancer would move
to another instance. An error on an established connection is always a failure.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Answer:
    at: float
    status: int
    body: dict | None


@dataclass
class Load:
    url: str
    path: str = "/api/v1/predict"
    payload: dict = field(default_factory=lambda: {"model_name": "iris_classifier",
                                                   "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False})
    threads: int = 4
    max_seconds: float = 300.0  # a hard bound, whatever the caller does
    pause: float = 0.0          # between requests, for a light load
    headers: dict = field(default_factory=dict)
    reconnect_when_ending: bool = True

    def __post_init__(self):
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port
        self.stop_event = threading.Event()
        self.ending = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self.refused_at_end = 0
        self.connections = 0
        self.body = json.dumps(self.payload).encode()
        self.workers = [threading.Thread(target=self.run, daemon=True) for _ in range(self.threads)]

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = None
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
                try:
                    conn.connect()
                except ConnectionRefusedError as exc:
                    conn = None
                    if self.ending.is_set():
                        with self.lock:
                            self.refused_at_end += 1
                        return
                    self.fail(f"connect: {exc!r}")
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.connections += 1
            try:
                conn.request("POST", self.path, body=self.body,
                             headers={"Content-Type": "application/json", **self.headers})
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.fail(f"on an open connection: {exc!r}")
                conn.close()
                conn = None
                continue
            self.record(response.status, raw)
            if response.will_close:
                conn.close()
                conn = None
                if self.ending.is_set() and not self.reconnect_when_ending:
                    return
            if self.pause:
                self.stop_event.wait(self.pause)
        if conn is not None:
            conn.close()

    def record(self, status: int, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self.lock:
            self.answers.append(Answer(time.monotonic(), status, body))
            if not 200 <= status < 300:
                self.failures.append(f"HTTP {status}: {raw[:300]!r}")

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def versions_since(self, since: float) -> set:
        with self.lock:
            return {a.body.get("model_version") for a in self.answers if a.at >= since and a.body}

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def wait_for_answers(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count()} answers, not {n}; failures: {self.failures[:5]}")
            time.sleep(0.05)

    def start(self) -> "Load":
        for t in self.workers:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.workers:
            t.join(30)

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
