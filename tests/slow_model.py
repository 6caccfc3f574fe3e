"""A deliberately slow regressor, importable by the server under test, for
shutdown and timeout tests. predict() sleeps for the first feature's value in
seconds (0 or less: no sleep) and returns the second feature. With
SLOW_MODEL_MARKS set to a directory in the server's environment, it creates
started-<seconds> there as it starts to sleep, so a test can wait for a
request to be inside the model."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import joblib
import numpy as np

from app.repository import sha256_of


class SlowRegressor:
    n_features_in_ = 2

    def predict(self, X):
        X = np.asarray(X)
        if X[0, 0] > 0:
            if os.environ.get("SLOW_MODEL_MARKS"):
                Path(os.environ["SLOW_MODEL_MARKS"], f"started-{float(X[0, 0]):g}").touch()
            time.sleep(float(X[0, 0]))
        return X[:, 1].copy()


def started(marks: Path, seconds: float) -> bool:
    """Whether a request sleeping `seconds` is inside the model (see SLOW_MODEL_MARKS)."""
    return (marks / f"started-{seconds:g}").exists()


def publish(root: Path, name: str = "slow_model") -> Path:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    joblib.dump(SlowRegressor(), folder / "model.joblib")
    (folder / "metadata.json").write_text(json.dumps({
        "task": "regression", "feature_names": ["sleep_seconds", "value"],
        "artifact": "model.joblib", "sha256": sha256_of(folder / "model.joblib"),
        "runtime_reason": "test model; no ONNX conversion",
    }))
    return folder


class ExplodingClassifier:
    """Takes iris's four features and fails on every prediction."""
    n_features_in_ = 4

    def predict(self, X):
        raise RuntimeError("this model cannot predict")


def publish_exploding(folder: Path) -> Path:
    """A version directory whose artifact loads but throws on its reference sample."""
    folder.mkdir(parents=True)
    joblib.dump(ExplodingClassifier(), folder / "model.joblib")
    (folder / "metadata.json").write_text(json.dumps({
        "task": "regression", "feature_names": ["sepal_length", "sepal_width", "petal_length", "petal_width"],
        "artifact": "model.joblib", "sha256": sha256_of(folder / "model.joblib"),
        "reference_sample": [[5.1, 3.5, 1.4, 0.2]],
    }))
    return folder


def slow_onnx_graph(width: int = 1024, layers: int = 4) -> bytes:
    """An ONNX regressor taking 4 features whose cost is all in the model: a
    stack of width x width MatMuls (about width^2 x layers multiply-adds a row)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(4, width)] + [(width, width)] * layers + [(width, 1)]
    weights = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), f"w{i}")
               for i, s in enumerate(shapes)]
    nodes, last = [], "input"
    for i in range(len(shapes)):
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"z{i}"]))
        last = f"z{i}"
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [None, 1])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def publish_slow_onnx(root: Path, name: str = "slow_onnx") -> Path:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(slow_onnx_graph())
    (folder / "metadata.json").write_text(json.dumps({
        "task": "regression", "feature_names": ["a", "b", "c", "d"], "artifact": "model.onnx",
        "sha256": sha256_of(folder / "model.onnx"), "reference_sample": [[0.1, 0.2, 0.3, 0.4]],
    }))
    return folder
