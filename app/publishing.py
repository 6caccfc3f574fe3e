"""Publishing: an artifact (or a fitted estimator) becomes the next version of
a model in the repository, after it loads, takes the serving version's
features and answers its reference sample. A scikit-learn estimator is
converted to ONNX, and the ONNX graph kept when it is verified equivalent.
"""
from __future__ import annotations

import functools
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
from app.repository import SOURCE_FORMATS, ModelRepository, ModelVersion, check_name, sha256_of
from app.runtimes import OnnxRuntime, SklearnRuntime, open_session, signature
from app.skops_models import load_skops

REFERENCE_ROWS = 64
Check = Callable[[ModelVersion], "dict | None"]  # may return metadata to add
Progress = Callable[[str], None]  # told each slow step as it starts


def silent(step: str) -> None:
    pass


def publish_estimator(repository: ModelRepository, name: str, estimator, X: np.ndarray,
                      feature_names: list[str], metrics: dict, tolerance: float = 1e-5,
                      extra: dict | None = None, check: Check | None = None, by: str = "", reason: str = "",
                      stats: dict | None = None, artifact: tuple[str, Path] | None = None,
                      reference: dict | None = None, training: bool = True, progress: Progress = silent) -> ModelVersion:
    """Save a fitted estimator as the next version of name, with its ONNX
    conversion when verified equivalent on a reference sample of X. check, if
    given, may refuse the staged version before it is added. artifact, if
    given, is (filename, path) of the file to keep as the source (a model.skops,
    say) instead of a joblib dump of the estimator. The drift reference is
    `reference` if given, else X's when X is the training data."""
    task = task_of(estimator)
    rng = np.random.default_rng(0)
    sample = X[rng.choice(len(X), size=min(REFERENCE_ROWS, len(X)), replace=False)].astype(np.float32)
    classes = np.asarray(estimator.classes_).tolist() if task == "classification" else None
    graph, verdict = convert_and_verify(estimator, task, classes, X.shape[1], sample, tolerance, progress)
    if not verdict.verified:
        progress(f"not converted: {verdict.reason}")
    if reference is None and training:
        reference = training_reference(name, estimator, task, classes, X, feature_names, (extra or {}).get("training_data"))
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"writing {name}'s next version to {repository.root / name}")
        filename, source = artifact or ("model.joblib", Path(tmp) / "model.joblib")
        files = {filename: Path(source)}
        if artifact is None:
            joblib.dump(estimator, files["model.joblib"])
        metadata = {
            "task": task,
            "algorithm": algorithm_of(estimator),
            "feature_names": feature_names,
            "classes": classes,
            "created": utc_now(precise=False),
            "metrics": metrics,
            "artifact": filename,
            "sha256": sha256_of(files[filename]),
            "source_format": SOURCE_FORMATS[filename],
            "serving_runtime": "onnx" if graph else "sklearn",
            "conversion": verdict.as_dict(),
            "deterministic": True,
            "reference_stats": stats or reference_stats(X, feature_names),
            "reference_sample": sample.tolist(),
            **(extra or {}),
        }
        if reference is not None:
            metadata["drift_reference"] = reference
        if graph is not None:
            files["model.onnx"] = Path(tmp) / "model.onnx"
            files["model.onnx"].write_bytes(graph)
            metadata.update(onnx_artifact="model.onnx", onnx_sha256=sha256_of(files["model.onnx"]))
        return repository.add_version(name, files, metadata, by=by, reason=reason,
                                      check=check or functools.partial(loads_and_costs, tolerance=tolerance))


def loads_and_costs(staged: ModelVersion, tolerance: float) -> dict:
    """The staged version loads and answers its reference sample, or ModelRefused; the
    cost of a row measured as it loaded, recorded with the version (app/batching.py)."""
    try:
        model = load(staged, tolerance)
    except InvalidModel as exc:
        raise ModelRefused(f"refused: {exc}") from None
    return {"cost": model.cost}


