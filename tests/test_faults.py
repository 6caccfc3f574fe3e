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
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from app.metrics import FLUSH_SECONDS
from app.repository import ModelRepository
from app.server import hooks
from tests.load import Load
from tests.redis_server import RedisServer
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
        # takes at most its last flush interval with it (a few, on a machine so
        # busy that its flusher waits), and nothing is counted twice.
        unflushed = sum(1 for a in load.answers if killed_at - 3 * FLUSH_SECONDS <= a.at <= killed_at)
        totals = []
        until(lambda: totals.append(metric_total(server.url, "mlserve_requests_total", endpoint="predict",
                                                 status="200")) or totals[-1] >= ok - unflushed, timeout=20,
              what=f"at least {ok - unflushed} of {ok} answers counted")
        assert ok - unflushed <= totals[-1] <= ok
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


TOKEN = "faults-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MLSERVE = Path(sys.executable).with_name("mlserve")


def levels_since(load: Load, since: float) -> list:
    with load.lock:
        return [a.body.get("from_cache") for a in load.answers if a.at >= since and a.body]


def redis_answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_timeout=0.05).ping()
    except redis.RedisError:
        return False


def workers_notified(server: Server) -> int:
    answer = requests.post(server.url + "/api/v1/admin/cache/invalidate", headers=AUTH, json={}, timeout=10)
    return answer.json()["workers_notified"]


def test_a_redis_that_stalls_then_stops_for_ten_seconds_fails_no_request_and_everything_recovers(demo_models):
    env = {"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN, "MLSERVE_REDIS_SOCKET_TIMEOUT": "0.1",
           "MLSERVE_CACHE_BREAKER_FAILURES": "3", "MLSERVE_CACHE_BREAKER_RESET": "1",
           "MLSERVE_CACHE_L1_MAX_ENTRIES": "0"}  # every prediction asks Redis
    with RedisServer() as redis_server:
        env["MLSERVE_REDIS_URL"] = redis_server.url
        with Server(demo_models, workers=2, env=env) as server:
            until(lambda: workers_notified(server) == 2, what="both workers on the control channel")
            with Load(server.url, payload={**IRIS, "use_cache": True}, threads=2) as load:
                until(lambda: levels_since(load, 0).count("l2") >= 20, what="L2 hits")
                # Stalled: Redis takes 3 s to answer anything.
                patient = redis.Redis.from_url(redis_server.url, socket_timeout=30)
                sleeper = threading.Thread(target=lambda: patient.execute_command("DEBUG", "SLEEP", 3))
                sleeper.start()
                until(lambda: not redis_answers(redis_server.url), what="Redis stalls")
                load.wait_for_answers(load.count() + 200)
                assert sleeper.is_alive(), "200 answers came while Redis slept: none waited for it"
                sleeper.join()
                # Stopped for ten seconds, then back on the same port.
                redis_server.stop()
                down = time.monotonic()
                until(lambda: metric_total(server.url, "mlserve_cache_breaker_transitions_total", state="open") > 0,
                      what="the breaker opens")
                threading.Event().wait(max(0.0, down + 10 - time.monotonic()))  # the outage lasts 10 s
                during = levels_since(load, down + 1)
                redis_server.start()
                up = time.monotonic()
                until(lambda: "l2" in levels_since(load, up), timeout=30, what="L2 hits resume by themselves")
                until(lambda: workers_notified(server) == 2, timeout=30, what="the control channel resubscribes")
        assert load.failures == []
        assert len(during) > 100 and set(during) == {False}  # served, uncached, while Redis was away
        print(f"\nRedis stalled 3 s then stopped 10 s: {load.count()} requests, none failed")


def mlserve(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MLSERVE), *argv], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own (tmpfs, mounted as root), removed after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test mounts a small tmpfs and needs root: {mounted.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def files_under(root: Path) -> dict:
    """Every path under root but uploads, with its content."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if ".uploads" not in p.parts}


def fill(disk: Path, leave: int) -> Path:
    ballast = disk / "ballast"
    stat = os.statvfs(disk)
    ballast.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return ballast


def test_a_full_models_directory_refuses_a_publish_with_the_reason_and_leaves_nothing(demo_models, small_disk,
                                                                                      tmp_path):
    models = small_disk / "models"
    shutil.copytree(demo_models, models)
    artifact = tmp_path / "model.onnx"
    shutil.copyfile(models / "iris_classifier" / "1" / "model.onnx", artifact)
    with Server(models, workers=2, env={"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN}) as server:
        server.wait_for_workers(2)
        publish = ("models", "publish", str(artifact), "--name", "iris_classifier")
        before = files_under(models)
        ballast = fill(small_disk, leave=32 << 10)  # less than the artifact
        with Load(server.url, threads=2) as load:
            load.wait_for_answers(50)
            cli = mlserve(server.env, *publish)
            upload = requests.post(server.url + "/api/v1/admin/uploads", headers=AUTH, timeout=10).json()["upload_id"]
            part = requests.patch(f"{server.url}/api/v1/admin/uploads/{upload}", data=artifact.read_bytes(),
                                  headers={**AUTH, "Upload-Offset": "0"}, timeout=30)
            load.wait_for_answers(load.count() + 50)
        assert cli.returncode == 1 and "out of space" in cli.stderr and "nothing was written" in cli.stderr
        assert "Traceback" not in cli.stderr
        assert part.status_code == 507 and part.json()["error"]["code"] == "insufficient_storage"
        assert (models / ".uploads" / upload / "data").stat().st_size == 0  # the part is absent, not half there
        assert files_under(models) == before  # no staging directory, no version 2, serving.json as it was
        assert load.failures == []
        ballast.unlink()
        again = mlserve(server.env, *publish)
        assert again.returncode == 0, again.stderr
        assert ModelRepository(models).versions("iris_classifier") == [1, 2]  # no number was used up


def test_two_publishes_of_one_model_at_once_get_distinct_whole_versions(fresh_models, tmp_path):
    artifact = tmp_path / "model.onnx"
    shutil.copyfile(fresh_models / "iris_classifier" / "1" / "model.onnx", artifact)
    with Server(fresh_models, workers=2) as server:
        server.wait_for_workers(2)
        with Load(server.url, threads=2) as load:
            load.wait_for_answers(50)
            both = [subprocess.Popen([str(MLSERVE), "models", "publish", str(artifact), "--name", "iris_classifier",
                                      "--reason", f"publish {i}"], env=server.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
            outcomes = [(p.wait(180), p.stderr.read()) for p in both]
            load.wait_for_answers(load.count() + 50)
        assert load.failures == []
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    repository = ModelRepository(fresh_models)
    assert repository.versions("iris_classifier") == [1, 2, 3]
    for version in (2, 3):
        published = repository.get("iris_classifier", version)
        assert published.metadata["version"] == version
        published.checked_file("model.onnx", "sha256")  # whole: its artifact matches its recorded hash
    history = repository.serving_state("iris_classifier")["history"]
    publishes = {(h["version"], h["reason"]) for h in history if h["action"] == "publish"}
    assert {v for v, _ in publishes} >= {2, 3} and {r for _, r in publishes} >= {"publish 0", "publish 1"}
    assert not list((fresh_models / "iris_classifier").glob(".staging-*"))
