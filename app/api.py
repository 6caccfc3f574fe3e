"""create_app(): the Falcon application from its parts, and the one place
where errors become HTTP responses."""
from __future__ import annotations

import logging
import time
from http import HTTPStatus

import falcon
import orjson

from app import admin, resources
from app.cache import PredictionCache
from app.control import ControlChannel
from app.errors import ServingError
from app.inference import Predictor
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.ratelimit import RateLimit
from app.registry import Registry
from app.settings import Settings
from app.shadow import ShadowScorer
from app.swap import SwapTrigger

log = logging.getLogger(__name__)


class Drain:
    """Set when this worker is retiring: responses then close their connection."""
    active = False


class RequestMetrics:
    """Times every request and counts it by model, version, endpoint and
    status; while the worker drains, asks every client to reconnect."""

    def __init__(self, metrics: Metrics, drain: Drain):
        self.metrics = metrics
        self.drain = drain

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        if self.drain.active:
            resp.set_header("Connection", "close")
        model = req.context.get("model")
        self.metrics.observe(model.name if model else "", str(model.version) if model else "",
                             getattr(resource, "endpoint", "none"), resp.status_code,
                             time.perf_counter() - req.context.started)


def create_app(settings: Settings, registry: Registry, metrics: Metrics, started: float | None = None, *,
               cache: PredictionCache | None = None, control: ControlChannel | None = None,
               lifecycle: Lifecycle | None = None, swap: SwapTrigger | None = None,
               shadow: ShadowScorer | None = None, drain: Drain | None = None) -> falcon.App:
    middleware: list = [RequestMetrics(metrics, drain or Drain())]
    if settings.server.cors_origins:
        origins = settings.server.cors_origins
        middleware.append(falcon.CORSMiddleware(
            allow_origins="*" if origins == "*" else [o.strip() for o in origins.split(",")]))
    if settings.rate_limiting.enabled:
        limits = settings.rate_limiting
        middleware.append(RateLimit(limits.requests_per_second, limits.burst, settings.redis.url))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    predictor = Predictor(registry, settings.server.max_batch_rows, cache, shadow)
    control = control or ControlChannel("")
    limit = settings.server.max_body_bytes
    app.add_route("/api/v1/predict", resources.Predict(predictor, limit))
    app.add_route("/api/v1/batch_predict", resources.BatchPredict(predictor, limit))
    app.add_route("/api/v1/models", resources.Models(registry))
    app.add_route("/api/v1/models/{name}", resources.Model(registry))
    app.add_route("/health", resources.Health(registry, started or time.time()))
    app.add_route("/ready", resources.Ready(registry))
    auth = admin.AdminAuth(settings.server.admin_token)
    app.add_route("/api/v1/admin/cache/invalidate", admin.CacheInvalidate(auth, registry, cache, control, limit))
    if lifecycle is not None and swap is not None:
        app.add_route("/api/v1/admin/models/{name}/{action}", admin.ModelAction(auth, registry, lifecycle, swap, limit))
    if settings.monitoring.prometheus_enabled:
        app.add_route("/metrics", resources.MetricsText(metrics))
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ServingError, handle_serving_error)
    return app


def error_body(code: str, message: str, details: dict | None = None) -> bytes:
    return orjson.dumps({"error": {**(details or {}), "code": code, "message": message}})


def handle_serving_error(req, resp, exc: ServingError, params) -> None:
    resp.status = exc.status
    resp.content_type = resources.JSON
    details = dict(exc.details)
    if "retry_after" in details:
        resp.set_header("Retry-After", str(details["retry_after"]))
    resp.data = error_body(exc.code, exc.message, details)


def handle_http_error(req, resp, exc: falcon.HTTPError, params) -> None:
    """Falcon's own errors (no route, wrong method, bad header) in our shape."""
    resp.status = exc.status
    resp.content_type = resources.JSON
    for name, value in (exc.headers or {}).items():
        resp.set_header(name, value)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.description or exc.title or "request refused"
    if exc.status_code == 405:
        message = f"{req.method} is not allowed on {req.path}; allowed: {exc.headers.get('Allow', '') if exc.headers else ''}"
    elif exc.status_code == 404:
        message = f"no endpoint at {req.path[:200]}"
    resp.data = error_body(code, message)


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    log.exception("unexpected error on %s %s", req.method, req.path)
    resp.status = 500
    resp.content_type = resources.JSON
    resp.data = error_body("internal_error", "the server failed to handle this request; it has been logged")
