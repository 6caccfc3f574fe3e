"""meinheld's Gunicorn worker, with retirement made graceful.

Gunicorn's master sends SIGTERM to a worker it retires (SIGHUP swap,
scale-down, shutdown) and expects it to finish what it is doing. meinheld
catches SIGTERM in C when its loop starts and stops within a second, cutting
keep-alive connections under their clients (and its own Gunicorn worker maps
SIGTERM to an immediate exit). This worker takes SIGTERM back: from then on
every response says Connection: close, so each client finishes its request
and reconnects to a fresh worker, and the loop ends when the last one has.

The loop is stopped by the worker's tick, a timer on the loop, never from
the signal handler itself: Python runs the handler wherever the main thread
next runs bytecode, which can be a request that meinheld's accept callback
started. That callback then goes on accepting queued connections and, for
each, re-arms the read timeout on the listening socket (meinheld passes the
listener's fd there), replacing the stop timer set a moment before; the
worker then served the old model until Gunicorn's graceful timeout.

meinheld's own worker also replaces gunicorn's Logger.error and
Logger.access with functions of other arguments, on the class, in the
master (where Gunicorn makes each worker object before it forks): the
master's next error line (a worker SIGKILLed, "Perhaps out of memory?")
then raised inside its main loop and the whole server died. This worker
puts them back and hands meinheld loggers of its own.
"""
from __future__ import annotations

import os
import select
import signal

# meinheld imports greenlet at its first request; imported here, it is done
# once in the master rather than in each worker's first request.
import greenlet  # noqa: F401
from gunicorn.glogging import Logger
from meinheld import server
from meinheld.gmeinheld import MeinheldWorker as _MeinheldWorker
from meinheld.mlogging import _access, _error

# Connections still open this long after SIGTERM (idle keep-alives) are closed.
DRAIN_SECONDS = 1
# Bodies up to this cap (64 MiB: a 2,000,000-row batch fits) are read
# (meinheld spools those over its 500 KB buffer to a temporary file, so memory
# stays bounded) and reach the app, which answers a JSON 413 from
# Content-Length above server.max_body_bytes without parsing them; beyond it,
# meinheld refuses them from the headers with its own HTML 413.
HTTP_BODY_CAP = 64 << 20
TICK_SECONDS = 1


class MeinheldLogs:
    """What meinheld calls: error(type, value, traceback) and access(environ),
    written through gunicorn's logger."""

    def __init__(self, log: Logger):
        self.log = log

    def error(self, exc_type, value, tb) -> None:
        _error(self.log, exc_type, value, tb)

    def access(self, environ) -> None:
        _access(self.log, environ)


class MeinheldWorker(_MeinheldWorker):
    # Set by the post_worker_init hook (app/server/hooks.py) before run().
    drain = None
    max_body_bytes = 0
    batching = None  # a GreenletScheduler (app/server/greenlets.py) when a model batches

    def __init__(self, *args, **kwargs):
        error, access = Logger.error, Logger.access
        super().__init__(*args, **kwargs)
        Logger.error, Logger.access = error, access
        logs = MeinheldLogs(self.log)
        server.set_error_logger(logs)
        server.set_access_logger(None if self.cfg.accesslog is self.cfg.logconfig is None else logs)

    def run(self):
        # meinheld reads a whole body before the app sees it (HTTP_BODY_CAP).
        server.set_max_content_length(max(HTTP_BODY_CAP, 4 * self.max_body_bytes))
        self.taken_back = False
        if self.batching is not None:
            self.wsgi = self.batching.wrap(self.wsgi)
        server.schedule_call(0, self.tick)
        super().run()

    def tick(self):
        # Runs on meinheld's loop, after it installed its own SIGTERM handler.
        # Python signal handlers run only while Python code runs, so this tick
        # also bounds how long a SIGTERM to an idle worker waits: a second.
        if not self.taken_back:
            signal.signal(signal.SIGTERM, self.handle_exit)
            self.taken_back = True
        if self.alive:
            server.schedule_call(TICK_SECONDS, self.tick)
        else:
            # meinheld's loop runs while anything is scheduled or connected:
            # without a next tick it ends with the last connection, or when
            # the drain time is up.
            server.stop(min(DRAIN_SECONDS, int(self.cfg.graceful_timeout)) or 1)

    def handle_exit(self, sig, frame):
        if self.drain is not None:
            self.drain.active = True
        self.alive = False
        self.detach_listeners()
        # Closed too, not only detached: while any retiring worker held a
        # listener open, the kernel went on completing new connections into
        # its backlog after the master had closed its own, and reset them when
        # the worker exited. Closed, a new connection goes to a live worker
        # (a swap), or is refused at once (a shutdown) and a proxy fails over.
        for listener in self.sockets:
            listener.close()

    def detach_listeners(self):
        """Take the listening sockets out of this process's epoll sets.

        meinheld registers them with EPOLLEXCLUSIVE (one waiting worker is
        woken per new connection) and its stop() leaves them registered, so a
        retiring worker could be the one woken, ignore it, and leave the
        connection unaccepted until another arrives. Removed here, the wake-up
        goes to a worker that accepts."""
        listeners = [s.fileno() for s in self.sockets]
        for fd in epoll_fds():
            try:
                ep = select.epoll.fromfd(os.dup(fd))
            except OSError:
                continue
            with ep:
                for listener in listeners:
                    try:
                        ep.unregister(listener)
                    except OSError:  # not in this set
                        pass


def epoll_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                fds.append(int(name))
        except OSError:
            continue
    return fds
