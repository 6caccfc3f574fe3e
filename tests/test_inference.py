"""The inference core without HTTP: the v1 bodies it answers, the cache
levels, the split and pinned routes, and what it mirrors to a shadow."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import orjson
import pytest

from app.cache import LRU, Generations, PredictionCache
from app.errors import InvalidField, MissingField, ModelNotFound
from app.inference import Predictor
from app.metrics import Metrics
from app.plan import ServingPlan, read_plan
from app.registry import Registry
from app.repository import ModelRepository

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]


class Mirrors:
    """A ShadowScorer stand-in that records what it is handed."""

    def __init__(self):
        self.calls = []

    def submit(self, primary, shadow, X, labels):
        self.calls.append((primary.version, shadow.version, np.asarray(X).tolist(), labels))


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_models):
    """iris_classifier v1 serving, v2 (a copy) split 50/50 and shadowing."""
    root = tmp_path_factory.mktemp("inference") / "models"
    shutil.copytree(demo_models / "iris_classifier", root / "iris_classifier")
    shutil.copytree(root / "iris_classifier" / "1", root / "iris_classifier" / "2")
    ModelRepository(root).record("iris_classifier", "promote", 1, "test", "", {"version": 1})
    return root


def predictor(models, *, split: dict | None = None, shadow: int | None = None, cache=True):
    repository = ModelRepository(models)
    state = repository.serving_state("iris_classifier")
    state.update(split={str(k): v for k, v in (split or {}).items()}, shadow=shadow)
    (models / "iris_classifier" / "serving.json").write_text(json.dumps(state))
    registry = Registry(repository, ServingPlan, 1e-5)
    registry.refresh()
    store = PredictionCache(LRU(100, 1 << 20, 60), None, Generations(16), Metrics()) if cache else None
    mirrors = Mirrors()
    return Predictor(registry, 100, store, mirrors), mirrors


def predict(p: Predictor, body: dict, key: str | None = None) -> dict:
    model, data = p.predict(body, time.perf_counter(), key)
    answer = orjson.loads(data)
    assert (answer["model_name"], answer["model_version"]) == (model.name, model.version)
    return answer


def test_predict_answers_the_v1_shape_and_fills_the_cache(models):
    p, _ = predictor(models)
    first = predict(p, {"model_name": "iris_classifier", "features": SETOSA})
    assert set(first) == {"prediction", "probability", "probabilities", "model_name", "model_version",
                          "timestamp", "from_cache", "latency_ms"}
    assert first["prediction"] == 0 and first["from_cache"] is False and first["probabilities"]["0"] > 0.9
    assert first["probability"] == max(first["probabilities"].values())
    again = predict(p, {"model_name": "iris_classifier", "features": SETOSA})
    assert again["from_cache"] == "l1" and again["probabilities"] == first["probabilities"]
    assert predict(p, {"model_name": "iris_classifier", "features": SETOSA, "use_cache": False})["from_cache"] is False


def test_batch_reuses_cached_rows_and_runs_the_rest_in_one_call(models):
    p, _ = predictor(models)
    predict(p, {"model_name": "iris_classifier", "features": VIRGINICA})
    _, data = p.batch_predict({"model_name": "iris_classifier", "features_batch": [SETOSA, VIRGINICA, SETOSA]},
                              time.perf_counter())
    answer = orjson.loads(data)
    assert answer["predictions"] == [0, 2, 0] and answer["count"] == 3
    assert answer["cache_hits"] == {"l1": 1, "l2": 0}
    assert answer["classes"] == [0, 1, 2] and len(answer["probabilities"]) == 3


def test_without_a_cache_every_answer_is_computed(models):
    p, _ = predictor(models, cache=False)
    assert [predict(p, {"model_name": "iris_classifier", "features": SETOSA})["from_cache"] for _ in range(2)] == \
        [False, False]


def test_a_split_routes_by_key_and_a_pinned_version_bypasses_it(models):
    p, _ = predictor(models, split={1: 50, 2: 50})
    by_key = {predict(p, {"model_name": "iris_classifier", "features": SETOSA}, f"user-{i}")["model_version"]
              for i in range(40)}
    assert by_key == {1, 2}
    # The header's key and the body's routing_key are the same thing; the body wins.
    for i in range(10):
        header = predict(p, {"model_name": "iris_classifier", "features": SETOSA}, f"user-{i}")
        body = predict(p, {"model_name": "iris_classifier", "features": SETOSA, "routing_key": f"user-{i}"}, "x")
        assert header["model_version"] == body["model_version"]
    assert {predict(p, {"model_name": "iris_classifier", "features": SETOSA, "version": 2}, f"user-{i}")
            ["model_version"] for i in range(20)} == {2}


def test_the_shadow_gets_unpinned_requests_only(models):
    p, mirrors = predictor(models, shadow=2)
    predict(p, {"model_name": "iris_classifier", "features": SETOSA})
    p.batch_predict({"model_name": "iris_classifier", "features_batch": [SETOSA, VIRGINICA]}, time.perf_counter())
    predict(p, {"model_name": "iris_classifier", "features": SETOSA, "version": 1})
    assert [(c[0], c[1], c[3]) for c in mirrors.calls] == [(1, 2, [0]), (1, 2, [0, 2])]
    assert np.allclose(mirrors.calls[1][2], [SETOSA, VIRGINICA])


@pytest.mark.parametrize("body, error, message", [
    ({"features": SETOSA}, MissingField, "model_name is required"),
    ({"model_name": 3, "features": SETOSA}, InvalidField, "model_name must be a string"),
    ({"model_name": "iris_classifier"}, MissingField, "features is required"),
    ({"model_name": "iris_classifier", "features": SETOSA, "version": 0}, InvalidField, "version must be a positive integer"),
    ({"model_name": "iris_classifier", "features": SETOSA, "use_cache": "yes"}, InvalidField, "use_cache must be true or false"),
    ({"model_name": "iris_classifier", "features": SETOSA, "routing_key": 7}, InvalidField, "routing_key must be a string"),
    ({"model_name": "nope", "features": SETOSA}, ModelNotFound, "no model named 'nope'"),
    ({"model_name": "iris_classifier", "features": SETOSA, "use_cahce": False}, InvalidField,
     "unknown field 'use_cahce'; did you mean 'use_cache'? (predict takes features, model_name, routing_key, "
     "use_cache, version)"),
    ({"model_name": "iris_classifier", "features_batch": [SETOSA]}, InvalidField,
     "unknown field 'features_batch'; several rows go to /api/v1/batch_predict (predict takes features, "
     "model_name, routing_key, use_cache, version)"),
])
def test_bad_requests_raise_the_error_that_names_the_problem(models, body, error, message):
    p, _ = predictor(models)
    with pytest.raises(error) as info:
        p.predict(body, time.perf_counter())
    assert info.value.message == message


def test_the_plan_of_the_shipped_config_serves_every_model(models):
    from tests.server import ROOT

    assert read_plan(ROOT / "config" / "models.yaml").names(ModelRepository(models)) == ["iris_classifier"]


def test_unknown_fields_pass_when_the_setting_allows_them(models):
    p, _ = predictor(models)
    p.allow_unknown_fields = True
    answer = predict(p, {"model_name": "iris_classifier", "features": SETOSA, "trace": {"id": 7}})
    assert answer["prediction"] == 0


def test_a_batch_names_its_unknown_field(models):
    p, _ = predictor(models)
    with pytest.raises(InvalidField, match="unknown field 'features'; one row goes to /api/v1/predict"):
        p.batch_predict({"model_name": "iris_classifier", "features": SETOSA}, time.perf_counter())


def test_a_classifier_without_probabilities_answers_batches_through_the_cache():
    from sklearn.datasets import load_iris
    from sklearn.svm import SVC

    from app.loader import LoadedModel
    from app.registry import ModelState
    from app.runtimes import SklearnRuntime

    X, y = load_iris(return_X_y=True)
    model = LoadedModel("svc", 1, "classification", ["a", "b", "c", "d"], [0, 1, 2],
                        SklearnRuntime(SVC().fit(X, y), "classification"), {})
    cache = PredictionCache(LRU(100, 1 << 20, 60), None, Generations(16), Metrics())
    p = Predictor(None, 100, cache)
    rows = np.asarray([SETOSA, VIRGINICA], dtype=np.float32)
    for hits in (0, 2):  # a miss, then hits
        scores = p.score(ModelState("svc", serving=model), model, rows, use_cache=True, pinned=False)
        assert scores.labels == [0, 2] and scores.probabilities is None and scores.hits["l1"] == hits
