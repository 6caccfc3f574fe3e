"""The benchmark scenarios as locust users, for those who drive load with locust:

    .venv/bin/python -m locust -f perf/locustfile.py --host http://127.0.0.1:8080
    .venv/bin/python -m locust -f perf/locustfile.py --headless -u 32 -r 32 -t 30s --host URL PredictUncached

(run from the checkout: `python -m` puts it on the import path, for perf.scenarios).

Name user classes to run only those; with none named, users are spread over
all of them. Bodies are those `python -m perf run` sends with wrk. Figures are not
comparable with wrk's: locust spends far more CPU per request than
wrk, and on a 2-core machine it takes that CPU from the server.
"""
from __future__ import annotations

import random

from locust import FastHttpUser, constant, task

from perf import scenarios

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
