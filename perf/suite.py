"""The benchmark of one server configuration: cold start, every scenario at
every connection count against our server, then the reference apps."""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from perf import measure, usage
from perf.scenarios import SCENARIOS, Scenario
from perf.targets import Config, Reference, Server

COLD_STARTS = 3
# Each reference app, and the scenario of ours it is the floor for. Both are
# driven with predict_uncached.lua; the echo app sends back whatever it gets.
REFERENCES = {"ort": "predict_uncached", "echo": "predict_cached"}


@dataclass(frozen=True)
class Plan:
    scenarios: list[Scenario]
    connections: list[int]
    duration: int
    runs: int
    warmup: int
    references: bool
    bodies: dict[str, Path]
    out: Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(config: Config, plan: Plan) -> dict:
    cold, server = cold_start(config, plan.out / config.name / "logs")
    try:
        result = {"config": config.name, "env": config.env, "worker": server.worker_in_use(),
                  "cold_start_s": cold, "cold_start_median_s": statistics.median(cold),
                  "pss_idle_mb": usage.pss_mb(server.pids())}
        result["results"] = bench_target(server, plan.scenarios, plan, config)
    finally:
        server.close(plan.out / config.name / "logs" / "mlserve.log")
    names = {s.name for s in plan.scenarios}
    result["references"] = {app: bench_reference(app, config, plan)
                            for app, compared in REFERENCES.items() if plan.references and compared in names}
    return result


def cold_start(config: Config, logs: Path) -> tuple[list[float], Server]:
    """Seconds from starting the server process to the first 200 from /ready,
    COLD_STARTS times; the last server is left running for the benchmark.
    The OS page cache is warm after the first start: this is process start-up
    (imports, model loading, forking), not disk."""
    times = []
    for i in range(COLD_STARTS):
        server = Server(config)
        started = time.monotonic()
        try:
            server.start()
        except BaseException:
            server.close(logs / "failed-start.log")
            raise
        times.append(time.monotonic() - started)
        log(f"{config.name} cold start {i + 1}/{COLD_STARTS}: {times[-1]:.3f} s")
        if i < COLD_STARTS - 1:
            server.close()
    return times, server


def bench_reference(app: str, config: Config, plan: Plan) -> dict:
    reference = Reference(app, config).start()
    try:
        result = {"worker": reference.worker_in_use(), "command": reference.command,
                  "pss_idle_mb": usage.pss_mb(reference.pids())}
        result["results"] = bench_target(reference, [SCENARIOS["predict_uncached"]], plan, config)
    finally:
        reference.close(plan.out / config.name / "logs" / f"{reference.name}.log")
    return result


def bench_target(target: Server, scenarios: list[Scenario], plan: Plan, config: Config) -> dict:
    for scenario in scenarios:
        measure.check(target, scenario)
    for scenario in scenarios:
        warning = measure.warm_up(target, scenario, max(plan.connections), plan.warmup, plan.bodies.get(scenario.name))
        if warning:
            log("WARNING " + warning)
    runs: dict[tuple[str, int], list[dict]] = {(s.name, c): [] for s in scenarios for c in plan.connections}
    # Round-robin over scenarios and connection counts rather than repeats
    # back to back: a burst of load from elsewhere on the machine then spreads
    # over all the figures instead of skewing one.
    for i in range(1, plan.runs + 1):
        for scenario in scenarios:
            for connections in plan.connections:
                runs[scenario.name, connections].append(measured(
                    target, scenario, connections, plan.duration, plan.bodies.get(scenario.name),
                    config.name, i, plan.runs, plan.out / config.name / target.name))
    return {s.name: {c: measure.median(runs[s.name, c]) for c in plan.connections} for s in scenarios}


def measured(target: Server, scenario: Scenario, connections: int, duration: int, body: Path | None,
             label: str, run: int, runs: int, directory: Path) -> dict:
    """One measured run, saved as JSON in directory and logged."""
    record = measure.run(target, scenario, connections, duration, body)
    record.update(config=label, run=run)
    save(record, directory / f"{scenario.name}-c{connections}-run{run}.json")
    log(progress(record, runs))
    return record


def save(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def progress(r: dict, runs: int) -> str:
    latency = r["latency_ms"]
    return (f"{r['config']} {r['target']} {r['scenario']} c{r['connections']} run {r['run']}/{runs}: "
            f"{r['req_per_s']:.0f} req/s  p50 {latency['p50']:.2f} ms  p99 {latency['p99']:.2f} ms  "
            f"errors {r['errors']}  server CPU {r['server_cpu_s']:.2f} s  other CPU {r['other_cpu_s']:.2f} s")
