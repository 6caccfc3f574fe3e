"""REST resources: thin wrappers that read the body, call the core, write JSON."""
from __future__ import annotations

import json
import time

import falcon
import orjson

from app.clock import utc_now
from app.errors import BodyTooLarge, InvalidJSON
from app.http.auth import allow_model
from app.http.errors import JSON
from app.inference import Predictor
from app.metrics import Metrics
from app.registry import Registry

DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def read_json(req: falcon.Request, limit: int) -> dict:
    length = req.content_length
    if length is None:
        # Chunked: the server has decoded and terminated wsgi.input
        # (wsgi.input_terminated); read no more than the limit allows.
        raw = req.stream.read(limit + 1)
        if len(raw) > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
    elif length > limit:
        raise BodyTooLarge(f"request body is {length} bytes; the limit is {limit}")
    else:
        raw = req.stream.read(length)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        body = lenient_json(raw, exc)
    if type(body) is not dict:
        raise InvalidJSON("the request body must be a JSON object")
    return body


def lenient_json(raw: bytes, strict_error: Exception):
    """NaN and Infinity are not JSON, but a client that sends them has a bad
    feature value, not a broken body: parse them so validation can say 422."""
    try:
        body = json.loads(raw.decode("utf-8"))
        # NOTE: json.loads lets escaped lone surrogates ("\ud800") through; no
        # answer or log line could hold them, so they are refused here.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return body
    except (ValueError, RecursionError):
        if not raw.strip():
            raise InvalidJSON("the request body is empty; expected a JSON object") from None
        raise InvalidJSON(f"the request body is not valid JSON: {strict_error}") from None


def send(resp: falcon.Response, body, status: int = 200) -> None:
    resp.status = status
    resp.content_type = JSON
    resp.data = orjson.dumps(body, option=DUMP_OPTIONS)


class Predict:
    endpoint = "predict"
    predicts = True  # its errors go to the prediction log (app/http/tracing.py)

    def __init__(self, predictor: Predictor, max_body_bytes: int):
        self.predictor = predictor
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        context = req.context
        context.body = body = read_json(req, self.limit)
        allow_model(req, body.get("model_name"))
        model, resp.data = self.predictor.predict(body, context.started, req.get_header("X-Routing-Key"),
                                                  context.request_id)
        context.model = model
        resp.content_type = JSON


class BatchPredict(Predict):
    endpoint = "batch_predict"

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        context = req.context
        context.body = body = read_json(req, self.limit)
        allow_model(req, body.get("model_name"))
        model, resp.data = self.predictor.batch_predict(body, context.started, req.get_header("X-Routing-Key"),
                                                        context.request_id)
        context.model = model
        resp.content_type = JSON


class Models:
    endpoint = "models"

    def __init__(self, registry: Registry):
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.get("principal")  # a key limited to some models sees only those
        names = [n for n in sorted(self.registry.models) if principal is None or principal.allows_model(n)]
        send(resp, {"models": [self.registry.describe(name) for name in names]})


class Model(Models):
    endpoint = "model"

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        send(resp, self.registry.describe(name))


class Health:
    endpoint = "health"

    def __init__(self, registry: Registry, started: float):
        self.registry = registry
        self.started = started

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, {"status": "healthy", "uptime_seconds": round(time.time() - self.started, 3),
                    "timestamp": utc_now(), "models_serving": len(self.registry.serving())})


class Ready:
    endpoint = "ready"

    def __init__(self, registry: Registry):
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        missing = self.registry.not_ready()
        if missing:
            send(resp, {"status": "not_ready", "not_ready": missing}, status=503)
        else:
            send(resp, {"status": "ready", "models": sorted(self.registry.serving())})


class MetricsText:
    endpoint = "metrics"

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = self.metrics.content_type
        resp.data = self.metrics.render()
