"""Drift: reference histograms, the PSI (checked against an independent
computation by hand with numpy), the sliding window, the learned baseline, and
counts summed over forked processes through shared memory."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from app.drift import (FEATURE_BINS, DriftMonitor, Reference, Schema, Thresholds, Window, bin_index, build_reference,
                       decile_edges, offline_report, psi, status_of)
from tests.models import dataset

LIMITS = Thresholds(warn=0.1, drift=0.25, epsilon=1e-4, min_rows=10)
IRIS = Schema(["sepal_length", "sepal_width", "petal_length", "petal_width"], "classification", [0, 1, 2])


class Model:
    """What the drift monitor needs of a loaded version."""

    def __init__(self, metadata: dict | None = None, version: int = 1, schema: Schema = IRIS):
        self.name, self.version = "iris_classifier", version
        self.feature_names, self.task, self.classes = schema
        self.metadata = metadata or {}


def iris_reference() -> dict:
    X, y, _ = dataset("iris")
    return build_reference(X, y.tolist(), IRIS, "training", "iris")


def test_edges_are_float32_deciles_with_duplicates_collapsed():
    values = np.array([1.0] * 65 + [2.0] * 30 + [3.0] * 5)  # deciles: 1 six times, then 2 three times
    edges = decile_edges(values)
    assert edges == [1.0, 2.0]
    iris = decile_edges(dataset("iris")[0][:, 2])
    assert len(iris) == 9 and iris[0] == 1.4  # the float32 value, written as the shortest decimal


def test_bins_are_right_closed_and_the_outer_ones_open():
    edges = [1.0, 2.0, 3.0]
    assert bin_index(edges, [-1e30, 1.0, 1.0000001, 2.0, 2.5, 3.0, 3.5, 1e30]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_reference_fractions_count_the_training_rows_into_the_bins():
    X, y, _ = dataset("iris")
    stored = iris_reference()
    for j, name in enumerate(IRIS.feature_names):
        feature = stored["features"][name]
        edges = np.asarray(feature["edges"], dtype=np.float32)
        by_hand = [np.mean((X[:, j].astype(np.float32) > lo) & (X[:, j].astype(np.float32) <= hi))
                   for lo, hi in zip(np.r_[-np.inf, edges], np.r_[edges, np.inf])]
        assert feature["expected"] == pytest.approx(by_hand)
        assert sum(feature["expected"]) == pytest.approx(1.0)
    assert stored["prediction"] == {"labels": [0, 1, 2], "expected": pytest.approx([50 / 150] * 3)}


def psi_by_hand(counts: np.ndarray, expected: np.ndarray, epsilon: float) -> float:
    """PSI written out from its definition, bin by bin."""
    total = 0.0
    n = float(sum(counts))
    for c, e in zip(counts, expected):
        a = c / n
        a, e = (a if a > epsilon else epsilon), (e if e > epsilon else epsilon)
        total += (a - e) * np.log(a / e)
    return total


@pytest.mark.parametrize("shift", [1.0, 1.1, 1.5])
def test_psi_matches_an_independent_computation_on_the_same_counts(shift):
    X, y, _ = dataset("iris")
    reference = Reference.from_stored(iris_reference(), IRIS)
    rng = np.random.default_rng(7)
    rows = X[rng.integers(0, len(X), 2000)].astype(np.float32)
    rows[:, 2] *= shift
    counts = reference.counts(rows, y[:1].tolist() * len(rows))
    j = 2
    feature_counts = counts[j * FEATURE_BINS:j * FEATURE_BINS + len(reference.expected[j])]
    # Counts by hand: the rows whose value falls in each (lo, hi].
    edges = reference.edges[j]
    by_hand = np.array([((rows[:, j] > lo) & (rows[:, j] <= hi)).sum()
                        for lo, hi in zip(np.r_[-np.inf, edges], np.r_[edges, np.inf])])
    assert feature_counts.tolist() == by_hand.tolist()
    assert psi(feature_counts, reference.expected[j], 1e-4) == pytest.approx(
        psi_by_hand(by_hand, reference.expected[j], 1e-4), rel=1e-12)


def test_psi_of_identical_distributions_is_zero_and_empty_bins_stay_finite():
    assert psi([10, 20, 30], [1 / 6, 2 / 6, 3 / 6], 1e-4) == pytest.approx(0.0, abs=1e-12)
    value = psi([0, 0, 60], [1 / 3, 1 / 3, 1 / 3], 1e-4)
    assert np.isfinite(value) and value > 5


def test_status_thresholds():
    assert [status_of(v, 0.1, 0.25) for v in (0.0, 0.0999, 0.1, 0.2499, 0.25, 3.0, None)] == \
        ["ok", "ok", "warn", "warn", "drift", "drift", "insufficient_data"]


def test_in_distribution_rows_are_ok_and_a_shifted_feature_drifts():
    X, y, _ = dataset("iris")
    monitor = DriftMonitor(3600, 12, 0, 100, LIMITS, lanes=2)
    model = Model({"drift_reference": iris_reference()})
    monitor.prepare([model])
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(X), 5000)
    monitor.count(model, X[picks].astype(np.float32), y[picks].tolist())
    found = monitor.report(model)
    assert found["window"]["rows"] == 5000 and found["reference"]["kind"] == "training"
    assert {f["feature"]: f["status"] for f in found["features"]} == dict.fromkeys(IRIS.feature_names, "ok")
    shifted = X[picks].astype(np.float32)
    shifted[:, 2] *= 1.5
    later = DriftMonitor(3600, 12, 0, 100, LIMITS, lanes=2)
    later.prepare([model])
    later.count(model, shifted, y[picks].tolist())
    psis = {f["feature"]: f["psi"] for f in later.report(model)["features"]}
    assert psis["petal_length"] >= 0.25
    assert all(psis[f] < 0.1 for f in ("sepal_length", "sepal_width", "petal_width"))


def test_the_window_slides_by_time_and_caps_rows_newest_first():
    window = Window(lanes=2, buckets=3, bins=4)
    window.add(0, 10, np.array([1, 0, 0, 0]))
    window.add(1, 11, np.array([0, 2, 0, 0]))
    window.add(0, 12, np.array([0, 0, 3, 0]))
    counts, rows = window.total(12, 0, rows_bins=4)
    assert counts.tolist() == [1, 2, 3, 0] and rows == 6
    counts, rows = window.total(13, 0, rows_bins=4)  # slot 10 has left the window
    assert counts.tolist() == [0, 2, 3, 0]
    counts, rows = window.total(12, 3, rows_bins=4)  # newest buckets until 3 rows
    assert counts.tolist() == [0, 0, 3, 0] and rows == 3
    window.add(0, 13, np.array([0, 0, 0, 4]))  # reuses slot 10's bucket, cleared first
    assert window.total(13, 0, rows_bins=4)[0].tolist() == [0, 2, 3, 4]


def test_a_version_without_a_stored_reference_learns_it_from_the_first_rows_served():
    X, y, _ = dataset("iris")
    monitor = DriftMonitor(3600, 12, 0, 150, LIMITS, lanes=2)
    model = Model({})
    monitor.prepare([model])
    assert monitor.report(model)["status"] == "collecting_baseline"
    order = np.random.default_rng(3).permutation(len(X))
    monitor.count(model, X[order[:100]].astype(np.float32), y[order[:100]].tolist())
    assert monitor.report(model)["reference"]["collected"] == 100
    monitor.count(model, X[order[100:]].astype(np.float32), y[order[100:]].tolist())  # completes it
    monitor.count(model, X.astype(np.float32), y.tolist())
    found = monitor.report(model)
    assert found["reference"] == {"kind": "served", "source": "the first 150 rows served", "rows": 150}
    assert found["window"]["rows"] == 150
    # The baseline is the same rows as the window: nothing drifted.
    assert all(f["psi"] == pytest.approx(0.0, abs=1e-9) for f in found["features"])
    assert found["prediction"]["labels"] == [0, 1, 2, "other"]


def test_the_offline_report_gives_the_servers_figures_for_the_same_rows():
    X, y, _ = dataset("iris")
    metadata = {"feature_names": IRIS.feature_names, "task": "classification", "classes": [0, 1, 2],
                "drift_reference": iris_reference()}
    rows = X[np.random.default_rng(5).integers(0, len(X), 800)].astype(np.float32)
    rows[:, 0] *= 1.2
    monitor = DriftMonitor(3600, 12, 0, 100, LIMITS, lanes=2)
    model = Model(metadata)
    monitor.prepare([model])
    labels = y[:800].tolist()
    monitor.count(model, rows, labels)
    online = monitor.report(model)
    offline = offline_report(metadata, rows.tolist(), labels, LIMITS, 100)
    assert [f["psi"] for f in offline["features"]] == pytest.approx([f["psi"] for f in online["features"]])
    assert offline["prediction"]["psi"] == pytest.approx(online["prediction"]["psi"])


def count_in_child(monitor: DriftMonitor, model, rows: np.ndarray, labels: list, together) -> None:
    monitor.count(model, rows, labels)
    together.wait(30)  # both alive, as two workers are: neither can take the other's lane
    os._exit(0)


@pytest.mark.server
def test_counts_from_forked_workers_are_summed_into_one_value_per_host():
    X, y, _ = dataset("iris")
    monitor = DriftMonitor(3600, 12, 0, 100, LIMITS, lanes=4)
    model = Model({"drift_reference": iris_reference()})
    monitor.prepare([model])  # in the "master", before forking
    context = multiprocessing.get_context("fork")
    halves = [(X[:75], y[:75]), (X[75:], y[75:])]
    together = context.Barrier(2)
    children = [context.Process(target=count_in_child,
                                args=(monitor, model, part.astype(np.float32), labels.tolist(), together))
                for part, labels in halves]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    found = monitor.report(model)  # read here, in neither child
    assert found["window"]["rows"] == 150
    # All the training rows: the window matches the reference exactly.
    assert all(f["psi"] == pytest.approx(0.0, abs=1e-9) for f in found["features"])
    lanes = monitor.lanes.tolist()
    assert sorted(p for p in lanes if p) == sorted(c.pid for c in children)
    assert monitor.my_lane() is not None  # the children have exited: their lanes can be reused
