"""Small models for tests: fitted scikit-learn estimators on bundled datasets,
published into a test repository, and bare ONNX graphs built by hand."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from app.repository import ModelRepository, ModelVersion
from app.publishing import publish_estimator

TOLERANCE = 1e-5


@lru_cache(maxsize=None)
def dataset(name: str):
    """(X float64, y) of a bundled scikit-learn dataset: iris, breast_cancer, diabetes, wine."""
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target), list(data.feature_names)


@dataclass
class Fitted:
    estimator: object
    X_train: np.ndarray
    X_test: np.ndarray
    feature_names: list[str]
    task: str


def families() -> dict:
    """name -> (dataset, task, factory): every family the server promises, kept small."""
    from sklearn.cluster import DBSCAN, KMeans
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import Lasso, LinearRegression, LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "random_forest": ("iris", "classification",
                          lambda: RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0)),
        "svc": ("breast_cancer", "classification",
                lambda: make_pipeline(StandardScaler(), SVC(probability=True, random_state=0))),
        "logistic_regression": ("wine", "classification",
                                lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
        "gradient_boosting": ("iris", "classification",
                              lambda: GradientBoostingClassifier(n_estimators=20, max_depth=2, random_state=0)),
        "linear": ("diabetes", "regression", LinearRegression),
        "ridge": ("diabetes", "regression", lambda: Ridge(alpha=1.0)),
        "lasso": ("diabetes", "regression", lambda: Lasso(alpha=0.1)),
        "gradient_boosting_regressor": ("diabetes", "regression", lambda: GradientBoostingRegressor(
            n_estimators=30, max_depth=3, random_state=0)),
        "kmeans": ("wine", "clustering",
                   lambda: make_pipeline(StandardScaler(), KMeans(n_clusters=3, n_init=3, random_state=0))),
        "dbscan": ("iris", "clustering", lambda: DBSCAN(eps=0.5, min_samples=5)),
    }


def fit(family: str, test_size: float = 0.25) -> Fitted:
    """The family's estimator fitted on a train split of its dataset."""
    from sklearn.model_selection import train_test_split

    data, task, factory = families()[family]
    X, y, names = dataset(data)
    stratify = y if task == "classification" else None
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=test_size, random_state=0, stratify=stratify)
    estimator = factory()
    if task == "clustering":
        estimator.fit(X_train)
    else:
        estimator.fit(X_train, y_train)
    return Fitted(estimator, X_train, X_test, [f"x{i}" for i in range(X.shape[1])], task)


def publish(repository: ModelRepository, name: str, fitted: Fitted, **extra) -> ModelVersion:
    return publish_estimator(repository, name, fitted.estimator, fitted.X_train, fitted.feature_names,
                             {"test": True}, TOLERANCE, extra or None)


def quick_classifier(repository: ModelRepository, name: str, C: float = 1.0) -> ModelVersion:
    """A logistic regression on iris published as the next version of name (fast)."""
    from sklearn.linear_model import LogisticRegression

    X, y, _ = dataset("iris")
    estimator = LogisticRegression(C=C, max_iter=1000).fit(X, y)
    return publish_estimator(repository, name, estimator, X, ["sl", "sw", "pl", "pw"], {"test": True}, TOLERANCE)


def native_model(repository: ModelRepository, name: str) -> ModelVersion:
    """A DBSCAN on iris: no ONNX conversion exists, so its joblib file is what serves."""
    from sklearn.cluster import DBSCAN

    X, _, _ = dataset("iris")
    estimator = DBSCAN(eps=0.5, min_samples=5).fit(X)
    return publish_estimator(repository, name, estimator, X, ["sl", "sw", "pl", "pw"], {"test": True}, TOLERANCE)


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte of a file in place (the middle byte unless offset is given)."""
    data = bytearray(Path(path).read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    Path(path).write_bytes(bytes(data))


def read_metadata(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / "metadata.json").read_text())


def write_metadata(version_dir: Path, metadata: dict) -> None:
    (Path(version_dir) / "metadata.json").write_text(json.dumps(metadata, indent=2))


def edit_metadata(version_dir: Path, drop: tuple[str, ...] = (), **changes) -> dict:
    metadata = read_metadata(version_dir)
    for key in drop:
        metadata.pop(key, None)
    metadata.update(changes)
    write_metadata(version_dir, metadata)
    return metadata


# Bare ONNX graphs, built with onnx.helper.

MLP_W = np.array([[0.5, -1.0, 0.2],
                  [-0.3, 0.8, 0.1],
                  [1.2, 0.0, -0.7],
                  [0.0, 0.4, 0.9]], dtype=np.float32)
MLP_B = np.array([0.1, -0.2, 0.05], dtype=np.float32)
LINEAR_W = np.array([[2.0], [-1.5], [0.25], [3.0]], dtype=np.float32)
LINEAR_B = np.array([0.75], dtype=np.float32)


def _graph_model(nodes, inputs, outputs, initializers):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_classifier_onnx():
    """float32 [None, 4] -> MatMul(4x3) + Add -> Softmax -> "scores" [None, 3]."""
    from onnx import TensorProto, helper, numpy_helper

    return _graph_model(
        [helper.make_node("MatMul", ["input", "W"], ["h"]),
         helper.make_node("Add", ["h", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["scores"], axis=1)],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(MLP_W, "W"), numpy_helper.from_array(MLP_B, "B")])


def linear_regressor_onnx():
    """float32 [None, 4] -> MatMul(4x1) + Add -> "value" [None, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    return _graph_model(
        [helper.make_node("MatMul", ["input", "W"], ["h"]),
         helper.make_node("Add", ["h", "B"], ["value"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(LINEAR_W, "W"), numpy_helper.from_array(LINEAR_B, "B")])


def mlp_expected(X: np.ndarray) -> np.ndarray:
    logits = X.astype(np.float64) @ MLP_W.astype(np.float64) + MLP_B
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def linear_expected(X: np.ndarray) -> np.ndarray:
    return (X.astype(np.float64) @ LINEAR_W.astype(np.float64) + LINEAR_B).reshape(-1)


def write_onnx_version(root: Path, name: str, version: int, model, metadata: dict) -> Path:
    """model.onnx and metadata.json (with the file's sha256) in <root>/<name>/<version>/."""
    folder = Path(root) / name / str(version)
    folder.mkdir(parents=True)
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    write_metadata(folder, {"artifact": "model.onnx", "sha256": sha256_hex(onnx_path), **metadata})
    return folder


def write_csv(path: Path, X: np.ndarray, y: np.ndarray, feature_names: list[str], target: str = "target") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(feature_names) + [target])
        for row, label in zip(X, y):
            writer.writerow([repr(float(v)) for v in row] + [label.item() if hasattr(label, "item") else label])
    return path
