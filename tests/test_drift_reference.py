"""Where drift references come from: training writes one into metadata.json,
publishing takes one from --reference data.csv, and without either there is none
(the server then learns one from the first rows it serves)."""
from __future__ import annotations

import csv
import json

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from app import cli
from app.drift import bin_index
from app.repository import ModelRepository
from app.training import train_csv

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture
def repo(fresh_models, monkeypatch, tmp_path):
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(fresh_models))
    monkeypatch.setenv("MLSERVE_SERVER_PID_FILE", str(tmp_path / "none.pid"))  # no server to tell
    return fresh_models


def metadata(repo, version: int) -> dict:
    return json.loads((repo / "iris_classifier" / str(version) / "metadata.json").read_text())


def write_reference(path, X, columns=FEATURES, extra=True) -> None:
    """Columns in another order than the model's, and one it does not take."""
    order = list(reversed(columns))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(order + (["species"] if extra else []))
        for row in X:
            values = dict(zip(FEATURES, row))
            writer.writerow([values[c] for c in order] + (["x"] if extra else []))


def test_the_demo_models_carry_their_training_reference(demo_models):
    for name in ("iris_classifier", "binary_classifier", "diabetes_regressor", "wine_clusters"):
        meta = json.loads((demo_models / name / "1" / "metadata.json").read_text())
        reference = meta["drift_reference"]
        assert reference["kind"] == "training" and reference["source"].startswith("sklearn.datasets.")
        assert list(reference["features"]) == meta["feature_names"]
        assert ("edges" in reference["prediction"]) == (meta["task"] == "regression")


def test_training_from_a_csv_stores_the_reference_of_that_csv(tmp_path):
    X, y = load_iris(return_X_y=True)
    path = tmp_path / "iris.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FEATURES + ["species"])
        writer.writerows([*row, label] for row, label in zip(X.tolist(), y.tolist()))
    mv, _ = train_csv(ModelRepository(tmp_path / "models"), path, "species", "iris", "logistic_regression")
    reference = mv.metadata["drift_reference"]
    assert reference["source"] == str(path) and reference["rows"] == 150
    edges = reference["features"]["petal_length"]["edges"]
    counts = np.bincount(bin_index(edges, X[:, 2]), minlength=len(edges) + 1)
    assert reference["features"]["petal_length"]["expected"] == pytest.approx((counts / 150).tolist())


def test_publishing_takes_the_reference_from_a_csv_or_has_none(repo, tmp_path):
    X, y = load_iris(return_X_y=True)
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(X, y)
    joblib.dump(estimator, tmp_path / "forest.joblib")
    assert cli.main(["models", "publish", str(tmp_path / "forest.joblib"), "--name", "iris_classifier"]) == 0
    assert "drift_reference" not in metadata(repo, 2)  # the server will learn it from the first rows served

    sample = X[::3]
    write_reference(tmp_path / "reference.csv", sample)
    assert cli.main(["models", "publish", str(tmp_path / "forest.joblib"), "--name", "iris_classifier",
                     "--reference", str(tmp_path / "reference.csv")]) == 0
    reference = metadata(repo, 3)["drift_reference"]
    assert reference["kind"] == "file" and reference["rows"] == len(sample)
    assert reference["source"] == str(tmp_path / "reference.csv")
    for j, name in enumerate(FEATURES):
        edges = reference["features"][name]["edges"]
        counts = np.bincount(bin_index(edges, sample[:, j]), minlength=len(edges) + 1)
        assert reference["features"][name]["expected"] == pytest.approx((counts / len(sample)).tolist())
    predicted = estimator.predict(sample)
    assert reference["prediction"]["expected"] == pytest.approx([np.mean(predicted == c) for c in (0, 1, 2)])


def test_publishing_an_onnx_graph_with_a_reference(repo, tmp_path):
    onnx_file = repo / "iris_classifier" / "1" / "model.onnx"
    X, _ = load_iris(return_X_y=True)
    write_reference(tmp_path / "reference.csv", X, extra=False)
    assert cli.main(["models", "publish", str(onnx_file), "--name", "iris_classifier",
                     "--reference", str(tmp_path / "reference.csv")]) == 0
    reference = metadata(repo, 2)["drift_reference"]
    assert reference["kind"] == "file" and reference["prediction"]["labels"] == [0, 1, 2]
    # The graph is the training forest's: on the training data it predicts what training recorded.
    trained = metadata(repo, 1)["drift_reference"]
    assert reference["features"] == trained["features"]
    assert reference["prediction"]["expected"] == pytest.approx(trained["prediction"]["expected"], abs=0.02)


def test_a_reference_that_does_not_name_the_features_is_refused_in_one_line(repo, tmp_path, capsys):
    X, y = load_iris(return_X_y=True)
    joblib.dump(RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y), tmp_path / "forest.joblib")
    (tmp_path / "bad.csv").write_text("a,b,c,d\n1,2,3,4\n")
    status = cli.main(["models", "publish", str(tmp_path / "forest.joblib"), "--name", "iris_classifier",
                       "--reference", str(tmp_path / "bad.csv")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "missing sepal_length" in err
    assert not (repo / "iris_classifier" / "2").exists()
