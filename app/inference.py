"""The protocol-independent inference core: a model resolved from the
registry, rows validated, answered from the cache or the runtime, mirrored to
a shadow. predict() and batch_predict() give the v1 response bodies (JSON
bytes); other protocols call route() and score() and shape their own.

Every answer is handed to the prediction log (app/predictions.py) when there
is one: predict() and score() call it, so a protocol that goes through
score() is logged too; it passes request_id and endpoint to say which request
it was."""
from __future__ import annotations

import difflib
import functools
import time
from typing import Callable, NamedTuple

import numpy as np
import orjson

from app import features
from app.batching import Batcher
from app.cache import PredictionCache
from app.clock import utc_now
from app.errors import InvalidField, MissingField
from app.loader import LoadedModel
from app.predictions import PredictionLog
from app.registry import ModelState, Registry
from app.runtimes import Outputs
from app.shadow import ShadowScorer

CACHE_LEVELS = {None: b"false", "l1": b'"l1"', "l2": b'"l2"'}
COMMON_FIELDS = ("model_name", "version", "use_cache", "routing_key")
PREDICT_FIELDS = frozenset(("features", *COMMON_FIELDS))
BATCH_FIELDS = frozenset(("features_batch", *COMMON_FIELDS))


class Scores(NamedTuple):
    """Many rows' answers: labels, probabilities (None without them), cache hits per level."""
    labels: list
    probabilities: list | None
    hits: dict[str, int]


class Predictor:
    def __init__(self, registry: Registry, max_batch_rows: int, cache: PredictionCache | None = None,
                 shadow: ShadowScorer | None = None, log: PredictionLog | None = None,
                 allow_unknown_fields: bool = False, batcher: Batcher | None = None):
        self.registry = registry
        self.batcher = batcher or Batcher()
        self.max_batch_rows = max_batch_rows
        self.cache = cache
        self.shadow = shadow
        self.log = log if log is not None and log.active else None
        self.allow_unknown_fields = allow_unknown_fields

    def route(self, name: str, version: int | None, key: str | None) -> tuple[ModelState, LoadedModel]:
        """The model that answers: a pinned version, else the split's pick, else the serving one."""
        state = self.registry.state(name)
        return state, state.resolve(version, key)

    def mirror(self, state: ModelState, model: LoadedModel, pinned: bool, X, labels: list) -> None:
        """Hand rows to the model's shadow version, unless the request pinned a version."""
        if state.shadow is not None and self.shadow is not None and not pinned and state.shadow is not model:
            self.shadow.submit(model, state.shadow, X, labels)

    def runner(self, state: ModelState, model: LoadedModel) -> Callable[[np.ndarray], Outputs]:
        """How model runs rows: in a batch with other requests' rows when it batches (app/batching.py)."""
        policy = state.batching.get(model) if state.batching else None
        if policy is None:
            return model.runtime.run
        return functools.partial(self.batcher.run, model, policy)

    def caches(self, model: LoadedModel, use_cache: bool) -> bool:
        return use_cache and self.cache is not None and model.cacheable

    def score(self, state: ModelState, model: LoadedModel, X: np.ndarray, use_cache: bool,
              pinned: bool, *, request_id: str | None = None, endpoint: str = "score",
              started: float | None = None, sent: list | None = None) -> Scores:
        """Rows X (validated, float32) through the cache and the runtime; mirrored to the shadow;
        recorded in the prediction log as request request_id to endpoint, with the rows as sent."""
        began = started if started is not None or self.log is None else time.perf_counter()
        levels = None
        run = self.runner(state, model)
        if self.caches(model, use_cache):
            scores, levels = self.through_cache(model, X, run)
        else:
            out = run(X)
            probabilities = out.probabilities.tolist() if out.probabilities is not None else None
            scores = Scores(out.labels.tolist(), probabilities, {"l1": 0, "l2": 0})
        if state.shadow is not None:
            self.mirror(state, model, pinned, X, scores.labels)
        if self.log is not None:
            self.log.scored(request_id, endpoint, state, model, pinned, X, sent, scores, levels,
                            (time.perf_counter() - began) * 1000.0)
        return scores

    def through_cache(self, model: LoadedModel, X: np.ndarray, run=None) -> tuple[Scores, list]:
        """Rows found in L1/L2 are reused; the rest run in one call (run, else the model's runtime)
        and are written back together."""
        keys = self.cache.keys(model, X)
        found = self.cache.get_many(model, keys)
        missing = [i for i, (_, value) in enumerate(found) if value is None]
        rows: list = [None] * len(X)
        if missing:
            out = (run or model.runtime.run)(X[missing])
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
        levels = [level for level, _ in found]
        if model.class_keys is None or rows[0]["probabilities"] is None:  # a classifier without probabilities
            return Scores(labels, None, hits), levels
        return Scores(labels, [list(row["probabilities"].values()) for row in rows], hits), levels

    # --- the v1 API --------------------------------------------------------

    def predict(self, body: dict, started: float, routing_key: str | None = None,
                request_id: str | None = None) -> tuple[LoadedModel, bytes]:
        if not (body.keys() <= PREDICT_FIELDS or self.allow_unknown_fields):
            raise unknown_field(body, PREDICT_FIELDS, "predict")
        state, model = self.route(*v1_route(body, routing_key))
        if "features" not in body:
            raise MissingField("features is required")
        row = features.single(model, body["features"])
        level = None
        if self.caches(model, v1_use_cache(body)):
            # The key holds the float32 bytes the model would see; a hit
            # never builds a numpy array.
            key = self.cache.key(model, row)
            level, scored = self.cache.get(model, key)
            if scored is None:
                scored = score_row(model, row, self.runner(state, model) if state.batching else None)
                self.cache.put(model, key, scored)
        else:
            scored = score_row(model, row, self.runner(state, model) if state.batching else None)
        if state.shadow is not None:
            self.mirror(state, model, "version" in body, row, [orjson.loads(scored)["prediction"]])
        # PERF: one bytes format: the scored object (less its closing brace),
        # the model's fixed fields, then what changes per request.
        latency = (time.perf_counter() - started) * 1000.0
        data = b'%s%s%s","from_cache":%s,"latency_ms":%.4f}' % (
            scored[:-1], response_head(model), utc_now().encode(), CACHE_LEVELS[level], latency)
        if self.log is not None:
            self.log.predicted(request_id, "predict", state, model, "version" in body, row, scored, level, latency, data)
        return model, data

    def batch_predict(self, body: dict, started: float, routing_key: str | None = None,
                      request_id: str | None = None) -> tuple[LoadedModel, bytes]:
        if not (body.keys() <= BATCH_FIELDS or self.allow_unknown_fields):
            raise unknown_field(body, BATCH_FIELDS, "batch_predict")
        state, model = self.route(*v1_route(body, routing_key))
        if "features_batch" not in body:
            raise MissingField("features_batch is required")
        sent = body["features_batch"]
        X = features.batch(model, sent, self.max_batch_rows)
        scores = self.score(state, model, X, v1_use_cache(body), "version" in body, request_id=request_id,
                            endpoint="batch_predict", started=started, sent=sent)
        return model, orjson.dumps({
            "predictions": scores.labels,
            "probabilities": scores.probabilities,
            "classes": model.classes,
            "model_name": model.name,
            "model_version": model.version,
            "count": len(X),
            "cache_hits": scores.hits,
            "timestamp": utc_now(),
            "total_latency_ms": (time.perf_counter() - started) * 1000.0,
        })


