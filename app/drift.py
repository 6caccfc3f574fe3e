"""Data drift per model version and feature, as the Population Stability Index.

The reference of a version is its training data, binned per feature at the
training deciles (duplicate edges collapsed, the outer bins open to -inf and
+inf), with the fraction of training rows in each bin; and the model's own
predictions on those rows, by class (classifiers, clusterers) or binned at
their deciles (regressors). It is stored in metadata.json as
"drift_reference" when the version is trained or published (kind "training",
or "file" for `mlserve models publish --reference data.csv`). A version
without one takes the first drift.baseline_rows rows it serves on the host as
its reference (kind "served").

Served rows are counted into the same bins over a sliding window, and
PSI = sum((a - e) * ln(a / e)) over the bins, with a the window's fraction
and e the reference's, each counted as at least drift.epsilon so that an
empty bin keeps the sum finite.

NOTE: one value per host, whichever worker is asked. A gauge set by each
worker would give as many PSIs as workers, each over a part of the traffic.
Instead every worker adds its bin counts into shared memory that the Gunicorn
master allocates for each loaded version before it forks (RawArray: anonymous
shared pages), and PSI is computed from the sum over all workers by the
worker that answers a scrape or GET .../drift. Each worker writes only its
own lane (no cross-process locking on the counting path; a lane is claimed
once per worker, and reused after the worker exits). The window is a ring of
time buckets per lane, each stamped with the time slot it holds: a lane
clears a bucket before reusing it, and the reader sums the buckets whose
stamp is inside the window, newest first up to drift.window_rows. Memory is
lanes x buckets x (features x 10 + 21) x 8 bytes per loaded version.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Iterable, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

DECILES = np.linspace(0.1, 0.9, 9)
FEATURE_BINS = 10        # at most 9 interior edges
MAX_LABELS = 20          # prediction classes counted one by one; the rest share an "other" bin
PREDICTION_BINS = MAX_LABELS + 1
KINDS = ("training", "file", "served")


class Schema(NamedTuple):
    """What binning needs to know of a model version."""
    feature_names: list[str]
    task: str
    classes: list | None


def schema_of(model) -> Schema:
    return Schema(list(model.feature_names), model.task, model.classes)


# --- the reference -------------------------------------------------------------

def decile_edges(values) -> list[float]:
    """Interior bin edges at the deciles of values, as float32 (what the model
    sees), duplicates collapsed."""
    q = np.quantile(np.asarray(values, dtype=np.float64), DECILES)
    # The shortest decimal that is the same float32 (1.4, not 1.399999976158142).
    return readable(np.unique(q.astype(np.float32)))


def bin_index(edges, values) -> np.ndarray:
    """Bin of each value: bin i holds edges[i-1] < v <= edges[i]; bin 0 is
    (-inf, edges[0]], the last (edges[-1], +inf). Compared as float32."""
    return np.searchsorted(np.asarray(edges, dtype=np.float32), np.asarray(values, dtype=np.float32), side="left")


def readable(edges: np.ndarray) -> list[float]:
    """float32 edges as the shortest decimals that are the same float32."""
    return [float(np.format_float_positional(e, unique=True)) for e in np.asarray(edges, dtype=np.float32)]


def fractions(counts) -> list[float]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * len(counts)


def build_reference(X, predictions, schema: Schema, kind: str, source: str | None) -> dict:
    """The drift reference of rows X (n, features) and the model's predictions on
    them, as stored in metadata.json under "drift_reference"."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(schema.feature_names) or not len(X):
        raise ValueError(f"reference data must be rows of {len(schema.feature_names)} features")
    features = {}
    for j, name in enumerate(schema.feature_names):
        edges = decile_edges(X[:, j])
        features[name] = {"edges": edges, "expected": fractions(np.bincount(bin_index(edges, X[:, j]),
                                                                            minlength=len(edges) + 1))}
    return {"kind": kind, "source": source, "rows": len(X), "features": features,
            "prediction": prediction_reference(list(predictions), schema)}


