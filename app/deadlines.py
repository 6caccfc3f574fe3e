"""Request deadlines: how long a request may take, and what enforces it.

The HTTP layer sets the deadline of the request being served (the server's
server.request_timeout_ms, or less when the client asks with
X-Request-Timeout); the runtimes read it. It is a context variable rather than
a parameter because it belongs to the request and crosses every layer
between the protocol and the model (routing, cache, batching) without any of
them having a say in it; a thread that works for no request (shadow scoring)
has none.

What enforces it:
- before a model runs, a deadline already passed is DeadlineExceeded (504);
- ONNX Runtime runs are terminated through their RunOptions by a watchdog
  thread of the process when they overrun, and large batches run in chunks
  with the deadline checked between them;
- a batched request (app/batching.py) whose deadline passes while it waits
  for its batch is answered 504 and its rows left out; the batch runs under
  the latest deadline of the requests in it;
- a scikit-learn model runs on a helper thread of the process, waited for
  until the deadline: it cannot be interrupted, but the request is answered in
  bounded time and the worker goes on serving.
"""
from __future__ import annotations

import contextvars
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, NamedTuple, TypeVar

from app.errors import DeadlineExceeded

T = TypeVar("T")
# The least the watchdog sleeps between looks at the runs in progress.
WATCH_SECONDS = 0.02


class Deadline(NamedTuple):
    at: float       # time.monotonic() by which the answer is due
    budget_ms: int  # what the request was given, for the message

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self, what: str = "the request") -> None:
        if time.monotonic() >= self.at:
            raise exceeded(self, what)


def exceeded(deadline: Deadline, what: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"{what} did not finish within its deadline of {deadline.budget_ms} ms",
                            timeout_ms=deadline.budget_ms)


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("deadline", default=None)


def current() -> Deadline | None:
    """The deadline of the request this code works for, if any."""
    return _current.get()


def start(budget_ms: int) -> contextvars.Token:
    """Give the current request budget_ms from now; reset(token) when it is answered."""
    return _current.set(Deadline(time.monotonic() + budget_ms / 1000.0, budget_ms))


def reset(token: contextvars.Token) -> None:
    _current.reset(token)


def run_within(deadline: Deadline | None, fn: Callable[..., T], *args) -> T:
    """fn(*args) with deadline as the current one (None: none): a batch runs for
    several requests, in whichever request or loop happens to run it (app/batching.py)."""
    token = _current.set(deadline)
    try:
        return fn(*args)
    finally:
        _current.reset(token)


class Watchdog:
    """Terminates ONNX Runtime runs that overrun their deadline (RunOptions.terminate).
    One thread per process, started on first use after a fork.

    PERF: it sleeps until the earliest deadline of the runs in progress, or,
    with none, for the shortest budget it has seen: a run armed meanwhile with
    a budget at least that long cannot fall due before it wakes, so arming one
    wakes the thread only for a shorter budget. Runs finish in microseconds
    and their deadlines are seconds away: the thread wakes about once a budget,
    not once a run."""

    def __init__(self):
        self.pid: int | None = None
        self.running: dict[int, tuple] = {}  # id(run options) -> (run options, deadline)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.next_check = math.inf
        self.shortest = math.inf
        self.thread: threading.Thread | None = None

    def arm(self, run_options, deadline: Deadline) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.running, self.wake, self.next_check = {}, threading.Event(), math.inf
            self.thread = threading.Thread(target=self.loop, name="deadline-watchdog", daemon=True)
            self.thread.start()
        with self.lock:
            self.running[id(run_options)] = (run_options, deadline)
            budget = deadline.budget_ms / 1000.0
            if budget < self.shortest:
                self.shortest = budget
            if deadline.at < self.next_check:
                self.next_check = deadline.at
                self.wake.set()

    def disarm(self, run_options) -> None:
        with self.lock:
            self.running.pop(id(run_options), None)

    def thread_alive(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive()

    def loop(self) -> None:
        while True:
            now = time.monotonic()
            with self.lock:
                due = [options for options, deadline in self.running.values() if deadline.at <= now]
                self.next_check = min((d.at for _, d in self.running.values() if d.at > now),
                                      default=now + self.shortest)
                # inf: nothing armed yet (Event.wait takes no infinite timeout, only None)
                wait = None if self.next_check == math.inf else max(WATCH_SECONDS, self.next_check - now)
                self.wake.clear()
            for options in due:
                options.terminate = True
            self.wake.wait(wait)


class NativeRunner:
    """Runs calls that cannot be interrupted (scikit-learn) on a helper thread
    of the process and waits for them until the deadline."""

    def __init__(self):
        self.pid: int | None = None
        self.pool: ThreadPoolExecutor | None = None

    def call(self, fn: Callable[[], T], deadline: Deadline, what: str) -> T:
        if self.pid != os.getpid():  # threads do not survive fork
            self.pid, self.pool = os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="native-model")
        future = self.pool.submit(fn)
        try:
            return future.result(timeout=max(0.0, deadline.remaining()))
        except FutureTimeout:
            future.cancel()  # not started yet: never runs; started: runs on, its answer unused
            raise exceeded(deadline, what) from None


watchdog = Watchdog()
native = NativeRunner()
