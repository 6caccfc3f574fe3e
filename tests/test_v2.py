"""The Open Inference Protocol (V2) in process: create_app() around a registry
of the real demo models, driven through falcon.testing. Answers are checked
against v1's for the same rows (one inference core), and routing, the cache,
the shadow, metrics and the model repository extension against what they do
for v1."""
from __future__ import annotations

import functools
import gzip
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from falcon import testing
from prometheus_client.parser import text_string_to_metric_families
from sklearn import datasets

from app import settings as settings_module
from app.cache import LRU, Generations, PredictionCache
from app.control import ControlChannel
from app.http.app import create_app
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.plan import read_plan
from app.registry import Registry
from app.reload import ReloadTrigger
from app.repository import ModelRepository

DEMO = {"iris_classifier": datasets.load_iris, "binary_classifier": datasets.load_breast_cancer,
        "diabetes_regressor": datasets.load_diabetes, "wine_clusters": datasets.load_wine}
IRIS_NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]
TOKEN = "v2-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Mirrors:
    """A ShadowScorer stand-in that records what it is handed."""

    def __init__(self):
        self.calls = []

    def submit(self, primary, shadow, X, labels):
        self.calls.append((primary.version, shadow.version, len(X)))


class App:
    """An app over a repository, with the master's reload signals recorded."""

    def __init__(self, models: Path, tmp_path: Path, cache: bool = False, **env: str):
        self.signals = []
        settings = settings_module.load(environ={"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN, **env},
                                        path=str(tmp_path / "absent.yaml"))
        repository = ModelRepository(models)
        plan = functools.partial(read_plan, None)
        self.registry = Registry(repository, plan, 1e-5)
        self.registry.refresh()
        self.metrics, self.mirrors = Metrics(), Mirrors()
        store = PredictionCache(LRU(1000, 1 << 20, 60), None, Generations(16), self.metrics) if cache else None
        reloads = ReloadTrigger(ControlChannel(""), "test-host", tmp_path / "claims", lambda: self.signals.append("HUP"))
        self.client = testing.TestClient(create_app(
            settings, self.registry, self.metrics, cache=store, lifecycle=Lifecycle(repository, 1e-5, plan),
            reloads=reloads, shadow=self.mirrors))

    def infer(self, name: str, body: dict, version: int | None = None, **kwargs):
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
        return self.client.simulate_post(path, body=orjson.dumps(body), **kwargs)

    def reload(self) -> None:
        """What the master does on the SIGHUP a change asks for."""
        self.registry.refresh()


@pytest.fixture(scope="module")
def app(demo_models, tmp_path_factory) -> App:
    return App(demo_models, tmp_path_factory.mktemp("v2"))


def matrix_request(rows, name: str = "features", datatype: str = "FP64", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype, "data": rows}],
            **extra}


def outputs(response) -> dict:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json["outputs"]}


# --- health and metadata ------------------------------------------------------

def test_server_metadata_live_and_ready(app):
    meta = app.client.simulate_get("/v2").json
    assert meta["name"] == "mlserve" and meta["version"] == "0.1.0"
    assert meta["extensions"] == ["binary_tensor_data", "model_repository"]
    assert app.client.simulate_get("/v2/health/live").json == {"live": True}
    assert app.client.simulate_get("/v2/health/ready").json == {"ready": True}


