"""Shadow scoring: mirrored rows are scored by the candidate on a thread of
the worker, agreement is counted per version pair, and a slow or failing
candidate never reaches the response path."""
from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app import shadow as shadow_module
from app.metrics import Metrics
from app.runtimes import Outputs
from app.shadow import ShadowScorer
from tests.wait import until


class Runtime:
    name = "fake"

    def __init__(self, answer):
        self.answer = answer

    def run(self, X):
        return Outputs(np.asarray(self.answer(np.asarray(X))), None)


class Model:
    def __init__(self, version: int, answer, task: str = "classification"):
        self.name, self.version, self.task, self.runtime = "m", version, task, Runtime(answer)


def comparisons(metrics: Metrics) -> dict[str, float]:
    metrics.flush()
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "mlserve_shadow_comparisons_total":
                found[sample.labels["result"]] = found.get(sample.labels["result"], 0) + sample.value
    return found


def test_agreement_is_counted_per_row():
    metrics = Metrics()
    scorer = ShadowScorer(metrics)
    primary, candidate = Model(1, lambda X: [0] * len(X)), Model(2, lambda X: (X[:, 0] > 1).astype(int))
    scorer.submit(primary, candidate, np.array([[0.5], [2.0], [0.1]], dtype=np.float32), [0, 0, 0])
    scorer.submit(primary, candidate, [3.0], [0])  # one row, as predict mirrors it
    assert until(lambda: comparisons(metrics) == {"agree": 2.0, "disagree": 2.0}, what="4 rows compared")


def test_regression_counts_agreement_and_the_differences():
    metrics = Metrics()
    scorer = ShadowScorer(metrics)
    primary, candidate = Model(1, None, "regression"), Model(2, lambda X: X[:, 0] + 0.5, "regression")
    scorer.submit(primary, candidate, np.array([[1.0], [2.0]], dtype=np.float32), [1.0, 2.5])
    until(lambda: comparisons(metrics) == {"agree": 1.0, "disagree": 1.0}, what="2 rows compared")
    assert 'mlserve_shadow_abs_diff_count{model="m",primary="1",shadow="2"} 2.0' in metrics.render().decode()


def test_a_failing_candidate_is_counted_as_an_error_and_scoring_goes_on():
    metrics = Metrics()
    scorer = ShadowScorer(metrics)
    primary = Model(1, lambda X: [0] * len(X))
    scorer.submit(primary, Model(2, lambda X: 1 / 0), [1.0], [0])
    scorer.submit(primary, Model(3, lambda X: [0] * len(X)), [1.0], [0])
    assert until(lambda: comparisons(metrics) == {"error": 1.0, "agree": 1.0}, what="both mirrors handled")


def test_mirrors_beyond_the_bound_are_dropped_not_queued(monkeypatch):
    monkeypatch.setattr(shadow_module, "MAX_PENDING_ROWS", 3)
    scorer = ShadowScorer(Metrics())
    blocked = []
    stuck = Model(2, lambda X: blocked.append(1) or __import__("time").sleep(5) or [0])
    primary = Model(1, lambda X: [0])
    for _ in range(10):
        scorer.submit(primary, stuck, [1.0], [0])
    until(lambda: blocked, what="the candidate is busy")
    assert scorer.pending_rows <= 3 and scorer.pending.qsize() <= 2
    scorer.submit(primary, stuck, np.zeros((5, 1), dtype=np.float32), [0] * 5)  # a batch counts its rows
    assert scorer.pending.qsize() <= 2
