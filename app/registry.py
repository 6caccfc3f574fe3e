"""What is loaded and serving, as opposed to what is on disk (the repository).

What serves is decided, per model, by config/models.yaml where it pins a
version, split or shadow, else by the model's serving.json in the repository
(written by publish, promote, rollback and the admin API), else the newest
version serves.
refresh() applies changes: versions are loaded and checked before anything
switches, and a version that fails to load never replaces a serving one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.errors import Conflict, InvalidModel, ModelNotFound, ModelNotReady, VersionNotFound
from app.loader import LoadedModel, load
from app.repository import ModelRepository, is_valid_name
from app.routing import Route, parse_weights
from app.settings import SettingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlan:
    """One model's entry in config/models.yaml."""
    version: int | None = None
    split: dict[int, float] | None = None
    shadow: int | None = None

    def allow(self, name: str, action: str) -> None:
        """Conflict when models.yaml pins what action would change: the
        repository would record a change that no server applies."""
        pinned = {"promote": self.version, "rollback": self.version, "split": self.split,
                  "shadow": self.shadow}.get(action)
        if pinned is not None:
            what = "version" if action in ("promote", "rollback") else action
            raise Conflict(f"{name}'s {what} is pinned in config/models.yaml; change it there")


@dataclass
class Target:
    """What should serve for one model, after serving.json and models.yaml."""
    version: int | None
    split: dict[int, float] = field(default_factory=dict)
    shadow: int | None = None
    previous: int | None = None
    on_disk: list[int] = field(default_factory=list)  # all kept loaded, so requests may pin any

    def versions(self) -> set[int]:
        """Every version that must be loaded; a failure of the first three is refused loudly."""
        return {v for v in (self.version, self.shadow, self.previous, *self.split, *self.on_disk) if v}


def read_model_config(path: Path, repository: ModelRepository) -> dict[str, ModelPlan]:
    """{name: ModelPlan} from config/models.yaml. No file, or no models listed:
    every model in the repository."""
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    listed = (data or {}).get("models") if isinstance(data, dict) else None
    if not listed:
        return {name: ModelPlan() for name in repository.names()}
    if not isinstance(listed, dict):
        raise SettingError(f"{path}: models: expected a mapping of model name to options")
    return {name: plan_of(path, name, options) for name, options in listed.items()}


