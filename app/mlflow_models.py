"""MLflow models: a model directory (an MLmodel file) read as it is on disk,
and the MLflow model registry (models:/NAME/VERSION, models:/NAME@ALIAS)
reached through the MLflow client (the `mlflow` extra, mlflow-skinny).

Only the sklearn and onnx flavors are served. A python_function-only model
is arbitrary Python code, and is refused. A scikit-learn model saved with
skops (MLflow 3's default) is loaded trusting only the types its MLmodel
lists; one saved as a pickle is loaded only from a directory the operator
names on this machine, never from the registry (it came over the network).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from app.errors import InvalidData, ModelRefused

MLMODEL = "MLmodel"
NUMERIC_TYPES = {"double", "float", "long", "integer", "boolean", "float64", "float32", "int64", "int32",
                 "int16", "int8", "uint8", "bool"}
PICKLE_FORMATS = ("pickle", "cloudpickle")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@\s]+)(?:/(?P<version>[1-9][0-9]*)|@(?P<alias>[A-Za-z0-9_-]+))")


@dataclass
class MLflowModel:
    """What an MLflow model directory holds, as a publish needs it."""
    path: Path
    flavor: str                        # "sklearn" or "onnx"
    artifact: Path                     # model.skops, model.pkl or model.onnx inside path
    serialization: str                 # "skops", "pickle", "cloudpickle" or "onnx"
    feature_names: list[str] | None = None
    sample: list | None = None         # rows of the input example
    trusted_types: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # recorded in our metadata.json

    @property
    def is_pickle(self) -> bool:
        return self.serialization in PICKLE_FORMATS


def read_model_dir(path: Path) -> MLflowModel:
    """The MLmodel of directory path; ModelRefused says why it cannot be served."""
    path = Path(path)
    try:
        data = yaml.safe_load((path / MLMODEL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelRefused(f"{path}: not an MLflow model directory (no {MLMODEL} file)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelRefused(f"{path / MLMODEL}: unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("flavors"), dict):
        raise ModelRefused(f"{path / MLMODEL}: no flavors")
    model = flavor_of(path, data["flavors"])
    names, types = signature_of(path, data.get("signature"))
    model.feature_names = names
    model.sample = input_example(path, data.get("saved_input_example_info"), names)
    model.metadata = {"mlflow": {"run_id": data.get("run_id"), "model_id": data.get("model_id") or data.get("model_uuid"),
                                 "flavor": model.flavor, "serialization_format": model.serialization,
                                 "mlflow_version": data.get("mlflow_version"),
                                 "created": str(data.get("utc_time_created") or "") or None,
                                 "artifact_path": data.get("artifact_path")},
                      "source_format": f"mlflow-{model.serialization}",
                      **({"feature_types": types} if types else {})}
    return model


def flavor_of(path: Path, flavors: dict) -> MLflowModel:
    if isinstance(flavors.get("onnx"), dict):
        return MLflowModel(path, "onnx", inside(path, flavors["onnx"].get("data")), "onnx")
    sklearn = flavors.get("sklearn")
    if isinstance(sklearn, dict):
        form = sklearn.get("serialization_format") or "cloudpickle"
        artifact = inside(path, sklearn.get("pickled_model"))
        if form == "skops":
            if artifact.suffix != ".skops":
                raise ModelRefused(f"{path / MLMODEL}: a skops model in {artifact.name}, expected a .skops file")
            return MLflowModel(path, "sklearn", artifact, "skops", trusted_types=sklearn.get("skops_trusted_types") or [])
        if form in PICKLE_FORMATS:
            if artifact.suffix not in (".pkl", ".joblib"):
                raise ModelRefused(f"{path / MLMODEL}: a pickled model in {artifact.name}, expected a .pkl file")
            return MLflowModel(path, "sklearn", artifact, form)
        raise ModelRefused(f"{path / MLMODEL}: sklearn serialization_format {str(form)[:40]!r} is not served")
    listed = ", ".join(sorted(map(str, flavors))) or "none"
    raise ModelRefused(f"{path}: MLflow flavors {listed}: only sklearn and onnx models are served; a "
                       "python_function (pyfunc) model is arbitrary Python code, which is not served")


def inside(path: Path, filename) -> Path:
    """A file the MLmodel names, which must lie in the model directory."""
    if not isinstance(filename, str) or not filename or "/" in filename or filename in (".", ".."):
        raise ModelRefused(f"{path / MLMODEL}: model file {str(filename)[:80]!r} is not a file name in the directory")
    if not (path / filename).is_file():
        raise ModelRefused(f"{path}: the MLmodel names {filename}, which is missing")
    return path / filename


def signature_of(path: Path, signature) -> tuple[list[str] | None, list[str] | None]:
    """(feature names, their types) from the signature's inputs; None where it does not say."""
    if not isinstance(signature, dict) or not signature.get("inputs"):
        return None, None
    try:
        inputs = json.loads(signature["inputs"])
    except (TypeError, ValueError):
        raise ModelRefused(f"{path / MLMODEL}: signature inputs are not JSON") from None
    if inputs and all(isinstance(i, dict) and i.get("type") == "tensor" for i in inputs):
        if len(inputs) != 1:
            raise ModelRefused(f"{path / MLMODEL}: the signature has {len(inputs)} input tensors; one 2-D tensor is served")
        spec = inputs[0].get("tensor-spec") or {}
        if spec.get("dtype") not in NUMERIC_TYPES:
            raise ModelRefused(f"{path / MLMODEL}: input tensor of {spec.get('dtype')}; numeric inputs are served")
        return None, [spec["dtype"]]
    names, types = [], []
    for column in inputs:
        kind = column.get("type") if isinstance(column, dict) else None
        if kind not in NUMERIC_TYPES:
            raise ModelRefused(f"{path / MLMODEL}: input {column.get('name') if isinstance(column, dict) else column!r} "
                               f"is of type {kind}; only numeric features are served")
        names.append(str(column.get("name") or f"f{len(names)}"))
        types.append(kind)
    return names, types


