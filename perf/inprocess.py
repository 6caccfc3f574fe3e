"""ONNX Runtime alone, in this process, on one thread: the ceiling for what
one worker can do with the same rows, with no HTTP and no JSON."""
from __future__ import annotations

import statistics
import time

import numpy as np

from perf.reference_apps import iris_session


def seconds_per_run(session, X: np.ndarray, repeats: int) -> float:
    for _ in range(10):
        session.run(None, {"X": X})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"X": X})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(rows: list[list[float]], repeats: int = 300) -> dict:
    session = iris_session()
    X = np.array(rows, dtype=np.float32)
    batch = seconds_per_run(session, X, repeats)
    single = seconds_per_run(session, X[:1], repeats * 10)
    return {"rows": len(X), "repeats": repeats,
            "batch_ms": batch * 1000, "batch_rows_per_s": len(X) / batch,
            "single_us": single * 1e6, "single_per_s": 1 / single}
