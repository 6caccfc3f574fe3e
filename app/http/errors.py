"""The one place that turns an error into an HTTP response.

Every error answers {"error": {"code", "message", ...details}} with the
message the code raised: domain errors (app.errors) carry their status and
code; Falcon's own (no route, wrong method, bad header) get a code from their
status; anything else is logged and becomes a plain 500 without a traceback.
Under /v2 (the Open Inference Protocol) the same error answers the
protocol's shape instead, {"error": "<message>"}, with the same status.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

import falcon
import orjson

from app.errors import ServingError

log = logging.getLogger(__name__)
JSON = "application/json"
HANDLED = (Exception, falcon.HTTPError, ServingError)


def error_body(code: str, message: str, details: dict | None = None) -> bytes:
    return orjson.dumps({"error": {**(details or {}), "code": code, "message": message}})


def handle(req: falcon.Request, resp: falcon.Response, exc: Exception, params) -> None:
    """Falcon error handler for every exception (registered for HANDLED)."""
    status, code, message, details, headers = describe(req, exc)
    req.context.error = (code, message)  # for the prediction log (app/http/tracing.py)
    if status < 500:
        log.debug("%s %s: %d %s (request %s)", req.method, req.path[:200], status, code, request_id(req))
    resp.status = status
    resp.content_type = JSON
    for name, value in headers.items():
        resp.set_header(name, value)
    resp.data = v2_error_body(message) if is_v2(req.path) else error_body(code, message, details)


def v2_error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def is_v2(path: str) -> bool:
    return path.startswith("/v2") and (len(path) == 3 or path[3] == "/")


def describe(req: falcon.Request, exc: Exception) -> tuple[int, str, str, dict, dict]:
    """(status, code, message, details, headers) of an error."""
    if isinstance(exc, ServingError):
        details = dict(exc.details)
        headers = {"Retry-After": str(details["retry_after"])} if "retry_after" in details else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="mlserve"'
        return exc.status, exc.code, exc.message, details, headers
    if isinstance(exc, falcon.HTTPError):
        return exc.status_code, code_of(exc.status_code), http_message(req, exc), {}, dict(exc.headers or {})
    log.exception("unexpected error on %s %s (request %s)", req.method, req.path[:200], request_id(req))
    return 500, "internal_error", "the server failed to handle this request; it has been logged", {}, {}


def request_id(req: falcon.Request) -> str:
    return req.context.get("request_id") or "-"


def code_of(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


def http_message(req: falcon.Request, exc: falcon.HTTPError) -> str:
    if exc.description:
        return exc.description
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"{req.method} is not allowed on {req.path[:200]}; allowed: {allowed}"
    if exc.status_code == 404:
        return f"no endpoint at {req.path[:200]}"
    return exc.title or "request refused"
