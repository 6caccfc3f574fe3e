"""The admin API (/api/v1/admin/...): operations that change what is served,
cached or who may call. Every call needs the admin scope (app/http/auth.py)."""
from __future__ import annotations

import re
from typing import Callable

import falcon

from app.cache import PredictionCache
from app.control import ControlChannel
from app.errors import InvalidField, MissingField, ModelRefused, NotFound
from app.http.resources import read_json, send
from app.keys import KeyFile
from app.lifecycle import Lifecycle
from app.publishing import Publisher
from app.registry import Registry
from app.reload import ReloadTrigger
from app.repository import sha256_of
from app.uploads import PART_BYTES, UploadStore


class CacheInvalidate:
    """POST {"model_name": NAME} clears one model's cached predictions; {} clears all."""
    endpoint = "admin_cache_invalidate"

    def __init__(self, registry: Registry, cache: PredictionCache | None,
                 control: ControlChannel, max_body_bytes: int):
        self.registry, self.cache, self.control = registry, cache, control
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
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

    def __init__(self, registry: Registry, lifecycle: Lifecycle, reloads: ReloadTrigger,
                 max_body_bytes: int):
        self.registry, self.lifecycle, self.reloads = registry, lifecycle, reloads
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str, action: str) -> None:
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


class Uploads:
    """POST /api/v1/admin/uploads starts an upload of an artifact (ONNX or skops)
    too large for one request body; its parts follow with PATCH /api/v1/admin/uploads/{id}."""
    endpoint = "admin_upload"

    def __init__(self, store: UploadStore):
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, {"upload_id": self.store.create(), "part_bytes": PART_BYTES, "max_bytes": self.store.max_bytes},
             201)


class Upload:
    """PATCH with `Upload-Offset: <bytes so far>` and up to part_bytes of the
    artifact as the body appends a part; DELETE drops the upload."""
    endpoint = "admin_upload"

    def __init__(self, store: UploadStore):
        self.store = store

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        offset = req.get_header("Upload-Offset")
        if offset is None or not offset.isdigit():
            raise InvalidField("a part needs the header Upload-Offset: the number of bytes sent before it")
        size = self.store.append(upload_id, int(offset), req.bounded_stream, req.content_length)
        send(resp, {"upload_id": upload_id, "offset": size})

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self.store.data(upload_id)  # NotFound for an unknown upload
        self.store.remove(upload_id)
        send(resp, {"upload_id": upload_id, "removed": True})


class Keys:
    """GET lists the API keys (never their hashes); POST {"name", "scopes", "models"?, "rate"?}
    issues one and answers it, the only time it is shown. Every worker of every
    host sees the change within a second (the keys file; changed() tells this
    worker at once, and the others through the control channel)."""
    endpoint = "admin_keys"

    def __init__(self, keys: KeyFile, changed: Callable[[], None], max_body_bytes: int):
        self.keys, self.changed, self.limit = keys, changed, max_body_bytes

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, {"keys": self.keys.listing()})

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self.limit)
        unknown = sorted(body.keys() - {"name", "scopes", "models", "rate"})
        if unknown:
            raise InvalidField(f"unknown field {unknown[0][:40]!r}; a key has name, scopes, models and rate")
        if "name" not in body or "scopes" not in body:
            raise MissingField("name and scopes are required")
        key, record = self.keys.create(body["name"], body["scopes"], body.get("models"), body.get("rate"))
        self.changed()
        send(resp, {**record, "key": key}, 201)


class Key:
    """DELETE /api/v1/admin/keys/{key} revokes the active key with that id or name."""
    endpoint = "admin_keys"

    def __init__(self, keys: KeyFile, changed: Callable[[], None]):
        self.keys, self.changed = keys, changed

    def on_delete(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        record = self.keys.revoke(key)
        self.changed()
        send(resp, record)


class ModelVersions:
    """POST /api/v1/admin/models/{name}/versions publishes an upload as the next
    version of name, with the same checks as `mlserve models publish`:
    {"upload": ID, "format": "onnx"|"skops", "sha256": HEX, "features": [...],
     "task": ..., "classes": [...], "trusted_types": [...], "reference_sample": [[...]],
     "promote": false, "reason": ...}; only upload and format are required."""
    endpoint = "admin_model"
    TASKS = ("classification", "regression", "clustering")

    def __init__(self, publisher: Publisher, reloads: ReloadTrigger, store: UploadStore,
                 max_body_bytes: int):
        self.publisher, self.reloads, self.store = publisher, reloads, store
        self.lifecycle = publisher.lifecycle
        self.limit = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        body = read_json(req, self.limit)
        given = publish_fields(body, self.TASKS)
        path = self.store.artifact(given.pop("upload"), given.pop("format"))
        expected = given.pop("sha256")
        if expected and sha256_of(path) != expected.lower():
            raise ModelRefused(f"the upload's sha256 is {sha256_of(path)[:12]}..., the client sent {expected[:12]}...")
        promote, reason = given.pop("promote"), given.pop("reason")
        by = f"admin-api@{req.remote_addr}"
        # NOTE: never a pickle (allow_pickle); a skops model must convert to a
        # verified ONNX graph, so the master never rebuilds an object that came over the network.
        mv = self.publisher.publish(path, name, by=by, reason=reason, allow_pickle=False,
                                    require_onnx=path.name == "model.skops", **given)
        self.store.remove(path.parent.name)
        if promote and self.lifecycle.current(name) != mv.version:
            self.lifecycle.promote(name, mv.version, by, reason or "published with promote")
        state = self.lifecycle.serving_state(name)
        send(resp, {"model": name, "version": mv.version, "runtime": mv.metadata.get("serving_runtime"),
                    "sha256": mv.metadata.get("sha256"), "serving_version": state.get("version"),
                    "swap": self.reloads.request(f"publish {name} v{mv.version}")}, 201)


def publish_fields(body: dict, tasks: tuple[str, ...]) -> dict:
    """The publish request's fields, checked: InvalidField or MissingField names the first bad one."""
    if not isinstance(body.get("upload"), str):
        raise MissingField("upload (the id POST /api/v1/admin/uploads gave) is required")
    if body.get("format") not in ("onnx", "skops"):
        raise InvalidField("format must be onnx or skops: a pickle is never loaded from the network")
    sha = body.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise InvalidField("sha256 must be 64 hex digits")
    checks = {"features": lambda v: isinstance(v, list) and v and all(isinstance(x, str) and x for x in v),
              "task": lambda v: v in tasks,
              "classes": lambda v: isinstance(v, list) and v and all(type(x) in (str, int) for x in v),
              "trusted_types": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "reference_sample": lambda v: isinstance(v, list) and 0 < len(v) <= 64 and all(isinstance(r, list) for r in v),
              "promote": lambda v: type(v) is bool, "reason": lambda v: isinstance(v, str)}
    for key, ok in checks.items():
        if body.get(key) is not None and not ok(body[key]):
            raise InvalidField(f"{key} has the wrong type or is empty")
    return {"upload": body["upload"], "format": body["format"], "sha256": sha,
            "feature_names": body.get("features"), "task": body.get("task"), "classes": body.get("classes"),
            "trusted": body.get("trusted_types"), "sample": body.get("reference_sample"),
            "promote": bool(body.get("promote")), "reason": body.get("reason") or ""}
