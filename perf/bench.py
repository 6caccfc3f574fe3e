"""The benchmark (`python -m perf run`; `make bench` runs all of it). Narrow it with flags, e.g.

    python -m perf run --scenario predict_uncached --connections 32 --runs 3

For each worker class and worker count it starts the real server (as `make
serve` does), times its cold start, runs every scenario (perf/wrk/<name>.lua)
at every connection count with wrk, then the same load against the reference
apps (perf/reference_apps.py). Each run is saved as JSON in the output
directory; results.md there holds the tables, which are also printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


from perf import machine, measure, report, scenarios
from perf.scenarios import SCENARIOS, Scenario
from perf.reference_apps import in_process
from perf.targets import Config, Reference, Server
from tests.redis_server import RedisServer
from tests.server import ROOT


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




def bench(config: Config, plan: Plan) -> dict:
    cold, server = cold_start(config, plan.out / config.name / "logs")
    try:
        result = {"config": config.name, "env": config.env, "worker": server.worker_in_use(),
                  "cold_start_s": cold, "cold_start_median_s": statistics.median(cold),
                  "pss_idle_mb": machine.pss_mb(server.pids())}
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
        measure.log(f"{config.name} cold start {i + 1}/{COLD_STARTS}: {times[-1]:.3f} s")
        if i < COLD_STARTS - 1:
            server.close()
    return times, server


def bench_reference(app: str, config: Config, plan: Plan) -> dict:
    reference = Reference(app, config).start()
    try:
        result = {"worker": reference.worker_in_use(), "command": reference.command,
                  "pss_idle_mb": machine.pss_mb(reference.pids())}
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
            measure.log("WARNING " + warning)
    runs: dict[tuple[str, int], list[dict]] = {(s.name, c): [] for s in scenarios for c in plan.connections}
    # Round-robin over scenarios and connection counts rather than repeats
    # back to back: a burst of load from elsewhere on the machine then spreads
    # over all the figures instead of skewing one.
    for i in range(1, plan.runs + 1):
        for scenario in scenarios:
            for connections in plan.connections:
                runs[scenario.name, connections].append(measure.measured(
                    target, scenario, connections, plan.duration, plan.bodies.get(scenario.name),
                    config.name, i, plan.runs, plan.out / config.name / target.name))
    return {s.name: {c: measure.median(runs[s.name, c]) for c in plan.connections} for s in scenarios}






def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="repeatable; default: all")
    p.add_argument("--connections", type=int_list, default=[1, 8, 32, 128], help="comma list (default 1,8,32,128)")
    # wrk takes whole seconds.
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell; the median by req/s is reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per scenario first (default 2; 0: none)")
    p.add_argument("--workers", type=int_list, default=[2], help="comma list of worker counts (default 2)")
    p.add_argument("--worker-class", type=name_list, default=["meinheld", "gthread"],
                   help="comma list of meinheld, gthread (default both)")
    p.add_argument("--env", action="append", default=[], metavar="MLSERVE_X=VALUE",
                   help="extra server setting, repeatable (e.g. MLSERVE_REDIS_URL=redis://127.0.0.1:6379/0)")
    p.add_argument("--redis", action="store_true",
                   help="start a private redis-server and give the server its URL (L2 cache, control channel)")
    p.add_argument("--compare-env", action="append", default=[], metavar="MLSERVE_X=VALUE",
                   help="also bench each configuration with this setting added, in the same run (repeatable: "
                        "one more configuration each), e.g. MLSERVE_CACHE_L1_MAX_ENTRIES=0 for L2-only hits")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/<UTC timestamp>/)")
    p.add_argument("--no-references", dest="references", action="store_false",
                   help="skip the reference apps and the in-process baseline")
    args = p.parse_args(argv)
    if set(args.worker_class) - {"meinheld", "gthread"}:
        p.error("--worker-class takes meinheld and/or gthread")
    if any("=" not in item for item in args.env + args.compare_env):
        p.error("--env takes NAME=VALUE")
    if not args.connections or min(args.connections) < 1 or args.runs < 1 or args.duration <= 0:
        p.error("--connections, --runs and --duration must be positive")
    return args


def configs(args: argparse.Namespace, redis_url: str = "") -> list[Config]:
    env = dict(item.split("=", 1) for item in args.env)
    if redis_url:
        env["MLSERVE_REDIS_URL"] = redis_url
    variants = [env] + [{**env, **dict([item.split("=", 1)])} for item in args.compare_env]
    return [Config(k, w, v) for k in args.worker_class for w in args.workers for v in variants]


def estimate_seconds(args: argparse.Namespace, plan: Plan) -> float:
    per_target = len(plan.connections) * plan.runs * plan.duration
    refs = len(REFERENCES) if args.references else 0
    per_config = (len(plan.scenarios) * (per_target + plan.warmup) + refs * (per_target + plan.warmup + 2)
                  + COLD_STARTS * 3)
    return per_config * len(configs(args))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "")
    os.chdir(ROOT)
    names = args.scenario or list(SCENARIOS)
    plan = Plan([SCENARIOS[n] for n in dict.fromkeys(names)], sorted(set(args.connections)), args.duration,
                args.runs, args.warmup, args.references, scenarios.write_bodies(out / "bodies"), out)
    meta = {"stamp": stamp, "host": machine.describe(), "duration": args.duration, "runs": args.runs,
            "warmup": args.warmup, "scenarios": names, "connections": plan.connections}
    measure.log(f"writing to {out}; this takes about {estimate_seconds(args, plan) / 60:.1f} min")
    baseline = in_process(scenarios.iris_rows(1000)) if args.references else None
    with (RedisServer() if args.redis else contextlib.nullcontext()) as redis:
        results = [bench(config, plan) for config in configs(args, redis.url if redis else "")]
    (out / "summary.json").write_text(json.dumps({"meta": meta, "in_process": baseline, "configs": results},
                                                 indent=2) + "\n")
    markdown = report.render(meta, baseline, results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0

