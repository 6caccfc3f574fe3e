"""What is loaded and serving, as opposed to what is on disk (the repository)."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from app.errors import InvalidModel, ModelNotFound, ModelNotReady, VersionNotFound
from app.loader import LoadedModel, load
from app.repository import ModelRepository, is_valid_name
from app.settings import SettingError

log = logging.getLogger(__name__)


def read_model_config(path: Path, repository: ModelRepository) -> dict[str, int | None]:
    """{name: pinned version or None (serve the newest)} from config/models.yaml.
    No file, or no models listed: every model in the repository."""
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    listed = (data or {}).get("models") if isinstance(data, dict) else None
    if not listed:
        return {name: None for name in repository.names()}
    if not isinstance(listed, dict):
        raise SettingError(f"{path}: models: expected a mapping of model name to options")
    plan = {}
    for name, options in listed.items():
        if not is_valid_name(name):
            raise SettingError(f"{path}: models.{name}: names match [a-z0-9][a-z0-9_-]{{0,63}}")
        if options is not None and not isinstance(options, dict):
            raise SettingError(f"{path}: models.{name}={options!r}: expected a mapping such as {{version: 2}} or {{}}")
        version = (options or {}).get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise SettingError(f"{path}: models.{name}.version={version!r}: expected a positive integer")
        plan[name] = version
    return plan


class Registry:
    def __init__(self, repository: ModelRepository, plan: dict[str, int | None], tolerance: float):
        self.repository = repository
        self.plan = plan
        self.tolerance = tolerance
        self.loaded: dict[str, dict[int, LoadedModel]] = {}
        self.serving: dict[str, LoadedModel] = {}
        self.failures: dict[str, str] = {}

    def load_all(self) -> None:
        for name in self.plan:
            self.load_model(name)

    def load_model(self, name: str) -> None:
        """Load every version of name on disk; serve the pinned or newest one."""
        versions: dict[int, LoadedModel] = {}
        refused: dict[int, str] = {}
        try:
            on_disk = self.repository.versions(name)
        except ModelNotFound as exc:
            on_disk, self.failures[name] = [], exc.message
        for version in on_disk:
            try:
                versions[version] = load(self.repository.get(name, version), self.tolerance)
            except InvalidModel as exc:
                refused[version] = str(exc)
                log.error("refused %s v%s: %s", name, version, exc)
        want = self.plan.get(name) or (on_disk[-1] if on_disk else None)
        self.loaded[name] = versions
        if want in versions:
            self.serving[name] = versions[want]
            self.failures.pop(name, None)
            log.info("serving %s v%s on %s", name, want, versions[want].runtime.name)
        else:
            self.serving.pop(name, None)
            self.failures[name] = (f"version {want} did not load: {refused.get(want, 'not in the repository')}"
                                   if want else self.failures.get(name, "no versions in the repository"))
            log.error("%s is not serving: %s", name, self.failures[name])

    def resolve(self, name: str, version: int | None = None) -> LoadedModel:
        """The model that answers for name (and a pinned version, if given)."""
        if version is None:
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
        return {
            **(serving.info() if serving else {"name": name}),
            "serving_version": serving.version if serving else None,
            "versions": sorted(self.loaded[name]),
            "status": "serving" if serving else "not_ready",
        }
