"""A tiny regressor for the batching tests, importable by the server under
test: it answers each row's second feature plus its offset (so a test can
tell which version computed a row), and fails its whole call when a row's
first feature is POISON (a valid number: the failure is the model's, after
validation)."""
from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np

from app.repository import sha256_of

POISON = 13.0


class EchoRegressor:
    n_features_in_ = 2

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def predict(self, X):
        X = np.asarray(X)
        if (X[:, 0] == POISON).any():
            raise ValueError("poisoned row")
        return X[:, 1] + self.offset


def publish(root: Path, version: int = 1, offset: float = 0.0, name: str = "echo") -> Path:
    """Version `version` of name, answering value + offset; version 1 serves first."""
    folder = root / name / str(version)
    folder.mkdir(parents=True)
    joblib.dump(EchoRegressor(offset), folder / "model.joblib")
    (folder / "metadata.json").write_text(json.dumps({
        "task": "regression", "feature_names": ["control", "value"],
        "artifact": "model.joblib", "sha256": sha256_of(folder / "model.joblib"),
        "runtime_reason": "test model; no ONNX conversion",
    }))
    return folder


def row(value: float, control: float = 0.0) -> dict:
    return {"model_name": "echo", "features": [control, value], "use_cache": False}
