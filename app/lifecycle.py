"""The model lifecycle verbs: publish, promote, rollback, split, shadow.

Each checks first and changes the repository (serving.json) only when the
change is safe: a version is loaded and verified before it may serve. The CLI
and the admin API both use these; telling running servers is the caller's job
(app/swap.py).
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from app.errors import InvalidModel, ModelNotFound, ModelRefused, VersionNotFound
from app.loader import load
from app.repository import ModelRepository, ModelVersion, check_name, sha256_of
from app.routing import parse_weights

SAMPLE_ROWS = 64


class Lifecycle:
    def __init__(self, repository: ModelRepository, tolerance: float):
        self.repository = repository
        self.tolerance = tolerance

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
            if names and len(names) != candidate.n_features:
                raise ModelRefused(f"{name} v{version} refused: it takes {candidate.n_features} features, "
                                   f"v{current} takes {len(names)}; clients would break")

    def current(self, name: str) -> int | None:
        state = self.repository.serving_state(check_name(name)) or {}
        return state.get("version") or (self.repository.versions(name) or [None])[-1]

    def promote(self, name: str, version: int, by: str = "", reason: str = "") -> dict:
        """Serve version (clearing any split); the old one is remembered for rollback."""
        self.require(name, version)
        self.verify(name, version)
        previous = self.current(name)
        return self.repository.record(name, "promote", version, by, reason,
                                      {"version": version, "previous": previous if previous != version else None,
                                       "split": {}})

    def rollback(self, name: str, by: str = "", reason: str = "") -> dict:
        """Serve the previously serving version again."""
        state = self.repository.serving_state(check_name(name)) or {}
        previous = state.get("previous")
        if not previous:
            raise VersionNotFound(f"{name} has no previous version to roll back to")
        self.verify(name, previous)
        return self.repository.record(name, "rollback", previous, by, reason,
                                      {"version": previous, "previous": self.current(name), "split": {}})

    def split(self, name: str, weights, by: str = "", reason: str = "") -> dict:
        """Route traffic over versions by weight ({} or None ends the split)."""
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
        if version is not None:
            self.require(name, version)
            self.verify(name, version)
        return self.repository.record(name, "shadow", version, by, reason, {"shadow": version})

    def require(self, name: str, version) -> None:
        if type(version) is not int or version < 1:
            raise ModelRefused(f"version must be a positive integer, got {version!r}")
        if not self.repository.versions(check_name(name)):
            raise ModelNotFound(f"no model named {name!r} in the repository")
        if version not in self.repository.versions(name):
            raise VersionNotFound(f"{name} has no version {version}", available=self.repository.versions(name))

    # --- publish ----------------------------------------------------------

    def publish(self, path: Path, name: str, feature_names: list[str] | None = None, task: str | None = None,
                classes: list | None = None, by: str = "", reason: str = "") -> ModelVersion:
        """Copy an artifact into the repository as the next version of name,
        after it loads, matches the current version's input width and gives
        answers on the reference sample. ModelRefused says why not."""
        check_name(name)
        path = Path(path)
        if not path.is_file():
            raise ModelRefused(f"{path}: no such file")
        current = self.current_metadata(name)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            files, metadata = self.onnx_version(path, current, feature_names, task, classes)
        elif suffix in (".joblib", ".pkl"):
            return self.estimator_version(path, name, current, feature_names, by, reason)
        else:
            raise ModelRefused(f"{path}: artifacts are .onnx, .joblib or .pkl")
        return self.add(name, files, metadata, by, reason)

    def add(self, name: str, files: dict, metadata: dict, by: str, reason: str) -> ModelVersion:
        return self.repository.add_version(name, files, metadata, check=self.check_staged, by=by, reason=reason)

    def check_staged(self, staged: ModelVersion) -> None:
        """The staged version loads and answers its reference sample, or ModelRefused."""
        try:
            load(staged, self.tolerance)
        except InvalidModel as exc:
            raise ModelRefused(f"refused: {exc}") from None

    def current_metadata(self, name: str) -> dict | None:
        version = self.current(name)
        return self.repository.get(name, version).metadata if version else None

    def onnx_version(self, path: Path, current: dict | None, feature_names, task, classes) -> tuple[dict, dict]:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise ModelRefused(f"{path}: not a loadable ONNX model ({str(exc)[:200]})") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        width = inputs[0].shape[-1] if len(inputs) == 1 and len(inputs[0].shape) == 2 else None
        if not isinstance(width, int):
            raise ModelRefused(f"{path}: the graph must take one 2-D input with a fixed feature count")
        names = [o.name for o in outputs]
        out_width = outputs[-1].shape[-1] if len(outputs[-1].shape) == 2 else 1
        task = task or ("classification" if {"label", "probabilities"} <= set(names) or out_width > 1
                        else "regression")
        if task == "classification" and classes is None:
            classes = (current or {}).get("classes") or list(range(out_width if isinstance(out_width, int) else 2))
        metadata = self.common_metadata(path, width, current, feature_names, "onnx")
        metadata.update(task=task, classes=classes if task == "classification" else None,
                        artifact="model.onnx", sha256=sha256_of(path), serving_runtime="onnx")
        return {"model.onnx": path}, metadata

    def estimator_version(self, path: Path, name: str, current: dict | None, feature_names, by: str,
                          reason: str) -> ModelVersion:
        import joblib

        from app.training import publish_estimator

        # A local file the operator names: trusted like the repository itself.
        # Nothing received over the network is ever unpickled.
        try:
            estimator = joblib.load(path)
        except Exception as exc:  # unpickling raises anything
            raise ModelRefused(f"{path}: cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})") from None
        width = getattr(estimator, "n_features_in_", None)
        if not isinstance(width, int):
            raise ModelRefused(f"{path}: not a fitted scikit-learn estimator (no n_features_in_)")
        metadata = self.common_metadata(path, width, current, feature_names, path.suffix.lstrip("."))
        sample = np.asarray(metadata["reference_sample"], dtype=np.float64)
        return publish_estimator(self.repository, name, estimator, sample, metadata["feature_names"],
                                 (current or {}).get("metrics") or {}, self.tolerance,
                                 extra={"published_from": str(path)}, check=self.check_staged, by=by,
                                 reason=reason, stats=(current or {}).get("reference_stats"))

    def common_metadata(self, path: Path, width: int, current: dict | None, feature_names, source: str) -> dict:
        if current is not None and len(current.get("feature_names") or []) != width:
            raise ModelRefused(f"{path} takes {width} features; the serving version takes "
                               f"{len(current['feature_names'])} ({', '.join(current['feature_names'])})")
        names = feature_names or (current or {}).get("feature_names") or [f"f{i}" for i in range(width)]
        if len(names) != width:
            raise ModelRefused(f"{len(names)} feature names given; the model takes {width}")
        sample = (current or {}).get("reference_sample")
        if not sample:
            # No earlier version to borrow real rows from: a fixed synthetic sample.
            sample = np.random.default_rng(0).normal(size=(SAMPLE_ROWS, width)).astype(np.float32).tolist()
        return {"feature_names": list(names), "reference_sample": sample, "source_format": source,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "deterministic": True}
