"""Publishing over HTTP, as a CI pipeline does: an ONNX or skops artifact
uploaded in parts to the admin API (never a pickle), checked like any
publish, optionally promoted; with hosts sharing a repository and Redis,
one publish reaches them all."""
from __future__ import annotations

import hashlib
import io

import pytest
import requests
import skops.io

from app import cli
from app.errors import BodyTooLarge, Conflict, NotFound
from app.uploads import PART_BYTES, UploadStore
from tests.models import fit, read_metadata
from tests.server import Server
from tests.wait import until

TOKEN = "upload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_parts_must_follow_on_and_stay_within_the_limits(tmp_path):
    store = UploadStore(tmp_path, max_bytes=100)
    upload = store.create()
    assert store.append(upload, 0, io.BytesIO(b"x" * 60), 60) == 60
    with pytest.raises(Conflict, match="has 60 bytes; a part at offset 0 does not follow on"):
        store.append(upload, 0, io.BytesIO(b"y" * 10), 10)
    with pytest.raises(BodyTooLarge, match="models.max_upload_bytes"):
        store.append(upload, 60, io.BytesIO(b"z" * 50), None)
    assert store.data(upload).read_bytes() == b"x" * 60  # the refused part left nothing behind
    with pytest.raises(BodyTooLarge, match=f"a part is at most {PART_BYTES} bytes"):
        store.append(upload, 60, io.BytesIO(b""), PART_BYTES + 1)
    for bad in ("../../etc", "0" * 31, upload.upper()):
        with pytest.raises(NotFound):
            store.data(bad)


