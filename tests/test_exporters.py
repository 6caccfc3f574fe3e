"""PyTorch and TensorFlow/Keras models exported to ONNX, checked against the
framework on a reference batch (within 1e-5), published and served."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from app import cli
from app.errors import ModelRefused
from app.exporters import checked, export_keras, export_saved_model, export_torch, softmax
from app.lifecycle import Lifecycle
from app.loader import load
from app.publishing import Publisher
from app.repository import ModelRepository
from tests.models import dataset, read_metadata
from tests.server import Server

CLASSES = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def iris():
    X, y, _ = dataset("iris")
    mean, std = X.mean(axis=0), X.std(axis=0)
    return ((X - mean) / std).astype(np.float32), y


@pytest.fixture(scope="module")
def mlp(iris):
    """A small MLP trained on iris in torch: 4 -> 16 -> 3 logits."""
    import torch

    torch.manual_seed(0)
    X, y = iris
    module = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    inputs, targets = torch.from_numpy(X), torch.from_numpy(y).long()
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(inputs), targets).backward()
        optimizer.step()
    module.eval()
    accuracy = float((module(inputs).argmax(dim=1) == targets).float().mean())
    assert accuracy > 0.9  # it learned something
    return module


def torch_logits(module, X) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(X, dtype=np.float32))).numpy()


@pytest.fixture
def publisher(tmp_path):
    return Publisher(Lifecycle(ModelRepository(tmp_path / "models"), 1e-5))


def test_an_eager_mlp_exports_with_softmax_and_serves_what_torch_gives(mlp, iris, publisher):
    X, _ = iris
    exported = export_torch(mlp, X[::5], output="logits")
    assert exported.task == "classification" and exported.max_abs_diff <= 1e-5
    mv = publisher.publish_graph(exported.graph, "iris_mlp", None, exported.task, CLASSES, exported.sample,
                                 exported.metadata())
    assert mv.metadata["source_format"] == "torch" and mv.metadata["export"]["exporter"] == "dynamo"
    served = load(mv, 1e-5).runtime.run(X)
    want = softmax(torch_logits(mlp, X).astype(np.float64))
    assert np.abs(served.probabilities - want).max() <= 1e-5
    assert list(served.labels) == [CLASSES[i] for i in want.argmax(axis=1)]


def test_a_torchscript_file_is_published_from_the_cli(mlp, iris, tmp_path, monkeypatch, capsys):
    import torch

    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(mlp), path)
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(tmp_path / "models"))
    assert cli.main(["models", "publish", str(path), "--framework", "torch", "--input-width", "4", "--output", "logits",
                     "--task", "classification", "--classes", ",".join(CLASSES), "--name", "iris_mlp"]) == 0
    out = capsys.readouterr().out
    assert "exported" in out and "published iris_mlp v1 (onnx), serving" in out
    meta = read_metadata(tmp_path / "models" / "iris_mlp" / "1")
    assert meta["export"]["exporter"] == "torchscript" and meta["classes"] == CLASSES
    served = load(ModelRepository(tmp_path / "models").get("iris_mlp", 1), 1e-5).runtime.run(iris[0])
    assert list(served.labels) == [CLASSES[i] for i in torch_logits(mlp, iris[0]).argmax(axis=1)]


def test_a_torch_regressor_gives_values(iris, publisher):
    import torch

    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).eval()
    X, _ = iris
    exported = export_torch(module, X[:32])
    assert exported.task == "regression"
    mv = publisher.publish_graph(exported.graph, "reg", None, "regression", None, exported.sample, exported.metadata())
    served = load(mv, 1e-5).runtime.run(X)
    assert np.allclose(served.labels, torch_logits(module, X).ravel(), atol=1e-5)


def test_cli_mistakes_with_framework_models_are_one_line(mlp, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(tmp_path / "models"))
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(mlp), path)
    weights = tmp_path / "weights.pt"
    torch.save(mlp.state_dict(), weights)
    cases = [
        (["models", "publish", str(path), "--name", "m"], "give --input-width N"),
        (["models", "publish", str(path), "--name", "m", "--input-width", "4", "--task", "classification"],
         "--output logits"),
        (["models", "publish", str(path), "--name", "m", "--input-width", "4"], "a regressor gives one"),
        (["models", "publish", str(weights), "--name", "m", "--input-width", "4"], "a state_dict has the weights"),
        (["models", "publish", str(path), "--name", "m", "--input-width", "5", "--output", "logits"],
         "the module failed on the example batch"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) in (1, 2), argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "models" / "m").exists()


def test_outputs_that_differ_from_the_framework_are_refused(mlp, iris):
    X, _ = iris
    good = export_torch(mlp, X[:16], output="logits")
    logits = torch_logits(mlp, X[:16])
    # The graph is right; what it is checked against is off by 1e-3 (as a
    # graph that lost precision would be).
    want = softmax(logits.astype(np.float64))
    assert checked(good.graph, X[:16], want, "probabilities", 1e-5, "torch", {}).max_abs_diff <= 1e-5
    with pytest.raises(ModelRefused, match=r"differ by 0\.001.* > 1e-05"):
        checked(good.graph, X[:16], want + 1e-3 * (np.arange(3) == 0), "probabilities", 1e-5, "torch", {})


@pytest.fixture(scope="module")
def keras_classifier(iris):
    import keras

    keras.utils.set_random_seed(0)
    X, y = iris
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X, y, epochs=30, batch_size=32, verbose=0)
    return model


def test_a_keras_file_is_converted_checked_and_published(keras_classifier, iris, tmp_path, monkeypatch, capsys):
    X, _ = iris
    path = tmp_path / "model.keras"
    keras_classifier.save(path)
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(tmp_path / "models"))
    assert cli.main(["models", "publish", str(path), "--output", "probabilities", "--task", "classification",
                     "--name", "iris_keras"]) == 0
    assert "published iris_keras v1 (onnx), serving" in capsys.readouterr().out
    mv = ModelRepository(tmp_path / "models").get("iris_keras", 1)
    assert mv.metadata["source_format"] == "tensorflow" and mv.metadata["export"]["max_abs_diff"] <= 1e-5
    served = load(mv, 1e-5).runtime.run(X)
    want = np.asarray(keras_classifier(X))
    assert np.abs(served.probabilities - want).max() <= 1e-5
    assert (served.labels == want.argmax(axis=1)).all()


def test_a_saved_model_directory_is_converted_and_checked(keras_classifier, iris, tmp_path, publisher):
    X, _ = iris
    keras_classifier.export(str(tmp_path / "saved"), verbose=False)
    exported = export_saved_model(tmp_path / "saved", X[:32], output="probabilities")
    assert exported.max_abs_diff <= 1e-5
    mv = publisher.publish_graph(exported.graph, "saved", None, "classification", None, exported.sample,
                                 exported.metadata())
    served = load(mv, 1e-5).runtime.run(X)
    assert (served.labels == np.asarray(keras_classifier(X)).argmax(axis=1)).all()
    assert export_keras(keras_classifier, X[:8], "probabilities").max_abs_diff <= 1e-5


@pytest.mark.server
def test_a_torch_mlp_is_served_by_a_real_server(mlp, iris, tmp_path, publisher):
    X, _ = iris
    exported = export_torch(mlp, X[::3], output="logits")
    publisher.publish_graph(exported.graph, "iris_mlp", ["a", "b", "c", "d"], "classification", CLASSES,
                            exported.sample, exported.metadata())
    want = softmax(torch_logits(mlp, X[:20]).astype(np.float64))
    with Server(tmp_path / "models", workers=1) as server:
        body = requests.post(server.url + "/api/v1/batch_predict", timeout=10,
                             json={"model_name": "iris_mlp", "features_batch": X[:20].tolist()}).json()
        info = requests.get(server.url + "/api/v1/models/iris_mlp", timeout=10).json()
    assert body["predictions"] == [CLASSES[i] for i in want.argmax(axis=1)]
    assert np.abs(np.asarray(body["probabilities"]) - want).max() <= 1e-5
    assert info["runtime"] == "onnx" and info["source_format"] == "torch" and info["features"] == ["a", "b", "c", "d"]
