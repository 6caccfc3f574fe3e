"""Batching on a real server: concurrent requests share a runtime call and each
gets its own rows back, a bad row fails only its own request, a model error
fails only its batch (the worker stays), cache hits never enter a batch, the
batch metrics, what GET /api/v1/models/{name} says, request deadlines and API
keys with rate limits on batched requests, and a swap under load where no
batch mixes versions and no request fails."""
from __future__ import annotations

import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.keys import KeyFile
from app.repository import ModelRepository
from tests import batch_models, slow_model
from tests.batch_models import POISON, row
from tests.load import Load
from tests.server import Server
from tests.wait import until

TOKEN = "batching-token"
# One worker: every concurrent request of a test reaches the same batcher. A
# full batch (4 rows) runs at once; a long wait lets a burst gather.
GATHERING = "models:\n  echo: {batching: {enabled: true, max_batch_size: 4, max_wait_ms: 1000}}\n  iris_classifier: {}\n"


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory, demo_models):
    root = tmp_path_factory.mktemp("batching")
    models = root / "models"
    models.mkdir()
    batch_models.publish(models)
    (models / "iris_classifier").symlink_to(demo_models / "iris_classifier")
    config = root / "models.yaml"
    config.write_text(GATHERING)
    with Server(models, workers=1, models_config=config) as running:
        yield running


