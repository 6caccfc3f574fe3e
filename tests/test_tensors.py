"""The V2 tensor codec on its own: JSON and binary tensors in, the feature
matrix a model sees, output tensors out (app/tensors.py imports no web framework)."""
from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from app import tensors
from app.errors import BatchTooLarge, InvalidInput, InvalidJSON
from app.loader import LoadedModel

IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


class NoRuntime:
    name = "onnx"


def model(classes=(0, 1, 2), task="classification", features=IRIS) -> LoadedModel:
    return LoadedModel("iris", 3, task, list(features), list(classes) if classes is not None else None,
                       NoRuntime(), {"source_format": "onnx"})


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + b"".join(blobs), len(head)


def matrix(body: dict, max_rows: int = 100, m: LoadedModel | None = None) -> np.ndarray:
    request = tensors.parse_request(orjson.dumps(body))
    return tensors.feature_matrix(m or model(), request.inputs, max_rows)


@pytest.mark.parametrize("data", [ROWS, [v for row in ROWS for v in row]], ids=["nested", "flat"])
@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_one_matrix_tensor_nested_or_flat(data, datatype):
    X = matrix({"inputs": [{"name": "predict", "shape": [2, 4], "datatype": datatype, "data": data}]})
    assert X.dtype == np.float32 and X.shape == (2, 4)
    assert np.array_equal(X, np.array(ROWS, dtype=np.float32))


def test_integer_matrix():
    X = matrix({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [5, 3, 1, 0]}]})
    assert X.tolist() == [[5.0, 3.0, 1.0, 0.0]]


def test_one_tensor_per_feature_in_any_order_and_shape_n_or_n_by_1():
    columns = list(zip(*ROWS))
    inputs = [{"name": name, "shape": [2] if i % 2 else [2, 1], "datatype": "FP64", "data": list(columns[i])}
              for i, name in enumerate(IRIS)]
    X = matrix({"inputs": inputs[::-1]})
    assert np.array_equal(X, np.array(ROWS, dtype=np.float32))


def test_bool_feature_reads_as_0_and_1():
    m = model(features=["smoker", "age"])
    X = matrix({"inputs": [{"name": "smoker", "shape": [2], "datatype": "BOOL", "data": [True, False]},
                           {"name": "age", "shape": [2], "datatype": "INT32", "data": [40, 31]}]}, m=m)
    assert X.tolist() == [[1.0, 40.0], [0.0, 31.0]]


