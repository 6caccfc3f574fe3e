"""Generated requests against the v1 API in process (create_app around the
real demo models, driven through falcon.testing): any JSON value, bodies
shaped like real requests with every field mutated, bytes that are not JSON
or not UTF-8, any Content-Type, any model name in a URL, any key header.

Whatever is sent, the answer is 2xx or 4xx (a 504 only when the client asked
for a deadline itself), its body is JSON, an error has the API's shape
{"error": {"code", "message", ...}}, and no traceback shows in it. A fixed
example budget with a derandomized seed keeps `make test` deterministic.
"""
from __future__ import annotations

import json
from urllib.parse import quote

import orjson
import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.http.app import create_app
from app.keys import KeyFile, KeyStore
from app.metrics import Metrics
from tests.test_api import build_registry, make_settings

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PREDICT, BATCH = "/api/v1/predict", "/api/v1/batch_predict"
TRACEBACK = ("Traceback", 'File "')
# Names that must be refused, not looked up as paths.
PATH_LIKE = ["../x", "../../etc/passwd", "iris_classifier/../binary_classifier", "/etc/passwd", "..", ".",
             "iris_classifier/1", "iris_classifier\x00", "%2e%2e%2fx", "C:\\x", "~root", " iris_classifier "]

# --- strategies ---------------------------------------------------------------

# Every code point, lone surrogates included: json.dumps escapes them (\ud800),
# which a lenient JSON parser may let through.
# Half the time from pieces that break careless code: lone surrogates, NUL,
# non-characters, bidi overrides, path separators.
ODD = ["\ud800", "\udfff", "\x00", "\ufffe", "\u202e", "\n", "/", "..", "%", "\\", "\U0010ffff"]
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.one_of(st.text(any_char, max_size=20), st.lists(any_char | st.sampled_from(ODD), max_size=6).map("".join))
numbers = st.one_of(
    st.integers(min_value=-10, max_value=10), st.integers(), st.integers(min_value=-(2 ** 1100), max_value=2 ** 1100),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e39, -3.5e38, 3.4e38, 1e-45, -0.0, 2 ** 64]))
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(any_text, inner, max_size=6)), max_leaves=25)
latin1_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
content_types = st.one_of(st.none(), st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/octet-stream",
    "application/msgpack", "", "*/*"]), latin1_text)


def row_of(names: list[str]):
    """One row for a model with these feature names: right, wrong or odd."""
    width = len(names)
    good_numbers = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
    return st.one_of(
        st.lists(good_numbers, min_size=width, max_size=width),
        st.lists(numbers, min_size=width, max_size=width),
        st.lists(scalars, min_size=width, max_size=width),
        st.lists(numbers, max_size=width * 2 + 2),
        st.lists(json_values, max_size=width + 1),
        st.lists(st.lists(good_numbers, min_size=width, max_size=width), min_size=1, max_size=3),
        st.fixed_dictionaries({n: good_numbers for n in names}),
        st.fixed_dictionaries({}, optional={n: json_values for n in names}),
        st.dictionaries(st.sampled_from(names) | any_text, numbers | scalars, max_size=width + 2),
        json_values)


@st.composite
def request_bodies(draw, models: dict[str, list[str]], rows_field: str) -> dict:
    """A body shaped like a real predict (rows_field "features") or batch
    request ("features_batch"), every field possibly wrong or missing."""
    name = draw(st.sampled_from(sorted(models)))
    row = row_of(models[name])
    rows = st.one_of(st.lists(row, max_size=5), st.lists(row, min_size=1, max_size=2).map(lambda r: r * 300),
                     json_values)
    body = draw(st.fixed_dictionaries(
        {"model_name": st.one_of(st.just(name), st.just(name), st.sampled_from(PATH_LIKE), any_text, json_values)},
        optional={rows_field: row if rows_field == "features" else rows,
                  "version": st.one_of(st.integers(min_value=-2, max_value=3), json_values),
                  "use_cache": st.one_of(st.booleans(), json_values),
                  "routing_key": st.one_of(any_text, json_values)}))
    if draw(st.booleans()):
        body[rows_field] = draw(row if rows_field == "features" else rows)
    if draw(st.integers(0, 4)) == 0:
        body.update(draw(st.dictionaries(any_text | st.sampled_from(["features", "features_batch", "instances"]),
                                         json_values, min_size=1, max_size=3)))
    return body


def encoded(value) -> bytes:
    """JSON text as a client library would send it (NaN/Infinity as bare words)."""
    return json.dumps(value, allow_nan=True).encode("utf-8")


not_json_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b" ", b"\xff\xfe{}", b'{"model_name": "\xff"}', b"{'a': 1}", b"[1, 2", b"nul",
                     b'{"model_name": "iris_classifier", "features": [1, 2, 3, 4]', b"\x00" * 10,
                     b'{"a": 1}{"b": 2}', b'\xef\xbb\xbf{"model_name": "iris_classifier"}',
                     b'{"model_name": "\\ud800"}', b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000]),
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
extra_headers = st.fixed_dictionaries({}, optional={
    "X-Request-Timeout": st.one_of(latin1_text, st.integers(-5, 10 ** 12).map(str), st.sampled_from(["²", "1e3", " 5 "])),
    "X-Routing-Key": latin1_text,
    "Accept": st.sampled_from(["application/json", "text/html", "*/*", ""]),
})

# --- fixtures and checks --------------------------------------------------------


@pytest.fixture(scope="module")
def registry(demo_models):
    return build_registry(demo_models)


