"""The serving plan: which models a server serves, and what should serve for each.

config/models.yaml may list the models to serve, each with what it pins
(version, split, shadow); with no list, every model in the repository serves.
Where models.yaml pins nothing, the model's serving.json in the repository
decides (publish, promote, rollback and the admin API write it), else the
newest version serves. A model whose serving.json says it was unloaded is
not served until it is loaded again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.errors import Conflict, InvalidData, InvalidModel, ModelNotFound
from app.repository import ModelRepository, is_valid_name
from app.routing import parse_weights
from app.settings import SettingError

OPTIONS = ("version", "split", "shadow", "follow", "batching")


@dataclass(frozen=True)
class ModelPlan:
    """One model's entry in models.yaml: what it pins (None: not pinned)."""
    version: int | None = None
    split: dict[int, float] | None = None
    shadow: int | None = None
    follow: str | None = None  # models:/NAME@ALIAS this model tracks (app/alias_follower.py)
    batching: dict | None = None  # enabled, max_batch_size, max_wait_ms (app/batching.py)


@dataclass
class Target:
    """What should serve for one model, after serving.json and models.yaml."""
    version: int | None
    split: dict[int, float] = field(default_factory=dict)
    shadow: int | None = None
    previous: int | None = None
    on_disk: list[int] = field(default_factory=list)  # all kept loaded, so requests may pin any

    def versions(self) -> set[int]:
        """Every version that must be loaded."""
        return {v for v in (self.version, self.shadow, self.previous, *self.split, *self.on_disk) if v}


@dataclass(frozen=True)
class ServingPlan:
    listed: dict[str, ModelPlan] | None = None  # None: every model in the repository
    path: Path | None = None

    def names(self, repository: ModelRepository) -> list[str]:
        """The models to serve: those listed (else every one in the repository), less the unloaded."""
        names = list(self.listed) if self.listed is not None else repository.names()
        return [name for name in names if not unloaded(repository, name)]

    def get(self, name: str) -> ModelPlan:
        return (self.listed or {}).get(name) or ModelPlan()

    def allow(self, name: str, action: str) -> None:
        """Conflict when the change would be recorded but never served: the
        model is not in the list, or models.yaml pins what action changes."""
        where = self.path or "models.yaml"
        if self.listed is not None and name not in self.listed:
            raise Conflict(f"{name} is not listed in {where}, which names the models this server serves "
                           f"({', '.join(self.listed) or 'none'}); add '{name}: {{}}' under models: there, "
                           "or remove the list to serve every model in the repository")
        plan = self.get(name)
        pinned = {"promote": plan.version, "rollback": plan.version, "split": plan.split,
                  "shadow": plan.shadow, "follow": plan.follow or plan.version}.get(action)
        if pinned is not None:
            what = "version" if action in ("promote", "rollback") or not plan.follow else action
            raise Conflict(f"{name}'s {what} is pinned in {where}; change it there")

    def target(self, name: str, repository: ModelRepository) -> Target:
        on_disk = repository.versions(name)
        if not on_disk:
            raise ModelNotFound("no versions in the repository")
        state = repository.serving_state(name) or {}
        plan = self.get(name)
        # What models.yaml sets is pinned; the repository decides the rest.
        split = plan.split if plan.split is not None else parse_weights(state["split"]) if state.get("split") else {}
        shadow = plan.shadow or state.get("shadow")
        version = plan.version or state.get("version") or on_disk[-1]
        previous = state.get("previous")
        return Target(version, {v: w for v, w in split.items() if v in on_disk},
                      shadow if shadow in on_disk else None, previous if previous in on_disk else None,
                      on_disk)


def unloaded(repository: ModelRepository, name: str) -> bool:
    """Whether the model's serving.json says it was unloaded (the V2 repository API's unload)."""
    try:
        return bool((repository.serving_state(name) or {}).get("unloaded"))
    except InvalidModel:
        return False  # the registry reports the unreadable file


def read_plan(path: Path | None) -> ServingPlan:
    """The plan in models.yaml; no file, or no models listed: every model.
    SettingError names the file, the entry and what is allowed."""
    if path is None or not path.is_file():
        return ServingPlan(None, path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"{path}: cannot be read ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise SettingError(f"{path}: expected a mapping with a models: entry, got {type(data).__name__}")
    listed = (data or {}).get("models")
    if not listed:
        return ServingPlan(None, path)
    if not isinstance(listed, dict):
        raise SettingError(f"{path}: models: expected a mapping of model name to options")
    return ServingPlan({name: plan_of(path, name, options) for name, options in listed.items()}, path)


def plan_of(path: Path, name, options) -> ModelPlan:
    if not is_valid_name(name):
        raise SettingError(f"{path}: models.{name}: names match [a-z0-9][a-z0-9_-]{{0,63}}")
    if options is not None and not isinstance(options, dict):
        raise SettingError(f"{path}: models.{name}={options!r}: expected a mapping such as {{version: 2}} or {{}}")
    options = options or {}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SettingError(f"{path}: models.{name}.{unknown[0]}: unknown option; allowed: {', '.join(OPTIONS)}")
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
    return ModelPlan(options.get("version"), split, options.get("shadow"), follow_of(path, name, options),
                     batching_of(path, name, options))


def batching_of(path: Path, name: str, options: dict) -> dict | None:
    if options.get("batching") is None:
        return None
    from app.batching import check_options

    try:
        return check_options(options["batching"])
    except ValueError as exc:
        raise SettingError(f"{path}: models.{name}.batching: {exc}") from None


def follow_of(path: Path, name: str, options: dict) -> str | None:
    follow = options.get("follow")
    if follow is None:
        return None
    from app.mlflow_models import parse_model_uri

    try:
        ref = parse_model_uri(str(follow))
    except InvalidData as exc:
        raise SettingError(f"{path}: models.{name}.follow: {exc.message}") from None
    if ref.alias is None:
        raise SettingError(f"{path}: models.{name}.follow={follow!r}: expected models:/NAME@ALIAS (an alias moves; a version does not)")
    if options.get("version") is not None:
        raise SettingError(f"{path}: models.{name}: follow and version cannot both be set: following promotes what the alias names")
    return str(ref)
