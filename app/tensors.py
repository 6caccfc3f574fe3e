"""Open Inference Protocol (V2) tensors, free of any web framework: an
inference request's tensors, JSON or binary, read into the float32 feature
matrix a model sees; its answers written back as output tensors; a model
described as tensors (its metadata).

Binary tensor data (Triton's binary tensor data extension) is little-endian,
row-major and unpadded; BOOL is one byte, 0 or 1; BYTES is, per element, its
length as a 4-byte little-endian unsigned integer, then its bytes. A body
with binary data is the JSON object, Inference-Header-Content-Length bytes
long, then the binary tensors in the order the JSON lists them.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from itertools import chain
from math import isfinite, prod
from typing import Iterable, NamedTuple

import numpy as np
import orjson

from app.errors import BatchTooLarge, InvalidInput, InvalidJSON
from app.features import FLOAT32_MAX
from app.loader import LoadedModel

NUMPY_TYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
               "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
               "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DTYPES = {name: np.dtype(code) for name, code in NUMPY_TYPES.items()}
DATATYPES = (*DTYPES, "BYTES")
INTEGERS = frozenset(name for name in DTYPES if "INT" in name)
FLOATS = frozenset(("FP16", "FP32", "FP64"))
NUMBERS = FLOATS | INTEGERS
# What JSON data of each datatype may hold: (accepts the element's type, in words).
ELEMENTS = {**{name: (frozenset((int,)).__contains__, "whole numbers") for name in INTEGERS},
            **{name: (frozenset((int, float)).__contains__, "numbers") for name in FLOATS},
            "BOOL": (frozenset((bool,)).__contains__, "true or false"),
            "BYTES": (frozenset((str,)).__contains__, "strings")}
is_int = frozenset((int,)).__contains__
SMALL = 64  # elements: a matrix this small is checked in plain Python
MATRIX = "features"  # the feature matrix, as model metadata names it
LABEL, PROBABILITIES = "label", "probabilities"
MAX_DIMS = 8
BINARY_OUTPUT = "binary_data_output"
NO_BINARY = memoryview(b"")


# PERF: named tuples, not dataclasses: made several times a request, and a
# frozen dataclass costs a microsecond or more to build.
class Tensor(NamedTuple):
    """One input tensor; values flat in row-major order (an object array for BYTES)."""
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list  # a list of numbers for FP data sent as JSON


class RequestedOutput(NamedTuple):
    name: str
    binary: bool | None  # None: as the request's binary_data_output says


class InferRequest(NamedTuple):
    id: str | None
    parameters: dict
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output the model has

    @property
    def binary_output(self) -> bool:
        return self.parameters.get(BINARY_OUTPUT) is True


# --- reading a request ----------------------------------------------------

def read_request(model: LoadedModel, raw: bytes, header_length: int | None,
                 max_rows: int) -> tuple[InferRequest, np.ndarray]:
    """An inference request for model and the (N, n_features) float32 matrix
    from its inputs; InvalidInput/InvalidJSON/BatchTooLarge say what is wrong."""
    if header_length is None:
        body = json_object(raw)
        fast = small_json_request(model, body, max_rows)
        if fast is not None:
            return fast
        request = request_of(body, NO_BINARY)
    else:
        request = parse_request(raw, header_length)
    check_outputs(model, request)
    return request, feature_matrix(model, request.inputs, max_rows)


def small_json_request(model: LoadedModel, body: dict, max_rows: int) -> tuple[InferRequest, np.ndarray] | None:
    """PERF: the usual small request (one flat FP tensor of [N, n] finite
    numbers, no outputs asked for), read in a few steps; None for anything
    else, which the general path reads (and refuses, if it must)."""
    inputs, parameters, request_id = body.get("inputs"), body.get("parameters"), body.get("id")
    if (type(inputs) is not list or len(inputs) != 1 or "outputs" in body
            or not (request_id is None or type(request_id) is str)
            or not (parameters is None or (type(parameters) is dict
                                           and type(parameters.get(BINARY_OUTPUT, False)) is bool))):
        return None
    item = inputs[0]
    if type(item) is not dict or "parameters" in item:
        return None
    name, datatype, shape, data = item.get("name"), item.get("datatype"), item.get("shape"), item.get("data")
    n = model.n_features
    if (type(name) is not str or not name or name in model.feature_index or datatype not in FLOATS
            or type(shape) is not list or len(shape) != 2 or shape[1] != n or type(shape[0]) is not int
            or type(data) is not list or not 0 < len(data) <= SMALL or len(data) != shape[0] * n
            or not all(map(ELEMENTS["FP64"][0], map(type, data))) or not small_and_finite(data)):
        return None
    rows(model, shape[0], max_rows)
    tensor = Tensor(name, datatype, (shape[0], n), data)
    return (InferRequest(request_id, parameters or {}, [tensor], None),
            np.array(data, dtype=np.float32).reshape(tensor.shape))


def parse_request(raw: bytes, header_length: int | None = None) -> InferRequest:
    """An inference request body; header_length (Inference-Header-Content-Length)
    when binary tensor data follows the JSON. InvalidInput/InvalidJSON say what is wrong."""
    header, binary = split_body(raw, header_length)
    return request_of(json_object(header), binary)


def request_of(body: dict, binary: memoryview) -> InferRequest:
    inputs = body.get("inputs")
    if type(inputs) is not list or not inputs:
        raise InvalidInput("inputs must be a non-empty list of tensors, each with name, shape, datatype and data")
    data = BinaryData(binary)
    tensors = [read_input(item, i, data) for i, item in enumerate(inputs)]
    data.finish()
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        raise InvalidInput("id must be a string")
    parameters = parameters_of(body.get("parameters"), "parameters")
    if type(parameters.get(BINARY_OUTPUT, False)) is not bool:
        raise InvalidInput(f"parameters.{BINARY_OUTPUT} must be true or false")
    return InferRequest(request_id, parameters, tensors, requested_outputs(body.get("outputs")))


def split_body(raw: bytes, header_length: int | None) -> tuple[bytes | memoryview, memoryview]:
    if header_length is None:
        return raw, NO_BINARY
    if header_length > len(raw):
        raise InvalidInput(f"Inference-Header-Content-Length is {header_length}, but the body is {len(raw)} bytes")
    view = memoryview(raw)
    return view[:header_length], view[header_length:]


def json_object(header: bytes | memoryview) -> dict:
    try:
        body = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        if not bytes(header).strip():
            raise InvalidJSON("the request body is empty; expected a JSON inference request") from None
        raise InvalidJSON(f"the inference request is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise InvalidJSON("the inference request must be a JSON object")
    return body


def parameters_of(value, where) -> dict:
    if value is None:
        return {}
    if type(value) is not dict:
        raise InvalidInput(f"{where} must be an object")
    return value


class BinaryData:
    """The binary part of a body, handed out in the order the inputs claim it."""

    def __init__(self, view: memoryview):
        self.view, self.offset = view, 0

    def take(self, size: int, where) -> memoryview:
        left = len(self.view) - self.offset
        if size > left:
            raise InvalidInput(f"{where} has binary_data_size {size}, but only {left} bytes of binary data are left")
        self.offset += size
        return self.view[self.offset - size:self.offset]

    def finish(self) -> None:
        left = len(self.view) - self.offset
        if left:
            raise InvalidInput(f"the body has {left} bytes of binary data that no input claims with binary_data_size")


class Input:
    """Names an input in error messages; formatted only when there is one (PERF)."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __format__(self, spec: str) -> str:
        return f"input {self.name[:64]!r}"


