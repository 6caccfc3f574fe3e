"""Publishing: an artifact (or a fitted estimator) becomes the next version of
a model in the repository, after it loads, takes the serving version's
features and answers its reference sample. A scikit-learn estimator is
converted to ONNX, and the ONNX graph kept when it is verified equivalent.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import joblib
import numpy as np

from app.clock import utc_now
from app.conversion import algorithm_of, convert_and_verify
from app.drift import Schema, build_reference
from app.errors import InvalidData, InvalidModel, ModelRefused
from app.features import width_change
from app.lifecycle import Lifecycle
from app.loader import load, task_of
from app.repository import ModelRepository, ModelVersion, check_name, sha256_of
from app.runtimes import OnnxRuntime, SklearnRuntime, open_session, signature

REFERENCE_ROWS = 64
Check = Callable[[ModelVersion], None]
Progress = Callable[[str], None]  # told each slow step as it starts


def silent(step: str) -> None:
    pass


def publish_estimator(repository: ModelRepository, name: str, estimator, X: np.ndarray,
                      feature_names: list[str], metrics: dict, tolerance: float = 1e-5,
                      extra: dict | None = None, check: Check | None = None, by: str = "", reason: str = "",
                      stats: dict | None = None, reference: dict | None = None, training: bool = True,
                      progress: Progress = silent) -> ModelVersion:
    """Save a fitted estimator as the next version of name, with its ONNX
    conversion when verified equivalent on a reference sample of X. check, if
    given, may refuse the staged version before it is added. The drift
    reference is `reference` if given, else X's when X is the training data."""
    task = task_of(estimator)
    rng = np.random.default_rng(0)
    sample = X[rng.choice(len(X), size=min(REFERENCE_ROWS, len(X)), replace=False)].astype(np.float32)
    classes = np.asarray(estimator.classes_).tolist() if task == "classification" else None
    graph, verdict = convert_and_verify(estimator, task, classes, X.shape[1], sample, tolerance, progress)
    if not verdict.verified:
        progress(f"not converted: {verdict.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"writing {name}'s next version to {repository.root / name}")
        files = {"model.joblib": Path(tmp) / "model.joblib"}
        joblib.dump(estimator, files["model.joblib"])
        metadata = {
            "task": task,
            "algorithm": algorithm_of(estimator),
            "feature_names": feature_names,
            "classes": classes,
            "created": utc_now(precise=False),
            "metrics": metrics,
            "artifact": "model.joblib",
            "sha256": sha256_of(files["model.joblib"]),
            "source_format": "joblib",
            "serving_runtime": "onnx" if graph else "sklearn",
            "conversion": verdict.as_dict(),
            "deterministic": True,
            "reference_stats": stats or reference_stats(X, feature_names),
            "reference_sample": sample.tolist(),
            **(extra or {}),
        }
        if reference is None and training:
            try:
                labels = SklearnRuntime(estimator, task).run(X).labels.tolist()
            except ValueError as exc:  # an estimator that cannot answer new rows (a non-euclidean DBSCAN)
                raise ModelRefused(f"{name} refused: {exc}") from None
            reference = build_reference(X, labels, Schema(feature_names, task, classes), "training",
                                        (extra or {}).get("training_data"))
        if reference is not None:
            metadata["drift_reference"] = reference
        if graph is not None:
            files["model.onnx"] = Path(tmp) / "model.onnx"
            files["model.onnx"].write_bytes(graph)
            metadata.update(onnx_artifact="model.onnx", onnx_sha256=sha256_of(files["model.onnx"]))
        return repository.add_version(name, files, metadata, check=check, by=by, reason=reason)


def read_reference(path: Path, feature_names: list[str]) -> np.ndarray:
    """Rows of a CSV whose header names every feature (other columns are ignored), in feature order."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise InvalidData(f"{path}: {exc.strerror or exc}") from None
    if len(rows) < 2:
        raise InvalidData(f"{path}: a reference needs a header and at least one row")
    header = [h.strip() for h in rows[0]]
    missing = [n for n in feature_names if n not in header]
    if missing:
        raise InvalidData(f"{path}: the header must name every feature ({', '.join(feature_names)}); "
                          f"missing {', '.join(missing)}")
    columns = [header.index(n) for n in feature_names]
    try:
        X = np.array([[float(row[c]) for c in columns] for row in rows[1:] if row], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise InvalidData(f"{path}: reference values must be numbers ({exc})") from None
    if not np.isfinite(X).all():
        raise InvalidData(f"{path}: reference values must be finite")
    return X


def reference_stats(X: np.ndarray, feature_names: list[str]) -> dict:
    """Per-feature statistics of the training data, the baseline for drift checks."""
    q = np.percentile(X, [5, 25, 50, 75, 95], axis=0)
    return {name: {"mean": float(X[:, i].mean()), "std": float(X[:, i].std()),
                   "min": float(X[:, i].min()), "max": float(X[:, i].max()),
                   "p05": float(q[0, i]), "p25": float(q[1, i]), "p50": float(q[2, i]),
                   "p75": float(q[3, i]), "p95": float(q[4, i])}
            for i, name in enumerate(feature_names)}


class Publisher:
    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle
        self.repository = lifecycle.repository
        self.tolerance = lifecycle.tolerance

    def publish(self, path: Path, name: str, feature_names: list[str] | None = None, task: str | None = None,
                classes: list | None = None, by: str = "", reason: str = "",
                reference: Path | None = None, progress: Progress = silent) -> ModelVersion:
        """Copy an artifact into the repository as the next version of name.
        ModelRefused (or Conflict, when no server would serve it) says why not.
        reference: a CSV of data like the training data, for drift (else the
        version learns its reference from the first rows it serves)."""
        self.lifecycle.allow(check_name(name), "publish")
        path = Path(path)
        if not path.is_file():
            raise ModelRefused(f"{path}: no such file")
        current = self.current_metadata(name)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            progress(f"loading {path}")
            files, metadata = self.onnx_version(path, current, feature_names, task, classes)
            if reference is not None:
                progress(f"reading the drift reference {reference}")
                X = read_reference(reference, metadata["feature_names"])
                runtime = OnnxRuntime(str(path), metadata["task"], metadata.get("classes"))
                labels = runtime.run(X.astype(np.float32)).labels.tolist()
                metadata["drift_reference"] = build_reference(
                    X, labels, Schema(metadata["feature_names"], metadata["task"], metadata.get("classes")),
                    "file", str(reference))
            progress(f"checking it and writing {name}'s next version")
            return self.repository.add_version(name, files, metadata, check=self.check_staged, by=by,
                                               reason=reason)
        if suffix in (".joblib", ".pkl"):
            progress(f"loading {path}")
            return self.estimator_version(path, name, current, feature_names, by, reason, reference, progress)
        raise ModelRefused(f"{path}: artifacts are .onnx, .joblib or .pkl")

    def check_staged(self, staged: ModelVersion) -> None:
        """The staged version loads and answers its reference sample, or ModelRefused."""
        try:
            load(staged, self.tolerance)
        except InvalidModel as exc:
            raise ModelRefused(f"refused: {exc}") from None

    def current_metadata(self, name: str) -> dict | None:
        version = self.lifecycle.current(name)
        return self.repository.get(name, version).metadata if version else None

    def onnx_version(self, path: Path, current: dict | None, feature_names, task, classes) -> tuple[dict, dict]:
        try:
            sig = signature(open_session(str(path)))
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise ModelRefused(f"{path}: not a loadable ONNX model ({str(exc)[:200]})") from None
        if len(sig.input_names) != 1 or sig.width is None:
            raise ModelRefused(f"{path}: the graph must take one 2-D input with a fixed feature count")
        out_width = sig.output_width
        task = task or ("classification" if {"label", "probabilities"} <= set(sig.outputs) or (out_width or 2) > 1
                        else "regression")
        if task == "classification" and classes is None:
            classes = (current or {}).get("classes") or list(range(out_width or 2))
        metadata = self.common_metadata(path, sig.width, current, feature_names, "onnx")
        metadata.update(task=task, classes=classes if task == "classification" else None,
                        artifact="model.onnx", sha256=sha256_of(path), serving_runtime="onnx")
        return {"model.onnx": path}, metadata

    def estimator_version(self, path: Path, name: str, current: dict | None, feature_names, by: str,
                          reason: str, reference: Path | None, progress: Progress) -> ModelVersion:
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
        drift = None
        if reference is not None:
            names = metadata["feature_names"]
            X = read_reference(reference, names)
            task = task_of(estimator)
            classes = np.asarray(estimator.classes_).tolist() if task == "classification" else None
            labels = SklearnRuntime(estimator, task).run(X).labels.tolist()
            drift = build_reference(X, labels, Schema(names, task, classes), "file", str(reference))
        # The sample is borrowed from the serving version (or synthetic): not training data.
        return publish_estimator(self.repository, name, estimator, sample, metadata["feature_names"],
                                 (current or {}).get("metrics") or {}, self.tolerance,
                                 extra={"published_from": str(path)}, check=self.check_staged, by=by,
                                 reason=reason, stats=(current or {}).get("reference_stats"), reference=drift,
                                 training=False, progress=progress)

    def common_metadata(self, path: Path, width: int, current: dict | None, feature_names, source: str) -> dict:
        serving = (current or {}).get("feature_names") or []
        problem = width_change(width, serving, (current or {}).get("version"))
        if problem:
            raise ModelRefused(f"{path} refused: {problem}")
        names = feature_names or serving or [f"f{i}" for i in range(width)]
        if len(names) != width:
            raise ModelRefused(f"{len(names)} feature names given; the model takes {width}")
        sample = (current or {}).get("reference_sample")
        if not sample:
            # No earlier version to borrow real rows from: a fixed synthetic sample.
            sample = np.random.default_rng(0).normal(size=(REFERENCE_ROWS, width)).astype(np.float32).tolist()
        return {"feature_names": list(names), "reference_sample": sample, "source_format": source,
                "created": utc_now(precise=False), "deterministic": True}
