"""Bad requests against the real server (Gunicorn, pre-forked workers), one
table row per file in tests/data/bad_requests/.

Each file is one JSON object:

    description   what is wrong with the request
    method, path  the request line (path is sent as written: percent-encode it)
    headers       optional extra headers; a Content-Length here is sent as is,
                  even when it does not match the body
    body          at most one of:
                    json        a JSON value, sent serialized as UTF-8
                    text        a string sent exactly as written (UTF-8)
                    bytes_hex   raw bytes, hex-encoded (for bodies that are not UTF-8)
                    text_parts  [[text, times], ...] concatenated (for large bodies)
                  no body key: no body
    chunked       optional, true: send the body with Transfer-Encoding: chunked
    expect        {"status": int, "code": str}: the HTTP status and error.code; or
                  {"status": int, "layer": "http"} for requests the HTTP server
                  itself refuses before the app runs (status only)

Requests go over a plain socket so a malformed body reaches the server exactly
as the file describes it. Every answer must be a JSON error in the API's shape,
and no worker may die on any of them (checked after the whole table).
"""
from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest
import requests

CASES_DIR = Path(__file__).parent / "data" / "bad_requests"
BODY_KEYS = ("json", "text", "bytes_hex", "text_parts")
CASE_KEYS = {"description", "method", "path", "headers", "chunked", "expect", *BODY_KEYS}
RESPONSE_TIMEOUT = 10.0
WORKERS = 2


def load_case(path: Path) -> dict:
    case = json.loads(path.read_text())
    problems = []
    if not isinstance(case, dict):
        raise ValueError(f"{path.name}: expected a JSON object")
    problems += [f"unknown key {k!r}" for k in case if k not in CASE_KEYS]
    problems += [f"missing {k!r}" for k in ("description", "method", "path", "expect") if k not in case]
    if sum(k in case for k in BODY_KEYS) > 1:
        problems.append(f"more than one of {', '.join(BODY_KEYS)}")
    expect = case.get("expect")
    http_layer = isinstance(expect, dict) and expect.get("layer") == "http"
    if not (isinstance(expect, dict) and type(expect.get("status")) is int
            and (isinstance(expect.get("code"), str) or http_layer)):
        problems.append("expect must be {\"status\": int, \"code\": str} or {\"status\": int, \"layer\": \"http\"}")
    if problems:
        raise ValueError(f"{path.name}: {'; '.join(problems)}")
    return case


CASE_FILES = sorted(CASES_DIR.glob("*.json"))
CASES = {path.stem: load_case(path) for path in CASE_FILES}


def body_of(case: dict) -> bytes | None:
    if "json" in case:
        return json.dumps(case["json"], ensure_ascii=False).encode("utf-8")
    if "text" in case:
        return case["text"].encode("utf-8")
    if "bytes_hex" in case:
        return bytes.fromhex(case["bytes_hex"])
    if "text_parts" in case:
        return "".join(text * times for text, times in case["text_parts"]).encode("utf-8")
    return None


def chunked(body: bytes, size: int = 65536) -> bytes:
    pieces = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\n\r\n"


def raw_request(port: int, case: dict) -> bytes:
    body = body_of(case)
    headers = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/json"
        if case.get("chunked"):
            headers["Transfer-Encoding"] = "chunked"
            body = chunked(body)
        else:
            headers["Content-Length"] = str(len(body))
    for name, value in (case.get("headers") or {}).items():
        for existing in [h for h in headers if h.lower() == name.lower()]:
            del headers[existing]
        headers[name] = value
    head = f"{case['method']} {case['path']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + (body or b"")


def exchange(port: int, case: dict) -> tuple[int, dict, bytes]:
    """Send the request as raw bytes; (status, lower-cased headers, body)."""
    data = raw_request(port, case)
    with socket.create_connection(("127.0.0.1", port), timeout=RESPONSE_TIMEOUT) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading all of a refused body
        response = http.client.HTTPResponse(sock, method=case["method"])
        try:
            response.begin()
            body = response.read()
        except (TimeoutError, socket.timeout):
            pytest.fail(f"no response within {RESPONSE_TIMEOUT} s to {case['method']} {case['path'][:100]} "
                        f"({case['description']})")
        except (ConnectionError, http.client.HTTPException) as exc:
            pytest.fail(f"connection failed instead of an HTTP response: {exc!r} ({case['description']})")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest.fixture(scope="module")
def workers_before(server) -> list[int]:
    """The worker pids once every worker has booted, before the table runs."""
    server.wait_for_workers(WORKERS)
    return sorted(server.worker_pids())


def test_table_is_large_and_covers_every_client_error():
    assert len(CASES) >= 45
    codes = {case["expect"].get("code") for case in CASES.values()}
    assert codes >= {"invalid_json", "missing_field", "invalid_field", "invalid_features", "body_too_large",
                     "batch_too_large", "model_not_found", "version_not_found", "method_not_allowed", "not_found"}


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_request(server, workers_before, name):
    case = CASES[name]
    status, headers, body = exchange(server.port, case)
    expected = case["expect"]
    seen = f"{case['description']}: got {status} {headers.get('content-type')!r} {body[:300]!r}"
    assert b"Traceback" not in body and b'File "' not in body, seen
    assert status == expected["status"], seen
    if expected.get("layer") == "http":
        # Refused by the HTTP server (meinheld) before the app sees it: status only.
        return
    assert headers.get("content-type", "").split(";")[0].strip() == "application/json", seen
    try:
        payload = json.loads(body)
    except ValueError:
        pytest.fail(f"body is not JSON: {seen}")
    error = payload.get("error") if isinstance(payload, dict) else None
    assert isinstance(error, dict), seen
    assert error.get("code") == expected["code"], seen
    assert isinstance(error.get("message"), str) and error["message"].strip(), seen


@pytest.mark.server
def test_chunked_body_is_read(server):
    """The counterpart of body_over_limit_chunked: a small valid body sent with
    Transfer-Encoding: chunked (as HTTP clients do for streamed bodies) is read."""
    case = {"method": "POST", "path": "/api/v1/predict", "description": "valid chunked predict", "chunked": True,
            "json": {"model_name": "iris_classifier", "features": [7.7, 3.0, 6.1, 2.3]}}
    status, headers, body = exchange(server.port, case)
    assert status == 200, body[:300]
    assert json.loads(body)["prediction"] == 2


@pytest.mark.server
def test_server_unharmed_after_the_table(server, workers_before):
    """Runs after every row of the table: the same workers still answer, correctly."""
    assert sorted(server.worker_pids()) == workers_before, "a worker died or was replaced during the table"
    setosa, virginica = [5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]
    for features, expected in ((setosa, 0), (virginica, 2)):
        for _ in range(2 * WORKERS):  # new connections spread over the workers
            r = requests.post(f"{server.url}/api/v1/predict",
                              json={"model_name": "iris_classifier", "features": features}, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["prediction"] == expected
    r = requests.post(f"{server.url}/api/v1/batch_predict",
                      json={"model_name": "iris_classifier", "features_batch": [setosa, virginica]}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [0, 2]
    assert r.json()["count"] == 2
    r = requests.get(f"{server.url}/ready", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert sorted(server.worker_pids()) == workers_before