def prediction_reference(predictions: list, schema: Schema) -> dict:
    if schema.task == "regression":
        edges = decile_edges(predictions)
        return {"edges": edges, "expected": fractions(np.bincount(bin_index(edges, predictions),
                                                                  minlength=len(edges) + 1))}
    labels = list(schema.classes) if schema.classes else sorted(set(predictions), key=str)
    labels = labels[:MAX_LABELS]
    index = {label: i for i, label in enumerate(labels)}
    counts = np.bincount([index.get(p, len(labels)) for p in predictions], minlength=len(labels) + 1)
    return {"labels": labels, "expected": fractions(counts)[:len(labels)]}


@dataclass(frozen=True)
class Reference:
    """A reference ready for counting: per feature its edges and expected
    fractions, the same for the predictions."""
    kind: str
    source: str | None
    rows: int
    feature_names: list[str]
    edges: list[np.ndarray]
    expected: list[np.ndarray]
    prediction_edges: np.ndarray | None    # regressors
    prediction_labels: list | None         # classifiers and clusterers (plus an "other" bin)
    prediction_expected: np.ndarray

    @classmethod
    def from_stored(cls, stored: dict, schema: Schema) -> "Reference":
        """From metadata's "drift_reference"; ValueError when it does not fit the model."""
        features = stored.get("features") or {}
        if list(features) != list(schema.feature_names):
            raise ValueError("its features are not the model's")
        edges, expected = [], []
        for name in schema.feature_names:
            e = np.asarray(features[name]["edges"], dtype=np.float32)
            x = np.asarray(features[name]["expected"], dtype=np.float64)
            if len(e) >= FEATURE_BINS or len(x) != len(e) + 1:
                raise ValueError(f"{name}: {len(e)} edges and {len(x)} fractions")
            edges.append(e)
            expected.append(x)
        prediction = stored.get("prediction") or {}
        if "edges" in prediction:
            p_edges = np.asarray(prediction["edges"], dtype=np.float32)
            p_labels, p_expected = None, np.asarray(prediction["expected"], dtype=np.float64)
        else:
            p_edges, p_labels = None, list(prediction.get("labels") or [])[:MAX_LABELS]
            p_expected = np.asarray(list(prediction.get("expected") or [])[:len(p_labels)] + [0.0], dtype=np.float64)
        kind = stored.get("kind") if stored.get("kind") in KINDS else "training"
        return cls(kind, stored.get("source"), int(stored.get("rows") or 0), list(schema.feature_names),
                   edges, expected, p_edges, p_labels, p_expected)

    @property
    def prediction_bins(self) -> int:
        return len(self.prediction_expected)

    def counts(self, X: np.ndarray, predictions: list) -> np.ndarray:
        """Bin counts of rows X (float32) and their predictions, laid out as the window keeps them:
        FEATURE_BINS per feature, then PREDICTION_BINS."""
        n_features = len(self.feature_names)
        ids = [bin_index(self.edges[j], X[:, j]) + j * FEATURE_BINS for j in range(n_features)]
        ids.append(self.prediction_bin(predictions) + n_features * FEATURE_BINS)
        return np.bincount(np.concatenate(ids), minlength=n_features * FEATURE_BINS + PREDICTION_BINS)

    def prediction_bin(self, predictions: list) -> np.ndarray:
        if self.prediction_edges is not None:
            return bin_index(self.prediction_edges, np.asarray(predictions, dtype=np.float64))
        index = {label: i for i, label in enumerate(self.prediction_labels)}
        other = len(self.prediction_labels)
        return np.fromiter((index.get(p, other) for p in predictions), dtype=np.int64, count=len(predictions))


def reference_of(metadata: dict, schema: Schema) -> Reference | None:
    """The stored reference of a version, or None (it then learns one from the rows it serves)."""
    stored = metadata.get("drift_reference")
    if not isinstance(stored, dict):
        return None
    try:
        return Reference.from_stored(stored, schema)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the stored drift reference of %s v%s: %s", metadata.get("name"),
                    metadata.get("version"), exc)
        return None


# --- the statistic -------------------------------------------------------------

