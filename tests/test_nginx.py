"""nginx in front of two server instances, end to end: real nginx with the
production config (docker/nginx/), two Gunicorn masters on two ports standing
in for two hosts, one Redis, one shared model repository.

Under a keep-alive client load through nginx: a promotion published over Redis
reaches both instances, and a rolling restart of both, each fail no request.
Errors: an instance's own JSON 4xx passes through, nginx's own errors (413,
502) come in the same JSON shape, the admin API is not reachable."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.repository import ModelRepository
from app.training import publish_estimator
from tests.load import Load
from tests.models import dataset
from tests.nginx import Nginx
from tests.server import Server, free_port

pytestmark = [pytest.mark.server, pytest.mark.nginx]

LOAD_SECONDS = 20  # the least time each load test keeps the load on
# Old workers finish what they hold and close their connections after a swap:
# the answers counted as "after" come this long after both instances answered v2.
SETTLE_SECONDS = 5
TOKEN = "nginx-admin-token"
IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}
MAX_BODY = 1_048_576  # server.max_body_bytes


@dataclass
class Cluster:
    models: Path
    env: dict
    servers: list[Server]
    nginx: Nginx

    def restart(self, i: int) -> Server:
        """Stop instance i with SIGTERM, as a deploy would, and start it again on its port."""
        old = self.servers[i]
        assert old.stop() == 0, old.log()
        new = Server(self.models, workers=2, env={**self.env, "MLSERVE_BIND": f"127.0.0.1:{old.port}"})
        new.port, new.url = old.port, old.url
        self.servers[i] = new.start()
        return new


@contextlib.contextmanager
def two_instances_behind_nginx(models: Path, redis_url: str = ""):
    env = {"MLSERVE_REDIS_URL": redis_url, "MLSERVE_SERVER_ADMIN_TOKEN": TOKEN}
    servers = []
    try:
        for _ in range(2):
            servers.append(Server(models, workers=2, env=env).start())
        with Nginx([f"127.0.0.1:{s.port}" for s in servers]) as nginx:
            yield Cluster(models, env, servers, nginx)
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def cluster(fresh_models, redis_server):
    """Two instances sharing a writable repository and a Redis, behind nginx."""
    with two_instances_behind_nginx(fresh_models, redis_server.url) as running:
        yield running


@pytest.fixture(scope="module")
def front(demo_models):
    """The same without Redis, for the tests that change nothing."""
    with two_instances_behind_nginx(demo_models) as running:
        yield running


def predict_direct(server: Server) -> dict:
    r = requests.post(server.url + "/api/v1/predict", json=IRIS, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def predictions_served(server: Server) -> float:
    """Predict requests this instance has answered, from its /metrics."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "mlserve_requests_total" and sample.labels.get("endpoint") == "predict")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def keep_loading_until(load: Load, started: float, settled: float = 0.0, more_answers: int = 100) -> None:
    """Hold the load for at least LOAD_SECONDS in all, and SETTLE_SECONDS
    after `settled` (when a change was seen done), then a last stretch of answers."""
    def long_enough() -> bool:
        return time.monotonic() >= max(started + LOAD_SECONDS, settled + SETTLE_SECONDS)

    wait_for(long_enough, LOAD_SECONDS + SETTLE_SECONDS + 60, "the load did not go on")
    target = load.count() + more_answers
    wait_for(lambda: load.count() >= target, 60,
             f"the load did not go on: {load.count()} answers, failures {load.failures[:5]}")


def publish_iris_v2(models: Path) -> int:
    from sklearn.linear_model import LogisticRegression

    repository = ModelRepository(models)
    names = repository.get("iris_classifier", 1).metadata["feature_names"]
    X, y, _ = dataset("iris")
    mv = publish_estimator(repository, "iris_classifier", LogisticRegression(max_iter=1000).fit(X, y), X, names,
                           {"test": True})
    return mv.version


def test_a_promotion_over_redis_reaches_both_instances_under_load(cluster):
    a, b = cluster.servers
    load = Load(cluster.nginx.url, payload=IRIS, threads=4).start()
    started = time.monotonic()
    try:
        load.wait_for_answers(200)
        assert load.versions_since(started) == {1}
        assert publish_iris_v2(cluster.models) == 2
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVE_")}
        env.update(MLSERVE_REDIS_URL=cluster.env["MLSERVE_REDIS_URL"], MLSERVE_MODELS_DIR=str(cluster.models))
        promoted = subprocess.run([str(Path(sys.executable).with_name("mlserve")), "models", "promote",
                                   "iris_classifier", "2", "--reason", "nginx e2e"],
                                  env=env, capture_output=True, text=True, timeout=120)
        assert promoted.returncode == 0, promoted.stderr
        assert "through Redis" in promoted.stdout, promoted.stdout
        wait_for(lambda: all(predict_direct(s)["model_version"] == 2 for s in (a, b)), 30,
                 "both instances did not answer model_version 2 within 30 s")
        keep_loading_until(load, started, settled=time.monotonic())
    finally:
        load.stop()
    with load.lock:
        last = [answer.body["model_version"] for answer in load.answers[-100:]]
    print(f"\n{load.count()} requests through nginx in {time.monotonic() - started:.0f} s, "
          f"{load.connections} client connections")
    assert load.failures == []
    assert set(last) == {2}
    assert load.versions_since(started) == {1, 2}


