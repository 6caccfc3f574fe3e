"""The V2 protocol against a real server (Gunicorn, pre-forked workers) with
the clients people use: Triton's tritonclient[http] and MLServer's request
shape sent as is. Nothing here knows our code: if these pass, a user of
those clients changes only the URL."""
from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.server import Server
from tests.wait import until

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]
TOKEN = "repository-secret"


def client_of(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=10)


@pytest.fixture(scope="module")
def triton_client(server):
    client = client_of(server)
    yield client
    client.close()


def matrix(rows, binary: bool = True) -> triton.InferInput:
    X = np.array(rows, dtype=np.float32)
    tensor = triton.InferInput("features", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    return tensor


@pytest.mark.server
def test_live_ready_and_model_ready(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("iris_classifier")
    assert triton_client.is_model_ready("iris_classifier", "1")
    assert not triton_client.is_model_ready("no_such_model")
    assert not triton_client.is_model_ready("iris_classifier", "9")


@pytest.mark.server
def test_server_and_model_metadata(triton_client):
    server = triton_client.get_server_metadata()
    assert server["name"] == "mlserve" and {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    meta = triton_client.get_model_metadata("iris_classifier")
    assert meta["name"] == "iris_classifier" and "1" in meta["versions"]
    assert meta["inputs"][0]["shape"] == [-1, 4] and meta["inputs"][0]["datatype"] == "FP32"
    assert meta["inputs"][0]["parameters"]["feature_names"] == ["sepal_length", "sepal_width", "petal_length",
                                                                "petal_width"]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert triton_client.get_model_metadata("iris_classifier", "1")["name"] == "iris_classifier"


@pytest.mark.server
def test_infer_with_binary_tensors_the_clients_default(triton_client):
    result = triton_client.infer("iris_classifier", [matrix([SETOSA, VIRGINICA])], request_id="b-1")
    assert result.get_response()["id"] == "b-1"
    assert result.as_numpy("label").tolist() == [0, 2]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 3) and np.allclose(probabilities.sum(axis=1), 1.0)
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])


@pytest.mark.server
def test_infer_with_json_tensors_and_one_json_output(triton_client):
    result = triton_client.infer("iris_classifier", [matrix([VIRGINICA], binary=False)], model_version="1",
                                 outputs=[triton.InferRequestedOutput("label", binary_data=False)])
    response = result.get_response()
    assert response["model_version"] == "1"
    assert response["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [1], "data": [2]}]


@pytest.mark.server
@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests(triton_client, compression):
    result = triton_client.infer("iris_classifier", [matrix([SETOSA, VIRGINICA])],
                                 request_compression_algorithm=compression)
    assert result.as_numpy("label").tolist() == [0, 2]


@pytest.mark.server
def test_per_feature_tensors_of_a_regressor(server, triton_client):
    rows = np.array([[0.03, 0.05, 0.06, 0.02, -0.04, -0.03, -0.04, 0.0, 0.02, -0.02]] * 2, dtype=np.float64)
    names = triton_client.get_model_metadata("diabetes_regressor")["inputs"][0]["parameters"]["feature_names"]
    inputs = []
    for i, name in enumerate(names):
        tensor = triton.InferInput(name, [2], "FP64")
        tensor.set_data_from_numpy(rows[:, i])
        inputs.append(tensor)
    values = triton_client.infer("diabetes_regressor", inputs).as_numpy("label")
    v1 = requests.post(f"{server.url}/api/v1/predict", timeout=10,
                       json={"model_name": "diabetes_regressor", "features": rows[0].tolist()}).json()
    assert values.dtype == np.float64 and values.tolist() == [v1["prediction"]] * 2


@pytest.mark.server
def test_a_wrong_shape_is_refused_with_a_message(triton_client):
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("iris_classifier", [matrix([SETOSA[:3]])])
    assert info.value.status() == "400"
    assert "takes the feature matrix as [N, 4]" in info.value.message()


@pytest.mark.server
def test_an_unknown_model_is_refused_with_a_message(triton_client):
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("no_such_model", [matrix([SETOSA])])
    assert info.value.status() == "404" and "no model named 'no_such_model'" in info.value.message()


@pytest.mark.server
def test_repository_needs_the_admin_token(triton_client):
    with pytest.raises(InferenceServerException) as info:
        triton_client.get_model_repository_index()
    assert info.value.status() == "403" and "admin API is off" in info.value.message()


@pytest.mark.server
def test_mlserver_request_shape_works_unchanged(server):
    """The body an MLServer user sends today, to the same path."""
    body = {"inputs": [{"name": "predict", "shape": [2, 4], "datatype": "FP64", "data": [SETOSA, VIRGINICA]}]}
    r = requests.post(f"{server.url}/v2/models/iris_classifier/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    label = next(o for o in r.json()["outputs"] if o["name"] == "label")
    assert (label["shape"], label["data"]) == ([2], [0, 2])
    flat = {"inputs": [{"name": "predict", "shape": [1, 4], "datatype": "FP64", "data": VIRGINICA}]}
    r = requests.post(f"{server.url}/v2/models/iris_classifier/infer", json=flat, timeout=10)
    assert next(o for o in r.json()["outputs"] if o["name"] == "label")["data"] == [2]


@pytest.fixture
def admin_server(fresh_models):
    with Server(fresh_models, workers=2, env={"MLSERVE_SERVER_ADMIN_TOKEN": TOKEN}) as running:
        yield running


@pytest.mark.server
def test_repository_index_unload_and_load(admin_server):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = client_of(admin_server)
    try:
        index = {e["name"]: e for e in client.get_model_repository_index(headers=headers)}
        assert index["iris_classifier"] == {"name": "iris_classifier", "version": "1", "state": "READY", "reason": ""}
        client.unload_model("iris_classifier", headers=headers)
        until(lambda: not client.is_model_ready("iris_classifier"), 30, what="iris_classifier unloaded")
        index = {e["name"]: e for e in client.get_model_repository_index(headers=headers)}
        assert (index["iris_classifier"]["state"], index["iris_classifier"]["reason"]) == ("UNAVAILABLE", "unloaded")
        assert client.is_server_ready()  # an unloaded model does not make the server unready
        with pytest.raises(InferenceServerException) as info:
            client.infer("iris_classifier", [matrix([SETOSA])])
        assert info.value.status() == "404"
        client.load_model("iris_classifier", headers=headers)
        until(lambda: client.is_model_ready("iris_classifier"), 30, what="iris_classifier loaded again")
        assert client.infer("iris_classifier", [matrix([VIRGINICA])]).as_numpy("label").tolist() == [2]
        with pytest.raises(InferenceServerException) as info:
            client.load_model("no_such_model", headers=headers)
        assert info.value.status() == "404"
    finally:
        client.close()
