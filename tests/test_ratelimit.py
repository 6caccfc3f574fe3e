"""Rate limiting middleware: a client's window, the 429 it gets once spent,
the endpoints that are never limited, and storage trouble that never fails
a request."""
from __future__ import annotations

import falcon
import pytest
from falcon import testing

from app.http import errors
from app.http.ratelimit import RateLimit


class Endpoint:
    def __init__(self, name: str):
        self.endpoint = name

    def on_get(self, req, resp):
        resp.media = {"ok": True}


def app_with(limit: RateLimit) -> testing.TestClient:
    app = falcon.App(middleware=[limit])
    for name in ("predict", "health", "ready", "metrics"):
        app.add_route(f"/{name}", Endpoint(name))
    app.add_error_handler(errors.HANDLED, errors.handle)
    return testing.TestClient(app)


def test_the_burst_passes_then_429_with_retry_after():
    client = app_with(RateLimit(requests_per_second=2, burst=4))
    statuses = [client.simulate_get("/predict", remote_addr="10.0.0.1").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    refused = client.simulate_get("/predict", remote_addr="10.0.0.1")
    assert refused.json["error"]["code"] == "rate_limited"
    assert refused.json["error"]["message"] == "rate limit of 4 requests per 2 s exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert client.simulate_get("/predict", remote_addr="10.0.0.2").status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_and_scrapes_are_never_limited(path):
    client = app_with(RateLimit(requests_per_second=1, burst=1))
    assert [client.simulate_get(path, remote_addr="10.0.0.1").status_code for _ in range(10)] == [200] * 10


def test_storage_trouble_lets_the_request_through(caplog):
    limit = RateLimit(requests_per_second=1, burst=1)

    class Broken:
        def hit(self, *args):
            raise ConnectionError("storage down")
    limit.limiter = Broken()
    client = app_with(limit)
    assert [client.simulate_get("/predict").status_code for _ in range(3)] == [200] * 3
    assert "rate limit storage unavailable" in caplog.text

