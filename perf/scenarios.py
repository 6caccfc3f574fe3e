"""The scenarios: which wrk script, which endpoint, how many rows a request
predicts, and the request bodies the harness writes for the batch scripts."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import orjson

SCRIPTS = Path(__file__).resolve().parent / "wrk"
IRIS = "iris_classifier"
# The input predict_uncached.lua and predict_cached.lua send.
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
# Ranges of the iris features, as predict_random.lua draws them.
IRIS_LOW = (4.3, 2.0, 1.0, 0.1)
IRIS_SPAN = (3.6, 2.4, 5.9, 2.4)


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    method: str = "POST"
    rows: int = 1           # predictions per request, for rows/s
    body_file: bool = False  # the script reads its body from a file the harness writes
    cached: bool = False     # sends use_cache true: the harness reports the hit ratio

    @property
    def script(self) -> Path:
        return SCRIPTS / f"{self.name}.lua"


SCENARIOS = {s.name: s for s in (
    Scenario("predict_uncached", "/api/v1/predict"),
    Scenario("predict_cached", "/api/v1/predict", cached=True),
    Scenario("batch_100", "/api/v1/batch_predict", rows=100, body_file=True),
    Scenario("batch_1000", "/api/v1/batch_predict", rows=1000, body_file=True),
    Scenario("predict_random", "/api/v1/predict"),
    Scenario("predict_zipf", "/api/v1/predict", cached=True),
    Scenario("predict_paced", "/api/v1/predict"),
    Scenario("health", "/health", method="GET"),
)}


def iris_rows(n: int, seed: int = 0) -> list[list[float]]:
    """n rows of the iris data set, drawn with replacement (fixed seed, so
    every run and the in-process baseline see the same rows)."""
    from sklearn.datasets import load_iris

    data = load_iris().data.tolist()
    rng = random.Random(seed)
    return [data[rng.randrange(len(data))] for _ in range(n)]


def predict_body(features: list[float], use_cache: bool) -> bytes:
    return orjson.dumps({"model_name": IRIS, "features": features, "use_cache": use_cache})


def batch_body(rows: list[list[float]]) -> bytes:
    return orjson.dumps({"model_name": IRIS, "features_batch": rows, "use_cache": False})


def random_row(rng: random.Random) -> list[float]:
    return [round(low + span * rng.random(), 3) for low, span in zip(IRIS_LOW, IRIS_SPAN)]


def sample_body(scenario: Scenario) -> bytes | None:
    """A body like the ones the scenario's script sends, for a check request."""
    if scenario.body_file:
        return batch_body(iris_rows(scenario.rows))
    return {"predict_uncached": predict_body(IRIS_ROW, False),
            "predict_cached": predict_body(IRIS_ROW, True),
            "predict_random": predict_body(random_row(random.Random()), True),
            "predict_zipf": predict_body(random_row(random.Random()), True),
            "predict_paced": predict_body(IRIS_ROW, False)}.get(scenario.name)


def write_bodies(directory: Path) -> dict[str, Path]:
    """The body files of the scenarios that read one, by scenario name."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for scenario in SCENARIOS.values():
        if scenario.body_file:
            paths[scenario.name] = directory / f"{scenario.name}.json"
            paths[scenario.name].write_bytes(sample_body(scenario))
    return paths
