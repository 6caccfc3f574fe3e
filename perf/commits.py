"""Benchmark the server as it was at several commits, side by side in one run:
the before/after figure of a change to the hot path.

    python -m perf commits 0e8e2d3 598f84d 5678527 --scenario predict_cached --runs 3

Each commit is checked out in a temporary git worktree and served from there
(same virtualenv, same models/, 2 meinheld workers). All servers are started
first and stay idle while another is measured; runs go round-robin over the
commits, so a burst of load from elsewhere spreads over all of them. Each
run is saved as JSON under the output directory, one folder per commit.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from perf import measure, report, scenarios
from perf.report import num, table
from perf.scenarios import SCENARIOS
from perf.targets import Config, Server
from tests.server import ROOT

WARMUP_SECONDS = 2


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commits", nargs="+", help="commits to compare, oldest first")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="repeatable; default: predict_uncached and predict_cached")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    p.add_argument("--runs", type=int, default=3, help="runs per commit and scenario; the median is shown")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, help="output directory (default perf/results/commits-<UTC timestamp>/)")
    return p.parse_args(argv)


def checkout(commit: str, into: Path) -> tuple[str, Path]:
    """A worktree of commit that serves the models of this checkout."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = into / sha
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                   capture_output=True)
    return sha, tree


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = args.scenario or ["predict_uncached", "predict_cached"]
    stamp, out = report.destination(args.out, "commits")
    bodies = scenarios.write_bodies(out / "bodies")
    runs: dict[tuple[str, str], list[dict]] = {}
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="mlserve-commits-") as scratch:
        try:
            for commit in args.commits:
                sha, tree = checkout(commit, Path(scratch))
                servers[sha] = Server(Config("meinheld", args.workers), root=tree).start()
            for scenario in (SCENARIOS[n] for n in names):
                for server in servers.values():
                    measure.check(server, scenario)
                    warning = measure.warm_up(server, scenario, args.connections, WARMUP_SECONDS,
                                              bodies.get(scenario.name))
                    if warning:
                        measure.log("WARNING " + warning)
            for i in range(1, args.runs + 1):
                for scenario in (SCENARIOS[n] for n in names):
                    for sha, server in servers.items():
                        runs.setdefault((sha, scenario.name), []).append(measure.measured(
                            server, scenario, args.connections, args.duration, bodies.get(scenario.name),
                            sha, i, args.runs, out / sha))
        finally:
            for server in servers.values():
                server.close()
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)  # the scratch trees are gone
    medians = {key: measure.median(value) for key, value in runs.items()}
    print("\n".join(render(args, names, list(servers), medians)))
    return 0


def render(args: argparse.Namespace, names: list[str], shas: list[str], medians: dict) -> list[str]:
    lines = [f"{args.workers} meinheld workers, wrk -c{args.connections}, {args.duration} s runs, median of "
             f"{args.runs} (min-max); change = against the commit before it in the list", ""]
    rows = []
    for name in names:
        previous = None
        for sha in shas:
            r = medians[sha, name]
            low, high = r["req_per_s_range"]
            change = f"{r['req_per_s'] / previous - 1:+.1%}" if previous else "-"
            subject = subprocess.run(["git", "log", "-1", "--format=%s", sha], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()
            rows.append((name, sha, subject[:70], num(r["req_per_s"]), f"{num(low)}-{num(high)}", change,
                         num(r["latency_ms"]["p50"], 2), num(r["latency_ms"]["p99"], 2), r["errors_all_runs"],
                         num(r["cpu_ms_per_req"], 3)))
            previous = r["req_per_s"]
    return lines + table(("scenario", "commit", "subject", "req/s", "min-max", "change", "p50 ms", "p99 ms",
                          "errors", "CPU ms/req"), rows)

