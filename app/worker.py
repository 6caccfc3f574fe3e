"""meinheld's Gunicorn worker, with SIGTERM made graceful.

Gunicorn's master sends SIGTERM to ask workers to finish what they are doing
and exit (SIGQUIT/SIGINT mean now). meinheld's own worker has these reversed:
it exits at once on SIGTERM, cutting off requests in flight.
"""
from __future__ import annotations

from meinheld import server
from meinheld.gmeinheld import MeinheldWorker as _MeinheldWorker


class MeinheldWorker(_MeinheldWorker):
    def handle_exit(self, sig, frame):
        # Stop accepting; let open requests finish within graceful_timeout.
        self.alive = False
        server.stop(int(self.cfg.graceful_timeout))