def post_all(url: str, bodies: list[dict], path: str = "/api/v1/predict",
             headers: list[dict] | None = None) -> list[requests.Response]:
    """Send every body at once (with its headers), each on its own connection; the responses in the same order."""
    answers: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        start.wait()
        answers[i] = requests.post(url + path, json=bodies[i], timeout=30, headers=headers[i] if headers else None)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def batch_metrics(server: Server, model: str = "echo", version: str | None = None,
                  headers: dict | None = None) -> dict[str, float]:
    """Sums and counts of the model's batch histograms (of one version, or all)."""
    found: dict[str, float] = {}
    text = requests.get(server.url + "/metrics", timeout=10, headers=headers).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("mlserve_batch_") and sample.labels.get("model") == model \
                    and version in (None, sample.labels.get("version")) and sample.name.endswith(("_sum", "_count")):
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def grew(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@pytest.mark.server
def test_concurrent_requests_share_a_batch_and_each_gets_its_own_rows(echo_server):
    before = batch_metrics(echo_server)
    singles = [row(100.0 + i) for i in range(7)]
    small_batch = {"model_name": "echo", "features_batch": [[0, 1.5], [0, 2.5]], "use_cache": False}
    answers = post_all(echo_server.url, singles)
    assert [a.status_code for a in answers] == [200] * 7
    assert [a.json()["prediction"] for a in answers] == [100.0 + i for i in range(7)]
    (batch,) = post_all(echo_server.url, [small_batch], "/api/v1/batch_predict")
    assert batch.json()["predictions"] == [1.5, 2.5]
    after = batch_metrics(echo_server)
    assert grew(before, after, "mlserve_batch_size_sum") == 9  # every row went through a batch
    runs = grew(before, after, "mlserve_batch_size_count")
    assert runs < 8, f"{runs:g} runtime calls for 8 requests: nothing was gathered"
    assert grew(before, after, "mlserve_batch_queue_wait_seconds_count") == 8
    assert grew(before, after, "mlserve_batch_run_seconds_count") == runs


@pytest.mark.server
def test_a_bad_row_fails_only_its_own_request(echo_server):
    before = batch_metrics(echo_server)
    bodies = [row(1.0), row(2.0), {"model_name": "echo", "features": [0, "two"], "use_cache": False}, row(3.0)]
    answers = post_all(echo_server.url, bodies)
    assert [a.status_code for a in answers] == [200, 200, 422, 200]
    assert answers[2].json()["error"]["code"] == "invalid_features"
    assert [answers[i].json()["prediction"] for i in (0, 1, 3)] == [1.0, 2.0, 3.0]
    assert grew(before, batch_metrics(echo_server), "mlserve_batch_size_sum") == 3  # it never joined a batch


@pytest.mark.server
def test_a_model_error_fails_its_batch_with_json_and_the_worker_carries_on(echo_server):
    workers = echo_server.worker_pids()
    answers = post_all(echo_server.url, [row(1.0), row(2.0, control=POISON), row(3.0), row(4.0)])
    poisoned = answers[1]
    assert poisoned.status_code == 500
    assert poisoned.headers["Content-Type"].startswith("application/json")
    error = poisoned.json()["error"]
    assert error["code"] == "model_error" and "echo v1 failed on a batch of" in error["message"]
    assert "Traceback" not in poisoned.text
    for answer, value in zip(answers, (1.0, 2.0, 3.0, 4.0)):  # the poisoned row's batch mates fail with it
        assert (answer.status_code, answer.json().get("prediction")) in ((200, value), (500, None))
    again = post_all(echo_server.url, [row(5.0), row(6.0), row(7.0), row(8.0)])
    assert [a.json()["prediction"] for a in again] == [5.0, 6.0, 7.0, 8.0]
    assert echo_server.worker_pids() == workers
    assert requests.get(echo_server.url + "/health", timeout=5).status_code == 200


@pytest.mark.server
def test_a_cache_hit_never_enters_a_batch(echo_server):
    cached = {"model_name": "echo", "features": [0, 42.0]}
    first = requests.post(echo_server.url + "/api/v1/predict", json=cached, timeout=30).json()
    before = batch_metrics(echo_server)
    second = requests.post(echo_server.url + "/api/v1/predict", json=cached, timeout=30).json()
    assert (first["from_cache"], second["from_cache"], second["prediction"]) == (False, "l1", 42.0)
    assert grew(before, batch_metrics(echo_server), "mlserve_batch_queue_wait_seconds_count") == 0


@pytest.mark.server
def test_the_models_endpoint_says_whether_and_why_a_model_batches(echo_server):
    echo = requests.get(echo_server.url + "/api/v1/models/echo", timeout=5).json()["batching"]
    assert (echo["enabled"], echo["max_batch_size"], echo["max_wait_ms"], echo["set_by"]) == (True, 4, 1000.0,
                                                                                              "models.yaml")
    iris = requests.get(echo_server.url + "/api/v1/models/iris_classifier", timeout=5).json()["batching"]
    assert (iris["enabled"], iris["set_by"]) == (False, "default")
    assert "under 1 ms" in iris["reason"] and 0 < iris["row_cost_ms"] < 1


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, demo_models):
    """One worker with API keys on, batching slow_model (it sleeps its first feature's
    seconds once per call); the Authorization headers of a key "caller" and of a key
    "limited" to one request a second."""
    root = tmp_path_factory.mktemp("batching-keys")
    models = root / "models"
    models.mkdir()
    slow_model.publish(models)
    (models / "iris_classifier").symlink_to(demo_models / "iris_classifier")
    config = root / "models.yaml"
    config.write_text("models:\n  slow_model: {batching: {enabled: true, max_batch_size: 4, max_wait_ms: 1000}}\n"
                      "  iris_classifier: {}\n")
    keys = KeyFile(root / "keys.json")
    caller, _ = keys.create("caller", ["predict", "read"])
    limited, _ = keys.create("limited", ["predict"], ["slow_model"], rate=1)
    env = {"MLSERVE_SECURITY_API_KEYS": "true", "MLSERVE_SECURITY_KEYS_FILE": str(keys.path)}
    with Server(models, workers=1, models_config=config, env=env) as running:
        yield running, {"caller": {"Authorization": f"Bearer {caller}"},
                        "limited": {"Authorization": f"Bearer {limited}"}}


def slow(sleep: float, value: float) -> dict:
    return {"model_name": "slow_model", "features": [sleep, value], "use_cache": False}


