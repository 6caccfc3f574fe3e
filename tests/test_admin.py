"""The admin API in process (falcon.testing): each action checks, records and
asks the master to reload, through the signal passed in; refusals are JSON
errors that say why."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
from falcon import testing

from app import settings as settings_module
from app.cache import LRU, Generations, PredictionCache
from app.control import ControlChannel
from app.http.app import create_app
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.plan import read_plan
from app.registry import Registry
from app.reload import ReloadTrigger
from app.repository import ModelRepository

TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROW = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2]}


class Admin:
    """An app over a writable repository, with what it signalled recorded."""

    def __init__(self, models: Path, config: Path, token: str = TOKEN):
        self.models, self.signals = models, []
        settings = settings_module.load(environ={"MLSERVE_SERVER_ADMIN_TOKEN": token}, path=str(config) + ".absent")
        repository = ModelRepository(models)
        plan = functools.partial(read_plan, config)
        self.registry = Registry(repository, plan, 1e-5)
        self.registry.refresh()
        self.metrics = Metrics()
        self.cache = PredictionCache(LRU(100, 1 << 20, 60), None, Generations(16), self.metrics)
        reloads = ReloadTrigger(ControlChannel(""), "test-host", models.parent / "claims",
                                lambda: self.signals.append("SIGHUP"))
        self.client = testing.TestClient(create_app(
            settings, self.registry, self.metrics, cache=self.cache, lifecycle=Lifecycle(repository, 1e-5, plan),
            reloads=reloads))

    def post(self, path: str, body=None, headers=ADMIN):
        return self.client.simulate_post("/api/v1/admin/" + path, headers=headers,
                                         body=None if body is None else json.dumps(body))

    def serving_state(self) -> dict:
        return json.loads((self.models / "iris_classifier" / "serving.json").read_text())


@pytest.fixture
def two_versions(fresh_models) -> Path:
    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    return fresh_models


@pytest.fixture
def admin(two_versions, tmp_path) -> Admin:
    return Admin(two_versions, tmp_path / "models.yaml")


def test_promote_records_the_version_and_signals_the_master_once(admin):
    r = admin.post("models/iris_classifier/promote", {"version": 2, "reason": "better"})
    assert r.status_code == 200, r.text
    assert r.json["serving_version"] == 2 and r.json["previous_version"] == 1
    assert r.json["swap"] == {"this_host": "reloading", "other_hosts_notified": None}
    assert admin.signals == ["SIGHUP"]
    state = admin.serving_state()
    assert state["version"] == 2 and state["history"][-1]["reason"] == "better"
    assert state["history"][-1]["by"].startswith("admin-api@")


def test_rollback_split_shadow_and_reload(admin):
    admin.post("models/iris_classifier/promote", {"version": 2})
    assert admin.post("models/iris_classifier/rollback").json["serving_version"] == 1
    split = admin.post("models/iris_classifier/split", {"weights": {"1": 90, "2": 10}})
    assert split.status_code == 200 and split.json["split"] == {"1": 90.0, "2": 10.0}
    assert admin.post("models/iris_classifier/shadow", {"version": 2}).json["shadow_version"] == 2
    assert admin.post("models/iris_classifier/shadow", {"version": None}).json["shadow_version"] is None
    assert admin.post("models/iris_classifier/reload").status_code == 200
    assert len(admin.signals) == 6


def test_what_models_yaml_pins_is_refused_and_nothing_changes(two_versions, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  iris_classifier: {version: 1}\n")
    admin = Admin(two_versions, config)
    before = (two_versions / "iris_classifier" / "serving.json").read_text()
    r = admin.post("models/iris_classifier/promote", {"version": 2})
    assert r.status_code == 409
    assert r.json["error"]["code"] == "conflict" and f"pinned in {config}" in r.json["error"]["message"]
    assert admin.signals == [] and (two_versions / "iris_classifier" / "serving.json").read_text() == before


def test_refusals_keep_the_message_the_code_raised(admin):
    action = admin.post("models/iris_classifier/explode")
    assert action.status_code == 404
    assert action.json["error"] == {"code": "not_found",
                                    "message": "no admin action 'explode'; one of promote, rollback, split, "
                                               "shadow, reload"}
    model = admin.post("models/nope/promote", {"version": 1})
    assert model.status_code == 404 and model.json["error"]["code"] == "model_not_found"
    assert model.json["error"]["message"] == "no model named 'nope'" and "iris_classifier" in model.json["error"]["available"]
    version = admin.post("models/iris_classifier/promote", {"version": 7})
    assert version.status_code == 404 and version.json["error"]["message"] == "iris_classifier has no version 7"
    reason = admin.post("models/iris_classifier/rollback", {"reason": 5})
    assert reason.status_code == 422 and reason.json["error"]["message"] == "reason must be a string"
    broken = admin.client.simulate_post("/api/v1/admin/models/iris_classifier/reload", headers=ADMIN, body="{oops")
    assert broken.status_code == 400 and broken.json["error"]["code"] == "invalid_json"
    assert admin.signals == []


def test_the_token_is_required_and_the_api_is_off_without_one(two_versions, tmp_path):
    admin = Admin(two_versions, tmp_path / "models.yaml")
    missing = admin.post("models/iris_classifier/reload", headers={})
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json["error"]["message"]
    wrong = admin.post("models/iris_classifier/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json["error"]["message"] == "the admin token is not valid"
    off = Admin(two_versions, tmp_path / "models.yaml", token="")
    refused = off.post("models/iris_classifier/reload")
    assert refused.status_code == 403 and "server.admin_token" in refused.json["error"]["message"]
    assert admin.signals == [] and off.signals == []


def test_cache_invalidation_drops_one_models_entries(admin):
    predict = functools.partial(admin.client.simulate_post, "/api/v1/predict")
    wine_row = {"model_name": "wine_clusters", "features": [13.0, 2.0, 2.4, 19.0, 100.0, 2.5, 2.5, 0.3, 1.6,
                                                            5.0, 1.0, 3.0, 750.0]}
    for body in (ROW, wine_row):
        predict(json=body)
        assert predict(json=body).json["from_cache"] == "l1"
    r = admin.post("cache/invalidate", {"model_name": "iris_classifier"})
    assert r.status_code == 200 and r.json == {"invalidated": "iris_classifier", "l2_deleted": None,
                                               "workers_notified": None}
    assert predict(json=ROW).json["from_cache"] is False
    assert predict(json=wine_row).json["from_cache"] == "l1"
    assert admin.post("cache/invalidate", {"model_name": 3}).status_code == 422
    assert admin.post("cache/invalidate", {"model_name": "nope"}).status_code == 404
