"""The v1 API in process: create_app() around a Registry built from the real
demo models, driven through falcon.testing. Predictions are checked against
the scikit-learn estimators the demo models were trained as, on the datasets
they were trained on."""
from __future__ import annotations

import json
import math
from pathlib import Path

import joblib
import numpy as np
import pytest
from falcon import testing
from prometheus_client.parser import text_string_to_metric_families
from sklearn import datasets

from app import settings as settings_module
from app.cache import LRU, Generations, PredictionCache
from app.http.app import create_app
from app.metrics import Metrics
from app.plan import ModelPlan, ServingPlan, read_plan
from app.registry import Registry
from app.repository import ModelRepository
from tests.server import ROOT

DATASETS = {
    "iris_classifier": datasets.load_iris,
    "binary_classifier": datasets.load_breast_cancer,
    "diabetes_regressor": datasets.load_diabetes,
    "wine_clusters": datasets.load_wine,
}
TASKS = {"iris_classifier": "classification", "binary_classifier": "classification",
         "diabetes_regressor": "regression", "wine_clusters": "clustering"}
SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]
IRIS_NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def build_registry(models_dir: Path, plan: dict | None = None) -> Registry:
    """A loaded registry: the shipped config/models.yaml, or plan ({name: pinned version or None})."""
    repository = ModelRepository(models_dir)
    serving = read_plan(ROOT / "config" / "models.yaml") if plan is None else \
        ServingPlan({name: ModelPlan(version) for name, version in plan.items()})
    registry = Registry(repository, lambda: serving, settings_module.Settings().models.verify_tolerance)
    registry.refresh()
    return registry


def make_settings(tmp_path: Path, **env: str) -> settings_module.Settings:
    """Settings from defaults plus MLSERVE_* variables; no config file."""
    return settings_module.load(environ=env, path=str(tmp_path / "absent.yaml"))


@pytest.fixture(scope="module")
def registry(demo_models) -> Registry:
    return build_registry(demo_models)


@pytest.fixture
def client(registry, tmp_path) -> testing.TestClient:
    return testing.TestClient(create_app(make_settings(tmp_path), registry, Metrics()))


@pytest.fixture(scope="module")
def estimators(demo_models) -> dict:
    return {name: joblib.load(demo_models / name / "1" / "model.joblib") for name in DATASETS}


def data_of(name: str) -> np.ndarray:
    return DATASETS[name]().data


def predict(client, name: str, features, **extra):
    return client.simulate_post("/api/v1/predict", json={"model_name": name, "features": features, **extra})


def batch_predict(client, name: str, rows, **extra):
    return client.simulate_post("/api/v1/batch_predict", json={"model_name": name, "features_batch": rows, **extra})


def assert_common_fields(body: dict, name: str) -> None:
    assert body["model_name"] == name
    assert body["model_version"] == 1
    assert body["timestamp"].endswith("Z")
    assert isinstance(body["from_cache"], bool)
    assert body["latency_ms"] >= 0


