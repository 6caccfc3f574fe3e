"""The prediction cache in a real multi-worker server, with a real Redis:
levels, TTLs, versions, invalidation across workers, and Redis failures."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import redis
import requests

from app.repository import ModelRepository
from tests.server import Server
from tests.wait import until

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def body(features=(5.1, 3.5, 1.4, 0.2), **extra):
    return {"model_name": "iris_classifier", "features": list(features), **extra}


def served(models, redis_url="", workers=2, **settings) -> Server:
    env = {"MLSERVE_REDIS_URL": redis_url, "MLSERVE_SERVER_ADMIN_TOKEN": TOKEN}
    env.update({f"MLSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return Server(models, workers=workers, env=env)  # started by `with`


@pytest.fixture
def no_l1():
    return {"cache_l1_max_entries": 0}


@pytest.mark.server
def test_second_request_is_an_l1_hit_and_use_cache_false_bypasses(demo_models):
    with served(demo_models) as server:
        s = requests.Session()  # one keep-alive connection: one worker
        first = s.post(server.url + "/api/v1/predict", json=body()).json()
        second = s.post(server.url + "/api/v1/predict", json=body()).json()
        bypass = s.post(server.url + "/api/v1/predict", json=body(use_cache=False)).json()
        assert (first["from_cache"], second["from_cache"], bypass["from_cache"]) == (False, "l1", False)
        for key in ("prediction", "probability", "probabilities", "model_version"):
            assert first[key] == second[key] == bypass[key]


@pytest.mark.server
def test_l2_hit_with_l1_off_and_values_stored_in_redis(demo_models, redis_server, no_l1):
    with served(demo_models, redis_server.url, **no_l1) as server:
        s = requests.Session()
        first = s.post(server.url + "/api/v1/predict", json=body()).json()
        keys = wait_for_keys(redis_server, "mlserve:p:iris_classifier:1:*", 1)
        second = s.post(server.url + "/api/v1/predict", json=body()).json()
        assert first["from_cache"] is False and second["from_cache"] == "l2"
        assert second["probabilities"] == first["probabilities"]
        stored = json.loads(redis_server.client().get(keys[0]))
        assert stored["prediction"] == first["prediction"]
        s.post(server.url + "/api/v1/predict", json=body((6.0, 3.0, 4.0, 1.0), use_cache=False))
        s.post(server.url + "/api/v1/predict", json=body((6.5, 3.0, 5.0, 1.8)))
        # Writes reach Redis in order: once the last row's key is there, so
        # would the use_cache false row's be.
        assert len(wait_for_keys(redis_server, "mlserve:p:*", 2)) == 2


@pytest.mark.server
def test_l1_ttl_expires(demo_models):
    with served(demo_models, cache_l1_ttl=0.5) as server:
        s = requests.Session()
        s.post(server.url + "/api/v1/predict", json=body())
        assert s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] == "l1"
        until(lambda: s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] is False,
              what="the L1 entry expires")


@pytest.mark.server
def test_l2_ttl_is_set_and_expires(demo_models, redis_server, no_l1):
    with served(demo_models, redis_server.url, redis_cache_ttl=1, **no_l1) as server:
        s = requests.Session()
        s.post(server.url + "/api/v1/predict", json=body())
        key = wait_for_keys(redis_server, "mlserve:p:*", 1)[0]
        assert 0 < redis_server.client().pttl(key) <= 1000
        assert s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] == "l2"
        until(lambda: redis_server.client().exists(key) == 0, what="Redis expires the entry")
        assert s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] is False


@pytest.mark.server
def test_a_new_version_never_answers_from_the_old_versions_cache(fresh_models, redis_server):
    with served(fresh_models, redis_server.url) as server:
        s = requests.Session()
        s.post(server.url + "/api/v1/predict", json=body())
        assert s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] == "l1"
    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    ModelRepository(fresh_models).record("iris_classifier", "promote", 2, "test", "", {"version": 2, "previous": 1})
    with served(fresh_models, redis_server.url) as server:
        s = requests.Session()
        fresh = s.post(server.url + "/api/v1/predict", json=body()).json()
        assert fresh["model_version"] == 2 and fresh["from_cache"] is False
        pinned = s.post(server.url + "/api/v1/predict", json=body(version=1)).json()
        assert pinned["model_version"] == 1 and pinned["from_cache"] == "l2"  # v1's entry, from Redis


@pytest.mark.server
def test_non_deterministic_models_are_never_cached(fresh_models):
    meta_path = fresh_models / "iris_classifier" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "deterministic": False}))
    with served(fresh_models) as server:
        s = requests.Session()
        answers = [s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] for _ in range(3)]
        assert answers == [False, False, False]


@pytest.mark.server
def test_batch_reads_and_writes_the_cache_per_row(demo_models, redis_server, no_l1):
    rows = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]]
    with served(demo_models, redis_server.url, **no_l1) as server:
        s = requests.Session()
        s.post(server.url + "/api/v1/predict", json=body(rows[1]))
        wait_for_keys(redis_server, "mlserve:p:*", 1)
        first = s.post(server.url + "/api/v1/batch_predict",
                       json={"model_name": "iris_classifier", "features_batch": rows}).json()
        assert first["predictions"] == [0, 1, 2] and first["cache_hits"] == {"l1": 0, "l2": 1}
        wait_for_keys(redis_server, "mlserve:p:*", 3)
        again = s.post(server.url + "/api/v1/batch_predict",
                       json={"model_name": "iris_classifier", "features_batch": rows}).json()
        assert again["cache_hits"] == {"l1": 0, "l2": 3}
        assert again["predictions"] == first["predictions"] and again["probabilities"] == first["probabilities"]


@pytest.mark.server
@pytest.mark.parametrize("with_redis", [False, True], ids=["local", "redis"])
def test_invalidation_reaches_every_worker(demo_models, redis_server, with_redis):
    url = redis_server.url if with_redis else ""
    with served(demo_models, url, workers=2) as server:
        # 16 connections spread over both workers, each with its own input,
        # so an answer shows what its own worker's L1 holds.
        sessions = [requests.Session() for _ in range(16)]
        for s in sessions:
            s.post(server.url + "/api/v1/predict", json=own_body(sessions, s))
        assert all_from(sessions, server, "l1")
        if with_redis:
            wait_for_keys(redis_server, "mlserve:p:iris_classifier:*", 1)
            wait_subscribed(server, redis_server, 2)
        answer = requests.post(server.url + "/api/v1/admin/cache/invalidate", headers=ADMIN,
                               json={"model_name": "iris_classifier"})
        assert answer.status_code == 200 and answer.json()["invalidated"] == "iris_classifier"
        if with_redis:
            assert answer.json()["l2_deleted"] >= 1 and answer.json()["workers_notified"] == 2
            assert redis_server.client().keys("mlserve:p:iris_classifier:*") == []
        # The workers of a host share the invalidation counters: no wait.
        assert all_from(sessions, server, False)


@pytest.mark.server
def test_admin_invalidate_needs_the_token(demo_models):
    with served(demo_models) as server:
        url = server.url + "/api/v1/admin/cache/invalidate"
        assert requests.post(url).status_code == 401
        wrong = requests.post(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        unknown = requests.post(url, headers=ADMIN, json={"model_name": "no_such_model"})
        assert unknown.status_code == 404


@pytest.mark.server
def test_predictions_survive_redis_going_down_and_caching_resumes(demo_models, redis_server, no_l1):
    settings = dict(cache_breaker_failures=3, cache_breaker_reset=0.5, **no_l1)
    with served(demo_models, redis_server.url, **settings) as server:
        failures, levels, stop = [], [], threading.Event()

        def load():
            s = requests.Session()
            while not stop.is_set():
                try:
                    r = s.post(server.url + "/api/v1/predict", json=body(), timeout=5)
                    if r.status_code != 200 or r.json()["prediction"] != 0:
                        failures.append(r.text)
                    levels.append((time.monotonic(), r.json()["from_cache"]))
                except requests.RequestException as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        until(lambda: sum(lvl == "l2" for _, lvl in levels) >= 20, what="L2 hits before Redis stops")
        redis_server.stop()
        down_at = time.monotonic()
        # Down until the breaker has opened and a few hundred requests were served meanwhile.
        until(lambda: 'mlserve_cache_breaker_transitions_total{state="open"}' in
              requests.get(server.url + "/metrics").text, what="the breaker opens")
        until(lambda: sum(t > down_at + 0.5 for t, _ in levels) >= 300, what="requests while Redis is down")
        restarting_at = time.monotonic()  # hits may resume before start() returns
        redis_server.start()
        up_at = time.monotonic()
        until(lambda: any(t > up_at + 0.1 and lvl == "l2" for t, lvl in levels[-50:]), what="L2 hits resume")
        stop.set()
        for t in threads:
            t.join()
        assert failures == []
        during = [lvl for t, lvl in levels if down_at + 0.5 < t < restarting_at]
        assert during and set(during) == {False}  # served, uncached, while Redis was down
        assert any(lvl == "l2" for t, lvl in levels if t > up_at)  # hits resume by themselves


@pytest.mark.server
def test_a_slow_redis_does_not_stall_predictions(demo_models, redis_server, no_l1):
    settings = dict(redis_socket_timeout=0.1, cache_breaker_failures=3, cache_breaker_reset=1, **no_l1)
    with served(demo_models, redis_server.url, **settings) as server:
        s = requests.Session()
        s.post(server.url + "/api/v1/predict", json=body())
        patient = redis.Redis.from_url(redis_server.url, socket_timeout=30)
        sleeper = threading.Thread(target=lambda: patient.execute_command("DEBUG", "SLEEP", 6))
        sleeper.start()
        until(lambda: not answers(redis_server), what="Redis is asleep")
        for i in range(40):
            r = s.post(server.url + "/api/v1/predict", json=body((5.0 + i / 10, 3.0, 1.5, 0.2)), timeout=10)
            assert r.status_code == 200
        # All 40 were answered while Redis still slept: none waited for it.
        assert sleeper.is_alive() and not answers(redis_server)
        sleeper.join()


def wait_for_keys(redis_server, pattern: str, count: int) -> list:
    def enough() -> list | None:
        keys = redis_server.client().keys(pattern)
        return keys if len(keys) >= count else None
    return until(enough, what=f"{count} keys matching {pattern} in Redis")


def wait_subscribed(server, redis_server, workers: int) -> None:
    until(lambda: redis_server.client().pubsub_numsub("mlserve:control")[0][1] >= workers,
          what=f"{workers} workers subscribed to the control channel")


def answers(redis_server) -> bool:
    """Whether Redis answers a PING at once."""
    try:
        return redis.Redis.from_url(redis_server.url, socket_timeout=0.05).ping()
    except redis.RedisError:
        return False


def own_body(sessions, s) -> dict:
    return body((5.0 + sessions.index(s) / 100, 3.5, 1.4, 0.2))


def all_from(sessions, server, level) -> bool:
    answers = [s.post(server.url + "/api/v1/predict", json=own_body(sessions, s)).json()["from_cache"]
               for s in sessions]
    return answers == [level] * len(sessions)


@pytest.mark.server
def test_invalidation_reaches_another_host_through_redis(demo_models, redis_server):
    # Two servers share nothing but Redis, as two hosts would.
    with served(demo_models, redis_server.url, workers=1) as a, served(demo_models, redis_server.url, workers=1) as b:
        sa, sb = requests.Session(), requests.Session()
        for s, server in ((sa, a), (sb, b)):
            s.post(server.url + "/api/v1/predict", json=body())
            assert s.post(server.url + "/api/v1/predict", json=body()).json()["from_cache"] == "l1"
        wait_subscribed(a, redis_server, 2)
        answer = requests.post(a.url + "/api/v1/admin/cache/invalidate", headers=ADMIN, json={})
        assert answer.json()["invalidated"] == "all" and answer.json()["workers_notified"] == 2
        # The other host's workers drop their entries when the message arrives.
        until(lambda: sb.post(b.url + "/api/v1/predict", json=body()).json()["from_cache"] is False,
              what="host b drops its cached entry")
