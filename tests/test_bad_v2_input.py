"""Bad V2 requests against the real server (Gunicorn, pre-forked workers), one
table row per file in tests/data/bad_v2_requests/, sent over a plain socket
as tests/test_bad_input.py sends v1's.

Each file is one JSON object:

    description, method, path, headers, chunked   as in tests/data/bad_requests/
    body          at most one of json, text, bytes_hex, text_parts (as there), or
                    binary   {"json": header object, "data_hex": hex or "data_hex_parts": [[hex, times], ...],
                              "header_length": int, a string sent as is, or null for no header;
                              default: the length of the serialized JSON}
                             the JSON, then the binary tensor data
    encoding      optional: "gzip" or "deflate": the body is compressed and
                  Content-Encoding set; "truncate": N cuts the compressed body to N bytes
    expect        {"status": int, "error": str}: the status, and a part of the
                  protocol's error message, {"error": "<message>"}

Every answer must be that one-key JSON error, with no traceback, and no
worker may die on any of them (checked after the whole table).
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest
import requests

from tests.test_bad_input import exchange

CASES_DIR = Path(__file__).parent / "data" / "bad_v2_requests"
BODY_KEYS = ("json", "text", "bytes_hex", "text_parts", "binary")
CASE_KEYS = {"description", "method", "path", "headers", "chunked", "expect", "encoding", "truncate", *BODY_KEYS}
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}
WORKERS = 2


def load_case(path: Path) -> dict:
    case = json.loads(path.read_text())
    problems = [f"unknown key {k!r}" for k in case if k not in CASE_KEYS]
    problems += [f"missing {k!r}" for k in ("description", "method", "path", "expect") if k not in case]
    if sum(k in case for k in BODY_KEYS) > 1:
        problems.append(f"more than one of {', '.join(BODY_KEYS)}")
    expect = case.get("expect")
    if not (isinstance(expect, dict) and type(expect.get("status")) is int and isinstance(expect.get("error"), str)):
        problems.append('expect must be {"status": int, "error": str}')
    if case.get("encoding") not in (None, *COMPRESS):
        problems.append(f"encoding is one of {', '.join(COMPRESS)}")
    if problems:
        raise ValueError(f"{path.name}: {'; '.join(problems)}")
    return case


def body_of(case: dict) -> bytes | None:
    if "binary" in case:
        binary = case["binary"]
        data = bytes.fromhex(binary.get("data_hex", "")) + \
            b"".join(bytes.fromhex(h) * n for h, n in binary.get("data_hex_parts", []))
        return json.dumps(binary["json"], separators=(",", ":")).encode() + data
    if "json" in case:
        return json.dumps(case["json"], ensure_ascii=False).encode("utf-8")
    if "text" in case:
        return case["text"].encode("utf-8")
    if "bytes_hex" in case:
        return bytes.fromhex(case["bytes_hex"])
    if "text_parts" in case:
        return "".join(text * times for text, times in case["text_parts"]).encode("utf-8")
    return None


def as_sent(case: dict) -> dict:
    """The case as tests/test_bad_input.exchange sends it: the body as raw bytes, the headers it needs."""
    body = body_of(case)
    headers = dict(case.get("headers") or {})
    if "binary" in case:
        headers["Content-Type"] = "application/octet-stream"
        length = case["binary"].get("header_length", len(json.dumps(case["binary"]["json"], separators=(",", ":"))))
        if length is not None:
            headers["Inference-Header-Content-Length"] = str(length)
    if case.get("encoding"):
        body = COMPRESS[case["encoding"]](body)[:case.get("truncate")]
        headers["Content-Encoding"] = case["encoding"]
    sent = {k: case[k] for k in ("method", "path", "description", "chunked") if k in case}
    sent["headers"] = headers
    if body is not None:
        sent["bytes_hex"] = body.hex()
    return sent


CASES = {path.stem: load_case(path) for path in sorted(CASES_DIR.glob("*.json"))}


@pytest.fixture(scope="module")
def workers_before(server) -> list[int]:
    server.wait_for_workers(WORKERS)
    return sorted(server.worker_pids())


def test_table_is_large_and_covers_framing_and_every_status():
    assert len(CASES) >= 30
    assert sum("binary" in c or "encoding" in c for c in CASES.values()) >= 15
    assert {c["expect"]["status"] for c in CASES.values()} >= {400, 403, 404, 405, 413, 415}


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_v2_request(server, workers_before, name):
    case = CASES[name]
    status, headers, body = exchange(server.port, as_sent(case))
    seen = f"{case['description']}: got {status} {headers.get('content-type')!r} {body[:300]!r}"
    assert b"Traceback" not in body and b'File "' not in body, seen
    assert status == case["expect"]["status"], seen
    assert headers.get("content-type", "").split(";")[0].strip() == "application/json", seen
    try:
        payload = json.loads(body)
    except ValueError:
        pytest.fail(f"body is not JSON: {seen}")
    assert isinstance(payload, dict) and list(payload) == ["error"] and isinstance(payload["error"], str), seen
    assert case["expect"]["error"] in payload["error"], seen


@pytest.mark.server
def test_server_unharmed_after_the_table(server, workers_before):
    assert sorted(server.worker_pids()) == workers_before, "a worker died or was replaced during the table"
    body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                        "data": [[5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]]}]}
    for _ in range(2 * WORKERS):
        r = requests.post(f"{server.url}/v2/models/iris_classifier/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [0, 2]
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert sorted(server.worker_pids()) == workers_before