def test_binary_fp32_matrix_and_int64_feature_tensors():
    X = np.array(ROWS, dtype="<f4")
    raw, length = binary_request({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                                              "parameters": {"binary_data_size": X.nbytes}}]}, X.tobytes())
    request = tensors.parse_request(raw, length)
    assert np.array_equal(tensors.feature_matrix(model(), request.inputs, 10), X)
    m = model(features=["a", "b"])
    a, b = np.array([1, 2], dtype="<i8"), np.array([True, False])
    raw, length = binary_request({"inputs": [
        {"name": "a", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": 16}},
        {"name": "b", "shape": [2, 1], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]},
        a.tobytes(), b.tobytes())
    request = tensors.parse_request(raw, length)
    assert tensors.feature_matrix(m, request.inputs, 10).tolist() == [[1.0, 1.0], [2.0, 0.0]]


def test_binary_bytes_tensor_is_length_prefixed():
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"\xff\x00c"))
    raw, length = binary_request({"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES",
                                              "parameters": {"binary_data_size": len(blob)}}]}, blob)
    assert tensors.parse_request(raw, length).inputs[0].values.tolist() == [b"ab", b"", b"\xff\x00c"]
    assert tensors.to_bytes("BYTES", ["ab", "", "é"]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9"


def test_json_and_binary_inputs_mix_in_one_request():
    m = model(features=["a", "b"])
    raw, length = binary_request({"inputs": [
        {"name": "a", "shape": [2], "datatype": "FP64", "data": [1.5, 2.5]},
        {"name": "b", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
        np.array([3, 4], dtype="<f4").tobytes())
    assert tensors.feature_matrix(m, tensors.parse_request(raw, length).inputs, 10).tolist() == [[1.5, 3.0], [2.5, 4.0]]


@pytest.mark.parametrize("header, blob, length_delta, message", [
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     b"\0" * 12, 0, "only 12 bytes of binary data are left"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     b"\0" * 20, 0, "4 bytes of binary data that no input claims"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 16}}]},
     b"\0" * 16, 0, "shape [1, 4] of FP64 is 32 bytes, binary_data_size says 16"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]},
     b"\x01\x07", 0, "BOOL elements are bytes of value 0 or 1"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
     b"\x09\0\0\0ab", 0, "is 9 bytes, but only 2 are left"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     b"\0" * 16, 10 ** 6, "Inference-Header-Content-Length is"),
])
def test_binary_framing_errors_say_what_does_not_add_up(header, blob, length_delta, message):
    raw, length = binary_request(header, blob)
    with pytest.raises(InvalidInput) as info:
        tensors.parse_request(raw, length + length_delta)
    assert message in info.value.message


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], "takes the feature matrix as [N, 4]"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}], "has 4 elements, data has 3"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, "3", 4]}], "element 2 is '3'"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, True, 4]}], "FP32 data must be numbers"),
    ([{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3.5, 4]}], "INT32 data must be whole numbers"),
    ([{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 2 ** 40, 4]}], "out of range for INT32"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 1e39, 4]}], "row 0, feature 2 (petal_length)"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], 3, 4]}], "mixes lists and values"),
    ([{"name": "x", "shape": [1, 4], "datatype": "BOOL", "data": [True] * 4}], "not BOOL"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP8", "data": [1] * 4}], "datatype 'FP8' is not one of"),
    ([{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": [1] * 4}], "shape must be a list"),
    ([{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}], "no rows"),
    ([{"name": "x", "shape": [1, 4], "datatype": "FP32"}], "neither data nor parameters.binary_data_size"),
    ([{"name": "sepal_length", "shape": [1], "datatype": "FP32", "data": [1]},
      {"name": "sepal_width", "shape": [1], "datatype": "FP32", "data": [1]}], "missing 'petal_length', 'petal_width'"),
    ([{"name": n, "shape": [2 if n == "petal_width" else 1], "datatype": "FP32", "data": [1] * (2 if n == "petal_width" else 1)}
      for n in IRIS], "with the same N for every feature"),
    ([{"name": n, "shape": [1], "datatype": "BYTES", "data": ["1"]} for n in IRIS], "not BYTES"),
])
def test_tensors_that_are_not_the_models_features(inputs, message):
    with pytest.raises(InvalidInput) as info:
        matrix({"inputs": inputs})
    assert message in info.value.message


def test_more_rows_than_allowed_is_413():
    with pytest.raises(BatchTooLarge):
        matrix({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": [1] * 12}]}, max_rows=2)


@pytest.mark.parametrize("raw, error", [(b"", InvalidJSON), (b"[1]", InvalidJSON), (b"{", InvalidJSON),
                                        (b'{"inputs": []}', InvalidInput), (b'{"inputs": [1]}', InvalidInput),
                                        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
                                         b' "id": 5}', InvalidInput)])
def test_bodies_that_are_not_inference_requests(raw, error):
    with pytest.raises(error):
        tensors.parse_request(raw)


def request(outputs=None, parameters=None, request_id=None) -> tensors.InferRequest:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    if outputs is not None:
        body["outputs"] = outputs
    if parameters is not None:
        body["parameters"] = parameters
    if request_id is not None:
        body["id"] = request_id
    return tensors.parse_request(orjson.dumps(body))


def test_answer_as_json_with_id_and_parameters_passed_through():
    body, length = tensors.answer(model(), request(parameters={"content_type": "np"}, request_id="r1"),
                                  [0, 2], [[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    assert length is None
    assert orjson.loads(body) == {
        "model_name": "iris", "model_version": "3", "id": "r1", "parameters": {"content_type": "np"},
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]},
                    {"name": "probabilities", "datatype": "FP64", "shape": [2, 3],
                     "data": [0.9, 0.1, 0.0, 0.0, 0.2, 0.8]}]}


def test_answer_binary_where_asked_per_output_or_for_all():
    probabilities = [[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]]
    body, length = tensors.answer(model(), request([{"name": "probabilities", "parameters": {"binary_data": True}},
                                                    {"name": "label"}]), [0, 2], probabilities)
    head = orjson.loads(body[:length])
    assert [o["name"] for o in head["outputs"]] == ["probabilities", "label"]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 48} and "data" not in head["outputs"][0]
    assert head["outputs"][1]["data"] == [0, 2]
    assert np.frombuffer(body[length:], "<f8").reshape(2, 3).tolist() == probabilities
    body, length = tensors.answer(model(), request(parameters={"binary_data_output": True}), [0, 2], probabilities)
    head = orjson.loads(body[:length])
    assert "parameters" not in head  # binary_data_output is the protocol's, not passed back
    assert np.frombuffer(body[length:length + 16], "<i8").tolist() == [0, 2]
    assert len(body) == length + 16 + 48


@pytest.mark.parametrize("classes, task, datatype", [
    ((0, 1, 2), "classification", "INT64"), (("setosa", "versicolor"), "classification", "BYTES"),
    ((False, True), "classification", "BOOL"), ((0.5, 1.5), "classification", "FP64"),
    (None, "regression", "FP64"), (None, "clustering", "INT64")])
def test_label_datatype_follows_the_classes(classes, task, datatype):
    assert tensors.label_datatype(model(classes, task)) == datatype


def test_outputs_the_model_does_not_have_are_refused_before_it_runs():
    with pytest.raises(InvalidInput, match="has no output 'scores'"):
        tensors.check_outputs(model(), request([{"name": "scores"}]))
    with pytest.raises(InvalidInput, match="has no output 'probabilities'"):
        tensors.check_outputs(model(None, "regression"), request([{"name": "probabilities"}]))


def test_metadata_names_the_matrix_its_features_and_the_outputs():
    meta = tensors.model_metadata(model(), [1, 3])
    assert meta["versions"] == ["1", "3"] and meta["platform"] == "onnx_onnxv1"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4],
                               "parameters": {"feature_names": IRIS}}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == \
        [("label", "INT64", [-1]), ("probabilities", "FP64", [-1, 3])]


