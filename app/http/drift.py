"""GET /api/v1/models/{name}/drift: data drift of a loaded version (the serving
one unless ?version=N), as app/drift.py measures it over this host's workers."""
from __future__ import annotations

import falcon

from app.drift import DriftMonitor
from app.errors import InvalidField
from app.http.resources import send
from app.registry import Registry
from app.repository import VERSION_RE


class ModelDrift:
    endpoint = "model_drift"

    def __init__(self, registry: Registry, drift: DriftMonitor | None):
        self.registry = registry
        self.drift = drift

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        state = self.registry.state(name)
        raw = req.get_param("version")
        if raw is not None and not VERSION_RE.fullmatch(raw):
            raise InvalidField("version must be a positive integer")
        model = state.resolve(int(raw) if raw is not None else None)
        req.context.model = model
        if self.drift is None:
            send(resp, {"model": model.name, "version": model.version, "enabled": False, "status": "disabled",
                        "reference": None, "features": [], "prediction": None})
        else:
            send(resp, self.drift.report(model))
