"""A Python client for the mlserve REST API, with typed errors.

Every failure is an MLServeError: the server's error code and message when it
answered, ConnectionFailed when it could not be reached.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import quote, urlsplit

import orjson
import requests

Features = Sequence[float] | Mapping[str, float]

# Numpy arrays and scalars are common feature containers; orjson writes them directly.
DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class MLServeError(Exception):
    """A request that did not succeed; code and message come from the server's error body."""

    def __init__(self, status: int | None, code: str, message: str, body: Any = None):
        super().__init__(f"{code}: {message}" if status is None else f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class InvalidRequest(MLServeError):
    """400, 413 or 422: the request was refused as malformed, too large or with bad features."""


class NotFound(MLServeError):
    """404: no such model, version or endpoint."""


class RateLimited(MLServeError):
    """429: too many requests from this client; retry_after is in seconds, when the server says."""

    @property
    def retry_after(self) -> int | None:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        value = error.get("retry_after") if isinstance(error, dict) else None
        return value if isinstance(value, int) else None


class ServerError(MLServeError):
    """5xx: the server (or a proxy in front of it) failed or a model is not serving."""


class ConnectionFailed(MLServeError):
    """The server could not be reached or did not answer in time (no HTTP status)."""


def error_class(status: int) -> type[MLServeError]:
    if status in (400, 413, 422):
        return InvalidRequest
    if status == 404:
        return NotFound
    if status == 429:
        return RateLimited
    if status >= 500:
        return ServerError
    return MLServeError


class MLClient:
    """One keep-alive session to an mlserve server; not thread-safe (use one per thread).
    api_key is sent as Authorization: Bearer on every request: an API key, or the
    server's admin token (an admin key in effect). Without them, base_url and
    api_key come from MLSERVE_URL and MLSERVE_API_KEY when those are set."""

    def __init__(self, base_url: str | None = None, timeout: float = 10.0, api_key: str | None = None):
        # The client stands alone (requests and orjson only), so it reads its two variables itself.
        base_url = base_url or os.environ.get("MLSERVE_URL") or "http://localhost:8080"
        api_key = os.environ.get("MLSERVE_API_KEY") if api_key is None else api_key
        parts = urlsplit(base_url)
        try:
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a port that is not a number from 0 to 65535
            valid = False
        if not valid:
            raise ValueError(f"base_url must be an http:// or https:// URL with a host, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def predict(self, model_name: str, features: Features, use_cache: bool = True,
                version: int | None = None, routing_key: str | None = None) -> dict:
        """One prediction: the server's response plus client_latency_ms (round trip as seen here).
        version pins a loaded version; routing_key keeps a caller on one side of a split."""
        body = request_body(model_name, use_cache, version, routing_key, features=features)
        started = time.perf_counter()
        result = self.request("POST", "/api/v1/predict", body)
        result["client_latency_ms"] = (time.perf_counter() - started) * 1000.0
        return result

    def batch_predict(self, model_name: str, features_list: Sequence[Features], version: int | None = None,
                      use_cache: bool = True, routing_key: str | None = None) -> dict:
        """Predictions for many rows in one request (predictions, probabilities, classes, count, ...)."""
        body = request_body(model_name, use_cache, version, routing_key, features_batch=features_list)
        return self.request("POST", "/api/v1/batch_predict", body)

    # --- the admin API (needs the admin token or an admin key) --------------------

    def promote(self, model_name: str, version: int, reason: str = "") -> dict:
        """Serve version on every host; the old one is kept for rollback."""
        return self.admin(model_name, "promote", {"version": version, "reason": reason})

    def rollback(self, model_name: str, reason: str = "") -> dict:
        return self.admin(model_name, "rollback", {"reason": reason})

    def split(self, model_name: str, weights: Mapping[int, float] | None, reason: str = "") -> dict:
        """Route traffic over versions by weight ({1: 90, 2: 10}); None ends the split."""
        return self.admin(model_name, "split", {"weights": {str(v): w for v, w in (weights or {}).items()} or None,
                                                "reason": reason})

    def shadow(self, model_name: str, version: int | None, reason: str = "") -> dict:
        """Mirror requests to version off the response path; None stops it."""
        return self.admin(model_name, "shadow", {"version": version, "reason": reason})

    def reload(self, model_name: str) -> dict:
        """Reload every host from the repository (after a change made there by hand)."""
        return self.admin(model_name, "reload", {})

    def invalidate_cache(self, model_name: str | None = None) -> dict:
        """Drop one model's cached predictions (None: every model's) on every host."""
        return self.request("POST", "/api/v1/admin/cache/invalidate",
                            {"model_name": model_name} if model_name else {})

    def create_key(self, name: str, scopes: Sequence[str], models: Sequence[str] | None = None,
                   rate: int | None = None) -> dict:
        """Issue an API key: its record plus "key", the key itself, shown this once."""
        body: dict[str, Any] = {"name": name, "scopes": list(scopes)}
        if models:
            body["models"] = list(models)
        if rate is not None:
            body["rate"] = rate
        return self.request("POST", "/api/v1/admin/keys", body)

    def list_keys(self) -> list[dict]:
        """Every key issued, revoked ones too (id, name, scopes, models, rate, created, revoked)."""
        return self.request("GET", "/api/v1/admin/keys")["keys"]

    def revoke_key(self, name_or_id: str) -> dict:
        """Revoke a key on every worker of every host, within a second."""
        return self.request("DELETE", "/api/v1/admin/keys/" + quote(name_or_id, safe=""))

    def admin(self, model_name: str, action: str, body: dict) -> dict:
        return self.request("POST", f"/api/v1/admin/models/{quote(model_name, safe='')}/{action}", body)

    def get_model_info(self, model_name: str) -> dict:
        """What the server knows of one model: features, classes, task, runtime, versions, status."""
        return self.request("GET", "/api/v1/models/" + quote(model_name, safe=""))

    def drift(self, model_name: str, version: int | None = None) -> dict:
        """Data drift of a loaded version (the serving one by default): PSI, status and bins per feature."""
        query = f"?version={int(version)}" if version is not None else ""
        return self.request("GET", "/api/v1/models/" + quote(model_name, safe="") + "/drift" + query)

    def list_models(self) -> list[dict]:
        """Every loaded model, described as by get_model_info."""
        body = self.request("GET", "/api/v1/models")
        if not isinstance(body, dict) or not isinstance(body.get("models"), list):
            raise MLServeError(200, "invalid_response", "GET /api/v1/models did not list models", body)
        return body["models"]

    def health_check(self) -> dict:
        """Liveness: status, uptime_seconds, models_serving."""
        return self.request("GET", "/health")

    def ready(self) -> dict:
        """Readiness: {"status": "ready", ...} or {"status": "not_ready", "not_ready": {model: reason}}."""
        return self.request("GET", "/ready", answers=(503,))

    def get_metrics(self) -> str:
        """The Prometheus metrics text."""
        return self.send("GET", "/metrics", None).text

    def publish_artifact(self, name: str, artifact: bytes | str | Path, form: str,
                         fields: Mapping[str, Any] | None = None,
                         progress: Callable[[int, int], None] | None = None) -> dict:
        """Upload an ONNX or skops artifact (bytes or a file) in parts through the
        admin API (the client's api_key: an admin key or the admin token), then
        publish it as the next version of name with the same checks as a local
        publish. fields: features, task, classes, trusted_types, reference_sample,
        promote, reason. The server's answer."""
        if form not in ("onnx", "skops"):
            raise ValueError("form must be onnx or skops")
        auth: dict = {}  # the session's Authorization header
        upload = self.request("POST", "/api/v1/admin/uploads", headers=auth)
        part, upload_id = int(upload["part_bytes"]), upload["upload_id"]
        digest, offset = hashlib.sha256(), 0
        with (io.BytesIO(artifact) if isinstance(artifact, bytes) else open(artifact, "rb")) as source:
            total = source.seek(0, io.SEEK_END)
            source.seek(0)
            if progress:
                progress(0, total)
            while chunk := source.read(part):
                digest.update(chunk)
                answer = self.request("PATCH", f"/api/v1/admin/uploads/{upload_id}", data=chunk,
                                      headers={**auth, "Upload-Offset": str(offset),
                                               "Content-Type": "application/octet-stream"})
                offset = int(answer["offset"])
                if progress:
                    progress(offset, total)
        body = {**(fields or {}), "upload": upload_id, "format": form, "sha256": digest.hexdigest()}
        return self.request("POST", f"/api/v1/admin/models/{quote(name, safe='')}/versions", body, headers=auth)

    def request(self, method: str, path: str, body: dict | None = None, answers: tuple[int, ...] = (),
                headers: dict | None = None, data: bytes | None = None) -> Any:
        """The JSON body of a successful response; statuses in answers count as success
        when their body is not an error (the 503 of /ready is an answer, not a failure).
        data: a raw body instead of body's JSON."""
        response = self.send(method, path, body, answers, headers, data)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            kind = response.headers.get("Content-Type", "unknown content")
            raise MLServeError(response.status_code, "invalid_response",
                               f"expected JSON from {method} {path}, got {kind}",
                               response.text[:1000]) from None

    def send(self, method: str, path: str, body: dict | None, answers: tuple[int, ...] = (),
             extra_headers: dict | None = None, raw: bytes | None = None) -> requests.Response:
        data = orjson.dumps(body, option=DUMP_OPTIONS) if body is not None else raw
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers = {**headers, **(extra_headers or {})} or None
        try:
            response = self.session.request(method, self.base_url + path, data=data, headers=headers,
                                            timeout=self.timeout)
        except requests.Timeout as exc:
            raise ConnectionFailed(None, "timeout", f"{self.base_url} did not answer {method} {path} "
                                   f"within {self.timeout:g} s ({reason(exc)})") from exc
        except requests.RequestException as exc:
            raise ConnectionFailed(None, "connection_failed", f"cannot reach {self.base_url}: {reason(exc)}") from exc
        if response.status_code < 400 or (response.status_code in answers and not is_error_body(response)):
            return response
        raise error_from(response)

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def __enter__(self) -> "MLClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request_body(model_name: str, use_cache: bool, version: int | None, routing_key: str | None,
                 **rows) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": model_name, **rows, "use_cache": use_cache}
    if version is not None:
        body["version"] = version
    if routing_key is not None:
        body["routing_key"] = routing_key
    return body


def error_from(response: requests.Response) -> MLServeError:
    """The typed error for a failed response; bodies not in the server's error shape
    (a proxy's HTML page, say) get the code http_<status>."""
    status = response.status_code
    try:
        body: Any = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = response.text
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code, message = error["code"], str(error.get("message") or error["code"])
    else:
        code = f"http_{status}"
        text = " ".join(response.text.split())[:200]
        message = text or response.reason or "no message"
    return error_class(status)(status, code, message, body)


def is_error_body(response: requests.Response) -> bool:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(body, dict) or "error" in body


def reason(exc: requests.RequestException) -> str:
    """The useful part of a requests error, without urllib3's pool and object reprs."""
    cause = exc.args[0] if exc.args else exc
    text = str(getattr(cause, "reason", None) or cause)
    return re.sub(r"^\w*Connection(?:Pool)?\([^)]*\): ", "", text)