def read_input(item, index: int, binary: BinaryData) -> Tensor:
    if type(item) is not dict:
        raise InvalidInput(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = item.get("name")
    if type(name) is not str or not name:
        raise InvalidInput(f"inputs[{index}].name must be a non-empty string")
    where = Input(name)
    datatype = item.get("datatype")
    if type(datatype) is not str or datatype not in DATATYPES:
        raise InvalidInput(f"{where}: datatype {str(datatype)[:20]!r} is not one of {', '.join(DATATYPES)}")
    shape = shape_of(item.get("shape"), where)
    parameters = item.get("parameters")
    if parameters is not None and type(parameters) is not dict:
        raise InvalidInput(f"{where}: parameters must be an object")
    size = parameters.get("binary_data_size") if parameters else None
    if size is None:
        if "data" not in item:
            raise InvalidInput(f"{where} has neither data nor parameters.binary_data_size")
        return Tensor(name, datatype, shape, from_json(item["data"], datatype, shape, where))
    if type(size) is not int or size < 0:
        raise InvalidInput(f"{where}: binary_data_size must be a whole number of bytes")
    if "data" in item:
        raise InvalidInput(f"{where} has both data and binary_data_size; send one")
    return Tensor(name, datatype, shape, from_binary(binary.take(size, where), datatype, shape, where))


def shape_of(shape, where) -> tuple[int, ...]:
    if (type(shape) is not list or not 1 <= len(shape) <= MAX_DIMS or not all(map(is_int, map(type, shape)))
            or min(shape) < 0 or max(shape) >= 2 ** 63):
        raise InvalidInput(f"{where}: shape must be a list of 1 to {MAX_DIMS} whole numbers >= 0, "
                           f"got {str(shape)[:60]}")
    return tuple(shape)


def from_binary(chunk: memoryview, datatype: str, shape: tuple[int, ...], where) -> np.ndarray:
    count = prod(shape)
    if datatype == "BYTES":
        return bytes_elements(chunk, count, where)
    dtype = DTYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(f"{where}: shape {list(shape)} of {datatype} is {count * dtype.itemsize} bytes, "
                           f"binary_data_size says {len(chunk)}")
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidInput(f"{where}: BOOL elements are bytes of value 0 or 1")
        return raw.view(np.bool_)
    return np.frombuffer(chunk, dtype=dtype)


def bytes_elements(chunk: memoryview, count: int, where) -> np.ndarray:
    items, offset, end = [], 0, len(chunk)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(f"{where}: BYTES element {len(items)} has a cut-off 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(f"{where}: BYTES element {len(items)} is {length} bytes, "
                               f"but only {end - offset} are left")
        items.append(bytes(chunk[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInput(f"{where}: the binary data holds {len(items)} BYTES elements; its shape has {count}")
    values = np.empty(count, dtype=object)
    values[:] = items
    return values


def from_json(data, datatype: str, shape: tuple[int, ...], where) -> np.ndarray | list:
    """Row-major values of JSON data. Floating-point data stays a list of
    numbers: feature_matrix() makes the model's matrix from it in one step."""
    if type(data) is not list:
        raise InvalidInput(f"{where}: data must be a list, flat or nested")
    expected, wanted = ELEMENTS[datatype]
    # PERF: flat data of the right type (the usual case) is checked in one pass.
    checked = all(map(expected, map(type, data)))
    flat = data if checked else flatten(data, where)
    count = prod(shape)
    if len(flat) != count:
        raise InvalidInput(f"{where}: shape {list(shape)} has {count} elements, data has {len(flat)}")
    if not checked and not all(map(expected, map(type, flat))):
        i = next(i for i, v in enumerate(flat) if not expected(type(v)))
        raise InvalidInput(f"{where}: {datatype} data must be {wanted}; element {i} is {str(flat[i])[:40]!r}")
    if datatype in FLOATS:
        return flat
    if datatype == "BYTES":
        values = np.empty(count, dtype=object)
        values[:] = [v.encode("utf-8", "surrogatepass") for v in flat]
        return values
    try:
        return np.array(flat, dtype=DTYPES[datatype])
    except OverflowError:
        raise InvalidInput(f"{where}: a value is out of range for {datatype}") from None


def flatten(data, where) -> list:
    """Row-major elements of flat or nested data."""
    if type(data) is not list:
        raise InvalidInput(f"{where}: data must be a list, flat or nested")
    flat = data
    for _ in range(MAX_DIMS):
        nested = [type(v) is list for v in flat]
        if not any(nested):
            return flat
        if not all(nested):
            raise InvalidInput(f"{where}: data mixes lists and values at one level")
        flat = list(chain.from_iterable(flat))
    raise InvalidInput(f"{where}: data is nested more than {MAX_DIMS} levels deep")


# --- what the model sees --------------------------------------------------

def feature_matrix(model: LoadedModel, inputs: list[Tensor], max_rows: int) -> np.ndarray:
    """The (N, n_features) float32 matrix: one [N, n] tensor (any name but a
    feature's), or one [N] or [N, 1] tensor per feature, named by feature name."""
    if len(inputs) == 1 and inputs[0].name not in model.feature_index:
        return matrix_input(model, inputs[0], max_rows)
    return per_feature(model, inputs, max_rows)


def matrix_input(model: LoadedModel, tensor: Tensor, max_rows: int) -> np.ndarray:
    n = model.n_features
    where = Input(tensor.name)
    if len(tensor.shape) != 2 or tensor.shape[1] != n:
        raise InvalidInput(f"{where} has shape {list(tensor.shape)}; {model.name} takes the feature matrix as "
                           f"[N, {n}] ({', '.join(model.feature_names)}), or one [N] tensor per feature "
                           "named by feature name")
    if tensor.datatype not in NUMBERS:
        raise InvalidInput(f"{where}: the feature matrix takes numbers (FP32, FP64, INT32, INT64, ...), "
                           f"not {tensor.datatype}")
    rows(model, tensor.shape[0], max_rows)
    values = tensor.values
    if type(values) is list:
        if len(values) <= SMALL and small_and_finite(values):
            # PERF: as v1 does for one row: no numpy call but the one that makes the matrix.
            return np.array(values, dtype=np.float32).reshape(tensor.shape)
        values = float32(values, model)
    return finite(np.asarray(values, dtype=np.float32).reshape(tensor.shape), model.feature_names)


def small_and_finite(values: list) -> bool:
    try:
        return all(map(isfinite, values)) and max(map(abs, values)) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


def float32(values: list, model: LoadedModel) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float32)
    except OverflowError:  # an int too large for any float
        raise InvalidInput(f"a value for {model.name} is not a finite number within float32 range") from None


def per_feature(model: LoadedModel, inputs: list[Tensor], max_rows: int) -> np.ndarray:
    names = [t.name for t in inputs]
    unknown = [n for n in names if n not in model.feature_index]
    missing = [n for n in model.feature_names if n not in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if unknown or missing or twice:
        parts = ([f"unknown input(s) {', '.join(repr(n[:64]) for n in unknown[:10])}"] if unknown else []) + \
                ([f"missing {', '.join(map(repr, missing[:10]))}"] if missing else []) + \
                ([f"{', '.join(map(repr, twice[:10]))} given twice"] if twice else [])
        raise InvalidInput(f"{'; '.join(parts)}: {model.name} takes one [N, {model.n_features}] tensor, "
                           f"or one [N] tensor for each of {', '.join(model.feature_names)}")
    n_rows = inputs[0].shape[0]
    for t in inputs:
        where = Input(t.name)
        if not (t.shape == (n_rows,) or t.shape == (n_rows, 1)):
            raise InvalidInput(f"{where} has shape {list(t.shape)}; one feature's tensor is [N] or [N, 1], "
                               f"with the same N for every feature ({inputs[0].name!r} has N = {n_rows})")
        if t.datatype == "BYTES":
            raise InvalidInput(f"{where}: features are numbers (FP32, FP64, INT32, INT64, BOOL), not BYTES")
    rows(model, n_rows, max_rows)
    X = np.empty((n_rows, model.n_features), dtype=np.float32)
    for t in inputs:
        X[:, model.feature_index[t.name]] = float32(t.values, model) if type(t.values) is list else t.values
    return finite(X, model.feature_names)


def rows(model: LoadedModel, n_rows: int, max_rows: int) -> None:
    if n_rows == 0:
        raise InvalidInput(f"the request has no rows; {model.name} needs at least one")
    if n_rows > max_rows:
        raise BatchTooLarge(f"the request has {n_rows} rows; at most {max_rows} are accepted")


def finite(X: np.ndarray, columns: list[str]) -> np.ndarray:
    # PERF: one vectorised check; catches NaN, +-Infinity and values beyond float32 range.
    if not np.isfinite(X).all():
        row, col = np.argwhere(~np.isfinite(X))[0]
        raise InvalidInput(f"row {row}, feature {col} ({columns[col][:64]}) is not a finite number "
                           "within float32 range")
    return X


# --- answers --------------------------------------------------------------

def requested_outputs(outputs) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if type(outputs) is not list:
        raise InvalidInput("outputs must be a list of {\"name\": ...} objects")
    wanted = []
    for i, item in enumerate(outputs):
        name = item.get("name") if type(item) is dict else None
        if type(name) is not str:
            raise InvalidInput(f"outputs[{i}] must be an object with a name")
        binary = parameters_of(item.get("parameters"), f"outputs[{i}].parameters").get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise InvalidInput(f"outputs[{i}].parameters.binary_data must be true or false")
        wanted.append(RequestedOutput(name, binary))
    return wanted


LABEL_OUTPUT = (RequestedOutput(LABEL, None),)
EVERY_OUTPUT = (RequestedOutput(LABEL, None), RequestedOutput(PROBABILITIES, None))


def output_names(model: LoadedModel) -> list[str]:
    return [LABEL, PROBABILITIES] if model.class_keys is not None else [LABEL]


def check_outputs(model: LoadedModel, request: InferRequest) -> None:
    """InvalidInput for an output the model does not have (before it runs)."""
    if not request.outputs:
        return
    names = output_names(model)
    asked = [o.name for o in request.outputs]
    for name in asked:
        if name not in names:
            raise InvalidInput(f"{model.name} has no output {name[:64]!r}; its outputs are {', '.join(names)}")
        if asked.count(name) > 1:
            raise InvalidInput(f"output {name!r} is asked for twice")


@lru_cache(maxsize=1024)
def label_datatype(model: LoadedModel) -> str:
    if model.task == "regression":
        return "FP64"
    kinds = {type(c) for c in model.classes} if model.classes is not None else {int}
    if kinds == {int}:
        return "INT64"
    if kinds == {bool}:
        return "BOOL"
    if kinds <= {int, float}:
        return "FP64"
    return "BYTES"


def answer(model: LoadedModel, request: InferRequest, labels: list, probabilities: list | None) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary outputs follow it (else None)."""
    parameters = request.parameters
    binary_default = parameters.get(BINARY_OUTPUT) is True if parameters else False
    tensors, blobs = [], []
    for name, binary in request.outputs or (EVERY_OUTPUT if probabilities else LABEL_OUTPUT):
        if name == LABEL:
            datatype, shape, values = label_datatype(model), [len(labels)], labels
        elif probabilities is None:
            raise InvalidInput(f"{model.name} v{model.version} gives no probabilities")
        else:
            datatype, shape, values = "FP64", [len(probabilities), len(model.class_keys)], probabilities
        if binary_default if binary is None else binary:
            blob = to_bytes(datatype, values)
            blobs.append(blob)
            tensors.append({"name": name, "datatype": datatype, "shape": shape,
                            "parameters": {"binary_data_size": len(blob)}})
            continue
        if len(shape) == 2:
            values = values[0] if len(values) == 1 else list(chain.from_iterable(values))
        elif datatype == "BYTES":
            values = [str(v) for v in values]
        tensors.append({"name": name, "datatype": datatype, "shape": shape, "data": values})
    body = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        body["id"] = request.id
    if parameters:
        passed = {k: v for k, v in parameters.items() if k != BINARY_OUTPUT}
        if passed:
            body["parameters"] = passed
    body["outputs"] = tensors
    head = orjson.dumps(body)
    if not blobs:
        return head, None
    return b"".join((head, *blobs)), len(head)


def to_bytes(datatype: str, values: Iterable) -> bytes:
    """Binary tensor data: little-endian, row-major; BYTES length-prefixed."""
    if datatype == "BYTES":
        encoded = [str(v).encode("utf-8") for v in values]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    return np.asarray(values, dtype=DTYPES[datatype]).tobytes()


# --- the model as tensors -------------------------------------------------

def model_metadata(model: LoadedModel, versions: list[int]) -> dict:
    """Model metadata: one [-1, n] FP32 input (the feature matrix, feature names
    in its parameters), a label output and, for classifiers, probabilities."""
    outputs = [{"name": LABEL, "datatype": label_datatype(model), "shape": [-1]}]
    if model.class_keys is not None:
        outputs.append({"name": PROBABILITIES, "datatype": "FP64", "shape": [-1, len(model.class_keys)],
                        "parameters": {"classes": model.classes}})
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": platform(model),
        "inputs": [{"name": MATRIX, "datatype": "FP32", "shape": [-1, model.n_features],
                    "parameters": {"feature_names": model.feature_names}}],
        "outputs": outputs,
        "parameters": {"version": str(model.version), "task": model.task, "runtime": model.runtime.name},
    }


def platform(model: LoadedModel) -> str:
    """<project>_<format>, as the protocol names platforms."""
    if model.runtime.name == "onnx":
        return "onnx_onnxv1"
    return f"sklearn_{model.metadata.get('source_format') or 'joblib'}"