@pytest.mark.server
def test_a_batched_request_past_its_deadline_is_answered_504_and_the_worker_serves_on(keyed_server):
    server, keys = keyed_server
    workers = server.worker_pids()
    caller = keys["caller"]
    # Each of these calls sleeps a second, however the two are batched: the request
    # given 300 ms is answered 504 (its deadline passed in the queue, during its
    # own run, or while a shared run went on for the other), the other gets its row.
    patient, hurried = post_all(server.url, [slow(1.0, 1.0), slow(1.0, 2.0)],
                                headers=[caller, {**caller, "X-Request-Timeout": "300"}])
    assert patient.status_code == 200 and patient.json()["prediction"] == 1.0
    assert hurried.status_code == 504 and hurried.headers["Content-Type"].startswith("application/json")
    assert hurried.json()["error"] == {"timeout_ms": 300, "code": "deadline_exceeded",
                                       "message": "the model run did not finish within its deadline of 300 ms"}
    assert "Traceback" not in hurried.text
    before = batch_metrics(server, "slow_model", headers=caller)
    quick = requests.post(server.url + "/api/v1/predict", json=slow(0.0, 7.0), headers=caller, timeout=30)
    assert quick.status_code == 200 and quick.json()["prediction"] == 7.0
    assert grew(before, batch_metrics(server, "slow_model", headers=caller), "mlserve_batch_size_sum") == 1
    iris = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}
    assert requests.post(server.url + "/api/v1/predict", json=iris, headers=caller, timeout=30).json()["prediction"] == 0
    assert server.worker_pids() == workers


@pytest.mark.server
def test_batched_requests_need_a_key_and_keep_to_its_rate(keyed_server):
    server, keys = keyed_server
    missing = requests.post(server.url + "/api/v1/predict", json=slow(0.0, 1.0), timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    # One request a second for this key: of four sent at once, the first is served, the rest refused.
    answers = post_all(server.url, [slow(0.0, float(i)) for i in range(4)], headers=[keys["limited"]] * 4)
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 429 in statuses, statuses
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"rate_limited"}
    assert all(a.json()["prediction"] == float(i) for i, a in enumerate(answers) if a.status_code == 200)


@pytest.mark.server
def test_a_swap_under_load_fails_nothing_and_no_batch_mixes_versions(tmp_path):
    """v1 answers value, v2 value + 1000: an answer computed by the other version
    than the one it names would show."""
    models = tmp_path / "models"
    models.mkdir()
    batch_models.publish(models, 1, offset=0.0)
    batch_models.publish(models, 2, offset=1000.0)
    ModelRepository(models).record("echo", "publish", 2, "test", "", {"version": 1})
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  echo: {batching: {enabled: true, max_batch_size: 8, max_wait_ms: 5}}\n")
    env = {"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN}
    with Server(models, workers=2, models_config=config, env=env) as server:
        server.wait_for_workers(2)
        before = batch_metrics(server)
        with Load(server.url, payload=row(7.0), threads=12) as load:
            load.wait_for_answers(300)
            asked = time.monotonic()
            requests.post(f"{server.url}/api/v1/admin/models/echo/promote", json={"version": 2},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).raise_for_status()
            until(lambda: load.versions_since(time.monotonic() - 0.5) == {2}, timeout=60,
                  what="every worker answers with v2")
            settled = load.count()
            load.wait_for_answers(settled + 300)
        assert load.failures == []
        versions = {1: 7.0, 2: 1007.0}
        wrong = [a.body for a in load.answers if a.body["prediction"] != versions[a.body["model_version"]]]
        assert wrong == []
        assert {a.body["model_version"] for a in load.answers if a.at < asked} == {1}
        # Every answer was computed in a batch, by the version it names; both versions ran batches.
        assert grew(before, batch_metrics(server), "mlserve_batch_size_sum") == len(load.answers)
        for version in ("1", "2"):
            assert batch_metrics(server, version=version).get("mlserve_batch_size_count", 0) > 0
