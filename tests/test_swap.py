"""Hot swap on a real server under keep-alive load: no failed request, every
worker on the new version within 2 s, weights still shared, broken versions
never served, splits and shadows."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from app import cli
from app.lifecycle import Lifecycle
from app.repository import ModelRepository, sha256_of
from app.cli.servers import notify_servers
from tests import slow_model
from tests.server import Server
from tests.wait import until

TOKEN = "swap-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}


@pytest.fixture
def two_versions(fresh_models) -> Path:
    """iris_classifier v1 serving, v2 published (the same forest, another version)."""
    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    (fresh_models / "iris_classifier" / "serving.json").unlink(missing_ok=True)
    ModelRepository(fresh_models).record("iris_classifier", "publish", 2, "test", "", {"version": 1})
    return fresh_models


def start(models: Path, redis_url: str = "", workers: int = 2) -> Server:
    env = {"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN, "MLSERVE_REDIS_URL": redis_url}
    return Server(models, workers=workers, env=env)


def admin(server: Server, action: str, **body) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/admin/models/iris_classifier/{action}", headers=ADMIN,
                         json=body, timeout=30)


class Load:
    """Client threads on keep-alive connections, recording every answer."""

    def __init__(self, url: str, threads: int = 6):
        self.url, self.stop, self.answers, self.failures = url, threading.Event(), [], []
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                r = session.post(self.url + "/api/v1/predict", json=IRIS, timeout=10)
                if r.status_code != 200 or r.json()["prediction"] != 0:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.answers.append((time.monotonic(), r.json()["model_version"]))
            except requests.RequestException as exc:
                self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def total_pss(server: Server) -> int:
    total = 0
    for pid in [server.master_pid, *server.worker_pids()]:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


SETTLED = 200  # consecutive answers from the new version that count as "every worker has it"


def settle(load: Load, asked: float, version: int) -> float:
    """When the answers after asked became SETTLED answers in a row from version:
    from then on no worker answers with another (the test checks that)."""
    def settled() -> float | None:
        after = [(t, v) for t, v in list(load.answers) if t > asked]
        run = 0
        for i, (_, v) in enumerate(after):
            run = run + 1 if v == version else 0
            if run == SETTLED:
                return after[i - SETTLED + 1][0]
        return None
    return until(settled, timeout=60, what=f"every worker answers with v{version}")


@pytest.mark.server
def test_five_swaps_under_keep_alive_load_fail_no_request(two_versions, redis_server, monkeypatch):
    server = start(two_versions, redis_server.url).start()
    lifecycle = Lifecycle(ModelRepository(two_versions), 1e-5)
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(two_versions))
    monkeypatch.setenv("MLSERVE_REDIS_URL", redis_server.url)
    triggers = [  # five ways to swap, each with the version that must serve after it
        (2, lambda: admin(server, "promote", version=2, reason="test").raise_for_status()),
        (1, lambda: admin(server, "rollback").raise_for_status()),
        (2, lambda: (lifecycle.promote("iris_classifier", 2), os.kill(server.master_pid, signal.SIGHUP))),
        (1, lambda: (lifecycle.rollback("iris_classifier"),
                     notify_servers(redis_server.url, Path("/nonexistent"), str(two_versions), "test"))),
        (2, lambda: cli.main(["models", "promote", "iris_classifier", "2"]) == 0 or pytest.fail("CLI promote")),
    ]
    swaps = []  # (asked, settled, version)
    try:
        server.wait_for_workers(2)
        pss_before = total_pss(server)
        with Load(server.url) as load:
            until(lambda: len(load.answers) >= 100, what="load is running")
            for version, trigger in triggers:
                asked = time.monotonic()
                trigger()
                swaps.append((asked, settle(load, asked, version), version))
            until(lambda: sum(t > swaps[-1][1] for t, _ in list(load.answers)) > 1000, what="load after the swaps")
        assert load.failures == []
        # Once a version settled, no worker answered with the other one until the next swap.
        ends = [asked for asked, _, _ in swaps[1:]] + [time.monotonic()]
        for (_, settled, version), end in zip(swaps, ends):
            assert {v for t, v in load.answers if settled <= t < end} == {version}
        # Workers forked from the reloaded master: the models are still shared.
        server.wait_for_workers(2)
        assert total_pss(server) < 1.3 * pss_before
    finally:
        server.stop()


def break_version(models: Path, how: str) -> None:
    folder = models / "iris_classifier" / "2"
    meta = json.loads((folder / "metadata.json").read_text())
    if how == "sha256_mismatch":
        data = bytearray((folder / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "model.onnx").write_bytes(bytes(data))
    elif how == "corrupt_file":
        (folder / "model.onnx").write_bytes(b"this is not an onnx graph")
        meta["onnx_sha256"] = sha256_of(folder / "model.onnx")
    elif how == "wrong_input_width":
        shutil.rmtree(folder)
        shutil.copytree(models / "wine_clusters" / "1", folder)
        return
    elif how == "throws_on_reference_sample":
        shutil.rmtree(folder)
        slow_model.publish_exploding(folder)
        return
    (folder / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.server
@pytest.mark.parametrize("how", ["corrupt_file", "wrong_input_width", "sha256_mismatch",
                                 "throws_on_reference_sample"])
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(two_versions, how):
    break_version(two_versions, how)
    with start(two_versions) as server:
        answer = admin(server, "promote", version=2)
        assert answer.status_code == 422
        error = answer.json()["error"]
        assert error["code"] == "model_refused" and "v2" in error["message"]
        state = json.loads((two_versions / "iris_classifier" / "serving.json").read_text())
        assert state["version"] == 1
        # Even forced (serving.json edited by hand, then SIGHUP), it never goes live.
        (two_versions / "iris_classifier" / "serving.json").write_text(json.dumps({**state, "version": 2}))
        os.kill(server.master_pid, signal.SIGHUP)
        until(lambda: 'mlserve_model_swaps_total{model="iris_classifier",result="refused"}' in
              requests.get(server.url + "/metrics").text, what="the reload refuses v2")
        for _ in range(8):
            r = requests.post(server.url + "/api/v1/predict", json=IRIS)
            assert r.status_code == 200 and r.json()["model_version"] == 1
        assert "refused" in server.log() and "iris_classifier" in server.log()


@pytest.mark.server
def test_a_swap_reaches_another_host_through_redis(two_versions, redis_server):
    with start(two_versions, redis_server.url, workers=1) as a, start(two_versions, redis_server.url, workers=1) as b:
        until(lambda: redis_server.client().pubsub_numsub("mlserve:control")[0][1] >= 2, what="both subscribed")
        assert admin(a, "promote", version=2).json()["swap"]["other_hosts_notified"] >= 1
        until(lambda: requests.post(b.url + "/api/v1/predict", json=IRIS).json()["model_version"] == 2,
              what="host b serves v2")
        assert {requests.post(b.url + "/api/v1/predict", json=IRIS).json()["model_version"] for _ in range(4)} == {2}


@pytest.mark.server
def test_split_routes_by_key_stickily_and_shadow_reports_agreement(two_versions):
    with start(two_versions) as server:
        assert admin(server, "split", weights={"1": 80, "2": 20}).status_code == 200
        assert admin(server, "shadow", version=2).status_code == 200
        until(lambda: requests.get(server.url + "/api/v1/models/iris_classifier").json()["shadow_version"] == 2,
              what="the split and the shadow are served")
        server.wait_for_workers(2)  # the old workers have retired
        s = requests.Session()
        seen = {}
        for i in range(300):
            key = f"user-{i % 100}"
            r = s.post(server.url + "/api/v1/predict", json=IRIS, headers={"X-Routing-Key": key})
            seen.setdefault(key, set()).add(r.json()["model_version"])
        assert all(len(v) == 1 for v in seen.values())  # a key always lands on the same version
        share = sum(v == {2} for v in seen.values()) / len(seen)
        assert 0.08 < share < 0.35  # 100 keys at 20%
        pinned = s.post(server.url + "/api/v1/predict", json={**IRIS, "version": 2, "routing_key": "user-1"})
        assert pinned.json()["model_version"] == 2
        info = s.get(server.url + "/api/v1/models/iris_classifier").json()
        assert info["split"] == {"1": 0.8, "2": 0.2} and info["shadow_version"] == 2

        def agreed() -> float:
            metrics = requests.get(server.url + "/metrics").text
            return sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("mlserve_shadow_comparisons_total") and 'result="agree"' in line)
        assert until(agreed, what="shadow comparisons counted") > 0


@pytest.mark.server
def test_admin_model_actions_need_the_token_and_a_known_model(two_versions):
    with start(two_versions) as server:
        url = server.url + "/api/v1/admin/models/iris_classifier/promote"

        def error(response: requests.Response, status: int) -> dict:
            assert response.status_code == status, response.text
            return response.json()["error"]
        assert error(requests.post(url, json={"version": 2}), 401)["code"] == "unauthorized"
        assert error(requests.post(url, json={"version": 2}, headers={"Authorization": "Bearer no"}),
                     401)["code"] == "unauthorized"
        unknown = error(requests.post(server.url + "/api/v1/admin/models/nope/promote", headers=ADMIN,
                                      json={"version": 2}), 404)
        assert unknown["code"] == "model_not_found" and "'nope'" in unknown["message"]
        missing = error(requests.post(url, headers=ADMIN, json={"version": 9}), 404)
        assert missing["code"] == "version_not_found" and "no version 9" in missing["message"]
        assert error(requests.post(url, headers=ADMIN, json={"version": "two"}), 422)["code"] == "model_refused"
        action = error(requests.post(server.url + "/api/v1/admin/models/iris_classifier/explode", headers=ADMIN), 404)
        assert action["message"] == "no admin action 'explode'; one of promote, rollback, split, shadow, reload"
