"""Large models for the shared-memory benchmark (perf/memory.py), written as
version 1 of each into a model repository directory:

- big_mlp: an ONNX MLP, 64 -> 4096 -> 8192 -> 2048 -> 10 with Softmax,
  about 200 MB of float32 weights, built with onnx.helper;
- big_forest: a scikit-learn RandomForestClassifier whose joblib is over
  100 MB, published with app.publishing.publish_estimator (converted to ONNX
  and verified, so ONNX Runtime serves it);
- big_forest_sklearn: the same joblib with no ONNX conversion and no
  reference sample, so the loader keeps it on scikit-learn;
- torch_mlp: a torch.nn.Module MLP of the same layers as big_mlp (random
  weights, about 200 MB), exported to ONNX with app.exporters.export_torch
  (checked against torch, a Softmax over its logits) and published with
  app.publishing.Publisher.publish_graph, as `mlserve models publish model.pt
  --framework torch` does. Needs the torch extra (pip install -e '.[torch]').

Models already built are reused. The default directory, perf/results/bigmodels/,
is not committed.

    .venv/bin/python -m perf bigmodels [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.repository import ModelRepository, sha256_of
from tests.server import ROOT

DEFAULT_DIR = ROOT / "perf" / "results" / "bigmodels"
MLP, FOREST, FOREST_SKLEARN, TORCH_MLP = "big_mlp", "big_forest", "big_forest_sklearn", "torch_mlp"
MLP_LAYERS = (64, 4096, 8192, 2048, 10)
# About 1.3 million nodes in all (~130 MB pickled); trains in ~10 s on 2 cores.
FOREST_DATA = {"n_samples": 50_000, "n_features": 20, "n_informative": 10, "n_classes": 4,
               "flip_y": 0.1, "random_state": 0}
FOREST_TREES = 80


def is_built(directory: Path, name: str) -> bool:
    return (directory / name / "1" / "metadata.json").is_file()


def ensure(directory: Path = DEFAULT_DIR, names: tuple[str, ...] = (MLP, FOREST, FOREST_SKLEARN)) -> dict:
    """Build the models in names that directory lacks: {name: seconds taken, None when reused}."""
    builders = {MLP: write_mlp, FOREST: write_forest, FOREST_SKLEARN: write_forest_sklearn, TORCH_MLP: write_torch_mlp}
    repository = ModelRepository(directory)
    taken = {}
    # The scikit-learn copy reuses the forest's joblib, so the forest comes first.
    needed = [FOREST] if FOREST_SKLEARN in names else []
    for name in dict.fromkeys([*needed, *names]):
        if is_built(directory, name):
            taken[name] = None
            continue
        print(f"building {name} in {directory} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        builders[name](repository)
        taken[name] = round(time.monotonic() - started, 1)
    return {name: taken[name] for name in names}


def mlp_graph(rng: np.random.Generator):
    """Gemm + Relu layers, Softmax at the end; He-scaled random weights keep the
    activations finite all the way through."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights, last = [], [], "input"
    for i, (n_in, n_out) in enumerate(zip(MLP_LAYERS, MLP_LAYERS[1:])):
        w = rng.standard_normal((n_in, n_out), dtype=np.float32) * np.float32(np.sqrt(2.0 / n_in))
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [last, f"w{i}", f"b{i}"], [f"z{i}"]))
        last = f"z{i}"
        if n_out != MLP_LAYERS[-1]:
            nodes.append(helper.make_node("Relu", [last], [f"a{i}"]))
            last = f"a{i}"
    nodes.append(helper.make_node("Softmax", [last], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes, "big_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, MLP_LAYERS[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, MLP_LAYERS[-1]])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def write_mlp(repository: ModelRepository) -> None:
    import onnx

    rng = np.random.default_rng(0)
    model = mlp_graph(rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        metadata = {
            "task": "classification", "algorithm": "MLP",
            "feature_names": [f"f{i}" for i in range(MLP_LAYERS[0])],
            "classes": list(range(MLP_LAYERS[-1])),
            "artifact": "model.onnx", "sha256": sha256_of(path),
            "source_format": "onnx", "serving_runtime": "onnx", "deterministic": True,
            "reference_sample": rng.standard_normal((8, MLP_LAYERS[0])).astype(np.float32).tolist(),
            "training_data": "random weights (perf/bigmodels.py)",
        }
        repository.add_version(MLP, {"model.onnx": path}, metadata)


def train_forest():
    """The fitted forest, its training features and held-out accuracy."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    X, y = make_classification(**FOREST_DATA)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.1, random_state=0)
    forest = RandomForestClassifier(n_estimators=FOREST_TREES, n_jobs=2, random_state=0).fit(X_train, y_train)
    # Served one request at a time per worker: no joblib threads per prediction.
    forest.n_jobs = None
    metrics = {"accuracy": float(forest.score(X_test, y_test)), "n_samples_train": len(X_train),
               "n_samples_test": len(X_test), "n_nodes": int(sum(t.tree_.node_count for t in forest.estimators_))}
    return forest, X_train, metrics


def write_forest(repository: ModelRepository) -> None:
    from app.publishing import publish_estimator

    forest, X, metrics = train_forest()
    names = [f"f{i}" for i in range(X.shape[1])]
    started = time.monotonic()
    mv = publish_estimator(repository, FOREST, forest, X, names, metrics,
                           extra={"training_data": "sklearn.datasets.make_classification (perf/bigmodels.py)"})
    conversion = mv.metadata["conversion"]
    print(f"{FOREST}: published in {time.monotonic() - started:.1f} s (ONNX conversion and check included); "
          f"verified={conversion['verified']} {conversion['reason'] or ''}", file=sys.stderr)


def write_forest_sklearn(repository: ModelRepository) -> None:
    source = repository.get(FOREST, 1)
    keep = ("task", "algorithm", "feature_names", "classes", "metrics", "training_data")
    # Without a reference sample the loader cannot verify a conversion, so it
    # does not attempt one and serves the estimator with scikit-learn.
    metadata = {**{k: source.metadata[k] for k in keep}, "artifact": "model.joblib",
                "sha256": source.metadata["sha256"], "source_format": "joblib",
                "serving_runtime": "sklearn", "deterministic": True}
    repository.add_version(FOREST_SKLEARN, {"model.joblib": source.artifact}, metadata)


def write_torch_mlp(repository: ModelRepository) -> None:
    import torch

    from app.exporters import export_torch
    from app.lifecycle import Lifecycle
    from app.publishing import Publisher

    torch.manual_seed(0)
    layers: list = []
    for n_in, n_out in zip(MLP_LAYERS, MLP_LAYERS[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    module = torch.nn.Sequential(*layers[:-1]).eval()  # logits out: no ReLU after the last layer
    example = np.random.default_rng(0).standard_normal((8, MLP_LAYERS[0])).astype(np.float32)
    started = time.monotonic()
    exported = export_torch(module, example, output="logits")
    publisher = Publisher(Lifecycle(repository, 1e-5))
    publisher.publish_graph(exported.graph, TORCH_MLP, [f"f{i}" for i in range(MLP_LAYERS[0])], "classification",
                            list(range(MLP_LAYERS[-1])), exported.sample,
                            {**exported.metadata(), "training_data": "random weights (perf/bigmodels.py)"})
    print(f"{TORCH_MLP}: exported and published in {time.monotonic() - started:.1f} s; outputs within "
          f"{exported.max_abs_diff:.2g} of torch", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"repository directory (default {DEFAULT_DIR})")
    p.add_argument("--models", type=lambda t: tuple(v.strip() for v in t.split(",")),
                   default=(MLP, FOREST, FOREST_SKLEARN), help=f"comma list of {MLP}, {FOREST}, {FOREST_SKLEARN}, "
                                                              f"{TORCH_MLP} (default: all but {TORCH_MLP})")
    args = p.parse_args(argv)
    for name, seconds in ensure(args.out.resolve(), args.models).items():
        artifacts = sorted((args.out / name / "1").glob("model.*"))
        sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.0f} MB" for f in artifacts)
        print(f"{name}: {sizes}" + (" (reused)" if seconds is None else f" (built in {seconds} s)"))
    return 0

