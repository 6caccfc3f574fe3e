"""Monitoring end to end, with real parts: a 2-worker Gunicorn server with drift
and the prediction log on, a real Prometheus scraping it and evaluating the
shipped alert rules, a real Alertmanager routing them with the shipped
routes to a local stand-in for Slack and PagerDuty.

5,000 rows of the iris training data keep every feature ok; 5,000 rows with
petal_length x 1.5 drift that feature (and only it), and the drift alert
reaches Slack with the model, version and feature. The CLI reads the same
figures from the server (mlserve models drift, with a plot) and from the
prediction log file (mlserve drift report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from app.repository import ModelRepository
from app.publishing import publish_estimator
from tests.models import dataset
from tests.monitoring_stack import Alertmanager, Prometheus, Receiver
from tests.server import ROOT, Server
from tests.wait import until

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
MLSERVE = [str(Path(sys.executable).with_name("mlserve"))]


@pytest.fixture(scope="module")
def iris_models(tmp_path_factory):
    """iris_classifier v1, a forest trained and published here, with its training reference."""
    from sklearn.ensemble import RandomForestClassifier

    X, y, _ = dataset("iris")
    root = tmp_path_factory.mktemp("e2e") / "models"
    estimator = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0).fit(X, y)
    publish_estimator(ModelRepository(root), "iris_classifier", estimator, X, FEATURES, {"test": True},
                      extra={"training_data": "sklearn.datasets.load_iris"})
    return root


@pytest.fixture(scope="module")
def stack(iris_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-stack")
    config = work / "models.yaml"
    config.write_text("models:\n  iris_classifier: {}\n  ghost_model: {}\n")  # ghost_model is never ready
    log = work / "predictions.jsonl"
    env = {"MLSERVE_DRIFT_ENABLED": "true", "MLSERVE_DRIFT_WINDOW_SECONDS": "600", "MLSERVE_DRIFT_WINDOW_BUCKETS": "600",
           "MLSERVE_DRIFT_WINDOW_ROWS": "5000", "MLSERVE_PREDICTION_LOG_FILE": str(log),
           "MLSERVE_PREDICTION_LOG_QUEUE_ROWS": "100000"}
    receiver = Receiver()
    server = Server(iris_models, workers=2, env=env, models_config=config).start(ready=False)
    alertmanager = Alertmanager(receiver).start()
    prometheus = Prometheus([f"127.0.0.1:{server.port}"], alertmanager).start()
    try:
        yield server, prometheus, receiver, log
    finally:
        prometheus.stop()
        alertmanager.stop()
        server.stop()
        receiver.stop()


def send(server: Server, rows: np.ndarray, phase: str) -> None:
    session = requests.Session()
    for start in range(0, len(rows), 100):
        answer = session.post(server.url + "/api/v1/batch_predict", timeout=30, headers={"X-Request-ID": f"{phase}-{start}"},
                              json={"model_name": "iris_classifier", "features_batch": rows[start:start + 100].round(4).tolist()})
        assert answer.status_code == 200, answer.text


def drift(server: Server) -> dict:
    return requests.get(server.url + "/api/v1/models/iris_classifier/drift", timeout=10).json()


def psi_by_feature(prometheus: Prometheus) -> dict:
    return {r["metric"]["feature"]: float(r["value"][1])
            for r in prometheus.query('mlserve_feature_psi{model="iris_classifier", version="1"}')}


@pytest.mark.server
def test_in_distribution_rows_stay_ok_and_a_shifted_feature_fires_the_drift_alert(stack, tmp_path):
    server, prometheus, receiver, log = stack
    X, _, _ = dataset("iris")
    rng = np.random.default_rng(11)
    rows = X[rng.integers(0, len(X), 5000)]

    send(server, rows, "ok")
    found = until(lambda: (d := drift(server))["window"].get("rows") == 5000 and d, 30, what="5000 rows counted")
    assert found["reference"]["kind"] == "training"
    assert {f["feature"]: f["status"] for f in found["features"]} == dict.fromkeys(FEATURES, "ok")
    scraped = until(lambda: len(psi_by_feature(prometheus)) == 4 and prometheus.query(
        'mlserve_drift_window_rows{model="iris_classifier"} == 5000') and psi_by_feature(prometheus), 30,
        what="Prometheus scraped the first window")
    assert all(value < 0.1 for value in scraped.values()), scraped
    assert not [a for a in prometheus.alerts() if a["labels"]["alertname"] == "MlserveFeatureDrift"]

    shifted = rows.copy()
    shifted[:, 2] *= 1.5
    send(server, shifted, "shifted")
    # The writer counts drift before it logs: once every row is in the log, the window is all shifted rows.
    until(lambda: log.exists() and sum(1 for _ in open(log)) >= 10_000, 30, what="every row counted and logged")
    found = until(lambda: (d := drift(server))["features"][2]["status"] == "drift" and d, 30,
                  what="petal_length drifts")
    psis = {f["feature"]: f["psi"] for f in found["features"]}
    assert psis["petal_length"] >= 0.25
    assert all(psis[name] < 0.1 for name in FEATURES if name != "petal_length"), psis

    def slack_drift():
        for body in receiver.bodies("/slack"):
            text = json.dumps(body)
            if "MlserveFeatureDrift" in text and "firing" in text.lower():
                return text
    text = until(slack_drift, 90, interval=0.5, what="the drift alert reached Slack")
    assert "model=iris_classifier" in text and "version=1" in text and "feature=petal_length" in text
    for other in ("sepal_length", "sepal_width", "petal_width"):
        assert f"feature={other}" not in text

    # Critical alerts page: the model that is never ready went to PagerDuty, the drift warning did not.
    pages = until(lambda: receiver.bodies("/pagerduty"), 60, interval=0.5, what="a page")
    paged = json.dumps(pages)
    assert "MlserveModelNotReady" in paged and "ghost_model" in paged and "MlserveFeatureDrift" not in paged
    assert pages[0]["routing_key"] == "0123456789abcdef0123456789abcdef"

    # The CLI shows the server's figures, and draws them.
    plot = tmp_path / "drift.png"
    shown = subprocess.run([*MLSERVE, "models", "drift", "iris_classifier", "--url", server.url, "--plot", str(plot)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("petal_length"))
    assert line.split()[2] == "drift" and float(line.split()[1]) == pytest.approx(psis["petal_length"], abs=1e-4)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    # The offline report over the prediction log gives the same statistic.
    until(lambda: log.exists() and sum(1 for _ in open(log)) >= 10_000, 30, what="every row logged")
    records = [json.loads(x) for x in open(log)]
    assert len({r["request_id"] for r in records}) == 100
    last = tmp_path / "shifted.jsonl"
    last.write_text("".join(json.dumps(r) + "\n" for r in records if r["request_id"].startswith("shifted-")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVE_")}
    offline = subprocess.run([*MLSERVE, "drift", "report", str(last), "--model", "iris_classifier", "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**env, "MLSERVE_MODELS_DIR": str(server.env["MLSERVE_MODELS_DIR"])})
    assert offline.returncode == 0, offline.stderr
    report = json.loads(offline.stdout)
    assert report["window"]["rows"] == 5000
    by_feature = {f["feature"]: f["psi"] for f in report["features"]}
    assert by_feature["petal_length"] >= 0.25
    assert all(by_feature[name] < 0.1 for name in FEATURES if name != "petal_length")
