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
