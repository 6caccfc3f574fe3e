"""PyTorch and TensorFlow/Keras models to ONNX, checked against the framework.

An export is served only when ONNX Runtime gives what the framework gives on
a reference batch: values within the tolerance (1e-5; relative to
max(1, |value|) for regression values) and, for classifiers, the same
labels. A classifier's raw scores are said to be `logits` (a Softmax is
appended to the graph, so it answers probabilities; labels are their argmax)
or `probabilities` (served as they are).

torch, tensorflow and tf2onnx are optional extras, imported only here and
only when exporting: the server itself serves the ONNX graph.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidData, ModelRefused

OUTPUTS = ("logits", "probabilities", "values")
OPSET = 18
REFERENCE_ROWS = 64


@dataclass
class Exported:
    """An ONNX graph exported from a framework model, and how it was checked."""
    graph: bytes
    task: str                      # "classification" or "regression"
    sample: list                   # the reference batch it was checked on
    max_abs_diff: float
    framework: str                 # "torch" or "tensorflow"
    details: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return len(self.sample[0])

    def metadata(self) -> dict:
        """What the published version records about where it came from."""
        return {"source_format": self.framework, "algorithm": self.details.get("algorithm"),
                "export": {"framework": self.framework, "output": self.details.get("output"),
                           "max_abs_diff": self.max_abs_diff, **{k: v for k, v in self.details.items()
                                                                 if k not in ("algorithm", "output")}}}

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.graph)


# --- PyTorch ---------------------------------------------------------------


def export_torch(module, example, output: str = "values", tolerance: float = 1e-5) -> Exported:
    """A torch.nn.Module (eager or TorchScript) taking a float32 [n, width]
    batch, as a checked ONNX graph; example is that batch (the reference)."""
    import torch

    check_output(output)
    batch = torch.as_tensor(np.asarray(example, dtype=np.float32))
    if batch.ndim != 2 or len(batch) < 2:
        raise InvalidData("the example must be a 2-D batch of at least 2 rows: [rows, features]")
    module.eval()
    with torch.no_grad(), quiet():
        try:
            want = module(batch).detach().numpy()
        except Exception as exc:  # the module's own code raises anything
            raise ModelRefused(f"the module failed on the example batch ({type(exc).__name__}: {first_line(exc)})") from None
        try:
            graph = torch_graph(module, batch)
        except Exception as exc:  # the exporters raise many types
            raise ModelRefused(f"torch could not export the module to ONNX ({type(exc).__name__}: "
                               f"{first_line(exc)})") from None
    scripted = isinstance(module, torch.jit.ScriptModule)
    return checked(graph, batch.numpy(), want, output, tolerance, "torch",
                   {"algorithm": type(module).__name__ if not scripted else module.original_name,
                    "output": output, "torch_version": torch.__version__.split("+")[0],
                    "exporter": "torchscript" if scripted else "dynamo"})


def torch_graph(module, batch) -> bytes:
    import io

    import torch

    if isinstance(module, torch.jit.ScriptModule):
        # torch.export cannot read TorchScript; the TorchScript exporter can.
        buffer = io.BytesIO()
        torch.onnx.export(module, (batch,), buffer, dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
        return buffer.getvalue()
    program = torch.onnx.export(module, (batch,), dynamo=True, input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                                external_data=False, opset_version=OPSET)
    return program.model_proto.SerializeToString()


def load_torch(path: Path):
    """The module in a .pt file: a TorchScript archive, else a pickled
    nn.Module (a local file the operator names, trusted like the repository)."""
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception:  # not TorchScript: try a whole pickled module next
        pass
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelRefused(f"{path}: not a TorchScript archive nor a saved torch module "
                           f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(loaded, torch.nn.Module):
        raise ModelRefused(f"{path} holds a {type(loaded).__name__}, not a module: a state_dict has the weights "
                           "without the code; save torch.jit.script(model) with torch.jit.save, or the model itself")
    return loaded


# --- TensorFlow / Keras ----------------------------------------------------


def export_keras(model, example, output: str = "values", tolerance: float = 1e-5) -> Exported:
    """A Keras model taking a float32 [n, width] batch, converted with tf2onnx and checked."""
    import tensorflow as tf
    import tf2onnx

    check_output(output)
    batch = two_d(example)
    with quiet():
        want = np.asarray(model(batch, training=False))
        # NOTE: through a tf.function rather than tf2onnx's from_keras, which
        # does not read every Keras 3 model (a Sequential fails on its tensor names).
        spec = [tf.TensorSpec((None, batch.shape[1]), tf.float32, name="input")]

        @tf.function(input_signature=spec)
        def forward(x):
            return model(x, training=False)

        try:
            proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=OPSET)
        except Exception as exc:
            raise ModelRefused(f"tf2onnx could not convert the model ({type(exc).__name__}: {first_line(exc)})") from None
    return checked(proto.SerializeToString(), batch, want, output, tolerance, "tensorflow",
                   {"algorithm": type(model).__name__, "output": output, "tensorflow_version": tf.__version__,
                    "tf2onnx_version": tf2onnx.__version__})


def export_saved_model(path: Path, example, output: str = "values", tolerance: float = 1e-5) -> Exported:
    """A TensorFlow SavedModel directory (its serving_default signature, one
    2-D float input), converted with tf2onnx and checked."""
    import tensorflow as tf
    import tf2onnx

    check_output(output)
    batch = two_d(example)
    with quiet():
        try:
            loaded = tf.saved_model.load(str(path))
            serve = loaded.signatures["serving_default"]
        except Exception as exc:
            raise ModelRefused(f"{path}: not a loadable SavedModel with a serving_default signature "
                               f"({type(exc).__name__}: {first_line(exc)})") from None
        inputs = serve.structured_input_signature[1]
        if len(inputs) != 1:
            raise ModelRefused(f"{path}: the serving signature takes {len(inputs)} inputs; one 2-D tensor is served")
        (key, spec), = inputs.items()

        signature = [tf.TensorSpec((None, batch.shape[1]), tf.float32, name="input")]

        @tf.function(input_signature=signature)
        def first_output(x):
            return next(iter(serve(**{key: tf.cast(x, spec.dtype)}).values()))

        want = first_output(tf.constant(batch)).numpy()
        try:
            proto, _ = tf2onnx.convert.from_function(first_output, input_signature=signature, opset=OPSET)
        except Exception as exc:
            raise ModelRefused(f"tf2onnx could not convert {path} ({type(exc).__name__}: {first_line(exc)})") from None
    return checked(proto.SerializeToString(), batch, want, output, tolerance, "tensorflow",
                   {"algorithm": "SavedModel", "output": output, "tensorflow_version": tf.__version__,
                    "tf2onnx_version": tf2onnx.__version__})


def load_keras(path: Path):
    import keras

    try:
        with quiet():
            return keras.models.load_model(str(path), compile=False)
    except Exception as exc:
        raise ModelRefused(f"{path}: not a loadable Keras model ({type(exc).__name__}: {first_line(exc)})") from None


def input_width_of_keras(model) -> int | None:
    shape = getattr(model, "input_shape", None)
    return shape[-1] if isinstance(shape, tuple) and len(shape) == 2 and isinstance(shape[-1], int) else None


def is_saved_model(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "saved_model.pb").is_file()


# --- the check -------------------------------------------------------------


def checked(graph: bytes, batch: np.ndarray, want: np.ndarray, output: str, tolerance: float, framework: str,
            details: dict) -> Exported:
    """The graph (with a Softmax appended for logits) once ONNX Runtime agrees
    with the framework on batch; ModelRefused says by how much it does not."""
    from app.runtimes import open_session

    want = np.asarray(want, dtype=np.float64)
    if want.ndim == 1:
        want = want.reshape(-1, 1)
    if want.ndim != 2 or len(want) != len(batch):
        raise ModelRefused(f"the model answers shape {list(want.shape)} for {len(batch)} rows; "
                           "one row of outputs per input row is served")
    if output == "logits":
        graph, want = with_softmax(graph), softmax(want)
    task = "regression" if output == "values" else "classification"
    if task == "regression" and want.shape[1] != 1:
        raise ModelRefused(f"the model gives {want.shape[1]} values a row; a regressor gives one "
                           "(say --output logits or probabilities for a classifier)")
    try:
        session = open_session(graph)
        got = np.asarray(session.run(None, {session.get_inputs()[0].name: batch.astype(np.float32)})[0], dtype=np.float64)
    except Exception as exc:  # ORT's own exception types
        raise ModelRefused(f"ONNX Runtime cannot run the exported graph ({first_line(exc)})") from None
    got = got.reshape(want.shape) if got.size == want.size else got
    if got.shape != want.shape:
        raise ModelRefused(f"the exported graph answers shape {list(got.shape)}, the model {list(want.shape)}")
    diff = np.abs(got - want)
    worst = float((diff / np.maximum(1.0, np.abs(want))).max() if task == "regression" else diff.max())
    if worst > tolerance:
        raise ModelRefused(f"ONNX Runtime and {framework} differ by {worst:.3g} > {tolerance} on the reference batch")
    if task == "classification" and (got.argmax(axis=1) != want.argmax(axis=1)).any():
        raise ModelRefused(f"ONNX Runtime and {framework} pick different labels on the reference batch")
    return Exported(graph, task, batch.astype(np.float32).tolist(), worst, framework, details)


def with_softmax(graph: bytes) -> bytes:
    """The graph with a Softmax over its first output's last axis, as the output `probabilities`."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(graph)
    logits = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [logits.name], ["probabilities"], axis=-1))
    probabilities = onnx.ValueInfoProto()
    probabilities.CopyFrom(logits)
    probabilities.name = "probabilities"
    del model.graph.output[:]
    model.graph.output.append(probabilities)
    return model.SerializeToString()


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def reference_batch(width: int, rows: list | None = None) -> np.ndarray:
    """rows (the serving version's reference sample, say) or a fixed synthetic batch."""
    if rows:
        batch = np.asarray(rows, dtype=np.float32)
        if batch.ndim == 2 and batch.shape[1] == width and len(batch) >= 2:
            return batch[:REFERENCE_ROWS]
    return np.random.default_rng(0).normal(size=(REFERENCE_ROWS, width)).astype(np.float32)


def two_d(example: Any) -> np.ndarray:
    batch = np.asarray(example, dtype=np.float32)
    if batch.ndim != 2 or len(batch) < 2:
        raise InvalidData("the example must be a 2-D batch of at least 2 rows: [rows, features]")
    return batch


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise InvalidData(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@contextlib.contextmanager
def quiet():
    """The exporters' progress chatter and deprecation warnings kept off the operator's terminal."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "tensorflow", "tf2onnx", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