@pytest.fixture(scope="module")
def hosts(demo_models, tmp_path_factory):
    """Two hosts sharing one repository and one Redis."""
    import shutil

    from tests.redis_server import RedisServer

    models = tmp_path_factory.mktemp("shared") / "models"
    shutil.copytree(demo_models, models)
    env = {"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN}
    with RedisServer() as redis_server:
        env["MLSERVE_REDIS_URL"] = redis_server.url
        with Server(models, workers=2, env=env) as a, Server(models, workers=2, env=env) as b:
            yield a, b, models


def serving(server: Server, name: str):
    return requests.get(f"{server.url}/api/v1/models/{name}", timeout=10).json().get("serving_version")


@pytest.mark.server
def test_a_cli_publish_over_http_reaches_every_host(hosts, capsys, monkeypatch):
    a, b, models = hosts
    onnx = models / "iris_classifier" / "1" / "model.onnx"
    monkeypatch.setenv("MLSERVE_SERVER_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("MLSERVE_MODELS_DIR", "/nonexistent")  # nothing is written here: the server publishes
    assert cli.main(["models", "publish", str(onnx), "--name", "iris_classifier", "--url", a.url, "--promote",
                     "--reason", "from CI"]) == 0
    out = capsys.readouterr().out
    assert f"published iris_classifier v2 (onnx) on {a.url}, serving" in out
    until(lambda: serving(a, "iris_classifier") == 2 and serving(b, "iris_classifier") == 2, timeout=30,
          what="both hosts serve the uploaded version")
    meta = read_metadata(models / "iris_classifier" / "2")
    assert meta["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest() and meta["source_format"] == "onnx"
    answer = requests.post(f"{b.url}/api/v1/predict", timeout=10,
                           json={"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2]}).json()
    assert answer["model_version"] == 2 and answer["prediction"] == 0
    assert not list((models / ".uploads").iterdir())  # published uploads are removed


@pytest.mark.server
def test_a_skops_forest_upload_serves_on_onnx_and_a_skops_model_that_cannot_is_refused(hosts, tmp_path):
    from app.client import MLClient, InvalidRequest

    a, b, models = hosts
    fitted = fit("random_forest")
    path = tmp_path / "forest.skops"
    skops.io.dump(fitted.estimator, path)
    with MLClient(a.url, api_key=TOKEN) as client:
        with pytest.raises(InvalidRequest, match="not trusted: sklearn.tree._tree.Tree"):
            client.publish_artifact("uploaded_forest", path, "skops")
        answer = client.publish_artifact("uploaded_forest", path, "skops",
                                         {"trusted_types": ["sklearn.tree._tree.Tree"],
                                          "reference_sample": fitted.X_test[:20].tolist()})
        assert answer["version"] == 1 and answer["runtime"] == "onnx"
        from sklearn.cluster import DBSCAN

        skops.io.dump(DBSCAN().fit(fitted.X_train), tmp_path / "dbscan.skops")
        with pytest.raises(InvalidRequest, match="must convert to a verified ONNX graph"):
            client.publish_artifact("uploaded_dbscan", tmp_path / "dbscan.skops", "skops")
    assert not (models / "uploaded_dbscan").exists() or not list((models / "uploaded_dbscan").glob("[0-9]*"))
    until(lambda: serving(b, "uploaded_forest") == 1, timeout=30, what="the other host serves the new model")
    rows = fitted.X_test[:10].tolist()
    answer = requests.post(f"{b.url}/api/v1/batch_predict", timeout=10,
                           json={"model_name": "uploaded_forest", "features_batch": rows}).json()
    assert answer["predictions"] == fitted.estimator.predict(fitted.X_test[:10]).tolist()


@pytest.mark.server
def test_bad_uploads_get_a_clear_4xx_and_leave_the_server_healthy(hosts):
    a, _, models = hosts
    url = a.url + "/api/v1/admin"
    assert requests.post(f"{url}/uploads", timeout=10).status_code == 401
    assert requests.post(f"{url}/uploads", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    upload = requests.post(f"{url}/uploads", headers=AUTH, timeout=10).json()["upload_id"]
    data = (models / "iris_classifier" / "1" / "model.onnx").read_bytes()

    def part(offset, body, **headers):
        return requests.patch(f"{url}/uploads/{upload}", data=body, timeout=30,
                              headers={**AUTH, "Upload-Offset": str(offset), **headers})

    assert part(0, data).json()["offset"] == len(data)
    late = part(0, data)
    assert late.status_code == 409 and late.json()["error"]["offset"] == len(data)
    assert requests.patch(f"{url}/uploads/{upload}", data=b"x", headers=AUTH, timeout=10).status_code == 422
    huge = part(len(data), b"\0" * (PART_BYTES + 1))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    for bad_id in ("..%2F..%2Fetc", "0" * 32):
        assert requests.patch(f"{url}/uploads/{bad_id}", data=b"x", timeout=10,
                              headers={**AUTH, "Upload-Offset": "0"}).status_code == 404

    def publish(**body):
        return requests.post(f"{url}/models/iris_classifier/versions", json=body, headers=AUTH, timeout=60)

    refusals = [
        (publish(upload=upload, format="joblib"), 422, "invalid_field", "a pickle is never loaded from the network"),
        (publish(format="onnx"), 400, "missing_field", "upload"),
        (publish(upload=upload, format="onnx", sha256="0" * 64), 422, "model_refused", "the client sent 000000000000"),
        (publish(upload=upload, format="onnx", features=["a", "b"]), 422, "model_refused", "2 feature names given"),
        (publish(upload=upload, format="onnx", promote="yes"), 422, "invalid_field", "promote"),
        (publish(upload="f" * 32, format="onnx"), 404, "not_found", "no upload"),
    ]
    for response, status, code, message in refusals:
        error = response.json()["error"]
        assert (response.status_code, error["code"]) == (status, code) and message in error["message"], error
    wrong = requests.post(f"{url}/uploads", headers=AUTH, timeout=10).json()["upload_id"]
    requests.patch(f"{url}/uploads/{wrong}", data=b"not an onnx graph", timeout=10,
                   headers={**AUTH, "Upload-Offset": "0"}).raise_for_status()
    response = requests.post(f"{url}/models/iris_classifier/versions", json={"upload": wrong, "format": "onnx"},
                             headers=AUTH, timeout=60)
    assert response.status_code == 422 and "not a loadable ONNX model" in response.json()["error"]["message"]
    assert requests.get(a.url + "/ready", timeout=10).status_code == 200
    assert requests.delete(f"{url}/uploads/{upload}", headers=AUTH, timeout=10).json()["removed"] is True
