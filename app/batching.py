"""Adaptive batching: the rows of concurrent requests for one model version,
run as one runtime call, each request given back exactly its own rows.

What a model gathers is its BatchPolicy: models.yaml's `batching:` entry,
else its metadata's, else the default from the cost measured when the
version was published (or loaded, for versions published before): on when
one row costs at least ROW_COST_FLOOR_MS and 8 rows in one call cost at most
1/MIN_GAIN of 8 calls of one row. Below that the request path costs more than
the model, and waiting for a batch would only add latency.

The Batcher holds the open batches (one per model version: a batch never
mixes versions) and runs them. When a request waits and who wakes it depends
on how the worker serves requests, so a Scheduler decides:
- meinheld (the default worker): app/server/greenlets.py parks the request's
  greenlet while the worker's event loop reads more requests;
- a threaded worker (gthread): ThreadScheduler, below;
- one request at a time (tests in one thread, a sync worker): Immediate, the
  request's rows run at once on their own.

Deadlines (app/deadlines.py) hold as without batching: a request whose
deadline passes before its batch runs is answered 504 and its rows are left
out of the call; the call runs under the latest deadline of the requests in
it (no deadline if one of them has none), so ONNX Runtime terminates it only
once none of them can use its answer any more; and a request whose deadline
passed while the call ran is answered 504, not late.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app import deadlines
from app.errors import DeadlineExceeded, ModelFailed
from app.runtimes import Outputs, Runtime

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 32
MAX_WAIT_MS = 2.0
ROW_COST_FLOOR_MS = 1.0
MIN_GAIN = 2.0
COST_ROWS = 8  # the batch the default is judged on
OPTIONS = ("enabled", "max_batch_size", "max_wait_ms")
LARGEST_BATCH = 4096
LONGEST_WAIT_MS = 1000.0


@dataclass(frozen=True)
class BatchPolicy:
    """Whether a model version gathers rows across requests, how many, for how long."""
    enabled: bool
    max_batch_size: int = MAX_BATCH_SIZE
    max_wait_ms: float = MAX_WAIT_MS
    set_by: str = "default"  # models.yaml, metadata, or default (the measured cost)
    reason: str = ""

    @property
    def max_wait(self) -> float:
        return self.max_wait_ms / 1000.0

    def describe(self, cost: dict | None) -> dict:
        return {"enabled": self.enabled, "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms,
                "set_by": self.set_by, "reason": self.reason,
                "row_cost_ms": (cost or {}).get("row_ms"), "batch_of_8_ms": (cost or {}).get("batch_ms")}


def check_options(options) -> dict:
    """models.yaml's or the metadata's `batching:` entry as a dict; ValueError says what is wrong.
    `true` / `false` stand for {enabled: true} / {enabled: false}."""
    if isinstance(options, bool):
        return {"enabled": options}
    if not isinstance(options, dict):
        raise ValueError(f"expected true, false or a mapping of {', '.join(OPTIONS)}, got {options!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option; allowed: {', '.join(OPTIONS)}")
    enabled = options.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r}: expected true or false")
    size = options.get("max_batch_size")
    if size is not None and (type(size) is not int or not 1 <= size <= LARGEST_BATCH):
        raise ValueError(f"max_batch_size={size!r}: expected a whole number of rows from 1 to {LARGEST_BATCH}")
    wait = options.get("max_wait_ms")
    if wait is not None and (type(wait) not in (int, float) or not 0 <= wait <= LONGEST_WAIT_MS):
        raise ValueError(f"max_wait_ms={wait!r}: expected milliseconds from 0 to {LONGEST_WAIT_MS:g}")
    return dict(options)


def policy_of(configured: dict | None, metadata: dict, cost: dict | None) -> BatchPolicy:
    """The policy of one version: models.yaml's options over the metadata's over the default."""
    given = check_options(metadata["batching"]) if metadata.get("batching") is not None else {}
    options = {**given, **(configured or {})}
    size = options.get("max_batch_size", MAX_BATCH_SIZE)
    wait = float(options.get("max_wait_ms", MAX_WAIT_MS))
    if "enabled" in (configured or {}):
        return BatchPolicy(configured["enabled"], size, wait, "models.yaml", "set in models.yaml")
    if "enabled" in given:
        return BatchPolicy(given["enabled"], size, wait, "metadata", "set in the version's metadata")
    enabled, reason = default_of(cost)
    return BatchPolicy(enabled, size, wait, "default", reason)


def default_of(cost: dict | None) -> tuple[bool, str]:
    """(on, why) from the measured cost of one row and of COST_ROWS rows in one call."""
    if not cost or cost.get("row_ms") is None:
        return False, "no measured cost"
    row, batch = cost["row_ms"], cost["batch_ms"]
    # NOTE: the figures are in the cost beside the reason, which stays the same wherever it was measured.
    if row < ROW_COST_FLOOR_MS:
        return False, (f"one row costs under {ROW_COST_FLOOR_MS:g} ms: the request path costs more than the model, "
                       "so waiting for a batch would add latency for little gain")
    if batch * MIN_GAIN > COST_ROWS * row:
        return False, (f"{COST_ROWS} rows in one call cost more than 1/{MIN_GAIN:g} of {COST_ROWS} calls of one row: "
                       f"a gain under {MIN_GAIN:g}x")
    return True, (f"one row costs at least {ROW_COST_FLOOR_MS:g} ms and {COST_ROWS} rows in one call at most "
                  f"1/{MIN_GAIN:g} of {COST_ROWS} calls of one row: batching multiplies the rows per second")


def measure_cost(runtime: Runtime, rows: np.ndarray, budget: float = 0.05) -> dict:
    """Median milliseconds of one row, and of COST_ROWS rows in one call, on this machine;
    runs for about budget seconds (at least 3 calls of each)."""
    rows = np.asarray(rows, dtype=np.float32)
    single = rows[:1]
    several = np.resize(rows, (COST_ROWS, rows.shape[1]))
    runtime.run(single)  # the first call of a session allocates
    first = timed(runtime, single)
    repeats = max(3, min(50, int(budget / 2 / max(first, 1e-6))))
    row = statistics.median([first] + [timed(runtime, single) for _ in range(repeats - 1)])
    batch = statistics.median([timed(runtime, several) for _ in range(repeats)])
    return {"row_ms": round(row * 1000, 4), "batch_ms": round(batch * 1000, 4), "batch_rows": COST_ROWS}


def timed(runtime: Runtime, X: np.ndarray) -> float:
    started = time.perf_counter()
    runtime.run(X)
    return time.perf_counter() - started


class Pending:
    """One request's rows in a batch, its deadline (None: none), and then its answer (outputs or error)."""
    __slots__ = ("rows", "count", "queued", "deadline", "outputs", "error", "waiter")

    def __init__(self, rows: np.ndarray, queued: float, deadline: deadlines.Deadline | None = None):
        self.rows = rows
        self.count = len(rows)
        self.queued = queued
        self.deadline = deadline
        self.outputs: Outputs | None = None
        self.error: Exception | None = None
        self.waiter = None  # what the scheduler wakes

    @property
    def answered(self) -> bool:
        return self.outputs is not None or self.error is not None


