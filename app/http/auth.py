"""Who may call what: the one place requests are authenticated.

SCOPES below says which scope each endpoint needs (an endpoint it does not
name needs admin); the health probes need none, since load balancers call
them without credentials. With API keys off only admin calls need a credential,
the admin token; with them on every scoped call needs a key (or the admin
token, an admin key in effect). A key limited to some models may name only
those: in the path ({name}) here, in the body through allow_model().
"""
from __future__ import annotations

import hmac

import falcon

from app.errors import Forbidden, Unauthorized
from app.keys import ADMIN_TOKEN, KeyStore, Principal

HOW = "send it as Authorization: Bearer <key> or X-API-Key: <key>"
OPEN = frozenset(("health", "ready", "v2_health_live", "v2_health_ready"))
SCOPES = {
    "predict": "predict", "batch_predict": "predict", "v2_infer": "predict",
    "models": "read", "model": "read", "model_drift": "read", "metrics": "read", "openapi": "read",
    "v2_server_metadata": "read", "v2_model_metadata": "read", "v2_model_ready": "read",
}


class Authenticate:
    """Falcon middleware; sets req.context.principal for the calls it lets through."""

    def __init__(self, keys: KeyStore | None, admin_token: str):
        self.keys = keys
        self.admin_token = admin_token.encode()

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        endpoint = getattr(resource, "endpoint", None)
        # A CORS preflight carries no credentials; it answers only which methods exist.
        if resource is None or endpoint in OPEN or req.method == "OPTIONS":
            return
        scope = SCOPES.get(endpoint, "admin")
        if self.keys is None and scope != "admin":
            return
        if self.keys is None and not self.admin_token:
            raise Forbidden("the admin API is off: set server.admin_token (MLSERVE_SERVER_ADMIN_TOKEN) "
                            "or turn on API keys (security.api_keys) and use an admin key")
        principal = self.identify(presented(req))
        if not principal.allows(scope):
            raise Forbidden(f"the key {principal.name!r} does not have the {scope} scope")
        req.context.principal = principal
        if "name" in params:
            allow_model(req, params["name"])

    def identify(self, given: str | None) -> Principal:
        if not given:
            needed = "this call needs an API key" if self.keys is not None else "admin calls need the admin token"
            raise Unauthorized(f"{needed}: {HOW}")
        if self.admin_token and hmac.compare_digest(given.encode(), self.admin_token):
            return ADMIN_TOKEN
        principal = self.keys.authenticate(given) if self.keys is not None else None
        if principal is None:
            # Never echo what was sent: it may be a real key with a typo.
            raise Unauthorized("the key is not valid (unknown or revoked)" if self.keys is not None
                               else "the admin token is not valid")
        return principal


def presented(req: falcon.Request) -> str | None:
    scheme, _, value = (req.get_header("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (req.get_header("X-API-Key") or "").strip() or None


def allow_model(req: falcon.Request, name) -> None:
    """Forbidden when the caller's key is limited to other models."""
    principal = req.context.get("principal")
    if principal is not None and type(name) is str and not principal.allows_model(name):
        raise Forbidden(f"the key {principal.name!r} may not use the model {name!r}")
