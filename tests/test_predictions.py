"""The prediction log in process: what a record holds for single, batch and
refused predictions, the request ids, the bounded queue, and sinks that are
slow, down or rotating (the file sink for real, on disk; the HTTP sink
against a local receiver)."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import orjson
import pytest
from falcon import testing

from app.cache import LRU, Generations, PredictionCache
from app.http.app import create_app
from app.metrics import Metrics
from app.predictions import PredictionLog
from app.sinks import CE_REQUEST, CE_RESPONSE, CloudEventSink, FileSink, Sink, SinkFailed
from tests.monitoring_stack import Receiver
from tests.test_api import build_registry, make_settings
from tests.wait import until

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]


class Recorder(Sink):
    """A sink that keeps what it is given (or blocks, or fails, when told to)."""
    name = "file"

    def __init__(self, metrics: Metrics, buffer_bytes: int = 1 << 20, kind: str = "records"):
        super().__init__(buffer_bytes, metrics)
        self.kind = kind
        self.lines: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        self.failing = False

    def write(self, payload) -> None:
        self.gate.wait()
        if self.failing:
            raise SinkFailed("down")
        if self.kind == "records":
            self.lines.extend(json.loads(line) for line in payload.splitlines())
        else:
            self.lines.extend(payload)


@pytest.fixture(scope="module")
def registry(demo_models):
    return build_registry(demo_models)


def served(registry, tmp_path, sinks, **options):
    metrics = Metrics()
    log = PredictionLog([s(metrics) if callable(s) else s for s in sinks], None, metrics, **options)
    log.start()
    cache = PredictionCache(LRU(1000, 1 << 20, 60), None, Generations(16), metrics)
    app = create_app(make_settings(tmp_path), registry, metrics, cache=cache, predictions=log)
    return testing.TestClient(app), log, metrics


def predict(client, features, headers=None, **extra):
    return client.simulate_post("/api/v1/predict", json={"model_name": "iris_classifier", "features": features, **extra},
                                headers=headers)


def test_every_response_has_a_request_id_the_clients_when_sane(registry, tmp_path):
    client = testing.TestClient(create_app(make_settings(tmp_path), registry, Metrics()))
    given = client.simulate_get("/health", headers={"X-Request-ID": "order-42:retry/1"})
    assert given.headers["X-Request-ID"] == "order-42:retry/1"
    made = {client.simulate_get("/health").headers["X-Request-ID"] for _ in range(50)}
    assert len(made) == 50
    for bad in ("has space", "x" * 129, "quote\"d", "{json}"):
        answer = client.simulate_get("/health", headers={"X-Request-ID": bad})
        assert answer.headers["X-Request-ID"] != bad
    assert client.simulate_get("/no/such/path").headers["X-Request-ID"]
    assert predict(client, [1, 2]).headers["X-Request-ID"]


def test_single_and_batch_predictions_become_one_record_per_row(registry, tmp_path):
    recorder = None

    def sink(metrics):
        nonlocal recorder
        recorder = Recorder(metrics)
        return recorder
    client, log, _ = served(registry, tmp_path, [sink])
    one = predict(client, SETOSA, headers={"X-Request-ID": "req-one"})
    again = predict(client, SETOSA)  # an L1 hit
    batch = client.simulate_post("/api/v1/batch_predict", json={"model_name": "iris_classifier", "features_batch": [
        VIRGINICA, {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]})
    assert log.flush(5)
    first, hit, row0, row1 = recorder.lines
    assert first["request_id"] == "req-one" == one.headers["X-Request-ID"]
    assert (first["model"], first["version"], first["endpoint"], first["route"], first["shadow"]) == \
        ("iris_classifier", 1, "predict", "serving", None)
    assert first["features"] == SETOSA and first["prediction"] == one.json["prediction"]
    assert first["probability"] == one.json["probability"] and first["status"] == 200 and first["error"] is None
    assert (first["cache"], hit["cache"]) == (None, "l1") and hit["request_id"] == again.headers["X-Request-ID"]
    assert first["time"].endswith("Z") and first["latency_ms"] > 0
    assert [row0["row"], row1["row"]] == [0, 1]
    assert row0["request_id"] == row1["request_id"] == batch.headers["X-Request-ID"]
    assert row0["features"] == VIRGINICA and row1["features"] == SETOSA  # an object row, in feature order
    assert [row0["prediction"], row1["prediction"]] == batch.json["predictions"]
    assert row0["probability"] == max(batch.json["probabilities"][0])


def test_refused_predictions_are_recorded_with_their_code(registry, tmp_path):
    recorder = None

    def sink(metrics):
        nonlocal recorder
        recorder = Recorder(metrics)
        return recorder
    client, log, _ = served(registry, tmp_path, [sink])
    short = predict(client, [1, 2], headers={"X-Request-ID": "bad-1"})
    unknown = client.simulate_post("/api/v1/predict", json={"model_name": "nope", "features": SETOSA})
    broken = client.simulate_post("/api/v1/batch_predict", body=b"{not json")
    client.simulate_get("/health")  # not a prediction: not recorded
    assert (short.status_code, unknown.status_code, broken.status_code) == (422, 404, 400)
    assert log.flush(5)
    assert [(r["status"], r["error"], r["endpoint"]) for r in recorder.lines] == [
        (422, "invalid_features", "predict"), (404, "model_not_found", "predict"), (400, "invalid_json", "batch_predict")]
    first = recorder.lines[0]
    assert first["request_id"] == "bad-1" and first["model"] == "iris_classifier" and first["features"] == [1, 2]
    assert "expects 4" in first["message"] and first["prediction"] is None
    assert recorder.lines[1]["model"] == "nope"


def test_a_sample_records_about_its_share(registry, tmp_path):
    recorder = None

    def sink(metrics):
        nonlocal recorder
        recorder = Recorder(metrics)
        return recorder
    client, log, _ = served(registry, tmp_path, [sink], sample_rate=0.25)
    for i in range(400):
        predict(client, [5.0 + i / 1000, 3.0, 1.5, 0.2])
    assert log.flush(5)
    assert 40 <= len(recorder.lines) <= 170  # binomial(400, 0.25): far outside 4 sigma either way


def test_the_queue_drops_the_oldest_rows_when_the_writer_falls_behind(registry):
    metrics = Metrics()
    recorder = Recorder(metrics)
    log = PredictionLog([recorder], None, metrics, queue_rows=100)  # not started: nothing drains it
    from app.inference import Predictor

    predictor = Predictor(registry, 1000, None, None, log)
    for i in range(250):
        predictor.predict({"model_name": "iris_classifier", "features": [4.0 + i / 100, 3.0, 1.4, 0.2]},
                          time.perf_counter(), request_id=f"r{i}")
    assert len(log.queue) == 100 and log.dropped == 150
    assert [item[4] for item in log.queue][:2] == ["r150", "r151"]  # the newest are kept
    log.start()
    assert log.flush(5)
    assert [r["request_id"] for r in recorder.lines][0] == "r150"
    assert value(metrics, "mlserve_prediction_log_dropped_total", sink="file", reason="queue_full") == 150
    assert value(metrics, "mlserve_prediction_log_records_total", sink="file") == 100


def value(metrics: Metrics, name: str, **labels) -> float | None:
    from tests.test_metrics import value as read

    return read(metrics, name, **labels)


def test_a_stuck_sink_never_holds_up_a_request_and_its_backlog_is_bounded(registry, tmp_path):
    recorder = None

    def sink(metrics):
        nonlocal recorder
        recorder = Recorder(metrics, buffer_bytes=20_000)
        recorder.gate.clear()  # the sink hangs
        return recorder
    client, log, metrics = served(registry, tmp_path, [sink], flush_seconds=0.01)
    for i in range(300):
        assert predict(client, [4.0 + i / 100, 3.0, 1.4, 0.2]).status_code == 200
    until(lambda: not log.queue, 10, what="the writer took the queue")
    until(lambda: value(metrics, "mlserve_prediction_log_dropped_total", sink="file", reason="sink_behind"),
          10, what="the sink's backlog dropped its oldest records")
    assert recorder.bytes <= 20_000
    recorder.gate.set()
    assert log.flush(10)
    written = value(metrics, "mlserve_prediction_log_records_total", sink="file")
    dropped = value(metrics, "mlserve_prediction_log_dropped_total", sink="file", reason="sink_behind")
    assert written + dropped == 300 and written == len(recorder.lines)
    assert recorder.lines[-1]["features"][0] == pytest.approx(6.99)  # the newest survived


def test_a_failing_sink_drops_after_three_tries_and_counts_it(registry, tmp_path, monkeypatch):
    monkeypatch.setattr("app.sinks.BACKOFF_SECONDS", (0.01, 0.01, 0.01))
    recorder = None

    def sink(metrics):
        nonlocal recorder
        recorder = Recorder(metrics)
        recorder.failing = True
        return recorder
    client, log, metrics = served(registry, tmp_path, [sink])
    predict(client, SETOSA)
    assert log.flush(5)
    assert value(metrics, "mlserve_prediction_log_dropped_total", sink="file", reason="sink_error") == 1
    assert predict(client, SETOSA).status_code == 200


def test_the_file_sink_appends_json_lines_and_rotates_by_size(tmp_path):
    metrics = Metrics()
    path = tmp_path / "predictions.jsonl"
    sink = FileSink(str(path), max_bytes=1000, backups=2, buffer_bytes=1 << 20, metrics=metrics)
    other = FileSink(str(path), max_bytes=1000, backups=2, buffer_bytes=1 << 20, metrics=metrics)  # a second worker
    line = orjson.dumps({"pad": "x" * 80}) + b"\n"  # 92 bytes
    for i in range(40):
        (sink if i % 2 else other).write(line * 2)
    kept = [path, tmp_path / "predictions.jsonl.1", tmp_path / "predictions.jsonl.2"]
    assert all(p.exists() for p in kept) and not (tmp_path / "predictions.jsonl.3").exists()
    for p in kept:
        data = p.read_bytes()
        assert len(data) <= 1000 and data.endswith(b"\n")
        assert all(json.loads(x) == {"pad": "x" * 80} for x in data.splitlines())


@pytest.mark.server
def test_the_http_sink_sends_kserve_cloudevents_in_binary_mode(registry, tmp_path):
    receiver = Receiver()
    try:
        client, log, _ = served(registry, tmp_path, [lambda m: CloudEventSink(receiver.url + "/ce", 2.0, 1 << 20, m)])
        answer = predict(client, SETOSA, headers={"X-Request-ID": "ce-7"})
        refused = predict(client, [1])
        assert log.flush(10)
    finally:
        receiver.stop()
    (_, req_h, req_b), (_, resp_h, resp_b), (_, bad_req_h, _), (_, bad_resp_h, bad_resp_b) = receiver.posts
    assert (req_h["ce-type"], resp_h["ce-type"]) == (CE_REQUEST, CE_RESPONSE)
    assert req_h["ce-id"] == resp_h["ce-id"] == "ce-7" and req_h["ce-specversion"] == "1.0"
    assert req_h["content-type"] == "application/json" and req_h["ce-inferenceservicename"] == "iris_classifier"
    assert req_h["ce-source"] and req_h["ce-time"].endswith("Z") and req_h["ce-modelversion"] == "1"
    assert json.loads(req_b) == {"model_name": "iris_classifier", "features": SETOSA}
    assert json.loads(resp_b) == answer.json  # the response as the client got it
    assert bad_req_h["ce-id"] == bad_resp_h["ce-id"] == refused.headers["X-Request-ID"]
    assert bad_resp_h["ce-status"] == "422" and json.loads(bad_resp_b)["error"]["code"] == "invalid_features"


def test_rows_reach_the_drift_counter_with_logging_off(registry, tmp_path):
    from app.drift import DriftMonitor, Thresholds

    metrics = Metrics()
    drift = DriftMonitor(3600, 12, 0, 100, Thresholds(0.1, 0.25, 1e-4, 10), lanes=2)
    drift.prepare([m for s in registry.models.values() for m in s.versions.values()])
    log = PredictionLog([], drift, metrics)
    log.start()
    client = testing.TestClient(create_app(make_settings(tmp_path), registry, metrics, predictions=log, drift=drift))
    rows = np.random.default_rng(0).uniform([4.5, 2.5, 1.0, 0.1], [7.5, 4.0, 6.5, 2.4], size=(60, 4)).round(2)
    client.simulate_post("/api/v1/batch_predict", json={"model_name": "iris_classifier", "features_batch": rows[:50].tolist()})
    for row in rows[50:]:
        predict(client, row.tolist())
    assert log.flush(5)
    found = client.simulate_get("/api/v1/models/iris_classifier/drift").json
    assert found["window"]["rows"] == 60 and found["reference"]["kind"] == "training"
    assert {f["feature"] for f in found["features"]} == {"sepal_length", "sepal_width", "petal_length", "petal_width"}
    assert client.simulate_get("/api/v1/models/iris_classifier/drift", params={"version": "x"}).status_code == 422
    assert client.simulate_get("/api/v1/models/iris_classifier/drift", params={"version": "9"}).status_code == 404
    assert client.simulate_get("/api/v1/models/nope/drift").status_code == 404


def test_a_backlog_larger_than_a_sinks_buffer_keeps_its_newest_records(registry, tmp_path):
    recorder = None

    def sink(metrics):
        nonlocal recorder
        recorder = Recorder(metrics, buffer_bytes=20_000)
        recorder.gate.clear()
        return recorder
    # The writer sleeps while 300 predictions queue up, then takes them all at once.
    client, log, metrics = served(registry, tmp_path, [sink], flush_seconds=3600)
    for i in range(300):
        assert predict(client, [4.0 + i / 100, 3.0, 1.4, 0.2]).status_code == 200
    log.wake.set()
    until(lambda: not log.queue, 10, what="the writer took the queue")
    recorder.gate.set()
    assert log.flush(10)
    assert recorder.lines and recorder.lines[-1]["features"][0] == pytest.approx(6.99)
    assert value(metrics, "mlserve_prediction_log_dropped_total", sink="file", reason="sink_behind") > 0
