"""Request deadlines: a prediction that would outlast its deadline is answered
504 in bounded time, and the worker goes on serving."""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from app import deadlines
from app.errors import DeadlineExceeded
from app.runtimes import OnnxRuntime
from tests import slow_model
from tests.server import Server
from tests.wait import until

IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}


def test_a_deadline_that_passed_refuses_with_its_budget():
    token = deadlines.start(1)
    try:
        time.sleep(0.01)
        with pytest.raises(DeadlineExceeded) as info:
            deadlines.current().check("the model run")
        assert info.value.status == 504 and info.value.details == {"timeout_ms": 1}
        assert info.value.message == "the model run did not finish within its deadline of 1 ms"
    finally:
        deadlines.reset(token)
    assert deadlines.current() is None


def test_an_onnx_run_that_overruns_is_terminated():
    runtime = OnnxRuntime(slow_model.slow_onnx_graph(), "regression")
    rows = np.ones((4000, 4), dtype=np.float32)
    started = time.monotonic()
    token = deadlines.start(100)
    try:
        with pytest.raises(DeadlineExceeded):
            runtime.run(rows)
    finally:
        deadlines.reset(token)
    stopped = time.monotonic() - started
    assert runtime.run(rows[:2]).labels.shape == (2,)  # the runtime is fine afterwards
    # Without the deadline the same run takes several times longer than it was allowed.
    began = time.monotonic()
    runtime.run(rows)
    assert time.monotonic() - began > stopped


def test_a_native_call_is_waited_for_until_the_deadline_only():
    token = deadlines.start(50)
    try:
        with pytest.raises(DeadlineExceeded):
            deadlines.native.call(lambda: time.sleep(1) or "late", deadlines.current(), "the model run")
    finally:
        deadlines.reset(token)
    token = deadlines.start(5000)
    try:
        assert deadlines.native.call(lambda: "quick", deadlines.current(), "the model run") == "quick"
    finally:
        deadlines.reset(token)


@pytest.fixture(scope="module")
def slow_server(demo_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("deadlines") / "models"
    import shutil

    shutil.copytree(demo_models, root)
    slow_model.publish(root)
    slow_model.publish_slow_onnx(root)
    with Server(root, workers=1, env={"MLSERVE_SERVER_REQUEST_TIMEOUT_MS": "1000", "MLSERVE_SERVER_MAX_BATCH_ROWS": "50000"}) as server:
        yield server


@pytest.mark.server
def test_a_slow_native_model_is_answered_504_and_the_worker_serves_on(slow_server):
    s = requests.Session()  # one connection, one worker
    late = s.post(slow_server.url + "/api/v1/predict", headers={"X-Request-Timeout": "300"}, timeout=10,
                  json={"model_name": "slow_model", "features": [3.0, 42.0], "use_cache": False})
    assert late.status_code == 504
    assert late.json()["error"] == {"timeout_ms": 300, "code": "deadline_exceeded",
                                    "message": "the model run did not finish within its deadline of 300 ms"}
    assert s.post(slow_server.url + "/api/v1/predict", json=IRIS, timeout=10).json()["prediction"] == 0
    quick = s.post(slow_server.url + "/api/v1/predict", timeout=10,
                   json={"model_name": "slow_model", "features": [0.0, 7.0], "use_cache": False})
    # The abandoned call still runs on the helper thread: this one waits for it, within its own deadline.
    assert quick.status_code in (200, 504)


@pytest.mark.server
def test_the_server_deadline_bounds_a_huge_onnx_batch(slow_server):
    # 30k rows take about three seconds through this graph on a 2-core machine.
    rows = np.random.default_rng(0).random((30_000, 4)).round(3).tolist()
    late = requests.post(slow_server.url + "/api/v1/batch_predict", timeout=30,
                         json={"model_name": "slow_onnx", "features_batch": rows, "use_cache": False})
    assert late.status_code == 504 and late.json()["error"]["timeout_ms"] == 1000
    v2 = requests.post(slow_server.url + "/v2/models/slow_onnx/infer", timeout=30, headers={"X-Request-Timeout": "100"},
                       json={"inputs": [{"name": "x", "shape": [30_000, 4], "datatype": "FP32",
                                         "data": [v for row in rows for v in row]}]})
    assert v2.status_code == 504 and "deadline of 100 ms" in v2.json()["error"]
    assert requests.post(slow_server.url + "/api/v1/predict", json=IRIS, timeout=10).status_code == 200
    small = requests.post(slow_server.url + "/api/v1/batch_predict", timeout=30,
                          json={"model_name": "slow_onnx", "features_batch": rows[:10], "use_cache": False})
    assert small.status_code == 200 and small.json()["count"] == 10


@pytest.mark.server
@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_a_bad_timeout_header_is_a_400(slow_server, value):
    r = requests.post(slow_server.url + "/api/v1/predict", json=IRIS, headers={"X-Request-Timeout": value}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_header"
    assert "X-Request-Timeout must be a whole number of milliseconds" in r.json()["error"]["message"]


def test_the_watchdog_terminates_runs_that_overrun_and_leaves_the_others():
    from types import SimpleNamespace

    from app.deadlines import Deadline, Watchdog

    dog = Watchdog()
    first = SimpleNamespace(terminate=False)  # the first run it sees starts its thread
    dog.arm(first, Deadline(time.monotonic() + 0.05, 50))
    until(lambda: first.terminate, timeout=10, what="the first overrunning run terminated")
    dog.disarm(first)
    quick = SimpleNamespace(terminate=False)
    dog.arm(quick, Deadline(time.monotonic() + 60, 60_000))
    dog.disarm(quick)  # finished in time
    shorter = SimpleNamespace(terminate=False)  # a shorter budget than any before wakes it early
    dog.arm(shorter, Deadline(time.monotonic() + 0.03, 30))
    until(lambda: shorter.terminate, timeout=10, what="a run with a shorter budget terminated")
    assert dog.thread_alive() and not quick.terminate