@pytest.fixture(scope="module")
def client(registry, tmp_path_factory) -> testing.TestClient:
    return testing.TestClient(create_app(make_settings(tmp_path_factory.mktemp("fuzz")), registry, Metrics()))


@pytest.fixture(scope="module")
def models(registry) -> dict[str, list[str]]:
    """Each demo model's feature names, as the requests are shaped after them."""
    return {name: list(model.feature_names) for name, model in registry.serving().items()}


def post(client, path: str, body: bytes, content_type: str | None, headers: dict | None = None):
    headers = dict(headers or {})
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.simulate_post(path, body=body, headers=headers)


def check(result, headers: dict | None = None) -> dict:
    """The properties every answer has; its decoded body."""
    text = result.content.decode("utf-8", "replace")
    asked_deadline = "X-Request-Timeout" in (headers or {})
    assert 200 <= result.status_code < 500 or (result.status_code == 504 and asked_deadline), \
        f"{result.status_code}: {text[:500]}"
    assert not any(marker in text for marker in TRACEBACK), text[:500]
    assert result.headers.get("content-type", "").startswith("application/json"), result.headers
    body = orjson.loads(result.content)
    assert type(body) is dict
    if result.status_code >= 400:
        error = body.get("error")
        assert type(error) is dict, body
        assert type(error.get("code")) is str and error["code"], body
        assert type(error.get("message")) is str and error["message"], body
        if result.status_code == 504:
            assert error["code"] == "deadline_exceeded", body
    return body


def check_prediction(result, headers: dict | None = None) -> None:
    body = check(result, headers)
    if result.status_code < 300:
        assert type(body["model_name"]) is str and type(body["model_version"]) is int, body


# --- the properties ---------------------------------------------------------------


@FUZZ
@given(value=json_values, path=st.sampled_from([PREDICT, BATCH]), content_type=content_types)
def test_any_json_value(client, value, path, content_type):
    check(post(client, path, encoded(value), content_type))


@FUZZ
@given(data=st.data(), content_type=content_types, headers=extra_headers)
def test_predict_shaped_bodies(client, models, data, content_type, headers):
    body = data.draw(request_bodies(models, "features"))
    check_prediction(post(client, PREDICT, encoded(body), content_type, headers), headers)


@FUZZ
@given(data=st.data(), content_type=content_types, headers=extra_headers)
def test_batch_shaped_bodies(client, models, data, content_type, headers):
    body = data.draw(request_bodies(models, "features_batch"))
    check_prediction(post(client, BATCH, encoded(body), content_type, headers), headers)


@FUZZ
@given(raw=not_json_bytes, path=st.sampled_from([PREDICT, BATCH]), content_type=content_types)
def test_bytes_that_are_not_json(client, raw, path, content_type):
    result = post(client, path, raw, content_type)
    check(result)
    assert result.status_code >= 400


@FUZZ
@given(name=st.one_of(any_text, st.sampled_from(PATH_LIKE)))
def test_model_by_any_name(client, models, name):
    result = client.simulate_get("/api/v1/models/" + quote(name.encode("utf-8", "surrogatepass"), safe=""))
    body = check(result)
    if result.status_code == 200:  # a served model by its exact name, or (no name) the listing
        assert body.get("name") == name and name in models or name == "" and "models" in body, (name, body)
    else:
        assert name not in models or name == "", (name, body)


@pytest.fixture(scope="module")
def keyed(registry, tmp_path_factory) -> tuple[testing.TestClient, str]:
    """An app with API keys on and one predict key for iris_classifier; (client, key)."""
    root = tmp_path_factory.mktemp("fuzz-keys")
    key_file = KeyFile(root / "keys.json")
    key, _ = key_file.create("fuzz", ["predict"], ["iris_classifier"])
    store = KeyStore(key_file.path)
    store.refresh(force=True)
    settings_ = make_settings(root, MLSERVE_SECURITY_API_KEYS="true", MLSERVE_SECURITY_KEYS_FILE=str(key_file.path))
    return testing.TestClient(create_app(settings_, registry, Metrics(), keys=store)), key


@FUZZ
@given(data=st.data(), credential=st.one_of(latin1_text, st.just("")), scheme=st.sampled_from(
    ["Bearer ", "bearer ", "Basic ", "", "Bearer  ", "X-API-Key"]))
def test_any_key_header(keyed, models, data, credential, scheme):
    client, key = keyed
    if data.draw(st.booleans()):
        credential = data.draw(st.sampled_from([key, key[:-1], key + "x", key.upper(), " " + key]))
    headers = {"X-API-Key": credential} if scheme == "X-API-Key" else {"Authorization": scheme + credential}
    body = data.draw(request_bodies(models, "features"))
    result = post(client, PREDICT, encoded(body), "application/json", headers)
    check_prediction(result)
    assert key not in result.content.decode("utf-8", "replace")


# --- what the fuzzing found, kept as named cases (also in tests/data/bad_requests) --

@pytest.mark.parametrize("body, headers, code", [
    pytest.param(b'{"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "\\ud800": 1}', {},
                 "invalid_json", id="escaped-lone-surrogate-field-name"),
    pytest.param(b'{"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2]}', {"X-Request-Timeout": "\u00b2"},
                 "invalid_header", id="request-timeout-superscript-digit"),
])
def test_found_by_fuzzing(client, body, headers, code):
    result = post(client, PREDICT, body, "application/json", headers)
    assert result.status_code == 400
    assert check(result, headers)["error"]["code"] == code
