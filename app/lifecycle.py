"""The model lifecycle verbs: promote, rollback, split, shadow, load and
unload (publish is in app/publishing.py).

Each checks first and changes the repository (serving.json) only when the
change is safe and would be served: a version is loaded and verified before it
may serve, and nothing that models.yaml pins is changed behind its back. The
CLI and the admin API both use these; telling running servers is the caller's
job (app/reload.py).
"""
from __future__ import annotations

from typing import Callable

from app.errors import InvalidModel, ModelNotFound, ModelRefused, VersionNotFound
from app.features import width_change
from app.loader import load
from app.plan import ServingPlan
from app.repository import ModelRepository, check_name
from app.routing import parse_weights


class Lifecycle:
    def __init__(self, repository: ModelRepository, tolerance: float,
                 read_plan: Callable[[], ServingPlan] = ServingPlan):
        self.repository = repository
        self.tolerance = tolerance
        self.read_plan = read_plan

    def allow(self, name: str, action: str) -> None:
        """Conflict when models.yaml does not serve name or pins what action changes."""
        self.read_plan().allow(check_name(name), action)

    def verify(self, name: str, version: int) -> None:
        """Load and check a version as the server would, and that it takes the
        serving version's features; ModelRefused says why not."""
        try:
            candidate = load(self.repository.get(name, version), self.tolerance)
        except InvalidModel as exc:
            raise ModelRefused(f"{name} v{version} refused: {exc}") from None
        current = self.current(name)
        if current and current != version:
            names = self.repository.get(name, current).metadata.get("feature_names") or []
            problem = width_change(candidate.n_features, names, current)
            if problem:
                raise ModelRefused(f"{name} v{version} refused: {problem}")

    def current(self, name: str) -> int | None:
        state = self.repository.serving_state(check_name(name)) or {}
        return state.get("version") or (self.repository.versions(name) or [None])[-1]

    def promote(self, name: str, version: int, by: str = "", reason: str = "") -> dict:
        """Serve version (clearing any split); the old one is remembered for rollback."""
        self.allow(name, "promote")
        self.require(name, version)
        self.verify(name, version)
        previous = self.current(name)
        return self.repository.record(name, "promote", version, by, reason,
                                      {"version": version, "previous": previous if previous != version else None,
                                       "split": {}})

    def rollback(self, name: str, by: str = "", reason: str = "") -> dict:
        """Serve the previously serving version again."""
        self.allow(name, "rollback")
        self.require_model(name)
        state = self.repository.serving_state(name) or {}
        previous = state.get("previous")
        if not previous:
            raise VersionNotFound(f"{name} has no previous version to roll back to")
        self.verify(name, previous)
        return self.repository.record(name, "rollback", previous, by, reason,
                                      {"version": previous, "previous": self.current(name), "split": {}})

    def split(self, name: str, weights, by: str = "", reason: str = "") -> dict:
        """Route traffic over versions by weight ({} or None ends the split)."""
        self.allow(name, "split")
        self.require_model(name)
        parsed = {}
        if weights:
            try:
                parsed = parse_weights(weights)
            except ValueError as exc:
                raise ModelRefused(str(exc)) from None
            for version in parsed:
                self.require(name, version)
                self.verify(name, version)
        return self.repository.record(name, "split", None, by, reason,
                                      {"split": {str(v): w for v, w in parsed.items()}})

    def shadow(self, name: str, version: int | None, by: str = "", reason: str = "") -> dict:
        """Mirror requests to version off the response path (None stops it)."""
        self.allow(name, "shadow")
        self.require_model(name)
        if version is not None:
            self.require(name, version)
            self.verify(name, version)
        return self.repository.record(name, "shadow", version, by, reason, {"shadow": version})

    def load(self, name: str, by: str = "", reason: str = "") -> dict:
        """Serve the model (again, after unload): its target version is loaded and checked first."""
        self.allow(name, "load")
        self.require_model(name)
        version = self.current(name)
        self.verify(name, version)
        return self.repository.record(name, "load", version, by, reason, {"unloaded": False})

    def unload(self, name: str, by: str = "", reason: str = "") -> dict:
        """Stop serving the model (its versions stay in the repository) until it is loaded again."""
        self.allow(name, "unload")
        self.require_model(name)
        return self.repository.record(name, "unload", None, by, reason, {"unloaded": True})

    def serving_state(self, name: str) -> dict:
        """The model's serving.json ({} when it has none)."""
        return self.repository.serving_state(check_name(name)) or {}

    def require_model(self, name: str) -> None:
        if not self.repository.versions(check_name(name)):
            raise ModelNotFound(f"no model named {name!r} in the repository {self.repository.root}",
                                available=self.repository.names())

    def require(self, name: str, version) -> None:
        if type(version) is not int or version < 1:
            raise ModelRefused(f"version must be a positive integer, got {version!r}")
        self.require_model(name)
        if version not in self.repository.versions(name):
            raise VersionNotFound(f"{name} has no version {version}", available=self.repository.versions(name))
