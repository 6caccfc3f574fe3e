"""Rate-limit accuracy across workers and hosts (`python -m perf ratelimit`):

    python -m perf ratelimit --duration 20 --runs 3

Two servers ("hosts", as `make serve` starts them, each with 2 workers) on
different ports share one redis-server (started here, on a free port) as
their redis.url, so the limit's moving window is counted in Redis across all
four workers. A load generator offers a fixed --rate (400 req/s) in total,
half to each host: one wrk per host (-t1, --connections keep-alive
connections) with perf/wrk/ratelimit_paced.lua, which paces each request to
a slot of a fixed schedule and counts answers per status and per second.

Modes (--mode, repeatable; default both):

- key: API keys on; one predict key created with a rate of --limit (100)
  req/s; every request carries it.
- address: API keys off; rate_limiting on with requests_per_second = burst =
  --limit, the same window (--limit requests per 1 s) per client address.
  Every request comes from 127.0.0.1, so both hosts count one address.

Per run: offered req/s (answers per second, 2xx and 429 alike: the rate the
generator reached), accepted (2xx) per second with the lowest and highest
second, 429 per second, other statuses and socket errors (must be 0), and
how often a worker fell back to its own memory because Redis did not answer
within redis.socket_timeout (a run where that happened measured the fallback,
not the shared limit). Seconds are whole seconds of the machine's monotonic
clock during which every generator ran; the partial first and last seconds
are left out. Goal: the median accepted/s of the runs is --limit +- 10 %.

Each mode starts its own Redis and hosts, checks one request per host, warms
up for --warmup s and then 2 s at a time until every worker counts in Redis
again (not recorded), then measures --runs runs. Results go to
perf/results/ratelimit-<UTC timestamp>/ (summary.json, results.md, server logs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import requests

from app.keys import KeyFile
from perf import machine, measure, report
from perf.targets import Config, Server
from tests.redis_server import RedisServer
from tests.server import ROOT

SCRIPT = ROOT / "perf" / "wrk" / "ratelimit_paced.lua"
PATH = "/api/v1/predict"
BODY = {"model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}
HOSTS = 2
MODES = ("key", "address")
TOLERANCE = 0.10
FALLBACK, RECOVERED = "rate limits: Redis unavailable", "rate limits: counted in Redis again"
# Warm-up windows until every worker counts in Redis; a worker's first call to
# Redis (connection, scripts) can overrun the socket timeout and open its
# breaker for cache.breaker_reset (5 s), which would be measured as the limit.
SETTLE_SECONDS, SETTLE_MAX_SECONDS = 2, 30


def mode_env(mode: str, limit: int, redis_url: str, keys_file: Path) -> dict:
    env = {"MLSERVE_REDIS_URL": redis_url}
    if mode == "key":
        return {**env, "MLSERVE_SECURITY_API_KEYS": "true", "MLSERVE_SECURITY_KEYS_FILE": str(keys_file)}
    return {**env, "MLSERVE_RATE_LIMITING_ENABLED": "true", "MLSERVE_RATE_LIMITING_REQUESTS_PER_SECOND": str(limit),
            "MLSERVE_RATE_LIMITING_BURST": str(limit)}


def check(hosts: list[Server], key: str) -> None:
    """One prediction per host, answered 200."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for host in hosts:
        resp = requests.post(host.url + PATH, json=BODY, headers=headers, timeout=10)
        if resp.status_code != 200:
            raise RuntimeError(f"{host.url}: HTTP {resp.status_code}: {resp.text[:300]}")


