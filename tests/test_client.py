"""MLClient against a real server: every method, and every error a caller can catch."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from app.client import (ConnectionFailed, InvalidRequest, MLClient, MLServeError, NotFound, RateLimited,
                        ServerError)
from tests.server import Server, free_port

SETOSA, VERSICOLOR, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.3, 2.9, 6.3, 1.8]
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
DEMO = ["binary_classifier", "diabetes_regressor", "iris_classifier", "wine_clusters"]


@pytest.fixture(scope="module")
def limited_server(demo_models):
    """Rate limited to a burst of 2 requests per 2 seconds per client."""
    running = Server(demo_models, workers=1, env={"MLSERVE_RATE_LIMITING_ENABLED": "true",
                                                   "MLSERVE_RATE_LIMITING_REQUESTS_PER_SECOND": "1",
                                                   "MLSERVE_RATE_LIMITING_BURST": "2"})
    with running:
        yield running


@pytest.mark.server
def test_predict_returns_the_server_answer_and_the_round_trip(client):
    result = client.predict("iris_classifier", SETOSA, use_cache=False)
    assert result["prediction"] == 0
    assert result["model_name"] == "iris_classifier" and result["model_version"] == 1
    assert set(result["probabilities"]) == {"0", "1", "2"}
    assert result["probability"] == max(result["probabilities"].values())
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["from_cache"] is False
    assert result["timestamp"].endswith("Z")
    # The server's own latency is kept; the client adds the round trip, which includes it.
    assert 0 < result["latency_ms"] < result["client_latency_ms"]


@pytest.mark.server
def test_predict_by_feature_name_numpy_and_pinned_version_agree(client):
    by_list = client.predict("iris_classifier", VIRGINICA)
    by_name = client.predict("iris_classifier", dict(zip(IRIS_FEATURES, VIRGINICA)))
    by_array = client.predict("iris_classifier", np.array(VIRGINICA, dtype=np.float32))
    pinned = client.predict("iris_classifier", VIRGINICA, use_cache=False, version=1)
    assert by_list["prediction"] == by_name["prediction"] == by_array["prediction"] == pinned["prediction"] == 2
    assert by_list["probabilities"] == by_name["probabilities"] == pinned["probabilities"]
    assert pinned["model_version"] == 1


@pytest.mark.server
def test_batch_predict_matches_single_predictions(client):
    rows = [SETOSA, VERSICOLOR, VIRGINICA]
    batch = client.batch_predict("iris_classifier", rows)
    assert batch["predictions"] == [0, 1, 2]
    assert batch["count"] == 3 and batch["classes"] == [0, 1, 2]
    assert batch["model_name"] == "iris_classifier" and batch["model_version"] == 1
    assert batch["total_latency_ms"] > 0
    for row, probabilities in zip(rows, batch["probabilities"]):
        single = client.predict("iris_classifier", row)["probabilities"]
        assert probabilities == pytest.approx([single[str(c)] for c in batch["classes"]], abs=1e-6)
    assert client.batch_predict("iris_classifier", np.array(rows), version=1)["predictions"] == [0, 1, 2]


@pytest.mark.server
def test_batch_predict_for_a_regressor_has_values_and_no_probabilities(client):
    rows = [[0.01 * i] * 10 for i in range(4)]
    batch = client.batch_predict("diabetes_regressor", rows)
    assert batch["probabilities"] is None and batch["classes"] is None
    assert batch["predictions"] == pytest.approx([client.predict("diabetes_regressor", r)["prediction"] for r in rows])


@pytest.mark.server
def test_get_model_info_describes_the_serving_model(client):
    info = client.get_model_info("iris_classifier")
    assert info["name"] == "iris_classifier"
    assert info["features"] == IRIS_FEATURES
    assert info["classes"] == [0, 1, 2]
    assert info["task"] == "classification" and info["runtime"] == "onnx"
    assert info["serving_version"] == 1 and info["versions"] == [1] and info["status"] == "serving"


@pytest.mark.server
def test_list_models_names_every_demo_model(client):
    models = client.list_models()
    assert [m["name"] for m in models] == DEMO
    assert {m["name"]: m["task"] for m in models} == {
        "binary_classifier": "classification", "diabetes_regressor": "regression",
        "iris_classifier": "classification", "wine_clusters": "clustering"}
    assert all(m["status"] == "serving" for m in models)


@pytest.mark.server
def test_health_ready_and_metrics(client):
    health = client.health_check()
    assert health["status"] == "healthy" and health["models_serving"] == 4
    assert health["uptime_seconds"] >= 0
    assert client.ready() == {"status": "ready", "models": DEMO}
    client.predict("iris_classifier", SETOSA)
    metrics = client.get_metrics()
    assert 'mlserve_requests_total{endpoint="predict",model="iris_classifier"' in metrics


@pytest.mark.server
def test_unknown_model_is_not_found_with_the_server_code(client):
    for call in (lambda: client.predict("no_such_model", SETOSA),
                 lambda: client.batch_predict("no_such_model", [SETOSA]),
                 lambda: client.get_model_info("no_such_model")):
        with pytest.raises(NotFound) as caught:
            call()
        error = caught.value
        assert error.status == 404 and error.code == "model_not_found"
        assert error.message == "no model named 'no_such_model'"
        assert error.body["error"]["available"] == DEMO
        assert isinstance(error, MLServeError)


@pytest.mark.server
def test_unknown_version_is_not_found(client):
    with pytest.raises(NotFound) as caught:
        client.predict("iris_classifier", SETOSA, version=7)
    assert caught.value.code == "version_not_found"
    assert caught.value.body["error"]["available"] == [1]


@pytest.mark.server
def test_model_names_are_sent_verbatim_not_as_url_syntax(client):
    # Unquoted, "?" would start a query string and this would describe iris_classifier.
    with pytest.raises(NotFound) as caught:
        client.get_model_info("iris_classifier?version=1")
    assert caught.value.code == "model_not_found"
    assert caught.value.message == "no model named 'iris_classifier?version=1'"


@pytest.mark.server
def test_wrong_feature_count_is_invalid_features(client):
    with pytest.raises(InvalidRequest) as caught:
        client.predict("iris_classifier", [1.0, 2.0, 3.0])
    error = caught.value
    assert error.status == 422 and error.code == "invalid_features"
    assert "iris_classifier expects 4" in error.message
    assert error.body["error"]["expected"] == IRIS_FEATURES
    assert str(error) == f"HTTP 422 invalid_features: {error.message}"


@pytest.mark.server
def test_other_refused_requests_are_invalid_request(client):
    with pytest.raises(InvalidRequest) as caught:
        client.batch_predict("iris_classifier", [])
    assert (caught.value.status, caught.value.code) == (422, "invalid_field")
    with pytest.raises(InvalidRequest) as caught:
        client.predict("iris_classifier", {"sepal_length": 1.0})
    assert caught.value.code == "invalid_features" and "missing 'sepal_width'" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        client.predict("iris_classifier", [float("nan")] * 4)
    assert caught.value.code == "invalid_features"


@pytest.mark.server
def test_too_many_rows_is_invalid_request_413(degraded_server):
    with MLClient(degraded_server.url) as client:
        assert client.batch_predict("iris_classifier", [SETOSA] * 5)["count"] == 5
        with pytest.raises(InvalidRequest) as caught:
            client.batch_predict("iris_classifier", [SETOSA] * 6)
    assert (caught.value.status, caught.value.code) == (413, "batch_too_large")


@pytest.mark.server
def test_a_model_that_is_not_serving_is_a_server_error_and_not_ready(degraded_server):
    with MLClient(degraded_server.url) as client:
        with pytest.raises(ServerError) as caught:
            client.predict("ghost_model", [1.0])
        assert (caught.value.status, caught.value.code) == (503, "model_not_ready")
        assert client.ready() == {"status": "not_ready", "not_ready": {"ghost_model": "no versions in the repository"}}
        assert client.get_model_info("ghost_model")["status"] == "not_ready"
        assert client.predict("iris_classifier", SETOSA)["prediction"] == 0


@pytest.mark.server
def test_too_many_requests_is_rate_limited_with_retry_after(limited_server):
    with MLClient(limited_server.url) as client:
        with pytest.raises(RateLimited) as caught:
            for _ in range(3):
                client.get_model_info("iris_classifier")
    error = caught.value
    assert (error.status, error.code) == (429, "rate_limited")
    assert isinstance(error.retry_after, int) and 1 <= error.retry_after <= 2


def test_a_closed_port_is_connection_failed():
    port = free_port()
    with MLClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(ConnectionFailed) as caught:
            client.predict("iris_classifier", SETOSA)
    error = caught.value
    assert error.status is None and error.code == "connection_failed"
    assert error.message.startswith(f"cannot reach http://127.0.0.1:{port}: ")
    assert "Connection refused" in error.message


def test_a_server_that_never_answers_is_a_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with MLClient(url, timeout=0.2) as client:
            with pytest.raises(ConnectionFailed) as caught:
                client.health_check()
    assert caught.value.code == "timeout"
    assert "did not answer GET /health within 0.2 s" in caught.value.message


class ProxyPage(BaseHTTPRequestHandler):
    """What a reverse proxy sends when the server behind it is down: HTML, not our error JSON."""

    def do_GET(self):
        status, body = (200, b"<html>welcome</html>") if self.path == "/health" else (502, b"<html>Bad Gateway</html>")
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.server
def test_answers_not_from_mlserve_are_still_typed_errors():
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), ProxyPage)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with MLClient(f"http://127.0.0.1:{proxy.server_port}") as client:
            with pytest.raises(ServerError) as caught:
                client.list_models()
            assert (caught.value.status, caught.value.code) == (502, "http_502")
            assert caught.value.message == "<html>Bad Gateway</html>"
            with pytest.raises(MLServeError) as caught:
                client.health_check()
            assert caught.value.code == "invalid_response" and "text/html" in caught.value.message
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_base_url_that_is_not_http_is_refused_at_once():
    for url in ("localhost:8080", "ftp://host", "http://host:99999", "http://"):
        with pytest.raises(ValueError):
            MLClient(url)
    assert MLClient("http://127.0.0.1:8080/").base_url == "http://127.0.0.1:8080"


@pytest.mark.server
def test_the_client_installs_and_works_without_the_server(server, tmp_path):
    """pip install of the project without extras: the client and the commands
    that ask a running server, none of the server's dependencies."""
    import shutil
    import subprocess
    import venv

    from tests.server import ROOT

    source = tmp_path / "source"  # pip builds in the source tree: not in the checkout's
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "app"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)], check=True, timeout=600,
                   capture_output=True)
    script = ("import importlib.util, sys\n"
              "from app.client import MLClient\n"
              f"print(MLClient({server.url!r}).predict('iris_classifier', [5.1, 3.5, 1.4, 0.2])['prediction'])\n"
              "print([m for m in ('numpy', 'falcon', 'gunicorn', 'onnxruntime', 'sklearn', 'redis')"
              " if importlib.util.find_spec(m)])\n")
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["0", "[]"], done.stderr
    cli = subprocess.run([str(env_dir / "bin" / "mlserve"), "predict", "iris_classifier", "--features",
                          "5.1,3.5,1.4,0.2", "--url", server.url], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and '"prediction": 0' in cli.stdout, cli.stderr
    local = subprocess.run([str(env_dir / "bin" / "mlserve"), "models", "versions", "iris_classifier"],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 1 and "needs the server install (pip install 'mlserve[server]')" in local.stderr
