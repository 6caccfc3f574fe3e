"""The floors our server is measured against, served by the same Gunicorn
command line, worker class and worker count as the server itself.

echo: Falcon + orjson, no model. What any JSON endpoint costs on this stack;
      the most a cache hit could ever reach.
ort:  Falcon + orjson + one ONNX Runtime call on the iris model. What an
      uncached prediction costs with nothing of ours in between.

in_process(): ONNX Runtime alone, in this process, on one thread: the ceiling
      for what one worker can do with the same rows, with no HTTP and no JSON.

Run: gunicorn -c perf/reference_gunicorn.py perf.reference_apps:echo
"""
from __future__ import annotations

import os

# Same thread limits as gunicorn.conf.py, set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import falcon  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import orjson  # noqa: E402

IRIS = Path(__file__).resolve().parent.parent / "models" / "iris_classifier" / "1" / "model.onnx"
PATH = "/api/v1/predict"


def session_options() -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def iris_session(path: Path = IRIS) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


class Echo:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/json"
        resp.data = orjson.dumps(orjson.loads(req.stream.read(req.content_length or 0)))


class Predict:
    def __init__(self, session: onnxruntime.InferenceSession):
        self.session = session

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = orjson.loads(req.stream.read(req.content_length or 0))
        X = np.array(body["features"], dtype=np.float32).reshape(1, 4)
        label, probabilities = self.session.run(None, {"X": X})
        resp.content_type = "application/json"
        resp.data = orjson.dumps({"prediction": int(label[0]), "probabilities": probabilities[0].tolist()})


class Ready:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ready"}


def build(resource) -> falcon.App:
    app = falcon.App()
    app.add_route(PATH, resource)
    # Polled by the harness until the workers answer, as it polls the server's /ready.
    app.add_route("/ready", Ready())
    return app


echo = build(Echo())


def seconds_per_run(session, X: np.ndarray, repeats: int) -> float:
    for _ in range(10):
        session.run(None, {"X": X})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"X": X})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def in_process(rows: list[list[float]], repeats: int = 300) -> dict:
    session = iris_session()
    X = np.array(rows, dtype=np.float32)
    batch = seconds_per_run(session, X, repeats)
    single = seconds_per_run(session, X[:1], repeats * 10)
    return {"rows": len(X), "repeats": repeats,
            "batch_ms": batch * 1000, "batch_rows_per_s": len(X) / batch,
            "single_us": single * 1e6, "single_per_s": 1 / single}


def __getattr__(name: str) -> falcon.App:
    # `ort` is built on first access, so the echo workers hold no session.
    # Gunicorn looks it up in the master (--preload): the session is created
    # once before fork, as the server creates its models'.
    if name == "ort":
        app = globals()["ort"] = build(Predict(iris_session()))
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