@pytest.mark.parametrize("body", [
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]},
    {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6, 7, 8]}], "id": "a",
     "parameters": {"use_cache": False}},
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]},
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
     "outputs": [{"name": "label"}]},
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]},
], ids=["one-row", "two-rows-id-parameters", "nested", "outputs", "int32"])
def test_read_request_matches_parse_then_feature_matrix(body):
    """read_request's shortcut for small JSON requests gives what the general path gives."""
    raw = orjson.dumps(body)
    request, X = tensors.read_request(model(), raw, None, 100)
    general = tensors.parse_request(raw)
    assert (request.id, request.parameters, request.outputs) == (general.id, general.parameters, general.outputs)
    assert np.array_equal(X, tensors.feature_matrix(model(), general.inputs, 100)) and X.dtype == np.float32


@pytest.mark.parametrize("body, error, message", [
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 1e39, 4]}]}, InvalidInput,
     "row 0, feature 2 (petal_length)"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}], "id": 3}, InvalidInput,
     "id must be a string"),
    ({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": [1] * 12}]}, BatchTooLarge, "at most 2"),
])
def test_read_request_refuses_what_the_general_path_refuses(body, error, message):
    with pytest.raises(error) as info:
        tensors.read_request(model(), orjson.dumps(body), None, 2)
    assert message in info.value.message
