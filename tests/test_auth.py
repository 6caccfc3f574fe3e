"""Who may call what, in process (create_app with API keys on): 401 for a
missing or unknown key, 403 for a key without the scope or the model, the
admin token as an admin key, the probes open, and no key material in any
answer."""
from __future__ import annotations

import json

import pytest
from falcon import testing

from app.http.app import create_app
from app.keys import KeyFile, KeyStore
from app.metrics import Metrics
from tests.test_api import build_registry, make_settings

IRIS = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2]}
TOKEN = "the-admin-token"


@pytest.fixture(scope="module")
def registry(demo_models):
    return build_registry(demo_models)


class Keys:
    def __init__(self, tmp_path, registry, **env):
        self.file = KeyFile(tmp_path / "keys.json")
        settings = make_settings(tmp_path, MLSERVE_SECURITY_API_KEYS="true",
                                 MLSERVE_SECURITY_KEYS_FILE=str(self.file.path), MLSERVE_SERVER_ADMIN_TOKEN=TOKEN, **env)
        self.store = KeyStore(self.file.path)
        self.client = testing.TestClient(create_app(settings, registry, Metrics(), keys=self.store))

    def issue(self, name: str, *scopes: str, models=None, rate=None) -> dict:
        key, _ = self.file.create(name, list(scopes), models, rate)
        self.store.refresh(force=True)
        return {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, headers: dict | None = None, body=None):
        return self.client.simulate_request(method, path, headers=headers,
                                            body=None if body is None else json.dumps(body))


def message(r) -> str:
    """The error message, in the v1 shape or the V2 protocol's ({"error": "..."})."""
    error = r.json["error"]
    return error if isinstance(error, str) else error["message"]


@pytest.fixture
def keys(tmp_path, registry) -> Keys:
    return Keys(tmp_path, registry)


