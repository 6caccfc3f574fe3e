"""The process model: graceful SIGTERM, metrics summed over workers, readiness."""
from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import requests

from tests import slow_model
from tests.server import Server

IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}


@pytest.fixture
def slow_server(fresh_models, tmp_path):
    slow_model.publish(fresh_models)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  slow_model: {}\n  iris_classifier: {}\n")
    server = Server(fresh_models, workers=2, models_config=config).start()
    yield server
    server.stop()


def test_sigterm_lets_requests_in_flight_finish(slow_server):
    results = {}

    def slow_request():
        body = {"model_name": "slow_model", "features": [1.5, 42.0], "use_cache": False}
        results["response"] = requests.post(slow_server.url + "/api/v1/predict", json=body, timeout=10)

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
