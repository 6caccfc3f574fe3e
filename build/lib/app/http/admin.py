"""The admin API (/api/v1/admin/...): operations that change what is served
or cached. Every call needs `Authorization: Bearer <server.admin_token>`."""
from __future__ import annotations

import hmac

import falcon

from app.cache import PredictionCache
from app.control import ControlChannel
from app.errors import Forbidden, InvalidField, NotFound, Unauthorized
from app.http.resources import read_json, send
from app.lifecycle import Lifecycle
from app.registry import Registry
from app.reload import ReloadTrigger


class AdminAuth:
    def __init__(self, token: str):
        self.token = token.encode()

    def check(self, req: falcon.Request) -> None:
        if not self.token:
            raise Forbidden("the admin API is off: set server.admin_token (MLSERVE_SERVER_ADMIN_TOKEN)")
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("admin calls need the header Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip().encode(), self.token):
            raise Forbidden("the admin token is not valid")


class CacheInvalidate:
    """POST {"model_name": NAME} clears one model's cached predictions; {} clears all."""
    endpoint = "admin_cache_invalidate"

    def __init__(self, auth: AdminAuth, registry: Registry, cache: PredictionCache | None,
                 control: ControlChannel, max_body_bytes: int):
        self.auth, self.registry, self.cache, self.control = auth, registry, cache, control
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.check(req)
        body = read_json(req, self.limit) if req.content_length else {}
        name = body.get("model_name")
        if name is not None and type(name) is not str:
            raise InvalidField("model_name must be a string")
        if name is not None:
            self.registry.state(name)  # ModelNotFound for a model this server does not hold
        deleted = None
        if self.cache is not None:
            self.cache.invalidate_local(name)
            deleted = self.cache.invalidate_shared(name)
        notified = self.control.publish({"op": "invalidate", "model": name})
        send(resp, {"invalidated": name or "all", "l2_deleted": deleted, "workers_notified": notified})


class ModelAction:
    """POST /api/v1/admin/models/{name}/{action}, action one of:
    promote {"version": N}, rollback {}, split {"weights": {"1": 90, "2": 10}} ({} or null ends it),
    shadow {"version": N} (null stops it), reload {}. Each may carry a "reason".
    The change is checked (the version loads and verifies, models.yaml does
    not pin it) before it is made; then every server reloads."""
    endpoint = "admin_model"
    ACTIONS = ("promote", "rollback", "split", "shadow", "reload")

    def __init__(self, auth: AdminAuth, registry: Registry, lifecycle: Lifecycle, reloads: ReloadTrigger,
                 max_body_bytes: int):
        self.auth, self.registry, self.lifecycle, self.reloads = auth, registry, lifecycle, reloads
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str, action: str) -> None:
        self.auth.check(req)
        if action not in self.ACTIONS:
            raise NotFound(f"no admin action {action[:40]!r}; one of {', '.join(self.ACTIONS)}")
        self.registry.state(name)  # ModelNotFound for a model this server does not hold
        body = read_json(req, self.limit) if req.content_length else {}
        reason = body.get("reason") or ""
        if type(reason) is not str:
            raise InvalidField("reason must be a string")
        by = f"admin-api@{req.remote_addr}"
        state = self.apply(name, action, body, by, reason)
        send(resp, {"model": name, "action": action, "serving_version": state.get("version"),
                    "previous_version": state.get("previous"), "split": state.get("split") or None,
                    "shadow_version": state.get("shadow"), "swap": self.reloads.request(f"{action} {name}")})

    def apply(self, name: str, action: str, body: dict, by: str, reason: str) -> dict:
        if action == "promote":
            return self.lifecycle.promote(name, body.get("version"), by, reason)
        if action == "rollback":
            return self.lifecycle.rollback(name, by, reason)
        if action == "split":
            return self.lifecycle.split(name, body.get("weights"), by, reason)
        if action == "shadow":
            return self.lifecycle.shadow(name, body.get("version"), by, reason)
        return self.lifecycle.serving_state(name)
