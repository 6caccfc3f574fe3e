"""The process model: graceful SIGTERM, metrics summed over workers, readiness."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading

import pytest
import requests

from tests import slow_model
from tests.server import Server
from tests.wait import until

IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}


def start_slow_server(models, tmp_path, workers: int, env: dict | None = None) -> Server:
    slow_model.publish(models)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  slow_model: {}\n  iris_classifier: {}\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    server = Server(models, workers=workers, models_config=config, env={"SLOW_MODEL_MARKS": str(marks), **(env or {})})
    server.marks = marks
    return server.start()


def inside_the_model(server: Server, seconds: float) -> None:
    until(lambda: slow_model.started(server.marks, seconds), what=f"the {seconds} s request is inside the model")


@pytest.fixture
def slow_server(fresh_models, tmp_path):
    server = start_slow_server(fresh_models, tmp_path, workers=2)
    yield server
    server.stop()


def slow(seconds: float) -> dict:
    return {"model_name": "slow_model", "features": [seconds, 42.0], "use_cache": False}


@pytest.mark.server
def test_sigterm_lets_requests_in_flight_finish(slow_server):
    results = {}

    def slow_request():
        results["response"] = requests.post(slow_server.url + "/api/v1/predict", json=slow(1.5), timeout=10)

    caller = threading.Thread(target=slow_request)
    caller.start()
    inside_the_model(slow_server, 1.5)
    slow_server.process.send_signal(signal.SIGTERM)
    caller.join(15)
    code = slow_server.process.wait(15)  # well inside the 30 s graceful timeout
    response = results["response"]
    assert response.status_code == 200
    assert response.json()["prediction"] == pytest.approx(42.0)
    assert code == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(slow_server.url + "/health", timeout=2)


@pytest.mark.server
def test_a_worker_retired_mid_request_from_the_accept_queue_still_exits(fresh_models, tmp_path):
    # One worker, busy: the next connections wait in the listen backlog with
    # their requests sent, so the worker serves them straight from its accept
    # callback. SIGTERM arrives while it serves the first of them. The worker
    # must answer them all and then exit, not linger until a read timeout.
    server = start_slow_server(fresh_models, tmp_path, workers=1, env={"MLSERVE_SERVER_GRACEFUL_TIMEOUT": "90"})
    try:
        worker = server.worker_pids()[0]
        busy = send_request(server.port, slow(1.5))
        inside_the_model(server, 1.5)
        # Sent in full before "busy" is done: they wait in the listen backlog.
        queued = {key: send_request(server.port, body)
                  for key, body in [("queued-slow", slow(1.6)), ("queued-1", IRIS), ("queued-2", IRIS)]}
        inside_the_model(server, 1.6)  # "busy" is done; "queued-slow" came from the accept callback
        os.kill(worker, signal.SIGTERM)
        statuses = {key: read_status(sock) for key, sock in {"busy": busy, **queued}.items()}
        assert statuses == dict.fromkeys(["busy", "queued-slow", "queued-1", "queued-2"], 200)
        # meinheld's own read timeout on that path is 30 s; retiring takes about 2.
        until(lambda: worker not in server.worker_pids(), timeout=20, what="the retired worker exits")
        server.wait_for_workers(1)  # its replacement: stopped while booting, it could miss the SIGTERM
        server.wait_until("/ready", 30)
    finally:
        server.stop()


def send_request(port: int, body: dict) -> socket.socket:
    """A connection with one whole request sent on it, its answer not yet read."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
    return sock


def read_status(sock: socket.socket) -> int:
    with sock:
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        response.read()
        return response.status


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.server
def test_metrics_count_requests_from_every_worker(demo_models):
    with Server(demo_models, workers=2) as server:
        sessions = [requests.Session() for _ in range(4)]  # several connections reach both workers
        for i in range(200):
            assert sessions[i % 4].post(server.url + "/api/v1/predict", json=IRIS).status_code == 200
        labels = dict(model="iris_classifier", version="1", endpoint="predict", status="200")
        # Workers publish their counts at least once a second.
        def counted() -> str | None:
            text = requests.get(server.url + "/metrics").text
            return text if metric_value(text, "mlserve_requests_total", **labels) >= 200 else None
        text = until(counted, timeout=10, what="200 requests counted")
        assert metric_value(text, "mlserve_requests_total", **labels) == 200
        assert metric_value(text, "mlserve_request_duration_seconds_count", model="iris_classifier") == 200
        assert metric_value(text, "mlserve_request_duration_seconds_bucket", model="iris_classifier", le="+Inf") == 200
        assert metric_value(text, "mlserve_models_loaded") == 4
        assert re.search(r'mlserve_model_serving_version\{model="iris_classifier"\} 1\.0', text)


@pytest.mark.server
def test_ready_is_503_naming_a_configured_model_that_is_missing(demo_models, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  iris_classifier: {}\n  not_there: {}\n")
    server = Server(demo_models, workers=1, models_config=config).start(ready=False)
    try:
        response = requests.get(server.url + "/ready")
        assert response.status_code == 503
        assert "not_there" in response.json()["not_ready"]
        ok = requests.post(server.url + "/api/v1/predict", json=IRIS)
        assert ok.status_code == 200 and ok.json()["prediction"] == 0
    finally:
        server.stop()


@pytest.mark.server
def test_a_stopped_server_leaves_nothing_on_disk(demo_models, tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    server = Server(demo_models, workers=1, env={"TMPDIR": str(private_tmp)})
    server.env.pop("MLSERVE_MONITORING_METRICS_DIR")  # the default: in the master's runtime directory
    with server:
        assert [p.name[:len("mlserve-run-")] for p in ours(private_tmp)] == ["mlserve-run-"]
        assert json.loads(server.pid_file.read_text())["pid"] == server.master_pid
        requests.post(server.url + "/api/v1/predict", json=IRIS)
    assert ours(private_tmp) == []
    assert not server.workdir.exists()  # the test harness's own folder, log and pid file included
    assert "Listening at" in server.log()


@pytest.mark.server
def test_a_busy_port_is_one_line_before_any_model_loads(demo_models, tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = Server(demo_models, workers=1, env={"TMPDIR": str(private_tmp), "MLSERVE_BIND": f"127.0.0.1:{port}"})
        with pytest.raises(RuntimeError, match="exited with 1"):
            server.start()
    log = server.log()
    assert f"mlserve: 127.0.0.1:{port} is in use by another program; choose another port with server.port" in log
    assert "loaded" not in log and "Traceback" not in log and "Connection in use" not in log
    assert ours(private_tmp) == [] and not server.pid_file.exists()


def ours(tmp) -> list:
    # ONNX Runtime keeps a telemetry file (.ses) there; that one is not ours to remove.
    return [p for p in tmp.iterdir() if p.name.startswith("mlserve")]


@pytest.mark.server
@pytest.mark.parametrize("text, fragment", [
    ("models:\n  iris_classifier: {versoin: 2}\n", "models.iris_classifier.versoin: unknown option; allowed: version"),
    ("models:\n  iris_classifier: {version: [\n", "not valid YAML at line 3"),
])
def test_a_broken_models_yaml_stops_the_start_with_one_line(demo_models, tmp_path, text, fragment):
    config = tmp_path / "models.yaml"
    config.write_text(text)
    server = Server(demo_models, workers=1, models_config=config)
    with pytest.raises(RuntimeError, match="exited with 1"):
        server.start()
    log = server.log()
    assert f"mlserve: bad setting: {config}: " in log and fragment in log
    assert "Traceback" not in log and "loaded" not in log
