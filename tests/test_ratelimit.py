"""Rate limiting middleware: a caller's window, the 429 it gets once spent,
a key's own rate, the endpoints that are never limited, and storage trouble
that never fails a request but keeps the limit in the worker's memory."""
from __future__ import annotations

import logging

import falcon
import pytest
from falcon import testing

from app.http import errors
from app.http.ratelimit import RateLimit, server_limit
from app.keys import Principal


class Endpoint:
    def __init__(self, name: str):
        self.endpoint = name

    def on_get(self, req, resp):
        resp.media = {"ok": True}


class AsKey:
    """Stands in for authentication: the X-Key header names the caller's key."""

    def process_resource(self, req, resp, resource, params):
        name = req.get_header("X-Key")
        if name:
            rate = int(req.get_header("X-Rate") or 0) or None
            req.context.principal = Principal(name, name, frozenset({"predict"}), rate=rate)


def app_with(limit: RateLimit) -> testing.TestClient:
    app = falcon.App(middleware=[AsKey(), limit])
    for name in ("predict", "health", "ready", "metrics"):
        app.add_route(f"/{name}", Endpoint(name))
    app.add_error_handler(errors.HANDLED, errors.handle)
    return testing.TestClient(app)


def test_the_burst_passes_then_429_with_retry_after():
    client = app_with(RateLimit(server_limit(requests_per_second=2, burst=4)))
    statuses = [client.simulate_get("/predict", remote_addr="10.0.0.1").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    refused = client.simulate_get("/predict", remote_addr="10.0.0.1")
    assert refused.json["error"]["code"] == "rate_limited"
    assert refused.json["error"]["message"] == "rate limit of 4 requests per 2 s exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert client.simulate_get("/predict", remote_addr="10.0.0.2").status_code == 200


def test_keys_are_counted_apart_whatever_their_address():
    client = app_with(RateLimit(server_limit(requests_per_second=1, burst=2)))
    a = [client.simulate_get("/predict", headers={"X-Key": "a"}, remote_addr="10.0.0.1").status_code
         for _ in range(3)]
    b = [client.simulate_get("/predict", headers={"X-Key": "b"}, remote_addr="10.0.0.1").status_code
         for _ in range(3)]
    assert a == b == [200, 200, 429]


def test_a_key_with_its_own_rate_gets_that_rate():
    client = app_with(RateLimit(server_limit(requests_per_second=1, burst=1)))
    own = [client.simulate_get("/predict", headers={"X-Key": "fast", "X-Rate": "5"}).status_code for _ in range(6)]
    assert own == [200] * 5 + [429]
    assert "5 requests per 1 s" in client.simulate_get("/predict", headers={"X-Key": "fast", "X-Rate": "5"}
                                                        ).json["error"]["message"]


def test_without_a_server_limit_only_keys_with_a_rate_are_limited():
    client = app_with(RateLimit(None))
    assert [client.simulate_get("/predict").status_code for _ in range(20)] == [200] * 20
    assert [client.simulate_get("/predict", headers={"X-Key": "k", "X-Rate": "2"}).status_code
            for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_and_scrapes_are_never_limited(path):
    client = app_with(RateLimit(server_limit(requests_per_second=1, burst=1)))
    assert [client.simulate_get(path, remote_addr="10.0.0.1").status_code for _ in range(10)] == [200] * 10


def test_redis_down_falls_back_to_the_workers_memory(caplog):
    # Nothing listens on port 1: every Redis call fails at once.
    limit = RateLimit(server_limit(requests_per_second=1, burst=3), "redis://127.0.0.1:1/0", 0.05, breaker_reset=60)
    client = app_with(limit)
    with caplog.at_level(logging.WARNING):
        statuses = [client.simulate_get("/predict").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # served, and still limited
    assert "Redis unavailable, each worker counts on its own" in caplog.text
    assert limit.breaker.current_state == "open"
