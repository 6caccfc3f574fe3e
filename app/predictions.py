"""The prediction log: every prediction served (or a sample of them), and every
error a prediction endpoint answers, recorded off the request path.

The hook is protocol-independent: the inference core (app/inference.py) calls
predicted() and scored() for every answer it gives, whichever protocol asked,
and the HTTP layer calls failed() for every error answered by a resource that
predicts. Each call appends one small tuple to this worker's queue and
returns. PERF: nothing is serialised, locked or written on the request path.

A writer thread takes the whole queue every prediction_log.flush_seconds
(sooner when it fills up), counts the rows for drift (app/drift.py), turns
them into records and offers each sink (app/sinks.py) one chunk. The queue is
bounded by rows (prediction_log.queue_rows): if the writer falls behind, the
oldest entries are dropped and counted for every sink (reason "queue_full").

NOTE: no lock. deque appends and pops are atomic, and the row counters are
ints changed with `+=` on an attribute, which CPython 3.11 never interleaves
between threads (it switches threads only at calls and backward jumps).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque

import numpy as np
import orjson

from app.clock import utc_at
from app.drift import DriftMonitor
from app.metrics import Metrics
from app.sinks import Sink

log = logging.getLogger(__name__)
# A sink's buffer holds this many chunks: dropping the oldest loses an eighth of it at most.
CHUNKS_PER_BUFFER = 8

# Queue entries are plain tuples (the cheapest thing to build), by kind:
ONE = 0     # (ONE, 1, logged, time, request_id, endpoint, state, model, pinned, row, scored, level, latency_ms, response)
MANY = 1    # (MANY, n, logged, time, request_id, endpoint, state, model, pinned, X, sent, scores, levels, latency_ms)
FAILED = 2  # (FAILED, 1, True, time, request_id, endpoint, name, version, features, status, code, message, latency_ms, response)
MAX_LOGGED_FEATURES = 1000  # an error's features are kept only up to this many values


class PredictionLog:
    def __init__(self, sinks: list[Sink], drift: DriftMonitor | None, metrics: Metrics, *, sample_rate: float = 1.0,
                 queue_rows: int = 10_000, flush_seconds: float = 0.2):
        self.sinks = sinks
        self.record_sinks = [s for s in sinks if s.kind == "records"]
        self.event_sinks = [s for s in sinks if s.kind == "events"]
        self.drift = drift
        self.metrics = metrics
        self.sample_rate = sample_rate
        self.max_rows = queue_rows
        self.wake_rows = max(1, queue_rows // 4)
        self.flush_seconds = flush_seconds
        self.queue: deque = deque()
        self.pushed = self.taken = self.dropped = self.reported = 0
        self.wake = threading.Event()
        self.woken = False
        self.idle = True
        self.thread: threading.Thread | None = None
        metrics.prediction_log_sinks([s.name for s in sinks] + (["drift"] if drift else []))

    @property
    def active(self) -> bool:
        return bool(self.sinks) or self.drift is not None

    # --- the hook (request path) ---------------------------------------------

    def sampled(self) -> bool:
        return self.sample_rate >= 1.0 or random.random() < self.sample_rate

    def predicted(self, request_id: str | None, endpoint: str, state, model, pinned: bool, row: list,
                  scored: bytes, level: str | None, latency_ms: float, response: bytes | None = None) -> None:
        """One row answered: scored is its cacheable JSON fragment (prediction, probability, probabilities)."""
        logged = bool(self.sinks) and self.sampled()
        if logged or self.drift is not None:
            self.put((ONE, 1, logged, time.time(), request_id, endpoint, state, model, pinned, row, scored, level,
                      latency_ms, response))

    def scored(self, request_id: str | None, endpoint: str, state, model, pinned: bool, X: np.ndarray,
               sent: list | None, scores, levels: list | None, latency_ms: float) -> None:
        """Rows X (float32) answered with scores (app.inference.Scores); sent: the rows as the client sent them."""
        logged = bool(self.sinks) and self.sampled()
        if logged or self.drift is not None:
            self.put((MANY, len(X), logged, time.time(), request_id, endpoint, state, model, pinned, X, sent, scores,
                      levels, latency_ms))

    def failed(self, request_id: str | None, endpoint: str, body, status: int, code: str, message: str,
               latency_ms: float, response: bytes | None = None) -> None:
        """An error answered by a prediction endpoint (body: the request as parsed, if it was)."""
        if not self.sinks:
            return
        body = body if type(body) is dict else {}
        name, version = body.get("model_name"), body.get("version")
        self.put((FAILED, 1, True, time.time(), request_id, endpoint, name[:200] if type(name) is str else None,
                  version if type(version) is int else None, sent_features(body), status, code, message[:1000],
                  latency_ms, bytes(memoryview(response)) if response else None))

    def put(self, item: tuple) -> None:
        queue = self.queue
        queue.append(item)
        self.pushed += item[1]
        if self.pushed - self.taken > self.max_rows:
            self.shed()
        elif not self.woken and self.pushed - self.taken > self.wake_rows:
            self.woken = True
            self.wake.set()

    def shed(self) -> None:
        """Drop the oldest entries until the queue is within its bound again."""
        while self.pushed - self.taken > self.max_rows:
            try:
                old = self.queue.popleft()
            except IndexError:
                return
            self.taken += old[1]
            self.dropped += old[1]

    # --- the writer (a thread per worker) --------------------------------------

    def start(self) -> None:
        """Start the writer and the sinks' threads (in each worker, after the fork)."""
        if not self.active or self.thread is not None:
            return
        for sink in self.sinks:
            sink.start()
        self.thread = threading.Thread(target=self.loop, name="prediction-log", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while True:
            self.wake.wait(self.flush_seconds)
            self.wake.clear()
            self.woken = False
            self.idle = False
            try:
                self.write(self.take())
            except Exception:  # the writer must outlive any bad entry
                log.exception("prediction log writer failed")
            finally:
                self.idle = not self.queue

    def take(self) -> list[tuple]:
        items, queue = [], self.queue
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                return items
            self.taken += item[1]
            items.append(item)

    def write(self, items: list[tuple]) -> None:
        lost, self.reported = self.dropped - self.reported, self.dropped
        if lost:
            for name in [s.name for s in self.sinks] + (["drift"] if self.drift else []):
                self.metrics.prediction_log_dropped(name, "queue_full", lost)
        if not items:
            return
        fragments = {id(item): orjson.loads(item[10]) for item in items if item[0] == ONE}
        if self.drift is not None:
            self.count_drift(items, fragments)
        logged = [item for item in items if item[2]]
        if self.record_sinks and logged:
            worker = os.getpid()
            lines = [orjson.dumps(r) for item in logged for r in records(item, fragments.get(id(item)), worker)]
            for sink in self.record_sinks:
                # In chunks well under the sink's buffer: when it is behind, the
                # oldest chunks are dropped, never the newest records with them.
                for chunk in chunked(lines, len, sink.limit // CHUNKS_PER_BUFFER):
                    blob = b"\n".join(chunk) + b"\n"
                    sink.offer(blob, len(chunk), len(blob))
        if self.event_sinks and logged:
            events = [event(item, fragments.get(id(item))) for item in logged]
            for sink in self.event_sinks:
                for chunk in chunked(events, event_size, sink.limit // CHUNKS_PER_BUFFER):
                    sink.offer(deque(chunk), len(chunk), sum(map(event_size, chunk)))

    def count_drift(self, items: list[tuple], fragments: dict) -> None:
        groups: dict = {}  # model -> (parts: row lists and matrices, in order; their labels)
        for item in items:
            if item[0] == FAILED:
                continue
            parts, labels = groups.setdefault(item[7], ([], []))
            parts.append(item[9])
            if item[0] == ONE:
                labels.append(fragments[id(item)]["prediction"])
            else:
                labels.extend(item[11].labels)
        for model, (parts, labels) in groups.items():
            X = stack(parts)
            if not self.drift.count(model, X, labels):
                self.metrics.prediction_log_dropped("drift", "no_lane", len(X))

    def flush(self, timeout: float = 2.0) -> bool:
        """Write everything queued now, and wait for the sinks to take it; False if not within timeout."""
        if self.thread is None:
            return not self.queue
        deadline = time.monotonic() + timeout
        self.wake.set()
        while self.queue or not self.idle:
            if time.monotonic() > deadline:
                return False
            self.wake.set()
            time.sleep(0.01)
        return all(sink.flush(max(0.0, deadline - time.monotonic())) for sink in self.sinks)


def event_size(e: dict) -> int:
    return len(e["request"]) + len(e["response"]) + 300  # the bodies and about what the headers take


def chunked(items: list, size, limit: int) -> list[list]:
    """items in order, in runs whose sizes add up to at most limit (at least one item a run)."""
    runs, run, total = [], [], 0
    for item in items:
        n = size(item)
        if run and total + n > limit:
            runs.append(run)
            run, total = [], 0
        run.append(item)
        total += n
    return runs + [run] if run else runs


def route_of(state, model, pinned: bool) -> str:
    return "pinned" if pinned else "split" if state.route is not None else "serving"


def shadow_of(state, model, pinned: bool) -> int | None:
    shadow = state.shadow
    return shadow.version if shadow is not None and not pinned and shadow is not model else None


def records(item: tuple, fragment: dict | None, worker: int = 0) -> list[dict]:
    """The JSON Lines records of one queue entry: one per row."""
    kind, _, _, t, request_id, endpoint = item[:6]
    common = {"time": utc_at(t), "request_id": request_id, "worker": worker, "endpoint": endpoint}
    if kind == FAILED:
        name, version, features, status, code, message, latency = item[6:13]
        return [{**common, "model": name, "version": version, "route": None, "shadow": None, "row": None,
                 "features": features, "prediction": None, "probability": None, "cache": None,
                 "latency_ms": round(latency, 4), "status": status, "error": code, "message": message}]
    state, model, pinned = item[6:9]
    head = {**common, "model": model.name, "version": model.version, "route": route_of(state, model, pinned),
            "shadow": shadow_of(state, model, pinned)}
    if kind == ONE:
        row, level, latency = item[9], item[11], item[12]
        return [{**head, "row": 0, "features": row, "prediction": fragment["prediction"],
                 "probability": fragment["probability"], "cache": level, "latency_ms": round(latency, 4),
                 "status": 200, "error": None, "message": None}]
    X, sent, scores, levels, latency = item[9:14]
    rows = sent if sent is not None else X.tolist()
    names = model.feature_names
    probabilities = scores.probabilities
    latency = round(latency, 4)
    return [{**head, "row": i, "features": row if type(row) is list else [row[n] for n in names],
             "prediction": label, "probability": max(probabilities[i]) if probabilities else None,
             "cache": levels[i] if levels else None, "latency_ms": latency, "status": 200, "error": None,
             "message": None}
            for i, (row, label) in enumerate(zip(rows, scores.labels))]


def event(item: tuple, fragment: dict | None) -> dict:
    """A request and its response as the CloudEvents sink sends them (the v1 shapes)."""
    kind, _, _, t, request_id, endpoint = item[:6]
    if kind == FAILED:
        name, version, features, status = item[6:10]
        request = {"model_name": name, "features": features}
        return {"id": request_id, "time": utc_at(t), "endpoint": endpoint, "model": name, "version": version,
                "route": None, "status": status, "request": orjson.dumps(request),
                "response": item[13] or b"{}", "sent": set()}
    state, model, pinned = item[6:9]
    common = {"id": request_id, "time": utc_at(t), "endpoint": endpoint, "model": model.name,
              "version": model.version, "route": route_of(state, model, pinned), "status": 200, "sent": set()}
    pin = {"version": model.version} if pinned else {}
    if kind == ONE:
        response = item[13] or orjson.dumps({**fragment, "model_name": model.name, "model_version": model.version})
        return {**common, "request": orjson.dumps({"model_name": model.name, "features": item[9], **pin}),
                "response": response}
    X, sent, scores = item[9:12]
    request = {"model_name": model.name, "features_batch": sent if sent is not None else X.tolist(), **pin}
    response = {"predictions": scores.labels, "probabilities": scores.probabilities, "classes": model.classes,
                "model_name": model.name, "model_version": model.version, "count": len(X)}
    return {**common, "request": orjson.dumps(request), "response": orjson.dumps(response)}


def stack(parts: list) -> np.ndarray:
    """One float32 matrix of single rows (lists) and matrices, in order; runs of rows are converted at once."""
    blocks, run = [], []
    for part in parts:
        if type(part) is list:
            run.append(part)
            continue
        if run:
            blocks.append(np.array(run, dtype=np.float32))
            run = []
        blocks.append(part)
    if run:
        blocks.append(np.array(run, dtype=np.float32))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def sent_features(body: dict):
    """The features of a refused request as sent, if they are small enough to keep (else None)."""
    features = body.get("features", body.get("features_batch"))
    if type(features) not in (list, dict) or len(features) > MAX_LOGGED_FEATURES:
        return None
    leaves = 0
    for value in (features.values() if type(features) is dict else features):
        values = value.values() if type(value) is dict else value if type(value) is list else (value,)
        for leaf in values:
            leaves += 1
            if leaves > MAX_LOGGED_FEATURES or (type(leaf) is str and len(leaf) > 100) or type(leaf) in (list, dict):
                return None
    return features