def input_example(path: Path, info, names: list[str] | None) -> list | None:
    """Rows of the saved input example (a split-orient DataFrame or an array), or None."""
    if not isinstance(info, dict) or not isinstance(info.get("artifact_path"), str):
        return None
    try:
        example = json.loads(inside(path, info["artifact_path"]).read_text(encoding="utf-8"))
    except (ModelRefused, OSError, ValueError):
        return None  # an example is a help, not a requirement
    if isinstance(example, dict) and "dataframe_split" in example:
        example = example["dataframe_split"]
    if isinstance(example, dict) and isinstance(example.get("inputs"), list):
        example = example["inputs"]
    if isinstance(example, dict) and isinstance(example.get("data"), list):
        columns = example.get("columns")
        rows = example["data"]
        if names and isinstance(columns, list) and sorted(map(str, columns)) == sorted(names):
            order = [list(map(str, columns)).index(n) for n in names]
            rows = [[row[i] for i in order] for row in rows]
        return rows
    return example if isinstance(example, list) and example and all(isinstance(r, list) for r in example) else None


# --- the registry --------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """models:/NAME/VERSION or models:/NAME@ALIAS."""
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"


def parse_model_uri(text: str) -> ModelRef:
    """A registry URI; InvalidData unless it is models:/NAME/VERSION or models:/NAME@ALIAS.
    NAME@ALIAS alone (as `mlserve models follow` takes it) is read as models:/NAME@ALIAS."""
    if not text.startswith("models:/") and "@" in text:
        text = f"models:/{text}"
    match = MODEL_URI.fullmatch(text)
    if not match:
        raise InvalidData(f"{text[:100]!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    version = match["version"]
    return ModelRef(match["name"], int(version) if version else None, match["alias"])


def is_model_uri(text: str) -> bool:
    return str(text).startswith("models:/")


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered MLflow model, as the registry describes it."""
    ref: ModelRef           # what was asked for
    version: int
    run_id: str | None
    source: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.ref.name}/{self.version}"

    def provenance(self) -> dict:
        return {"model_uri": str(self.ref), "registered_model": self.ref.name, "registered_version": self.version,
                "alias": self.ref.alias, "run_id": self.run_id, "source": self.source}


Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class MLflowRegistry:
    """The MLflow model registry at tracking_uri (and registry_uri, when it is elsewhere)."""

    def __init__(self, tracking_uri: str, registry_uri: str = ""):
        if not tracking_uri:
            raise InvalidData("models:/ URIs need an MLflow tracking server: set MLFLOW_TRACKING_URI "
                              "(or mlflow.tracking_uri in the settings)")
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                import mlflow
            except ImportError:
                raise InvalidData("the MLflow client is not installed: pip install -e '.[mlflow]'") from None
            # NOTE: MLflow's artifact repositories for models:/ URIs ask the
            # process-wide URIs, whatever a client was given; this process (the
            # CLI, the follower) talks to one MLflow.
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.registry_uri)
            self._client = mlflow.MlflowClient(self.tracking_uri, self.registry_uri)
        return self._client

    def resolve(self, ref: ModelRef) -> RegisteredVersion:
        """The version ref names (an alias resolves to the version it points at now)."""
        with mlflow_errors(ref):
            if ref.alias:
                found = self.client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                found = self.client.get_model_version(ref.name, str(ref.version))
        return RegisteredVersion(ref, int(found.version), found.run_id, found.source)

    def run_metrics(self, run_id: str | None) -> dict:
        """The metrics the version's run logged ({} without a run)."""
        if not run_id:
            return {}
        with mlflow_errors(f"run {run_id}"):
            return dict(self.client.get_run(run_id).data.metrics)

    def download(self, version: RegisteredVersion, destination: Path, progress: Progress | None = None) -> Path:
        """Every file of the version's model into destination, file by file so
        progress(bytes done, total) can be told as they arrive."""
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        self.client  # noqa: B018 (sets the process-wide URIs the repository reads)
        with mlflow_errors(version.uri):
            repository = ModelsArtifactRepository(version.uri)
            files = list(walk(repository, None))
            total, done = sum(size for _, size in files), 0
            if progress:
                progress(0, total)
            for name, size in files:
                repository.download_artifacts(name, dst_path=str(destination))
                done += size
                if progress:
                    progress(done, total)
        if not (destination / MLMODEL).is_file():
            raise ModelRefused(f"{version.uri} has no {MLMODEL} file: not an MLflow model")
        return destination


def walk(repository, path: str | None):
    """(file path, size) of every file under path in an artifact repository."""
    for info in repository.list_artifacts(path):
        if info.is_dir:
            yield from walk(repository, info.path)
        else:
            yield info.path, info.file_size or 0


class mlflow_errors:
    """MLflow's exceptions as one-line domain errors naming what was asked for."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, (ModelRefused, InvalidData)):
            return False
        code = getattr(exc, "error_code", None)
        message = str(getattr(exc, "message", None) or exc).strip().splitlines()
        text = message[0][:300] if message else type(exc).__name__
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelRefused(f"{self.what}: {text}") from None
        raise InvalidData(f"{self.what}: the MLflow registry did not answer ({type(exc).__name__}: {text})") from None


def local_name(ref: ModelRef, name: str | None) -> str:
    """The name a registered model is published under here: --name, else its MLflow name."""
    from app.repository import is_valid_name

    chosen = name or ref.name
    if not is_valid_name(chosen):
        raise InvalidData(f"MLflow model name {ref.name[:80]!r} is not a model name here ([a-z0-9][a-z0-9_-]{{0,63}}); "
                          "choose one with --name")
    return chosen


def publish_registered(publisher, registry: MLflowRegistry, ref: ModelRef, name: str | None = None,
                       progress: Progress | None = None, by: str = "", reason: str = "",
                       found: RegisteredVersion | None = None, **given):
    """Download a registered version and publish it as the next version of
    name (default: its MLflow name), checked as any publish is; the published
    ModelVersion and the RegisteredVersion it came from. found: ref already
    resolved (an alias that must not be read again, as it may have moved)."""
    import tempfile

    name = local_name(ref, name)
    found = found or registry.resolve(ref)
    with tempfile.TemporaryDirectory(prefix="mlserve-mlflow-") as tmp:
        registry.download(found, Path(tmp), progress)
        model = read_model_dir(Path(tmp))
        if model.is_pickle:
            raise ModelRefused(f"{found.uri} is saved with {model.serialization}: a pickle from the registry is "
                               "never loaded; log it with serialization_format='skops' (MLflow 3's default) or as ONNX")
        extra = {"mlflow": {**model.metadata["mlflow"], **found.provenance()},
                 "metrics": registry.run_metrics(found.run_id), "published_from": found.uri}
        try:
            mv = publisher.publish(Path(tmp), name, by=by, reason=reason, extra=extra, allow_pickle=False, **given)
        except ModelRefused as exc:
            # Name the model by its URI, not by the download's temporary directory.
            raise ModelRefused(exc.message.replace(tmp, found.uri)) from None
    return mv, found
