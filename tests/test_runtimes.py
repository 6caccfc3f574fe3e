"""Every promised model family, trained, published, loaded and run: the served
predictions are scikit-learn's own, on ONNX Runtime whenever the conversion
was verified."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from app.errors import InvalidModel, ModelRefused
from app.loader import LoadedModel, load
from app.repository import ModelRepository
from app.runtimes import ClusterAssigner, SklearnRuntime
from tests.models import (TOLERANCE, Fitted, dataset, families, fit, linear_expected,
                          linear_regressor_onnx, mlp_classifier_onnx, mlp_expected, publish, sha256_hex,
                          write_onnx_version)

CLASSIFIERS = ["random_forest", "svc", "logistic_regression", "gradient_boosting"]
REGRESSORS = ["linear", "ridge", "lasso", "gradient_boosting_regressor"]
CLUSTERERS = ["kmeans", "dbscan"]
CONVERTIBLE = CLASSIFIERS + REGRESSORS + ["kmeans"]


@dataclass
class Served:
    fitted: Fitted
    metadata: dict
    model: LoadedModel


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> ModelRepository:
    return ModelRepository(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def served(repository):
    cache: dict[str, Served] = {}

    def get(family: str) -> Served:
        if family not in cache:
            fitted = fit(family)
            mv = publish(repository, family.replace("_", "-"), fitted)
            cache[family] = Served(fitted, mv.metadata, load(repository.get(mv.name, mv.version), TOLERANCE))
        return cache[family]

    return get


def as_served(X: np.ndarray) -> np.ndarray:
    """Rows as the server hands them to a runtime: float32."""
    return np.ascontiguousarray(X, dtype=np.float32)


def test_every_family_is_covered():
    assert sorted(CLASSIFIERS + REGRESSORS + CLUSTERERS) == sorted(families())


@pytest.mark.parametrize("family", CLASSIFIERS + REGRESSORS + CLUSTERERS)
def test_runtime_matches_the_conversion_verdict(served, family):
    s = served(family)
    conversion = s.metadata["conversion"]
    if conversion["verified"]:
        assert s.model.runtime.name == "onnx"
        assert s.metadata["serving_runtime"] == "onnx"
        assert s.metadata["onnx_artifact"] == "model.onnx"
        assert s.model.runtime_reason is None
    else:
        assert s.model.runtime.name == "sklearn"
        assert s.metadata["serving_runtime"] == "sklearn"
        assert isinstance(s.model.runtime_reason, str) and s.model.runtime_reason.strip()
        assert conversion["reason"]
    assert s.model.task == s.fitted.task
    assert s.model.n_features == s.fitted.X_train.shape[1]


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_convertible_families_are_served_by_onnx(served, family):
    s = served(family)
    assert s.metadata["conversion"]["verified"] is True, s.metadata["conversion"]
    assert s.model.runtime.name == "onnx"


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_classifier_predictions_equal_scikit_learn(served, family):
    s = served(family)
    estimator, X = s.fitted.estimator, s.fitted.X_test
    out = s.model.runtime.run(as_served(X))
    assert np.array_equal(np.asarray(out.labels), estimator.predict(X))
    assert s.model.classes == estimator.classes_.tolist()
    assert out.probabilities is not None
    assert out.probabilities.shape == (len(X), len(estimator.classes_))
    want = estimator.predict_proba(X)
    if s.model.runtime.name == "onnx":
        np.testing.assert_allclose(out.probabilities, want, rtol=0, atol=1e-5)
    else:
        np.testing.assert_allclose(out.probabilities, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", REGRESSORS)
def test_regressor_predictions_equal_scikit_learn(served, family):
    s = served(family)
    estimator, X = s.fitted.estimator, s.fitted.X_test
    out = s.model.runtime.run(as_served(X))
    assert out.probabilities is None
    assert out.labels.shape == (len(X),)
    got = out.labels.astype(np.float64)
    want = estimator.predict(X)
    assert np.all(np.abs(got - want) <= 1e-4 * np.maximum(1.0, np.abs(want))), np.abs(got - want).max()


def test_kmeans_predictions_equal_scikit_learn(served):
    s = served("kmeans")
    estimator, X = s.fitted.estimator, s.fitted.X_test
    out = s.model.runtime.run(as_served(X))
    assert out.probabilities is None
    assert np.array_equal(np.asarray(out.labels).astype(np.int64), estimator.predict(X))
    assert set(np.asarray(out.labels).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("family", CLASSIFIERS + REGRESSORS + CLUSTERERS)
def test_one_row_and_a_batch_each_take_one_call(served, family):
    s = served(family)
    X = as_served(s.fitted.X_test[:7])
    one = s.model.runtime.run(X[:1])
    many = s.model.runtime.run(X)
    assert one.labels.shape == (1,)
    assert many.labels.shape == (7,)
    if s.model.task == "classification":
        k = len(s.model.classes)
        assert one.probabilities.shape == (1, k)
        assert many.probabilities.shape == (7, k)
    else:
        assert one.probabilities is None and many.probabilities is None
    assert np.asarray(one.labels)[0] == np.asarray(many.labels)[0]


@pytest.mark.parametrize("family", ["random_forest", "linear", "kmeans"])
def test_float64_input_is_accepted(served, family):
    s = served(family)
    X = s.fitted.X_test[:5]
    assert np.array_equal(s.model.runtime.run(X).labels, s.model.runtime.run(as_served(X)).labels)


def test_classifier_with_string_labels(repository):
    from sklearn.linear_model import LogisticRegression

    X, y, _ = dataset("iris")
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    estimator = LogisticRegression(max_iter=1000).fit(X, names)
    fitted = Fitted(estimator, X, X[::10], ["a", "b", "c", "d"], "classification")
    mv = publish(repository, "string-labels", fitted)
    model = load(repository.get(mv.name, mv.version), TOLERANCE)
    assert model.classes == ["setosa", "versicolor", "virginica"]
    out = model.runtime.run(as_served(fitted.X_test))
    assert np.asarray(out.labels).tolist() == estimator.predict(fitted.X_test).tolist()


# DBSCAN: no converter, served natively with the documented assignment rule.

def test_dbscan_is_served_natively_with_the_reason(served):
    s = served("dbscan")
    assert s.model.runtime.name == "sklearn"
    assert s.metadata["conversion"]["verified"] is False
    assert "DBSCAN" in s.model.runtime_reason
    assert "onnx_artifact" not in s.metadata


def test_dbscan_core_samples_get_their_own_cluster(served):
    s = served("dbscan")
    db = s.fitted.estimator
    cores = db.components_
    out = s.model.runtime.run(as_served(cores))
    assert np.array_equal(out.labels, db.labels_[db.core_sample_indices_])
    assert out.probabilities is None


def isolated_core(db, eps: float) -> int:
    """Index (among core samples) of a core whose cores of any other cluster are over 2*eps away."""
    cores, labels = db.components_, db.labels_[db.core_sample_indices_]
    for i, (core, label) in enumerate(zip(cores, labels)):
        others = cores[labels != label]
        if len(others) == 0 or np.sqrt(((others - core) ** 2).sum(1)).min() > 2 * eps:
            return i
    raise AssertionError("no isolated core sample")


def test_dbscan_point_within_eps_of_a_core_gets_its_cluster(served):
    s = served("dbscan")
    db = s.fitted.estimator
    i = isolated_core(db, db.eps)
    core, label = db.components_[i], db.labels_[db.core_sample_indices_][i]
    offsets = np.eye(len(core)) * 0.9 * db.eps
    points = np.vstack([core + offsets, core - offsets])
    out = s.model.runtime.run(points.astype(np.float64))
    assert out.labels.tolist() == [label] * len(points)


def test_dbscan_far_point_is_noise(served):
    s = served("dbscan")
    X = s.fitted.X_train
    far = np.vstack([X.max(axis=0) + 100, X.min(axis=0) - 100, np.full(X.shape[1], 1e4)])
    out = s.model.runtime.run(as_served(far))
    assert out.labels.tolist() == [-1, -1, -1]


def test_dbscan_rule_on_a_known_layout(tmp_path):
    from sklearn.cluster import DBSCAN

    from app.publishing import publish_estimator

    blob_a = np.array([[0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1], [0.05, 0.05]])
    blob_b = blob_a + [5, 5]
    X = np.vstack([blob_a, blob_b])
    db = DBSCAN(eps=0.3, min_samples=3).fit(X)
    a, b = db.labels_[0], db.labels_[5]
    assert a != b and -1 not in (a, b)
    repo = ModelRepository(tmp_path)
    publish_estimator(repo, "blobs", db, X, ["x", "y"], {})
    model = load(repo.get("blobs", 1), TOLERANCE)
    assert model.runtime.name == "sklearn"
    points = np.array([[0, 0],          # a core sample of blob a
                       [5.05, 5.05],     # a core sample of blob b
                       [0.35, 0.1],      # 0.25 from (0.1, 0.1), within eps
                       [5.1, 5.35],      # 0.25 from (5.1, 5.1), within eps
                       [0.5, 0.5],       # 0.57 from the nearest core: noise
                       [2.5, 2.5],       # between the blobs: noise
                       [-40, 90]])       # far away: noise
    out = model.runtime.run(points.astype(np.float32))
    assert out.labels.tolist() == [a, b, a, b, -1, -1, -1]


def test_dbscan_with_no_core_samples_labels_everything_noise(tmp_path):
    from sklearn.cluster import DBSCAN

    X = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 0.0], [0.0, 20.0]])
    db = DBSCAN(eps=0.5, min_samples=3).fit(X)
    assert len(db.core_sample_indices_) == 0
    out = SklearnRuntime(db, "clustering").run(X.astype(np.float32))
    assert out.labels.tolist() == [-1, -1, -1, -1]


def test_dbscan_with_a_non_euclidean_metric_is_refused(tmp_path):
    from sklearn.cluster import DBSCAN

    from app.publishing import publish_estimator

    X, _, _ = dataset("iris")
    db = DBSCAN(eps=0.5, min_samples=5, metric="manhattan").fit(X)
    with pytest.raises(ValueError):
        ClusterAssigner(db)
    repo = ModelRepository(tmp_path)
    with pytest.raises(ModelRefused, match="euclidean"):  # refused when published, not when first loaded
        publish_estimator(repo, "manhattan", db, X, ["a", "b", "c", "d"], {})
    assert repo.names() == []


# A bare ONNX model, written by hand with its metadata.

def test_bare_onnx_classifier(tmp_path):
    classes = ["setosa", "versicolor", "virginica"]
    folder = write_onnx_version(tmp_path, "mlp", 1, mlp_classifier_onnx(),
                                {"task": "classification", "feature_names": ["sl", "sw", "pl", "pw"],
                                 "classes": classes})
    assert sha256_hex(folder / "model.onnx") == ModelRepository(tmp_path).get("mlp", 1).metadata["sha256"]
    model = load(ModelRepository(tmp_path).get("mlp", 1), TOLERANCE)
    assert model.runtime.name == "onnx"
    assert model.task == "classification"
    assert model.feature_names == ["sl", "sw", "pl", "pw"]
    assert model.classes == classes
    X, _, _ = dataset("iris")
    rows = as_served(np.vstack([X[::15], [[0, 0, 0, 0], [-3, 2, 1, 5]]]))
    want = mlp_expected(rows)
    assert len(set(want.argmax(axis=1))) > 1
    out = model.runtime.run(rows)
    assert out.labels.tolist() == [classes[i] for i in want.argmax(axis=1)]
    np.testing.assert_allclose(out.probabilities, want, atol=1e-5)
    one = model.runtime.run(rows[:1])
    assert one.labels.shape == (1,) and one.probabilities.shape == (1, 3)


def test_bare_onnx_classifier_without_classes_gives_indices(tmp_path):
    write_onnx_version(tmp_path, "mlp", 1, mlp_classifier_onnx(),
                       {"task": "classification", "feature_names": ["a", "b", "c", "d"]})
    model = load(ModelRepository(tmp_path).get("mlp", 1), TOLERANCE)
    rows = as_served(np.array([[1, 2, 3, 4], [-3, 2, 1, 5], [5, -2, 0, 0]]))
    assert np.asarray(model.runtime.run(rows).labels).tolist() == mlp_expected(rows).argmax(axis=1).tolist()


def test_bare_onnx_without_feature_names_names_them_by_position(tmp_path):
    write_onnx_version(tmp_path, "mlp", 1, mlp_classifier_onnx(), {"task": "classification", "classes": [0, 1, 2]})
    model = load(ModelRepository(tmp_path).get("mlp", 1), TOLERANCE)
    assert model.n_features == 4
    assert len(set(model.feature_names)) == 4


def test_bare_onnx_regressor(tmp_path):
    write_onnx_version(tmp_path, "linear", 1, linear_regressor_onnx(),
                       {"task": "regression", "feature_names": ["a", "b", "c", "d"]})
    model = load(ModelRepository(tmp_path).get("linear", 1), TOLERANCE)
    assert model.runtime.name == "onnx"
    assert model.task == "regression"
    rows = as_served(np.array([[1, 2, 3, 4], [0, 0, 0, 0], [-1.5, 0.5, 8, -2], [10, 10, 10, 10]]))
    out = model.runtime.run(rows)
    assert out.probabilities is None
    assert out.labels.shape == (4,)
    np.testing.assert_allclose(out.labels.astype(np.float64), linear_expected(rows), rtol=1e-6, atol=1e-5)
    assert model.runtime.run(rows[:1]).labels.shape == (1,)


def test_bare_onnx_with_the_wrong_feature_count_is_refused(tmp_path):
    write_onnx_version(tmp_path, "mlp", 1, mlp_classifier_onnx(),
                       {"task": "classification", "feature_names": ["a", "b", "c"], "classes": [0, 1, 2]})
    with pytest.raises(InvalidModel, match="features"):
        load(ModelRepository(tmp_path).get("mlp", 1), TOLERANCE)
