"""What is loaded and serving, as opposed to what is on disk (the repository).

One ModelState per model holds everything the server has of it; a change
builds a new state and replaces the old one whole, so a request sees either
the old state or the new one. refresh() brings the states in line with the
serving plan: versions are loaded and checked before anything switches, and a
version that fails to load never replaces a serving one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

from app.batching import BatchPolicy, policy_of
from app.errors import InvalidModel, ModelNotFound, ModelNotReady, VersionNotFound
from app.features import width_change
from app.loader import LoadedModel, load
from app.plan import ServingPlan, Target
from app.repository import ModelRepository
from app.routing import Route
from app.settings import SettingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelState:
    """One model as the server holds it."""
    name: str
    target: Target | None = None
    versions: dict[int, LoadedModel] = field(default_factory=dict)  # loaded: requests may pin any
    serving: LoadedModel | None = None
    route: Route | None = None            # a traffic split, when there is one
    shadow: LoadedModel | None = None     # mirrored off the response path
    failure: str | None = None            # why it is not serving (or why the last change was refused)
    policies: dict[int, BatchPolicy] = field(default_factory=dict)  # per loaded version (app/batching.py)
    batching: dict[LoadedModel, BatchPolicy] = field(default_factory=dict)  # the versions that batch

    def resolve(self, version: int | None = None, key: str | None = None) -> LoadedModel:
        """A pinned version, else the split's pick for the routing key, else the serving version."""
        if version is None:
            if self.route is not None:
                return self.route.pick(key)
            if self.serving is not None:
                return self.serving
            raise ModelNotReady(f"{self.name} is not serving: {self.failure}")
        model = self.versions.get(version)
        if model is None:
            raise VersionNotFound(f"{self.name} has no loaded version {version}", available=sorted(self.versions))
        return model

    def describe(self) -> dict:
        serving, route = self.serving, self.route
        return {
            **(serving.info() if serving else {"name": self.name}),
            "serving_version": serving.version if serving else None,
            "versions": sorted(self.versions),
            "split": {str(v): w for v, w in route.weights.items()} if route else None,
            "shadow_version": self.shadow.version if self.shadow else None,
            "status": "serving" if serving else "not_ready",
            "reason": self.failure,
            "batching": self.policies[serving.version].describe(serving.cost)
            if serving and serving.version in self.policies else None,
        }


Result = tuple[str, str, str]  # (model, "swapped" | "refused" | "unchanged", detail)


class Registry:
    def __init__(self, repository: ModelRepository, read_plan: Callable[[], ServingPlan], tolerance: float,
                 reconvert: bool = False):
        self.repository = repository
        self.read_plan = read_plan
        self.tolerance = tolerance
        self.reconvert = reconvert
        self.plan = ServingPlan()
        self.models: dict[str, ModelState] = {}

    # --- loading ---------------------------------------------------------

    def refresh(self) -> list[Result]:
        """Bring what is loaded in line with the repository and the plan."""
        try:
            self.plan = self.read_plan()
        except SettingError as exc:
            log.error("kept the previous model list: %s", exc)
        names = self.plan.names(self.repository)
        results = [self.load_model(name) for name in names]
        self.models = {name: self.models[name] for name in names}
        return results

    def load_model(self, name: str) -> Result:
        old = self.models.get(name) or ModelState(name)
        try:
            target = self.plan.target(name, self.repository)
        except (ModelNotFound, InvalidModel) as exc:
            # A serving version keeps serving (an unreadable serving.json, say).
            return self.refuse(replace(old, failure=getattr(exc, "message", str(exc))))
        versions, refused = {}, {}
        for version in sorted(target.versions()):
            if version in old.versions:
                versions[version] = old.versions[version]
                continue
            try:
                versions[version] = load(self.repository.get(name, version), self.tolerance, self.reconvert)
            except (InvalidModel, VersionNotFound) as exc:
                refused[version] = getattr(exc, "message", str(exc))
                log.error("refused %s v%s: %s", name, version, refused[version])
        return self.switch(old, target, versions, refused)

    def switch(self, old: ModelState, target: Target, versions: dict, refused: dict) -> Result:
        name, current = old.name, old.serving
        new = versions.get(target.version)
        problem = width_change(new.n_features, current.feature_names, current.version) \
            if new is not None and current is not None else None
        if problem:
            refused[target.version], new = problem, None
        if new is None:
            reason = f"version {target.version} did not load: {refused.get(target.version, 'not in the repository')}"
            if current is not None:  # the old version keeps serving
                log.error("%s stays on v%s: %s", name, current.version, reason)
                return name, "refused", reason
            return self.refuse(ModelState(name, target, versions, failure=reason,  # still pinnable
                                          **batching_of(self.plan.get(name).batching, versions)))
        self.models[name] = ModelState(name, target, versions, new, route_of(target, versions),
                                       shadow_of(target, versions), **batching_of(self.plan.get(name).batching, versions))
        if current is new:
            return name, "unchanged", f"v{new.version}"
        log.info("serving %s v%s on %s", name, new.version, new.runtime.name)
        return name, "swapped", f"v{new.version}"

    def refuse(self, state: ModelState) -> Result:
        self.models[state.name] = state
        if state.serving is None:
            log.error("%s is not serving: %s", state.name, state.failure)
        else:
            log.error("%s stays on v%s: %s", state.name, state.serving.version, state.failure)
        return state.name, "refused", state.failure or ""

    # --- serving ---------------------------------------------------------

    def state(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            raise ModelNotFound(f"no model named {name[:80]!r}", available=sorted(self.models))
        return state

    def resolve(self, name: str, version: int | None = None, key: str | None = None) -> LoadedModel:
        return self.state(name).resolve(version, key)

    def serving(self) -> dict[str, LoadedModel]:
        return {name: s.serving for name, s in self.models.items() if s.serving is not None}

    def not_ready(self) -> dict[str, str]:
        return {name: s.failure or "not loaded" for name, s in self.models.items() if s.serving is None}

    def describe(self, name: str) -> dict:
        return self.state(name).describe()


def batching_of(configured: dict | None, versions: dict[int, LoadedModel]) -> dict:
    """ModelState's policies (every version) and batching (those that batch)."""
    policies = {v: policy_of(configured, m.metadata, m.cost) for v, m in versions.items()}
    return {"policies": policies, "batching": {versions[v]: p for v, p in policies.items() if p.enabled}}


def route_of(target: Target, versions: dict) -> Route | None:
    weighted = [(versions[v], w) for v, w in sorted(target.split.items()) if v in versions]
    return Route(weighted) if weighted and sum(w for _, w in weighted) > 0 else None


def shadow_of(target: Target, versions: dict) -> LoadedModel | None:
    return versions[target.shadow] if target.shadow in versions and target.shadow != target.version else None
