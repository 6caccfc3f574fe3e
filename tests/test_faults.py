"""Faults under load, on real servers: a worker killed, a burst of reloads, a
Redis that stalls then goes away, a repository that fills up or is published
to twice at once, a serving.json broken by hand, a master killed. Each runs
with a bounded keep-alive load (tests/load.py) and asserts what a user would:
nothing fails that need not, and the server is whole afterwards."""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from app.server import hooks
from tests.load import Load
from tests.server import Server
from tests.wait import until

pytestmark = pytest.mark.server
IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_killed_master_takes_its_workers_and_port_with_it_and_a_new_one_starts_clean(demo_models, tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {"TMPDIR": str(private_tmp)}
    first = Server(demo_models, workers=2, env=env)
    first.env.pop("MLSERVE_MONITORING_METRICS_DIR")  # the default: in the master's runtime directory
    first.start()
    try:
        first.wait_for_workers(2)
        workers = first.worker_pids()
        with Load(first.url, threads=2) as load:
            load.wait_for_answers(50)
            load.ending.set()
            os.kill(first.master_pid, signal.SIGKILL)
            first.process.wait(10)
            until(lambda: not any(alive(pid) for pid in workers), timeout=30, what="the orphaned workers exit")
        until(lambda: port_free(first.port), timeout=10, what="the port is released")
        left = [p.name for p in private_tmp.iterdir() if p.name.startswith("mlserve-run-")]
        assert len(left) == 1  # a SIGKILL leaves the runtime directory behind ...
        second = Server(demo_models, workers=2, env=env)
        second.env.pop("MLSERVE_MONITORING_METRICS_DIR")
        second.port, second.url = first.port, first.url  # the same port, and the same pid file's place
        second.env["MLSERVE_BIND"] = f"127.0.0.1:{first.port}"
        with second:
            assert requests.post(second.url + "/api/v1/predict", json=IRIS, timeout=10).json()["prediction"] == 0
            now = [p.name for p in private_tmp.iterdir() if p.name.startswith("mlserve-run-")]
            assert left[0] not in now and len(now) == 1  # ... which the next master removes
    finally:
        first.stop(signal.SIGKILL)


def test_a_serving_json_broken_by_hand_is_refused_and_the_old_version_serves(fresh_models):
    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    with Server(fresh_models, workers=2, env={"MLSERVE_SERVER_ADMIN_TOKEN": "t"}) as server:
        with Load(server.url, threads=2) as load:
            load.wait_for_answers(20)
            (fresh_models / "iris_classifier" / "serving.json").write_text('{"version": 2,')  # an edit cut short
            pids = server.worker_pids()
            os.kill(server.master_pid, signal.SIGHUP)
            until(lambda: "serving.json" in server.log() and "refused" in server.log(), timeout=30,
                  what="the reload refusal is logged")
            until(lambda: not set(pids) & set(server.worker_pids()), timeout=30, what="the workers are replaced")
            since = time.monotonic()
            load.wait_for_answers(load.count() + 50)
            api = requests.post(server.url + "/api/v1/admin/models/iris_classifier/reload",
                                headers={"Authorization": "Bearer t"}, timeout=10)
        assert load.failures == []
        assert load.versions_since(since) == {1}
        assert api.status_code == 422, api.text
        assert "serving.json" in api.json()["error"]["message"]
        model = requests.get(server.url + "/api/v1/models/iris_classifier", timeout=10).json()
        assert model["version"] == 1
        line = next(line for line in server.log().splitlines() if "serving.json" in line and "refused" in line)
        assert "iris_classifier" in line


def metric_total(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_a_killed_worker_is_replaced_losing_at_most_its_requests_in_flight(demo_models):
    with Server(demo_models, workers=2) as server:
        server.wait_for_workers(2)
        victim, other = server.worker_pids()
        with Load(server.url, threads=4) as load:
            load.wait_for_answers(300)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            until(lambda: len(pids := server.worker_pids()) == 2 and victim not in pids, timeout=30,
                  what="a replacement worker")
            load.wait_for_answers(load.count() + 300)
        ok = sum(1 for a in load.answers if a.status == 200)
        # Each thread has one request in flight at most: only those on the killed worker may fail,
        # and only as broken connections, never as an HTTP error.
        assert len(load.failures) <= load.threads, load.failures
        assert all(f.startswith("on an open connection") for f in load.failures), load.failures
        assert all(a.status == 200 for a in load.answers)
        # A worker's counts reach the shared files once a second: the killed one
        # takes at most its last second with it, and nothing is counted twice.
        unflushed = sum(1 for a in load.answers if killed_at - 1.5 <= a.at <= killed_at)
        counted = until(lambda: (n := metric_total(server.url, "mlserve_requests_total", endpoint="predict",
                                                   status="200")) >= ok - unflushed and n, timeout=10)
        assert ok - unflushed <= counted <= ok
        assert metric_total(server.url, "mlserve_worker_unexpected_exits_total") == 1
        assert other in server.worker_pids()


def steady_workers(server: Server, count: int, before: set[int], quiet: float = 4.0) -> int:
    """Wait until the master has `count` workers, none of `before`, and has
    forked no other for `quiet` seconds; how many generations of workers it forked."""
    seen, changed = set(before), time.monotonic()
    deadline = changed + 120
    while time.monotonic() < deadline:
        pids = set(server.worker_pids())
        if pids - seen:
            seen |= pids
            changed = time.monotonic()
        if len(pids) == count and not pids & before and time.monotonic() - changed > quiet:
            return -(-len(seen - before) // count)
        time.sleep(0.05)
    raise AssertionError(f"workers never settled: {server.worker_pids()}")


def test_ten_sighups_in_a_second_end_in_one_state_with_no_failed_request(fresh_models):
    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    with Server(fresh_models, workers=2) as server:
        server.wait_for_workers(2)
        before = set(server.worker_pids())
        with Load(server.url, threads=4) as load:
            load.wait_for_answers(100)
            state = json.loads((fresh_models / "iris_classifier" / "serving.json").read_text())
            (fresh_models / "iris_classifier" / "serving.json").write_text(json.dumps({**state, "version": 2}))
            for _ in range(10):
                os.kill(server.master_pid, signal.SIGHUP)
                time.sleep(0.1)
            swaps = steady_workers(server, 2, before)
            since = time.monotonic()
            load.wait_for_answers(load.count() + 100)
        assert load.failures == []
        assert load.versions_since(since) == {2}
        assert requests.get(server.url + "/api/v1/models/iris_classifier", timeout=10).json()["version"] == 2
        assert not any(alive(pid) for pid in before)
        print(f"\nten SIGHUPs: {swaps} generation(s) of workers, {load.count()} requests, none failed")


class Arbiter:
    def __init__(self, *signals):
        self.SIG_QUEUE = queue.SimpleQueue()
        for sig in signals:
            self.SIG_QUEUE.put_nowait(sig)


def test_sighups_queued_during_a_reload_are_answered_by_it_and_other_signals_kept_in_order():
    server = Arbiter(signal.SIGHUP, signal.SIGCHLD, signal.SIGHUP, signal.SIGTTIN, signal.SIGHUP)
    assert hooks.fold_queued_reloads(server) == 3
    left = []
    while not server.SIG_QUEUE.empty():
        left.append(server.SIG_QUEUE.get_nowait())
    assert left == [signal.SIGCHLD, signal.SIGTTIN]
    assert hooks.fold_queued_reloads(Arbiter()) == 0