# --- predict ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["iris_classifier", "binary_classifier"])
def test_predict_classification(client, estimators, name):
    X = data_of(name)
    estimator = estimators[name]
    classes = [int(c) for c in estimator.classes_]
    for row in X[:: max(1, len(X) // 12)]:
        r = predict(client, name, row.tolist())
        assert r.status_code == 200, r.text
        body = r.json
        assert_common_fields(body, name)
        probabilities = body["probabilities"]
        assert list(probabilities) == [str(c) for c in classes]
        assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-5)
        assert body["probability"] == max(probabilities.values())
        assert body["prediction"] in classes
        assert str(body["prediction"]) == max(probabilities, key=probabilities.get)
        expected = estimator.predict_proba(row.reshape(1, -1))[0]
        assert np.allclose([probabilities[str(c)] for c in classes], expected, atol=1e-5)
        assert body["prediction"] == int(estimator.predict(row.reshape(1, -1))[0])


def test_predict_iris_known_flowers(client):
    assert predict(client, "iris_classifier", SETOSA).json["prediction"] == 0
    assert predict(client, "iris_classifier", VIRGINICA).json["prediction"] == 2


def test_predict_regression(client, estimators):
    name = "diabetes_regressor"
    for row in data_of(name)[::40]:
        r = predict(client, name, row.tolist())
        assert r.status_code == 200, r.text
        body = r.json
        assert_common_fields(body, name)
        assert body["probability"] is None
        assert body["probabilities"] is None
        assert isinstance(body["prediction"], float)
        expected = float(estimators[name].predict(row.reshape(1, -1))[0])
        assert math.isclose(body["prediction"], expected, rel_tol=1e-4)


def test_predict_clustering(client, estimators):
    name = "wine_clusters"
    seen = set()
    for row in data_of(name)[::15]:
        r = predict(client, name, row.tolist())
        assert r.status_code == 200, r.text
        body = r.json
        assert_common_fields(body, name)
        assert type(body["prediction"]) is int
        assert body["probability"] is None and body["probabilities"] is None
        assert body["prediction"] == int(estimators[name].predict(row.reshape(1, -1))[0])
        seen.add(body["prediction"])
    assert seen <= {0, 1, 2} and len(seen) > 1


@pytest.mark.parametrize("name", ["iris_classifier", "binary_classifier", "diabetes_regressor"])
def test_dict_features_equal_list_features(client, registry, name):
    names = registry.serving()[name].feature_names
    for row in data_of(name)[:3].tolist():
        as_list = predict(client, name, row).json
        as_dict = predict(client, name, dict(zip(names, row))).json
        shuffled = predict(client, name, dict(reversed(list(zip(names, row))))).json
        for key in ("prediction", "probability", "probabilities"):
            assert as_dict[key] == as_list[key] == shuffled[key]


def test_iris_dict_features_by_name(client):
    r = predict(client, "iris_classifier", dict(zip(IRIS_NAMES, VIRGINICA)))
    assert r.status_code == 200
    assert r.json["prediction"] == 2


def test_pinned_version(client):
    unpinned = predict(client, "iris_classifier", SETOSA).json
    pinned = predict(client, "iris_classifier", SETOSA, version=1)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json["model_version"] == 1
    assert pinned.json["prediction"] == unpinned["prediction"] == 0
    assert pinned.json["probabilities"] == unpinned["probabilities"]
    batch = batch_predict(client, "iris_classifier", [SETOSA, VIRGINICA], version=1)
    assert batch.status_code == 200 and batch.json["model_version"] == 1
    assert predict(client, "iris_classifier", SETOSA, version=2).json["error"]["code"] == "version_not_found"


def test_use_cache_false_neither_reads_nor_fills_the_cache(registry, tmp_path):
    metrics = Metrics()
    cache = PredictionCache(LRU(100, 1 << 20, 60), None, Generations(16), metrics)
    client = testing.TestClient(create_app(make_settings(tmp_path), registry, metrics, cache=cache))
    levels = [predict(client, "iris_classifier", SETOSA, use_cache=flag).json["from_cache"]
              for flag in (False, True, True, False)]
    assert levels == [False, False, "l1", False]
    assert len(cache.l1) == 1
    answers = [predict(client, "iris_classifier", SETOSA, use_cache=flag).json for flag in (True, False)]
    assert answers[0]["probabilities"] == answers[1]["probabilities"]


# --- batch_predict ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_batch_predict(client, estimators, name):
    X = data_of(name)
    r = batch_predict(client, name, X.tolist())
    assert r.status_code == 200, r.text
    body = r.json
    assert body["model_name"] == name and body["model_version"] == 1
    assert body["count"] == len(X) == len(body["predictions"])
    assert body["total_latency_ms"] >= 0 and body["timestamp"].endswith("Z")
    expected = estimators[name].predict(X)
    if TASKS[name] == "classification":
        assert body["classes"] == [int(c) for c in estimators[name].classes_]
        probabilities = np.asarray(body["probabilities"])
        assert probabilities.shape == (len(X), len(body["classes"]))
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert np.allclose(probabilities, estimators[name].predict_proba(X), atol=1e-5)
        assert body["predictions"] == [int(v) for v in expected]
    elif TASKS[name] == "regression":
        assert body["classes"] is None and body["probabilities"] is None
        assert np.allclose(body["predictions"], expected, rtol=1e-4)
    else:
        assert body["classes"] is None and body["probabilities"] is None
        assert all(type(v) is int for v in body["predictions"])
        assert body["predictions"] == [int(v) for v in expected]


def test_batch_matches_single_predictions(client):
    rows = [SETOSA, VIRGINICA, [6.0, 2.9, 4.5, 1.5]]
    batch = batch_predict(client, "iris_classifier", rows).json
    singles = [predict(client, "iris_classifier", row).json for row in rows]
    assert batch["predictions"] == [s["prediction"] for s in singles]
    assert batch["predictions"][:2] == [0, 2]
    for probabilities, single in zip(batch["probabilities"], singles):
        assert probabilities == list(single["probabilities"].values())


def test_batch_accepts_dict_rows_mixed_with_lists(client):
    rows = [dict(zip(IRIS_NAMES, SETOSA)), VIRGINICA]
    r = batch_predict(client, "iris_classifier", rows)
    assert r.status_code == 200, r.text
    assert r.json["predictions"] == [0, 2] and r.json["count"] == 2


def test_batch_at_the_row_limit(registry, tmp_path):
    client = testing.TestClient(create_app(make_settings(tmp_path, MLSERVE_SERVER_MAX_BATCH_ROWS="5"),
                                           registry, Metrics()))
    assert batch_predict(client, "iris_classifier", [SETOSA] * 5).json["count"] == 5
    over = batch_predict(client, "iris_classifier", [SETOSA] * 6)
    assert over.status_code == 413 and over.json["error"]["code"] == "batch_too_large"


# --- health, readiness, models ------------------------------------------------

def test_health(client):
    r = client.simulate_get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "healthy"
    assert r.json["models_serving"] == 4
    assert r.json["uptime_seconds"] >= 0
    assert r.json["timestamp"].endswith("Z")


def test_ready_with_every_model_loaded(client):
    r = client.simulate_get("/ready")
    assert r.status_code == 200
    assert r.json == {"status": "ready", "models": sorted(DATASETS)}


def test_not_ready_names_a_configured_model_missing_from_the_repository(demo_models, tmp_path):
    plan = {name: None for name in DATASETS} | {"ghost_model": None}
    registry = build_registry(demo_models, plan)
    client = testing.TestClient(create_app(make_settings(tmp_path), registry, Metrics()))
    r = client.simulate_get("/ready")
    assert r.status_code == 503
    assert r.json["status"] == "not_ready"
    assert list(r.json["not_ready"]) == ["ghost_model"]
    assert r.json["not_ready"]["ghost_model"]
    # The models that did load still serve.
    assert predict(client, "iris_classifier", SETOSA).json["prediction"] == 0
    missing = predict(client, "ghost_model", SETOSA)
    assert missing.status_code == 503
    assert missing.json["error"]["code"] == "model_not_ready"
    assert "ghost_model" in missing.json["error"]["message"]
    assert client.simulate_get("/health").json["models_serving"] == 4


def test_not_ready_when_a_pinned_version_is_missing(demo_models, tmp_path):
    registry = build_registry(demo_models, {"iris_classifier": 7, "wine_clusters": None})
    client = testing.TestClient(create_app(make_settings(tmp_path), registry, Metrics()))
    r = client.simulate_get("/ready")
    assert r.status_code == 503
    assert list(r.json["not_ready"]) == ["iris_classifier"]
    assert "7" in r.json["not_ready"]["iris_classifier"]
    info = client.simulate_get("/api/v1/models/iris_classifier").json
    assert info["status"] == "not_ready" and info["serving_version"] is None and info["versions"] == [1]
    assert predict(client, "iris_classifier", SETOSA, version=1).json["prediction"] == 0


def test_models_list(client, registry):
    r = client.simulate_get("/api/v1/models")
    assert r.status_code == 200
    models = r.json["models"]
    assert [m["name"] for m in models] == sorted(DATASETS)
    for m in models:
        assert m["task"] == TASKS[m["name"]]
        assert m["versions"] == [1] and m["serving_version"] == 1 and m["status"] == "serving"
        assert m["features"] == registry.serving()[m["name"]].feature_names
        assert m["runtime"] == "onnx"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_model_detail(client, demo_models, name):
    metadata = json.loads((demo_models / name / "1" / "metadata.json").read_text())
    r = client.simulate_get(f"/api/v1/models/{name}")
    assert r.status_code == 200, r.text
    info = r.json
    assert info["name"] == name and info["version"] == 1
    assert info["versions"] == [1]
    assert info["serving_version"] == 1
    assert info["status"] == "serving"
    assert info["task"] == TASKS[name]
    assert info["features"] == metadata["feature_names"]
    assert len(info["features"]) == {"iris_classifier": 4, "binary_classifier": 30,
                                     "diabetes_regressor": 10, "wine_clusters": 13}[name]
    assert info["classes"] == ([0, 1, 2] if name == "iris_classifier" else [0, 1] if name == "binary_classifier"
                               else None)
    assert info["metrics"] == metadata["metrics"]
    assert info["runtime"] == "onnx"
    assert info["algorithm"] == metadata["algorithm"]
    assert info["sha256"] == metadata["sha256"]


def test_model_detail_unknown(client):
    r = client.simulate_get("/api/v1/models/no_such_model")
    assert r.status_code == 404
    assert r.json["error"]["code"] == "model_not_found"
    assert "iris_classifier" in r.json["error"]["available"]


# --- metrics --------------------------------------------------------------------

def request_counts(client) -> dict[tuple, float]:
    r = client.simulate_get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    counts = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == "mlserve_requests_total":
                labels = sample.labels
                counts[(labels["model"], labels["version"], labels["endpoint"], labels["status"])] = sample.value
    return counts


def test_metrics_count_requests_by_model_version_endpoint_status(client):
    assert ("iris_classifier", "1", "predict", "200") not in request_counts(client)
    for _ in range(3):
        predict(client, "iris_classifier", SETOSA)
    batch_predict(client, "wine_clusters", [data_of("wine_clusters")[0].tolist()])
    predict(client, "iris_classifier", SETOSA, version=5)
    predict(client, "no_such_model", SETOSA)
    counts = request_counts(client)
    assert counts[("iris_classifier", "1", "predict", "200")] == 3
    assert counts[("wine_clusters", "1", "batch_predict", "200")] == 1
    assert counts[("", "", "predict", "404")] == 2
    assert counts[("", "", "metrics", "200")] >= 1


def test_metrics_endpoint_off(registry, tmp_path):
    client = testing.TestClient(create_app(make_settings(tmp_path, MLSERVE_MONITORING_PROMETHEUS_ENABLED="false"),
                                           registry, Metrics()))
    r = client.simulate_get("/metrics")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"


# --- CORS -------------------------------------------------------------------------

def test_cors_off_by_default(client):
    r = client.simulate_get("/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_listed_origins(registry, tmp_path):
    settings = make_settings(tmp_path, MLSERVE_SERVER_CORS_ORIGINS="https://app.example, https://admin.example")
    client = testing.TestClient(create_app(settings, registry, Metrics()))
    for origin in ("https://app.example", "https://admin.example"):
        r = client.simulate_post("/api/v1/predict", json={"model_name": "iris_classifier", "features": SETOSA},
                                 headers={"Origin": origin})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
    r = client.simulate_post("/api/v1/predict", json={"model_name": "iris_classifier", "features": SETOSA},
                             headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    preflight = client.simulate_options("/api/v1/predict", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    # Error responses carry the header too, so a browser can read them.
    error = client.simulate_post("/api/v1/predict", json={"model_name": "nope", "features": SETOSA},
                                 headers={"Origin": "https://app.example"})
    assert error.status_code == 404
    assert error.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_any_origin(registry, tmp_path):
    client = testing.TestClient(create_app(make_settings(tmp_path, MLSERVE_SERVER_CORS_ORIGINS="*"),
                                           registry, Metrics()))
    r = client.simulate_get("/api/v1/models", headers={"Origin": "https://anywhere.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"


# --- rate limiting ----------------------------------------------------------------

def test_rate_limit_fourth_request_in_the_burst_is_refused(registry, tmp_path):
    settings = make_settings(tmp_path, MLSERVE_RATE_LIMITING_ENABLED="true",
                             MLSERVE_RATE_LIMITING_REQUESTS_PER_SECOND="1", MLSERVE_RATE_LIMITING_BURST="3")
    client = testing.TestClient(create_app(settings, registry, Metrics()))
    body = {"model_name": "iris_classifier", "features": SETOSA}
    for _ in range(3):
        r = client.simulate_post("/api/v1/predict", json=body, remote_addr="10.1.2.3")
        assert r.status_code == 200, r.text
        assert r.json["prediction"] == 0
    refused = client.simulate_post("/api/v1/predict", json=body, remote_addr="10.1.2.3")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    assert refused.json["error"]["code"] == "rate_limited"
    assert refused.json["error"]["message"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 3
    # Another client has its own window.
    other = client.simulate_post("/api/v1/predict", json=body, remote_addr="10.9.9.9")
    assert other.status_code == 200 and other.json["prediction"] == 0


def test_rate_limit_off_by_default(registry, tmp_path):
    # The limits that refuse the fourth request above, but not enabled.
    settings = make_settings(tmp_path, MLSERVE_RATE_LIMITING_REQUESTS_PER_SECOND="1", MLSERVE_RATE_LIMITING_BURST="3")
    client = testing.TestClient(create_app(settings, registry, Metrics()))
    body = {"model_name": "iris_classifier", "features": SETOSA}
    for _ in range(20):
        r = client.simulate_post("/api/v1/predict", json=body, remote_addr="10.1.2.3")
        assert r.status_code == 200 and r.json["prediction"] == 0


def test_client_input_never_grows_the_metric_label_sets(registry, tmp_path):
    """Model names, versions and paths a client makes up do not become labels."""
    metrics = Metrics()
    client = testing.TestClient(create_app(make_settings(tmp_path), registry, metrics))

    def label_sets() -> int:
        metrics.flush()
        return sum(len(family.samples) for family in text_string_to_metric_families(metrics.render().decode()))
    for i in range(3):  # every endpoint and status this test uses, once
        predict(client, "iris_classifier", SETOSA)
        predict(client, f"ghost_{i}", SETOSA)
        predict(client, "iris_classifier", SETOSA, version=100 + i)
        predict(client, "iris_classifier", [1, 2, i])
        client.simulate_get(f"/no/such/path/{i}")
        client.simulate_get(f"/api/v1/models/ghost_{i}")
    before = label_sets()
    for i in range(300):
        predict(client, f"made_up_{i}", SETOSA)
        predict(client, "iris_classifier", SETOSA, version=1000 + i)
        predict(client, "iris_classifier", [1, 2, i])
        client.simulate_get(f"/no/such/path/{i}")
        client.simulate_get(f"/api/v1/models/made_up_{i}")
    assert label_sets() == before