def v1_route(body: dict, routing_key: str | None) -> tuple[str, int | None, str | None]:
    """(model name, pinned version, routing key) of a v1 request body."""
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
    return name, version, key


def unknown_field(body: dict, known: frozenset, endpoint: str) -> InvalidField:
    """The refusal of a field the endpoint does not take, with the likely one meant."""
    name = sorted(body.keys() - known)[0]
    if name == "features_batch":
        hint = "; several rows go to /api/v1/batch_predict"
    elif name == "features" and "features_batch" in known:
        hint = "; one row goes to /api/v1/predict, or put it in features_batch"
    else:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return InvalidField(f"unknown field {name[:80]!r}{hint} ({endpoint} takes {', '.join(sorted(known))})",
                        field=name[:80])


def v1_use_cache(body: dict) -> bool:
    use_cache = body.get("use_cache", True)
    if type(use_cache) is not bool:
        raise InvalidField("use_cache must be true or false")
    return use_cache


def score_row(model: LoadedModel, row: list, run: Callable[[np.ndarray], Outputs] | None = None) -> bytes:
    """Run one row (with run, else the model's runtime); the cacheable part of its prediction, as a JSON object."""
    X = np.array((row,), dtype=np.float32)
    out = model.runtime.run(X) if run is None else run(X)
    probabilities = out.probabilities.tolist()[0] if out.probabilities is not None else None
    return fragment(model, out.labels.tolist()[0], probabilities)


def fragment(model: LoadedModel, label, probabilities: list | None) -> bytes:
    if probabilities is None:
        return orjson.dumps({"prediction": label, "probability": None, "probabilities": None})
    return orjson.dumps({"prediction": label, "probability": max(probabilities),
                         "probabilities": dict(zip(model.class_keys, probabilities))})


@functools.lru_cache(maxsize=1024)
def response_head(model: LoadedModel) -> bytes:
    """The fixed fields of a model's predict responses (names are [a-z0-9_-])."""
    return f',"model_name":"{model.name}","model_version":{model.version},"timestamp":"'.encode()
