"""The batching core on its own: policies and their defaults, the gathering and
splitting of rows, a failing model, request deadlines, the threaded scheduler
with real threads, and the cost recorded when a version is published."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app import deadlines
from app.batching import (BatchPolicy, Batcher, Pending, ThreadScheduler, check_options, default_of,
                          measure_cost, policy_of)
from app.deadlines import Deadline
from app.errors import DeadlineExceeded, ModelFailed
from app.plan import read_plan
from app.publishing import publish_estimator
from app.repository import ModelRepository
from app.runtimes import Outputs
from app.settings import SettingError
from tests.wait import until

MLP_COST = {"row_ms": 12.4, "batch_ms": 16.5, "batch_rows": 8}
FOREST_COST = {"row_ms": 0.01, "batch_ms": 0.02, "batch_rows": 8}


class Model:
    """A model whose runtime answers each row's first value, and counts its calls."""
    name, version = "m", 1

    def __init__(self, fail_on: float | None = None):
        self.calls: list[int] = []
        self.fail_on = fail_on
        self.runtime = self
        self.lock = threading.Lock()

    def run(self, X):
        with self.lock:
            self.calls.append(len(X))
        if self.fail_on is not None and (X[:, 0] == self.fail_on).any():
            raise RuntimeError("bad value")
        return Outputs(X[:, 0].copy(), np.stack([X[:, 0], -X[:, 0]], axis=1))


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 0.0] for v in values], dtype=np.float32)


def test_the_default_is_on_for_a_model_whose_rows_cost_much_and_batch_well():
    assert default_of(MLP_COST)[0] is True
    on, why = default_of(FOREST_COST)
    assert on is False and "under 1 ms" in why
    on, why = default_of({"row_ms": 5.0, "batch_ms": 39.0, "batch_rows": 8})  # linear in rows: no gain
    assert on is False and "gain" in why
    assert default_of(None) == (False, "no measured cost")


def test_models_yaml_wins_over_the_metadata_over_the_default():
    assert policy_of(None, {}, MLP_COST) == BatchPolicy(True, 32, 2.0, "default", default_of(MLP_COST)[1])
    meta = {"batching": {"enabled": False, "max_wait_ms": 5}}
    assert policy_of(None, meta, MLP_COST).enabled is False
    assert policy_of(None, meta, MLP_COST).set_by == "metadata"
    chosen = policy_of({"enabled": True, "max_batch_size": 8}, meta, FOREST_COST)
    assert (chosen.enabled, chosen.max_batch_size, chosen.max_wait_ms, chosen.set_by) == (True, 8, 5.0, "models.yaml")