def test_not_ready_while_a_configured_model_is_not_serving(demo_models, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  iris_classifier: {}\n  ghost_model: {}\n")
    settings = settings_module.load(environ={}, path=str(tmp_path / "absent.yaml"))
    registry = Registry(ModelRepository(demo_models), functools.partial(read_plan, config), 1e-5)
    registry.refresh()
    client = testing.TestClient(create_app(settings, registry, Metrics()))
    r = client.simulate_get("/v2/health/ready")
    assert (r.status_code, r.json) == (503, {"ready": False})
    assert client.simulate_get("/v2/models/iris_classifier/ready").json == {"name": "iris_classifier", "ready": True}
    r = client.simulate_get("/v2/models/ghost_model/ready")
    assert (r.status_code, r.json) == (503, {"name": "ghost_model", "ready": False})


@pytest.mark.parametrize("path", ["/v2/models/iris_classifier", "/v2/models/iris_classifier/versions/1"])
def test_model_metadata(app, path):
    meta = app.client.simulate_get(path).json
    assert meta["name"] == "iris_classifier" and meta["versions"] == ["1"] and meta["platform"] == "onnx_onnxv1"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4],
                               "parameters": {"feature_names": IRIS_NAMES}}]
    assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]},
                               {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3],
                                "parameters": {"classes": [0, 1, 2]}}]
    assert app.client.simulate_get(path + "/ready").json == {"name": "iris_classifier", "ready": True}


def test_regressor_metadata_has_no_probabilities(app):
    meta = app.client.simulate_get("/v2/models/diabetes_regressor").json
    assert meta["outputs"] == [{"name": "label", "datatype": "FP64", "shape": [-1]}]
    assert meta["inputs"][0]["shape"] == [-1, 10]


@pytest.mark.parametrize("path, message", [
    ("/v2/models/nope", "no model named 'nope'"),
    ("/v2/models/nope/ready", "no model named 'nope'"),
    ("/v2/models/iris_classifier/versions/7", "iris_classifier has no loaded version 7"),
    ("/v2/models/iris_classifier/versions/7/ready", "iris_classifier has no loaded version 7"),
    ("/v2/models/iris_classifier/versions/latest", "iris_classifier has no version 'latest'"),
    ("/v2/models/iris_classifier/versions/01", "iris_classifier has no version '01'"),
    ("/v2/no/such/path", "no endpoint at /v2/no/such/path"),
])
def test_unknown_models_versions_and_paths_are_404_in_the_v2_error_shape(app, path, message):
    r = app.client.simulate_get(path)
    assert r.status_code == 404
    assert list(r.json) == ["error"] and r.json["error"].startswith(message)


def test_v1_errors_keep_their_shape(app):
    r = app.client.simulate_get("/api/v1/models/nope")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
    assert app.client.simulate_get("/v2x").json["error"]["code"] == "not_found"


# --- inference ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DEMO))
def test_infer_answers_what_v1_batch_predict_answers(app, name):
    rows = DEMO[name]().data[::37].tolist()
    v1 = app.client.simulate_post("/api/v1/batch_predict", json={"model_name": name, "features_batch": rows}).json
    got = outputs(app.infer(name, matrix_request(rows)))
    assert got["label"]["shape"] == [len(rows)] and got["label"]["data"] == v1["predictions"]
    if v1["probabilities"] is None:
        assert set(got) == {"label"}
    else:
        assert got["probabilities"]["shape"] == [len(rows), len(v1["classes"])]
        assert np.array(got["probabilities"]["data"]).reshape(len(rows), -1).tolist() == v1["probabilities"]


def test_the_response_names_the_model_version_and_echoes_id_and_parameters(app):
    r = app.infer("iris_classifier", matrix_request([SETOSA], id="req-7", parameters={"content_type": "np", "n": 3}))
    body = r.json
    assert r.headers["content-type"] == "application/json"
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris_classifier", "1", "req-7")
    assert body["parameters"] == {"content_type": "np", "n": 3}
    assert "id" not in app.infer("iris_classifier", matrix_request([SETOSA])).json


def test_mlserver_request_shape_works_unchanged(app):
    body = {"inputs": [{"name": "predict", "shape": [1, 4], "datatype": "FP64", "data": [7.7, 3.0, 6.1, 2.3]}]}
    assert outputs(app.infer("iris_classifier", body))["label"]["data"] == [2]


def test_one_tensor_per_feature_by_name(app):
    rows = [SETOSA, VIRGINICA]
    inputs = [{"name": n, "shape": [2, 1], "datatype": "FP32", "data": [r[i] for r in rows]}
              for i, n in enumerate(IRIS_NAMES)]
    assert outputs(app.infer("iris_classifier", {"inputs": inputs[::-1]}))["label"]["data"] == [0, 2]


