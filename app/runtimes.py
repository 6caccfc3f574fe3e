"""Runtimes: the two ways a model is executed, behind one call, run(X) -> Outputs.

ONNX Runtime is the fast path; scikit-learn is the fallback for models whose
conversion is missing or not verified equivalent.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnxruntime as ort

from app import deadlines

# With a deadline, a batch runs in chunks of this many rows, the deadline checked between them.
CHUNK_ROWS = 1024

# NOTE: an estimator fitted on a DataFrame (as MLflow users often do) warns on
# every array it is given; the server always gives arrays, in the order of the
# model's feature names, so the warning says nothing here.
warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)


class Outputs(NamedTuple):
    """labels: (n,) class labels, regression values or cluster ids.
    probabilities: (n, n_classes) in the order of the model's classes, or None."""
    labels: np.ndarray
    probabilities: np.ndarray | None


class Runtime(Protocol):
    name: str

    def run(self, X: np.ndarray) -> Outputs: ...


def session_options() -> ort.SessionOptions:
    # The workers are the parallelism: one thread, no spinning, so a worker
    # never burns a second core waiting for work.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class OnnxSignature(NamedTuple):
    """What an ONNX graph takes and gives, as far as serving cares."""
    input_names: list[str]
    input_dtype: type
    width: int | None          # the fixed feature count of a single 2-D input, else None
    outputs: list[str]
    output_width: int | None   # the last output's width (1 for a vector), None when not fixed


def signature(session: ort.InferenceSession) -> OnnxSignature:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    width = inputs[0].shape[-1] if len(inputs) == 1 and len(inputs[0].shape) == 2 else None
    last = outputs[-1].shape
    out_width = last[-1] if len(last) == 2 else 1
    return OnnxSignature([i.name for i in inputs],
                         np.float64 if inputs[0].type == "tensor(double)" else np.float32,
                         width if isinstance(width, int) else None, [o.name for o in outputs],
                         out_width if isinstance(out_width, int) else None)


def open_session(model: bytes | str) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


class OnnxRuntime:
    """An ORT session. Classifier graphs from skl2onnx have outputs (label,
    probabilities); others are read by the task: one output holds the values,
    the class scores (argmax gives the label) or cluster labels."""
    name = "onnx"

    def __init__(self, model: bytes | str, task: str, classes: list | None = None,
                 outputs: dict | None = None):
        self.session = open_session(model)
        self.signature = sig = signature(self.session)
        if len(sig.input_names) != 1:
            raise ValueError(f"ONNX graph has {len(sig.input_names)} inputs; one 2-D tensor is served")
        self.input_name = sig.input_names[0]
        self.input_dtype = sig.input_dtype
        self.dtype = np.dtype(self.input_dtype)
        self.n_features = sig.width
        names = sig.outputs
        outputs = outputs or {}
        self.label_output = outputs.get("label") or ("label" if "label" in names else None)
        self.proba_output = outputs.get("probabilities") or ("probabilities" if "probabilities" in names else None)
        if task == "classification" and self.proba_output is None:
            self.proba_output = names[0] if self.label_output != names[0] else None
        if self.label_output is None and self.proba_output is None:
            self.label_output = names[0]
        self.classes = np.asarray(classes) if classes is not None else None
        self.task = task
        self.fetch = [n for n in (self.label_output, self.proba_output) if n]
        # PERF: the public InferenceSession.run re-validates the input names on
        # every call (~1.7 us of a ~7 us run); they were checked here, once.
        self.run_graph = self.session._sess.run
        self.run_options = ort.RunOptions()
        self.spare_options: list = []

    def run(self, X: np.ndarray) -> Outputs:
        if X.dtype is not self.dtype:  # builtin dtypes are singletons: no comparison call
            X = X.astype(self.dtype)
        deadline = deadlines.current()
        if deadline is None:
            return self.outputs(self.run_graph(self.fetch, {self.input_name: X}, self.run_options), len(X))
        if len(X) <= CHUNK_ROWS:
            return self.outputs(self.run_bounded(X, deadline), len(X))
        parts = [self.outputs(self.run_bounded(X[i:i + CHUNK_ROWS], deadline), len(X[i:i + CHUNK_ROWS]))
                 for i in range(0, len(X), CHUNK_ROWS)]
        return Outputs(np.concatenate([p.labels for p in parts]),
                       np.concatenate([p.probabilities for p in parts]) if parts[0].probabilities is not None else None)

    def run_bounded(self, X: np.ndarray, deadline: deadlines.Deadline) -> list:
        """One run, terminated by the watchdog if it outlives the deadline."""
        deadline.check("the model run")
        # PERF: run options are reused (making one costs more than the run of a row); a terminated one is not.
        try:
            options = self.spare_options.pop()
        except IndexError:
            options = ort.RunOptions()
        deadlines.watchdog.arm(options, deadline)
        try:
            return self.run_graph(self.fetch, {self.input_name: X}, options)
        except Exception:
            if options.terminate:
                raise deadlines.exceeded(deadline, "the model run") from None
            raise
        finally:
            deadlines.watchdog.disarm(options)
            if not options.terminate:
                self.spare_options.append(options)

    def outputs(self, results: list, rows: int) -> Outputs:
        labels = results[0] if self.label_output else None
        proba = results[-1] if self.proba_output and self.task == "classification" else None
        if labels is None:
            labels = self.classes[proba.argmax(axis=1)] if self.classes is not None else proba.argmax(axis=1)
        elif labels.ndim != 1:  # regressors answer [n, 1]
            labels = labels.reshape(rows)
        return Outputs(labels, proba)


