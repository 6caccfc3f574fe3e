"""The protocol-independent inference core: a parsed request body in, a
response body out. The REST resources are thin wrappers around this."""
from __future__ import annotations

import time

from app import features
from app.errors import InvalidField, MissingField
from app.loader import LoadedModel
from app.registry import Registry


class Predictor:
    def __init__(self, registry: Registry, max_batch_rows: int):
        self.registry = registry
        self.max_batch_rows = max_batch_rows

    def model_for(self, body: dict) -> LoadedModel:
        name = body.get("model_name")
        if name is None:
            raise MissingField("model_name is required")
        if type(name) is not str:
            raise InvalidField("model_name must be a string")
        version = body.get("version")
        if version is not None and (type(version) is not int or version < 1):
            raise InvalidField("version must be a positive integer")
        return self.registry.resolve(name, version)

    def predict(self, body: dict, started: float) -> tuple[LoadedModel, dict]:
        model = self.model_for(body)
        if "features" not in body:
            raise MissingField("features is required")
        use_cache = body.get("use_cache", True)
        if type(use_cache) is not bool:
            raise InvalidField("use_cache must be true or false")
        out = model.runtime.run(features.single(model, body["features"]))
        probabilities = None
        top = None
        if out.probabilities is not None:
            row = out.probabilities[0].tolist()
            probabilities = dict(zip(model.class_keys, row))
            top = max(row)
        return model, {
            "prediction": out.labels[0].item(),
            "probability": top,
            "probabilities": probabilities,
            "model_name": model.name,
            "model_version": model.version,
            "timestamp": utc_now(),
            "from_cache": False,
            "latency_ms": (time.perf_counter() - started) * 1000.0,
        }

    def batch_predict(self, body: dict, started: float) -> tuple[LoadedModel, dict]:
        model = self.model_for(body)
        if "features_batch" not in body:
            raise MissingField("features_batch is required")
        X = features.batch(model, body["features_batch"], self.max_batch_rows)
        out = model.runtime.run(X)
        return model, {
            "predictions": out.labels.tolist(),
            "probabilities": out.probabilities,
            "classes": model.classes,
            "model_name": model.name,
            "model_version": model.version,
            "count": len(X),
            "timestamp": utc_now(),
            "total_latency_ms": (time.perf_counter() - started) * 1000.0,
        }


_second = [-1, ""]


def utc_now() -> str:
    """ISO 8601 UTC with microseconds, e.g. 2026-01-02T03:04:05.123456Z."""
    # PERF: the date part changes once a second; format it once a second.
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