def training_reference(name: str, estimator, task: str, classes, X: np.ndarray, feature_names: list[str],
                       source: str | None) -> dict:
    """The drift reference of a version trained on X: its histograms, and its predictions' on X."""
    try:
        labels = SklearnRuntime(estimator, task).run(X).labels.tolist()
    except ValueError as exc:  # an estimator that cannot answer new rows (a non-euclidean DBSCAN)
        raise ModelRefused(f"{name} refused: {exc}") from None
    return build_reference(X, labels, Schema(feature_names, task, classes), "training", source)


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
                classes: list | None = None, by: str = "", reason: str = "", *, trusted: list[str] | None = None,
                sample: list | None = None, extra: dict | None = None, allow_pickle: bool = True,
                require_onnx: bool = False, reference: Path | None = None, progress: Progress = silent) -> ModelVersion:
        """Copy an artifact (.onnx, .skops, .joblib, .pkl, or an MLflow model
        directory) into the repository as the next version of name.
        ModelRefused (or Conflict, when no server would serve it) says why not.
        trusted: the types a .skops file may hold beyond skops' defaults.
        sample: rows for the reference sample (else the serving version's).
        allow_pickle: false for anything that came over the network.
        require_onnx: refuse an estimator unless ONNX Runtime will serve it.
        reference: a CSV of data like the training data, for drift (else the
        version learns its reference from the first rows it serves)."""
        self.lifecycle.allow(check_name(name), "publish")
        path = Path(path)
        if path.is_dir():
            return self.publish_model_dir(path, name, feature_names, task, classes, by, reason, sample=sample,
                                          extra=extra, allow_pickle=allow_pickle, require_onnx=require_onnx,
                                          reference=reference, progress=progress)
        if not path.is_file():
            raise ModelRefused(f"{path}: no such file")
        current = self.current_metadata(name)
        given = Given(feature_names, sample, extra or {}, reference, progress)
        suffix = path.suffix.lower()
        progress(f"loading {path}")
        if suffix == ".onnx":
            files, metadata = self.onnx_version(path, current, feature_names, task, classes, given)
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
        if suffix == ".skops":
            try:
                estimator = load_skops(path, trusted)
            except InvalidModel as exc:
                raise ModelRefused(f"{path}: {exc}") from None
            given.extra = {"skops_trusted_types": list(trusted or []), **given.extra}
            return self.estimator_version(path, name, current, estimator, given, by, reason, require_onnx,
                                          artifact=("model.skops", path))
        if suffix in (".joblib", ".pkl") and allow_pickle:
            return self.estimator_version(path, name, current, self.unpickle(path), given, by, reason, require_onnx)
        if suffix in (".joblib", ".pkl"):
            raise ModelRefused(f"{path.name}: a pickle is never loaded from the network; publish ONNX or skops")
        raise ModelRefused(f"{path}: artifacts are .onnx, .skops, .joblib or .pkl, or an MLflow model directory")

    def publish_model_dir(self, path: Path, name: str, feature_names, task, classes, by: str, reason: str, *,
                          sample, extra, allow_pickle: bool, require_onnx: bool, reference: Path | None = None,
                          progress: Progress = silent) -> ModelVersion:
        """An MLflow model directory (an MLmodel file): its artifact with the
        feature names, reference rows and provenance its MLmodel gives."""
        from app.mlflow_models import read_model_dir

        model = read_model_dir(path)
        return self.publish(model.artifact, name, feature_names or model.feature_names, task, classes, by, reason,
                            trusted=model.trusted_types, sample=sample or model.sample,
                            extra={**model.metadata, **(extra or {})}, allow_pickle=allow_pickle,
                            require_onnx=require_onnx, reference=reference, progress=progress)

    def publish_graph(self, graph: bytes, name: str, feature_names: list[str] | None, task: str,
                      classes: list | None, sample: list, extra: dict, by: str = "", reason: str = "") -> ModelVersion:
        """An ONNX graph made here (exported from PyTorch or TensorFlow, and
        checked against it on sample) as the next version of name."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(graph)
            return self.publish(path, name, feature_names, task, classes, by, reason, sample=sample, extra=extra)

    def check_staged(self, staged: ModelVersion) -> dict:
        """The staged version loads and answers its reference sample, or ModelRefused; its cost."""
        return loads_and_costs(staged, self.tolerance)

    def check_staged_onnx(self, staged: ModelVersion) -> dict:
        """As check_staged, and ONNX Runtime serves it: the estimator itself is never loaded to serve."""
        if not (staged.metadata.get("conversion") or {}).get("verified"):
            reason = (staged.metadata.get("conversion") or {}).get("reason")
            raise ModelRefused(f"refused: the model must convert to a verified ONNX graph here ({reason})")
        return self.check_staged(staged)

    def current_metadata(self, name: str) -> dict | None:
        version = self.lifecycle.current(name)
        return self.repository.get(name, version).metadata if version else None

    def onnx_version(self, path: Path, current: dict | None, feature_names, task, classes,
                     given: Given | None = None) -> tuple[dict, dict]:
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
        given = given or Given(feature_names)
        metadata = self.common_metadata(path, sig.width, current, given.feature_names, "onnx", given.sample)
        metadata.update(task=task, classes=classes if task == "classification" else None,
                        artifact="model.onnx", sha256=sha256_of(path), serving_runtime="onnx")
        metadata.update(given.extra)
        return {"model.onnx": path}, metadata

    def unpickle(self, path: Path):
        # A local file the operator names: trusted like the repository itself.
        # Nothing received over the network is ever unpickled.
        try:
            return joblib.load(path)
        except Exception as exc:  # unpickling raises anything
            raise ModelRefused(f"{path}: cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})") from None

    def estimator_version(self, path: Path, name: str, current: dict | None, estimator, given: Given, by: str,
                          reason: str, require_onnx: bool = False,
                          artifact: tuple[str, Path] | None = None) -> ModelVersion:
        width = getattr(estimator, "n_features_in_", None)
        if not isinstance(width, int):
            raise ModelRefused(f"{path}: not a fitted scikit-learn estimator (no n_features_in_)")
        metadata = self.common_metadata(path, width, current, given.feature_names, path.suffix.lstrip("."),
                                        given.sample)
        sample = np.asarray(metadata["reference_sample"], dtype=np.float64)
        extra = {"published_from": str(path), **given.extra}
        metrics = extra.pop("metrics", None) or (current or {}).get("metrics") or {}
        drift = None
        if given.reference is not None:
            names = metadata["feature_names"]
            given.progress(f"reading the drift reference {given.reference}")
            X = read_reference(given.reference, names)
            task = task_of(estimator)
            classes = np.asarray(estimator.classes_).tolist() if task == "classification" else None
            labels = SklearnRuntime(estimator, task).run(X).labels.tolist()
            drift = build_reference(X, labels, Schema(names, task, classes), "file", str(given.reference))
        # The sample is borrowed from the serving version (or given rows): not training data.
        return publish_estimator(self.repository, name, estimator, sample, metadata["feature_names"],
                                 metrics, self.tolerance, extra=extra,
                                 check=self.check_staged_onnx if require_onnx else self.check_staged, by=by,
                                 reason=reason, stats=(current or {}).get("reference_stats"), artifact=artifact,
                                 reference=drift, training=False, progress=given.progress)

    def common_metadata(self, path: Path, width: int, current: dict | None, feature_names, source: str,
                        rows: list | None = None) -> dict:
        serving = (current or {}).get("feature_names") or []
        problem = width_change(width, serving, (current or {}).get("version"))
        if problem:
            raise ModelRefused(f"{path} refused: {problem}")
        names = feature_names or serving or [f"f{i}" for i in range(width)]
        if len(names) != width:
            raise ModelRefused(f"{len(names)} feature names given; the model takes {width}")
        return {"feature_names": list(names), "reference_sample": reference_rows(rows, current, width, path),
                "source_format": source, "created": utc_now(precise=False), "deterministic": True}


class Given:
    """What the caller knows of a new version beyond its artifact."""

    def __init__(self, feature_names: list[str] | None = None, sample: list | None = None, extra: dict | None = None,
                 reference: Path | None = None, progress: Progress = silent):
        self.feature_names = feature_names
        self.sample = sample
        self.extra = extra or {}
        self.reference = reference  # a CSV for the drift reference
        self.progress = progress


def reference_rows(rows: list | None, current: dict | None, width: int, path: Path) -> list:
    """The reference sample of a new version: the given rows (an input
    example, say), topped up to REFERENCE_ROWS from the serving version's
    sample, or a fixed synthetic one when there is none to borrow real rows from."""
    given = []
    if rows:
        try:
            given = np.asarray(rows, dtype=np.float32).reshape(-1, width)[:REFERENCE_ROWS].tolist()
        except ValueError:
            raise ModelRefused(f"{path}: the example rows do not have {width} numeric values each") from None
    fill = (current or {}).get("reference_sample")
    if not fill:
        fill = np.random.default_rng(0).normal(size=(REFERENCE_ROWS, width)).astype(np.float32).tolist()
    return given + list(fill)[:REFERENCE_ROWS - len(given)]
