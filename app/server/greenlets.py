"""Batching on the meinheld worker: a request whose rows wait for a batch
parks its greenlet, and the worker's event loop goes on reading requests.

meinheld runs each request in a greenlet under its C event loop, all in one
thread. Its own continuations (meinheld.middleware, server._suspend_client)
cannot be used here: meinheld 1.0.2 is compiled against greenlet 0.4's object
layout and reads a greenlet's parent at an offset greenlet 3 does not have
(suspending raises "TypeError: bad argument type for built-in operation"). So
this module parks and resumes greenlets with greenlet's own API:

- Parking: the request's greenlet switches to the loop's greenlet (the hub).
  To meinheld the request has returned to the loop, which reads the next
  ones; the connection stays out of its poll set until the answer is written.
- Running: at the end of the loop tick (server.schedule_call(0, ...)) every
  batch that is full or whose wait is over runs, and each of its requests'
  greenlets is resumed and writes its response. While a batch still gathers,
  the loop's epoll set is watched for at most the time left: request bytes
  arriving sooner end the watch, meinheld reads them, and a request for a
  batched model joins the batch and schedules the run again; anything else
  (a new or a closed connection) runs what waits at once, since it may not
  call back. A timer (whole seconds) is a safety net behind both.
- Binding: meinheld has one start_response object, pointed at a request's
  client when that request starts. A resumed greenlet is answering another
  client than the last one started, so it is pointed back first (the field
  right after the object header in meinheld 1.0.2's ResponseObject, checked
  against the client on each worker's first request; if the check fails,
  batched models run each request's rows at once, as without batching).
- A retiring worker waits for nothing: what is queued runs at the next tick,
  with the version each request was routed to.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
import time

import greenlet
from meinheld import server

from app.batching import Batch, Batcher, BatchPolicy, Immediate, Pending, answer_all

log = logging.getLogger(__name__)

# meinheld 1.0.2: ResponseObject {PyObject_HEAD; client_t *cli} (response.h),
# ClientObject {PyObject_HEAD; client_t *client; ...} (client.h).
HEAD_BYTES = object.__basicsize__
SAFETY_SECONDS = 1
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def pointer_at(address: int) -> ctypes.c_void_p:
    return ctypes.c_void_p.from_address(address + HEAD_BYTES)


class GreenletScheduler:
    """The Scheduler (app/batching.py) of a meinheld worker; wrap() its WSGI app."""

    def __init__(self, batcher: Batcher, drain, listeners: list[int], clock=time.perf_counter):
        self.batcher = batcher
        self.drain = drain               # .active while the worker retires
        self.listeners = set(listeners)  # the listening sockets' fds
        self.clock = clock
        self.hub = greenlet.getcurrent()  # the greenlet meinheld's loop runs in
        self.binding: ctypes.c_void_p | None = None  # start_response's client
        self.usable = False
        self.scheduled = False
        self.safety = None
        self.loop_fd: int | None = None
        self.poller: select.epoll | None = None

    def wrap(self, app):
        def batching_app(environ, start_response):
            if self.binding is None:
                self.check(environ, start_response)
            # A batch left waiting for bytes that turned into a request for
            # another model is run when that request comes in.
            if not self.scheduled and self.batcher.waiting:
                self.schedule()
            return app(environ, start_response)
        return batching_app

    def check(self, environ: dict, start_response) -> None:
        client = environ.get("meinheld.client")
        self.binding = pointer_at(id(start_response))
        self.usable = (type(start_response).__name__ == "start_response" and type(client).__name__ == "client"
                       and self.binding.value is not None and self.binding.value == pointer_at(id(client)).value)
        if not self.usable:
            log.warning("batching off in worker %d: meinheld's start_response is not laid out as in 1.0.2; "
                        "batched models run each request's rows on their own", os.getpid())

    # --- the request side ---------------------------------------------------

    def gather(self, batcher: Batcher, model, policy: BatchPolicy, pending: Pending) -> None:
        current = greenlet.getcurrent()
        if not self.usable or current is self.hub:
            Immediate().gather(batcher, model, policy, pending)
            return
        pending.waiter = (current, self.binding.value)
        batcher.add(model, policy, pending)
        if not self.scheduled:
            self.schedule()
        while not pending.answered:
            self.hub.switch()

    def schedule(self) -> None:
        self.scheduled = True
        server.schedule_call(0, self.run)
        if self.safety is None:
            self.safety = server.schedule_call(SAFETY_SECONDS, self.on_safety)

    def on_safety(self) -> None:
        self.safety = None
        if self.batcher.waiting:
            self.run()

    # --- the loop side --------------------------------------------------------

    def run(self) -> None:
        """At the end of a loop tick: run what is due, watch for more requests while a batch gathers."""
        self.scheduled = False
        batcher, everything = self.batcher, self.drain.active
        while True:
            for batch in batcher.due(self.clock(), everything):
                self.finish(batch)
            deadline = batcher.next_deadline()
            if deadline is None:
                return
            left = deadline - self.clock()
            if left <= 0 or not self.loop_ready(left):
                continue  # its wait is over
            if self.requests_ready():
                if self.safety is None:
                    self.safety = server.schedule_call(SAFETY_SECONDS, self.on_safety)
                return
            everything = True

    def finish(self, batch: Batch) -> None:
        try:
            self.batcher.execute(batch)
        finally:
            answer_all(batch)
            for pending in batch.pendings:
                waiting, client = pending.waiter
                self.binding.value = client
                try:
                    waiting.switch()
                except Exception:  # meinheld answers its own errors; this is only a guard
                    log.exception("resuming a batched request failed")

    def loop_ready(self, left: float) -> bool:
        """Whether meinheld's poll set has something ready within left seconds (else the time is up)."""
        if self.loop_fd is None:
            self.find_loop()
        if self.loop_fd < 0:
            time.sleep(left)
            return False
        try:
            return bool(select.select((self.loop_fd,), (), (), left)[0])
        except ValueError:  # an fd past select's limit
            return bool(self.poller.poll(left, 1))

    def requests_ready(self) -> bool:
        """Whether a ready connection holds request bytes: meinheld will read them and call the app."""
        for fd, _ in self.poller.poll(0, 64):
            if fd in self.listeners:
                continue
            try:
                connection = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                if connection.recv(1, PEEK):
                    return True
            except OSError:
                pass
            finally:
                connection.detach()
        return False

    def find_loop(self) -> None:
        """meinheld's epoll instance: the one its listening sockets were registered with (-1: none)."""
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                    continue
                with open(f"/proc/self/fdinfo/{name}") as info:
                    watched = {int(line.split()[1]) for line in info if line.startswith("tfd:")}
            except (OSError, ValueError, IndexError):
                continue
            if watched & self.listeners:
                self.loop_fd = int(name)
                self.poller = select.epoll.fromfd(os.dup(self.loop_fd))
                return
        log.warning("batching in worker %d: meinheld's epoll set not found; batches wait their full time",
                    os.getpid())
        self.loop_fd = -1