@pytest.mark.parametrize("options, message", [
    ({"enabled": "yes"}, "enabled='yes'"),
    ({"max_batch_size": 0}, "max_batch_size=0"),
    ({"max_wait_ms": -1}, "max_wait_ms=-1"),
    ({"max_wait": 2}, "max_wait: unknown option"),
    ("on", "expected true, false or a mapping"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        check_options(options)


def test_models_yaml_batching_is_checked_where_it_is_read(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  big: {batching: {max_wait_ms: 2, enabled: on}}\n  small: {batching: false}\n")
    plan = read_plan(config)
    assert plan.get("big").batching == {"max_wait_ms": 2, "enabled": True}
    assert plan.get("small").batching == {"enabled": False}
    config.write_text("models:\n  big: {batching: {max_batch_size: many}}\n")
    with pytest.raises(SettingError, match=r"models\.big\.batching: max_batch_size='many'"):
        read_plan(config)


def test_each_request_gets_its_own_rows_back_in_order():
    model, batcher = Model(), Batcher()
    policy = BatchPolicy(True, max_batch_size=8, max_wait_ms=1000)
    pendings = [pending_of(rows(1)), pending_of(rows(2, 3)), pending_of(rows(4))]
    for pending in pendings:
        batcher.add(model, policy, pending)
    (batch,) = batcher.due(0.0, everything=True)
    batcher.execute(batch)
    assert model.calls == [4]
    assert [p.outputs.labels.tolist() for p in pendings] == [[1.0], [2.0, 3.0], [4.0]]
    assert pendings[1].outputs.probabilities.tolist() == [[2.0, -2.0], [3.0, -3.0]]


def pending_of(X):
    return Pending(X, 0.0)


def test_a_full_batch_closes_and_a_request_as_large_as_a_batch_runs_alone():
    model, batcher = Model(), Batcher()
    policy = BatchPolicy(True, max_batch_size=3, max_wait_ms=1000)
    first = batcher.add(model, policy, pending_of(rows(1, 2)))
    second = batcher.add(model, policy, pending_of(rows(3, 4)))  # would make 4 rows: a new batch
    assert first is not second and first.closed and not second.closed
    assert batcher.next_deadline() == 0.0  # the full one is due now
    assert batcher.run(model, policy, rows(5, 6, 7)).labels.tolist() == [5.0, 6.0, 7.0]
    assert model.calls == [3]


def test_a_model_error_fails_every_request_of_its_batch_and_nothing_else():
    model, batcher = Model(fail_on=9.0), Batcher()
    policy = BatchPolicy(True, max_batch_size=8, max_wait_ms=1000)
    bad = [pending_of(rows(1)), pending_of(rows(9)), pending_of(rows(2))]
    for p in bad:
        batcher.add(model, policy, p)
    (batch,) = batcher.due(0.0, everything=True)
    batcher.execute(batch)
    assert all(isinstance(p.error, ModelFailed) for p in bad)
    assert "failed on a batch of 3 rows from 3 requests: RuntimeError: bad value" in bad[0].error.message
    assert batcher.run(model, policy, rows(3)).labels.tolist() == [3.0]


def passed(budget_ms: int = 5) -> Deadline:
    return Deadline(time.monotonic() - 1.0, budget_ms)


def ahead(budget_ms: int = 60_000) -> Deadline:
    return Deadline(time.monotonic() + budget_ms / 1000.0, budget_ms)


def run_batch(model, *pendings: Pending) -> None:
    batcher = Batcher()
    for pending in pendings:
        batcher.add(model, BatchPolicy(True, max_batch_size=64, max_wait_ms=1000), pending)
    (batch,) = batcher.due(0.0, everything=True)
    batcher.execute(batch)


def assert_timed_out(pending: Pending, budget_ms: int) -> None:
    assert pending.outputs is None and isinstance(pending.error, DeadlineExceeded)
    assert (pending.error.status, pending.error.code, pending.error.details) == (504, "deadline_exceeded",
                                                                                {"timeout_ms": budget_ms})
    assert pending.error.message == f"the model run did not finish within its deadline of {budget_ms} ms"


def test_a_request_whose_deadline_passed_in_the_queue_gets_504_and_its_rows_do_not_run():
    model = Model()
    first, late, last = Pending(rows(1), 0.0, ahead()), Pending(rows(2, 3), 0.0, passed(5)), Pending(rows(4), 0.0)
    run_batch(model, first, late, last)
    assert model.calls == [2]  # the late request's two rows were left out
    assert (first.outputs.labels.tolist(), last.outputs.labels.tolist()) == ([1.0], [4.0])
    assert last.outputs.probabilities.tolist() == [[4.0, -4.0]]
    assert_timed_out(late, 5)
    everyone_late = [Pending(rows(5), 0.0, passed(7)), Pending(rows(6), 0.0, passed(8))]
    run_batch(model, *everyone_late)
    assert model.calls == [2]  # nothing left to run: no call
    assert_timed_out(everyone_late[0], 7)
    assert_timed_out(everyone_late[1], 8)


class DeadlineModel(Model):
    """Notes the deadline each call runs under; with hold, a call lasts until
    that deadline has passed, and with terminate it then fails as a terminated
    ONNX Runtime run does."""

    def __init__(self, hold: Deadline | None = None, terminate: bool = False):
        super().__init__()
        self.seen: list = []
        self.hold, self.terminate = hold, terminate

    def run(self, X):
        current = deadlines.current()
        self.seen.append(current)
        if self.hold is not None:
            until(lambda: self.hold.remaining() <= 0, timeout=30, interval=0.005, what="the deadline passes")
        if self.terminate:
            raise deadlines.exceeded(current, "the model run")
        return super().run(X)


def test_a_batch_runs_under_the_latest_deadline_of_its_requests():
    early, later = ahead(30_000), ahead(60_000)
    model = DeadlineModel()
    run_batch(model, Pending(rows(1), 0.0, later), Pending(rows(2), 0.0, early))
    run_batch(model, Pending(rows(3), 0.0, early), Pending(rows(4), 0.0))  # one without a deadline: none
    assert model.seen == [later, None]
    assert deadlines.current() is None  # the request's own context is left as it was


def test_a_request_whose_deadline_passes_while_its_batch_runs_gets_504_not_a_late_answer():
    short = ahead(20)
    model = DeadlineModel(hold=short)
    hurried, patient = Pending(rows(1), 0.0, short), Pending(rows(2), 0.0, ahead())
    run_batch(model, hurried, patient)
    assert_timed_out(hurried, 20)
    assert patient.outputs.labels.tolist() == [2.0]


def test_a_terminated_batch_answers_each_request_504_with_its_own_budget():
    first, second = ahead(20), ahead(40)
    model = DeadlineModel(hold=second, terminate=True)
    pendings = [Pending(rows(1), 0.0, second), Pending(rows(2), 0.0, first)]
    run_batch(model, *pendings)
    assert_timed_out(pendings[0], 40)
    assert_timed_out(pendings[1], 20)
    failed = Pending(rows(3), 0.0, ahead())
    run_batch(Model(fail_on=3.0), failed)
    assert isinstance(failed.error, ModelFailed)  # a model error is still the model's


def test_threads_gather_into_batches_and_get_their_own_answers():
    model = Model()
    batcher = Batcher(scheduler=ThreadScheduler())
    policy = BatchPolicy(True, max_batch_size=4, max_wait_ms=500)
    answers: dict[int, list] = {}
    start = threading.Barrier(8)

    def request(i: int) -> None:
        start.wait()
        answers[i] = batcher.run(model, policy, rows(i)).labels.tolist()

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert answers == {i: [float(i)] for i in range(8)}
    assert sum(model.calls) == 8 and max(model.calls) <= 4 and len(model.calls) < 8


def test_publishing_records_the_cost_of_a_row(tmp_path: Path):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    data = load_iris()
    estimator = LogisticRegression(max_iter=500).fit(data.data, data.target)
    mv = publish_estimator(ModelRepository(tmp_path), "iris_lr", estimator, data.data,
                           ["a", "b", "c", "d"], {"accuracy": 1.0})
    cost = mv.metadata["cost"]
    assert cost["row_ms"] > 0 and cost["batch_ms"] > 0 and cost["batch_rows"] == 8
    # as cheap as the forest: batching stays off by default
    assert policy_of(None, mv.metadata, cost).enabled is False


def test_measure_cost_times_one_row_and_eight():
    cost = measure_cost(Model(), rows(1, 2))
    assert set(cost) == {"row_ms", "batch_ms", "batch_rows"} and cost["batch_rows"] == 8
