"""The process model: graceful SIGTERM, metrics summed over workers, readiness."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import requests

from tests import slow_model
from tests.server import Server

IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}


def start_slow_server(models, tmp_path, workers: int, env: dict | None = None) -> Server:
    slow_model.publish(models)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  slow_model: {}\n  iris_classifier: {}\n")
    return Server(models, workers=workers, models_config=config, env=env).start()


@pytest.fixture
def slow_server(fresh_models, tmp_path):
    server = start_slow_server(fresh_models, tmp_path, workers=2)
    yield server
    server.stop()


def slow(seconds: float) -> dict:
    return {"model_name": "slow_model", "features": [seconds, 42.0], "use_cache": False}


def test_sigterm_lets_requests_in_flight_finish(slow_server):
    results = {}

    def slow_request():
        results["response"] = requests.post(slow_server.url + "/api/v1/predict", json=slow(1.5), timeout=10)

    caller = threading.Thread(target=slow_request)
    caller.start()
    time.sleep(0.5)  # the request is now inside the model
    started = time.monotonic()
    slow_server.process.send_signal(signal.SIGTERM)
    caller.join(15)
    code = slow_server.process.wait(15)
    response = results["response"]
    assert response.status_code == 200
    assert response.json()["prediction"] == pytest.approx(42.0)
    assert code == 0
    assert time.monotonic() - started < 10
    with pytest.raises(requests.ConnectionError):
        requests.get(slow_server.url + "/health", timeout=2)


def test_a_worker_retired_mid_request_from_the_accept_queue_still_exits(fresh_models, tmp_path):
    # One worker, busy: the next connections wait in the listen backlog with
    # their requests sent, so the worker serves them straight from its accept
    # callback. SIGTERM arrives while it serves the first of them. The worker
    # must answer them all and then exit, not linger until a read timeout.
    server = start_slow_server(fresh_models, tmp_path, workers=1, env={"MLSERVE_SERVER_GRACEFUL_TIMEOUT": "90"})
    try:
        worker = server.worker_pids()[0]
        answers = {}

        def send(key: str, body: dict) -> None:
            answers[key] = requests.post(server.url + "/api/v1/predict", json=body, timeout=30)

        callers = [threading.Thread(target=send, args=("busy", slow(1.5)))]
        callers[0].start()
        time.sleep(0.3)
        for key, body in [("queued-slow", slow(1.5)), ("queued-1", IRIS), ("queued-2", IRIS)]:
            callers.append(threading.Thread(target=send, args=(key, body)))
            callers[-1].start()
            time.sleep(0.1)
        time.sleep(1.7)  # "busy" is done; "queued-slow" is inside the model
        signalled = time.monotonic()
        os.kill(worker, signal.SIGTERM)
        for caller in callers:
            caller.join(30)
        assert {key: r.status_code for key, r in answers.items()} == dict.fromkeys(
            ["busy", "queued-slow", "queued-1", "queued-2"], 200)
        while worker in server.worker_pids() and time.monotonic() - signalled < 20:
            time.sleep(0.1)
        # meinheld's own read timeout on that path is 30 s; retiring takes about 2.
        assert worker not in server.worker_pids(), "the retired worker is still running"
        server.wait_for_workers(1)  # its replacement: stopped while booting, it could miss the SIGTERM
        server.wait_until("/ready", 30)
    finally:
        server.stop()


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_from_every_worker(demo_models):
    with Server(demo_models, workers=2) as server:
        sessions = [requests.Session() for _ in range(4)]  # several connections reach both workers
        for i in range(200):
            assert sessions[i % 4].post(server.url + "/api/v1/predict", json=IRIS).status_code == 200
        labels = dict(model="iris_classifier", version="1", endpoint="predict", status="200")
        deadline = time.monotonic() + 5
        while True:  # workers publish their counts at least once a second
            text = requests.get(server.url + "/metrics").text
            if metric_value(text, "mlserve_requests_total", **labels) >= 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert metric_value(text, "mlserve_requests_total", **labels) == 200
        assert metric_value(text, "mlserve_request_duration_seconds_count", model="iris_classifier") == 200
        assert metric_value(text, "mlserve_request_duration_seconds_bucket", model="iris_classifier", le="+Inf") == 200
        assert metric_value(text, "mlserve_models_loaded") == 4
        assert re.search(r'mlserve_model_serving_version\{model="iris_classifier"\} 1\.0', text)


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
