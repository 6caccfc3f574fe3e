"""What a client sees of a server that is stopping: found while testing the
image's SIGTERM drain (tests/test_image.py), where it applies in the same way.

After SIGTERM the master closes its listening sockets; a retiring worker
must close its own copies too, or the kernel still completes new
connections into the backlog, nobody accepts them, and they are reset when
the worker exits about two seconds later. A client that reconnects after its
last `Connection: close` answer (or a proxy without non-idempotent retries)
would then see a reset instead of a refusal it could fail over on at once.
"""
from __future__ import annotations

import http.client
import json
import signal
import time

import pytest

from tests.server import Server

BODY = json.dumps({"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False})


def predict(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
    conn.request("POST", "/api/v1/predict", body=BODY, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response


@pytest.mark.server
def test_a_connection_opened_after_the_drain_began_is_refused_not_reset(demo_models):
    server = Server(demo_models, workers=1).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        assert predict(conn).status == 200
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not predict(conn).will_close:  # the worker has taken the SIGTERM: it is draining
            assert time.monotonic() < deadline, "no Connection: close within 10 s of SIGTERM"
        conn.close()
        late = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        with pytest.raises(ConnectionRefusedError):
            late.connect()
            predict(late)
    finally:
        server.stop()
