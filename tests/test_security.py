"""API keys and rate limits on real servers: two hosts (two Gunicorn masters
with two workers each) sharing a repository and a Redis, keys issued and
revoked with the mlserve command, limits counted in Redis across every
worker and host, and no key material in any log."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.redis_server import RedisServer
from tests.server import Server
from tests.wait import until

pytestmark = pytest.mark.server
MLSERVE = Path(sys.executable).with_name("mlserve")
IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}
TOKEN = "hosts-admin-token"


def mlserve(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MLSERVE), *argv], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as running:
        yield running


@pytest.fixture(scope="module")
def hosts(demo_models, tmp_path_factory, redis):
    root = tmp_path_factory.mktemp("security")
    models = root / "models"
    import shutil

    shutil.copytree(demo_models, models)
    env = {"MLSERVE_SECURITY_API_KEYS": "true", "MLSERVE_REDIS_URL": redis.url, "MLSERVE_SERVER_ADMIN_TOKEN": TOKEN,
           "MLSERVE_RATE_LIMITING_ENABLED": "true", "MLSERVE_RATE_LIMITING_REQUESTS_PER_SECOND": "1000",
           "MLSERVE_RATE_LIMITING_BURST": "1000", "MLSERVE_PREDICTION_LOG_FILE": str(root / "predictions.jsonl"),
           "MLSERVE_MONITORING_ACCESS_LOG": "true", "MLSERVE_MONITORING_LOG_LEVEL": "debug"}
    with Server(models, workers=2, env=env) as a, Server(models, workers=2, env=env) as b:
        a.wait_for_workers(2)
        b.wait_for_workers(2)
        yield {"a": a, "b": b, "models": models, "env": {"MLSERVE_MODELS_DIR": str(models),
                                                           "MLSERVE_REDIS_URL": redis.url}, "root": root}


def statuses(urls: list[str], headers: dict, body: dict = IRIS, each: int = 4) -> list[int]:
    """One request per fresh connection (so every worker of every host answers some)."""
    return [requests.post(url + "/api/v1/predict", json=body, headers=headers, timeout=10).status_code
            for url in urls for _ in range(each)]


def test_a_key_made_with_the_cli_works_on_every_host_and_revoking_it_stops_it_everywhere(hosts):
    urls = [hosts["a"].url, hosts["b"].url]
    made = mlserve(hosts["env"], "keys", "create", "checkout", "--scope", "predict")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("mls_") and "it is shown only this once" in made.stderr
    auth = {"Authorization": f"Bearer {key}"}
    assert set(until(lambda: (s := statuses(urls, auth)) and set(s) == {200} and s, timeout=10)) == {200}
    assert set(statuses(urls, {})) == {401}
    listed = mlserve(hosts["env"], "keys", "list")
    assert "checkout" in listed.stdout and "active" in listed.stdout and key not in listed.stdout

    revoked = mlserve(hosts["env"], "keys", "revoke", "checkout")
    assert revoked.returncode == 0 and revoked.stdout.startswith("revoked key checkout")
    started = time.monotonic()
    until(lambda: set(statuses(urls, auth)) == {401}, timeout=10, what="the revoked key refused by every worker")
    print(f"\nrevoked key refused by every worker of both hosts after {time.monotonic() - started:.2f} s")


def test_keys_are_managed_remotely_with_the_admin_token(hosts):
    env = {**hosts["env"], "MLSERVE_URL": hosts["b"].url, "MLSERVE_API_KEY": TOKEN}
    made = mlserve(env, "keys", "create", "reports", "--scope", "read", "--models", "iris_classifier")
    assert made.returncode == 0, made.stderr
    auth = {"X-API-Key": made.stdout.strip()}
    listing = until(lambda: (r := requests.get(hosts["a"].url + "/api/v1/models", headers=auth, timeout=10))
                    .status_code == 200 and r, timeout=10)
    assert [m["name"] for m in listing.json()["models"]] == ["iris_classifier"]
    refused = requests.post(hosts["a"].url + "/api/v1/predict", json=IRIS, headers=auth, timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["message"] == \
        "the key 'reports' does not have the predict scope"
    wrong = mlserve({**env, "MLSERVE_API_KEY": "not-the-token"}, "keys", "list")
    assert wrong.returncode == 1 and wrong.stderr.startswith("mlserve: unauthorized:")
    assert mlserve(env, "keys", "revoke", "reports").returncode == 0


def test_a_key_rate_holds_across_every_worker_and_host(hosts):
    urls = [hosts["a"].url, hosts["b"].url]
    made = mlserve(hosts["env"], "keys", "create", "metered", "--scope", "predict", "--rate", "5")
    auth = {"Authorization": f"Bearer {made.stdout.strip()}"}
    until(lambda: requests.post(urls[0] + "/api/v1/predict", json=IRIS, headers=auth, timeout=10).status_code
          in (200, 429), timeout=10)
    time.sleep(1.1)  # the probe above spent part of this second's window
    started = time.monotonic()
    sent = statuses(urls, auth, each=10)  # 20 requests over 4 workers, usually well inside one second
    seconds = time.monotonic() - started
    # Counted per worker, 4 workers would take up to 20; shared, a 1 s moving window allows 5 per second begun.
    assert 1 <= sent.count(200) <= 5 * (int(seconds) + 1) and set(sent) == {200, 429}, (sent, seconds)
    refused = requests.post(urls[1] + "/api/v1/predict", json=IRIS, headers=auth, timeout=10)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_no_log_line_holds_a_key_or_its_hash(hosts):
    made = mlserve(hosts["env"], "keys", "create", "secretive", "--scope", "predict")
    key = made.stdout.strip()
    secret = key.rsplit("_", 1)[1]
    auth = {"Authorization": f"Bearer {key}"}
    until(lambda: requests.post(hosts["a"].url + "/api/v1/predict", json=IRIS, headers=auth, timeout=10)
          .status_code == 200, timeout=10)
    requests.post(hosts["a"].url + "/api/v1/predict", json=IRIS, headers={"Authorization": f"Bearer {key}x"}, timeout=10)
    requests.post(hosts["a"].url + "/api/v1/predict", json={"model_name": "nope"}, headers=auth, timeout=10)
    mlserve(hosts["env"], "keys", "revoke", "secretive")
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()
    logs = hosts["a"].log() + hosts["b"].log()
    assert "/api/v1/predict" in logs  # the access log is on: requests are logged
    predictions = until(lambda: (p := hosts["root"] / "predictions.jsonl").exists() and p.read_text(), timeout=10)
    for text in (logs, predictions, made.stderr):
        assert secret not in text and digest not in text