def test_a_rolling_restart_behind_nginx_fails_no_request(cluster):
    load = Load(cluster.nginx.url, payload=IRIS, threads=4).start()
    started = time.monotonic()
    try:
        load.wait_for_answers(200)
        for i in range(2):
            restarted = cluster.restart(i)
            # Ready is not enough: nginx left the instance out for a while after it
            # refused connections. The next one stops only once this one takes traffic.
            wait_for(lambda instance=restarted: predictions_served(instance) >= 20, 30,
                     f"nginx sent instance {i} no traffic after its restart")
        keep_loading_until(load, started)
    finally:
        load.stop()
    print(f"\n{load.count()} requests through nginx in {time.monotonic() - started:.0f} s "
          "across restarts of both instances")
    assert load.failures == []


def test_bad_input_gets_the_servers_json_error_and_an_oversized_body_nginxs_json_413(front):
    url = front.nginx.url + "/api/v1/predict"
    short = requests.post(url, json={"model_name": "iris_classifier", "features": [1.0, 2.0]}, timeout=10)
    assert short.status_code == 422
    assert short.json()["error"]["code"] == "invalid_features"
    broken = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    unknown = requests.post(url, json={"model_name": "no_such_model", "features": [1.0]}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    # One byte over server.max_body_bytes: nginx refuses it itself, in the server's shape.
    head = b'{"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "pad": "'
    over = head + b"x" * (MAX_BODY + 1 - len(head) - 2) + b'"}'
    assert len(over) == MAX_BODY + 1
    refused = requests.post(url, data=over, headers={"Content-Type": "application/json",
                                                    "X-Request-ID": "oversized-1"}, timeout=10)
    assert refused.status_code == 413
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.json() == {"error": {"code": "body_too_large",
                                        "message": "request body larger than 1048576 bytes"}}
    assert refused.headers["X-Request-ID"] == "oversized-1"
    # A body of exactly the limit is the server's to judge: nginx lets it through.
    at_limit = over[:MAX_BODY - 2] + b'"}'
    passed = requests.post(url, data=at_limit, headers={"Content-Type": "application/json",
                                                       "X-Request-ID": "at-limit-1"}, timeout=10)
    assert passed.headers["Content-Type"] == "application/json" and "error" in passed.json() or passed.ok
    wait_for(lambda: {"oversized-1", "at-limit-1"} <= logged(front.nginx).keys(), 10,
             "nginx did not log both requests")
    assert logged(front.nginx)["oversized-1"]["upstream"] == ""
    assert logged(front.nginx)["at-limit-1"]["upstream"] != ""


def logged(nginx: Nginx) -> dict[str, dict]:
    """nginx's access log (JSON lines), by request id."""
    entries = {}
    for line in nginx.access_lines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        entries[entry["request_id"]] = entry
    return entries


HIDDEN = ["/api/v1/admin/cache/invalidate", "/api/v1/admin/models/iris_classifier/reload",
          "/api/v1//admin/cache/invalidate", "/api/v1/%61dmin/cache/invalidate", "/api/v1/admin/",
          "/metrics", "/metrics/"]


def test_the_admin_api_and_the_metrics_are_not_public(front):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    direct = requests.post(front.servers[0].url + "/api/v1/admin/cache/invalidate", headers=auth, timeout=10)
    assert direct.status_code == 200  # the admin API is on: only nginx keeps it away
    assert requests.get(front.servers[0].url + "/metrics", timeout=10).status_code == 200
    for path in HIDDEN:
        for method in ("GET", "POST"):
            r = requests.request(method, front.nginx.url + path, headers=auth, timeout=10)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"
    assert requests.get(front.nginx.url + "/api/v1/models", timeout=10).status_code == 200


class Echo(http.server.BaseHTTPRequestHandler):
    """An upstream that answers with what it was sent: the request line's
    version, the headers, the client port (one per connection)."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"version": self.request_version, "headers": dict(self.headers.items()),
                           "peer_port": self.client_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("sent_id", [None, "client-id-42", "not a token\tvalue"])
def test_nginx_keeps_upstream_connections_alive_and_passes_the_request_and_routing_headers(sent_id):
    echo = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        with Nginx([f"127.0.0.1:{echo.server_address[1]}"]) as nginx:
            headers = {"X-Routing-Key": "user-22", **({"X-Request-ID": sent_id} if sent_id else {})}
            seen = []
            for _ in range(5):
                r = requests.post(nginx.url + "/api/v1/predict", json=IRIS, headers=headers, timeout=10)
                assert r.status_code == 200
                seen.append((r.json(), r.headers["X-Request-ID"]))
    finally:
        echo.shutdown()
        echo.server_close()
    for answer, request_id in seen:
        upstream = {k.lower(): v for k, v in answer["headers"].items()}
        assert answer["version"] == "HTTP/1.1"
        assert "connection" not in upstream  # no "Connection: close": the connection stays open
        assert upstream["x-routing-key"] == "user-22"
        assert upstream["x-request-id"] == request_id
        if sent_id == "client-id-42":
            assert request_id == sent_id
        else:  # none, or not a plain token: nginx makes one
            assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert len({answer["peer_port"] for answer, _ in seen}) == 1  # one upstream connection, reused
    if sent_id != "client-id-42":
        assert len({request_id for _, request_id in seen}) == len(seen)


def test_with_no_instance_answering_nginx_answers_a_json_502():
    with Nginx([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]) as nginx:
        r = requests.post(nginx.url + "/api/v1/predict", json=IRIS, timeout=10)
    assert r.status_code == 502
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == "bad_gateway"