class Batch:
    __slots__ = ("model", "policy", "pendings", "rows", "deadline", "closed")

    def __init__(self, model, policy: BatchPolicy, opened: float):
        self.model = model
        self.policy = policy
        self.pendings: list[Pending] = []
        self.rows = 0
        self.deadline = opened + policy.max_wait
        self.closed = False


class Scheduler(Protocol):
    def gather(self, batcher: "Batcher", model, policy: BatchPolicy, pending: Pending) -> None:
        """Add pending to its model's batch; return once it is answered."""


class Immediate:
    """No other request can run meanwhile: the rows run at once, on their own."""

    def gather(self, batcher: "Batcher", model, policy: BatchPolicy, pending: Pending) -> None:
        batch = Batch(model, policy, pending.queued)
        batch.pendings.append(pending)
        batch.rows = pending.count
        batcher.execute(batch)


class Batcher:
    """A worker's open batches, one per model version, and how they run."""

    def __init__(self, metrics=None, scheduler: Scheduler | None = None, clock=time.perf_counter):
        self.metrics = metrics
        self.scheduler: Scheduler = scheduler or Immediate()
        self.clock = clock
        self.open: dict = {}           # LoadedModel -> the Batch gathering its rows
        self.full: list[Batch] = []    # closed, waiting to run

    def run(self, model, policy: BatchPolicy, X: np.ndarray) -> Outputs:
        """The runtime's outputs for X (validated rows), computed in a batch with other requests' rows."""
        pending = Pending(X, self.clock(), deadlines.current())
        if pending.count >= policy.max_batch_size:
            Immediate().gather(self, model, policy, pending)  # already a batch of its own
        else:
            self.scheduler.gather(self, model, policy, pending)
        if pending.error is not None:
            raise pending.error
        return pending.outputs

    # --- gathering (the schedulers call these) ------------------------------

    def add(self, model, policy: BatchPolicy, pending: Pending) -> Batch:
        """Put pending in its model's open batch (a full one is closed first); the batch it joined."""
        batch = self.open.get(model)
        if batch is not None and batch.rows + pending.count > policy.max_batch_size:
            self.close(batch)
            batch = None
        if batch is None:
            batch = self.open[model] = Batch(model, policy, pending.queued)
        batch.pendings.append(pending)
        batch.rows += pending.count
        if batch.rows >= policy.max_batch_size:
            self.close(batch)
        return batch

    def close(self, batch: Batch) -> None:
        if not batch.closed:
            batch.closed = True
            if self.open.get(batch.model) is batch:
                del self.open[batch.model]
            self.full.append(batch)

    def take(self, batch: Batch) -> None:
        """batch will run now: it gathers no more and is no longer waiting."""
        self.close(batch)
        self.full.remove(batch)

    def due(self, now: float, everything: bool = False) -> list[Batch]:
        """The batches to run now (all of them with everything), taken out of the waiting ones."""
        for batch in list(self.open.values()):
            if everything or batch.deadline <= now:
                self.close(batch)
        due, self.full = self.full, []
        return due

    def next_deadline(self) -> float | None:
        """When the next open batch must run; None when nothing waits (0 when a full one does)."""
        if self.full:
            return 0.0
        return min((b.deadline for b in self.open.values()), default=None)

    @property
    def waiting(self) -> bool:
        return bool(self.open or self.full)

    # --- running ------------------------------------------------------------

    def execute(self, batch: Batch) -> None:
        """Run the rows of the batch's requests still within their deadlines in one call and answer
        every pending: its own rows, the batch's error, or 504 once its deadline has passed."""
        pendings = [p for p in batch.pendings if not expire(p)]
        if not pendings:
            return
        X = pendings[0].rows if len(pendings) == 1 else np.concatenate([p.rows for p in pendings])
        started = self.clock()
        try:
            out = deadlines.run_within(latest(pendings), batch.model.runtime.run, X)
            if len(out.labels) != len(X):
                raise ValueError(f"the model answered {len(out.labels)} rows for {len(X)}")
        except DeadlineExceeded as exc:
            # Terminated at the latest deadline, so every request's has passed: each gets its own 504.
            for pending in pendings:
                if not expire(pending):
                    pending.error = exc
        except Exception as exc:  # a runtime raises its own types; the batch fails, the worker goes on
            error = ModelFailed(f"{batch.model.name} v{batch.model.version} failed on a batch of {len(X)} rows "
                                f"from {len(pendings)} requests: {type(exc).__name__}: {str(exc).strip()[:200]}")
            log.error("%s", error.message)
            for pending in pendings:
                pending.error = error
        else:
            start = 0
            for pending in pendings:
                stop = start + pending.count
                if not expire(pending):  # its deadline passed while the call ran: 504, not a late answer
                    proba = out.probabilities[start:stop] if out.probabilities is not None else None
                    pending.outputs = Outputs(out.labels[start:stop], proba)
                start = stop
        if self.metrics is not None:
            self.metrics.batch_ran(batch.model.name, str(batch.model.version), len(X), self.clock() - started,
                                   [started - p.queued for p in pendings])


