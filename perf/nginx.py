"""Throughput through nginx against the same instances directly, in one run.

    python -m perf nginx --duration 10 --connections 32 --runs 3

Starts two server instances on the demo models (as tests/test_nginx.py does,
standing in for two hosts) and real nginx in front of them with the
production config (docker/nginx/, through tests/nginx.py). Each run is a pair,
alternating so that drift on a shared machine falls on both sides alike:

- direct: one wrk per instance at the same time, half the connections each;
  the two wrk's req/s are summed.
- nginx:  one wrk against nginx with all the connections.

wrk runs perf/wrk/<scenario>.lua (default predict_uncached). The medians of
the runs are printed; --out writes every run as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from perf import machine  # noqa: E402
from perf.measure import TIMEOUT_SECONDS, parse_wrk, wrk_command  # noqa: E402
from perf.scenarios import SCENARIOS, Scenario, sample_body  # noqa: E402
from tests.nginx import Nginx  # noqa: E402
from tests.server import Server  # noqa: E402

DEMO = ("iris_classifier", "binary_classifier", "diabetes_regressor", "wine_clusters")
# Scenarios whose script needs no body file written by the harness.
CHOICES = [name for name, s in SCENARIOS.items() if not s.body_file]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="perf nginx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=CHOICES, default="predict_uncached")
    p.add_argument("--connections", type=int, default=32, help="in all, each side (default 32)")
    # wrk takes whole seconds.
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="pairs of runs; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds of each side first (default 2)")
    p.add_argument("--workers", type=int, default=1, help="workers per instance (default 1: two instances "
                                                          "on two cores)")
    p.add_argument("--out", type=Path, help="write the runs and the summary to this JSON file")
    args = p.parse_args(argv)
    if args.connections < 2 or args.duration < 1 or args.runs < 1 or args.workers < 1 or args.warmup < 0:
        p.error("--connections must be at least 2; --duration, --runs and --workers positive")
    return args


def demo_models(tmp: Path) -> Path:
    """The checkout's demo models (make models) or, if missing, fresh ones."""
    if all((ROOT / "models" / name / "1" / "metadata.json").is_file() for name in DEMO):
        return ROOT / "models"
    from app.repository import ModelRepository
    from app.training import build_demo_models

    build_demo_models(ModelRepository(tmp / "models"))
    return tmp / "models"


def wrk_together(scenario: Scenario, targets: list[tuple[str, int]], duration: int) -> list[dict]:
    """One wrk per (url, connections), all at the same time; their summaries."""
    procs = [subprocess.Popen(wrk_command(scenario.script, url + scenario.path, connections, duration),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for url, connections in targets]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=duration + TIMEOUT_SECONDS + 30)
        results.append(parse_wrk(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))
    return results


def summarize(wrks: list[dict]) -> dict:
    seconds = max(w["duration_us"] for w in wrks) / 1e6
    requests = sum(w["requests"] for w in wrks)
    errors = sum(w["non2xx"] + w["connect"] + w["read"] + w["write"] + w["timeout"] for w in wrks)
    return {
        "requests": requests, "errors": errors,
        # Only 2xx answers count, as in perf/measure.py.
        "req_per_s": sum((w["requests"] - w["non2xx"]) / (w["duration_us"] / 1e6) for w in wrks),
        "p50_ms": max(w["p50_us"] for w in wrks) / 1000, "p99_ms": max(w["p99_us"] for w in wrks) / 1000,
        "seconds": seconds,
    }


def check(url: str, scenario: Scenario) -> None:
    import requests

    r = requests.request(scenario.method, url + scenario.path, data=sample_body(scenario),
                         headers={"Content-Type": "application/json"}, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"{url}{scenario.path}: HTTP {r.status_code}: {r.text[:300]}")


def measure(args: argparse.Namespace, direct: list[str], front: str) -> dict:
    scenario = SCENARIOS[args.scenario]
    half = args.connections // 2
    sides = {"direct": [(url, half) for url in direct], "nginx": [(front, 2 * half)]}
    for url in [*direct, front]:
        check(url, scenario)
    if args.warmup:
        for targets in sides.values():
            wrk_together(scenario, targets, args.warmup)
    runs = {name: [] for name in sides}
    for _ in range(args.runs):
        for name, targets in sides.items():
            runs[name].append(summarize(wrk_together(scenario, targets, args.duration)))
    medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in runs.items()}
    return {"runs": runs, "median": medians,
            "nginx_over_direct": medians["nginx"]["req_per_s"] / medians["direct"]["req_per_s"]
            if medians["direct"]["req_per_s"] else None}


def report(args: argparse.Namespace, result: dict) -> str:
    lines = [f"{args.scenario}, {2 * (args.connections // 2)} connections, {args.duration} s x {args.runs} runs, "
             f"2 instances x {args.workers} worker(s)",
             "| path | req/s (median) | p50 ms | p99 ms | errors (all runs) |", "|---|---:|---:|---:|---:|"]
    for name, median in result["median"].items():
        errors = sum(r["errors"] for r in result["runs"][name])
        lines.append(f"| {name} | {median['req_per_s']:,.0f} | {median['p50_ms']:.2f} | {median['p99_ms']:.2f} "
                     f"| {errors} |")
    ratio = result["nginx_over_direct"]
    lines.append(f"through nginx: {ratio:.2f}x the direct throughput" if ratio else "no direct throughput")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="perf-nginx-") as tmp:
        models = demo_models(Path(tmp))
        servers = [Server(models, workers=args.workers) for _ in range(2)]
        try:
            for server in servers:
                server.start()
            with Nginx([f"127.0.0.1:{s.port}" for s in servers]) as nginx:
                started = time.time()
                result = measure(args, [s.url for s in servers], nginx.url)
        finally:
            for server in servers:
                server.stop()
    print(report(args, result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"started": started, "host": machine.describe(), "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
