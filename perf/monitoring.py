"""What monitoring costs the request path, in one run (`python -m perf monitoring`):

    python -m perf monitoring --runs 3 --duration 10

The same server (2 meinheld workers, the demo models) in five configurations,
all started first and measured round-robin, so a disturbance from elsewhere
spreads over all of them:

    off     no prediction log, no drift (the reference)
    file    the JSON Lines file sink, every prediction recorded
    file10  the same sink recording a sample of 10 % (prediction_log.sample_rate)
    redis   the Redis stream sink (a private redis-server), every prediction
            recorded; the Redis cache level is off so that only the stream differs
    drift   drift counting on, no sink

predict_uncached and predict_cached at 32 connections; each configuration's
median req/s is given as a ratio of off's (goal: >= 0.9x). Each run is saved
as JSON under perf/results/monitoring-<UTC timestamp>/.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from perf import measure, report
from perf.report import num, ratio, table
from perf.scenarios import SCENARIOS
from perf.targets import Config, Server
from tests.redis_server import RedisServer

CONFIGS = ("off", "file", "file10", "redis", "drift")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", choices=CONFIGS, help=f"repeatable; default: all of {', '.join(CONFIGS)}")
    p.add_argument("--scenario", action="append", choices=["predict_uncached", "predict_cached"],
                   help="repeatable; default: both")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration and scenario; the median is shown")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per configuration and scenario first")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, help="output directory (default perf/results/monitoring-<UTC timestamp>/)")
    return p.parse_args(argv)


def settings(name: str, scratch: Path, redis_url: str) -> dict:
    """The MLSERVE_* settings of one configuration."""
    if name in ("file", "file10"):
        return {"MLSERVE_PREDICTION_LOG_FILE": str(scratch / f"{name}.jsonl"),
                "MLSERVE_PREDICTION_LOG_FILE_MAX_BYTES": str(256 << 20),
                "MLSERVE_PREDICTION_LOG_SAMPLE_RATE": "1.0" if name == "file" else "0.1"}
    if name == "redis":
        return {"MLSERVE_REDIS_URL": redis_url, "MLSERVE_CACHE_L2_ENABLED": "false",
                "MLSERVE_PREDICTION_LOG_REDIS_STREAM": "mlserve:predictions",
                "MLSERVE_PREDICTION_LOG_REDIS_MAXLEN": "100000"}
    if name == "drift":
        return {"MLSERVE_DRIFT_ENABLED": "true"}
    return {}


def dropped(server: Server) -> float:
    """Records the server's prediction log dropped, all sinks and reasons."""
    from prometheus_client.parser import text_string_to_metric_families
    import requests

    total = 0.0
    for family in text_string_to_metric_families(requests.get(server.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "mlserve_prediction_log_dropped_total":
                total += sample.value
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = args.config or list(CONFIGS)
    if "off" not in names:
        names.insert(0, "off")
    chosen = args.scenario or ["predict_uncached", "predict_cached"]
    stamp, out = report.destination(args.out, "monitoring")
    runs: dict[tuple[str, str], list[dict]] = {}
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="mlserve-monitoring-") as scratch, contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(RedisServer()).url if "redis" in names else ""
        try:
            for name in names:
                env = settings(name, Path(scratch), redis_url)
                servers[name] = Server(Config("meinheld", args.workers, env)).start()
            for scenario in (SCENARIOS[n] for n in chosen):
                for server in servers.values():
                    measure.check(server, scenario)
                    warning = measure.warm_up(server, scenario, args.connections, args.warmup, None)
                    if warning:
                        measure.log("WARNING " + warning)
            for i in range(1, args.runs + 1):
                for scenario in (SCENARIOS[n] for n in chosen):
                    for name, server in servers.items():
                        runs.setdefault((name, scenario.name), []).append(measure.measured(
                            server, scenario, args.connections, args.duration, None, name, i, args.runs, out / name))
            lost = {name: dropped(server) for name, server in servers.items()}
        finally:
            for name, server in servers.items():
                server.close(out / name / "mlserve.log")
    medians = {key: measure.median(value) for key, value in runs.items()}
    print("\n".join(render(args, names, chosen, medians, lost)))
    return 0


def render(args: argparse.Namespace, names: list[str], chosen: list[str], medians: dict, lost: dict) -> list[str]:
    lines = [f"{args.workers} meinheld workers, wrk -c{args.connections}, {args.duration} s runs, median of "
             f"{args.runs} (min-max); ratio = req/s against off in the same run (goal >= 0.9x)", ""]
    rows = []
    for scenario in chosen:
        reference = medians[("off", scenario)]["req_per_s"]
        for name in names:
            r = medians[(name, scenario)]
            low, high = r["req_per_s_range"]
            rows.append((scenario, name, num(r["req_per_s"]), f"{num(low)}-{num(high)}", ratio(r["req_per_s"], reference),
                         num(r["latency_ms"]["p50"], 2), num(r["latency_ms"]["p99"], 2), r["errors_all_runs"],
                         num(r["cpu_ms_per_req"], 3), num(lost.get(name))))
    return lines + table(("scenario", "config", "req/s", "min-max", "ratio", "p50 ms", "p99 ms", "errors",
                          "CPU ms/req", "log dropped"), rows)