PREDICT = [("POST", "/api/v1/predict", IRIS),
           ("POST", "/api/v1/batch_predict", {"model_name": "iris_classifier", "features_batch": [IRIS["features"]]}),
           ("POST", "/v2/models/iris_classifier/infer",
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": IRIS["features"]}]})]
READ = [("GET", "/api/v1/models", None), ("GET", "/api/v1/models/iris_classifier", None),
        ("GET", "/metrics", None), ("GET", "/v2", None), ("GET", "/v2/models/iris_classifier", None),
        ("GET", "/v2/models/iris_classifier/ready", None), ("GET", "/openapi.json", None)]
ADMIN = [("GET", "/api/v1/admin/keys", None), ("POST", "/api/v1/admin/cache/invalidate", {})]


@pytest.mark.parametrize("method, path, body", PREDICT + READ + ADMIN)
def test_every_scoped_endpoint_needs_a_key(keys, method, path, body):
    missing = keys.call(method, path, body=body)
    assert missing.status_code == 401, missing.text
    assert path.startswith("/v2") or missing.json["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer <key> or X-API-Key: <key>" in message(missing)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    unknown = keys.call(method, path, {"Authorization": "Bearer mls_0123456789ab_" + "x" * 43}, body)
    assert unknown.status_code == 401 and message(unknown) == "the key is not valid (unknown or revoked)"
    assert "mls_0123456789ab" not in unknown.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/v2/health/live", "/v2/health/ready"])
def test_the_probes_need_no_key(keys, path):
    assert keys.call("GET", path).status_code == 200


def test_each_scope_opens_its_endpoints_only(keys):
    predict, read = keys.issue("p", "predict"), keys.issue("r", "read")
    for method, path, body in PREDICT:
        assert keys.call(method, path, predict, body).status_code == 200, path
        refused = keys.call(method, path, read, body)
        assert refused.status_code == 403 and message(refused) == "the key 'r' does not have the predict scope"
    for method, path, body in READ:
        assert keys.call(method, path, read, body).status_code == 200, path
        assert keys.call(method, path, predict, body).status_code == 403, path
    for method, path, body in ADMIN:
        assert keys.call(method, path, read, body).status_code == 403, path
        assert keys.call(method, path, predict, body).status_code == 403, path


def test_an_admin_key_and_the_admin_token_may_do_everything(keys):
    for credential in (keys.issue("ops", "admin"), {"Authorization": f"Bearer {TOKEN}"}, {"X-API-Key": TOKEN}):
        for method, path, body in PREDICT + READ + ADMIN:
            assert keys.call(method, path, credential, body).status_code == 200, (path, credential)


def test_x_api_key_is_accepted_as_well(keys):
    key = keys.issue("h", "predict")["Authorization"].split()[1]
    assert keys.call("POST", "/api/v1/predict", {"X-API-Key": key}, IRIS).status_code == 200
    assert keys.call("POST", "/api/v1/predict", {"Authorization": f"Basic {key}"}, IRIS).status_code == 401


def test_a_key_limited_to_models_may_use_only_those(keys):
    web = keys.issue("web", "predict", "read", models=["iris_classifier"])
    assert keys.call("POST", "/api/v1/predict", web, IRIS).status_code == 200
    other = keys.call("POST", "/api/v1/predict", web, {"model_name": "wine_clusters", "features": [0.0] * 13})
    assert other.status_code == 403 and other.json["error"]["message"] == "the key 'web' may not use the model 'wine_clusters'"
    batch = keys.call("POST", "/api/v1/batch_predict", web, {"model_name": "diabetes_regressor", "features_batch": [[0] * 10]})
    assert batch.status_code == 403
    assert keys.call("POST", "/v2/models/wine_clusters/infer", web, {"inputs": []}).status_code == 403
    assert keys.call("GET", "/api/v1/models/wine_clusters", web).status_code == 403
    assert keys.call("GET", "/v2/models/wine_clusters", web).status_code == 403
    assert [m["name"] for m in keys.call("GET", "/api/v1/models", web).json["models"]] == ["iris_classifier"]
    # A body without a usable model name is the predictor's 4xx, as without keys.
    assert keys.call("POST", "/api/v1/predict", web, {"features": [1]}).status_code == 400


def test_keys_are_managed_through_the_admin_api(keys):
    admin = keys.issue("ops", "admin")
    made = keys.call("POST", "/api/v1/admin/keys", admin, {"name": "svc", "scopes": ["predict"], "rate": 10})
    assert made.status_code == 201 and made.json["key"].startswith("mls_") and "sha256" not in made.json
    new = {"Authorization": f"Bearer {made.json['key']}"}
    assert keys.call("POST", "/api/v1/predict", new, IRIS).status_code == 200
    listed = keys.call("GET", "/api/v1/admin/keys", admin).json["keys"]
    assert [k["name"] for k in listed] == ["ops", "svc"] and all("sha256" not in k and "key" not in k for k in listed)
    revoked = keys.call("DELETE", "/api/v1/admin/keys/svc", admin)
    assert revoked.status_code == 200 and revoked.json["revoked"]
    keys.store.refresh(force=True)  # a worker's next look at the file (or the control message)
    assert keys.call("POST", "/api/v1/predict", new, IRIS).status_code == 401
    assert keys.call("DELETE", "/api/v1/admin/keys/svc", admin).status_code == 404


@pytest.mark.parametrize("body, code", [
    ({"name": "x"}, "missing_field"), ({"scopes": ["read"]}, "missing_field"),
    ({"name": "x", "scopes": ["root"]}, "invalid_field"), ({"name": "x", "scopes": ["read"], "owner": "me"}, "invalid_field"),
    ({"name": "x", "scopes": ["read"], "models": ["Bad Name"]}, "invalid_field"),
    ({"name": "x", "scopes": ["read"], "rate": "fast"}, "invalid_field"),
])
def test_bad_key_requests_are_4xx(keys, body, code):
    r = keys.call("POST", "/api/v1/admin/keys", {"X-API-Key": TOKEN}, body)
    assert 400 <= r.status_code < 500 and r.json["error"]["code"] == code


def test_a_key_with_a_rate_is_limited_to_it(keys):
    slow = keys.issue("slow", "predict", rate=3)
    statuses = [keys.call("POST", "/api/v1/predict", slow, IRIS).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert keys.call("POST", "/api/v1/predict", keys.issue("other", "predict"), IRIS).status_code == 200


def test_with_keys_off_only_the_admin_calls_need_the_token(tmp_path, registry):
    settings = make_settings(tmp_path, MLSERVE_SERVER_ADMIN_TOKEN=TOKEN)
    client = testing.TestClient(create_app(settings, registry, Metrics()))
    assert client.simulate_post("/api/v1/predict", json=IRIS).status_code == 200
    assert client.simulate_get("/metrics").status_code == 200
    assert client.simulate_get("/api/v1/admin/keys").status_code == 401
    assert client.simulate_get("/api/v1/admin/keys", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.simulate_get("/api/v1/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_unknown_paths_stay_404_with_keys_on(keys):
    assert keys.call("GET", "/nowhere").status_code == 404