def expire(pending: Pending) -> bool:
    """Whether pending's deadline has passed; if so it is answered 504, as an unbatched run would be."""
    if pending.deadline is None or pending.deadline.remaining() > 0:
        return False
    pending.error = deadlines.exceeded(pending.deadline, "the model run")
    return True


def latest(pendings: list[Pending]) -> deadlines.Deadline | None:
    """The deadline a batch runs under: the latest of its requests' (None when one of them has none)."""
    if any(p.deadline is None for p in pendings):
        return None
    return max((p.deadline for p in pendings), key=lambda d: d.at)


class ThreadScheduler:
    """For a threaded worker: the first request of a batch waits (on a condition)
    until the batch is full or its wait is over, runs it, and wakes the others.
    ONNX Runtime releases the GIL while it runs, so the next batch gathers meanwhile."""

    def __init__(self):
        self.changed = threading.Condition()

    def gather(self, batcher: Batcher, model, policy: BatchPolicy, pending: Pending) -> None:
        with self.changed:
            batch = batcher.add(model, policy, pending)
            if batch.pendings[0] is not pending:
                if batch.closed:
                    self.changed.notify_all()  # full: its first request runs it now
                while not pending.answered:
                    self.changed.wait()
                return
            while not batch.closed and (left := batch.deadline - batcher.clock()) > 0:
                self.changed.wait(left)
            batcher.take(batch)
        try:
            batcher.execute(batch)
        finally:
            answer_all(batch)
            with self.changed:
                self.changed.notify_all()


def answer_all(batch: Batch) -> None:
    """No pending is left waiting for ever, whatever went wrong while its batch ran."""
    for pending in batch.pendings:
        if not pending.answered:
            pending.error = ModelFailed(f"{batch.model.name} v{batch.model.version}: the batch did not run")
