"""Training from a CSV, the `mlserve train` command and the demo models."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from app import cli
from app.loader import load
from app.errors import InvalidData
from app.repository import ModelRepository
from app.columns import feature_name as clean_feature_name
from app.training import build_demo_models, train_csv
from tests.models import TOLERANCE, dataset, write_csv

DEMO = ("iris_classifier", "binary_classifier", "diabetes_regressor", "wine_clusters")
QUANTILES = ("p05", "p25", "p50", "p75", "p95")


@pytest.fixture(scope="module")
def cancer_csv(tmp_path_factory):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    path = tmp_path_factory.mktemp("csv") / "cancer.csv"
    write_csv(path, data.data, data.target, list(data.feature_names))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cancer_csv):
    """Version 1 (random forest) then version 2 (logistic regression) of one model."""
    repo = ModelRepository(tmp_path_factory.mktemp("trained"))
    first = train_csv(repo, cancer_csv, "target", "cancer", "random_forest", TOLERANCE)
    second = train_csv(repo, cancer_csv, "target", "cancer", "logistic_regression", TOLERANCE)
    return repo, first, second


@pytest.fixture
def cli_repo(tmp_path, monkeypatch):
    root = tmp_path / "cli-models"
    monkeypatch.chdir(tmp_path)
    for var in ("MLSERVE_CONFIG", "MLSERVE_MODELS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(root))
    return ModelRepository(root)


def test_clean_feature_name():
    assert clean_feature_name("sepal length (cm)") == "sepal_length"
    assert clean_feature_name("mean radius") == "mean_radius"
    assert clean_feature_name("  Odd--Name!! ") == "odd_name"
    assert clean_feature_name("(only units)") == "feature"


def test_train_csv_creates_version_1_then_2(trained):
    repo, (v1, report1), (v2, report2) = trained
    assert (v1.name, v1.version) == ("cancer", 1)
    assert (v2.name, v2.version) == ("cancer", 2)
    assert repo.versions("cancer") == [1, 2]
    assert repo.latest("cancer") == 2
    assert v1.metadata["algorithm"] == "RandomForestClassifier"
    assert v2.metadata["algorithm"] == "LogisticRegression"
    assert "Accuracy:" in report1 and "Accuracy:" in report2


@pytest.mark.parametrize("version", [1, 2])
def test_train_csv_metadata(trained, version, cancer_csv):
    repo = trained[0]
    mv = repo.get("cancer", version)
    meta = json.loads((mv.path / "metadata.json").read_text())
    X, y, raw_names = dataset("breast_cancer")

    assert meta["name"] == "cancer" and meta["version"] == version
    assert meta["task"] == "classification"
    assert meta["feature_names"] == [n.replace(" ", "_") for n in raw_names]
    assert meta["classes"] == [0, 1]
    created = datetime.fromisoformat(meta["created"])
    assert created.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 600

    metrics = meta["metrics"]
    assert 0.9 <= metrics["accuracy"] <= 1.0
    assert 0.9 <= metrics["cv_mean"] <= 1.0
    assert 0.0 <= metrics["cv_std"] < 0.1

    artifact = mv.path / meta["artifact"]
    assert meta["artifact"] == "model.joblib"
    assert meta["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert meta["serving_runtime"] in ("onnx", "sklearn")
    if meta["serving_runtime"] == "onnx":
        assert meta["onnx_sha256"] == hashlib.sha256((mv.path / meta["onnx_artifact"]).read_bytes()).hexdigest()
    assert meta["target"] == "target"

    stats = meta["reference_stats"]
    assert list(stats) == meta["feature_names"]
    for i, name in enumerate(meta["feature_names"]):
        column = X[:, i]
        s = stats[name]
        assert s["mean"] == pytest.approx(column.mean(), rel=1e-9)
        assert s["std"] == pytest.approx(column.std(), rel=1e-9)
        assert s["min"] == pytest.approx(column.min()) and s["max"] == pytest.approx(column.max())
        quantiles = [s[q] for q in QUANTILES]
        assert quantiles == sorted(quantiles)
        assert s["min"] <= quantiles[0] and quantiles[-1] <= s["max"]
        assert s["p50"] == pytest.approx(np.median(column))

    sample = np.asarray(meta["reference_sample"])
    assert sample.ndim == 2 and sample.shape[1] == X.shape[1] and 1 <= len(sample) <= len(X)
    rows = {tuple(np.float32(r)) for r in X.astype(np.float32)}
    assert all(tuple(np.float32(r)) in rows for r in sample)


@pytest.mark.parametrize("version", [1, 2])
def test_trained_versions_load_and_predict(trained, version):
    repo = trained[0]
    model = load(repo.get("cancer", version), TOLERANCE)
    assert model.runtime.name == repo.get("cancer", version).metadata["serving_runtime"]
    X, y, _ = dataset("breast_cancer")
    out = model.runtime.run(X.astype(np.float32))
    assert (np.asarray(out.labels) == y).mean() > 0.9
    assert out.probabilities.shape == (len(X), 2)


def test_train_csv_with_string_labels(tmp_path):
    X, y, names = dataset("iris")
    path = write_csv(tmp_path / "iris.csv", X, np.array(["setosa", "versicolor", "virginica"])[y], names, "species")
    repo = ModelRepository(tmp_path / "models")
    mv, _ = train_csv(repo, path, "species", "iris", "logistic_regression", TOLERANCE)
    assert mv.metadata["classes"] == ["setosa", "versicolor", "virginica"]
    assert mv.metadata["feature_names"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    model = load(mv, TOLERANCE)
    out = model.runtime.run(X[:3].astype(np.float32))
    assert np.asarray(out.labels).tolist() == ["setosa"] * 3


def test_train_csv_regression(tmp_path):
    X, y, names = dataset("diabetes")
    path = write_csv(tmp_path / "diabetes.csv", X, y.astype(float), names)
    repo = ModelRepository(tmp_path / "models")
    mv, report = train_csv(repo, path, "target", "diabetes", "ridge", TOLERANCE)
    assert mv.metadata["task"] == "regression"
    assert mv.metadata["classes"] is None
    assert {"r2", "mae", "rmse", "cv_mean", "cv_std"} <= set(mv.metadata["metrics"])
    assert "r2" in report
    assert load(mv, TOLERANCE).task == "regression"


def test_train_csv_without_the_target_column_is_a_clear_error(tmp_path, cancer_csv):
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(InvalidData) as info:
        train_csv(repo, cancer_csv, "churned", "cancer", "logistic_regression", TOLERANCE)
    message = str(info.value)
    assert "churned" in message and "target" in message
    assert repo.names() == []


def test_train_csv_with_non_numeric_features_is_a_clear_error(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("a,b,target\n" + "".join(f"{i},x{i},{i % 2}\n" for i in range(20)))
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(InvalidData, match="numeric"):
        train_csv(repo, path, "target", "words", "logistic_regression", TOLERANCE)
    assert repo.names() == []


def test_train_csv_with_too_few_rows_is_a_clear_error(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("a,target\n1,0\n2,1\n")
    with pytest.raises(InvalidData, match="rows"):
        train_csv(ModelRepository(tmp_path / "models"), path, "target", "short", "logistic_regression", TOLERANCE)


# The command line.

def test_cli_train_prints_a_report_and_saves(cli_repo, cancer_csv, capsys):
    assert cli.main(["train", str(cancer_csv), "--target", "target", "--name", "churn_model"]) == 0
    out = capsys.readouterr().out
    assert "Accuracy:" in out
    assert "CV Score:" in out
    assert "saved churn_model v1" in out
    assert cli_repo.versions("churn_model") == [1]
    meta = cli_repo.get("churn_model", 1).metadata
    assert meta["algorithm"] == "RandomForestClassifier"
    assert load(cli_repo.get("churn_model", 1), TOLERANCE).runtime.name == meta["serving_runtime"]


def test_cli_train_twice_saves_version_2(cli_repo, cancer_csv, capsys):
    args = ["train", str(cancer_csv), "--target", "target", "--name", "churn_model",
            "--algorithm", "logistic_regression"]
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    assert "saved churn_model v2" in capsys.readouterr().out
    assert cli_repo.versions("churn_model") == [1, 2]


@pytest.mark.parametrize("name", ["Churn", "../churn", "a/b", "", "x" * 65, "_churn"])
def test_cli_train_with_a_bad_name_exits_2(cli_repo, cancer_csv, capsys, name):
    code = cli.main(["train", str(cancer_csv), "--target", "target", "--name", name])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err
    assert "name" in err
    assert not cli_repo.root.exists() or cli_repo.names() == []


def test_cli_train_with_an_unknown_algorithm_exits_2(cli_repo, cancer_csv, capsys):
    code = cli.main(["train", str(cancer_csv), "--target", "target", "--name", "churn_model",
                     "--algorithm", "deep_magic"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err
    assert "deep_magic" in err
    assert not cli_repo.root.exists() or cli_repo.names() == []


def test_cli_without_a_command_exits_2(capsys):
    assert cli.main([]) == 2


# Demo models.

def test_build_demo_models_creates_four_and_is_idempotent(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    built = build_demo_models(repo)
    assert sorted(mv.name for mv in built) == sorted(DEMO)
    assert all(mv.version == 1 for mv in built)
    assert repo.names() == sorted(DEMO)
    tasks = {mv.name: mv.metadata["task"] for mv in built}
    assert tasks == {"iris_classifier": "classification", "binary_classifier": "classification",
                     "diabetes_regressor": "regression", "wine_clusters": "clustering"}
    widths = {mv.name: len(mv.metadata["feature_names"]) for mv in built}
    assert widths == {"iris_classifier": 4, "binary_classifier": 30, "diabetes_regressor": 10, "wine_clusters": 13}
    assert repo.get("iris_classifier", 1).metadata["feature_names"] == [
        "sepal_length", "sepal_width", "petal_length", "petal_width"]
    for mv in built:
        model = load(repo.get(mv.name, 1), TOLERANCE)
        assert model.runtime.name == mv.metadata["serving_runtime"] == "onnx"
        assert mv.metadata["sha256"] == hashlib.sha256((mv.path / "model.joblib").read_bytes()).hexdigest()

    iris = load(repo.get("iris_classifier", 1), TOLERANCE)
    X, y, _ = dataset("iris")
    assert (np.asarray(iris.runtime.run(X.astype(np.float32)).labels) == y).mean() > 0.95

    snapshot = {p.relative_to(repo.root): p.read_bytes() for p in repo.root.rglob("*") if p.is_file()}
    assert build_demo_models(repo) == []
    assert build_demo_models(repo, only_missing=True) == []
    assert {p.relative_to(repo.root): p.read_bytes() for p in repo.root.rglob("*") if p.is_file()} == snapshot
    assert all(repo.versions(name) == [1] for name in DEMO)


def test_build_demo_models_builds_only_the_missing_ones(tmp_path):
    from tests.models import quick_classifier

    repo = ModelRepository(tmp_path / "models")
    for name in ("iris_classifier", "binary_classifier", "diabetes_regressor"):
        quick_classifier(repo, name)
    built = build_demo_models(repo, only_missing=True)
    assert [mv.name for mv in built] == ["wine_clusters"]
    assert all(repo.versions(name) == [1] for name in DEMO)
    assert repo.get("iris_classifier", 1).metadata["algorithm"] == "LogisticRegression"
