"""Where `mlserve models publish` takes a model from: a file or directory here,
a PyTorch or TensorFlow model exported to ONNX here, the MLflow registry
(models:/...), and where it puts it: the local repository, or a running
server's admin API (--url), which takes ONNX and skops uploads."""
from __future__ import annotations

import sys
from pathlib import Path

from app.cli.context import Context
from app.cli.errors import UsageError
from app.cli.output import Progress

FRAMEWORK_SUFFIXES = {".pt": "torch", ".pth": "torch", ".keras": "tensorflow"}


def framework_of(args) -> str | None:
    """torch or tensorflow when the source is a framework model (--framework, else by its name), else None."""
    if args.framework:
        return args.framework
    path = Path(args.source)
    if path.suffix.lower() in FRAMEWORK_SUFFIXES:
        return FRAMEWORK_SUFFIXES[path.suffix.lower()]
    return "tensorflow" if path.is_dir() and (path / "saved_model.pb").is_file() else None


def output_of(args) -> str:
    if args.output:
        return args.output
    if args.task == "classification":
        raise UsageError("say what the classifier returns: --output logits (softmax gives probabilities, argmax "
                         "labels) or --output probabilities")
    return "values"


def export(args, ctx: Context, framework: str):
    """The framework model as a checked ONNX export (app/exporters.py)."""
    exported = export_checked(args, ctx, framework)
    print(f"exported {args.source} from {framework} to ONNX: outputs within {exported.max_abs_diff:.2g} "
          f"of {framework} on {len(exported.sample)} reference rows")
    return exported


def export_checked(args, ctx: Context, framework: str):
    from app import exporters

    path = Path(args.source)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    current = ctx.publisher.current_metadata(args.name) if args.name else None
    rows = (current or {}).get("reference_sample")
    tolerance = ctx.settings.models.verify_tolerance
    try:
        if framework == "torch":
            width = args.input_width or len((current or {}).get("feature_names") or []) or None
            if not width:
                raise UsageError("a torch module does not say how many features it takes: give --input-width N")
            module = exporters.load_torch(path)
            return exporters.export_torch(module, exporters.reference_batch(width, rows), output_of(args), tolerance)
        if exporters.is_saved_model(path):
            width = args.input_width or len((current or {}).get("feature_names") or []) or None
            if not width:
                raise UsageError("give --input-width N: the SavedModel's feature count is needed for its reference batch")
            return exporters.export_saved_model(path, exporters.reference_batch(width, rows), output_of(args), tolerance)
        model = exporters.load_keras(path)
        width = args.input_width or exporters.input_width_of_keras(model)
        if not width:
            raise UsageError("the Keras model's input width is not fixed: give --input-width N")
        return exporters.export_keras(model, exporters.reference_batch(width, rows), output_of(args), tolerance)
    except ImportError as exc:
        extra = "torch" if framework == "torch" else "tensorflow"
        raise UsageError(f"{framework} is not installed ({exc.name}): pip install -e '.[{extra}]'") from None


def registry(ctx: Context):
    from app.mlflow_models import MLflowRegistry

    return MLflowRegistry(ctx.settings.mlflow.tracking_uri, ctx.settings.mlflow.registry_uri)


class DownloadBar:
    """Progress of an MLflow download, in bytes, on stderr (drawn only on a terminal)."""

    def __init__(self):
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(total, sys.stderr, unit="bytes")
        self.bar.update(done)
        if done >= total:
            self.bar.close()


def publish_here(args, ctx: Context, features, classes, progress):
    """Publish into the local repository from any source; the new ModelVersion."""
    from app.mlflow_models import is_model_uri, parse_model_uri, publish_registered

    if is_model_uri(args.source):
        mv, found = publish_registered(ctx.publisher, registry(ctx), parse_model_uri(args.source), args.name,
                                       DownloadBar(), reason=args.reason, feature_names=features, task=args.task,
                                       classes=classes)
        print(f"fetched {found.uri} (run {found.run_id})")
        return mv
    name = require_name(args)
    framework = framework_of(args)
    if framework:
        exported = export(args, ctx, framework)
        return ctx.publisher.publish_graph(exported.graph, name, features, exported.task, classes, exported.sample,
                                           exported.metadata(), reason=args.reason)
    path = Path(args.source)
    extra = mlflow_run_metrics(ctx, path) if path.is_dir() else None
    return ctx.publisher.publish(path, name, features, args.task, classes, reason=args.reason,
                                 trusted=split_list(args.trust), extra=extra, reference=args.reference,
                                 progress=progress)


def mlflow_run_metrics(ctx: Context, path: Path) -> dict | None:
    """The metrics of an MLflow model directory's run, when a tracking server is configured to ask."""
    from app.mlflow_models import read_model_dir

    run_id = (read_model_dir(path).metadata.get("mlflow") or {}).get("run_id")
    if not run_id or not ctx.settings.mlflow.tracking_uri:
        return None
    from app.errors import ServingError

    try:
        return {"metrics": registry(ctx).run_metrics(run_id)}
    except ServingError as exc:
        print(f"mlserve: warning: run {run_id}'s metrics not recorded: {exc.message}", file=sys.stderr)
        return None


def publish_there(args, ctx: Context, features, classes) -> dict:
    """Publish through a running server's admin API: upload the artifact (ONNX,
    or skops; a framework model is exported to ONNX here first) in parts, then
    publish it there with the same checks. The server's answer."""
    from app.mlflow_models import is_model_uri

    name = require_name(args)
    if is_model_uri(args.source):
        raise UsageError("--url publishes a file from here; a models:/ URI is published on the server's host "
                         "(mlserve models publish there, or mlserve models follow)")
    framework = framework_of(args)
    fields: dict = {"features": features, "task": args.task, "classes": classes, "trusted_types": split_list(args.trust),
                    "promote": args.promote, "reason": args.reason or None}
    if framework:
        exported = export(args, ctx, framework)
        data, form = exported.graph, "onnx"
        fields.update(task=exported.task, reference_sample=exported.sample)
    else:
        path = Path(args.source)
        form = {".onnx": "onnx", ".skops": "skops"}.get(path.suffix.lower())
        if form is None:
            raise UsageError(f"{path.name}: --url uploads .onnx or .skops files (a pickle is never sent over the "
                             "network), or a PyTorch/TensorFlow model exported to ONNX here")
        data = path
    with ctx.admin_client(args) as client:
        client.timeout = 300.0
        return client.publish_artifact(name, data, form, {k: v for k, v in fields.items() if v is not None},
                                       progress=DownloadBar())


def require_name(args) -> str:
    if not args.name:
        raise UsageError("--name is required (a models:/ URI defaults to its MLflow name)")
    return args.name


def split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
