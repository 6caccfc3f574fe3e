"""The Open Inference Protocol (KServe V2) over REST, with Triton's binary
tensor data and model repository extensions: thin resources over the same
core as v1 (Predictor.route and score: routing, cache, shadow, metrics).

Errors answer {"error": "<message>"} (app/http/errors.py picks that shape for
every path under /v2).
"""
from __future__ import annotations

import zlib
from importlib import metadata

import falcon
import orjson

from app import tensors
from app.errors import BodyTooLarge, InvalidInput, InvalidJSON, UnsupportedMediaType, VersionNotFound
from app.http.errors import JSON
from app.inference import Predictor
from app.lifecycle import Lifecycle
from app.plan import unloaded
from app.registry import Registry
from app.reload import ReloadTrigger

EXTENSIONS = ["binary_tensor_data", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
# zlib's wbits: a zlib stream (what "deflate" means in HTTP), a gzip stream,
# and the raw deflate some clients send for "deflate".
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The body, never more than limit bytes of it read or inflated;
    Content-Encoding gzip or deflate is decoded."""
    # NOTE: the same limits as v1's read_json, which stays as it is: it is on
    # the benchmarked v1 path.
    length = req.content_length
    if length is None:
        raw = req.stream.read(limit + 1)
        if len(raw) > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
    elif length > limit:
        raise BodyTooLarge(f"request body is {length} bytes; the limit is {limit}")
    else:
        raw = req.stream.read(length) if length else b""
    encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity":
        return raw
    if encoding not in WBITS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted; send gzip, deflate or none")
    return inflate(raw, encoding, limit)


def inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    try:
        return inflate_with(raw, WBITS[encoding], limit)
    except zlib.error as exc:
        if encoding == "deflate":
            try:
                return inflate_with(raw, -zlib.MAX_WBITS, limit)
            except zlib.error:
                pass
        raise InvalidJSON(f"the body is not valid {encoding} data: {exc}") from None


def inflate_with(raw: bytes, wbits: int, limit: int) -> bytes:
    out, rest = [], raw
    size = 0
    while True:  # gzip bodies may hold several members
        stream = zlib.decompressobj(wbits)
        out.append(stream.decompress(rest, limit + 1 - size))
        size += len(out[-1])
        if size > limit or stream.unconsumed_tail:
            raise BodyTooLarge(f"the decoded request body is over the limit of {limit} bytes")
        if not stream.eof:
            raise zlib.error("the compressed data is cut off")
        rest = stream.unused_data
        if not rest or wbits != WBITS["gzip"]:
            break
    if rest:
        raise zlib.error(f"{len(rest)} bytes follow the compressed data")
    return b"".join(out)


def header_length(req: falcon.Request) -> int | None:
    value = req.get_header(HEADER_LENGTH)
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidInput(f"{HEADER_LENGTH} must be a whole number of bytes, got {value[:40]!r}")
    return int(value)


def version_of(model_name: str, version: str | None) -> int | None:
    """The version a /versions/{v} path pins (None without one)."""
    if version is None:
        return None
    if not (version.isdigit() and version.isascii() and not version.startswith("0") and len(version) <= 18):
        raise VersionNotFound(f"{model_name[:80]} has no version {version[:40]!r}; versions are positive integers")
    return int(version)


def send(resp: falcon.Response, body, status: int = 200) -> None:
    resp.status = status
    resp.content_type = JSON
    resp.data = orjson.dumps(body)


class ServerMetadata:
    endpoint = "v2_server_metadata"

    def __init__(self):
        try:
            version = metadata.version("mlserve")
        except metadata.PackageNotFoundError:
            version = "unknown"
        self.body = orjson.dumps({"name": "mlserve", "version": version, "extensions": EXTENSIONS})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = JSON
        resp.data = self.body


class ServerLive:
    endpoint = "v2_health_live"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, {"live": True})


class ServerReady:
    """Ready when every model this server is configured to serve is serving (as /ready)."""
    endpoint = "v2_health_ready"

    def __init__(self, registry: Registry):
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready = not self.registry.not_ready()
        send(resp, {"ready": ready}, 200 if ready else 503)


class ModelMetadata:
    endpoint = "v2_model_metadata"

    def __init__(self, registry: Registry):
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        state = self.registry.state(name)
        # Without a version: the one requests without a routing key get when no split is running.
        model = state.resolve(version_of(name, version)) if version is not None or state.serving is None \
            else state.serving
        req.context.model = model
        send(resp, tensors.model_metadata(model, sorted(state.versions)))


class ModelReady(ModelMetadata):
    endpoint = "v2_model_ready"

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        state = self.registry.state(name)
        pinned = version_of(name, version)
        if pinned is not None:
            state.resolve(pinned)  # VersionNotFound unless that version is loaded
        ready = pinned is not None or state.serving is not None
        send(resp, {"name": name, "ready": ready}, 200 if ready else 503)


class Infer:
    """POST /v2/models/{name}[/versions/{version}]/infer: a version in the path
    bypasses any split (as v1's "version"); X-Routing-Key picks a side of one.
    parameters.use_cache (true by default) is this server's own parameter."""
    endpoint = "v2_infer"

    def __init__(self, predictor: Predictor, max_body_bytes: int):
        self.predictor = predictor
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        raw = read_body(req, self.limit)
        pinned = version_of(name, version)
        state, model = self.predictor.route(name, pinned, req.get_header("X-Routing-Key"))
        req.context.model = model
        request, X = tensors.read_request(model, raw, header_length(req), self.predictor.max_batch_rows)
        use_cache = request.parameters.get("use_cache", True) if request.parameters else True
        if type(use_cache) is not bool:
            raise InvalidInput("parameters.use_cache must be true or false")
        scores = self.predictor.score(state, model, X, use_cache, pinned is not None)
        resp.data, json_length = tensors.answer(model, request, scores.labels, scores.probabilities)
        if json_length is None:
            resp.content_type = JSON
        else:
            resp.content_type = BINARY
            resp.set_header(HEADER_LENGTH, str(json_length))


class RepositoryIndex:
    """Every model in the repository, serving or not: [{name, version, state, reason}].
    An empty body, or {"ready": true} for the serving ones only."""
    endpoint = "v2_repository_index"

    def __init__(self, registry: Registry, max_body_bytes: int):
        self.registry, self.limit = registry, max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = optional_object(read_body(req, self.limit))
        only_ready = body.get("ready", False)
        if type(only_ready) is not bool:
            raise InvalidInput("ready must be true or false")
        entries = [entry for entry in index(self.registry) if entry["state"] == "READY" or not only_ready]
        send(resp, entries)


def index(registry: Registry) -> list[dict]:
    entries = []
    for name in sorted(set(registry.repository.names()) | set(registry.models)):
        state = registry.models.get(name)
        if state is not None and state.serving is not None:
            entries.append({"name": name, "version": str(state.serving.version), "state": "READY", "reason": ""})
            continue
        if state is not None:
            reason = state.failure or "not loaded"
        elif unloaded(registry.repository, name):
            reason = "unloaded"
        else:
            reason = "not listed in the server's models.yaml"
        versions = registry.repository.versions(name)
        entries.append({"name": name, "version": str(versions[-1]) if versions else "",
                        "state": "UNAVAILABLE", "reason": reason})
    return entries


def optional_object(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise InvalidJSON("the request body must be a JSON object")
    return body


class RepositoryModel:
    """POST .../load serves a model again, or reloads it: its target version
    is loaded and checked first, as for a promote. POST .../unload stops
    serving it. Either way every server then swaps, as after an admin call."""
    endpoint = "v2_repository_model"

    def __init__(self, lifecycle: Lifecycle, reloads: ReloadTrigger, max_body_bytes: int):
        self.lifecycle, self.reloads, self.limit = lifecycle, reloads, max_body_bytes

    def on_post_load(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        parameters = tensors.parameters_of(optional_object(read_body(req, self.limit)).get("parameters"),
                                           "parameters")
        if set(parameters) - {"reason"}:
            raise InvalidInput("load takes no configuration or files: it serves the version the model "
                               "repository says (publish a new version to change it)")
        state = self.lifecycle.load(name, f"v2-repository@{req.remote_addr}", reason_of(parameters))
        self.respond(resp, name, "load", state)

    def on_post_unload(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        parameters = tensors.parameters_of(optional_object(read_body(req, self.limit)).get("parameters"),
                                           "parameters")
        state = self.lifecycle.unload(name, f"v2-repository@{req.remote_addr}", reason_of(parameters))
        self.respond(resp, name, "unload", state)

    def respond(self, resp: falcon.Response, name: str, action: str, state: dict) -> None:
        send(resp, {"name": name, "action": action, "version": None if state.get("unloaded") else state.get("version"),
                    "swap": self.reloads.request(f"v2 {action} {name}")})


def reason_of(parameters: dict) -> str:
    reason = parameters.get("reason") or ""
    if type(reason) is not str:
        raise InvalidInput("parameters.reason must be a string")
    return reason


def add_routes(app: falcon.App, registry: Registry, predictor: Predictor, max_body_bytes: int,
               lifecycle: Lifecycle | None = None, reloads: ReloadTrigger | None = None) -> None:
    """The V2 routes; the repository's load and unload only with a lifecycle to change it."""
    app.add_route("/v2", ServerMetadata())
    app.add_route("/v2/health/live", ServerLive())
    app.add_route("/v2/health/ready", ServerReady(registry))
    model, ready, infer = ModelMetadata(registry), ModelReady(registry), Infer(predictor, max_body_bytes)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_route(prefix, model)
        app.add_route(prefix + "/ready", ready)
        app.add_route(prefix + "/infer", infer)
    app.add_route("/v2/repository/index", RepositoryIndex(registry, max_body_bytes))
    if lifecycle is not None and reloads is not None:
        repository = RepositoryModel(lifecycle, reloads, max_body_bytes)
        app.add_route("/v2/repository/models/{name}/load", repository, suffix="load")
        app.add_route("/v2/repository/models/{name}/unload", repository, suffix="unload")

