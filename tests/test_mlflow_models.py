"""MLflow model directories (an MLmodel file), saved with the real MLflow
client: the sklearn and onnx flavors are published with their signature's
feature names and their input example as reference rows; pyfunc-only models
and registry pickles are refused with the reason."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from app import cli
from app.errors import InvalidData, ModelRefused
from app.lifecycle import Lifecycle
from app.loader import load
from app.mlflow_models import ModelRef, parse_model_uri, read_model_dir
from app.publishing import Publisher
from app.repository import ModelRepository
from tests.models import dataset

NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def iris():
    X, y, _ = dataset("iris")
    return pd.DataFrame(X, columns=NAMES), y


@pytest.fixture
def publisher(tmp_path):
    return Publisher(Lifecycle(ModelRepository(tmp_path / "models"), 1e-5))


def save_forest(path, iris, **options):
    import mlflow.sklearn
    from sklearn.ensemble import RandomForestClassifier

    X, y = iris
    forest = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(X, y)
    # Requirements given, so MLflow does not infer them (slow) from a subprocess.
    mlflow.sklearn.save_model(forest, path, input_example=X.iloc[[0, 60, 120]], pip_requirements=["scikit-learn"],
                              **options)
    return forest


def test_a_skops_forest_directory_is_published_with_its_signature_and_example(tmp_path, iris, publisher):
    forest = save_forest(tmp_path / "forest", iris, skops_trusted_types=["sklearn.tree._tree.Tree"])
    model = read_model_dir(tmp_path / "forest")
    assert (model.flavor, model.serialization) == ("sklearn", "skops")
    assert model.feature_names == NAMES and model.trusted_types == ["sklearn.tree._tree.Tree"]
    X, _ = iris
    assert model.sample == X.iloc[[0, 60, 120]].values.tolist()
    mv = publisher.publish(tmp_path / "forest", "iris_forest")
    meta = mv.metadata
    assert meta["feature_names"] == NAMES and meta["feature_types"] == ["double"] * 4
    for row in np.float32(X.iloc[[0, 60, 120]].values).tolist():
        assert row in meta["reference_sample"]
    assert meta["artifact"] == "model.skops" and meta["serving_runtime"] == "onnx"
    assert meta["mlflow"]["flavor"] == "sklearn" and meta["mlflow"]["serialization_format"] == "skops"
    served = load(mv, 1e-5)
    assert (served.runtime.run(X.values[:50].astype(np.float32)).labels == forest.predict(X.values[:50])).all()


def test_a_skops_model_listing_a_dangerous_type_is_refused(tmp_path, iris, publisher):
    save_forest(tmp_path / "forest", iris, skops_trusted_types=["sklearn.tree._tree.Tree"])
    mlmodel = tmp_path / "forest" / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("- sklearn.tree._tree.Tree", "- sklearn.tree._tree.Tree\n    - builtins.eval"))
    with pytest.raises(ModelRefused, match="'builtins.eval' is not trusted"):
        publisher.publish(tmp_path / "forest", "iris_forest")


def test_a_pickled_directory_here_is_trusted_like_a_local_joblib(tmp_path, iris, publisher):
    save_forest(tmp_path / "pickled", iris, serialization_format="cloudpickle")
    mv = publisher.publish(tmp_path / "pickled", "iris_pickled")
    assert mv.metadata["source_format"] == "mlflow-cloudpickle" and mv.metadata["artifact"] == "model.joblib"
    with pytest.raises(ModelRefused, match="a pickle is never loaded from the network"):
        publisher.publish(tmp_path / "pickled", "iris_pickled", allow_pickle=False)


def test_an_onnx_directory_is_published_as_its_graph(tmp_path, iris, publisher):
    import mlflow.onnx
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    X, y = iris
    regression = LogisticRegression(max_iter=500).fit(X.values, y)
    graph = to_onnx(regression, X.values[:1].astype(np.float32), options={id(regression): {"zipmap": False}})
    mlflow.onnx.save_model(graph, tmp_path / "onnx", input_example=X.values[:4].astype(np.float32),
                           pip_requirements=["onnx"])
    mv = publisher.publish(tmp_path / "onnx", "iris_onnx", feature_names=NAMES, classes=[0, 1, 2])
    assert mv.metadata["artifact"] == "model.onnx" and mv.metadata["mlflow"]["flavor"] == "onnx"
    served = load(mv, 1e-5)
    assert (served.runtime.run(X.values[:30].astype(np.float32)).labels == regression.predict(X.values[:30])).all()


def test_a_pyfunc_only_model_is_refused_because_it_is_arbitrary_code(tmp_path, capsys, monkeypatch):
    import mlflow.pyfunc

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input * 2

    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=Doubler(), pip_requirements=["mlflow"])
    capsys.readouterr()
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(tmp_path / "models"))
    assert cli.main(["models", "publish", str(tmp_path / "pyfunc"), "--name", "doubler"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "MLflow flavors python_function: only sklearn and onnx models are served" in err
    assert "arbitrary Python code" in err


def test_a_directory_without_mlmodel_and_string_features_are_refused(tmp_path, publisher):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefused, match="not an MLflow model directory"):
        publisher.publish(tmp_path / "empty", "m")
    folder = tmp_path / "strings"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    signature = {"inputs": json.dumps([{"type": "string", "name": "city"}])}
    (folder / "MLmodel").write_text(json.dumps({"flavors": {"onnx": {"data": "model.onnx"}}, "signature": signature}))
    with pytest.raises(ModelRefused, match="input 'city' is of type string; only numeric features are served"):
        publisher.publish(folder, "m")
    (folder / "MLmodel").write_text(json.dumps({"flavors": {"onnx": {"data": "../../etc/passwd"}}}))
    with pytest.raises(ModelRefused, match="is not a file name in the directory"):
        publisher.publish(folder, "m")


@pytest.mark.parametrize("text, ref", [
    ("models:/iris/3", ModelRef("iris", 3)),
    ("models:/iris@champion", ModelRef("iris", None, "champion")),
    ("iris@champion", ModelRef("iris", None, "champion")),
])
def test_registry_uris(text, ref):
    assert parse_model_uri(text) == ref


@pytest.mark.parametrize("text", ["models:/iris", "models:/iris/0", "models:/iris/latest", "runs:/abc/model", "iris"])
def test_registry_uris_that_are_not(text):
    with pytest.raises(InvalidData, match="is not models:/NAME/VERSION or models:/NAME@ALIAS"):
        parse_model_uri(text)
