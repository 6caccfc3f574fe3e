"""The Falcon app factory: routes, middleware and the one error handler."""
from __future__ import annotations

import logging
import time

import falcon

from app.batching import Batcher
from app.cache import PredictionCache
from app.control import ControlChannel
from app.drift import DriftMonitor
from app.http import admin, errors, openapi, resources, v2
from app.http.auth import Authenticate
from app.http.drift import ModelDrift
from app.http.limits import RequestLimits
from app.http.ratelimit import RateLimit, server_limit
from app.http.tracing import RequestTrace
from app.inference import Predictor
from app.keys import KeyFile, KeyStore
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.predictions import PredictionLog
from app.publishing import Publisher
from app.registry import Registry
from app.reload import ReloadTrigger
from app.settings import Settings
from app.shadow import ShadowScorer
from app.uploads import UploadStore

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
               lifecycle: Lifecycle | None = None, reloads: ReloadTrigger | None = None,
               shadow: ShadowScorer | None = None, drain: Drain | None = None,
               predictions: PredictionLog | None = None, drift: DriftMonitor | None = None,
               keys: KeyStore | None = None, batcher: Batcher | None = None) -> falcon.App:
    """The WSGI app over the given parts; builds nothing but the app itself.
    keys: the API keys every scoped call must present (None: keys are off)."""
    middleware: list = [RequestTrace(predictions), RequestMetrics(metrics, drain or Drain()),
                        RequestLimits(settings.server.request_timeout_ms)]
    if settings.server.cors_origins:
        origins = settings.server.cors_origins
        middleware.append(falcon.CORSMiddleware(
            allow_origins="*" if origins == "*" else [o.strip() for o in origins.split(",")]))
    middleware.append(Authenticate(keys, settings.server.admin_token))
    if settings.rate_limiting.enabled or keys is not None:
        limits, redis = settings.rate_limiting, settings.redis
        default = server_limit(limits.requests_per_second, limits.burst) if limits.enabled else None
        middleware.append(RateLimit(default, redis.url, redis.socket_timeout, settings.cache.breaker_reset))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    predictor = Predictor(registry, settings.server.max_batch_rows, cache, shadow, predictions,
                          settings.server.allow_unknown_fields, batcher)
    control = control or ControlChannel("")
    limit = settings.server.max_body_bytes
    app.add_route("/api/v1/predict", resources.Predict(predictor, limit))
    app.add_route("/api/v1/batch_predict", resources.BatchPredict(predictor, limit))
    app.add_route("/api/v1/models", resources.Models(registry))
    app.add_route("/api/v1/models/{name}", resources.Model(registry))
    app.add_route("/api/v1/models/{name}/drift", ModelDrift(registry, drift))
    app.add_route("/health", resources.Health(registry, started or time.time()))
    app.add_route("/ready", resources.Ready(registry))
    app.add_route("/api/v1/admin/cache/invalidate", admin.CacheInvalidate(registry, cache, control, limit))
    key_file = KeyFile(settings.keys_path)

    def keys_changed() -> None:
        if keys is not None:
            keys.refresh(force=True)
        control.publish({"op": "keys"})
    app.add_route("/api/v1/admin/keys", admin.Keys(key_file, keys_changed, limit))
    app.add_route("/api/v1/admin/keys/{key}", admin.Key(key_file, keys_changed))
    if lifecycle is not None and reloads is not None:
        app.add_route("/api/v1/admin/models/{name}/{action}",
                      admin.ModelAction(registry, lifecycle, reloads, limit))
        uploads = UploadStore(lifecycle.repository.root, settings.models.max_upload_bytes)
        app.add_route("/api/v1/admin/uploads", admin.Uploads(uploads))
        app.add_route("/api/v1/admin/uploads/{upload_id}", admin.Upload(uploads))
        app.add_route("/api/v1/admin/models/{name}/versions",
                      admin.ModelVersions(Publisher(lifecycle), reloads, uploads, limit))
    if settings.monitoring.prometheus_enabled:
        app.add_route("/metrics", resources.MetricsText(metrics))
    v2.add_routes(app, registry, predictor, limit, lifecycle, reloads)
    app.add_route("/openapi.json", openapi.Document())
    app.add_error_handler(errors.HANDLED, errors.handle)
    return app