def generate(hosts: list[Server], key: str, rate: float, connections: int, duration: int) -> list[dict]:
    """Run one paced wrk per host at once; each one's summary and COUNTS."""
    env = {**os.environ, "MLSERVE_API_KEY": key}
    per_host = rate / len(hosts)
    procs = [subprocess.Popen([measure.WRK, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout",
                               f"{measure.TIMEOUT_SECONDS}s", "-s", str(SCRIPT), host.url + PATH, "--", f"{per_host:g}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for host in hosts]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=duration + measure.TIMEOUT_SECONDS + 30)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        counts = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("COUNTS ")), None)
        if counts is None:
            raise RuntimeError(f"wrk printed no COUNTS line (exit {proc.returncode}):\n{out}\n{err}")
        results.append({"summary": measure.parse_wrk(done), "counts": counts})
    return results


def tally(results: list[dict]) -> dict:
    """The per-second figures over the whole seconds every generator covered."""
    spans = [{second for second, _, _ in r["counts"]} for r in results]
    first, last = max(min(s) for s in spans) + 1, min(max(s) for s in spans) - 1
    if last < first:
        raise RuntimeError("no whole second in which every generator ran; use a longer --duration")
    seconds = {s: Counter() for s in range(first, last + 1)}
    for r in results:
        for second, status, n in r["counts"]:
            if first <= second <= last:
                seconds[second][status] += n
    accepted = [sum(n for status, n in c.items() if 200 <= status < 300) for c in seconds.values()]
    limited = [c[429] for c in seconds.values()]
    answered = [sum(c.values()) for c in seconds.values()]
    socket = sum(r["summary"][k] for r in results for k in ("connect", "read", "write", "timeout"))
    return {"seconds": len(seconds), "offered_per_s": statistics.mean(answered),
            "accepted_per_s": statistics.mean(accepted), "accepted_range": [min(accepted), max(accepted)],
            "limited_per_s": statistics.mean(limited), "other_statuses": sum(answered) - sum(accepted) - sum(limited),
            "socket_errors": socket, "per_second": [dict(c) for c in seconds.values()]}


def fallbacks(hosts: list[Server]) -> int:
    return sum(host.log().count(FALLBACK) for host in hosts)


def open_breakers(hosts: list[Server]) -> int:
    """Workers counting in their own memory now: fallbacks not yet followed by a recovery."""
    return sum(host.log().count(FALLBACK) - host.log().count(RECOVERED) for host in hosts)


def warm_up(hosts: list[Server], key: str, args: argparse.Namespace) -> None:
    """--warmup seconds of load, then more until no worker counts on its own."""
    if args.warmup:
        generate(hosts, key, args.rate, args.connections, args.warmup)
    waited = 0
    while open_breakers(hosts) and waited < SETTLE_MAX_SECONDS:
        generate(hosts, key, args.rate, args.connections, SETTLE_SECONDS)
        waited += SETTLE_SECONDS
    if open_breakers(hosts):
        measure.log(f"WARNING {open_breakers(hosts)} worker(s) still count on their own after {waited} s more warm-up")
    elif fallbacks(hosts):
        measure.log(f"{fallbacks(hosts)} fallback(s) to worker memory before the runs, all recovered "
                    f"({waited} s more warm-up)")


def measure_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mlserve-ratelimit-"))
    keys_file = workdir / "keys.json"
    key = KeyFile(keys_file).create("ratelimit-bench", ["predict"], rate=args.limit)[0] if mode == "key" else ""
    redis = RedisServer().start()
    env = mode_env(mode, args.limit, redis.url, keys_file)
    hosts = [Server(Config(args.worker_class, args.workers, env)) for _ in range(HOSTS)]
    try:
        for host in hosts:
            host.start()
        check(hosts, key)
        warm_up(hosts, key, args)
        runs = []
        for number in range(1, args.runs + 1):
            before, load = fallbacks(hosts), machine.loadavg()
            run = tally(generate(hosts, key, args.rate, args.connections, args.duration))
            run.update(run=number, redis_fallbacks=fallbacks(hosts) - before, loadavg=load)
            measure.save(run, out / "runs" / f"{mode}-run{number}.json")
            measure.log(f"{mode} run {number}/{args.runs}: offered {run['offered_per_s']:.1f} req/s, accepted "
                        f"{run['accepted_per_s']:.1f}/s, 429 {run['limited_per_s']:.1f}/s, other statuses "
                        f"{run['other_statuses']}, socket errors {run['socket_errors']}, "
                        f"Redis fallbacks {run['redis_fallbacks']}")
            runs.append(run)
        return {"mode": mode, "worker": hosts[0].worker_in_use(), "runs": runs,
                "median_accepted_per_s": statistics.median(r["accepted_per_s"] for r in runs)}
    finally:
        for i, host in enumerate(hosts):
            host.close(out / f"{mode}-host{i + 1}.log")
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def render(meta: dict, results: list[dict]) -> str:
    host = meta["host"]
    lines = [f"# Rate-limit accuracy, {meta['stamp']}", "",
             f"- machine: {host['cpus']} CPUs ({host['cpu']}), load average at start {host['loadavg_at_start']:.2f}; "
             f"commit {host['commit']}{' with uncommitted changes' if host['dirty'] else ''}; {host['wrk']}",
             f"- {HOSTS} hosts x {meta['workers']} workers ({results[0]['worker'] if results else '-'}), one Redis; "
             f"limit {meta['limit']} req/s; offered {meta['rate']:g} req/s in total, {meta['rate'] / HOSTS:g} per host, "
             f"{meta['connections']} connections per host; {meta['duration']} s per run, {meta['runs']} run(s) "
             f"after a {meta['warmup']} s warm-up", ""]
    rows = []
    for result in results:
        for r in result["runs"]:
            rows.append((result["mode"], r["run"], f"{r['offered_per_s']:.1f}", f"{r['accepted_per_s']:.1f}",
                         f"{r['accepted_range'][0]}-{r['accepted_range'][1]}", f"{r['limited_per_s']:.1f}",
                         r["other_statuses"], r["socket_errors"], r["redis_fallbacks"], r["seconds"]))
    lines += report.table(("mode", "run", "offered req/s", "accepted/s", "accepted, lowest-highest second",
                           "429/s", "other statuses", "socket errors", "Redis fallbacks", "seconds"), rows)
    lines.append("")
    for result in results:
        median = result["median_accepted_per_s"]
        ratio = median / meta["limit"]
        met = abs(ratio - 1) <= TOLERANCE and not any(r["other_statuses"] or r["socket_errors"] for r in result["runs"])
        lines.append(f"- {result['mode']}: median accepted {median:.1f}/s = {ratio:.3f} of the {meta['limit']} req/s "
                     f"limit (goal 1 +- {TOLERANCE:.0%}, no other status: {'met' if met else 'MISSED'})")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", action="append", choices=MODES, help="repeatable; default: both")
    p.add_argument("--limit", type=int, default=100, help="the limit in req/s (default 100)")
    p.add_argument("--rate", type=float, default=400, help="offered req/s in total over both hosts (default 400)")
    p.add_argument("--duration", type=int, default=20, help="seconds per run (default 20; at least 3)")
    p.add_argument("--runs", type=int, default=3, help="runs per mode; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per mode first (default 2; 0: none)")
    p.add_argument("--connections", type=int, default=8, help="keep-alive connections per host (default 8)")
    p.add_argument("--workers", type=int, default=2, help="workers per host (default 2)")
    p.add_argument("--worker-class", choices=["meinheld", "gthread"], default="meinheld")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/ratelimit-<UTC timestamp>/)")
    args = p.parse_args(argv)
    if args.duration < 3 or args.runs < 1 or args.warmup < 0 or args.connections < 1 or args.limit < 1 or args.rate <= 0:
        p.error("--duration must be >= 3, --runs, --connections, --limit and --rate positive, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "ratelimit")
    os.chdir(ROOT)
    modes = list(dict.fromkeys(args.mode or MODES))
    meta = {"stamp": stamp, "host": machine.describe(), "limit": args.limit, "rate": args.rate,
            "duration": args.duration, "runs": args.runs, "warmup": args.warmup, "connections": args.connections,
            "workers": args.workers, "modes": modes}
    measure.log(f"writing to {out}; this takes about {len(modes) * (args.warmup + args.runs * args.duration + 15)} s")
    results = [measure_mode(mode, args, out) for mode in modes]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    markdown = render(meta, results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0
