"""meinheld's Gunicorn worker, with SIGTERM made graceful.

Gunicorn's master sends SIGTERM to ask workers to finish what they are doing
and exit (SIGQUIT/SIGINT mean now). meinheld's own worker has these reversed:
it exits at once on SIGTERM, cutting off requests in flight.
"""
from __future__ import annotations

from meinheld import server
from meinheld.gmeinheld import MeinheldWorker as _MeinheldWorker

# meinheld's stop(timeout) waits for every open connection, idle keep-alive
# ones included, so it would always take the whole timeout. The request being
# handled finishes before the loop runs again (the handler is synchronous);
# this is the time left to flush responses and serve requests already sent.
DRAIN_SECONDS = 1


class MeinheldWorker(_MeinheldWorker):
    def handle_exit(self, sig, frame):
        self.alive = False
        server.stop(min(DRAIN_SECONDS, int(self.cfg.graceful_timeout)) or 1)
