"""Turn a ModelVersion on disk into a LoadedModel ready to serve.

Pickle and joblib run code when loaded: they are only read from the trusted
repository directory, after their sha256 matched the metadata. A skops file
(model.skops) runs none: it is rebuilt trusting only the types its metadata
lists (app/skops_models.py).
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.batching import check_options, measure_cost
from app.conversion import Verdict, convert_and_verify
from app.errors import InvalidModel
from app.repository import ModelVersion
from app.runtimes import OnnxRuntime, Runtime, SklearnRuntime
from app.skops_models import load_skops

log = logging.getLogger(__name__)
TASKS = ("classification", "regression", "clustering")


@dataclass(eq=False)  # identity: hashable, and two loads of one version are two models
class LoadedModel:
    name: str
    version: int
    task: str
    feature_names: list[str]
    classes: list | None
    runtime: Runtime
    metadata: dict
    runtime_reason: str | None = None
    cost: dict | None = None  # measured milliseconds of one row and of a few (app/batching.py)
    feature_index: dict[str, int] = field(init=False)
    class_keys: list[str] | None = field(init=False)
    cacheable: bool = field(init=False)

    def __post_init__(self):
        self.feature_index = {n: i for i, n in enumerate(self.feature_names)}
        self.class_keys = [str(c) for c in self.classes] if self.classes is not None else None
        # A model whose metadata says it is not deterministic is never cached.
        self.cacheable = self.metadata.get("deterministic", True) is not False

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def info(self) -> dict:
        keep = ("algorithm", "created", "metrics", "source_format", "sha256", "deterministic")
        return {
            "name": self.name, "version": self.version, "task": self.task,
            "features": self.feature_names, "classes": self.classes,
            "runtime": self.runtime.name, "runtime_reason": self.runtime_reason,
            **{k: self.metadata.get(k) for k in keep},
        }


def load(mv: ModelVersion, tolerance: float, reconvert: bool = False) -> LoadedModel:
    """Load and check one version; InvalidModel says why it must not serve.
    A conversion to ONNX that failed when the version was published is not
    tried again unless reconvert asks for it."""
    try:
        return build(mv, tolerance, reconvert)
    except InvalidModel:
        raise
    except Exception as exc:
        raise InvalidModel(f"{mv}: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
    finally:
        release_free_memory()


def build(mv: ModelVersion, tolerance: float, reconvert: bool) -> LoadedModel:
    meta = mv.metadata
    if meta["artifact"] == "model.onnx":
        return from_onnx(mv)
    onnx_file = meta.get("onnx_artifact")
    if onnx_file and (meta.get("conversion") or {}).get("verified"):
        # Converted and verified when published: serve the graph, never
        # unpickle. The source artifact is still checked: it is what was published.
        mv.checked_file(meta["artifact"], "sha256")
        path = mv.checked_file(onnx_file, "onnx_sha256")
        task = require_task(mv, meta.get("task"))
        runtime = OnnxRuntime(str(path), task, meta.get("classes"))
        return assemble(mv, task, runtime, None, runtime.n_features)
    return from_estimator(mv, tolerance, reconvert)


def from_onnx(mv: ModelVersion) -> LoadedModel:
    path = mv.checked_file(mv.metadata["artifact"], "sha256")
    meta = mv.metadata
    task = require_task(mv, meta.get("task") or "classification")
    runtime = OnnxRuntime(str(path), task, meta.get("classes"), meta.get("onnx_outputs"))
    return assemble(mv, task, runtime, None, runtime.n_features)


def from_estimator(mv: ModelVersion, tolerance: float, reconvert: bool = False) -> LoadedModel:
    estimator = load_estimator(mv)
    meta = mv.metadata
    task = require_task(mv, meta.get("task") or task_of(estimator))
    n_features = int(getattr(estimator, "n_features_in_", 0)) or len(meta.get("feature_names") or [])
    classes = meta.get("classes")
    if classes is None and task == "classification":
        classes = np.asarray(estimator.classes_).tolist()
    recorded = meta.get("conversion")
    if recorded and not recorded.get("verified") and not reconvert:
        # Decided when it was published; converting again would decide the same, slowly.
        graph, verdict = None, Verdict(False, recorded.get("reason"), recorded.get("max_abs_diff"))
    else:
        sample = np.asarray(meta.get("reference_sample") or [], dtype=np.float32).reshape(-1, n_features)
        graph, verdict = convert_and_verify(estimator, task, classes, n_features, sample, tolerance)
    if graph is not None:
        runtime: Runtime = OnnxRuntime(graph, task, classes)
    else:
        runtime = SklearnRuntime(estimator, task)
        log.warning("%s served by scikit-learn, not ONNX Runtime: %s", mv, verdict.reason)
    return assemble(mv, task, runtime, verdict, n_features, classes)


def load_estimator(mv: ModelVersion):
    path = mv.checked_file(mv.metadata["artifact"], "sha256")
    if mv.metadata["artifact"] == "model.skops":
        return load_skops(path, mv.metadata.get("skops_trusted_types"))
    import joblib

    return joblib.load(path)


def assemble(mv: ModelVersion, task: str, runtime: Runtime, verdict: Verdict | None,
             n_features: int | None, classes: list | None = None) -> LoadedModel:
    meta = mv.metadata
    names = meta.get("feature_names") or [f"f{i}" for i in range(n_features or 0)]
    if not names:
        raise InvalidModel(f"{mv}: feature count unknown (no feature_names, no fixed input width)")
    if n_features is not None and n_features != len(names):
        raise InvalidModel(f"{mv}: metadata names {len(names)} features, the model takes {n_features}")
    if classes is None and task == "classification":
        classes = meta.get("classes")
    reason = verdict.reason if verdict else meta.get("runtime_reason")
    if meta.get("batching") is not None:
        try:
            check_options(meta["batching"])
        except ValueError as exc:
            raise InvalidModel(f"{mv}: metadata batching: {exc}") from None
    model = LoadedModel(mv.name, mv.version, task, list(names), classes, runtime, meta, reason)
    smoke_test(model)
    # Recorded when published; a version published before that is measured here.
    model.cost = meta.get("cost") or measure_cost(runtime, smoke_rows(model))
    return model


def smoke_rows(model: LoadedModel) -> np.ndarray:
    rows = model.metadata.get("reference_sample") or [[0.0] * model.n_features]
    return np.asarray(rows[:8], dtype=np.float32)


def smoke_test(model: LoadedModel) -> None:
    """One prediction on the reference sample (or zeros) before the model may serve."""
    rows = smoke_rows(model)
    out = model.runtime.run(rows)
    if len(out.labels) != len(rows):
        raise InvalidModel(f"{model.name} v{model.version}: model returned {len(out.labels)} labels for {len(rows)} rows")


def require_task(mv: ModelVersion, task: Any) -> str:
    if task not in TASKS:
        raise InvalidModel(f"{mv}: task {task!r} is not one of {', '.join(TASKS)}")
    return task


def task_of(estimator) -> str:
    from sklearn.base import is_classifier, is_clusterer

    if is_classifier(estimator):
        return "classification"
    if is_clusterer(estimator):
        return "clustering"
    return "regression"


def release_free_memory() -> None:
    # Loading leaves freed parse buffers in the allocator; hand them back so
    # the forked workers do not start with dead weight.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