def test_outputs_selection(app):
    got = outputs(app.infer("iris_classifier", matrix_request([SETOSA], outputs=[{"name": "probabilities"}])))
    assert list(got) == ["probabilities"] and got["probabilities"]["data"][0] > 0.9
    r = app.infer("iris_classifier", matrix_request([SETOSA], outputs=[{"name": "classes"}]))
    assert r.status_code == 400 and "no output 'classes'; its outputs are label, probabilities" in r.json["error"]


def binary_body(X: np.ndarray, datatype: str = "FP32", **parameters) -> tuple[bytes, dict]:
    head = orjson.dumps({"inputs": [{"name": "features", "shape": list(X.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": X.nbytes}}], "parameters": parameters})
    return head + X.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def test_binary_request_gets_a_json_reply_unless_binary_is_asked_for(app):
    X = np.array([SETOSA, VIRGINICA], dtype="<f4")
    body, headers = binary_body(X)
    r = app.client.simulate_post("/v2/models/iris_classifier/infer", body=body, headers=headers)
    assert r.headers["content-type"] == "application/json" and "inference-header-content-length" not in r.headers
    assert outputs(r)["label"]["data"] == [0, 2]
    body, headers = binary_body(X.astype("<f8"), "FP64", binary_data_output=True)
    r = app.client.simulate_post("/v2/models/iris_classifier/infer", body=body, headers=headers)
    length = int(r.headers["inference-header-content-length"])
    assert r.headers["content-type"] == "application/octet-stream"
    head = orjson.loads(r.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [16, 48] and len(r.content) == length + 64
    assert np.frombuffer(r.content[length:length + 16], "<i8").tolist() == [0, 2]
    assert np.frombuffer(r.content[length + 16:], "<f8").reshape(2, 3).argmax(axis=1).tolist() == [0, 2]


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                                ("deflate", lambda b: zlib.compress(b, wbits=-15))])
def test_compressed_requests(app, encoding, compress):
    body, headers = binary_body(np.array([VIRGINICA], dtype="<f4"))
    r = app.client.simulate_post("/v2/models/iris_classifier/infer", body=compress(body),
                                 headers={**headers, "Content-Encoding": encoding})
    assert outputs(r)["label"]["data"] == [2]


def test_compressed_body_is_held_to_the_body_limit(demo_models, tmp_path):
    small = App(demo_models, tmp_path, MLSERVE_SERVER_MAX_BODY_BYTES="4096")
    body = orjson.dumps(matrix_request([SETOSA] * 400))
    assert len(gzip.compress(body)) < 4096 < len(body)
    r = small.client.simulate_post("/v2/models/iris_classifier/infer", body=gzip.compress(body),
                                   headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decoded request body is over the limit of 4096 bytes" in r.json["error"]
    r = small.client.simulate_post("/v2/models/iris_classifier/infer", body=body)
    assert r.status_code == 413 and list(r.json) == ["error"]
    r = small.client.simulate_post("/v2/models/iris_classifier/infer", body=b"xx", headers={"Content-Encoding": "br"})
    assert r.status_code == 415


def test_rows_beyond_max_batch_rows_are_413(demo_models, tmp_path):
    small = App(demo_models, tmp_path, MLSERVE_SERVER_MAX_BATCH_ROWS="3")
    assert small.infer("iris_classifier", matrix_request([SETOSA] * 3)).status_code == 200
    r = small.infer("iris_classifier", matrix_request([SETOSA] * 4))
    assert (r.status_code, r.json) == (413, {"error": "the request has 4 rows; at most 3 are accepted"})


# --- one core: routing, cache, shadow, metrics ------------------------------------

@pytest.fixture
def split_app(fresh_models, tmp_path) -> App:
    """iris_classifier v1 and v2 (a copy) split 50/50, v2 also shadowing; a cache."""
    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    ModelRepository(fresh_models).record("iris_classifier", "split", None, "test", "",
                                         {"version": 1, "split": {"1": 50, "2": 50}, "shadow": 2})
    return App(fresh_models, tmp_path, cache=True)


def test_routing_key_picks_the_same_side_as_v1_and_a_version_path_bypasses_the_split(split_app):
    sides = set()
    for i in range(30):
        key = {"X-Routing-Key": f"user-{i}"}
        v1 = split_app.client.simulate_post("/api/v1/predict", headers=key,
                                            json={"model_name": "iris_classifier", "features": SETOSA}).json
        v2 = split_app.infer("iris_classifier", matrix_request([SETOSA]), headers=key).json
        assert v2["model_version"] == str(v1["model_version"])
        sides.add(v2["model_version"])
    assert sides == {"1", "2"}
    pinned = {split_app.infer("iris_classifier", matrix_request([SETOSA]), version=2,
                              headers={"X-Routing-Key": f"user-{i}"}).json["model_version"] for i in range(20)}
    assert pinned == {"2"}


def test_the_shadow_gets_unpinned_v2_requests_only(split_app):
    keys = {}
    for i in range(20):
        answer = split_app.infer("iris_classifier", matrix_request([SETOSA]), version=1,
                                 headers={"X-Routing-Key": f"k{i}"}).json
        keys.setdefault(split_app.infer("iris_classifier", matrix_request([SETOSA]), headers={
            "X-Routing-Key": f"k{i}"}).json["model_version"], f"k{i}")
        assert answer["model_version"] == "1"
    # Unpinned requests that v1 answered were mirrored to v2; v2 is never mirrored to itself.
    assert split_app.mirrors.calls and set(split_app.mirrors.calls) == {(1, 2, 1)}
    before = len(split_app.mirrors.calls)
    split_app.infer("iris_classifier", matrix_request([SETOSA, VIRGINICA]), headers={"X-Routing-Key": keys["1"]})
    split_app.infer("iris_classifier", matrix_request([SETOSA, VIRGINICA]), headers={"X-Routing-Key": keys["2"]})
    assert split_app.mirrors.calls[before:] == [(1, 2, 2)]


def cache_lookups(app: App) -> dict:
    counts = {}
    for family in text_string_to_metric_families(app.client.simulate_get("/metrics").text):
        for s in family.samples:
            if s.name == "mlserve_cache_lookups_total":
                counts[(s.labels["level"], s.labels["result"])] = s.value
    return counts


def test_v2_shares_v1_cache_entries_and_use_cache_false_skips_it(split_app):
    row = [6.1, 2.8, 4.7, 1.2]
    split_app.client.simulate_post("/api/v1/predict", json={"model_name": "iris_classifier", "features": row,
                                                            "version": 1})
    before = cache_lookups(split_app).get(("l1", "hit"), 0)
    split_app.infer("iris_classifier", matrix_request([row]), version=1)
    assert cache_lookups(split_app)[("l1", "hit")] == before + 1
    r = split_app.infer("iris_classifier", matrix_request([row], parameters={"use_cache": False}), version=1)
    assert r.status_code == 200 and cache_lookups(split_app)[("l1", "hit")] == before + 1
    r = split_app.infer("iris_classifier", matrix_request([row], parameters={"use_cache": "no"}), version=1)
    assert (r.status_code, r.json) == (400, {"error": "parameters.use_cache must be true or false"})


def test_metrics_name_the_v2_endpoints_and_the_model(app):
    app.infer("iris_classifier", matrix_request([SETOSA]))
    app.infer("iris_classifier", {"inputs": []})
    app.client.simulate_get("/v2/models/wine_clusters")
    app.client.simulate_get("/v2/health/ready")
    counts = {}
    for family in text_string_to_metric_families(app.client.simulate_get("/metrics").text):
        for s in family.samples:
            if s.name == "mlserve_requests_total":
                counts[(s.labels["model"], s.labels["version"], s.labels["endpoint"], s.labels["status"])] = s.value
    assert counts[("iris_classifier", "1", "v2_infer", "200")] >= 1
    assert counts[("iris_classifier", "1", "v2_infer", "400")] >= 1
    assert counts[("wine_clusters", "1", "v2_model_metadata", "200")] >= 1
    assert counts[("", "", "v2_health_ready", "200")] >= 1


# --- the model repository extension -------------------------------------------------

@pytest.fixture
def repo_app(fresh_models, tmp_path) -> App:
    return App(fresh_models, tmp_path)


def index(app: App, body: bytes = b"") -> list:
    r = app.client.simulate_post("/v2/repository/index", body=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json


def test_repository_calls_need_the_admin_token(repo_app):
    for path in ("/v2/repository/index", "/v2/repository/models/iris_classifier/load",
                 "/v2/repository/models/iris_classifier/unload"):
        assert repo_app.client.simulate_post(path).status_code == 401
        r = repo_app.client.simulate_post(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and list(r.json) == ["error"]
    assert repo_app.signals == []


def test_unload_then_load_goes_through_the_lifecycle_and_a_swap(repo_app):
    assert {e["name"]: e["state"] for e in index(repo_app)} == dict.fromkeys(DEMO, "READY")
    r = repo_app.client.simulate_post("/v2/repository/models/wine_clusters/unload", headers=ADMIN,
                                      body=json.dumps({"parameters": {"unload_dependents": False}}))
    assert r.status_code == 200 and r.json["action"] == "unload" and repo_app.signals == ["HUP"]
    repo_app.reload()
    assert repo_app.client.simulate_get("/v2/models/wine_clusters/ready").status_code == 404
    assert repo_app.client.simulate_get("/v2/health/ready").json == {"ready": True}  # unloaded is not unready
    assert repo_app.client.simulate_get("/ready").status_code == 200
    entry = next(e for e in index(repo_app) if e["name"] == "wine_clusters")
    assert entry == {"name": "wine_clusters", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert [e["name"] for e in index(repo_app, b'{"ready": true}')] == sorted(set(DEMO) - {"wine_clusters"})
    r = repo_app.client.simulate_post("/v2/repository/models/wine_clusters/load", headers=ADMIN, body=b"{}")
    assert r.status_code == 200 and r.json["version"] == 1 and repo_app.signals == ["HUP", "HUP"]
    repo_app.reload()
    assert repo_app.client.simulate_get("/v2/models/wine_clusters/ready").json["ready"] is True
    history = ModelRepository(repo_app.registry.repository.root).serving_state("wine_clusters")["history"]
    assert [h["action"] for h in history[-2:]] == ["unload", "load"]


def test_load_refuses_a_version_that_does_not_load_and_changes_nothing(repo_app):
    (repo_app.registry.repository.root / "iris_classifier" / "1" / "model.onnx").write_bytes(b"broken")
    r = repo_app.client.simulate_post("/v2/repository/models/iris_classifier/load", headers=ADMIN)
    assert r.status_code == 422 and "iris_classifier v1 refused" in r.json["error"]
    assert repo_app.signals == []


@pytest.mark.parametrize("path, body, status, message", [
    ("/v2/repository/models/nope/load", b"", 404, "no model named 'nope'"),
    ("/v2/repository/models/nope/unload", b"", 404, "no model named 'nope'"),
    ("/v2/repository/models/..etc/load", b"", 404, "no model named '..etc'"),
    ("/v2/repository/models/iris_classifier/load", b'{"parameters": {"config": "{}"}}', 400, "load takes no configuration"),
    ("/v2/repository/models/iris_classifier/load", b"[1]", 400, "must be a JSON object"),
    ("/v2/repository/index", b'{"ready": 1}', 400, "ready must be true or false"),
])
def test_repository_refusals(repo_app, path, body, status, message):
    r = repo_app.client.simulate_post(path, body=body, headers=ADMIN)
    assert r.status_code == status and message in r.json["error"], r.text
    assert repo_app.signals == []
