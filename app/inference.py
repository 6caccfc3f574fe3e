"""The protocol-independent inference core: a parsed request body in, the
response body (JSON bytes) out. The REST resources are thin wrappers."""
from __future__ import annotations

import time

import numpy as np
import orjson

from app import features
from app.cache import PredictionCache
from app.errors import InvalidField, MissingField
from app.loader import LoadedModel
from app.registry import Registry
from app.shadow import ShadowScorer


CACHE_LEVELS = {None: b"false", "l1": b'"l1"', "l2": b'"l2"'}


class Predictor:
    def __init__(self, registry: Registry, max_batch_rows: int, cache: PredictionCache | None = None,
                 shadow: ShadowScorer | None = None):
        self.registry = registry
        self.max_batch_rows = max_batch_rows
        self.cache = cache
        self.shadow = shadow

    def model_for(self, body: dict, routing_key: str | None = None) -> LoadedModel:
        name = body.get("model_name")
        if name is None:
            raise MissingField("model_name is required")
        if type(name) is not str:
            raise InvalidField("model_name must be a string")
        version = body.get("version")
        if version is not None and (type(version) is not int or version < 1):
            raise InvalidField("version must be a positive integer")
        key = body.get("routing_key", routing_key)
        if key is not None and type(key) is not str:
            raise InvalidField("routing_key must be a string")
        return self.registry.resolve(name, version, key)

    def mirror(self, body: dict, model: LoadedModel, X, labels) -> None:
        """Hand the request to the model's shadow version, if it has one (and
        the request did not pin a version)."""
        shadow = self.registry.shadows.get(model.name)
        if shadow is not None and self.shadow is not None and "version" not in body and shadow is not model:
            self.shadow.submit(model, shadow, X, labels if isinstance(labels, list) else [labels])

    def caching(self, body: dict, model: LoadedModel) -> bool:
        use_cache = body.get("use_cache", True)
        if type(use_cache) is not bool:
            raise InvalidField("use_cache must be true or false")
        return use_cache and self.cache is not None and model.cacheable

    def predict(self, body: dict, started: float, routing_key: str | None = None) -> tuple[LoadedModel, bytes]:
        model = self.model_for(body, routing_key)
        if "features" not in body:
            raise MissingField("features is required")
        row = features.single(model, body["features"])
        level = None
        if self.caching(body, model):
            # The key hashes the float32 bytes the model would see; a hit
            # never builds a numpy array.
            key = self.cache.key(model.cache_prefix, model.row_format.pack(*row))
            level, scored = self.cache.get(model, key)
            if scored is None:
                scored = score(model, row)
                self.cache.put(model, key, scored)
        else:
            scored = score(model, row)
        if model.name in self.registry.shadows:
            self.mirror(body, model, row, orjson.loads(scored)["prediction"])
        # PERF: one bytes format: the scored object (less its closing brace),
        # the model's fixed fields, then what changes per request.
        return model, b'%s%s%s","from_cache":%s,"latency_ms":%.4f}' % (
            scored[:-1], model.response_head, utc_now().encode(), CACHE_LEVELS[level],
            (time.perf_counter() - started) * 1000.0)

    def batch_predict(self, body: dict, started: float, routing_key: str | None = None) -> tuple[LoadedModel, bytes]:
        model = self.model_for(body, routing_key)
        if "features_batch" not in body:
            raise MissingField("features_batch is required")
        X = features.batch(model, body["features_batch"], self.max_batch_rows)
        if self.caching(body, model):
            labels, probabilities, hits = self.batch_through_cache(model, X)
        else:
            out = model.runtime.run(X)
            probabilities = out.probabilities.tolist() if out.probabilities is not None else None
            labels, hits = out.labels.tolist(), {"l1": 0, "l2": 0}
        if model.name in self.registry.shadows:
            self.mirror(body, model, X, labels)
        return model, orjson.dumps({
            "predictions": labels,
            "probabilities": probabilities,
            "classes": model.classes,
            "model_name": model.name,
            "model_version": model.version,
            "count": len(X),
            "cache_hits": hits,
            "timestamp": utc_now(),
            "total_latency_ms": (time.perf_counter() - started) * 1000.0,
        })

    def batch_through_cache(self, model: LoadedModel, X: np.ndarray) -> tuple[list, list | None, dict]:
        """Rows found in L1/L2 are reused; the rest run in one call and are written back together."""
        data, width = X.tobytes(), X.shape[1] * 4
        keys = [self.cache.key(model.cache_prefix, data[i:i + width]) for i in range(0, len(data), width)]
        found = self.cache.get_many(model, keys)
        missing = [i for i, (_, value) in enumerate(found) if value is None]
        rows: list = [None] * len(X)
        if missing:
            out = model.runtime.run(X[missing])
            labels = out.labels.tolist()
            probabilities = out.probabilities.tolist() if out.probabilities is not None else [None] * len(labels)
            fresh = [(keys[i], fragment(model, labels[j], probabilities[j])) for j, i in enumerate(missing)]
            self.cache.put_many(model, fresh)
            for i, (_, value) in zip(missing, fresh):
                rows[i] = orjson.loads(value)
        hits = {"l1": 0, "l2": 0}
        for i, (level, value) in enumerate(found):
            if value is not None:
                rows[i] = orjson.loads(value)
                hits[level] += 1
        labels = [row["prediction"] for row in rows]
        if model.class_keys is None:
            return labels, None, hits
        return labels, [list(row["probabilities"].values()) for row in rows], hits


def score(model: LoadedModel, row: list) -> bytes:
    """Run one row; the cacheable part of its prediction, as a JSON object."""
    out = model.runtime.run(np.array((row,), dtype=np.float32))
    probabilities = out.probabilities.tolist()[0] if out.probabilities is not None else None
    return fragment(model, out.labels.tolist()[0], probabilities)


def fragment(model: LoadedModel, label, probabilities: list | None) -> bytes:
    if probabilities is None:
        return orjson.dumps({"prediction": label, "probability": None, "probabilities": None})
    return orjson.dumps({"prediction": label, "probability": max(probabilities),
                         "probabilities": dict(zip(model.class_keys, probabilities))})


_second = [-1, ""]


def utc_now() -> str:
    """ISO 8601 UTC with microseconds, e.g. 2026-01-02T03:04:05.123456Z."""
    # PERF: the date part changes once a second; format it once a second.
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
