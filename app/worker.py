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
HTTP_BODY_CAP = 16 << 20


class MeinheldWorker(_MeinheldWorker):
    def run(self):
        # meinheld reads a whole body before the app sees it. Bodies up to this
        # cap reach the app, which answers a JSON 413 above max_body_bytes;
        # bodies declared beyond it are refused by meinheld itself (HTML 413)
        # without being read, so a client cannot make a worker buffer them.
        from app.wsgi import service

        server.set_max_content_length(max(HTTP_BODY_CAP, 4 * service.settings.server.max_body_bytes))
        super().run()

    def handle_exit(self, sig, frame):
        self.alive = False
        server.stop(min(DRAIN_SECONDS, int(self.cfg.graceful_timeout)) or 1)