class SklearnRuntime:
    """A scikit-learn estimator run natively (slow path)."""
    name = "sklearn"

    def __init__(self, estimator: Any, task: str):
        self.estimator = estimator
        self.task = task
        self.assigner = ClusterAssigner(estimator) if not hasattr(estimator, "predict") else None
        self.with_proba = task == "classification" and hasattr(estimator, "predict_proba")

    def run(self, X: np.ndarray) -> Outputs:
        deadline = deadlines.current()
        if deadline is None:
            return self.run_native(X)
        deadline.check("the model run")
        return deadlines.native.call(lambda: self.run_native(X), deadline, "the model run")

    def run_native(self, X: np.ndarray) -> Outputs:
        # Estimators are fitted on float64; some (KMeans) refuse float32 input.
        X = X.astype(np.float64)
        if self.assigner is not None:
            return Outputs(self.assigner.assign(X), None)
        if self.with_proba:
            proba = self.estimator.predict_proba(X)
            return Outputs(self.estimator.classes_[proba.argmax(axis=1)], proba)
        return Outputs(np.asarray(self.estimator.predict(X)).reshape(len(X)), None)


class ClusterAssigner:
    """Cluster labels for new points from a fitted DBSCAN, which has no predict:
    the cluster of the nearest core sample when it lies within eps, else -1 (noise).
    This is how DBSCAN itself treats a border point, applied to unseen data."""

    def __init__(self, dbscan: Any):
        self.cores = np.asarray(dbscan.components_, dtype=np.float64)
        self.labels = np.asarray(dbscan.labels_)[dbscan.core_sample_indices_]
        self.eps = float(dbscan.eps)
        if getattr(dbscan, "metric", "euclidean") != "euclidean":
            raise ValueError("only euclidean DBSCAN models can assign new points")

    def assign(self, X: np.ndarray) -> np.ndarray:
        if len(self.cores) == 0:
            return np.full(len(X), -1)
        X = np.asarray(X, dtype=np.float64)
        d2 = ((X * X).sum(1)[:, None] - 2 * X @ self.cores.T + (self.cores * self.cores).sum(1)[None, :])
        nearest = d2.argmin(axis=1)
        within = d2[np.arange(len(X)), nearest] <= self.eps * self.eps + 1e-12
        return np.where(within, self.labels[nearest], -1)
