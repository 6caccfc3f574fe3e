"""The benchmark scenarios as locust users, for those who drive load with locust:

    .venv/bin/locust -f perf/locustfile.py --host http://127.0.0.1:8080
    .venv/bin/locust -f perf/locustfile.py --headless -u 32 -r 32 -t 30s --host URL PredictUncached

Name user classes to run only those; with none named, users are spread over
all of them. Bodies are those perf/run.py sends with wrk. Figures are not
comparable with perf/run.py's: locust spends far more CPU per request than
wrk, and on a 2-core machine it takes that CPU from the server.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from locust import FastHttpUser, constant, task  # noqa: E402

from perf import scenarios  # noqa: E402

HEADERS = {"Content-Type": "application/json"}


class Scenario(FastHttpUser):
    abstract = True
    # No think time: each user sends its next request as soon as the last is
    # answered, as a wrk connection does.
    wait_time = constant(0)
    scenario = ""

    def on_start(self) -> None:
        self.spec = scenarios.SCENARIOS[self.scenario]
        self.fixed_body = scenarios.sample_body(self.spec)

    def body(self) -> bytes | None:
        return self.fixed_body

    @task
    def send(self) -> None:
        self.client.request(self.spec.method, self.spec.path, data=self.body(), headers=HEADERS,
                            name=self.spec.name)


class PredictUncached(Scenario):
    scenario = "predict_uncached"


class PredictCached(Scenario):
    scenario = "predict_cached"


class Batch100(Scenario):
    scenario = "batch_100"


class PredictRandom(Scenario):
    scenario = "predict_random"

    def on_start(self) -> None:
        super().on_start()
        self.rng = random.Random()

    def body(self) -> bytes:
        return scenarios.predict_body(scenarios.random_row(self.rng), True)


class Health(Scenario):
    scenario = "health"