def psi(actual_counts, expected_fractions, epsilon: float) -> float:
    """sum((a - e) * ln(a / e)) over the bins, each fraction counted as at least epsilon."""
    counts = np.asarray(actual_counts, dtype=np.float64)
    a = np.maximum(counts / counts.sum(), epsilon)
    e = np.maximum(np.asarray(expected_fractions, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def status_of(value: float | None, warn: float, drift: float) -> str:
    if value is None:
        return "insufficient_data"
    return "ok" if value < warn else "warn" if value < drift else "drift"


class Thresholds(NamedTuple):
    warn: float
    drift: float
    epsilon: float
    min_rows: int


def compare(reference: Reference, counts: np.ndarray, rows: int, limits: Thresholds) -> dict:
    """Per feature and for the predictions: PSI, status, the reference's and the window's fractions."""
    enough = rows >= limits.min_rows
    features = []
    for j, name in enumerate(reference.feature_names):
        actual = counts[j * FEATURE_BINS:j * FEATURE_BINS + len(reference.expected[j])]
        value = psi(actual, reference.expected[j], limits.epsilon) if enough else None
        features.append({"feature": name, "psi": value, "status": status_of(value, limits.warn, limits.drift),
                         "rows": rows, "reference": reference.kind, "edges": readable(reference.edges[j]),
                         "reference_fractions": reference.expected[j].tolist(), "current_fractions": fractions(actual)})
    start = len(reference.feature_names) * FEATURE_BINS
    actual = counts[start:start + reference.prediction_bins]
    value = psi(actual, reference.prediction_expected, limits.epsilon) if enough else None
    prediction = {"psi": value, "status": status_of(value, limits.warn, limits.drift), "rows": rows,
                  "reference_fractions": reference.prediction_expected.tolist(), "current_fractions": fractions(actual)}
    if reference.prediction_edges is not None:
        prediction["edges"] = readable(reference.prediction_edges)
    else:
        prediction["labels"] = [*reference.prediction_labels, "other"]
    worst = max((f["status"] for f in features), key=("insufficient_data", "ok", "warn", "drift").index)
    return {"status": worst if enough else "insufficient_data", "features": features, "prediction": prediction}


def offline_report(metadata: dict, rows: list, predictions: list, limits: Thresholds, baseline_rows: int) -> dict:
    """The same comparison over rows read back from a prediction log (in feature
    order), against the version's stored reference, else its first baseline_rows rows."""
    schema = Schema(list(metadata.get("feature_names") or []), metadata.get("task") or "classification",
                    metadata.get("classes"))
    width = len(schema.feature_names)
    if not all(type(r) is list and len(r) == width for r in rows):
        raise ValueError(f"every logged row must hold the version's {width} features")
    X = np.array(rows, dtype=np.float32).reshape(-1, width)
    reference = reference_of(metadata, schema)
    if reference is None:
        if len(X) <= baseline_rows:
            raise ValueError(f"no stored reference, and the log has {len(X)} rows: more than drift.baseline_rows "
                             f"({baseline_rows}) are needed, the first of them becoming the reference")
        stored = build_reference(X[:baseline_rows], predictions[:baseline_rows], schema, "served",
                                 f"the first {baseline_rows} rows of the log")
        reference = Reference.from_stored(stored, schema)
        X, predictions = X[baseline_rows:], predictions[baseline_rows:]
    counts = reference.counts(X, predictions) if len(X) else np.zeros(width * FEATURE_BINS + PREDICTION_BINS, np.int64)
    return {"reference": {"kind": reference.kind, "source": reference.source, "rows": reference.rows},
            "window": {"rows": len(X)}, **compare(reference, counts, len(X), limits)}


# --- shared counting -------------------------------------------------------------

NUMPY_TYPES = {ctypes.c_int64: np.int64, ctypes.c_double: np.float64}


def shared(kind, size: int, fill=0) -> np.ndarray:
    """A numpy view of zeroed memory that processes forked after this call share."""
    array = np.frombuffer(RawArray(kind, max(size, 1)), dtype=NUMPY_TYPES[kind])[:size]
    if fill:
        array[:] = fill
    return array


class Window:
    """Bin counts per lane (worker) and time bucket, in shared memory."""

    def __init__(self, lanes: int, buckets: int, bins: int):
        self.buckets = buckets
        self.counts = shared(ctypes.c_int64, lanes * buckets * bins).reshape(lanes, buckets, bins)
        self.slots = shared(ctypes.c_int64, lanes * buckets, fill=-1).reshape(lanes, buckets)

    def add(self, lane: int, slot: int, counts: np.ndarray) -> None:
        """Add counts to this lane's bucket for time slot `slot` (only the lane's own process calls this)."""
        i = slot % self.buckets
        if self.slots[lane, i] != slot:
            self.counts[lane, i] = 0
            self.slots[lane, i] = slot
        self.counts[lane, i] += counts

    def total(self, slot: int, max_rows: int, rows_bins: int) -> tuple[np.ndarray, int]:
        """Counts summed over every lane's buckets inside the window that ends at slot,
        newest first until max_rows (0: all); and the number of rows they hold."""
        inside = (self.slots > slot - self.buckets) & (self.slots <= slot)
        stamps = self.slots[inside]
        counts = self.counts[inside]
        if not len(stamps):
            return np.zeros(self.counts.shape[2], dtype=np.int64), 0
        if max_rows:
            order = np.unique(stamps)[::-1]
            rows = np.array([counts[stamps == s, :rows_bins].sum() for s in order])
            before = np.cumsum(rows) - rows
            keep = set(order[before < max_rows].tolist())
            counts = counts[np.isin(stamps, list(keep))]
        total = counts.sum(axis=0)
        return total, int(total[:rows_bins].sum())


class Baseline:
    """The first rows a version serves on the host, in shared memory, when it has no stored reference."""

    def __init__(self, rows: int, width: int):
        self.rows = rows
        self.width = width
        self.data = shared(ctypes.c_double, rows * (width + 1)).reshape(rows, width + 1)
        self.filled = RawValue(ctypes.c_int64, 0)
        self.cached: tuple[int, Reference] | None = None

    def offer(self, X: np.ndarray, values: np.ndarray, lock) -> int:
        """Take rows until the baseline is full; how many were taken."""
        if self.filled.value >= self.rows:
            return 0
        if not lock.acquire(timeout=1.0):
            return 0
        try:
            start = self.filled.value
            taken = min(self.rows - start, len(X))
            self.data[start:start + taken, :self.width] = X[:taken]
            self.data[start:start + taken, self.width] = values[:taken]
            self.filled.value = start + taken
        finally:
            lock.release()
        return taken

    def reference(self, schema: Schema) -> Reference | None:
        """The reference once the baseline is full (the same in every process: the same rows)."""
        if self.filled.value < self.rows:
            return None
        if self.cached is None or self.cached[0] != os.getpid():
            X = self.data[:, :self.width]
            values = self.data[:, self.width]
            if schema.task == "classification" and schema.classes:
                predictions = [schema.classes[int(i)] if 0 <= i < len(schema.classes) else None for i in values]
            elif schema.task == "clustering":
                predictions = [int(v) for v in values]
            else:
                predictions = values.tolist()
            stored = build_reference(X, predictions, schema, "served", f"the first {self.rows} rows served")
            self.cached = (os.getpid(), Reference.from_stored(stored, schema))
        return self.cached[1]


class VersionDrift:
    """One loaded version's reference and window."""

    def __init__(self, model, lanes: int, buckets: int, baseline_rows: int):
        self.name, self.version = model.name, model.version
        self.schema = schema_of(model)
        self.stored = reference_of(model.metadata, self.schema)
        self.baseline = None if self.stored else Baseline(baseline_rows, len(self.schema.feature_names))
        self.class_index = {c: i for i, c in enumerate(self.schema.classes or [])}
        bins = len(self.schema.feature_names) * FEATURE_BINS + PREDICTION_BINS
        self.window = Window(lanes, buckets, bins)

    def reference(self) -> Reference | None:
        return self.stored or self.baseline.reference(self.schema)

    def baseline_values(self, predictions: list) -> np.ndarray:
        """Predictions as numbers, for the baseline's shared rows."""
        if self.schema.task == "classification" and self.class_index:
            return np.array([self.class_index.get(p, -1) for p in predictions], dtype=np.float64)
        return np.asarray(predictions, dtype=np.float64)


class DriftMonitor:
    """Every loaded version's drift state (made in the master), counted into by
    each worker's prediction-log writer, read by the endpoint and the metrics."""

    def __init__(self, window_seconds: float, buckets: int, window_rows: int, baseline_rows: int,
                 limits: Thresholds, lanes: int):
        self.bucket_seconds = window_seconds / buckets
        self.buckets, self.window_rows, self.baseline_rows = buckets, window_rows, baseline_rows
        self.limits = limits
        self.lock = multiprocessing.Lock()
        self.lanes = shared(ctypes.c_int64, lanes)
        self.lane: tuple[int, int] | None = None   # (pid, lane) of this process
        self.states: dict = {}                     # LoadedModel -> VersionDrift

    def prepare(self, models: Iterable) -> None:
        """In the master, before forking: state for every loaded version; kept for those still loaded."""
        self.states = {m: self.states.get(m) or VersionDrift(m, len(self.lanes), self.buckets, self.baseline_rows)
                       for m in models}

    def slot(self, now: float | None = None) -> int:
        return int((time.time() if now is None else now) // self.bucket_seconds)

    def my_lane(self) -> int | None:
        """This process's lane: claimed once, from those free or left by a process that has exited."""
        pid = os.getpid()
        if self.lane is not None and self.lane[0] == pid:
            return self.lane[1]
        with self.lock:
            for i, owner in enumerate(self.lanes.tolist()):
                if owner == 0 or not alive(int(owner)):
                    self.lanes[i] = pid
                    self.lane = (pid, i)
                    return i
        return None

    def count(self, model, X: np.ndarray, predictions: list, now: float | None = None) -> bool:
        """Count served rows X (float32) and their predictions; False when they could not be (no lane)."""
        state = self.states.get(model)
        if state is None:
            return True
        reference = state.reference()
        if reference is None:
            taken = state.baseline.offer(X, state.baseline_values(predictions), self.lock)
            X, predictions = X[taken:], predictions[taken:]
            reference = state.reference() if len(X) else None
            if reference is None:
                return True
        lane = self.my_lane()
        if lane is None:
            return False
        state.window.add(lane, self.slot(now), reference.counts(X, predictions))
        return True

    def report(self, model, now: float | None = None) -> dict:
        """GET /api/v1/models/{name}/drift: the version's reference, window and PSI per feature."""
        state = self.states.get(model)
        head = {"model": model.name, "version": model.version, "enabled": True,
                "thresholds": {"warn": self.limits.warn, "drift": self.limits.drift},
                "window": {"seconds": self.bucket_seconds * self.buckets, "buckets": self.buckets,
                           "max_rows": self.window_rows or None, "min_rows": self.limits.min_rows}}
        if state is None:
            return {**head, "reference": None, "status": "insufficient_data", "features": [], "prediction": None}
        reference = state.reference()
        if reference is None:
            return {**head, "reference": {"kind": "served", "source": None, "rows": self.baseline_rows,
                                          "collected": int(state.baseline.filled.value)},
                    "status": "collecting_baseline", "features": [], "prediction": None}
        counts, rows = state.window.total(self.slot(now), self.window_rows, len(reference.expected[0]))
        head["window"]["rows"] = rows
        return {**head, "reference": {"kind": reference.kind, "source": reference.source, "rows": reference.rows},
                **compare(reference, counts, rows, self.limits)}

    def collect(self):
        """Prometheus collector: PSI per version and feature, one value per host."""
        from prometheus_client.core import GaugeMetricFamily

        features = GaugeMetricFamily("mlserve_feature_psi", "PSI of a feature's served values against the "
                                     "version's reference, over the drift window.", labels=["model", "version", "feature"])
        predictions = GaugeMetricFamily("mlserve_prediction_psi", "PSI of the predictions against those on the "
                                        "reference data, over the drift window.", labels=["model", "version"])
        rows = GaugeMetricFamily("mlserve_drift_window_rows", "Rows in the drift window.", labels=["model", "version"])
        now = time.time()
        for model in list(self.states):
            found = self.report(model, now)
            version = str(model.version)
            rows.add_metric([model.name, version], found["window"].get("rows", 0))
            for feature in found["features"]:
                if feature["psi"] is not None:
                    features.add_metric([model.name, version, feature["feature"]], feature["psi"])
            if found["prediction"] and found["prediction"]["psi"] is not None:
                predictions.add_metric([model.name, version], found["prediction"]["psi"])
        yield from (features, predictions, rows)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