def plan_of(path: Path, name, options) -> ModelPlan:
    if not is_valid_name(name):
        raise SettingError(f"{path}: models.{name}: names match [a-z0-9][a-z0-9_-]{{0,63}}")
    if options is not None and not isinstance(options, dict):
        raise SettingError(f"{path}: models.{name}={options!r}: expected a mapping such as {{version: 2}} or {{}}")
    options = options or {}
    unknown = set(options) - {"version", "split", "shadow"}
    if unknown:
        raise SettingError(f"{path}: models.{name}.{sorted(unknown)[0]}: unknown option; allowed: version, split, shadow")
    for key in ("version", "shadow"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SettingError(f"{path}: models.{name}.{key}={value!r}: expected a positive integer")
    split = None
    if options.get("split") is not None:
        try:
            split = parse_weights(options["split"])
        except ValueError as exc:
            raise SettingError(f"{path}: models.{name}.split: {exc}") from None
    return ModelPlan(options.get("version"), split, options.get("shadow"))


class Registry:
    def __init__(self, repository: ModelRepository, plan: dict[str, ModelPlan], tolerance: float,
                 config_path: Path | None = None):
        self.repository = repository
        self.plan = {name: p if isinstance(p, ModelPlan) else ModelPlan(p) for name, p in plan.items()}
        self.tolerance = tolerance
        self.config_path = config_path
        self.loaded: dict[str, dict[int, LoadedModel]] = {}
        self.serving: dict[str, LoadedModel] = {}
        self.routes: dict[str, Route] = {}
        self.shadows: dict[str, LoadedModel] = {}
        self.failures: dict[str, str] = {}

    # --- loading ---------------------------------------------------------

    def load_all(self) -> None:
        self.refresh()

    def refresh(self) -> list[tuple[str, str, str]]:
        """Bring what is loaded in line with the repository and config.
        Returns (model, "swapped" | "refused" | "unchanged", detail) per model."""
        if self.config_path is not None:
            try:
                self.plan = read_model_config(self.config_path, self.repository)
            except (SettingError, OSError, yaml.YAMLError) as exc:
                log.error("kept the previous model list: %s", exc)
        results = [self.load_model(name) for name in self.plan]
        for name in set(self.loaded) - set(self.plan):
            self.unload(name)
        return results

    def load_model(self, name: str) -> tuple[str, str, str]:
        try:
            target = self.target(name)
        except (ModelNotFound, InvalidModel) as exc:
            return self.refuse(name, getattr(exc, "message", str(exc)))
        current = self.loaded.get(name, {})
        versions, refused = {}, {}
        for version in sorted(target.versions()):
            if version in current:
                versions[version] = current[version]
                continue
            try:
                versions[version] = load(self.repository.get(name, version), self.tolerance)
            except (InvalidModel, VersionNotFound) as exc:
                refused[version] = getattr(exc, "message", str(exc))
                log.error("refused %s v%s: %s", name, version, refused[version])
        return self.switch(name, target, versions, refused)

    def target(self, name: str) -> Target:
        on_disk = self.repository.versions(name)
        if not on_disk:
            raise ModelNotFound("no versions in the repository")
        state = self.repository.serving_state(name) or {}
        plan = self.plan.get(name, ModelPlan())
        # What config/models.yaml sets is pinned; the repository decides the rest.
        split = plan.split if plan.split is not None else parse_weights(state["split"]) if state.get("split") else {}
        shadow = plan.shadow or state.get("shadow")
        version = plan.version or state.get("version") or on_disk[-1]
        previous = state.get("previous")
        return Target(version, {v: w for v, w in split.items() if v in on_disk},
                      shadow if shadow in on_disk else None, previous if previous in on_disk else None,
                      on_disk)

    def switch(self, name: str, target: Target, versions: dict, refused: dict) -> tuple[str, str, str]:
        old = self.serving.get(name)
        new = versions.get(target.version)
        if new is not None and old is not None and new.n_features != old.n_features:
            # Clients send old.n_features values: a swap would break every one of them.
            refused[target.version] = f"it takes {new.n_features} features, v{old.version} takes {old.n_features}"
            new = None
        if new is None:
            reason = f"version {target.version} did not load: {refused.get(target.version, 'not in the repository')}"
            if old is not None:  # the old version keeps serving
                log.error("%s stays on v%s: %s", name, old.version, reason)
                return name, "refused", reason
            self.loaded[name] = versions  # still pinnable
            return self.refuse(name, reason)
        self.loaded[name] = versions
        self.serving[name] = new
        self.failures.pop(name, None)
        self.set_routes(name, target, versions)
        changed = old is None or old is not new
        if changed:
            log.info("serving %s v%s on %s", name, new.version, new.runtime.name)
        return name, "swapped" if changed else "unchanged", f"v{new.version}"

    def set_routes(self, name: str, target: Target, versions: dict) -> None:
        weighted = [(versions[v], w) for v, w in sorted(target.split.items()) if v in versions]
        if weighted and sum(w for _, w in weighted) > 0:
            self.routes[name] = Route(weighted)
        else:
            self.routes.pop(name, None)
        if target.shadow in versions and target.shadow != target.version:
            self.shadows[name] = versions[target.shadow]
        else:
            self.shadows.pop(name, None)

    def refuse(self, name: str, reason: str) -> tuple[str, str, str]:
        self.failures[name] = reason
        self.loaded.setdefault(name, {})
        log.error("%s is not serving: %s", name, reason)
        return name, "refused", reason

    def unload(self, name: str) -> None:
        for table in (self.loaded, self.serving, self.routes, self.shadows, self.failures):
            table.pop(name, None)

    # --- serving ---------------------------------------------------------

    def resolve(self, name: str, version: int | None = None, key: str | None = None) -> LoadedModel:
        """The model that answers for name: a pinned version, else the split's
        pick for the routing key, else the serving version."""
        if version is None:
            route = self.routes.get(name)
            if route is not None:
                return route.pick(key)
            model = self.serving.get(name)
            if model is not None:
                return model
        versions = self.loaded.get(name)
        if versions is None:
            raise ModelNotFound(f"no model named {name[:80]!r}", available=sorted(self.loaded))
        if version is None:
            raise ModelNotReady(f"{name} is not serving: {self.failures.get(name)}")
        model = versions.get(version)
        if model is None:
            raise VersionNotFound(f"{name} has no loaded version {version}", available=sorted(versions))
        return model

    def not_ready(self) -> dict[str, str]:
        return {name: self.failures.get(name, "not loaded") for name in self.plan if name not in self.serving}

    def describe(self, name: str) -> dict:
        if name not in self.loaded:
            raise ModelNotFound(f"no model named {name[:80]!r}", available=sorted(self.loaded))
        serving = self.serving.get(name)
        route = self.routes.get(name)
        shadow = self.shadows.get(name)
        return {
            **(serving.info() if serving else {"name": name}),
            "serving_version": serving.version if serving else None,
            "versions": sorted(self.loaded[name]),
            "split": {str(v): w for v, w in route.weights.items()} if route else None,
            "shadow_version": shadow.version if shadow else None,
            "status": "serving" if serving else "not_ready",
            "reason": self.failures.get(name),
        }
