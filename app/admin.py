"""The admin API (/api/v1/admin/...): operations that change what is served
or cached. Every call needs `Authorization: Bearer <server.admin_token>`."""
from __future__ import annotations

import hmac

import falcon

from app.cache import PredictionCache
from app.control import ControlChannel
from app.errors import Forbidden, InvalidField, ModelNotFound, Unauthorized
from app.registry import Registry
from app.resources import read_json, send


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
        if name is not None and name not in self.registry.loaded:
            raise ModelNotFound(f"no model named {name[:80]!r}", available=sorted(self.registry.loaded))
        deleted = None
        if self.cache is not None:
            self.cache.invalidate_local(name)
            deleted = self.cache.invalidate_shared(name)
        notified = self.control.publish({"op": "invalidate", "model": name})
        send(resp, {"invalidated": name or "all", "l2_deleted": deleted, "workers_notified": notified})
